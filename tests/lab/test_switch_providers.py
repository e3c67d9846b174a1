"""flashlab-tl: the `tl` kernels beside the default, only where the default runs the Gluon ones."""

from __future__ import annotations

import os

import torch

from flashlab.gluon_forward import switched_on
from flashlab.lab.cases import Case
from flashlab.lab.providers import registry


def hopper_checks(monkeypatch, provider: str, check_fn: str):
    """``provider``'s check on a pretended Hopper GPU with Triton 3.6 (after asserting it is CUDA-only)."""
    assert registry()[provider].unavailable(torch.device("cpu")) == "runs on cuda only, not cpu"
    import triton

    from flashlab.lab import switch_providers

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    return lambda case: getattr(switch_providers, check_fn)(case, torch.device("cuda"))


def test_tl_provider_is_cuda_only_and_refuses_cases_where_flashlab_runs_tl_anyway(monkeypatch):
    import triton

    check = hopper_checks(monkeypatch, "flashlab-tl", "_check_tl")
    assert check(Case(8, 2048, 16, 128)) is None
    assert check(Case(4, 4096, 32, 64, causal=True)) is None
    assert check(Case(16, 1024, 8, 256)) is None
    assert "too little work" in check(Case(1, 4096, 8, 128))
    assert "scope" in check(Case(2, 1000, 16, 128))              # under 1024 tokens
    assert "scope" in check(Case(2, 1024, 32, 64))               # head dim 64 under 4096 keys
    assert check(Case(16, 1024, 16, 128, causal=True, seqlen_k=2048)) is None  # bottom-right, diag 1024
    assert "scope" in check(Case(1, 2048, 16, 128, causal=True, seqlen_k=1024))  # rows that see no key
    assert "scope" in check(Case(1, 1024, 16, 128, softcap=5.0))
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert "Triton 3.6" in check(Case(2, 1024, 16, 128))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper" in check(Case(2, 1024, 16, 128))


def test_gluon_off_switches_both_kernels_off_and_restores_the_environment(monkeypatch):
    from flashlab.lab.switch_providers import gluon_off

    monkeypatch.delenv("FLASHLAB_FWD_GLUON", raising=False)
    monkeypatch.setenv("FLASHLAB_BWD_GLUON", "1")
    with gluon_off():
        assert not switched_on("FLASHLAB_FWD_GLUON") and not switched_on("FLASHLAB_BWD_GLUON")
    assert "FLASHLAB_FWD_GLUON" not in os.environ and os.environ["FLASHLAB_BWD_GLUON"] == "1"


def test_the_workload_enters_the_providers_context_for_each_step():
    """fwd, bwd and fwd+bwd steps (and the accuracy checks) run inside Attn.context."""
    from contextlib import contextmanager

    from flashlab.lab.providers import Attn
    from flashlab.lab.workload import Workload

    entered = []

    @contextmanager
    def context():
        entered.append(1)
        yield

    case = Case(1, 16, 2, 16, dtype="fp32")
    base = registry()["naive"].build(case, torch.device("cpu"))
    attn = Attn(base.fn, base.layout, base.causal_align, context=context)
    workload = Workload(case, attn, torch.device("cpu"), requires_grad=True)
    for mode in ("fwd", "bwd", "fwd+bwd"):
        entered.clear()
        step = workload.mode_fn(mode)
        step()
        assert entered, mode


def test_deterministic_provider_only_where_the_default_backward_uses_atomics(monkeypatch):
    check = hopper_checks(monkeypatch, "flashlab-deterministic", "_check_deterministic")
    assert check(Case(2, 8192, 16, 128, causal=True)) is None
    assert "query heads a kv head" in check(Case(1, 16384, 32, 128, causal=True, kv_heads=8))  # GQA: two kernels
    assert "from 8192 tokens" in check(Case(2, 8192, 16, 128))           # no mask: the two kernels
    assert "from 8192 tokens" in check(Case(8, 2048, 16, 128, causal=True))
    assert "from 8192 tokens" in check(Case(4, 8192, 32, 64, causal=True))
    assert "deterministic here anyway" in check(Case(2, 8192, 16, 128, causal=True, softcap=5.0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper" in check(Case(2, 8192, 16, 128, causal=True))


def test_training_suite_times_the_backward_beside_the_peers():
    from flashlab.lab.suites import load_suite

    suite = load_suite("training")
    assert suite.modes == ("fwd+bwd", "bwd") and "flashlab-deterministic" in suite.providers
    assert {c.kv_heads for c in suite.cases if c.heads == 32} == {8, 1}
    assert all(c.head_dim == 128 and c.dtype == "bf16" for c in suite.cases)
