"""Dropout under ``torch.compile``: the Philox seed is drawn inside an opaque op.

In eager mode the public functions draw the dropout seed on the host from torch's default CPU
generator (``torch.randint(...).item()``) and pass it to ``flashlab::attn_fwd`` as an int. Inside a
traced region that ``.item()`` would be a graph break (a data-dependent host value), so while
compiling, attention with dropout goes through ``flashlab::attn_fwd_dropout``: an opaque custom op
that draws the seed itself at run time, from the same generator in the same way, and returns it as
a CPU int64 tensor that autograd saves for ``flashlab::attn_bwd_dropout`` (which regenerates the
mask). ``torch.manual_seed`` therefore reproduces a compiled run, and a compiled step draws the
same masks as the eager step it replaces.
"""

from __future__ import annotations

import torch

from flashlab.ops import AttentionOptions

_NONDETERMINISTIC = (torch.Tag.nondeterministic_seeded,)


def draw_seed() -> torch.Tensor:
    """One Philox seed from torch's default CPU generator, as an int64 tensor of shape (1,)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


@torch.library.custom_op("flashlab::attn_fwd_dropout", mutates_args=(), tags=_NONDETERMINISTIC)
def attn_fwd_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: torch.Tensor | None, attn_mask: torch.Tensor | None, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = draw_seed()
    out, lse = torch.ops.flashlab.attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale, causal, bottom_right, window_left, window_right, softcap,
                                           alibi_slopes, attn_mask, dropout_p, int(seed.item()))
    return out, lse, seed


@attn_fwd_dropout.register_fake
def _(q, k, v, cu_seqlens_q, *rest):
    from flashlab.library import attn_fwd_fake

    out, lse = attn_fwd_fake(q, k, v, cu_seqlens_q)
    return out, lse, torch.empty((1,), dtype=torch.int64, device="cpu")


@torch.library.custom_op("flashlab::attn_bwd_dropout", mutates_args=())
def attn_bwd_dropout(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: torch.Tensor | None, attn_mask: torch.Tensor | None, dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.flashlab.attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, softmax_scale, causal, bottom_right, window_left, window_right,
                                       softcap, alibi_slopes, attn_mask, dropout_p, int(seed.item()))


@attn_bwd_dropout.register_fake
def _(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, *scalars, alibi, mask, dropout_p = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, mask, seed)
    ctx.scalars = (*scalars, dropout_p)


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None, dseed: torch.Tensor | None):
    q, k, v, out, lse, cu_q, cu_k, alibi, mask, seed = ctx.saved_tensors
    *scalars, dropout_p = ctx.scalars
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv = attn_bwd_dropout(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *scalars, alibi, mask, dropout_p, seed)
    return (dq, dk, dv) + (None,) * 13


torch.library.register_autograd("flashlab::attn_fwd_dropout", _backward, setup_context=_setup_context)


def seeded_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                             bottom_right: bool, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.attention_forward`` with dropout whose seed is drawn at run time (for traced code)."""
    if getattr(options, "block_mask", None) is not None:
        raise NotImplementedError("dropout with a block_mask is not supported under torch.compile")
    window_left, window_right, softcap, alibi, mask, dropout_p = options.tail()[:6]
    out, lse, _ = attn_fwd_dropout(q, k, v, *options.args(), softmax_scale, causal, bottom_right, window_left,
                                   window_right, softcap, alibi, mask, dropout_p)
    return out, lse
