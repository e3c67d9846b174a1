"""GPU tier (`pytest -m gpu` on a CUDA machine): real sizes, bf16 and fp16, both APIs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attn_checks import case_id, check_against_reference, make_qkv

import flashlab

pytestmark = pytest.mark.gpu

CASES = [  # batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal
    (2, 2048, 2048, 8, 8, 64, False),
    (2, 2048, 2048, 8, 8, 64, True),
    (1, 4096, 4096, 4, 4, 128, True),
    (1, 8192, 8192, 2, 2, 128, False),
    (1, 2048, 2048, 4, 2, 256, True),
    (2, 1000, 3001, 6, 2, 80, True),
    (1, 3001, 1000, 6, 2, 96, True),
    (1, 777, 777, 8, 1, 192, False),
    (3, 113, 203, 6, 2, 40, True),
    (2, 1, 2049, 4, 1, 112, True),
    (1, 1537, 1537, 2, 2, 160, False),
]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_flash_attn_func_real_sizes(case, dtype):
    torch.manual_seed(sum(case))
    batch, sq, sk, h, hk, d, causal = case
    q, k, v = make_qkv(batch, sq, sk, h, hk, d, dtype, "cuda")
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 72])
def test_sdpa_drop_in_matches_pytorch_sdpa(head_dim, causal, dtype):
    torch.manual_seed(head_dim)
    q, k, v = make_qkv(2, 1531, 1531, 8, 4, head_dim, dtype, "cuda", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    check_against_reference(out, q, k, v, layout="bhsd", causal=causal, causal_align="top_left")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    # Both are within the accuracy rule of the fp32 reference; against each other, a few ulps.
    assert (out.float() - want.float()).abs().max() < 2e-2


DROPOUT_CASES = [  # batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal: the shipped tiles, ragged too
    (1, 1024, 1024, 8, 2, 128, True),
    (2, 777, 1001, 4, 4, 64, False),
    (1, 513, 1500, 6, 2, 256, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[case_id(*c) for c in DROPOUT_CASES])
def test_dropout_real_sizes_against_its_pattern(case, dtype):
    """Dropout with the GPU's own tiles (in the interpreter they are 32 × 32): output and gradients
    against the reference run with the returned keep pattern, and the pattern's keep rate."""
    torch.manual_seed(sum(case))
    batch, sq, sk, h, hk, d, causal = case
    q, k, v = make_qkv(batch, sq, sk, h, hk, d, dtype, "cuda")
    out, _, keep = flashlab.flash_attn_func(q, k, v, dropout_p=0.15, causal=causal, return_attn_probs=True)
    assert abs(keep.float().mean().item() - 0.85) < 5e-3
    check_against_reference(out, q, k, v, causal=causal, dropout_keep=keep, dropout_p=0.15)


def test_deterministic_backward_at_scale():
    torch.manual_seed(0)
    q, k, v = make_qkv(2, 4096, 4096, 8, 2, 128, torch.bfloat16, "cuda")
    g = torch.randn_like(q)
    runs = [torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=True), (q, k, v), g) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_forward_memory_is_linear_in_seqlen():
    """Forward extra memory is the output and the LSE: no seqlen² buffer."""
    q, k, v = (torch.randn(1, 32768, 4, 64, dtype=torch.float16, device="cuda") for _ in range(3))
    flashlab.flash_attn_func(q, k, v)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flashlab.flash_attn_func(q, k, v)
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= q.numel() * 2 + 4 * 32768 * 4 + (1 << 20), extra


@pytest.mark.parametrize("head_dim", [128, 80])
def test_packed_qkv_views_at_real_size(head_dim):
    """q, k, v as views of one fused projection (batch, seqlen, 3, heads, dim) — what a model's qkv
    linear gives — forward and gradients by the accuracy rule, eagerly (compiled: test_compile.py)."""
    torch.manual_seed(head_dim)
    qkv = torch.randn(2, 2048, 3, 16, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = flashlab.flash_attn_func(q, k, v, causal=True)
    check_against_reference(out, q, k, v, causal=True)


def test_dense_mask_past_2_31_elements():
    """A (1, heads, S, S) bool mask of more than 2^31 elements (its head offsets overflowed 32 bits
    before: an illegal address on the H200, lab suite attn-mask): the last head against the reference."""
    torch.manual_seed(7)
    heads, s, d = 9, 16384, 64  # 9 · 16384² = 2.4e9 mask elements
    q, k, v = (torch.randn(1, heads, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.empty(1, heads, s, s, device="cuda", dtype=torch.uint8).random_(0, 2).bool()
    out = flashlab.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    h = heads - 1
    rows = slice(s - 256, s)
    ref = F.scaled_dot_product_attention(q[:, h:, rows].float(), k[:, h:].float(), v[:, h:].float(),
                                         attn_mask=mask[:, h:, rows])
    assert (out[:, h:, rows].float() - ref).abs().max().item() < 2e-2
