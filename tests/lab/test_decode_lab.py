"""The decoding path in the lab: the flashlab-kvcache provider and the K/V read-rate column."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import FAST

from flashlab.lab import accuracy, providers
from flashlab.lab.cases import Case
from flashlab.lab.cli import main
from flashlab.lab.results import load_results
from flashlab.lab.suites import load_suite
from flashlab.lab.workload import Workload

CPU = torch.device("cpu")


def test_kvcache_provider_matches_the_reference() -> None:
    for case in (Case(batch=2, seqlen_q=1, seqlen_k=100, heads=4, kv_heads=2, head_dim=16, dtype="fp32"),
                 Case(batch=2, seqlen_q=3, seqlen_k=77, heads=4, kv_heads=1, head_dim=16, causal=True, dtype="fp32")):
        wl = Workload(case, providers.get_provider("flashlab-kvcache").build(case, CPU), CPU)
        assert accuracy.check_output(wl)["acc_ok"]
    doc = Case(batch=1, seqlen_q=32, heads=2, head_dim=16, mask="document:2")
    assert "decoding path" in providers.get_provider("flashlab-kvcache").unsupported(doc, CPU)


def test_decode_suite_uses_the_decoding_path() -> None:
    suite = load_suite(str(Path(__file__).parents[2] / "benchmarks" / "suites" / "decode.toml"))
    assert suite.providers[0] == "flashlab-kvcache" and suite.modes == ("fwd",)
    assert {c.seqlen_q for c in suite.cases} == {1} and len(suite.cases) == 16


def test_kv_read_rate_column_and_report(tmp_path: Path) -> None:
    out = tmp_path / "decode"
    code = main(["bench", "--batch", "2", "--seqlen", "1", "--seqlen-k", "256", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "16", "--providers", "flashlab-kvcache,sdpa-math", "--modes", "fwd,fwd+bwd",
                 "--memory", "off", "--out", str(out), *FAST])
    assert code == 0
    rows = {(r["provider"], r["mode"]): r for r in load_results(out)[2]}
    fwd = rows[("flashlab-kvcache", "fwd")]
    assert fwd["status"] == "ok" and fwd["acc_ok"] is True
    kv_bytes = 2 * 2 * 256 * 2 * 16 * 4  # k and v, batch 2, 256 keys, 2 kv heads, dim 16, fp32
    assert abs(fwd["kv_gbps"] - kv_bytes / (fwd["time_ms"] * 1e-3) / 1e9) < 1e-9
    assert rows[("flashlab-kvcache", "fwd+bwd")]["status"] == "unsupported"  # inference only
    assert rows[("sdpa-math", "fwd+bwd")]["kv_gbps"] is None
    assert "K/V read rate (GB/s)" in (out / "report.md").read_text()
