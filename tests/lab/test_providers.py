"""The provider registry, the workloads and the accuracy check, on CPU."""

from __future__ import annotations

import pytest
import torch

from flashlab.lab import accuracy
from flashlab.lab.cases import Case
from flashlab.lab.errors import LabError
from flashlab.lab.providers import get_provider, registry, resolve_providers
from flashlab.lab.workload import Workload

CPU = torch.device("cpu")


def test_registry_names_and_defaults() -> None:
    names = set(registry())
    assert {"naive", "flashlab", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex",
            "flash-attn", "fa3", "fa4"} <= names
    assert [p.name for p in resolve_providers(None, CPU)] == ["naive", "flashlab", "sdpa-flash", "sdpa-math"]
    with pytest.raises(LabError, match="unknown provider 'nope' \\(known: naive"):
        resolve_providers(["naive", "nope"], CPU)


def test_why_unavailable_on_cpu() -> None:
    assert "cuda only" in get_provider("sdpa-cudnn").unavailable(CPU)
    assert "cuda only" in get_provider("flash-attn").unavailable(CPU)
    assert get_provider("naive").unavailable(CPU) is None
    causal_cross = Case(1, 8, 2, 8, causal=True, seqlen_k=16, dtype="fp32")
    assert "top-left" in get_provider("sdpa-math").unsupported(causal_cross, CPU)


@pytest.mark.parametrize("scope", ["op", "layer"])
@pytest.mark.parametrize("name", ["naive", "flashlab", "sdpa", "sdpa-flash", "sdpa-math", "test-chunked"])
def test_cpu_providers_pass_the_accuracy_rule(name: str, scope: str) -> None:
    case = Case(2, 24, 2, 16, causal=True, dtype="fp32", scope=scope)
    provider = get_provider(name)
    wl = Workload(case, provider.build(case, CPU), CPU, requires_grad=True)
    out = accuracy.check_output(wl)
    assert out["acc_ok"] and out["acc_what"] == "out"
    assert out["max_abs_err"] < 1e-5 and out["rel_err"] < 1e-5
    grads = accuracy.check_grads(wl)
    assert grads["acc_ok"] and grads["acc_what"] == "grad"


def test_accuracy_catches_a_wrong_provider() -> None:
    case = Case(1, 16, 2, 8, dtype="fp32")
    attn = get_provider("naive").build(case, CPU)
    wrong = type(attn)(lambda q, k, v: attn.fn(q, k, v) * 1.01, attn.layout, attn.causal_align)
    res = accuracy.check_output(Workload(case, wrong, CPU))
    assert res["acc_ok"] is False and res["rel_err"] == pytest.approx(0.01, rel=1e-3)


def test_workload_layouts_and_modes() -> None:
    case = Case(2, 8, 4, 16, kv_heads=2, dtype="fp32")
    naive = get_provider("naive").build(case, CPU)
    wl = Workload(case, naive, CPU, requires_grad=True)
    assert [tuple(t.shape) for t in wl.leaves] == [(2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)]
    assert wl.input_bytes == 4 * (2 * 4 * 8 * 16 + 2 * 2 * 2 * 8 * 16)
    wl.mode_fn("fwd")()
    assert all(t.grad is None for t in wl.leaves)  # forward under no_grad
    wl.mode_fn("fwd+bwd")()
    assert all(t.grad is not None for t in wl.leaves)
    layer = Workload(Case(2, 8, 4, 16, dtype="fp32", scope="layer"), naive, CPU)
    assert tuple(layer.forward().shape) == (2, 8, 64)


def test_flex_raises_dynamo_recompile_limits() -> None:
    import torch._dynamo

    from flashlab.lab.flex_provider import _raise_recompile_limits

    _raise_recompile_limits()
    cfg = torch._dynamo.config
    assert cfg.cache_size_limit >= 1024
    if hasattr(cfg, "recompile_limit"):
        assert cfg.recompile_limit >= 1024
