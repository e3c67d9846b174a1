"""The TMA forward experiment (kernels/forward_tma.py, opt-in with FLASHLAB_FWD_TMA=1): same results
as the standard forward by the accuracy rule, on the interpreter (CPU) or the GPU, and it runs only
where it may (other calls take the standard kernel)."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference, make_qkv

import flashlab
from flashlab import ops


@pytest.fixture
def tma_calls(monkeypatch, device):
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need a Hopper-class GPU")
    monkeypatch.setenv("FLASHLAB_FWD_TMA", "1")
    calls = []
    real = ops.launch_fwd_tma

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "launch_fwd_tma", spy)
    return calls


@pytest.mark.parametrize("batch, sq, sk, heads, kv_heads, head_dim, causal, window", [
    (1, 1, 1, 1, 1, 64, False, (-1, -1)),
    (1, 113, 203, 6, 2, 80, False, (-1, -1)),
    (1, 113, 203, 6, 2, 40, True, (-1, -1)),
    (2, 70, 45, 2, 1, 72, True, (-1, -1)),   # seqlen_q > seqlen_k: rows that see no key
    (1, 64, 64, 2, 2, 96, False, (17, 5)),
    (1, 37, 90, 4, 4, 128, True, (20, -1)),
    (1, 33, 48, 2, 1, 256, False, (-1, -1)),
])
def test_tma_forward_matches_the_reference(tma_calls, device, batch, sq, sk, heads, kv_heads, head_dim, causal,
                                           window):
    torch.manual_seed(0)
    q, k, v = make_qkv(batch, sq, sk, heads, kv_heads, head_dim, torch.float16, device)
    out = flashlab.flash_attn_func(q, k, v, causal=causal, window_size=window)
    assert len(tma_calls) == 1
    check_against_reference(out, q, k, v, causal=causal, window_size=window)


@pytest.mark.parametrize("what", ["softcap", "head dim 36", "sdpa-layout slice"])
def test_tma_forward_steps_aside(tma_calls, device, what):
    """Calls it cannot take run the standard kernel, correctly."""
    torch.manual_seed(1)
    head_dim, kw = (36, {}) if what == "head dim 36" else (32, {})
    if what == "softcap":
        kw = {"softcap": 5.0}
    q, k, v = make_qkv(1, 40, 40, 2, 2, head_dim, torch.float16, device)
    if what == "sdpa-layout slice":
        # rows 16-byte aligned but the base of q is not: q starts 2 elements into its storage
        base = torch.randn(1 * 40 * 2 * 32 + 2, dtype=torch.float16, device=device)
        q = base[2:].view(1, 40, 2, 32).requires_grad_()
    out = flashlab.flash_attn_func(q, k, v, causal=True, **kw)
    assert tma_calls == []
    check_against_reference(out, q, k, v, causal=True, grads=False, **kw)
