"""The Gluon backward (kernels/backward_gluon.py, the default on Hopper at head dim 128 in its scope;
off with FLASHLAB_BWD_GLUON=0): its launches' arguments (CPU, with stand-in kernels), and on a Hopper
GPU with Triton 3.6 gradients that pass the accuracy rule in both memory orders, GQA, causal and
ragged lengths (forward by either kernel), with sequences kept apart."""

from __future__ import annotations

import pytest
import torch
from attn_checks import FakeKernel, backward_launch_inputs, check_against_reference, gluon_spy, make_qkv, pretend_hopper

import flashlab
from flashlab import group_split, ops
from flashlab.gluon_backward import gluon_bwd_eligible, launch_bwd_gluon

F16, BF16 = torch.float16, torch.bfloat16
PLAIN = dict(IS_VARLEN=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False, HAS_LOWER=False,
             HAS_UPPER=False, MASK_KIND=0, BOTTOM_RIGHT=True)


def test_on_by_default_at_head_dim_128_only(monkeypatch):
    import flashlab.gluon_forward as host

    pretend_hopper(monkeypatch)
    monkeypatch.setattr(host, "MIN_WORK", 0)
    q = torch.randn(1, 4096, 2, 128, dtype=F16)
    monkeypatch.delenv("FLASHLAB_BWD_GLUON", raising=False)
    assert gluon_bwd_eligible(PLAIN, 128, 4096, 4096, -1, q, q, q)
    q64 = q[..., :64].contiguous()
    assert not gluon_bwd_eligible(PLAIN, 64, 4096, 4096, -1, q64, q64, q64)  # a tie with the `tl` kernels
    monkeypatch.setenv("FLASHLAB_BWD_GLUON", "0")
    assert not gluon_bwd_eligible(PLAIN, 128, 4096, 4096, -1, q, q, q)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_launch_arguments(monkeypatch, layout):
    import flashlab.kernels.backward_gluon as kernels

    fake_kv, fake_q = FakeKernel(), FakeKernel()
    monkeypatch.setattr(kernels, "attn_bwd_dkdv_gluon_kernel", fake_kv)
    monkeypatch.setattr(kernels, "attn_bwd_dq_gluon_kernel", fake_q)
    monkeypatch.setattr(group_split, "heads_per_split", lambda *args: args[2])  # no split (test_group_split)
    b, s, h, hk, d = 2, 300, 6, 2, 128
    q, k, v, do, dq, dk, dv, lse, delta = backward_launch_inputs(layout, b, s, h, hk, d, BF16)
    launch_bwd_gluon(q, k, v, do, dq, dk, dv, lse, delta, (h * s, s), 0.1, True)
    (grid_kv, args_kv, kw_kv), = fake_kv.launches
    (grid_q, args_q, kw_q), = fake_q.launches
    assert grid_kv == (3, hk, b) and grid_q == (3, h, b)  # 300 keys / rows in blocks of 128
    assert args_kv[4:8] == (lse, delta, dk, dv) and args_q[4:7] == (lse, delta, dq)
    assert args_kv[10:13] == dk.stride()[:3] and args_q[9:12] == dq.stride()[:3]
    offsets = (1, 0, d, 1, 0, d) if layout == "bshd" else (h, 1, 0, hk, 1, 0)
    assert args_kv[13:19] == offsets and args_q[12:18] == offsets
    assert args_kv[19:23] == (s, s, 0, h // hk) and args_kv[23] == pytest.approx(0.1 * 1.4426950408889634)
    assert args_kv[24] == 0.1 and args_q[18:24] == args_kv[19:25]
    assert args_kv[0].block_shape == [1, 64, d] and args_kv[2].block_shape == [1, 64, d]  # d128: 64-row q tiles
    assert args_q[0].block_shape == [1, 64, d] and args_q[2].block_shape == [1, 128, d]
    assert kw_kv["CAUSAL"] is True and kw_kv["STAGES"] == 3 and kw_q["STAGES"] == 2
    assert kw_kv["num_warps"] == kw_q["num_warps"] == 4
    assert kw_kv["EVEN"] is False and kw_q["EVEN"] is False  # 300 rows and keys: ragged tiles
    assert kw_kv["SPLIT"] is False and args_kv[25:27] == (h // hk, 0)


def test_dout_in_another_order_is_copied_into_qs(monkeypatch):
    """The kernels address dO with q's row offsets: a dO in another memory order is copied first."""
    import flashlab.kernels.backward_gluon as kernels

    fake = FakeKernel()
    monkeypatch.setattr(kernels, "attn_bwd_dkdv_gluon_kernel", fake)
    monkeypatch.setattr(kernels, "attn_bwd_dq_gluon_kernel", FakeKernel())
    q = torch.randn(1, 256, 4, 64, dtype=F16)
    do = torch.randn(1, 4, 256, 64, dtype=F16).transpose(1, 2)  # (batch, heads, seqlen, dim) memory
    dq, dk, dv = (torch.empty(1, 256, 4, 64, dtype=F16) for _ in range(3))
    lse = torch.empty(1, 4, 256)
    launch_bwd_gluon(q, q, q, do, dq, dk, dv, lse, lse, (4 * 256, 256), 0.125, False)
    do_desc = fake.launches[0][1][1]
    assert do_desc.base.stride()[1:] == (4 * 64, 1) and torch.equal(do_desc.base.view(1, 256, 4, 64), do)
    with pytest.raises(ValueError, match="dk and dv need the same strides"):
        launch_bwd_gluon(q, q, q, q, dq, dk, dv.transpose(1, 2).contiguous().transpose(1, 2), lse, lse,
                         (4 * 256, 256), 0.125, False)


@pytest.fixture
def gluon_bwd_calls(monkeypatch):
    return gluon_spy(monkeypatch, "FLASHLAB_BWD_GLUON", ops, "launch_bwd_gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("batch, sq, sk, heads, kv_heads, head_dim, causal, dtype, gluon_fwd", [
    (2, 1024, 1024, 8, 8, 128, False, BF16, False),
    (2, 1024, 1024, 8, 8, 128, True, F16, True),
    (1, 1100, 1100, 6, 2, 128, True, BF16, True),    # GQA 6:2, ragged
    (3, 1030, 2049, 4, 1, 128, False, F16, False),   # MQA, more keys than queries
    (1, 4096, 4096, 8, 2, 64, False, F16, True),
    (1, 4100, 4100, 4, 1, 64, True, BF16, False),
    (1, 1030, 2100, 4, 2, 128, True, BF16, True),   # causal bottom-right with a key prefix (diag 1070)
])
def test_gradients_match_the_reference(gluon_bwd_calls, monkeypatch, batch, sq, sk, heads, kv_heads, head_dim,
                                       causal, dtype, gluon_fwd):
    import flashlab.gluon_backward as host

    monkeypatch.setattr(host, "HEAD_DIMS", (64, 128))  # d64 is not the default; its kernel still is checked
    monkeypatch.setenv("FLASHLAB_FWD_GLUON", "1" if gluon_fwd else "0")
    torch.manual_seed(7)
    q, k, v = make_qkv(batch, sq, sk, heads, kv_heads, head_dim, dtype, "cuda")
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)
    assert len(gluon_bwd_calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("sq, sk", [(1200, 1200), (2100, 1100)])  # top-left causal: keys past the queries too
def test_sdpa_layout(gluon_bwd_calls, sq, sk):
    torch.manual_seed(8)
    q, k, v = make_qkv(2, sq, sk, 8, 2, 128, BF16, "cuda", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    check_against_reference(out, q, k, v, layout="bhsd", causal=True, causal_align="top_left")
    assert len(gluon_bwd_calls) == 1


@pytest.mark.gpu
def test_deterministic(gluon_bwd_calls):
    """No atomics: two backwards of the same call are bit-identical."""
    torch.manual_seed(9)
    q, k, v = make_qkv(1, 2048, 2048, 8, 2, 128, BF16, "cuda")
    g = torch.randn(1, 2048, 8, 128, dtype=BF16, device="cuda")
    first = torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=True), (q, k, v), g)
    again = torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=True), (q, k, v), g)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(gluon_bwd_calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_sequences_stay_apart(gluon_bwd_calls, monkeypatch, layout):
    """NaN in every other (batch, head) — the neighbours a ragged tile runs into — leaves sequence
    (0, 0)'s output and gradients exact: tiles past a sequence's end read TMA's zeros."""
    from flashlab.reference import accuracy_check, naive_attention, reference_attention

    fwd_calls = gluon_spy(monkeypatch, "FLASHLAB_FWD_GLUON", ops, "launch_fwd_gluon")
    torch.manual_seed(10)
    q, k, v = make_qkv(2, 1100, 1100, 2, 2, 128, BF16, "cuda", layout=layout)
    clean = (slice(0, 1), slice(None), slice(0, 1)) if layout == "bshd" else (slice(0, 1), slice(0, 1))
    leaves = [t[clean].detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        for t in (q, k, v):
            keep = t[clean].clone()
            t.fill_(float("nan"))
            t[clean] = keep
    if layout == "bshd":
        out = flashlab.flash_attn_func(q, k, v)
    else:
        out = flashlab.scaled_dot_product_attention(q, k, v)
    g = torch.full_like(out, float("nan"))
    g[clean] = torch.randn_like(out[clean])
    got = torch.autograd.grad(out, (q, k, v), g)
    assert len(fwd_calls) == 1 and len(gluon_bwd_calls) == 1
    ref = reference_attention(*leaves, dtype=torch.float64, layout=layout)
    low = naive_attention(*leaves, layout=layout)
    assert accuracy_check(out[clean], ref, low).ok
    want = torch.autograd.grad(ref, leaves, g[clean].double())
    same = torch.autograd.grad(low, leaves, g[clean])
    for name, a, r, s in zip(("dq", "dk", "dv"), got, want, same):
        check = accuracy_check(a[clean], r, s, factor=3.0)
        assert check.ok, f"{name}: {check}"
