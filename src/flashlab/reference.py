"""The naive attention that materializes the score matrix, and the high-precision reference.

One implementation serves three roles:

* the "original PyTorch implementation" the lab compares against (``naive_attention`` in the
  input dtype: scores, softmax and the weighted sum as separate PyTorch ops);
* the same-dtype reference of the accuracy rule (the same call, low precision);
* the fp32/fp64 reference of the accuracy rule (``reference_attention``, upcast inputs).

Layout is flash-attn's (batch, seqlen, heads, head_dim) unless ``layout="bhsd"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["bshd", "bhsd"]
CausalAlign = Literal["bottom_right", "top_left"]


def causal_offset(seqlen_q: int, seqlen_k: int, align: CausalAlign) -> int:
    """Key j is visible from query i under the causal mask iff ``j <= i + offset``.

    flash-attn aligns the mask to the bottom-right corner (offset = seqlen_k - seqlen_q);
    PyTorch's SDPA aligns it to the top-left (offset = 0).
    """
    if align == "bottom_right":
        return seqlen_k - seqlen_q
    if align == "top_left":
        return 0
    raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {align!r}")


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    align: CausalAlign,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j; None if all are.

    flash-attn's band: ``i + off - left <= j <= i + off + right`` with ``off`` from ``align``,
    ``right = 0`` under causal, and -1 meaning unbounded."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    off = causal_offset(seqlen_q, seqlen_k, align)
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + off + right
    if left >= 0:
        keep &= j >= i + off - left
    return keep


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: Layout = "bshd",
    causal_align: CausalAlign = "bottom_right",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention computed the textbook way, in the dtype of the inputs.

    Materializes the (batch, heads, seqlen_q, seqlen_k) scores and probabilities, so memory
    grows with seqlen². GQA/MQA: k and v may have fewer heads; query head h reads kv head
    ``h // (heads // kv_heads)``. Rows that see no key give zeros (and LSE = -inf).

    Options, in flash-attn's order: scale; ``softcap · tanh(s / softcap)``; ALiBi
    (``-slope · |i + off - j|``, slopes (heads,) or (batch, heads)); causal/window band;
    ``attn_mask`` (bool keep, or float added; broadcast to (batch, heads, seqlen_q, seqlen_k));
    softmax; dropout with the given bool ``dropout_keep`` pattern, scaled by 1 / (1 - dropout_p).

    Returns ``out`` in the layout of the inputs, or ``(out, lse)`` with the natural-log
    log-sum-exp of the modified scores, fp32, shape (batch, heads, seqlen_q).
    """
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    elif layout != "bhsd":
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        group = heads // kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        off = causal_offset(seqlen_q, seqlen_k, causal_align)
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        slopes = alibi_slopes.reshape(-1, heads, 1, 1)  # (1 or batch, heads, 1, 1)
        scores = scores - (slopes * (i + off - j).abs()).to(scores.dtype)
    keep = visible_mask(seqlen_q, seqlen_k, causal=causal, align=causal_align, window_size=window_size,
                        device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # softmax over an all -inf row is NaN; such a row attends to nothing and gives zeros. Only a
    # mask can empty a row, so unmasked attention skips this pass (the lab times this baseline).
    empty = None if keep is None else ~keep.any(dim=-1, keepdim=True)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        float_empty = (scores == float("-inf")).all(dim=-1, keepdim=True)
        empty = float_empty if empty is None else empty | float_empty
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_keep is not None:
        probs = probs.masked_fill(~dropout_keep, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(probs, v)
    if layout == "bshd":
        out = out.transpose(1, 2)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores.float(), dim=-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``naive_attention`` on inputs upcast to ``dtype`` (fp32 or fp64): the accuracy reference.

    Gradients flow back to the original (low-precision) tensors through the upcast.
    """
    return naive_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)


@dataclass(frozen=True)
class AccuracyCheck:
    """The result of comparing a kernel's output with the references (ANCHORS.md rule)."""

    max_error: float
    same_dtype_error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{verdict}: max |out - ref| = {self.max_error:.3e}, same-dtype reference error = "
            f"{self.same_dtype_error:.3e}, allowed = {self.allowed:.3e}"
        )


def accuracy_check(
    out: torch.Tensor,
    ref_high: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
) -> AccuracyCheck:
    """FlashAttention's test rule: the kernel's max error against the fp32/fp64 reference must be
    at most ``factor`` × the same-dtype reference's own error (2 for outputs, 3 for gradients),
    plus a small ``atol`` for rounding of the reference itself. NaN never passes."""
    ref_high = ref_high.double()
    err = (out.double() - ref_high).abs().nan_to_num(nan=float("inf")).max().item() if out.numel() else 0.0
    base = (ref_same_dtype.double() - ref_high).abs().max().item() if out.numel() else 0.0
    return AccuracyCheck(max_error=err, same_dtype_error=base, allowed=factor * base + atol)
