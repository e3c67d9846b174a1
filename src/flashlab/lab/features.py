"""What a case's attention features mean, in one place shared by providers, the workload, the
accuracy reference and the FLOP count.

Case fields (cases.py): ``mask`` (``""``, ``"window:W"``, ``"document:N"``, ``"prefix:P"``),
``softcap``, ``alibi``, ``varlen`` and ``dropout``. Semantics (self-attention, seqlen_q == seqlen_k):

* ``window:W`` — flash-attn's sliding window: key j visible from query i iff ``i - W <= j`` and
  ``j <= i`` (causal) or ``j <= i + W`` (not causal).
* ``document:N`` — the sequence is N documents (lengths drawn once from a fixed generator); a
  query sees keys of its own document (and, with causal, only earlier ones).
* ``prefix:P`` — prefix-LM: keys ``j < P`` are visible to all, the rest causally (``j <= i``).
* ``softcap`` — ``softcap · tanh(score / softcap)``; ``alibi`` — ALiBi with the standard
  geometric slopes ``2^(-8 (h + 1) / heads)``, bias ``-slope · |i - j|``.
* ``varlen = m`` — a packed batch of ``batch`` sequences whose lengths are drawn uniformly from
  ``m .. seqlen`` (fixed generator); causal applies inside each sequence.
* ``dropout = p`` — attention dropout at rate p (each peer's own random mask; applied in every
  mode, as flash-attn's ``dropout_p``). Outputs differ from the reference by design, so the lab's
  accuracy check skips these rows (the test suite checks flashlab's dropout exactly against its mask).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flashlab.lab.errors import LabError

MASK_KINDS = ("window", "document", "prefix")
_GEN_SEED = 1234


def parse_mask(spec: str) -> tuple[str, int]:
    """``"window:256"`` → ("window", 256); ``""`` → ("", 0). Bad specs raise LabError."""
    if not isinstance(spec, str):
        raise LabError(f"mask must be a string such as 'window:256', got {spec!r}")
    if spec == "":
        return "", 0
    kind, _, num = spec.partition(":")
    if kind not in MASK_KINDS or not num.isdigit() or int(num) < 1:
        raise LabError(f"mask must be '' or one of {', '.join(k + ':N' for k in MASK_KINDS)} with N ≥ 1, "
                       f"got {spec!r}")
    return kind, int(num)


def has_features(case) -> bool:  # noqa: ANN001 - a cases.Case
    return bool(case.mask or case.softcap or case.alibi or case.varlen or case.dropout)


def doc_lengths(seqlen: int, docs: int) -> list[int]:
    """Lengths of ``docs`` documents (each ≥ 1) splitting ``seqlen`` tokens, fixed per (seqlen, docs)."""
    docs = max(1, min(docs, seqlen))
    gen = torch.Generator().manual_seed(_GEN_SEED + seqlen + docs)
    cuts = sorted((torch.randperm(seqlen - 1, generator=gen)[: docs - 1] + 1).tolist())
    bounds = [0, *cuts, seqlen]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def varlen_lengths(case) -> list[int]:  # noqa: ANN001
    """Sequence lengths of a varlen case (uniform in varlen .. seqlen, fixed per case)."""
    lo = min(case.varlen, case.seqlen_q)
    gen = torch.Generator().manual_seed(_GEN_SEED + case.batch + case.seqlen_q + lo)
    return torch.randint(lo, case.seqlen_q + 1, (case.batch,), generator=gen).tolist()


def cu_seqlens(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def alibi_slopes(heads: int, device: torch.device) -> torch.Tensor:
    """The ALiBi paper's slopes for ``heads`` heads, fp32 (heads,)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32, device=device)


def window_size(case) -> tuple[int, int]:  # noqa: ANN001
    kind, w = parse_mask(case.mask)
    if kind != "window":
        return -1, -1
    return w, 0 if case.causal else w


def predicate(case, device: torch.device) -> Callable | None:  # noqa: ANN001
    """The case's mask as ``pred(b, h, q_idx, kv_idx) -> bool`` (index tensors broadcast), causal
    included; None for no mask at all. Used for flashlab's block masks, FlexAttention's mask_mod
    (same expression) and the dense masks of the other peers."""
    kind, n = parse_mask(case.mask)
    causal = case.causal
    if kind == "document":
        doc = torch.repeat_interleave(torch.arange(max(1, min(n, case.seqlen_q)), device=device),
                                      torch.tensor(doc_lengths(case.seqlen_q, n), device=device))
        if causal:
            return lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)
        return lambda b, h, q, kv: doc[q] == doc[kv]
    if kind == "prefix":
        return lambda b, h, q, kv: (kv < n) | (q >= kv)
    if kind == "window":
        right = 0 if causal else n
        return lambda b, h, q, kv: (kv >= q - n) & (kv <= q + right)
    if causal:
        return lambda b, h, q, kv: q >= kv
    return None


