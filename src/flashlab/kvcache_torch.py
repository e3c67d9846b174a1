"""The PyTorch path of ``flash_attn_with_kvcache`` (decoding.py): CPU tensors outside Triton's
interpreter append by index assignment and attend per sequence through ``blockwise_attention``,
the same semantics as the decode kernels."""

from __future__ import annotations

import torch


def append_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None) -> None:
    """k_cache/v_cache ← k/v (batch, seqlen_new, kv_heads, head_dim) at seqlens[b] + i, in place."""
    pos = seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)[None, :]
    if block_table is not None:
        page_size = k_cache.shape[1]
        pages = block_table.long().gather(1, pos // page_size)
        index = (pages, pos % page_size)
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(k.shape[0])
        index = (rows[:, None].expand_as(pos), pos)
    k_cache[index] = k
    v_cache[index] = v


def attend_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                 seqlen_new: int, cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None, scale: float,
                 causal: bool, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                 alibi_slopes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse fp32 (batch, heads, seqlen_q)) of q against each sequence's
    seqlens[b] + seqlen_new cached keys, gathered (through the block table when paged)."""
    from flashlab.blockwise import blockwise_attention

    outs, lses = [], []
    for b, n in enumerate((seqlens.long() + seqlen_new).tolist()):
        pos = torch.arange(n)
        if block_table is not None:
            where = (block_table[b].long()[pos // k_cache.shape[1]], pos % k_cache.shape[1])
        else:
            where = (int(cache_batch_idx[b]) if cache_batch_idx is not None else b, pos)
        if n == 0:
            outs.append(torch.zeros_like(q[b:b + 1]))
            lses.append(torch.full((1, q.shape[2], q.shape[1]), float("-inf")))
            continue
        slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = blockwise_attention(q[b:b + 1], k_cache[where][None], v_cache[where][None], softmax_scale=scale,
                                     causal=causal, causal_offset=n - q.shape[1], window_size=window,
                                     softcap=softcap, alibi_slopes=slopes)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).float()
