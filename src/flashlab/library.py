"""How flashlab registers its kernel launchers as ``torch.library`` ops.

The attention ops (``flashlab::attn_fwd``, ``flashlab::attn_bwd``) are opaque ``custom_op``s with
an explicit shape function: ``torch.compile`` keeps them as calls of the launcher, which reads the
strides of the tensors it is actually given. (As ``triton_op``s, traced through to the Triton
launches, Inductor 2.11 on an H200 computed wrong gradients or faulted when q, k, v were views of
one packed buffer, as in a fused qkv projection; see docs/perf-notes.md, 2026-11-29.)

The KV-cache ops are ``triton_op``s on a GPU (verified under torch.compile and CUDA graphs there):
Inductor sees and schedules their kernels, and the fake implementation is the launcher itself on
fake tensors. Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, the CPU test tier) kernels
are plain Python callables that cannot run on fake tensors, so every launcher is a ``custom_op``
with its shape function ``fake``: ``torch.compile``, ``torch.export`` and ``torch.library.opcheck``
then work on CPU too, with the same op names and schemas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.library import triton_op

from flashlab.kernels.configs import interpreting


def kernel_op(name: str, mutates_args: Iterable[str], fake: Callable,
              opaque: bool = False) -> Callable[[Callable], object]:
    """Decorator: register ``fn`` as the op ``name`` (``"flashlab::..."``).

    ``fake`` takes the op's arguments and returns empty tensors of the outputs' shapes, dtypes,
    devices and strides: used for ``opaque`` ops and under the interpreter; otherwise, on a GPU,
    the op is a ``triton_op`` and derives it from the launcher.
    """

    def register(fn: Callable) -> object:
        if not opaque and not interpreting():
            return triton_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op

    return register


# Shape functions of the ops (opaque ops and the interpreter; see the module docstring). Trailing arguments are
# taken as ``*rest`` so that new optional arguments of the ops need no change here.

def attn_fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                  *rest: object, **named: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashlab::attn_fwd``: out like q (contiguous), fp32 LSE (batch, heads, seqlen_q) or (heads, total_q)."""
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def attn_bwd_fake(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: object,
                  **named: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flashlab::attn_bwd``: dq, dk, dv contiguous, shaped like q, k, v."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def kvcache_append_fake(*args: object, **named: object) -> None:
    """``flashlab::kvcache_append`` only writes into the caches."""
    return None


def kvcache_attn_fake(q: torch.Tensor, k_cache: torch.Tensor, *rest: object,
                      **named: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashlab::kvcache_attn``: out (batch, seqlen_q, heads, head_dim), fp32 LSE (batch, heads, seqlen_q)."""
    batch, seqlen_q, heads, head_dim = q.shape
    return (q.new_empty((batch, seqlen_q, heads, head_dim)),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))
