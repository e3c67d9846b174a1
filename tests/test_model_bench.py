"""The end-to-end model benchmark: its decoder is correct with every backend, and the CPU smoke run
writes a result for every (backend, seqlen) cell."""

from __future__ import annotations

import json

import pytest
import torch

from flashlab.lab.decoder import Decoder, attention_backend
from flashlab.lab.model_bench import TINY, main
from flashlab.reference import accuracy_check


def test_decoder_logits_with_flashlab_follow_the_accuracy_rule():
    """The same weights through flashlab (fp16) vs the fp64 model, allowed 2× the fp16 eager model's error."""
    torch.manual_seed(0)
    ids = torch.randint(0, TINY.vocab, (2, 24))
    models = {}
    for name, backend, dtype in (("ours", "flashlab", torch.float16), ("high", "eager", torch.float64),
                                 ("low", "eager", torch.float16)):
        torch.manual_seed(1)
        models[name] = Decoder(TINY, backend, dtype=dtype)
    logits = {name: m(ids) for name, m in models.items()}
    check = accuracy_check(logits["ours"], logits["high"], logits["low"])
    assert check.ok, str(check)
    loss = models["ours"].loss(torch.randint(0, TINY.vocab, (2, 25)))
    loss.backward()
    assert loss.isfinite() and all(p.grad is not None and p.grad.isfinite().all() for p in models["ours"].parameters())


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of flashlab, sdpa, .*eager; got 'flash'"):
        attention_backend("flash")


def test_tiny_cpu_run_writes_every_cell(tmp_path):
    rows = main(["--tiny", "--device", "cpu", "--backends", "flashlab", "sdpa", "eager", "sdpa-flash",
                 "--out", str(tmp_path)])
    # sdpa-flash is CUDA-only and left out on the CPU; every other cell ran.
    assert [(r["backend"], r["seqlen"]) for r in rows] == [(b, s) for b in ("flashlab", "sdpa", "eager")
                                                           for s in (32, 64)]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["batch"] * r["seqlen"] == 128 for r in rows)
    saved = json.loads((tmp_path / "model_bench.json").read_text())
    assert saved["rows"] == rows and saved["environment"]["model"]["dim"] == TINY.dim
    assert (tmp_path / "model_bench.csv").read_text().splitlines()[0].startswith("backend,seqlen,batch,status")


@pytest.mark.gpu
def test_gpu_smoke_run_every_backend():
    """A 2-layer model at seqlen 1024 on the GPU: every backend gives a timed cell (or an honest OOM)."""
    rows = main(["--device", "cuda", "--layers", "2", "--seqlens", "1024", "--tokens", "2048"])
    assert {r["backend"] for r in rows} == {"flashlab", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                                            "sdpa-math", "eager"}
    ours = next(r for r in rows if r["backend"] == "flashlab")
    assert ours["status"] == "ok" and ours["tokens_per_s"] > 0 and ours["peak_gib"] > 0
    assert all(r["status"] in ("ok", "oom", "unsupported") for r in rows), rows
