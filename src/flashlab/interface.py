"""Public attention functions: argument checks, layouts, defaults and the choice of path.

Paths: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernels through
the ``flashlab::attn_fwd`` op; other CPU tensors run ``blockwise.py``, the same online-softmax
algorithm in PyTorch ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flashlab.kernels.configs import interpreting

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _not_yet(option: str, value: object) -> NotImplementedError:
    return NotImplementedError(f"flashlab does not support {option}={value!r} yet (planned: feature-parity issue)")


def _check_qkv(q: object, k: object, v: object, names: tuple[str, str, str], seq_dim: int, head_dim_axis: int,
               allowed_dtypes: Sequence[torch.dtype]) -> None:
    """Shared checks for (batch, seqlen, heads, dim) or (batch, heads, seqlen, dim) inputs."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(t.shape)}")
    qn, kn, vn = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in allowed_dtypes:
        accepted = ", ".join(str(d) for d in allowed_dtypes)
        raise TypeError(f"{qn} has dtype {q.dtype}; accepted: {accepted}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    head_axis = 3 - seq_dim  # the other of axes 1 and 2
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch size of {qn} ({q.shape[0]}) and {kn} ({k.shape[0]}) differ")
    head_dim = q.shape[head_dim_axis]
    if k.shape[head_dim_axis] != head_dim:
        raise ValueError(f"head_dim of {qn} ({head_dim}) and {kn} ({k.shape[head_dim_axis]}) differ; "
                         "flashlab needs one head_dim for q, k and v")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"number of heads in {qn} ({heads}) must be a multiple of the number of heads in "
                         f"{kn}/{vn} ({kv_heads})")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels are stride-generic except along head_dim, where loads must be contiguous.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class _NothingToAttend(torch.autograd.Function):
    """seqlen_q or seqlen_k is 0: the output is zeros (not NaN) and so are the gradients."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return q.new_zeros(q.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors)


def _attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                    bottom_right: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on (batch, seqlen, heads, dim) views that passed the checks: returns (out, lse)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    if seqlen_q == 0 or seqlen_k == 0:
        lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
        return _NothingToAttend.apply(q, k, v), lse
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if q.is_cuda or interpreting():
        from flashlab.ops import attention_forward

        return attention_forward(q, k, v, softmax_scale, causal, bottom_right)
    from flashlab.blockwise import blockwise_attention

    offset = seqlen_k - seqlen_q if bottom_right else 0
    return blockwise_attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_offset=offset)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Exact attention, flash-attn's ``flash_attn_func`` signature and semantics.

    Args:
        q: (batch, seqlen_q, heads, head_dim), fp16 or bf16.
        k, v: (batch, seqlen_k, kv_heads, head_dim); ``heads % kv_heads == 0`` (GQA/MQA: query
            head ``h`` attends with kv head ``h // (heads // kv_heads)``; k/v are never expanded).
        softmax_scale: scale of QKᵀ before the softmax; default ``1 / sqrt(head_dim)``.
        causal: causal mask aligned to the bottom-right corner: query ``i`` sees key ``j`` iff
            ``j <= i + seqlen_k - seqlen_q``. A query that sees no key returns zeros.
        deterministic: accepted for compatibility; flashlab's backward is always deterministic
            (no atomics), so gradients are bit-identical run to run.
        return_attn_probs: if True, return ``(out, softmax_lse, None)``; ``softmax_lse`` is fp32,
            natural log, (batch, heads, seqlen_q), -inf for rows that see no key.
        dropout_p, window_size, softcap, alibi_slopes: not yet supported beyond their defaults
            (``NotImplementedError``).

    Returns:
        out: (batch, seqlen_q, heads, head_dim), dtype of q. Differentiable w.r.t. q, k, v.

    Any seqlen ≥ 0 and head_dim 1..256 work; inputs may be strided views (e.g. slices of a packed
    qkv tensor) and are not copied unless the head dim is not unit-stride.
    """
    _check_qkv(q, k, v, ("q", "k", "v"), seq_dim=1, head_dim_axis=3, allowed_dtypes=KERNEL_DTYPES)
    if dropout_p != 0.0:
        raise _not_yet("dropout_p", dropout_p)
    if tuple(window_size) != (-1, -1):
        raise _not_yet("window_size", tuple(window_size))
    if softcap != 0.0:
        raise _not_yet("softcap", softcap)
    if alibi_slopes is not None:
        raise _not_yet("alibi_slopes", "<tensor>")
    scale = _resolve_scale(softmax_scale, q.shape[-1], "softmax_scale")
    out, lse = _attention_bshd(q, k, v, scale, bool(causal), bottom_right=True)
    if return_attn_probs:
        return out, lse, None
    return out


def _resolve_scale(scale: float | None, head_dim: int, name: str) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"{name} must be a finite float or None, got {scale!r}")
    return float(scale)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (batch, heads, seqlen_q, head_dim); also (heads, seqlen, head_dim) or any number of
            leading batch dims, as PyTorch accepts.
        key, value: (batch, kv_heads, seqlen_k, head_dim); ``kv_heads != heads`` needs
            ``enable_gqa=True`` (as in PyTorch).
        is_causal: causal mask aligned to the top-left corner, as PyTorch defines it: query ``i``
            sees key ``j`` iff ``j <= i``. Rows that see no key return zeros (PyTorch gives NaN).
        scale: default ``1 / sqrt(head_dim)``.
        attn_mask, dropout_p: not yet supported beyond None / 0.0 (``NotImplementedError``).

    dtypes: fp16 and bf16 everywhere. fp32/fp64 run only on the CPU path (no GPU kernel for them:
    ``TypeError`` on CUDA tensors — cast to bf16/fp16 or use PyTorch's SDPA).

    Returns (batch, heads, seqlen_q, head_dim) in the dtype of query, differentiable.
    """
    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dimensions (heads, seqlen, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key, value must have the same rank, got {query.dim()}, {key.dim()}, {value.dim()}")
    if attn_mask is not None:
        raise _not_yet("attn_mask", "<tensor>")
    if dropout_p != 0.0:
        raise _not_yet("dropout_p", dropout_p)
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(f"leading (batch) dims of query {tuple(lead)}, key {tuple(key.shape[:-3])} and value "
                         f"{tuple(value.shape[:-3])} differ")
    q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    on_cpu_path = q.device.type == "cpu" and not interpreting()
    dtypes = KERNEL_DTYPES + ((torch.float32, torch.float64) if on_cpu_path else ())
    _check_qkv(q, k, v, ("query", "key", "value"), seq_dim=2, head_dim_axis=3, allowed_dtypes=dtypes)
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"query has {q.shape[1]} heads and key/value {k.shape[1]}: pass enable_gqa=True "
                         "for grouped-query attention")
    softmax_scale = _resolve_scale(scale, q.shape[-1], "scale")
    out, _ = _attention_bshd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale,
                             bool(is_causal), bottom_right=False)
    out = out.transpose(1, 2)
    return out.reshape(*lead, *out.shape[1:])
