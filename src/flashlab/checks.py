"""Argument checks for the public functions: every failure is a ValueError/TypeError that names
the argument, what it got and what is accepted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import mul

import torch

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
CPU_PATH_DTYPES = KERNEL_DTYPES + (torch.float32, torch.float64)


def accepted_dtypes(on_kernels: bool) -> tuple[torch.dtype, ...]:
    """The Triton kernels take fp16/bf16; the CPU path (PyTorch ops) also fp32 and fp64."""
    return KERNEL_DTYPES if on_kernels else CPU_PATH_DTYPES


MAX_OFFSET = 2**31 - 1  # the kernels address a batch element's rows with 32-bit offsets


def check_offsets(names: Sequence[str], tensors: Sequence[torch.Tensor], batch_axis: int | None) -> None:
    """Each tensor's elements within one batch element (all of it without a batch axis, as packed
    varlen tensors) must lie at offsets below 2^31 from its first: the kernels' row offsets are 32-bit."""
    for name, t in zip(names, tensors):
        if t.numel() == 0:
            continue
        shape, strides = t.shape, t.stride()
        span = sum(map(mul, shape, strides)) - sum(strides)  # Σ (n - 1) · stride; torch strides are ≥ 0
        if batch_axis is not None:
            span -= (shape[batch_axis] - 1) * strides[batch_axis]
        if span > MAX_OFFSET:
            where = "one batch element of " if batch_axis is not None else ""
            raise ValueError(f"{where}{name} spans {span + 1:,} elements (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}); the kernels index with 32-bit offsets, so at most 2^31 are "
                             "accepted: split the batch, or the sequence (varlen, ring attention)")


def check_qkv(q: object, k: object, v: object, names: tuple[str, str, str], rank: int, head_axis: int,
              allowed_dtypes: Sequence[torch.dtype], batch_axis: int | None = 0, kernels: bool = False) -> None:
    """Shared checks for q, k, v of ``rank`` dims with heads at ``head_axis`` and head_dim last;
    ``kernels``: they go to the Triton kernels (check_offsets)."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    qn, kn, vn = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in allowed_dtypes:
        accepted = ", ".join(str(d) for d in allowed_dtypes)
        raise TypeError(f"{qn} has dtype {q.dtype}; accepted: {accepted}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if batch_axis is not None and q.shape[batch_axis] != k.shape[batch_axis]:
        raise ValueError(f"batch size of {qn} ({q.shape[batch_axis]}) and {kn} ({k.shape[batch_axis]}) differ")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"head_dim of {qn} ({head_dim}) and {kn} ({k.shape[-1]}) differ; "
                         "flashlab needs one head_dim for q, k and v")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"number of heads in {qn} ({heads}) must be a multiple of the number of heads in "
                         f"{kn}/{vn} ({kv_heads})")
    if kernels:
        check_offsets(names, (q, k, v), batch_axis)


def resolve_scale(scale: object, head_dim: int, name: str) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"{name} must be a finite float or None, got {scale!r}")
    return float(scale)


def check_window(window_size: object) -> tuple[int, int]:
    """flash-attn's (left, right): -1 means unbounded on that side."""
    try:
        left, right = window_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right) of ints ≥ -1, got {window_size!r}") from None
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"window_size {side} must be an int ≥ -1 (-1 = unbounded), got {value!r}")
    return int(left), int(right)


def check_softcap(softcap: object) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0 <= softcap < math.inf):
        raise ValueError(f"softcap must be a finite float ≥ 0 (0 disables it), got {softcap!r}")
    return float(softcap)


def check_dropout(dropout_p: object, name: str = "dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0 <= dropout_p < 1):
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_alibi(slopes: object, batch: int, heads: int, device: torch.device) -> torch.Tensor | None:
    """ALiBi slopes: fp32, shape (heads,) or (batch, heads), on the device of q."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {slopes.dtype}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device}, q on {device}")
    return slopes


def check_cu_seqlens(cu: object, name: str, total: int, max_seqlen: object, max_name: str,
                     device: torch.device) -> tuple[torch.Tensor, list[int] | None]:
    """int32 (batch + 1,) prefix sums starting at 0, non-decreasing, ending at ``total``;
    ``max_seqlen`` at least the longest sequence. Returns (cu, lengths); under ``torch.compile``
    the values are not read (lengths None), only dtype, shape and device are checked."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 ≥ 2, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, q on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be an int ≥ the longest sequence, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return cu, None  # values stay on the device while tracing (no host sync, no graph break)
    values = cu.tolist()  # one small host sync: a wrong cu_seqlens would otherwise read out of bounds
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or min(lengths) < 0:
        shown = f"{values[:8]}{'…' if len(values) > 8 else ''}"
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {shown}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] ({values[-1]}) must equal the number of packed tokens ({total})")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(f"{max_name} must be an int ≥ the longest sequence ({max(lengths)}), got {max_seqlen!r}")
    return cu, lengths


def check_attn_mask(mask: object, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                    device: torch.device) -> torch.Tensor:
    """PyTorch's SDPA mask: bool (True = attend) or float (added to the scores), broadcastable to
    (batch, heads, seqlen_q, seqlen_k). Returns the broadcast 4-D view (no copy)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or a floating dtype, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device}, query on {device}")
    target = (batch, heads, seqlen_q, seqlen_k)
    try:
        if mask.dim() > 4 or torch.broadcast_shapes(mask.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, seqlen_q, "
                         f"seqlen_k) = {target}") from None
    return mask.expand(target)
