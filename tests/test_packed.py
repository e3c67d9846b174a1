"""flash-attn's packed-input functions: the same results and gradients as the unpacked calls on the
packed tensor's views (through the kernels: interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference

import flashlab


def _grads_equal(packed: torch.Tensor, parts: tuple[torch.Tensor, ...], axis: int) -> None:
    torch.testing.assert_close(packed.grad, torch.stack([p.grad for p in parts], axis), rtol=0, atol=0)


def test_qkvpacked_is_the_unpacked_call(device):
    torch.manual_seed(0)
    qkv = torch.randn(2, 37, 3, 4, 40, dtype=torch.float16, device=device, requires_grad=True)
    out = flashlab.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(9, -1))
    parts = tuple(t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    want = flashlab.flash_attn_func(*parts, causal=True, window_size=(9, -1))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    _grads_equal(qkv, parts, 2)


def test_kvpacked_gqa_odd_shape_against_the_reference(device):
    torch.manual_seed(1)
    q = torch.randn(1, 113, 6, 80, dtype=torch.float16, device=device, requires_grad=True)
    kv = torch.randn(1, 203, 2, 2, 80, dtype=torch.float16, device=device, requires_grad=True)
    out = flashlab.flash_attn_kvpacked_func(q, kv, causal=True)
    k, v = kv.unbind(2)
    check_against_reference(out, q, k, v, grads=False, causal=True)
    out.float().sum().backward()
    assert kv.grad.shape == kv.shape and kv.grad.isfinite().all()


def test_varlen_packed_are_the_unpacked_calls(device):
    torch.manual_seed(2)
    cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=device)
    qkv = torch.randn(22, 3, 2, 16, dtype=torch.float16, device=device, requires_grad=True)
    out = flashlab.flash_attn_varlen_qkvpacked_func(qkv, cu, 17, causal=True)
    parts = tuple(t.detach().clone().requires_grad_() for t in qkv.unbind(1))
    want = flashlab.flash_attn_varlen_func(*parts, cu, cu, 17, 17, causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()
    want.float().sum().backward()
    _grads_equal(qkv, parts, 1)

    q = parts[0].detach().clone().requires_grad_()
    kv = torch.randn(22, 2, 1, 16, dtype=torch.float16, device=device, requires_grad=True)
    out = flashlab.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 17, 17)
    want = flashlab.flash_attn_varlen_func(q, *kv.unbind(1), cu, cu, 17, 17)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda d: flashlab.flash_attn_qkvpacked_func(torch.zeros(1, 8, 2, 2, 16, dtype=torch.float16, device=d)),
     ValueError, r"qkv must have shape \(batch, seqlen, 3, heads, head_dim\)"),
    (lambda d: flashlab.flash_attn_kvpacked_func(torch.zeros(1, 8, 2, 16, dtype=torch.float16, device=d),
                                                 torch.zeros(1, 8, 2, 16, dtype=torch.float16, device=d)),
     ValueError, r"kv must have shape \(batch, seqlen_k, 2, kv_heads, head_dim\)"),
    (lambda d: flashlab.flash_attn_qkvpacked_func([1.0]), TypeError, "qkv must be a torch.Tensor"),
], ids=["qkv-not-3", "kv-rank", "qkv-not-tensor"])
def test_packed_shapes_are_checked(device, call, exc, match):
    with pytest.raises(exc, match=match):
        call(device)
