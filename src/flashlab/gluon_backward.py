"""Host side of the Gluon backward (kernels/backward_gluon.py, kernels/backward_gluon_fused.py): when
it runs, its two-kernel launches and its fused launch.

The default backward on Hopper at head dim 128 in the Gluon forward's scope (gluon_forward.py:
Hopper, Triton 3.6, fp16/bf16, from 1024 tokens, causal where every query sees a key, no other
option, dense q / k / v with k and v in one memory order); ``FLASHLAB_BWD_GLUON=0`` turns it off.
It replaces the dK/dV and dQ kernels; the `tl` preprocess kernel still computes Δ = rowsum(dO ⊙ O).
Measured on the H200 (docs/performance.md): 1.10–1.16× the `tl` backward at head dim 128; at 64 it
ties (0.93–1.02×), so head dim 64 keeps the `tl` kernels. Causal calls from FUSED_MIN_SEQLEN tokens
without GQA take the fused kernel instead (dQ by fp32 atomics: 1.11–1.13× the two kernels, round
10) unless the caller asks for deterministic gradients (fused_eligible). Both split a GQA group
over several dK/dV programs where the grid is small (group_split.py).
"""

from __future__ import annotations

import torch

from flashlab import group_split
from flashlab.gluon_forward import MAXNREG, causal_diag, gluon_call_ok, switched_on, tile_descriptor, tile_view
from flashlab.kernels import configs
from flashlab.kernels.launch import launch

DKDV_BLOCK_N = 128  # keys a dK/dV program (64 a consumer)
DQ_BLOCK_M = 128  # query rows a dQ program (64 a consumer)
# head dim -> (query rows a dK/dV tile, ring stages). At d128, 64-row dK/dV tiles spill ~140 B (causal
# ~500) in the consumers, yet with 128-key dQ blocks the pair runs 6–14% faster than 32-row × 4
# stages (no spills) with 64-key dQ blocks (round 9).
DKDV_TILES = {64: (64, 3), 128: (64, 3)}
DQ_TILES = {64: (128, 3), 128: (128, 2)}  # head dim -> (keys a dQ block, ring stages)
HEAD_DIMS = (128,)  # where it runs by default; d64's tiles are the benchmark's (a tie with `tl`)
# The fused kernel (kernels/backward_gluon_fused.py, head dim 128):
# (query rows a tile, ring stages, dS buffers). 64-row tiles spill ~200 B and still beat 32-row
# ones (spill-free) by 5-23% at 16k (round 10).
FUSED_TILES = (64, 2, 2)
# Where the fused kernel runs instead of the two: causal from 8k tokens, measured 1.11-1.13x the
# two-kernel backward there (round 10); at 2k it is 0.96x, without the mask 0.92-0.99x.
FUSED_MIN_SEQLEN = 8192
# GQA groups up to this size take it: with 4 or 32 query heads a kv head the two kernels won at
# causal 8k-16k (1.03-1.17x, H200, round 11); the fused kernel handles any group (tests force it).
FUSED_MAX_GROUP = 1


def gluon_bwd_eligible(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, window_right: int,
                       *tensors: torch.Tensor) -> bool:
    """Whether the Gluon backward runs this call; ``tensors`` are the 4-D q, k, v."""
    return head_dim in HEAD_DIMS and switched_on("FLASHLAB_BWD_GLUON") and gluon_call_ok(
        flags, head_dim, seqlen_q, seqlen_k, window_right, *tensors)


def fused_eligible(causal: bool, seqlen_q: int, seqlen_k: int, head_dim: int, deterministic: bool,
                   group: int = 1) -> bool:
    """Whether a call that passed gluon_bwd_eligible takes the fused kernel: causal, head dim 128,
    both lengths from FUSED_MIN_SEQLEN, ``group`` (query heads a kv head) up to FUSED_MAX_GROUP, and
    nondeterminism allowed (neither ``deterministic`` nor torch.use_deterministic_algorithms);
    FLASHLAB_BWD_FUSED=0 turns it off."""
    return (causal and head_dim == 128 and group <= FUSED_MAX_GROUP and min(seqlen_q, seqlen_k) >= FUSED_MIN_SEQLEN
            and not deterministic and not torch.are_deterministic_algorithms_enabled()
            and switched_on("FLASHLAB_BWD_FUSED"))


