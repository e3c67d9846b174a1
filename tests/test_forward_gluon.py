"""The Gluon forward (kernels/forward_gluon.py, the default on Hopper in its scope; off with
FLASHLAB_FWD_GLUON=0): which calls it takes (CPU-checkable), and on a Hopper GPU with Triton 3.6 the
same results as the reference by the accuracy rule, forward and backward (the backward reads its
LSE), in both memory orders, with sequences kept apart."""

from __future__ import annotations

import pytest
import torch
from attn_checks import FakeKernel, check_against_reference, gluon_spy, make_qkv, pretend_hopper

import flashlab
from flashlab import ops
from flashlab.gluon_forward import gluon_eligible, gluon_shape_ok, tile_view

PLAIN = dict(IS_VARLEN=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False, HAS_LOWER=False,
             HAS_UPPER=False, MASK_KIND=0, BOTTOM_RIGHT=True)
F16, BF16 = torch.float16, torch.bfloat16


@pytest.mark.parametrize("change, head_dim, sq, sk, dtype, right, ok", [
    ({}, 128, 1024, 1024, F16, -1, True),
    ({}, 128, 1100, 2049, BF16, -1, True),                    # ragged lengths
    ({"HAS_UPPER": True}, 128, 1500, 1500, F16, 0, True),     # causal, square
    ({"HAS_UPPER": True}, 128, 1024, 2048, F16, 0, True),     # causal bottom-right, more keys: diag 1024
    ({"HAS_UPPER": True}, 128, 2048, 1024, F16, 0, False),    # bottom-right, more queries: rows see no key
    ({"HAS_UPPER": True, "BOTTOM_RIGHT": False}, 128, 2048, 1024, F16, 0, True),  # top-left: diag 0
    ({"HAS_UPPER": True}, 128, 1024, 1024, F16, 64, False),   # window (-1, 64): not causal
    ({}, 64, 4096, 4096, F16, -1, True),
    ({}, 64, 2048, 2048, F16, -1, False),                     # head dim 64 under 4096 tokens: slower
    ({}, 96, 1024, 1024, F16, -1, False),
    ({}, 256, 1024, 1030, BF16, -1, True),
    ({"HAS_UPPER": True}, 256, 1000, 1000, F16, 0, False),  # head dim 256 under 1024 tokens
    ({}, 128, 1000, 4096, F16, -1, False),                    # queries under 1024: not measured faster
    ({}, 128, 1024, 1024, torch.float32, -1, False),
    ({"HAS_DROPOUT": True}, 128, 1024, 1024, F16, -1, False),
    ({"HAS_LOWER": True}, 128, 1024, 1024, F16, -1, False),
    ({"MASK_KIND": 3}, 128, 1024, 1024, F16, -1, False),
    ({"IS_VARLEN": True}, 128, 1024, 1024, F16, -1, False),
])
def test_scope(change, head_dim, sq, sk, dtype, right, ok):
    assert gluon_shape_ok({**PLAIN, **change}, head_dim, sq, sk, dtype, right) is ok


def test_tile_view_of_both_memory_orders_and_refusal_of_others():
    """(sequences, seqlen, columns): each sequence its own index, so TMA pads past its end."""
    bshd = torch.randn(2, 256, 4, 64)
    view, seq_b, seq_h, col_h = tile_view(bshd)
    assert view.shape == (2, 256, 256) and (seq_b, seq_h, col_h) == (1, 0, 64)
    assert torch.equal(view[1, 7, 3 * 64:4 * 64], bshd[1, 7, 3])
    bhsd = torch.randn(2, 4, 256, 64).transpose(1, 2)  # SDPA's layout, seen as (batch, seqlen, heads, dim)
    view, seq_b, seq_h, col_h = tile_view(bhsd)
    assert view.shape == (2 * 4, 256, 64) and (seq_b, seq_h, col_h) == (4, 1, 0)
    assert torch.equal(view[1 * 4 + 3, 7], bhsd[1, 7, 3])
    one = torch.randn(3, 256, 4, 64)[1:2]  # batch 1 of a larger tensor: its batch stride is free
    assert torch.equal(tile_view(one)[0][0, 9], one[0, 9].flatten())
    assert tile_view(torch.randn(2, 256, 4, 128)[..., :64]) is None  # rows not dense
    assert tile_view(torch.randn(256, 2, 4, 64).transpose(0, 1)) is None


