"""FLOP counts by the FlashAttention convention (see ANCHORS.md).

Attention forward: ``4 · batch · heads · seqlen_q · seqlen_k · head_dim`` (two matmuls of
``2·M·N·K`` each); causal halves it; the backward is 2.5 × the forward and forward + backward
3.5 ×. GQA counts query heads. The softmax and the masking are not counted. Cases with a window,
document or prefix mask, or a varlen batch, count ``4 · heads · head_dim`` per visible (query,
key) pair instead (what a kernel that skips masked blocks must compute at least).

A full attention layer (``scope="layer"``) adds its projections: QKV maps ``embed`` to
``(heads + 2·kv_heads)·head_dim`` and the output projection maps ``embed`` back, each a matmul of
``2 · tokens · in · out`` FLOPs forward; a linear layer's backward (input and weight gradients)
costs 2 × its forward.
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")
_ATTN_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
_LINEAR_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}


def _check_mode(mode: str) -> None:
    if mode not in _ATTN_FACTOR:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def attention_flops(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, *, causal: bool, mode: str = "fwd"
) -> float:
    """FLOPs of the attention operation by the FlashAttention convention."""
    _check_mode(mode)
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        fwd /= 2.0
    return fwd * _ATTN_FACTOR[mode]


def projection_flops(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, *, mode: str = "fwd") -> float:
    """FLOPs of a multi-head attention layer's QKV and output projections (no bias)."""
    _check_mode(mode)
    embed = heads * head_dim
    qkv_out = (heads + 2 * kv_heads) * head_dim
    fwd = 2.0 * batch * seqlen * embed * qkv_out + 2.0 * batch * seqlen * embed * embed
    return fwd * _LINEAR_FACTOR[mode]


def case_flops(case, mode: str) -> float:  # noqa: ANN001 - a cases.Case (kept import-free)
    """FLOPs of one lab case in one mode: the attention, plus the projections for ``scope="layer"``."""
    from flashlab.lab.features import visible_pairs

    pairs = visible_pairs(case)
    if pairs is not None:
        # window / document / prefix masks and varlen batches: 4 · heads · head_dim per visible pair
        _check_mode(mode)
        total = 4.0 * case.heads * case.head_dim * pairs * _ATTN_FACTOR[mode]
    else:
        total = attention_flops(
            case.batch, case.heads, case.seqlen_q, case.seqlen_k, case.head_dim, causal=case.causal, mode=mode
        )
    if case.scope == "layer":
        total += projection_flops(case.batch, case.seqlen_q, case.heads, case.kv_heads, case.head_dim, mode=mode)
    return total


def kv_bytes(case, element_size: int) -> float | None:  # noqa: ANN001 - a cases.Case
    """Bytes of K and V one forward must read at least (each once), for a GB/s column that shows how
    close decoding gets to the memory bandwidth; None for the layer scope."""
    if case.scope != "op":
        return None
    from flashlab.lab.features import varlen_lengths

    keys = sum(varlen_lengths(case)) if case.varlen else case.batch * case.seqlen_k
    return 2.0 * keys * case.kv_heads * case.head_dim * element_size


def tflops_per_s(flops: float, time_ms: float | None) -> float | None:
    """Throughput in TFLOP/s from a FLOP count and a time in milliseconds."""
    if time_ms is None or not time_ms > 0:
        return None
    return flops / (time_ms * 1e-3) / 1e12
