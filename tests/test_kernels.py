"""The Triton kernels through the public API: on the GPU if present, else in Triton's interpreter.

Shapes are tiny and odd on purpose (the interpreter runs each program in numpy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attn_checks import case_id, check_against_reference, make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import flashlab
from flashlab.reference import reference_attention

CASES = [  # batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal
    (1, 1, 1, 1, 1, 64, False),
    (1, 1, 1, 1, 1, 64, True),
    (2, 37, 53, 2, 2, 32, False),
    (1, 113, 203, 6, 2, 80, False),
    (1, 113, 203, 6, 2, 80, True),
    (1, 203, 113, 2, 2, 40, True),  # first 90 queries see no key (bottom-right alignment)
    (1, 64, 64, 4, 1, 72, True),  # MQA
    (1, 33, 65, 2, 1, 96, False),
    (1, 17, 40, 1, 1, 192, True),
    (1, 20, 35, 2, 2, 1, False),
    (1, 48, 31, 1, 1, 256, False),
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_flash_attn_func_matches_reference(case, device):
    batch, sq, sk, h, hk, d, causal = case
    torch.manual_seed(sum(case))
    q, k, v = make_qkv(batch, sq, sk, h, hk, d, torch.float16, device)
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    check_against_reference(out, q, k, v, causal=causal, causal_align="bottom_right")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lse_and_its_gradient(causal, device):
    """return_attn_probs gives the natural-log LSE; a loss through the LSE backpropagates."""
    torch.manual_seed(0)
    q, k, v = make_qkv(2, 45, 29, 4, 2, 48, torch.float16, device)
    out, lse, probs = flashlab.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 4, 45)
    ref_out, ref_lse = reference_attention(q, k, v, dtype=torch.float64, causal=causal, return_lse=True)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    finite = ref_lse.isfinite()
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-3
    w = torch.randn_like(lse)
    grads = torch.autograd.grad((lse.nan_to_num(0, 0, 0) * w).sum() + out.float().sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_lse.nan_to_num(0, 0, 0) * w.double()).sum() + ref_out.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() / r.abs().max() < 1e-2


def test_rows_without_keys_are_zero_not_nan(device):
    q, k, v = make_qkv(1, 50, 10, 2, 2, 32, torch.float16, device)
    out, lse, _ = flashlab.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :40] == 0) and torch.all(lse[:, :, :40] == float("-inf"))
    assert out[:, 40:].abs().sum() > 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, :40] == 0)


def test_strided_views_of_packed_qkv(device):
    """Slices of a packed (batch, seqlen, 3, heads, dim) tensor reach the kernel without a copy."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 70, 3, 4, 24, dtype=torch.float16, device=device, requires_grad=True)
    q, k, v = qkv.unbind(dim=2)
    out = flashlab.flash_attn_func(q, k, v, causal=True)
    check_against_reference(out, q, k, v, causal=True)  # dq, dk, dv through the strided views too


def test_non_unit_head_dim_stride_is_copied(device):
    torch.manual_seed(2)
    base = torch.randn(1, 40, 2, 64, dtype=torch.float16, device=device)
    q = base[..., ::2].requires_grad_(False)  # head_dim 32 with stride 2
    k = torch.randn(1, 40, 2, 32, dtype=torch.float16, device=device)
    v = torch.randn(1, 40, 2, 32, dtype=torch.float16, device=device)
    out = flashlab.flash_attn_func(q, k, v)
    check_against_reference(out, q, k, v, grads=False)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_drop_in_matches_pytorch(causal, device):
    """The SDPA drop-in: (batch, heads, seqlen, dim), causal aligned top-left like PyTorch."""
    torch.manual_seed(3)
    q, k, v = make_qkv(2, 40, 57, 6, 2, 40, torch.float16, device, layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
    assert out.shape == q.shape
    check_against_reference(out, q, k, v, layout="bhsd", causal=causal, causal_align="top_left", softmax_scale=0.3)
    if device == "cuda" or not causal:  # PyTorch's CPU math backend is the reference for the full mask
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True,
                                              scale=0.3)
        assert (out.float() - want).abs().max() < 5e-3


def test_sdpa_accepts_unbatched_and_extra_batch_dims(device):
    q = torch.randn(2, 3, 4, 20, 32, dtype=torch.float16, device=device)
    out = flashlab.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    want = reference_attention(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1), layout="bhsd")
    assert (out.flatten(0, 1).float() - want).abs().max() < 5e-3
    out3 = flashlab.scaled_dot_product_attention(q[0, 0], q[0, 0], q[0, 0])
    assert out3.shape == q[0, 0].shape


@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(sq, sk, device):
    q, k, v = make_qkv(2, sq, sk, 2, 1, 16, torch.float16, device)
    out, lse, _ = flashlab.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (2, sq, 2, 16) and torch.all(out == 0)
    assert lse.shape == (2, 2, sq) and torch.all(lse == float("-inf"))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.all(g == 0) for g in grads)


def test_backward_is_deterministic(device):
    torch.manual_seed(4)
    q, k, v = make_qkv(1, 70, 90, 4, 1, 32, torch.float16, device)
    g = torch.randn(1, 70, 4, 32, dtype=torch.float16, device=device)
    first = torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), g)
    second = torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    seqlen_q=st.integers(1, 70),
    seqlen_k=st.integers(1, 70),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([8, 16, 24, 40, 64]),
    causal=st.booleans(),
)
def test_fuzz_shapes(seqlen_q, seqlen_k, kv_heads, group, head_dim, causal):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seqlen_q * 131 + seqlen_k)
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, kv_heads * group, kv_heads, head_dim, torch.float16, device)
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)
