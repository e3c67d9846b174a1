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
    seqlen_q: int, seqlen_k: int, *, causal: bool, align: CausalAlign, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j; None if all are."""
    if not causal:
        return None
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + causal_offset(seqlen_q, seqlen_k, align)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: Layout = "bshd",
    causal_align: CausalAlign = "bottom_right",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention computed the textbook way, in the dtype of the inputs.

    Materializes the (batch, heads, seqlen_q, seqlen_k) scores and probabilities, so memory
    grows with seqlen². GQA/MQA: k and v may have fewer heads; query head h reads kv head
    ``h // (heads // kv_heads)``. Rows that see no key give zeros (and LSE = -inf).

    Returns ``out`` in the layout of the inputs, or ``(out, lse)`` with the natural-log
    log-sum-exp of the scaled scores, fp32, shape (batch, heads, seqlen_q).
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
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    mask = visible_mask(q.shape[2], k.shape[2], causal=causal, align=causal_align, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        # softmax over an all -inf row is NaN; such a row attends to nothing and gives zeros.
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
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
