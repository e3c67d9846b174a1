"""``flashlab.Attention``: a compact self-attention layer for new models.

One fused QKV projection, grouped-query attention (k/v never expanded), causal or bidirectional,
optional rotary embeddings, and either padded-free dense batches (batch, seqlen, dim) or packed
variable-length batches (total_tokens, dim) with ``cu_seqlens``.
"""

from __future__ import annotations

import torch
from torch import nn

from flashlab.interface import flash_attn_func, flash_attn_varlen_func
from flashlab.rotary import RotaryEmbedding, apply_rotary


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Attention(nn.Module):
    """Self-attention: ``out = W_o · attention(rope(W_q x), rope(W_k x), W_v x)``.

    Args:
        dim: model width.
        num_heads: query heads H.
        num_kv_heads: key/value heads (default H); H must be a multiple (GQA: query head h reads
            kv head ``h // (H / num_kv_heads)``; 1 is multi-query attention).
        head_dim: default ``dim // num_heads``; 1..256.
        causal: causal mask (query i sees keys j <= i within its sequence).
        bias: biases on the projections.
        rotary_base: if set, rotary embeddings with this base (e.g. 10000.0) on q and k.
        dropout: dropout on the attention weights, training mode only.
        device, dtype: of the parameters (the kernels compute in fp16/bf16; use one of them or
            ``torch.autocast``).

    Parameters: ``qkv`` (Linear dim → (H + 2 · num_kv_heads) · head_dim; rows q, then k, then v)
    and ``out`` (Linear H · head_dim → dim).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 causal: bool = True, bias: bool = False, rotary_base: float | None = None, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads if num_kv_heads is not None else num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
        self.head_dim = _positive_int("head_dim", head_dim if head_dim is not None else dim // num_heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.causal, self.dropout = bool(causal), float(dropout)
        factory = {"device": device, "dtype": dtype}
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(dim, width, bias=bias, **factory)
        self.out = nn.Linear(self.num_heads * self.head_dim, dim, bias=bias, **factory)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_base, device=device) if rotary_base else None

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x`` (..., dim) to q (..., H, head_dim), k and v (..., num_kv_heads, head_dim), no rotary."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_width, kv_width, kv_width), dim=-1)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)), k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                v.unflatten(-1, (self.num_kv_heads, self.head_dim)))

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: (batch, seqlen, dim), or packed (total_tokens, dim) with ``cu_seqlens``.
            cu_seqlens: int32 (batch + 1,) offsets of the packed sequences (starting at 0).
            max_seqlen: int ≥ the longest packed sequence (required with ``cu_seqlens``).
            positions: rotary positions, (batch, seqlen) or (total_tokens,); default: 0, 1, …
                within each sequence.

        Returns a tensor shaped like ``x``.
        """
        rank = 2 if cu_seqlens is not None else 3
        if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[-1] != self.dim:
            want = "(total_tokens, dim)" if cu_seqlens is not None else "(batch, seqlen, dim)"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be {want} with dim={self.dim}, got {got}")
        if cu_seqlens is not None and max_seqlen is None:
            raise ValueError("max_seqlen is required with cu_seqlens (an int ≥ the longest sequence)")
        q, k, v = self.split_qkv(x)
        if self.rotary is not None:
            if positions is None:
                positions = self._default_positions(x, cu_seqlens)
            cos, sin = self.rotary(positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if cu_seqlens is None:
            o = flash_attn_func(q, k, v, dropout_p=p, causal=self.causal)
        else:
            o = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=p,
                                       causal=self.causal)
        return self.out(o.flatten(-2))

    @staticmethod
    def _default_positions(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        if cu_seqlens is None:
            return torch.arange(x.shape[1], device=x.device)
        token = torch.arange(x.shape[0], device=x.device)
        starts = cu_seqlens[:-1].long()
        seq = torch.searchsorted(cu_seqlens[1:].long(), token, right=True).clamp_max(starts.numel() - 1)
        return token - starts[seq]  # no host sync: computed from the offsets on the device
