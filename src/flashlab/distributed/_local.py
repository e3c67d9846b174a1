"""One rank's attention pieces: the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or,
otherwise, the blockwise PyTorch path. Both compute the same thing with the same contract.

A piece is ``q`` (batch, seqlen_q, heads, head_dim) against ``k``/``v`` (batch, seqlen_k, kv_heads,
head_dim), any strides with a unit-stride head dim, either with no mask or with the causal mask of
a square diagonal block (``seqlen_q == seqlen_k``: query i sees key j iff j <= i; top-left and
bottom-right alignment coincide there, and the kernels are called with flash_attn_func's
bottom-right flag so that one rank runs exactly flash_attn_func's kernels).

Varlen units (kernel path only): packed q (total_q, heads, head_dim) and k/v (total_k, ...) with
int32 offsets, one kernel launch for all of a step's sequences; lse (heads, total_q).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashlab.kernels.configs import interpreting

# Rows per tile on the blockwise path.
BLOCKWISE_BLOCK = 256


def uses_kernels(t: torch.Tensor) -> bool:
    """True when attention on ``t``'s device runs the Triton kernels (flashlab.ops)."""
    return t.is_cuda or interpreting()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def local_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (batch, seqlen_q, heads, head_dim) in q's dtype, lse fp32 (batch, heads,
    seqlen_q), natural log. Not differentiable (called inside the ring's autograd.Function)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    with torch.no_grad():
        if uses_kernels(q):
            from flashlab.ops import attention_forward

            return attention_forward(q, k, v, scale, causal, True)
        from flashlab.blockwise import blockwise_attention

        return blockwise_attention(
            q, k, v, softmax_scale=scale, causal=causal, causal_offset=0, block_size=BLOCKWISE_BLOCK
        )


def local_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one piece from an external ``out``/``lse`` (the merged, global ones), so
    that P = exp(S - lse) is the piece's slice of the global softmax; ``dlse`` is the gradient on
    the global LSE (or None). Shapes and dtypes as q, k, v."""
    dout, q, k, v, out = (_unit_last(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()  # the kernels index lse as a dense (batch, heads, seqlen_q) array
    dlse = dlse.contiguous() if dlse is not None else None
    if uses_kernels(q):
        from flashlab.ops import attention_backward

        return attention_backward(dout, q, k, v, out, lse, scale, causal, True, dlse=dlse)
    from flashlab.blockwise import blockwise_attention_backward

    return blockwise_attention_backward(
        dout, q, k, v, out, lse, softmax_scale=scale, causal=causal, causal_offset=0,
        block_size=BLOCKWISE_BLOCK, dlse=dlse,
    )


@dataclass(frozen=True)
class Packed:
    """Offsets of a step's per-sequence pieces packed back to back (the varlen kernels' layout)."""

    cu_q: torch.Tensor  # int32 (pieces + 1,)
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    def options(self):  # -> flashlab.ops.AttentionOptions
        from flashlab.ops import AttentionOptions

        return AttentionOptions(cu_seqlens_q=self.cu_q, cu_seqlens_k=self.cu_k, max_seqlen_q=self.max_q,
                                max_seqlen_k=self.max_k)


def varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, heads, head_dim), lse fp32 (heads, total_q)) of packed pieces, one launch."""
    from flashlab.ops import attention_forward

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    with torch.no_grad():
        return attention_forward(q, k, v, scale, causal, True, packed.options())


def varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, packed: Packed, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of packed pieces from the global out/lse (lse, dlse: (heads, total_q))."""
    from flashlab.ops import attention_backward

    dout, q, k, v, out = (_unit_last(t) for t in (dout, q, k, v, out))
    dlse = dlse.contiguous() if dlse is not None else None
    return attention_backward(dout, q, k, v, out, lse.contiguous(), scale, causal, True, dlse=dlse,
                              options=packed.options())
