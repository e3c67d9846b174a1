"""The opt-in kernels' lab providers refuse what they would not really run."""

from __future__ import annotations

import torch

from flashlab.lab.cases import Case
from flashlab.lab.providers import registry


def test_gluon_provider_is_cuda_only_and_refuses_cases_outside_its_scope(monkeypatch):
    provider = registry()["flashlab-gluon"]
    assert provider.unavailable(torch.device("cpu")) == "runs on cuda only, not cpu"
    import triton

    from flashlab.lab import opt_in_providers

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    check = lambda case: opt_in_providers._check_gluon(case, torch.device("cuda"))  # noqa: E731
    assert check(Case(2, 1024, 16, 128)) is None
    assert check(Case(1, 4096, 32, 64, causal=True)) is None
    assert "scope" in check(Case(2, 1000, 16, 128))              # under 1024 tokens
    assert "scope" in check(Case(2, 1024, 32, 64))               # head dim 64 under 4096 keys
    assert check(Case(1, 1024, 16, 128, causal=True, seqlen_k=2048)) is None  # bottom-right, diag 1024
    assert "scope" in check(Case(1, 2048, 16, 128, causal=True, seqlen_k=1024))  # rows that see no key
    assert "scope" in check(Case(1, 1024, 16, 128, softcap=5.0))
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert "Triton 3.6" in check(Case(2, 1024, 16, 128))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper" in check(Case(2, 1024, 16, 128))
