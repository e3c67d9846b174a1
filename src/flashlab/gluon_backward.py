"""Host side of the Gluon backward (kernels/backward_gluon.py): when it runs, and its two launches.

Opt-in with ``FLASHLAB_BWD_GLUON=1``, in the Gluon forward's scope (gluon_forward.py: Hopper,
Triton 3.6, fp16/bf16, head dim 128 from 1024 tokens or 64 from 4096, causal where every query sees
a key, no other option, dense q / k / v with k and v in one memory order). It replaces the dK/dV and dQ kernels; the
`tl` preprocess kernel still computes Δ = rowsum(dO ⊙ O). **Never run on a GPU yet** (written
2026-12-02 after the device budget was spent: docs/perf-notes.md round 8, experiment 10).
"""

from __future__ import annotations

import os

import torch

from flashlab.gluon_forward import MAXNREG, causal_diag, gluon_call_ok, rows_view, tile_descriptor
from flashlab.kernels import configs

DKDV_BLOCK_N = 128  # keys a dK/dV program (64 a consumer)
DQ_BLOCK_M = 128  # query rows a dQ program (64 a consumer)
# head dim -> (query rows a dK/dV tile, ring stages): d128 with 64-row tiles spills 140 B (causal
# 508) in the consumers by ptxas; with 32 rows and 4 stages 0 (4).
DKDV_TILES = {64: (64, 3), 128: (32, 4)}
DQ_TILES = {64: (128, 3), 128: (64, 3)}  # head dim -> (keys a dQ block, ring stages)


def gluon_bwd_eligible(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, window_right: int,
                       *tensors: torch.Tensor) -> bool:
    """Whether the Gluon backward runs this call; ``tensors`` are the 4-D q, k, v."""
    return os.environ.get("FLASHLAB_BWD_GLUON", "0") == "1" and gluon_call_ok(
        flags, head_dim, seqlen_q, seqlen_k, window_right, *tensors)


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
    (q2, q_rows_b, q_rows_h, q_col_h), (k2, k_rows_b, k_rows_h, k_col_h), (v2, *_) = (
        rows_view(t) for t in (q4, k4, v4))
    do_view = rows_view(do4)
    if do_view is None or do_view[1:] != (q_rows_b, q_rows_h, q_col_h):
        do4 = torch.empty_like(q4).copy_(do4)  # q4's memory order: its row offsets address dO too
        do_view = rows_view(do4)
    if dk4.stride() != dv4.stride():
        raise ValueError(f"dk and dv need the same strides, got {dk4.stride()} and {dv4.stride()}")
    rows = (q_rows_b, q_rows_h, q_col_h, k_rows_b, k_rows_h, k_col_h, seqlen_q, seqlen_k,
            causal_diag(causal, bottom_right, seqlen_q, seqlen_k), heads // kv_heads,
            softmax_scale * 1.4426950408889634, softmax_scale)

    block_m, stages = dkdv_tiles or DKDV_TILES[head_dim]
    attn_bwd_dkdv_gluon_kernel[(configs.cdiv(seqlen_k, DKDV_BLOCK_N), kv_heads, batch)](
        tile_descriptor(q2, block_m, head_dim), tile_descriptor(do_view[0], block_m, head_dim),
        tile_descriptor(k2, DKDV_BLOCK_N // 2, head_dim), tile_descriptor(v2, DKDV_BLOCK_N // 2, head_dim),
        lse, delta, dk4, dv4, *lse_strides, dk4.stride(0), dk4.stride(1), dk4.stride(2), *rows,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=DKDV_BLOCK_N, STAGES=stages, CAUSAL=bool(causal),
        EVEN=seqlen_q % block_m == 0 and seqlen_k % DKDV_BLOCK_N == 0,
        num_warps=4, maxnreg=MAXNREG)
    block_n, stages = dq_tiles or DQ_TILES[head_dim]
    attn_bwd_dq_gluon_kernel[(configs.cdiv(seqlen_q, DQ_BLOCK_M), heads, batch)](
        tile_descriptor(q2, DQ_BLOCK_M // 2, head_dim), tile_descriptor(do_view[0], DQ_BLOCK_M // 2, head_dim),
        tile_descriptor(k2, block_n, head_dim), tile_descriptor(v2, block_n, head_dim),
        lse, delta, dq4, *lse_strides, dq4.stride(0), dq4.stride(1), dq4.stride(2), *rows,
        HEAD_DIM=head_dim, BLOCK_M=DQ_BLOCK_M, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        EVEN=seqlen_k % block_n == 0,
        num_warps=4, maxnreg=MAXNREG)