def test_on_by_default_off_when_switched_off(monkeypatch):
    q = torch.empty(8, 2048, 16, 128, dtype=F16)  # 2^38 FLOPs: enough work
    assert not gluon_eligible(PLAIN, 128, 2048, 2048, -1, q, q, q)  # a CPU tensor
    pretend_hopper(monkeypatch)
    monkeypatch.delenv("FLASHLAB_FWD_GLUON", raising=False)
    assert gluon_eligible(PLAIN, 128, 2048, 2048, -1, q, q, q)
    monkeypatch.setenv("FLASHLAB_FWD_GLUON", "0")
    assert not gluon_eligible(PLAIN, 128, 2048, 2048, -1, q, q, q)


def test_calls_with_little_work_keep_the_tl_kernel(monkeypatch):
    """Under MIN_WORK FLOPs the Gluon launch's host time outweighs its faster kernel (round 9)."""
    from flashlab.gluon_forward import MIN_WORK, enough_work

    pretend_hopper(monkeypatch)
    q = torch.empty(1, 4096, 8, 128, dtype=F16)  # 2^36 FLOPs
    assert not gluon_eligible(PLAIN, 128, 4096, 4096, -1, q, q, q)
    assert enough_work(1, 16, 4096, 4096, 128, False) and not enough_work(1, 16, 4096, 4096, 128, True)
    assert enough_work(8, 16, 2048, 2048, 128, True)  # the FlashAttention grid's causal 2k point: 2^37
    assert MIN_WORK == 2**37


