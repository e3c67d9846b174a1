"""Lab cases with attention features (window / document / prefix masks, softcap, ALiBi, varlen,
dropout): case validation, FLOPs, every provider against the reference, unsupported peers, shipped
suites."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import FAST

from flashlab.lab import accuracy, features, flex_provider, providers
from flashlab.lab.cases import Case
from flashlab.lab.cli import main
from flashlab.lab.errors import LabError
from flashlab.lab.flops import case_flops
from flashlab.lab.results import load_results
from flashlab.lab.suites import load_suite, shipped_suites
from flashlab.lab.workload import Workload

CPU = torch.device("cpu")


def test_case_fields_labels_and_errors() -> None:
    c = Case(batch=2, seqlen_q=64, heads=4, kv_heads=2, head_dim=16, causal=True, mask="window:8", softcap=5.0,
             alibi=True)
    assert c.label == "B2-S64-H4:2-D16-fp16-causal-window8-softcap5-alibi"
    assert Case.from_dict(c.to_dict()) == c
    d = Case(batch=1, seqlen_q=16, heads=2, head_dim=16, dropout=0.1)
    assert d.label == "B1-S16-H2-D16-fp16-dropout0.1" and features.has_features(d)
    assert Case.from_dict(d.to_dict()) == d
    for bad, match in ((dict(mask="window"), "mask must be"), (dict(mask="band:3"), "mask must be"),
                       (dict(mask="document:2", varlen=4), "varlen case cannot"),
                       (dict(mask="prefix:4", causal=True), "prefix"), (dict(mask="window:4", seqlen_k=32), "seqlen_k"),
                       (dict(varlen=-1), "varlen"), (dict(softcap=-1.0), "softcap"),
                       (dict(dropout=1.0), "dropout"), (dict(dropout=True), "dropout"),
                       (dict(dropout=0.1, scope="layer"), "scope 'op'"),
                       (dict(alibi=True, scope="layer"), "scope 'op'")):
        with pytest.raises(LabError, match=match):
            Case(batch=1, seqlen_q=16, heads=2, head_dim=16, **bad)


def test_flops_count_visible_pairs() -> None:
    def fwd(**kw) -> float:
        return case_flops(Case(batch=1, heads=2, head_dim=16, causal=True, **kw), "fwd")
    # A fixed window: linear in seqlen once seqlen ≫ window.
    w = [fwd(seqlen_q=s, mask="window:64") for s in (1024, 2048, 4096)]
    assert w[1] / w[0] == pytest.approx(2, rel=0.05) and w[2] / w[1] == pytest.approx(2, rel=0.05)
    docs = features.doc_lengths(1000, 5)
    assert len(docs) == 5 and sum(docs) == 1000 and min(docs) >= 1
    assert fwd(seqlen_q=1000, mask="document:5") == 4 * 2 * 16 * sum(d * (d + 1) / 2 for d in docs)
    c = Case(batch=6, seqlen_q=100, heads=2, head_dim=16, varlen=10)
    lengths = features.varlen_lengths(c)
    assert len(lengths) == 6 and all(10 <= n <= 100 for n in lengths)
    assert case_flops(c, "fwd+bwd") == 3.5 * 4 * 2 * 16 * sum(n * n for n in lengths)
    assert fwd(seqlen_q=64) == 4 * 2 * 64 * 64 * 16 / 2  # plain causal keeps the FlashAttention convention


FLEX_CASES = [
    Case(batch=2, seqlen_q=48, heads=2, head_dim=16, causal=True, mask="window:8", dtype="fp32"),
    Case(batch=1, seqlen_q=64, heads=2, kv_heads=1, head_dim=16, causal=True, mask="document:3", dtype="fp32"),
    Case(batch=1, seqlen_q=40, heads=2, head_dim=16, causal=True, softcap=5.0, alibi=True, dtype="fp32"),
    Case(batch=3, seqlen_q=40, heads=2, head_dim=16, causal=True, varlen=10, dtype="fp32"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda c: c.label)
def test_flex_expresses_the_same_features(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's mask_mod / score_mod / BlockMask (eager on CPU: compiling takes minutes)
    against the reference, forward only (flex has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setitem(flex_provider._FLEX, ("fn", CPU.type), flex_attention)
    wl = Workload(case, providers.get_provider("flex").build(case, CPU), CPU)
    assert accuracy.check_output(wl)["acc_ok"]


def test_unsupported_features_are_reported_not_crashes() -> None:
    soft = Case(batch=1, seqlen_q=32, heads=2, head_dim=16, softcap=5.0)
    assert "softcap" in providers.get_provider("sdpa-math").unsupported(soft, CPU)
    doc = Case(batch=1, seqlen_q=32, heads=2, head_dim=16, mask="document:2")
    assert "no attn_mask" in providers.get_provider("sdpa-flash").unsupported(doc, CPU)
    assert "varlen" in providers.get_provider("flashlab-loop").unsupported(doc, CPU)
    assert providers.get_provider("flashlab").unsupported(doc, CPU) is None  # the CPU path: a dense mask
    assert providers.get_provider("flashlab").unsupported(dataclasses.replace(doc, dtype="fp32"), CPU) is None
    # the SDPA drop-in takes the masks as a dense attn_mask, as PyTorch SDPA does; not softcap
    assert providers.get_provider("flashlab-sdpa").unsupported(doc, CPU) is None
    assert "softcap" in providers.get_provider("flashlab-sdpa").unsupported(soft, CPU)
    drop = Case(batch=1, seqlen_q=32, heads=2, head_dim=16, dropout=0.1)
    for name, match in (("flex", "no dropout"), ("naive", "no random dropout")):
        with pytest.raises(NotImplementedError, match=match):
            providers.get_provider(name).build(drop, CPU)


def test_tiny_feature_suite_on_the_cpu_path(tmp_path: Path) -> None:
    """Without the interpreter, flashlab runs every feature case on its blockwise CPU path and
    passes the accuracy rule on outputs and gradients."""
    out = tmp_path / "features-cpu"
    code = main(["bench", "--suite", "features-tiny", "--providers", "flashlab", "--modes", "fwd+bwd", "--memory",
                 "off", "--out", str(out), *FAST])
    assert code == 0
    rows = load_results(out)[2]
    assert len(rows) == 7
    for r in rows:
        assert r["status"] == "ok" and r["acc_ok"] is True and r["acc_what"] == "grad", r


def test_tiny_feature_suite_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every provider of the tiny suite runs or says why not; flashlab (interpreter) and the loop pass the
    accuracy rule on outputs and gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "features"
    fast = [a if a != "2" else "1" for a in FAST]  # one timed repeat: the interpreter is slow
    code = main(["bench", "--suite", "features-tiny", "--modes", "fwd+bwd", "--memory", "off", "--out", str(out),
                 *fast])
    assert code == 0
    rows = load_results(out)[2]
    assert len(rows) == 7 * 5
    by = {(r["provider"], r["label"]): r for r in rows}
    for r in rows:
        assert r["status"] in ("ok", "unsupported"), r
        if r["status"] == "ok":
            assert r["acc_ok"] is True and r["acc_what"] == "grad", r
    for label in ("B1-S48-H2:1-D16-fp16-causal-window8", "B1-S40-H2-D16-fp16-prefix10-alibi",
                  "B1-S40-H2-D16-fp16-softcap5", "B3-S40-H2-D16-fp16-varlen10"):
        assert by[("flashlab", label)]["status"] == "ok"
    assert by[("flashlab-loop", "B3-S40-H2-D16-fp16-causal-varlen10")]["status"] == "ok"
    assert by[("sdpa-flash", "B3-S40-H2-D16-fp16-causal-varlen10")]["status"] == "ok"  # padded, is_causal
    assert by[("sdpa-flash", "B3-S40-H2-D16-fp16-varlen10")]["status"] == "unsupported"
    assert by[("sdpa-math", "B1-S40-H2-D16-fp16-softcap5")]["status"] == "unsupported"


def test_dropout_and_dense_masks_on_the_cpu_path(tmp_path: Path) -> None:
    """Dropout rows run and are reported as not accuracy-checked (random masks); the SDPA drop-in
    with PyTorch's dense bool / float masks passes the accuracy rule beside SDPA's math backend."""
    out = tmp_path / "drop"
    code = main(["bench", "--seqlen", "40", "--heads", "2", "--head-dim", "16", "--batch", "1", "--dtypes", "fp32",
                 "--dropout", "0,0.2", "--causal", "true", "--providers", "flashlab,flashlab-sdpa,sdpa-math,naive",
                 "--modes", "fwd+bwd", "--memory", "off", "--out", str(out), *FAST])
    assert code == 0
    by = {(r["provider"], r["label"]): r for r in load_results(out)[2]}
    for name in ("flashlab", "flashlab-sdpa", "sdpa-math"):
        dropped = by[(name, "B1-S40-H2-D16-fp32-causal-dropout0.2")]
        assert dropped["status"] == "ok" and "not checked" in dropped["acc_what"] and dropped.get("acc_ok") is None
        assert by[(name, "B1-S40-H2-D16-fp32-causal")]["acc_ok"] is True
    assert by[("naive", "B1-S40-H2-D16-fp32-causal-dropout0.2")]["status"] == "unsupported"
    out = tmp_path / "mask"
    code = main(["bench", "--seqlen", "48", "--heads", "2", "--head-dim", "16", "--batch", "1", "--dtypes", "fp32",
                 "--mask", "document:3,prefix:10", "--providers", "flashlab-sdpa,sdpa-math", "--modes", "fwd+bwd",
                 "--memory", "off", "--out", str(out), *FAST])
    assert code == 0
    code = main(["bench", "--seqlen", "48", "--heads", "2", "--head-dim", "16", "--batch", "1", "--dtypes", "fp32",
                 "--alibi", "true", "--causal", "true", "--providers", "flashlab-sdpa", "--modes", "fwd+bwd",
                 "--memory", "off", "--out", str(out), "--resume", *FAST])
    assert code == 0
    rows = load_results(out)[2]
    assert len(rows) == 5
    for r in rows:
        assert r["status"] == "ok" and r["acc_ok"] is True and r["acc_what"] == "grad", r


@pytest.mark.parametrize("name", ["sliding-window", "varlen", "block-sparse", "softcap-alibi", "features-tiny",
                                  "dropout", "attn-mask"])
def test_shipped_feature_suites_load(name: str) -> None:
    assert name in shipped_suites()
    suite = load_suite(name)
    assert suite.cases and suite.providers and all(features.has_features(c) or not c.mask for c in suite.cases)
    if name == "varlen":
        c = suite.cases[0]
        lengths = features.varlen_lengths(c)
        assert c.batch == 64 and min(lengths) >= 100 and max(lengths) <= 4000


def test_bench_feature_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["bench", "--seqlen", "32", "--heads", "2", "--head-dim", "16", "--mask", "band:3",
                 "--providers", "naive", "--out", str(tmp_path / "x"), *FAST])
    assert code == 2 and "mask must be" in capsys.readouterr().err
    code = main(["bench", "--seqlen", "32", "--heads", "2", "--head-dim", "16", "--batch", "1", "--mask", "window:4",
                 "--softcap", "0,3", "--alibi", "true", "--causal", "true", "--providers", "naive", "--memory", "off",
                 "--out", str(tmp_path / "y"), *FAST])
    assert code == 0
    labels = {r["label"] for r in load_results(tmp_path / "y")[2]}
    assert labels == {"B1-S32-H2-D16-fp32-causal-window4-alibi", "B1-S32-H2-D16-fp32-causal-window4-softcap3-alibi"}
