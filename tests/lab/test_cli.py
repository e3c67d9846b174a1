"""`flashlab` end to end on tiny CPU shapes: the study, the report, OOM, resume, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST

from flashlab.lab import runner
from flashlab.lab.cli import main
from flashlab.lab.results import load_results

PROVIDERS = "naive,sdpa-math,test-chunked,test-oom"


def rows_of(out: Path) -> list[dict]:
    return load_results(out)[2]


def test_study_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "study"
    code = main(["study", "seed", "--scale", "tiny", "--providers", PROVIDERS, "--out", str(out), *FAST])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    env, config, rows = load_results(out)
    assert env["device"] == "cpu" and env["torch"] and "time_utc" in env
    assert config["scale"] == "tiny" and config["options"]["memory_method"] == "subprocess"
    assert len(rows) == 7 * 4  # 7 distinct tiny cases × 4 providers × fwd
    by = {(r["provider"], r["label"]): r for r in rows}
    ok = by[("naive", "B2-S64-H2-D16-fp32")]
    assert ok["status"] == "ok" and ok["time_ms"] > 0 and ok["tflops"] > 0 and ok["acc_ok"] is True
    assert ok["flops"] == 4 * 2 * 2 * 64 * 64 * 16 and ok["mem_above_inputs_mb"] > 0 and ok["inputs_mb"] > 0
    assert ok["time_q25_ms"] <= ok["time_ms"] <= ok["time_q75_ms"]
    # the OOM path: recorded with its message, and the sweep went on past it
    oom = by[("test-oom", "B2-S64-H2-D16-fp32")]
    assert oom["status"] == "oom" and "out of memory" in oom["message"] and oom["time_ms"] is None
    assert by[("test-oom", "B2-S32-H2-D16-fp32")]["status"] == "ok"
    assert rows[-1]["provider"] == "test-oom"  # the last row was still measured
    # CSV: environment header, then one tidy row per measurement
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("# time_utc: ")
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(table) == len(rows) and {r["status"] for r in table} == {"ok", "oom"}
    # the report: every seed table, OOM cells, the reading, figures, self-contained HTML
    md = (out / "report.md").read_text()
    for title in ("Table 1: Batch × sequence length", "Table 2: Batch size", "Table 3: Sequence length",
                  "Table 4: Number of heads", "Table 5: Embedding dimension", "Table 6: Causal attention"):
        assert title in md
    assert "| 2 | 64 | " in md and "OOM" in md
    assert "test-oom ran out of memory at B1×S64, B2×S64" in md
    assert "CPU" in md and "scale**: tiny" in md
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["grid-op-fwd-mem_above_inputs_mb.png", "grid-op-fwd-tflops.png", "grid-op-fwd-time_ms.png"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html


def test_report_from_saved_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    assert main(["study", "--scale", "tiny", "--providers", "naive,test-chunked", "--out", str(out),
                 "--memory", "inprocess", "--no-accuracy", *FAST]) == 0
    data = json.loads((out / "results.json").read_text())
    for row in data["rows"]:  # edit the saved numbers: the report must show them, not rerun anything
        if row["provider"] == "naive" and row["label"] == "B1-S32-H2-D16-fp32":
            row["time_ms"] = 123.456
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(data))
    monkeypatch.setattr(runner.Runner, "run", lambda *a, **k: pytest.fail("report must not measure"))
    dest = tmp_path / "rendered"
    assert main(["report", str(saved), "--out", str(dest)]) == 0
    md = (dest / "report.md").read_text()
    assert "| 1 | 32 | 123 |" in md  # the edited cell, in the grid's time table
    assert (dest / "report.html").exists() and (dest / "figures").is_dir()


def test_resume_after_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "resume"
    args = ["study", "--scale", "tiny", "--providers", "naive,test-interrupt", "--out", str(out),
            "--memory", "off", "--no-accuracy", *FAST]
    monkeypatch.setenv("FLASHLAB_TEST_INTERRUPT_AT", "B2-S32-H2-D16-fp32")
    assert main(args) == 130
    first = rows_of(out)
    assert 0 < len(first) < 14 and (out / "report.md").exists()  # partial results and report saved
    monkeypatch.delenv("FLASHLAB_TEST_INTERRUPT_AT")
    assert main(args) == 2  # the folder holds a run: refuse to overwrite it without --resume
    assert main([*args, "--resume"]) == 0
    second = rows_of(out)
    assert len(second) == 14
    before = {(r["provider"], r["label"]): r["time_ms"] for r in first}
    after = {(r["provider"], r["label"]): r["time_ms"] for r in second}
    assert all(after[k] == v for k, v in before.items())  # nothing measured twice
    assert "resumed_utc" in load_results(out)[0]
    assert len((out / "results.csv").read_text().splitlines()) == len(second) + 1 + len(load_results(out)[0])


def test_bench_from_suite_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "suite"
    assert main(["bench", "--suite", "fa-grid-small", "--providers", "naive,test-chunked", "--modes", "fwd",
                 "--out", str(out), "--memory", "off", "--no-accuracy", *FAST]) == 0
    rows = rows_of(out)
    assert len(rows) == 12 * 2 and {r["batch"] * r["seqlen_q"] for r in rows} == {1024}
    assert "Fastest provider per case" in (out / "report.md").read_text()
    flags = tmp_path / "flags"
    assert main(["bench", "--memory-cap", "4", "--batch", "1", "--seqlen", "16,32", "--embed", "32",
                 "--head-dim", "16", "--causal", "both", "--modes", "fwd,fwd+bwd", "--providers",
                 "naive,test-broken", "--scope", "layer", "--out", str(flags), "--memory", "off", *FAST]) == 0
    assert "--memory-cap 4 applies to CUDA devices only; ignored on cpu" in capsys.readouterr().err
    assert load_results(flags)[1]["memory_cap_gib"] is None
    rows = rows_of(flags)
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["scope"] == "layer" and r["heads"] == 2 for r in rows)
    assert {r["status"] for r in rows if r["provider"] == "test-broken"} == {"error"}
    assert all(r["acc_ok"] for r in rows if r["provider"] == "naive")
    assert {r["acc_what"] for r in rows if r["provider"] == "naive"} == {"out", "grad"}


def test_env_and_providers(capsys: pytest.CaptureFixture) -> None:
    assert main(["providers", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "naive" in text and "sdpa-cudnn" in text and "cuda only" in text
    assert main(["env", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "matmul fp32 TFLOP/s" in text


@pytest.mark.parametrize("argv, message", [
    (["bench", "--providers", "naive,nope"], "unknown provider 'nope'"),
    (["bench", "--heads", "3", "--embed", "2048"], "heads 3 do not divide the embedding 2048"),
    (["bench", "--head-dim", "512"], "head dim 512 is larger than 256"),
    (["bench", "--seqlen", "1k"], "--seqlen takes integers"),
    (["bench", "--modes", "forward"], "unknown value 'forward'"),
    (["bench", "--causal", "maybe"], "--causal takes true, false or both"),
    (["bench", "--suite", "nope"], "unknown suite 'nope'"),
    (["bench", "--out", "/proc/flashlab-out"], "cannot write to output directory '/proc/flashlab-out'"),
    (["study", "--scope", "model"], "invalid choice: 'model'"),
    (["report", "/nonexistent/results"], "no results file"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main([*argv, *(FAST if argv[0] == "bench" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashlab: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cpu_memory_methods_are_refused_on_a_gpu(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    from flashlab.lab import env

    monkeypatch.setattr(env, "pick_device", lambda name: torch.device("cuda"))
    assert main(["bench", "--memory", "inprocess", *FAST]) == 2
    assert "--memory inprocess measures CPU runs; on cuda use --memory auto" in capsys.readouterr().err


def test_malformed_suite_file_through_the_console_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: [batch: 1\n")
    proc = subprocess.run([sys.executable, "-m", "flashlab.lab.cli", "bench", "--suite", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"flashlab: error: {bad}: malformed suite file")
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_bench_distributed_hands_over_to_the_ring_benchmark(tmp_path: Path) -> None:
    """`flashlab bench --distributed` runs flashlab.distributed.bench (world size 1 without torchrun)."""
    out = tmp_path / "ring.json"
    subprocess.run([sys.executable, "-m", "flashlab.lab.cli", "bench", "--distributed", "--device", "cpu",
                    "--seqlen", "64", "--heads", "2", "--head-dim", "16", "--reps", "1", "--warmup", "0",
                    "--no-baseline", "--modes", "fwd", "--json", str(out)], check=True, capture_output=True,
                   timeout=300)
    data = json.loads(out.read_text())
    assert data["env"]["world_size"] == 1
    assert {r["method"] for r in data["rows"]} == {"ring", "allgather"}
    assert all(r["mode"] == "fwd" and r["time_ms"] > 0 for r in data["rows"])
