"""The launch arguments of the attention kernels, derived from an op's arguments (ops.py launches).

``prepare`` turns (q, k, v, options) into the dense 4-D views, sizes, strides, scalars and
constexpr flags the forward and backward kernels share; absent optional tensors are replaced by a
dummy pointer (q) that the kernels' constexpr flags never read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flashlab.kernels.configs import TileConfig
from flashlab.philox import counter_stride

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Launch:
    """Everything a kernel launch derives from the op's arguments, shared by forward and backward."""

    q4: torch.Tensor  # dense 4-D view (varlen: a leading batch dim of 1 with stride 0)
    k4: torch.Tensor
    v4: torch.Tensor
    batch: int
    seqlen_q: int  # varlen: the maximum
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    lse_strides: tuple[int, int]
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    slopes: torch.Tensor
    slope_strides: tuple[int, int]
    mask: torch.Tensor
    mask_strides: tuple[int, int, int, int]
    sparse_kv: torch.Tensor  # block-sparse tables (block_mask.py): per query block / per key block
    sparse_q: torch.Tensor
    sparse_kv_strides: tuple[int, int, int]
    sparse_q_strides: tuple[int, int, int]
    scalars: tuple  # runtime scalars after the shape arguments
    flags: dict


def as4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


def strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    return (0 if varlen else t.stride(0)), t.stride(1), t.stride(2)


def _table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    # A table of batch or heads 1 is the same for every batch element / head: stride 0.
    return tuple(0 if table.shape[i] == 1 else table.stride(i) for i in (0, 1)) + (table.stride(2),)


def clamp_tiles(cfg: TileConfig, run: Launch) -> TileConfig:
    """Kernel tiles must divide a block-sparse mask's blocks (both are powers of two)."""
    if run.flags["MASK_KIND"] != 3:
        return cfg
    return replace(cfg, block_m=min(cfg.block_m, run.flags["SPARSE_M"]),
                   block_n=min(cfg.block_n, run.flags["SPARSE_N"]))


def prepare(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, bottom_right, window_left, window_right,
             softcap, alibi_slopes, attn_mask, dropout_p, seed, block_tiles=None, block_kv=None,
             block_q=None) -> Launch:
    varlen = cu_q is not None
    q4, k4, v4 = as4d(q), as4d(k), as4d(v)
    heads, head_dim, kv_heads = q4.shape[2], q4.shape[3], k4.shape[2]
    if varlen:
        batch, seqlen_q, seqlen_k = cu_q.numel() - 1, max_q, max_k
        lse_strides = (0, q.shape[0])
    else:
        batch, seqlen_q, seqlen_k = q4.shape[0], q4.shape[1], k4.shape[1]
        lse_strides = (heads * seqlen_q, seqlen_q)
    dummy = q4
    slopes, slope_strides = dummy, (0, 0)
    if alibi_slopes is not None:
        slopes = alibi_slopes
        slope_strides = (alibi_slopes.stride(0), alibi_slopes.stride(1)) if alibi_slopes.dim() == 2 else (
            0, alibi_slopes.stride(0))
    mask, mask_strides, mask_kind = dummy, (0, 0, 0, 0), 0
    if attn_mask is not None:
        # A bool mask goes in as it is (Triton loads it as i1; verified on an H200). A .view(torch.uint8)
        # here broke Inductor's lowering in torch 2.11 while these ops were triton_ops.
        mask = attn_mask
        mask_kind = 1 if attn_mask.dtype == torch.bool else 2
        mask_strides = tuple(mask.stride())
    sparse_kv = sparse_q = dummy
    sparse_kv_strides = sparse_q_strides = (0, 0, 0)
    sparse_m = sparse_n = 1
    if block_tiles is not None:
        mask, mask_kind = block_tiles, 3
        sparse_m, sparse_n = block_tiles.shape[1], block_tiles.shape[2]
        mask_strides = (0, 0, sparse_n, 1)
        sparse_kv, sparse_q = block_kv, block_q
        sparse_kv_strides, sparse_q_strides = _table_strides(block_kv), _table_strides(block_q)
    upper = causal or window_right >= 0
    scalars = (
        window_left, 0 if causal else window_right, scale,
        scale / softcap if softcap > 0 else 0.0, softcap * LOG2E,
        seed, dropout_p, counter_stride(seqlen_k),
    )
    flags = dict(BOTTOM_RIGHT=bottom_right, HAS_UPPER=upper, HAS_LOWER=window_left >= 0, IS_VARLEN=varlen,
                 HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, MASK_KIND=mask_kind,
                 HAS_DROPOUT=dropout_p > 0, SPARSE_M=sparse_m, SPARSE_N=sparse_n)
    return Launch(q4, k4, v4, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, lse_strides,
                   cu_q if varlen else dummy, cu_k if varlen else dummy, slopes, slope_strides, mask, mask_strides,
                   sparse_kv, sparse_q, sparse_kv_strides, sparse_q_strides, scalars, flags)
