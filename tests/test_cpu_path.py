"""Without a GPU and without the interpreter, the public API runs blockwise.py (the CPU path)."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference, make_qkv

import flashlab


@pytest.fixture
def cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_on_cpu_path(cpu_path, causal):
    torch.manual_seed(0)
    q, k, v = make_qkv(2, 113, 203, 6, 2, 80, torch.float16, "cpu")
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sdpa_on_cpu_path_matches_pytorch(cpu_path, dtype):
    torch.manual_seed(1)
    q, k, v = make_qkv(2, 70, 90, 4, 4, 32, dtype, "cpu", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (out.double() - want).abs().max() < tol
    out.sum().backward()
    assert q.grad is not None and q.grad.isfinite().all()


def test_cpu_path_rejects_what_it_cannot_run(cpu_path):
    q = torch.ones(1, 2, 8, 16, dtype=torch.int32)
    with pytest.raises(TypeError, match="accepted"):
        flashlab.scaled_dot_product_attention(q, q, q)


def test_varlen_on_cpu_path(cpu_path):
    torch.manual_seed(2)
    lengths = [3, 0, 17]
    cu = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 4, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    for a, b in [(0, 3), (3, 20)]:
        check_against_reference(out[a:b][None], q[a:b][None], k[a:b][None], v[a:b][None], grads=False,
                                causal=True)


def test_kernel_only_options_name_themselves_on_cpu_path(cpu_path):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float16, "cpu")
    with pytest.raises(NotImplementedError, match="softcap needs the Triton kernels"):
        flashlab.flash_attn_func(q, k, v, softcap=3.0)
