"""The atomic-dQ backward experiment (FLASHLAB_BWD_ATOMIC_DQ=1, kernels/backward.py): the dK/dV
kernel adds dS·K into an fp32 dQ; its gradients must meet the accuracy rule like the default path's,
on odd shapes, GQA, every score option and varlen batches (on the GPU if present, else in Triton's
interpreter)."""

from __future__ import annotations

import pytest
import torch
from attn_checks import case_id, check_against_reference, make_qkv

import flashlab
from flashlab.kernels import backward

CASES = [  # batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal
    (1, 1, 1, 1, 1, 64, True),
    (1, 113, 203, 6, 2, 80, True),
    (1, 203, 113, 2, 2, 40, True),  # rows that see no key: their dq is zero
    (2, 37, 53, 2, 2, 32, False),
    (1, 48, 31, 1, 1, 256, False),
]


@pytest.fixture
def atomic(monkeypatch):
    monkeypatch.setenv("FLASHLAB_BWD_ATOMIC_DQ", "1")
    # The separate dQ kernel must not run in this mode.
    monkeypatch.setattr(backward, "attn_bwd_dq_kernel", None)


@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_atomic_dq_matches_reference(case, atomic, device):
    batch, sq, sk, h, hk, d, causal = case
    torch.manual_seed(sum(case))
    q, k, v = make_qkv(batch, sq, sk, h, hk, d, torch.float16, device)
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal, causal_align="bottom_right")


def test_atomic_dq_with_every_score_option(atomic, device):
    torch.manual_seed(3)
    q, k, v = make_qkv(2, 66, 91, 4, 1, 24, torch.float16, device)
    kw = dict(causal=True, window_size=(20, 0), softcap=8.0, alibi_slopes=torch.rand(4, device=device) * 0.3)
    check_against_reference(flashlab.flash_attn_func(q, k, v, **kw), q, k, v, **kw)


def test_atomic_dq_varlen_equals_default(atomic, device, monkeypatch):
    torch.manual_seed(5)
    lengths = [5, 0, 1, 70, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lengths), h, 40, dtype=torch.float16, device=device, requires_grad=True)
               for h in (6, 2, 2))
    g = torch.randn_like(q)

    def grads():
        out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
        return torch.autograd.grad(out, (q, k, v), g)

    got = grads()
    monkeypatch.undo()  # the default path: environment and dQ kernel restored
    want = grads()
    for name, a, b in zip("qkv", got, want):
        # Only the order of dQ's fp32 additions differs: within a few fp16 ulps of the gradient's scale.
        tol = 4 * torch.finfo(torch.float16).eps * b.abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= tol, f"d{name}"
