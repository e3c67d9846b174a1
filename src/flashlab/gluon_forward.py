"""Host side of the Gluon forward (kernels/forward_gluon.py): when it runs, and its launch.

The default forward on Hopper for the calls in its scope (``FLASHLAB_FWD_GLUON=0`` turns it off);
every other call, and every other GPU, takes the portable `tl` kernel (kernels/forward.py). Measured
on the H200 (docs/performance.md, first section): 1.24–1.37× the `tl` forward at head dim 128 from
2k tokens, 0.94–1.15× cuDNN. Its scope is what the kernel was checked and measured faster on:

* a Hopper GPU (compute capability 9.0) and Triton 3.6 (Gluon's API changes between releases);
* fp16 / bf16, head dim 128 or 256 from 1024 tokens, 64 from 4096 (shorter, the `tl` forward wins:
  round 8), for queries and keys alike, any length past that, and at least MIN_WORK FLOPs a call
  (less, and the Gluon launch's host time costs more than its faster kernel saves: round 9);
* no softcap, ALiBi, masks, block masks, dropout, varlen or window; causal where every query
  sees a key (PyTorch's top-left alignment, or flash-attn's bottom-right with seqlen_q <= seqlen_k);
* q, k, v in the (batch, seqlen, heads, dim) or the (batch, heads, seqlen, dim) memory order,
  dense, 16-byte aligned, k and v in the same one.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from flashlab.kernels import configs
from flashlab.kernels.configs import interpreting
from flashlab.kernels.launch import launch

BLOCK_M = 128  # query rows a program (64 a consumer warpgroup)
# head dim -> (keys a block, K/V ring stages). 2 stages leave the producer no slot to run ahead:
# 17% slower at d128 (round 8). d256: 3 stages of 64 keys overflow shared memory; 32 × 4 is 5–10%
# faster than 64 × 2 (round 9).
TILES = {64: (128, 3), 128: (128, 3), 256: (32, 4)}
MAXNREG = 168  # 12 warps (4 + 4 consumers, the producer's warp group) × 32 × 168 fills the 64K registers
# The shortest sequences measured faster than the `tl` forward (round 8: d64 at 1k was 0.90×).
MIN_SEQLEN = {128: 1024, 64: 4096, 256: 1024}
# The least work (FLOPs of Q·Kᵀ and P·V, halved under causal) a call needs: the Gluon path costs
# more host time than the `tl` kernels' replayed launch plans (round 9: ~150 µs more a forward call,
# ~650 µs more a training step), so below this the GPU waits on the host and `tl` finishes first.
MIN_WORK = 2**37  # e.g. batch 1 × 16 heads × 4096² tokens at head dim 128: ~230 µs of kernel
_FEATURE_FLAGS = ("IS_VARLEN", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT", "HAS_LOWER")


def triton_has_gluon_36() -> bool:
    import triton

    return triton.__version__.startswith("3.6.")


def tile_view(t4: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """A (batch, seqlen, heads, dim) tensor as the 3-D (sequences, seqlen, columns) view the kernels'
    descriptors read, with (sequences a batch, sequences a head, columns a head) — or None if its
    memory order is neither (batch, seqlen, heads, dim) nor (batch, heads, seqlen, dim), dense.
    A tile past a sequence's end then reads TMA's zeros, never the next sequence's rows."""
    b, s, h, d = t4.shape
    st = t4.stride()
    if st == (s * h * d, h * d, d, 1) or (b == 1 and st[1:] == (h * d, d, 1)):
        return torch.as_strided(t4, (b, s, h * d), (s * h * d, h * d, 1)), 1, 0, d
    if st == (h * s * d, d, s * d, 1) or (b == 1 and st[1:] == (d, s * d, 1)):
        return torch.as_strided(t4, (b * h, s, d), (s * d, d, 1)), h, 1, 0
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


def enough_work(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool) -> bool:
    """Whether a call has the work (MIN_WORK) for the Gluon launch's host time to pay."""
    return 4 * batch * heads * seqlen_q * seqlen_k * head_dim // (2 if causal else 1) >= MIN_WORK


def causal_diag(causal: bool, bottom_right: bool, seqlen_q: int, seqlen_k: int) -> int:
    """The kernels' diagonal offset: query i sees keys j <= i + diag under causal."""
    return seqlen_k - seqlen_q if causal and bottom_right else 0


def switched_on(name: str) -> bool:
    """Whether the Gluon switch ``name`` (FLASHLAB_FWD_GLUON, FLASHLAB_BWD_GLUON) is on: unless "0"."""
    return os.environ.get(name, "1") != "0"