@pytest.fixture
def gluon_calls(monkeypatch):
    return gluon_spy(monkeypatch, "FLASHLAB_FWD_GLUON", ops, "launch_fwd_gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("batch, sq, sk, heads, kv_heads, head_dim, causal, dtype", [
    (2, 1024, 1024, 8, 8, 128, False, BF16),
    (2, 1024, 1024, 8, 8, 128, True, F16),
    (1, 1100, 1100, 6, 2, 128, True, BF16),    # GQA 6:2, ragged last query and key blocks
    (3, 1030, 2049, 4, 1, 128, False, F16),    # MQA, ragged, more keys than queries
    (2, 1500, 1027, 2, 2, 128, False, BF16),   # more queries than keys
    (1, 1030, 2100, 4, 2, 128, True, F16),     # causal bottom-right with a key prefix (diag 1070)
    (1, 4096, 4096, 8, 2, 64, False, F16),
    (1, 4100, 4100, 4, 1, 64, True, BF16),
    (2, 1024, 1024, 4, 2, 256, False, BF16),
    (1, 1100, 1100, 4, 4, 256, True, F16),
])
def test_matches_the_reference(gluon_calls, batch, sq, sk, heads, kv_heads, head_dim, causal, dtype):
    torch.manual_seed(3)
    q, k, v = make_qkv(batch, sq, sk, heads, kv_heads, head_dim, dtype, "cuda")
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    assert len(gluon_calls) == 1
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.gpu
def test_sdpa_causal_top_left_with_more_queries(gluon_calls):
    """PyTorch's causal alignment (diag 0) with seqlen_q > seqlen_k: rows past the keys see them all."""
    torch.manual_seed(6)
    q, k, v = make_qkv(1, 2100, 1100, 4, 4, 128, F16, "cuda", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(gluon_calls) == 1
    check_against_reference(out, q, k, v, layout="bhsd", causal=True, causal_align="top_left")


@pytest.mark.gpu
def test_sdpa_layout_and_scale(gluon_calls):
    torch.manual_seed(4)
    q, k, v = make_qkv(2, 1200, 1200, 8, 2, 128, BF16, "cuda", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.05, enable_gqa=True)
    assert len(gluon_calls) == 1
    check_against_reference(out, q, k, v, layout="bhsd", causal=True, causal_align="top_left", softmax_scale=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["short", "softcap", "window"])
def test_steps_aside(gluon_calls, what):
    """Calls out of its scope run the standard kernel, correctly."""
    torch.manual_seed(5)
    seqlen = 1000 if what == "short" else 1024
    q, k, v = make_qkv(1, seqlen, seqlen, 4, 4, 128, F16, "cuda")
    kw = {"softcap": 5.0} if what == "softcap" else {"window_size": (-1, 64)} if what == "window" else {}
    out = flashlab.flash_attn_func(q, k, v, **kw)
    assert gluon_calls == []
    check_against_reference(out, q, k, v, grads=False, **kw)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_launch_arguments(monkeypatch, layout):
    """The host glue without a GPU: grid, descriptors over the 3-D views, the sequence / column
    offsets of both memory orders, GQA, the log2-domain scale and the launch options."""
    import flashlab.kernels.forward_gluon as kernels
    from flashlab.gluon_forward import launch_fwd_gluon

    fake = FakeKernel()
    monkeypatch.setattr(kernels, "attn_fwd_gluon_kernel", fake)
    b, s, h, hk, d = 2, 200, 6, 2, 128  # 200 rows: two query blocks, the second ragged
    shapes = {"bshd": lambda n: (b, s, n, d), "bhsd": lambda n: (b, n, s, d)}
    q, k, v = (torch.randn(*shapes[layout](n), dtype=F16) for n in (h, hk, hk))
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, seqlen, heads, dim) views
    out = torch.empty(b, s, h, d, dtype=F16)
    lse = torch.empty(b, h, s)
    launch_fwd_gluon(q, k, v, out, lse, (h * s, s), 0.125, True)
    (grid, args, kwargs), = fake.launches
    assert grid == (2, h, b)
    q_desc, k_desc, v_desc = args[:3]
    assert q_desc.block_shape == [1, 64, d] and k_desc.block_shape == v_desc.block_shape == [1, 128, d]
    offsets = args[10:16]
    if layout == "bshd":
        assert q_desc.shape == [b, s, h * d] and k_desc.shape == [b, s, hk * d]
        assert offsets == (1, 0, d, 1, 0, d)
    else:
        assert q_desc.shape == [b * h, s, d] and k_desc.shape == [b * hk, s, d]
        assert offsets == (h, 1, 0, hk, 1, 0)
    assert args[16:20] == (s, s, 0, h // hk) and args[20] == pytest.approx(0.125 * 1.4426950408889634)
    assert kwargs["CAUSAL"] is True and kwargs["HEAD_DIM"] == d and kwargs["num_warps"] == 4
    assert kwargs["EVEN_K"] is False  # 200 keys: a ragged last block
    assert kwargs["maxnreg"] * 12 * 32 <= 65536


def test_k_and_v_must_share_a_memory_order(monkeypatch):
    """v is addressed with k's offsets: a call with k and v in different orders is not taken."""
    pretend_hopper(monkeypatch)
    monkeypatch.setattr("flashlab.gluon_forward.MIN_WORK", 0)
    q = torch.randn(1, 1024, 4, 128, dtype=F16)
    k = torch.randn(1, 1024, 2, 128, dtype=F16)
    v_other = torch.randn(1, 2, 1024, 128, dtype=F16).transpose(1, 2)
    assert gluon_eligible(PLAIN, 128, 1024, 1024, -1, q, k, k.clone())
    assert not gluon_eligible(PLAIN, 128, 1024, 1024, -1, q, k, v_other)


def test_causal_diagonal_offset_follows_the_alignment():
    from flashlab.gluon_forward import causal_diag

    assert causal_diag(True, True, 1000, 1300) == 300  # flash-attn: bottom-right
    assert causal_diag(True, False, 1000, 1300) == 0   # PyTorch: top-left
    assert causal_diag(False, True, 1000, 1300) == 0
