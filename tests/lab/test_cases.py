"""Cases, sweeps, the seed study preset and suite files."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashlab.lab.cases import SCALES, Case, case_from_embed, expand_sweep, seed_study
from flashlab.lab.errors import LabError
from flashlab.lab.suites import load_suite, shipped_suites


def test_case_defaults_label_and_roundtrip() -> None:
    c = Case(32, 1024, 32, 64, causal=True)
    assert (c.seqlen_k, c.kv_heads, c.embed) == (1024, 32, 2048)
    assert c.label == "B32-S1024-H32-D64-fp16-causal"
    assert Case(2, 113, 6, 80, seqlen_k=203, kv_heads=2).label == "B2-S113x203-H6:2-D80-fp16"
    assert Case(1, 8, 1, 8, dtype="fp32", scope="layer").label == "B1-S8-H1-D8-fp32-layer"
    assert Case.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs, message", [
    ({"batch": 0, "seqlen_q": 8, "heads": 1, "head_dim": 8}, "batch must be a positive integer"),
    ({"batch": 1, "seqlen_q": 8, "heads": 1, "head_dim": 512}, "head dim 512 is larger than 256"),
    ({"batch": 1, "seqlen_q": 8, "heads": 6, "head_dim": 8, "kv_heads": 4}, "kv heads 4 do not divide heads 6"),
    ({"batch": 1, "seqlen_q": 8, "heads": 1, "head_dim": 8, "dtype": "fp8"}, "dtype must be one of"),
    ({"batch": 1, "seqlen_q": 8, "heads": 1, "head_dim": 8, "scope": "layer", "seqlen_k": 4}, "self-attention"),
])
def test_impossible_cases(kwargs: dict, message: str) -> None:
    with pytest.raises(LabError, match=message):
        Case(**kwargs)


def test_heads_must_divide_embedding() -> None:
    assert case_from_embed(1, 16, 16, 2048).head_dim == 128
    with pytest.raises(LabError, match="heads 3 do not divide the embedding 2048"):
        case_from_embed(1, 16, 3, 2048)


def test_sweep_tokens_and_embed() -> None:
    cases = expand_sweep({"tokens": 16384, "seqlen": [512, 16384], "embed": 2048, "head_dim": [64, 256],
                          "causal": [False, True]})
    assert len(cases) == 8
    assert {(c.batch, c.seqlen_q) for c in cases} == {(32, 512), (1, 16384)}
    assert all(c.heads * c.head_dim == 2048 for c in cases)
    with pytest.raises(LabError, match="not a multiple"):
        expand_sweep({"tokens": 1000, "seqlen": 512, "heads": 1, "head_dim": 8})
    with pytest.raises(LabError, match="unknown key 'heds'"):
        expand_sweep({"batch": 1, "seqlen": 8, "heds": 2, "head_dim": 8})
    with pytest.raises(LabError, match="exactly one of 'batch' or 'tokens'"):
        expand_sweep({"seqlen": 8, "heads": 2, "head_dim": 8})


def test_seed_study_full_scale_is_the_seed_document() -> None:
    study = seed_study("full")
    tables = {t.key: t for t in study.tables}
    grid = tables["grid-op"]
    assert [(c.batch, c.seqlen_q) for c in grid.cases] == [(b, s) for b in (16, 32, 64) for s in (512, 1024, 2048)]
    assert all(c.heads == 32 and c.embed == 2048 and c.dtype == "fp16" and not c.causal for c in grid.cases)
    assert [c.head_dim for c in tables["heads-op"].cases] == [256, 128, 64]  # 8/16/32 heads at embedding 2048
    assert [(c.heads, c.embed) for c in tables["embed-op"].cases] == [(16, 1024), (16, 2048), (16, 4096)]
    assert [c.causal for c in tables["causal-op"].cases] == [False, True]
    default = Case(32, 1024, 32, 64)
    for key in ("batch-op", "seqlen-op", "heads-op", "causal-op"):
        assert default in tables[key].cases
    assert len(study.cases) == 14  # the union: 9 grid + heads 8, 16 + embeddings at 16 heads (3) + causal


def test_seed_study_scales_and_scopes() -> None:
    both = seed_study("cpu", ("op", "layer"))
    assert {t.scope for t in both.tables} == {"op", "layer"}
    assert all(c.dtype == "fp32" for c in both.cases)
    assert max(c.batch for c in both.cases) == max(SCALES["cpu"].batches)
    with pytest.raises(LabError, match="unknown scale"):
        seed_study("huge")


def test_shipped_fa_grid_suite() -> None:
    assert {"fa-grid", "fa-grid-small"} <= set(shipped_suites())
    suite = load_suite("fa-grid")
    assert suite.modes == ("fwd", "fwd+bwd")
    assert len(suite.cases) == 6 * 3 * 2
    for c in suite.cases:
        assert c.batch * c.seqlen_q == 16384 and c.heads * c.head_dim == 2048 and c.dtype == "fp16"
    assert {c.head_dim for c in suite.cases} == {64, 128, 256}
    assert {c.seqlen_q for c in suite.cases} == {512, 1024, 2048, 4096, 8192, 16384}


def test_user_suite_files(tmp_path: Path) -> None:
    toml = tmp_path / "mine.toml"
    toml.write_text('providers = ["naive"]\ndtype = "fp32"\n[[sweep]]\nbatch = [1, 2]\nseqlen = 32\n'
                    'heads = 2\nhead_dim = 16\n')
    suite = load_suite(str(toml))
    assert suite.name == "mine" and suite.providers == ("naive",) and len(suite.cases) == 2
    yml = tmp_path / "mine.yaml"
    yml.write_text("sweep:\n  - batch: 1\n    seqlen: [16, 32]\n    embed: 64\n    heads: 4\n")
    assert [c.head_dim for c in load_suite(str(yml)).cases] == [16, 16]


@pytest.mark.parametrize("text, message", [
    ("[[sweep]\nbatch = 1", "malformed suite file"),
    ("name = 'x'\n", "needs at least one"),
    ("modes = ['forward']\n[[sweep]]\nbatch = 1\nseqlen = 8\nheads = 1\nhead_dim = 8\n", "unknown mode"),
    ("colour = 1\n[[sweep]]\nbatch = 1\nseqlen = 8\nheads = 1\nhead_dim = 8\n", "unknown key 'colour'"),
    ("[[sweep]]\nbatch = 1\nseqlen = 8\nheads = 3\nembed = 64\n", "heads 3 do not divide the embedding 64"),
    ("[[sweep]]\nbatch = 'one'\nseqlen = 8\nheads = 1\nhead_dim = 8\n", "batch must be a positive integer"),
])
def test_malformed_suites(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(LabError, match=message):
        load_suite(str(p))


def test_unknown_suite_name() -> None:
    with pytest.raises(LabError, match="unknown suite 'nope'.*fa-grid"):
        load_suite("nope")
    with pytest.raises(LabError, match="cannot read suite file"):
        load_suite("/nonexistent/x.toml")
