"""The public API's options on the CPU path (blockwise.py): tensors on the CPU when Triton's
interpreter is off. Everything the kernels offer runs here, with the kernels' semantics: causal and
windows, softcap, ALiBi, ``attn_mask``, block masks (as their dense mask), variable-length batches
(a loop over the sequences) and dropout (the kernels' Philox pattern, bit for bit)."""

from __future__ import annotations

import torch

from flashlab.blockwise import blockwise_attention
from flashlab.ops import AttentionOptions
from flashlab.philox import counter_stride


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                  bottom_right: bool, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of checked dense (batch, seqlen, heads, dim) or packed (total, heads, dim) inputs,
    as ``interface.attention`` returns them."""
    if options.dropout_p > 0 and torch.compiler.is_compiling():
        # The seed is drawn on the host per call; a traced graph would replay one mask forever.
        raise NotImplementedError("dropout_p under torch.compile needs the Triton kernels (CUDA tensors); "
                                  "call the CPU path eagerly")
    attn_mask = options.attn_mask
    if options.block_mask is not None:
        # The CPU path walks plain tiles: a block mask becomes its dense (seqlen_q × seqlen_k) bools.
        attn_mask = options.block_mask.to_dense()
    heads = q.shape[-2]

    def one(qs, ks, vs, slopes=options.alibi_slopes, drop_rows=None, drop_stride=None):
        offset = ks.shape[1] - qs.shape[1] if bottom_right else 0
        return blockwise_attention(qs, ks, vs, softmax_scale=softmax_scale, causal=causal, causal_offset=offset,
                                   window_size=(options.window_left, options.window_right), softcap=options.softcap,
                                   alibi_slopes=slopes, attn_mask=attn_mask, dropout_p=options.dropout_p,
                                   dropout_seed=options.seed, dropout_rows=drop_rows, dropout_stride=drop_stride)

    if options.cu_seqlens_q is None:
        return one(q, k, v)
    cu_q, cu_k = options.cu_seqlens_q.tolist(), options.cu_seqlens_k.tolist()
    per_seq = options.alibi_slopes is not None and options.alibi_slopes.dim() == 2  # (batch, heads) slopes
    # Packed LSE rows: head h of the token at packed position t is row h · total + t (as in the kernels).
    head_rows = torch.arange(heads, dtype=torch.int64)[None, :] * q.shape[0]
    pieces = [one(q[None, a:b], k[None, c:d], v[None, c:d], options.alibi_slopes[i:i + 1] if per_seq else
                  options.alibi_slopes, head_rows + a, counter_stride(options.max_seqlen_k))
              for i, (a, b, c, d) in enumerate(zip(cu_q, cu_q[1:], cu_k, cu_k[1:]))]
    return torch.cat([o[0] for o, _ in pieces]), torch.cat([lse[0] for _, lse in pieces], dim=1)
