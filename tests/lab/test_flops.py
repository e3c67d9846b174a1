"""The FLOP convention of ANCHORS.md."""

from __future__ import annotations

import pytest

from flashlab.lab.cases import Case
from flashlab.lab.flops import attention_flops, case_flops, projection_flops, tflops_per_s


def test_forward_flops_is_four_bhssd() -> None:
    assert attention_flops(32, 32, 1024, 1024, 64, causal=False) == 4 * 32 * 32 * 1024 * 1024 * 64


def test_causal_halves_and_modes_scale() -> None:
    full = attention_flops(2, 3, 100, 70, 16, causal=False)
    assert attention_flops(2, 3, 100, 70, 16, causal=True) == full / 2
    assert attention_flops(2, 3, 100, 70, 16, causal=False, mode="bwd") == 2.5 * full
    assert attention_flops(2, 3, 100, 70, 16, causal=False, mode="fwd+bwd") == 3.5 * full


def test_seed_default_case_matches_anchor() -> None:
    # ANCHORS.md: naive took 4.96 ms at B32 S1024 H32 D64 = 55 TFLOP/s
    flops = case_flops(Case(32, 1024, 32, 64), "fwd")
    assert tflops_per_s(flops, 4.96) == pytest.approx(55.4, abs=0.1)


def test_gqa_counts_query_heads() -> None:
    assert case_flops(Case(1, 64, 8, 32, kv_heads=2), "fwd") == case_flops(Case(1, 64, 8, 32), "fwd")


def test_layer_adds_projections() -> None:
    b, s, h, d = 2, 128, 4, 32
    e = h * d
    assert projection_flops(b, s, h, h, d) == 8 * b * s * e * e
    assert projection_flops(b, s, h, h, d, mode="fwd+bwd") == 3 * 8 * b * s * e * e
    layer = Case(b, s, h, d, scope="layer")
    op = Case(b, s, h, d)
    assert case_flops(layer, "bwd") == case_flops(op, "bwd") + 2 * 8 * b * s * e * e


def test_tflops_edge_cases_and_bad_mode() -> None:
    assert tflops_per_s(1e12, 1000.0) == pytest.approx(1.0)
    assert tflops_per_s(1e12, None) is None
    assert tflops_per_s(1e12, 0.0) is None
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, causal=False, mode="backward")
