"""Host side of the TMA forward experiment (kernels/forward_tma.py): when it may run, and its launch.

Opt-in with ``FLASHLAB_FWD_TMA=1`` until a GPU run shows it faster (docs/perf-notes.md, round 4).
It takes the plain dense case only — no varlen, softcap, ALiBi, mask, block mask or dropout — on a
Hopper-class GPU (or Triton's interpreter), with every tensor's base and row strides 16-byte
aligned, as tensor descriptors require.
"""

from __future__ import annotations

import os

import torch

from flashlab.kernels import configs
from flashlab.kernels import launch as launch_module
from flashlab.kernels.configs import TileConfig, cdiv, interpreting

_FEATURE_FLAGS = ("IS_VARLEN", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT")


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def tma_switched_on() -> bool:
    """Whether the opt-in TMA forward is asked for (``FLASHLAB_FWD_TMA=1``)."""
    return os.environ.get("FLASHLAB_FWD_TMA", "0") == "1"


def tma_eligible(flags: dict, head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether the TMA forward may run this call (module docstring); ``tensors`` are q, k, v, out."""
    if not tma_switched_on() or any(flags[f] for f in _FEATURE_FLAGS):
        return False
    if flags["MASK_KIND"] != 0 or head_dim * tensors[0].element_size() % 16 != 0:
        return False
    on_gpu = tensors[0].is_cuda and not interpreting()
    if on_gpu and configs.device_capability(tensors[0].device)[0] < 9:
        return False
    return all(_aligned(t) for t in tensors)


def _scratch(device: torch.device):
    def allocate(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        # The descriptors' global scratch (128 B a descriptor a program), from torch's caching allocator.
        return torch.empty(size, dtype=torch.int8, device=device)
    return allocate


def launch_fwd_tma(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, out4: torch.Tensor, lse: torch.Tensor,
                   lse_strides: tuple[int, int], seqlen_q: int, seqlen_k: int, heads: int, kv_heads: int,
                   head_dim: int, block_d: int, scalars: tuple, flags: dict, cfg: TileConfig) -> None:
    """Launch kernels/forward_tma.py on dense (batch, seqlen, heads, head_dim) views; ``scalars`` and
    ``flags`` as launch_args.prepare builds them."""
    import triton

    from flashlab.kernels.forward_tma import attn_fwd_tma_kernel

    window_left, window_right, softmax_scale = scalars[:3]
    # Triton keeps the allocator in a context variable: set it in the calling thread, every launch.
    triton.set_allocator(_scratch(q4.device))
    # Through the module attribute, so a stand-in for kernels/launch.launch (tests) sees this launch too.
    launch_module.launch(
        attn_fwd_tma_kernel, (cdiv(seqlen_q, cfg.block_m), heads, q4.shape[0]),
        q4, k4, v4, out4, lse, *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *out4.stride()[:3],
        *lse_strides, seqlen_q, seqlen_k, heads // kv_heads, window_left, window_right, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BOTTOM_RIGHT=flags["BOTTOM_RIGHT"], HAS_UPPER=flags["HAS_UPPER"], HAS_LOWER=flags["HAS_LOWER"],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
