"""flash-attn's packed-input functions: q, k, v (or k, v) stacked in one tensor, as a fused projection
produces them. Each is a view split of the packed tensor handed to :func:`flash_attn_func` /
:func:`flash_attn_varlen_func`, whose kernels read strided views in place (no copy going in). The
gradient of the packed tensor is assembled by autograd from the three (or two) gradients: one copy
that flash-attn avoids by writing them into a packed buffer directly.
"""

from __future__ import annotations

import torch

from flashlab.interface import flash_attn_func, flash_attn_varlen_func


def _split(packed: object, name: str, parts: int, rank: int, layout: str) -> tuple[torch.Tensor, ...]:
    """``packed`` unbound along its stacking dim (``rank - 3``), after checking it is one."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    axis = rank - 3
    if packed.dim() != rank or packed.shape[axis] != parts:
        raise ValueError(f"{name} must have shape {layout} (dim {axis} of size {parts}), got {tuple(packed.shape)}")
    return packed.unbind(axis)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` on ``qkv`` of shape (batch, seqlen, 3, heads, head_dim) (flash-attn's
    signature): q, k, v are ``qkv[:, :, 0]``, ``[:, :, 1]``, ``[:, :, 2]``. Returns what
    :func:`flash_attn_func` returns; the gradient flows to ``qkv``."""
    q, k, v = _split(qkv, "qkv", 3, 5, "(batch, seqlen, 3, heads, head_dim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` with ``kv`` of shape (batch, seqlen_k, 2, kv_heads, head_dim) (flash-attn's
    signature; GQA/MQA as there): k, v are ``kv[:, :, 0]`` and ``kv[:, :, 1]``."""
    k, v = _split(kv, "kv", 2, 5, "(batch, seqlen_k, 2, kv_heads, head_dim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_varlen_func` on ``qkv`` of shape (total, 3, heads, head_dim), one
    ``cu_seqlens`` / ``max_seqlen`` for queries and keys (flash-attn's signature)."""
    q, k, v = _split(qkv, "qkv", 3, 4, "(total, 3, heads, head_dim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_varlen_func` with ``kv`` of shape (total_k, 2, kv_heads, head_dim)
    (flash-attn's signature)."""
    k, v = _split(kv, "kv", 2, 4, "(total_k, 2, kv_heads, head_dim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