def gluon_eligible(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, window_right: int,
                   *tensors: torch.Tensor) -> bool:
    """Whether the Gluon forward runs this call; ``tensors`` are the 4-D q, k, v."""
    return switched_on("FLASHLAB_FWD_GLUON") and gluon_call_ok(
        flags, head_dim, seqlen_q, seqlen_k, window_right, *tensors)


def gluon_call_ok(flags: dict, head_dim: int, seqlen_q: int, seqlen_k: int, window_right: int,
                  *tensors: torch.Tensor) -> bool:
    """Whether a call is in the Gluon forward's scope (module docstring), switches aside; ``tensors``
    are the 4-D q, k, v."""
    q = tensors[0]
    if q.numel() == 0 or not q.is_cuda or interpreting() or configs.device_capability(q.device) != (9, 0):
        return False
    if not enough_work(q.shape[0], q.shape[2], seqlen_q, seqlen_k, head_dim, flags["HAS_UPPER"]):
        return False
    if not gluon_shape_ok(flags, head_dim, seqlen_q, seqlen_k, q.dtype, window_right) or not triton_has_gluon_36():
        return False
    views = [tile_view(t) for t in tensors[:3]]
    if any(view is None for view in views) or views[1][1:] != views[2][1:]:
        return False  # v is addressed with k's row / column offsets
    # TMA coordinates are 32-bit.
    return all(t.data_ptr() % 16 == 0 and math.prod(t.shape[:3]) < 2**31 for t in tensors[:3])


@functools.cache
def _tile_layout(rows: int, head_dim: int, dtype: torch.dtype):
    from triton.experimental.gluon import language as gl

    gl_dtype = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return gl.NVMMASharedLayout.get_default_for([1, rows, head_dim], gl_dtype)


def tile_descriptor(view: torch.Tensor, rows: int, head_dim: int):
    """A TMA descriptor of [1, rows, head_dim] tiles over a 3-D ``tile_view`` (its swizzle is the
    one the kernels' 2-D [rows, head_dim] shared-memory tiles take: kernels/gluon_ring.py).

    Built without TensorDescriptor's own validation: gluon_call_ok has checked what it checks (16-byte
    aligned base, strides and rows; a unit last stride; a rank of 3) and it is a good part of a
    launch's host time (round 9)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    desc = TensorDescriptor.__new__(TensorDescriptor)
    desc.__dict__.update(base=view, shape=list(view.shape), strides=list(view.stride()),
                         block_shape=[1, rows, head_dim], layout=_tile_layout(rows, head_dim, view.dtype),
                         padding="zero")
    return desc


def launch_fwd_gluon(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, out4: torch.Tensor, lse: torch.Tensor,
                     lse_strides: tuple[int, int], softmax_scale: float, causal: bool, bottom_right: bool = True,
                     tiles: tuple[int, int] | None = None) -> None:
    """Launch kernels/forward_gluon.py (the call passed gluon_eligible) through kernels/launch.py's
    cache of compiled kernels; out4 (batch, seqlen, heads, dim) any strides with a unit last one,
    lse (batch, heads, seqlen_q) fp32 by ``lse_strides``; ``bottom_right`` the causal alignment;
    ``tiles`` (keys a block, stages) overrides TILES (the benchmarks' variants)."""
    from flashlab.kernels.forward_gluon import attn_fwd_gluon_kernel

    batch, seqlen_q, heads, head_dim = q4.shape
    seqlen_k, kv_heads = k4.shape[1], k4.shape[2]
    block_n, stages = tiles or TILES[head_dim]
    (q3, q_seq_b, q_seq_h, q_col_h), (k3, k_seq_b, k_seq_h, k_col_h), (v3, *_) = (
        tile_view(t) for t in (q4, k4, v4))
    launch(
        attn_fwd_gluon_kernel, (configs.cdiv(seqlen_q, BLOCK_M), heads, batch),
        tile_descriptor(q3, BLOCK_M // 2, head_dim), tile_descriptor(k3, block_n, head_dim),
        tile_descriptor(v3, block_n, head_dim), out4, lse, out4.stride(0), out4.stride(1), out4.stride(2), *lse_strides,
        q_seq_b, q_seq_h, q_col_h, k_seq_b, k_seq_h, k_col_h, seqlen_q, seqlen_k,
        causal_diag(causal, bottom_right, seqlen_q, seqlen_k), heads // kv_heads,
        softmax_scale * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        EVEN_K=seqlen_k % block_n == 0,
        num_warps=4, maxnreg=MAXNREG)