def _views_and_scalars(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, do4: torch.Tensor, dk4: torch.Tensor,
                       dv4: torch.Tensor, softmax_scale: float, causal: bool, bottom_right: bool) -> tuple:
    """(q, k, v, dO as tile_views, the scalar arguments both backward launches end with: row and
    column offsets, lengths, diagonal, group size, scales). ``do4`` in another memory order than
    q4 is copied into q4's first (its row offsets address dO too)."""
    _, seqlen_q, heads, _ = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    (q3, q_seq_b, q_seq_h, q_col_h), (k3, k_seq_b, k_seq_h, k_col_h), (v3, *_) = (
        tile_view(t) for t in (q4, k4, v4))
    do_view = tile_view(do4)
    if do_view is None or do_view[1:] != (q_seq_b, q_seq_h, q_col_h):
        do_view = tile_view(torch.empty_like(q4).copy_(do4))
    if dk4.stride() != dv4.stride():
        raise ValueError(f"dk and dv need the same strides, got {dk4.stride()} and {dv4.stride()}")
    scalars = (q_seq_b, q_seq_h, q_col_h, k_seq_b, k_seq_h, k_col_h, seqlen_q, seqlen_k,
               causal_diag(causal, bottom_right, seqlen_q, seqlen_k), heads // kv_heads,
               softmax_scale * 1.4426950408889634, softmax_scale)
    return q3, k3, v3, do_view[0], scalars


def _split(dk4: torch.Tensor, dv4: torch.Tensor, batch: int, kv_heads: int, rows: tuple, block_m: int,
           causal: bool) -> group_split.DkDvTargets:
    """group_split.targets for a dK/dV launch; ``rows`` are _views_and_scalars' scalars."""
    seqlen_q, seqlen_k, diag, group = rows[6:10]
    return group_split.targets(dk4, dv4, batch, kv_heads, group, seqlen_q, seqlen_k, block_m, DKDV_BLOCK_N,
                               diag if causal else None)


