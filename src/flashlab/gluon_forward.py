"""Host side of the Gluon forward (kernels/forward_gluon.py): when it may run, and its launch.

Opt-in with ``FLASHLAB_FWD_GLUON=1`` (docs/perf-notes.md round 8: 1.18–1.30× the standard forward at
head dim 128 from 1k tokens, 0.93–1.04× cuDNN from 4k, on the H200; never run yet from inside the
package on a GPU). It takes what the kernel was checked on and nothing else:

* a Hopper GPU (compute capability 9.0) and Triton 3.6 (Gluon's API changes between releases);
* fp16 / bf16, head dim 128 from 1024 tokens, or 64 from 4096 (shorter, it loses: round 8), for
  queries and keys alike, any length past that;
* no softcap, ALiBi, masks, block masks, dropout, varlen or window; causal where every query
  sees a key (PyTorch's top-left alignment, or flash-attn's bottom-right with seqlen_q <= seqlen_k);
* q, k, v in the (batch, seqlen, heads, dim) or the (batch, heads, seqlen, dim) memory order,
  dense, 16-byte aligned, k and v in the same one.

A tile that runs past a sequence reads the next (batch, head)'s rows (masked out of the scores,
multiplied by P = 0): a non-finite value in one sequence's k / v can then reach the output of the
sequence before it, where the standard kernel keeps sequences apart.

Every other call takes the standard kernel.
"""

from __future__ import annotations

import math
import os

import torch

from flashlab.kernels import configs
from flashlab.kernels.configs import interpreting

