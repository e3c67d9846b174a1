"""End to end: a decoder model's training step (forward + backward) with each attention backend.

    python -m flashlab.lab.model_bench --out benchmarks/results/model-h100          # GPU: the real grid
    python -m flashlab.lab.model_bench --tiny                                        # CPU: a small model, seconds

Every backend runs the same random-weight Llama-style decoder (``decoder.py``: 8 layers, width
2048, 16 heads of 128, SwiGLU 5632, vocab 32000 by default) at a fixed number of tokens per step
(``--tokens``; batch = tokens // seqlen), bf16. Reported per (backend, seqlen): median step time
with quartiles, tokens/s, and peak memory of one step; a backend that runs out of memory or cannot
run the shape is recorded as such and the sweep goes on. Results go to ``model_bench.json`` and
``model_bench.csv`` (with the environment header) in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flashlab.lab import measure
from flashlab.lab.decoder import BACKENDS, Decoder, DecoderConfig, backend_context

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TINY = DecoderConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, ffn=128)
FIELDS = ("backend", "seqlen", "batch", "status", "step_ms", "step_q25_ms", "step_q75_ms", "tokens_per_s",
          "peak_gib", "message")


def _cpu_backends(backends: Sequence[str]) -> list[str]:
    # On CPU PyTorch has one SDPA backend (its own choice); the restricted ones are CUDA-only.
    return [b for b in backends if b in ("flashlab", "sdpa", "eager")]


def measure_step(model: Decoder, backend: str, batch: int, seqlen: int, device: torch.device) -> dict[str, Any]:
    """One (backend, seqlen) cell: time and peak memory of ``loss(ids).backward()``."""
    row: dict[str, Any] = {"backend": backend, "seqlen": seqlen, "batch": batch}
    ids = torch.randint(0, model.cfg.vocab, (batch, seqlen + 1), device=device)
    params = list(model.parameters())

    def step() -> None:
        with backend_context(backend):
            model.loss(ids).backward()

    try:
        if device.type == "cuda":
            timing = measure.time_cuda(step, device, grad_to_none=params, warmup_ms=50.0, rep_ms=500.0, min_reps=3)
            peak, _ = measure.peak_cuda(step, device, grad_to_none=params)
            row["peak_gib"] = round(peak / 2**30, 3)
        else:
            timing = measure.time_cpu(step, grad_to_none=params, warmup=1, min_reps=2, budget_s=0.5)
            row["peak_gib"] = None  # no allocator statistics on the CPU
    except Exception as exc:  # an OOM or an unsupported shape is a result, not a crash
        row["status"], row["message"] = measure.classify(exc)
        measure.free_memory(device)
        return row
    row.update(status="ok", step_ms=round(timing.median_ms, 3), step_q25_ms=round(timing.q25_ms, 3),
               step_q75_ms=round(timing.q75_ms, 3), tokens_per_s=round(batch * seqlen / timing.median_ms * 1e3, 1))
    return row


def run(cfg: DecoderConfig, backends: Sequence[str], seqlens: Sequence[int], tokens: int, device: torch.device,
        dtype: torch.dtype, compile_model: bool = False) -> list[dict[str, Any]]:
    """Rows of the sweep: every backend × seqlen, the same weights for every backend."""
    rows = []
    for backend in backends:
        torch.manual_seed(0)
        model = Decoder(cfg, backend, device=device, dtype=dtype)
        runner = torch.compile(model) if compile_model else model
        for seqlen in seqlens:
            batch = max(1, tokens // seqlen)
            row = measure_step(runner, backend, batch, seqlen, device)  # type: ignore[arg-type]
            rows.append(row)
            print(_format(row), flush=True)
        del model, runner
        measure.free_memory(device)
    return rows


def _format(row: dict[str, Any]) -> str:
    head = f"{row['backend']:>15}  seqlen {row['seqlen']:>6}  batch {row['batch']:>3}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}: {row.get('message', '')}"
    peak = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "n/a"
    return f"{head}  {row['step_ms']:>10.1f} ms  {row['tokens_per_s']:>10.0f} tok/s  peak {peak}"


def write(rows: list[dict[str, Any]], header: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_bench.json").write_text(json.dumps({"environment": header, "rows": rows}, indent=1))
    with open(out / "model_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in FIELDS} for row in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashlab.lab.model_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--seqlens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens // seqlen)")
    p.add_argument("--layers", type=int, default=DecoderConfig.layers)
    p.add_argument("--dim", type=int, default=DecoderConfig.dim)
    p.add_argument("--heads", type=int, default=DecoderConfig.heads)
    p.add_argument("--kv-heads", type=int, default=DecoderConfig.kv_heads)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (every backend)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model at seqlen 32 and 64, 128 tokens "
                   "per step (CPU smoke run; overrides the shape flags)")
    p.add_argument("--out", type=Path, default=None, help="directory for model_bench.json / .csv")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    from flashlab.lab.env import environment, pick_device

    device = pick_device(args.device)
    for name in ("tokens", "layers", "dim", "heads", "kv_heads"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.tiny:
        cfg, seqlens, tokens = TINY, [32, 64], 128
    else:
        cfg = DecoderConfig(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
        seqlens, tokens = args.seqlens, args.tokens
    backends = args.backends if device.type == "cuda" else _cpu_backends(args.backends)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float16  # Triton's interpreter has no bf16
    header = {**environment(device), "model": cfg.__dict__, "dtype": str(dtype), "tokens_per_step": tokens,
              "compiled": args.compile}
    rows = run(cfg, backends, seqlens, tokens, device, dtype, compile_model=args.compile)
    if args.out is not None:
        write(rows, header, args.out)
        print(f"wrote {args.out / 'model_bench.json'} and model_bench.csv")
    return rows


if __name__ == "__main__":
    main()