def launch_bwd_gluon(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, do4: torch.Tensor, dq4: torch.Tensor,
                     dk4: torch.Tensor, dv4: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                     lse_strides: tuple[int, int], softmax_scale: float, causal: bool, bottom_right: bool = True,
                     dkdv_tiles: tuple[int, int] | None = None, dq_tiles: tuple[int, int] | None = None) -> None:
    """dQ, dK, dV into dq4 / dk4 / dv4 ((batch, seqlen, heads, dim) views; dk4 and dv4 with the same
    strides) for a call that passed gluon_bwd_eligible. ``lse`` / ``delta``: (batch, heads, seqlen_q)
    fp32 by ``lse_strides``. ``do4`` in another memory order than q4 is copied into q4's first."""
    from flashlab.kernels.backward_gluon import attn_bwd_dkdv_gluon_kernel, attn_bwd_dq_gluon_kernel

    batch, seqlen_q, heads, head_dim = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    q3, k3, v3, do3, rows = _views_and_scalars(q4, k4, v4, do4, dk4, dv4, softmax_scale, causal, bottom_right)

    block_m, stages = dkdv_tiles or DKDV_TILES[head_dim]
    split = _split(dk4, dv4, batch, kv_heads, rows, block_m, causal)
    launch(
        attn_bwd_dkdv_gluon_kernel, (configs.cdiv(seqlen_k, DKDV_BLOCK_N), kv_heads, batch * split.splits),
        tile_descriptor(q3, block_m, head_dim), tile_descriptor(do3, block_m, head_dim),
        tile_descriptor(k3, DKDV_BLOCK_N // 2, head_dim), tile_descriptor(v3, DKDV_BLOCK_N // 2, head_dim),
        lse, delta, split.dk, split.dv, *lse_strides, *split.strides(False)[:3], *rows, split.heads_per_split,
        split.stride_split, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=DKDV_BLOCK_N, STAGES=stages,
        CAUSAL=bool(causal), EVEN=seqlen_q % block_m == 0 and seqlen_k % DKDV_BLOCK_N == 0, SPLIT=split.splits > 1,
        num_warps=4, maxnreg=MAXNREG)
    split.finish(dk4, dv4, launch)
    block_n, stages = dq_tiles or DQ_TILES[head_dim]
    launch(
        attn_bwd_dq_gluon_kernel, (configs.cdiv(seqlen_q, DQ_BLOCK_M), heads, batch),
        tile_descriptor(q3, DQ_BLOCK_M // 2, head_dim), tile_descriptor(do3, DQ_BLOCK_M // 2, head_dim),
        tile_descriptor(k3, block_n, head_dim), tile_descriptor(v3, block_n, head_dim),
        lse, delta, dq4, *lse_strides, dq4.stride(0), dq4.stride(1), dq4.stride(2), *rows,
        HEAD_DIM=head_dim, BLOCK_M=DQ_BLOCK_M, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        EVEN=seqlen_k % block_n == 0,
        num_warps=4, maxnreg=MAXNREG)


def launch_bwd_gluon_fused(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, do4: torch.Tensor,
                           dq4: torch.Tensor, dk4: torch.Tensor, dv4: torch.Tensor, lse: torch.Tensor,
                           delta: torch.Tensor, lse_strides: tuple[int, int], softmax_scale: float, causal: bool,
                           bottom_right: bool = True, tiles: tuple[int, int, int] | None = None) -> None:
    """launch_bwd_gluon's contract (head dim 128) by the one-kernel backward: dK, dV and dQ from one
    pass, dQ summed by fp32 atomics into a zeroed (batch, heads, head_dim, seqlen) buffer, then
    cast into dq4 — not bit-reproducible across runs. ``tiles``: (query rows, stages, dS buffers)."""
    from flashlab.kernels.backward_gluon_fused import attn_bwd_fused_gluon_kernel

    batch, seqlen_q, heads, head_dim = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    block_m, stages, nbuf = tiles or FUSED_TILES
    q3, k3, v3, do3, rows = _views_and_scalars(q4, k4, v4, do4, dk4, dv4, softmax_scale, causal, bottom_right)
    # Query-contiguous, so each thread's pair of dQᵀ elements is one 8-byte atomic; every tile's rows
    # exist (a ragged last tile adds zeros past seqlen_q).
    rows_padded = configs.cdiv(seqlen_q, block_m) * block_m
    dq_acc = torch.zeros(batch, heads, head_dim, rows_padded, device=q4.device, dtype=torch.float32)
    split = _split(dk4, dv4, batch, kv_heads, rows, block_m, causal)
    launch(
        attn_bwd_fused_gluon_kernel, (configs.cdiv(seqlen_k, DKDV_BLOCK_N), kv_heads, batch * split.splits),
        tile_descriptor(q3, block_m, head_dim), tile_descriptor(do3, block_m, head_dim),
        tile_descriptor(k3, DKDV_BLOCK_N // 2, head_dim), tile_descriptor(v3, DKDV_BLOCK_N // 2, head_dim),
        lse, delta, split.dk, split.dv, dq_acc, *lse_strides, *split.strides(False)[:3],
        dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2), *rows, split.heads_per_split, split.stride_split,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=DKDV_BLOCK_N, STAGES=stages, NBUF=nbuf, CAUSAL=bool(causal),
        EVEN=seqlen_q % block_m == 0 and seqlen_k % DKDV_BLOCK_N == 0, SPLIT=split.splits > 1,
        num_warps=4, maxnreg=MAXNREG)
    split.finish(dk4, dv4, launch)
    dq4.copy_(dq_acc[..., :seqlen_q].permute(0, 3, 1, 2))
