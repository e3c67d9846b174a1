"""``flashlab.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on flashlab's kernels.

Same constructor arguments (those that make sense without materializing attention weights), same
parameter names — ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` (or ``q_proj_weight``,
``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ) — so state dicts load both
ways, and the same ``forward`` signature and mask semantics. Attention runs through
:func:`flashlab.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashlab.interface import scaled_dot_product_attention


def _merge_masks(first: torch.Tensor | None, second: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Both in SDPA convention (bool True = attend, float = added): one mask, bool if both are."""
    if first is None or second is None:
        return first if second is None else second
    if first.dtype == torch.bool and second.dtype == torch.bool:
        return first & second

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype != torch.bool:
            return m.to(dtype)
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return additive(first) + additive(second)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``torch.nn.MultiheadAttention``'s interface and parameters.

    Args:
        embed_dim: model width E; ``embed_dim % num_heads == 0`` and the head dim
            ``E / num_heads`` must be 1..256.
        num_heads: number of heads H.
        dropout: dropout on the attention weights, applied in training mode only.
        bias: biases on the input and output projections.
        add_bias_kv, add_zero_attn: not supported (``NotImplementedError`` if True).
        kdim, vdim: widths of key and value inputs (default ``embed_dim``).
        batch_first: inputs and output are (batch, seq, feature) instead of (seq, batch, feature).
        device, dtype: of the parameters. The kernels compute in fp16/bf16: keep the module in one
            of them or run it under ``torch.autocast`` (fp32 works on the CPU path only).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, None)``:

    * query (L, N, E) — (N, L, E) with ``batch_first`` — or unbatched (L, E); key (S, N, kdim),
      value (S, N, vdim) likewise. Output like query.
    * key_padding_mask: (N, S) (or (S,) unbatched); bool True = that key is padding (ignored), or
      float added to the scores.
    * attn_mask: (L, S) or (N · H, L, S); bool True = *not allowed* (PyTorch's MHA convention, the
      opposite of SDPA's), or float added to the scores.
    * is_causal: causal mask (query i sees keys j <= i). As in PyTorch it is a hint that a given
      ``attn_mask`` is causal; without one, the kernels apply the causal mask themselves.
    * need_weights: must be False — the attention weights are never materialized; flashlab
      raises ``NotImplementedError`` for True (note that PyTorch's default is True).

    A query row whose keys are all masked gives zeros (PyTorch gives NaN).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        for name, flag in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            if flag:
                raise NotImplementedError(f"{name}=True is not supported by flashlab.MultiheadAttention")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # PyTorch's initialization: Xavier-uniform projections, zero biases.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """A flashlab module with the configuration and (copied) parameters of ``module``."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        ref = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                  module.bias_k is not None, module.add_zero_attn, module.kdim, module.vdim, module.batch_first,
                  ref.device, ref.dtype)
        new.load_state_dict(module.state_dict())
        return new

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim and query is key and key is value:  # self-attention: one matmul
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), self._weights(), biases))

    def _masks(self, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, batch: int,
               seqlen_q: int, seqlen_k: int, is_causal: bool, dtype: torch.dtype, device: torch.device
               ) -> tuple[torch.Tensor | None, bool]:
        """PyTorch MHA masks → one SDPA mask (bool True = attend, or additive) and the causal flag."""
        pad = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, seqlen_k):
                raise ValueError(f"key_padding_mask must have shape (batch, seqlen_k) = {(batch, seqlen_k)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            pad = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask
            pad = pad.view(batch, 1, 1, seqlen_k)
        mask = None
        if attn_mask is not None:
            shapes = ((seqlen_q, seqlen_k), (batch * self.num_heads, seqlen_q, seqlen_k))
            if tuple(attn_mask.shape) not in shapes:
                raise ValueError(f"attn_mask must have shape (L, S) = {shapes[0]} or (N * num_heads, L, S) = "
                                 f"{shapes[1]}, got {tuple(attn_mask.shape)}")
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            mask = mask.view(-1, self.num_heads, seqlen_q, seqlen_k) if mask.dim() == 3 else mask
        if is_causal and mask is None and pad is not None:
            mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril()
        merged = _merge_masks(mask, pad, dtype)
        return merged, is_causal and merged is None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """See the class docstring. Returns ``(attn_output, None)``."""
        if need_weights:
            raise NotImplementedError("need_weights=True: flashlab never materializes the attention weights; "
                                      "pass need_weights=False (PyTorch's default is True)")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 2-D (unbatched) or 3-D tensor, got {shape}")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, seqlen_q, _ = query.shape
        seqlen_k = key.shape[1]
        q, k, v = self._project(query, key, value)
        mask, causal = self._masks(key_padding_mask, attn_mask, batch, seqlen_q, seqlen_k, bool(is_causal), q.dtype,
                                   q.device)
        heads = (batch, -1, self.num_heads, self.head_dim)
        out = scaled_dot_product_attention(q.view(heads).transpose(1, 2), k.view(heads).transpose(1, 2),
                                           v.view(heads).transpose(1, 2), attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=causal,
                                           scale=1.0 / math.sqrt(self.head_dim))
        out = self.out_proj(out.transpose(1, 2).reshape(batch, seqlen_q, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None
