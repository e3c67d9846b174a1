"""The fused Gluon backward (kernels/backward_gluon_fused.py: dK, dV and dQ in one pass, dQ by fp32
atomics; on Hopper at head dim 128, causal, from FUSED_MIN_SEQLEN tokens, unless deterministic): when
it runs, its launch's arguments and the accumulator's cast into dq (CPU, with a stand-in kernel),
and on a Hopper GPU with Triton 3.6 gradients that pass the accuracy rule, `deterministic=True`
keeping the bit-identical two-kernel path, and sequences kept apart."""

from __future__ import annotations

import pytest
import torch
from attn_checks import backward_launch_inputs, check_against_reference, gluon_spy, make_qkv

import flashlab
import flashlab.gluon_backward as host
from flashlab import group_split, ops
from flashlab.gluon_backward import fused_eligible, launch_bwd_gluon_fused

F16, BF16 = torch.float16, torch.bfloat16


def test_where_it_runs(monkeypatch):
    monkeypatch.delenv("FLASHLAB_BWD_FUSED", raising=False)
    n = host.FUSED_MIN_SEQLEN
    assert fused_eligible(True, n, n, 128, False)
    assert fused_eligible(True, n, 2 * n, 128, False)
    assert not fused_eligible(False, n, n, 128, False)  # without the mask the two kernels tie or win
    assert not fused_eligible(True, n // 2, n, 128, False)
    assert not fused_eligible(True, n, n, 64, False)  # half the head dim must fill a 64-row product
    assert not fused_eligible(True, n, n, 128, True)  # deterministic: no float atomics
    assert not fused_eligible(True, n, n, 128, False, group=4)  # GQA: the two kernels win
    monkeypatch.setenv("FLASHLAB_BWD_FUSED", "0")
    assert not fused_eligible(True, n, n, 128, False)
    monkeypatch.delenv("FLASHLAB_BWD_FUSED")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not fused_eligible(True, n, n, 128, False)
    finally:
        torch.use_deterministic_algorithms(was)


class AccumulatorWriter:
    """A stand-in for the fused kernel: records its launch and writes a known pattern into the dQ
    accumulator (argument 8), value 1000·head + 10·dim + query at (batch 0, head, dim, query)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            acc = args[8]
            heads, dims, rows = acc.shape[1:]
            acc[:] = (1000 * torch.arange(heads)[:, None, None] + 10 * torch.arange(dims)[None, :, None]
                      + torch.arange(rows)[None, None, :]).float()
        return run


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_launch_arguments_and_the_cast_into_dq(monkeypatch, layout):
    import flashlab.kernels.backward_gluon_fused as kernels

    fake = AccumulatorWriter()
    monkeypatch.setattr(kernels, "attn_bwd_fused_gluon_kernel", fake)
    monkeypatch.setattr(group_split, "heads_per_split", lambda *args: args[2])  # no split (test_group_split)
    b, s, h, hk, d = 1, 300, 6, 2, 128
    q, k, v, do, dq, dk, dv, lse, delta = backward_launch_inputs(layout, b, s, h, hk, d, F16)
    launch_bwd_gluon_fused(q, k, v, do, dq, dk, dv, lse, delta, (h * s, s), 0.1, True)
    (grid, args, kw), = fake.launches
    block_m, stages, nbuf = host.FUSED_TILES
    rows = -(-s // block_m) * block_m  # every query tile's rows exist in the accumulator
    assert grid == (3, hk, b)  # 300 keys in blocks of 128
    assert args[4:8] == (lse, delta, dk, dv) and args[8].shape == (b, h, d, rows) and args[8].dtype == torch.float32
    assert args[11:14] == dk.stride()[:3] and args[14:17] == args[8].stride()[:3]
    assert args[23:27] == (s, s, 0, h // hk) and args[27] == pytest.approx(0.1 * 1.4426950408889634)
    assert args[28] == 0.1
    assert args[0].block_shape == [1, block_m, d] and args[2].block_shape == [1, 64, d]
    assert kw["STAGES"] == stages and kw["NBUF"] == nbuf and kw["CAUSAL"] is True and kw["EVEN"] is False
    assert kw["SPLIT"] is False and args[29:31] == (h // hk, 0)
    want = (1000 * torch.arange(h)[None, :, None] + 10 * torch.arange(d)[None, None, :]
            + torch.arange(s)[:, None, None]).to(F16)  # (seqlen, heads, dim): the accumulator transposed
    assert torch.equal(dq[0], want)


@pytest.fixture
def calls(monkeypatch):
    """(fused calls, two-kernel calls) of the Gluon backward; the fused kernel at any length."""
    two = gluon_spy(monkeypatch, "FLASHLAB_BWD_GLUON", ops, "launch_bwd_gluon")
    fused = gluon_spy(monkeypatch, "FLASHLAB_BWD_FUSED", ops, "launch_bwd_gluon_fused")
    monkeypatch.setattr(host, "FUSED_MIN_SEQLEN", 0)
    monkeypatch.setattr(host, "FUSED_MAX_GROUP", 64)  # GQA through the fused kernel too
    return fused, two


@pytest.mark.gpu
@pytest.mark.parametrize("batch, sq, sk, heads, kv_heads, dtype", [
    (2, 1024, 1024, 8, 8, F16),
    (1, 1100, 1100, 6, 2, BF16),    # GQA 6:2, a ragged last tile
    (1, 1030, 2100, 4, 2, BF16),    # bottom-right with a key prefix (diagonal 1070)
    (3, 1030, 1030, 4, 1, F16),     # MQA
])
def test_gradients_match_the_reference(calls, batch, sq, sk, heads, kv_heads, dtype):
    fused, two = calls
    torch.manual_seed(11)
    q, k, v = make_qkv(batch, sq, sk, heads, kv_heads, 128, dtype, "cuda")
    out = flashlab.flash_attn_func(q, k, v, causal=True)
    check_against_reference(out, q, k, v, causal=True)
    assert len(fused) == 1 and not two


@pytest.mark.gpu
def test_sdpa_layout_top_left(calls):
    fused, two = calls
    torch.manual_seed(12)
    q, k, v = make_qkv(2, 2100, 1100, 8, 2, 128, BF16, "cuda", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    check_against_reference(out, q, k, v, layout="bhsd", causal=True, causal_align="top_left")
    assert len(fused) == 1 and not two


@pytest.mark.gpu
def test_at_the_default_threshold(monkeypatch):
    """Without the tests' lowered threshold: a causal 8k call takes the fused kernel by default."""
    fused = gluon_spy(monkeypatch, "FLASHLAB_BWD_FUSED", ops, "launch_bwd_gluon_fused")
    torch.manual_seed(13)
    q, k, v = make_qkv(1, host.FUSED_MIN_SEQLEN, host.FUSED_MIN_SEQLEN, 2, 2, 128, BF16, "cuda")
    out = flashlab.flash_attn_func(q, k, v, causal=True)
    check_against_reference(out, q, k, v, causal=True)
    assert len(fused) == 1


@pytest.mark.gpu
def test_deterministic_keeps_the_two_kernels(calls):
    """deterministic=True (and torch.use_deterministic_algorithms) take the atomics-free kernels:
    bit-identical gradients; the default takes the fused one, equal to them up to rounding."""
    fused, two = calls
    torch.manual_seed(14)
    q, k, v = make_qkv(1, 2048, 2048, 8, 2, 128, BF16, "cuda")
    g = torch.randn(1, 2048, 8, 128, dtype=BF16, device="cuda")

    def grads(**kw):
        return torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=True, **kw), (q, k, v), g)
    first, again = grads(deterministic=True), grads(deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(two) == 2 and not fused
    torch.use_deterministic_algorithms(True)
    try:
        assert all(torch.equal(a, b) for a, b in zip(grads(), first)) and len(two) == 3 and not fused
    finally:
        torch.use_deterministic_algorithms(False)
    atomic = grads()
    assert len(fused) == 1
    for a, b in zip(atomic, first):  # only dQ's fp32 summation order differs (measured ≤ 4e-5 relative)
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-3


@pytest.mark.gpu
def test_sequences_stay_apart(calls):
    """NaN in the other sequences of the batch leaves sequence 0's output and gradients exact."""
    from flashlab.reference import accuracy_check, naive_attention, reference_attention

    fused, _ = calls
    torch.manual_seed(15)
    q, k, v = make_qkv(2, 1100, 1100, 2, 2, 128, BF16, "cuda")
    leaves = [t[:1].detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        for t in (q, k, v):
            t[1:] = float("nan")
    out = flashlab.flash_attn_func(q, k, v, causal=True)
    g = torch.full_like(out, float("nan"))
    g[:1] = torch.randn_like(out[:1])
    got = torch.autograd.grad(out, (q, k, v), g)
    assert len(fused) == 1
    ref = reference_attention(*leaves, dtype=torch.float64, causal=True)
    low = naive_attention(*leaves, causal=True)
    want = torch.autograd.grad(ref, leaves, g[:1].double())
    same = torch.autograd.grad(low, leaves, g[:1])
    for name, a, r, s in zip(("dq", "dk", "dv"), got, want, same):
        check = accuracy_check(a[:1], r, s, factor=3.0)
        assert check.ok, f"{name}: {check}"