def dense_mask(case, seqlen: int, device: torch.device) -> torch.Tensor | None:  # noqa: ANN001
    """The bool (seqlen, seqlen) mask of the case (causal included), or None. seqlen² bytes."""
    pred = predicate(case, device)
    if pred is None:
        return None
    i = torch.arange(seqlen, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return pred(zero, zero, i[:, None], i[None, :])


def alibi_bias(heads: int, seqlen: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive (heads, seqlen, seqlen) ALiBi bias, for peers that only take a float mask."""
    i = torch.arange(seqlen, device=device)
    dist = (i[:, None] - i[None, :]).abs().float()
    return (-alibi_slopes(heads, device)[:, None, None] * dist).to(dtype)


def visible_pairs(case) -> float | None:  # noqa: ANN001
    """Visible (query, key) pairs per head summed over the batch, for masks whose cost is not the
    FlashAttention convention's (window, document, prefix, varlen); None otherwise."""
    kind, n = parse_mask(case.mask)
    if not kind and not case.varlen:
        return None
    lengths = varlen_lengths(case) if case.varlen else [case.seqlen_q] * case.batch

    def causal_pairs(s: int) -> float:
        return s * (s + 1) / 2 if case.causal else float(s * s)

    if kind == "document":
        per = sum(causal_pairs(d) for d in doc_lengths(case.seqlen_q, n))
        return per * case.batch
    if kind == "prefix":
        s, p = case.seqlen_q, min(n, case.seqlen_q)
        return (s * p + sum(max(0, i + 1 - p) for i in range(p, s))) * case.batch
    if kind == "window":
        s = case.seqlen_q
        i = torch.arange(s, dtype=torch.float64)
        right = 0 if case.causal else n
        per = ((i + right).clamp(max=s - 1) - (i - n).clamp(min=0) + 1).sum().item()
        return per * case.batch
    return sum(causal_pairs(s) for s in lengths)


def validate(case) -> None:  # noqa: ANN001
    """Raise LabError for feature combinations a case cannot have."""
    kind, _ = parse_mask(case.mask)
    if (kind or case.varlen or case.alibi) and case.seqlen_k != case.seqlen_q:
        raise LabError("mask, alibi and varlen cases are self-attention: seqlen_k must equal seqlen")
    if kind and case.varlen:
        raise LabError("a varlen case cannot also have a mask (document masks are the packed alternative)")
    if kind == "prefix" and case.causal:
        raise LabError("prefix:P is causal after the prefix already; leave causal false")
    if case.scope != "op" and has_features(case):
        raise LabError("features (mask, softcap, alibi, varlen, dropout) are measured at scope 'op' only")
    if isinstance(case.softcap, bool) or not isinstance(case.softcap, (int, float)) or case.softcap < 0:
        raise LabError(f"softcap must be a number ≥ 0, got {case.softcap!r}")
    if not isinstance(case.alibi, bool):
        raise LabError(f"alibi must be true or false, got {case.alibi!r}")
    if isinstance(case.varlen, bool) or not isinstance(case.varlen, int) or case.varlen < 0:
        raise LabError(f"varlen must be an int ≥ 0 (the shortest sequence; 0 = not varlen), got {case.varlen!r}")
    if isinstance(case.dropout, bool) or not isinstance(case.dropout, (int, float)) or not 0 <= case.dropout < 1:
        raise LabError(f"dropout must be a rate in [0, 1), got {case.dropout!r}")


def label_suffix(case) -> list[str]:  # noqa: ANN001
    kind, n = parse_mask(case.mask)
    parts = [f"{kind}{n}"] if kind else []
    if case.softcap:
        parts.append(f"softcap{case.softcap:g}")
    if case.alibi:
        parts.append("alibi")
    if case.varlen:
        parts.append(f"varlen{case.varlen}")
    if case.dropout:
        parts.append(f"dropout{case.dropout:g}")
    return parts