BLOCK_M = 128  # query rows a program (64 a consumer warpgroup)
# head dim -> (keys a block, K/V ring stages). 2 stages leave the producer no slot to run ahead:
# 17% slower at d128 (round 8). d256 (64 × 2 or 32 × 4: 3 stages of 64 overflow shared memory) is a
# candidate benchmarks/gluon_forward.py times; the scope does not take it until it is measured faster.
TILES = {64: (128, 3), 128: (128, 3)}
CANDIDATE_TILES = {256: [(64, 2), (32, 4)]}
MAXNREG = 168  # 12 warps (4 + 4 consumers, the producer's warp group) × 32 × 168 fills the 64K registers
# The shortest sequences measured faster than the standard forward (round 8: d64 at 1k was 0.90×).
MIN_SEQLEN = {128: 1024, 64: 4096}
_FEATURE_FLAGS = ("IS_VARLEN", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT", "HAS_LOWER")


def triton_has_gluon_36() -> bool:
    import triton

    return triton.__version__.startswith("3.6.")


def rows_view(t4: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """A (batch, seqlen, heads, dim) view as the 2-D tensor the kernel's descriptors read, with
    (rows a batch, rows a head, columns a head) — or None if its memory order is neither
    (batch, seqlen, heads, dim) nor (batch, heads, seqlen, dim), dense."""
    b, s, h, d = t4.shape
    st = t4.stride()
    if st == (s * h * d, h * d, d, 1) or (b == 1 and st[1:] == (h * d, d, 1)):
        return torch.as_strided(t4, (b * s, h * d), (h * d, 1)), s, 0, d
    if st == (h * s * d, d, s * d, 1) or (b == 1 and st[1:] == (d, s * d, 1)):
        return torch.as_strided(t4, (b * h * s, d), (d, 1)), h * s, s, 0
    return None


def gluon_shape_ok(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype,
                   window_right: int) -> bool:
    """The kernel's scope without looking at devices or memory (module docstring). ``flags`` and
    ``window_right`` (0 under causal) as launch_args.prepare builds them."""
    if any(flags[f] for f in _FEATURE_FLAGS) or flags["MASK_KIND"] != 0:
        return False
    if dtype not in (torch.float16, torch.bfloat16) or head_dim not in MIN_SEQLEN:
        return False
    if min(seqlen_q, seqlen_k) < MIN_SEQLEN[head_dim]:
        return False
    # An upper band edge is causal only with right == 0 (a window (-1, r > 0) sets it too); rows that
    # see no key (bottom-right, more queries than keys) stay with the standard kernel.
    return not flags["HAS_UPPER"] or (window_right == 0 and (not flags["BOTTOM_RIGHT"] or seqlen_q <= seqlen_k))


def causal_diag(causal: bool, bottom_right: bool, seqlen_q: int, seqlen_k: int) -> int:
    """The kernels' diagonal offset: query i sees keys j <= i + diag under causal."""
    return seqlen_k - seqlen_q if causal and bottom_right else 0


def gluon_eligible(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, window_right: int,
                   *tensors: torch.Tensor) -> bool:
    """Whether the Gluon forward runs this call; ``tensors`` are the 4-D q, k, v."""
    return os.environ.get("FLASHLAB_FWD_GLUON", "0") == "1" and gluon_call_ok(
        flags, head_dim, seqlen_q, seqlen_k, window_right, *tensors)


def gluon_call_ok(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, window_right: int,
                  *tensors: torch.Tensor) -> bool:
    """Whether a call is in the Gluon kernels' scope (the forward's and the backward's: module
    docstring), switches aside; ``tensors`` are the 4-D q, k, v."""
    q = tensors[0]
    if q.numel() == 0 or not q.is_cuda or interpreting() or configs.device_capability(q.device) != (9, 0):
        return False
    if not gluon_shape_ok(flags, head_dim, seqlen_q, seqlen_k, q.dtype, window_right) or not triton_has_gluon_36():
        return False
    views = [rows_view(t) for t in tensors[:3]]
    if any(view is None for view in views) or views[1][1:] != views[2][1:]:
        return False  # v is addressed with k's row / column offsets
    # TMA coordinates are 32-bit.
    return all(t.data_ptr() % 16 == 0 and math.prod(t.shape[:3]) < 2**31 for t in tensors[:3])


def tile_descriptor(view: torch.Tensor, rows: int, head_dim: int):
    """A TMA descriptor of [rows, head_dim] tiles over a 2-D ``rows_view`` (the shared-memory layout
    the kernels allocate from it)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gl_dtype = gl.float16 if view.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, head_dim], layout)


def launch_fwd_gluon(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, out4: torch.Tensor, lse: torch.Tensor,
                     lse_strides: tuple[int, int], softmax_scale: float, causal: bool, bottom_right: bool = True,
                     tiles: tuple[int, int] | None = None) -> None:
    """Launch kernels/forward_gluon.py (the call passed gluon_eligible); out4 (batch, seqlen, heads,
    dim) any strides with a unit last one, lse (batch, heads, seqlen_q) fp32 by ``lse_strides``;
    ``bottom_right`` the causal alignment; ``tiles`` (keys a block, stages) overrides TILES (the
    benchmarks' variants)."""
    from flashlab.kernels.forward_gluon import attn_fwd_gluon_kernel

    batch, seqlen_q, heads, head_dim = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    block_n, stages = tiles or TILES[head_dim]
    (q2, q_rows_b, q_rows_h, q_col_h), (k2, k_rows_b, k_rows_h, k_col_h), (v2, *_) = (
        rows_view(t) for t in (q4, k4, v4))
    attn_fwd_gluon_kernel[(configs.cdiv(seqlen_q, BLOCK_M), heads, batch)](
        tile_descriptor(q2, BLOCK_M // 2, head_dim), tile_descriptor(k2, block_n, head_dim),
        tile_descriptor(v2, block_n, head_dim), out4, lse, out4.stride(0), out4.stride(1), out4.stride(2), *lse_strides,
        q_rows_b, q_rows_h, q_col_h, k_rows_b, k_rows_h, k_col_h, seqlen_q, seqlen_k,
        causal_diag(causal, bottom_right, seqlen_q, seqlen_k), heads // kv_heads,
        softmax_scale * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        EVEN_K=seqlen_k % block_n == 0,
        num_warps=4, maxnreg=MAXNREG)
