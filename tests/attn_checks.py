"""Shared helpers for kernel tests: random inputs and the accuracy rule on outputs and gradients."""

from __future__ import annotations

import torch

from flashlab.reference import accuracy_check, naive_attention, reference_attention


def make_qkv(batch: int, seqlen_q: int, seqlen_k: int, heads: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: str, layout: str = "bshd") -> tuple[torch.Tensor, ...]:
    """Fresh random q, k, v (requires_grad) in flash (bshd) or SDPA (bhsd) layout."""
    def one(seqlen: int, h: int) -> torch.Tensor:
        shape = (batch, seqlen, h, head_dim) if layout == "bshd" else (batch, h, seqlen, head_dim)
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    return one(seqlen_q, heads), one(seqlen_k, kv_heads), one(seqlen_k, kv_heads)


def backward_launch_inputs(layout: str, batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int,
                           dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """CPU inputs of a Gluon backward launcher, as (batch, seqlen, heads, dim) views in the ``layout``
    memory order ("bshd" or "bhsd"): q, k, v, dO, empty dq, dk, dv, and fp32 LSE / Δ buffers."""
    shape = (lambda n: (batch, seqlen, n, head_dim)) if layout == "bshd" else (lambda n: (batch, n, seqlen, head_dim))
    q, k, v, do = (torch.randn(*shape(n), dtype=dtype) for n in (heads, kv_heads, kv_heads, heads))
    if layout == "bhsd":
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
    return q, k, v, do, dq, dk, dv, torch.empty(batch, heads, seqlen), torch.empty(batch, heads, seqlen)


def case_id(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal) -> str:
    return f"B{batch}-S{seqlen_q}x{seqlen_k}-H{heads}:{kv_heads}-D{head_dim}-{'causal' if causal else 'full'}"


def check_against_reference(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            grads: bool = True, **ref_kwargs) -> None:
    """Assert the ANCHORS.md accuracy rule on ``out`` and (if ``grads``) on dq, dk, dv, against the
    fp64 reference and the same-dtype naive attention with the same semantics."""
    ref = reference_attention(q, k, v, dtype=torch.float64, **ref_kwargs)
    low = naive_attention(q, k, v, **ref_kwargs)
    check = accuracy_check(out, ref, low)
    assert check.ok, f"output: {check}"
    assert not out.isnan().any()
    if not grads:
        return
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    same = torch.autograd.grad(low, (q, k, v), g)
    for name, a, r, s in zip(("dq", "dk", "dv"), got, want, same):
        assert a.shape == r.shape and a.dtype == q.dtype
        check = accuracy_check(a, r, s, factor=3.0)
        assert check.ok, f"{name}: {check}"


class FakeKernel:
    """Stands in for a Gluon kernel on the CPU: records each launch (grid, args, kwargs) instead of
    running it, so the host glue's arguments can be checked without a GPU."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def pretend_hopper(monkeypatch) -> None:
    """Make the Gluon scope checks see a Hopper GPU with Triton 3.6 and CUDA tensors, so which calls
    they take can be tested on the CPU (no kernel may run)."""
    import flashlab.gluon_forward as host

    monkeypatch.setattr(host, "interpreting", lambda: False)
    monkeypatch.setattr(host.configs, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(host, "triton_has_gluon_36", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def gluon_spy(monkeypatch, switch: str, owner, launcher: str) -> list:
    """Turn ``switch`` on (the default; a test may have set it off), let calls of any size take the
    Gluon kernels (MIN_WORK 0), and record the shapes ``owner.launcher`` is called with (it still
    runs); skips unless the Gluon kernels can run here (a Hopper GPU, Triton 3.6)."""
    import pytest
    import triton

    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith("3.6."):
        pytest.skip("the Gluon kernels need a Hopper GPU and Triton 3.6")
    monkeypatch.setenv(switch, "1")
    import flashlab.gluon_forward

    monkeypatch.setattr(flashlab.gluon_forward, "MIN_WORK", 0)  # the tests' shapes are small on purpose
    monkeypatch.setattr(flashlab.launch_plans, "_plans", {})  # plans recorded before MIN_WORK was lifted
    calls: list = []
    real = getattr(owner, launcher)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, launcher, spy)
    return calls
