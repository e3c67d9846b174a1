"""Accuracy of a provider against the one reference (``flashlab.reference``), ANCHORS.md's rule.

The check runs on the first batch element (the provider runs the whole batch; its output and
gradients are sliced), so large batches cost nothing extra; it is skipped when one batch
element's score matrix (heads × seqlen_q × seqlen_k) is larger than ``max_scores`` elements.
The high-precision reference is ``naive_attention`` on inputs upcast to fp32 (fp64 for fp32
inputs), the same-dtype reference ``naive_attention`` in the input dtype; the provider's max
error must be at most 2 × the same-dtype reference's (3 × for gradients) plus a small atol
(``flashlab.reference.accuracy_check``). Also reported: the relative error
``‖out − ref‖ / ‖ref‖``.
"""

from __future__ import annotations

from typing import Any

import torch

from flashlab.lab.providers import naive_attn
from flashlab.lab.workload import Workload
from flashlab.reference import accuracy_check


def too_large(workload: Workload, max_scores: int) -> bool:
    """Whether one batch element's score matrix exceeds ``max_scores`` elements."""
    c = workload.case
    return c.heads * c.seqlen_q * c.seqlen_k > max_scores


def _slice_leaves(workload: Workload, dtype: torch.dtype | None, grad: bool) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(workload.leaves):
        s = workload.first_item(t.detach()) if i < workload.n_batched else t.detach()
        s = s.to(dtype) if dtype is not None else s.clone()
        out.append(s.requires_grad_(grad and i < workload.n_batched))
    return out


def _reference(workload: Workload, dtype: torch.dtype | None, dout: torch.Tensor | None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference output (and gradients of the batched leaves if ``dout``) on batch element 0."""
    attn = naive_attn(workload.reference_case(), workload.reference_layout, workload.attn.causal_align)
    leaves = _slice_leaves(workload, dtype, grad=dout is not None)
    with torch.enable_grad() if dout is not None else torch.no_grad():
        out = workload.compute(leaves, attn)
        if dout is None:
            return out.detach(), []
        out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves[: workload.n_batched]]


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.double().norm().item()
    return err.double().norm().item() / denom if denom > 0 else float(err.double().norm().item())


def _compare(outs: list[torch.Tensor], highs: list[torch.Tensor], lows: list[torch.Tensor], factor: float
             ) -> dict[str, Any]:
    max_err, rel, ok = 0.0, 0.0, True
    for o, hi, lo in zip(outs, highs, lows):
        chk = accuracy_check(o, hi, lo, factor=factor)
        max_err = max(max_err, chk.max_error)
        rel = max(rel, _rel(o.double() - hi.double(), hi))
        ok = ok and chk.ok
    return {"max_abs_err": max_err, "rel_err": rel, "acc_ok": ok}


def high_dtype(case_dtype: str) -> torch.dtype:
    """The reference dtype: fp32 for half inputs, fp64 for fp32 inputs."""
    return torch.float64 if case_dtype == "fp32" else torch.float32


def check_output(workload: Workload) -> dict[str, Any]:
    """Compare the provider's forward output on batch element 0 with the references."""
    with torch.no_grad(), workload.attn.context():
        out = workload.first_item(workload.forward())
    hi, _ = _reference(workload, high_dtype(workload.case.dtype), None)
    lo, _ = _reference(workload, None, None)
    return {**_compare([out], [hi], [lo], 2.0), "acc_what": "out"}


def check_grads(workload: Workload) -> dict[str, Any]:
    """Compare the provider's gradients (of q, k, v, or of x for a layer) on batch element 0.

    The workload must have been built with ``requires_grad=True``; its grads are cleared after.
    """
    workload.clear_grads()
    with workload.attn.context():
        out = workload.forward()
        dout = workload.grad_output(out)
        out.backward(dout)
    grads = [workload.first_item(t.grad) for t in workload.leaves[: workload.n_batched]]
    workload.clear_grads()
    del out
    _, hi = _reference(workload, high_dtype(workload.case.dtype), workload.first_item(dout))
    _, lo = _reference(workload, None, workload.first_item(dout))
    return {**_compare(grads, hi, lo, 3.0), "acc_what": "grad"}
