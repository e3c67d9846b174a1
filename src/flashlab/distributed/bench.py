"""Benchmark ring attention across GPUs (or CPU processes); launch it with torchrun.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 -m flashlab.distributed.bench \\
        --seqlen 131072 --heads 32 --kv-heads 8 --head-dim 128 --causal --json ring.json

Per method (ring, allgather) and mode (fwd, fwd+bwd), medians over ``--reps`` with a barrier
before each repetition:

  time         the ``ring_flash_attn_func`` call on each rank (the step time is the slowest rank's)
  compute      the same schedule without communication (every step reuses the local K/V)
  comm         the communication alone (the same sends/receives or collectives, no compute)
  exposed      max(0, time - compute): communication (and the per-call metadata exchange) not hidden
  hidden       max(0, comm - exposed), as a share of comm
  TFLOP/s/GPU  the global FLOPs (FlashAttention convention) / world size / time
  efficiency   t(one GPU, whole sequence, flash_attn_func) / (world size × step time)

NCCL: ``NCCL_NVLS_ENABLE`` defaults to 0 here (NVLink SHARP multicast is off on the shared
machines); export it to override. Without torchrun it runs as a single process (world size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from flashlab.distributed.api import ring_flash_attn_func
from flashlab.distributed.plan import METHODS, build_plan
from flashlab.distributed.ring import DkvSink, Ring, RingAttention, kv_source
from flashlab.distributed.sharding import SHARDINGS, shard_bounds
from flashlab.lab.flops import attention_flops

MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashlab.distributed.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, help="global sequence length (default 32768 on CUDA, 512 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="query heads (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA; default: heads)")
    p.add_argument("--head-dim", type=int, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--sharding", choices=SHARDINGS, help="default: zigzag when causal, else contiguous")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true", help="skip the one-GPU flash_attn_func baseline")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--json", help="write the rows (and the environment) to this file (rank 0)")
    return p


def _list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected a comma-separated list of {', '.join(allowed)}, got {value!r}")
    return items


def init_group(device: str) -> torch.device:
    """The default process group for ``device`` ("cuda": NCCL on LOCAL_RANK's GPU, multicast off unless
    set; "cpu": gloo); a plain run without torchrun is a world of one. Returns the device."""
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, default)  # a plain `python -m` run is a world of one
    if device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
        return dev
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], reps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _inputs(args: argparse.Namespace, seqlen: int, device: torch.device, grad: bool) -> tuple[torch.Tensor, ...]:
    dtype = DTYPES[args.dtype]
    def t(heads: int) -> torch.Tensor:
        return torch.randn(args.batch, seqlen, heads, args.head_dim, device=device, dtype=dtype).requires_grad_(grad)
    return t(args.heads), t(args.kv_heads), t(args.kv_heads), torch.randn(
        args.batch, seqlen, args.heads, args.head_dim, device=device, dtype=dtype)


def _step(fn: Callable[[], torch.Tensor], mode: str, dout: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        if mode == "fwd+bwd":
            out.backward(dout)
    return run


def _comm_only(ring: Ring, k: torch.Tensor, v: torch.Tensor, mode: str) -> Callable[[], None]:
    """The schedule's communication with no compute: K/V rotation (or all-gather), and for the
    backward the rotation again plus the dK/dV hops (or the reduce-scatter)."""
    @torch.no_grad()
    def run() -> None:
        for _ in kv_source(ring, k, v):
            pass
        if mode == "fwd+bwd":
            sink = DkvSink(ring, k)
            for step, _, _ in kv_source(ring, k, v):
                sink.add(step, [])
            sink.finish()
    return run


def _baseline_ms(args: argparse.Namespace, device: torch.device, mode: str) -> float | None:
    """flash_attn_func on the whole sequence on one device (each rank runs it on its own)."""
    from flashlab import flash_attn_func

    try:
        q, k, v, dout = _inputs(args, args.seqlen, device, mode == "fwd+bwd")
        ms = _median_ms(_step(lambda: flash_attn_func(q, k, v, causal=args.causal), mode, dout), args.reps,
                        args.warmup, device)
    except torch.OutOfMemoryError:
        ms = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms


def _measure_mode(args: argparse.Namespace, device: torch.device, mode: str, local: int) -> list[dict[str, Any]]:
    world, rank = dist.get_world_size(), dist.get_rank()
    baseline = None if args.no_baseline else _baseline_ms(args, device, mode)
    q, k, v, dout = _inputs(args, local, device, mode == "fwd+bwd")
    scale = args.head_dim ** -0.5
    fields = {"seqlen_q": local, "seqlen_k": local, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "dtype": q.dtype, "causal": args.causal, "sharding": args.sharding,
              "varlen": False, "batch": args.batch, "nseq": 1, "softmax_scale": scale}
    flops = attention_flops(args.batch, args.heads, args.seqlen, args.seqlen, args.head_dim, causal=args.causal,
                            mode=mode) / world
    rows = []
    for method in args.methods:
        plan = build_plan(None, None, {**fields, "method": method})
        ring, local_ring = Ring(None, plan, scale, method), Ring(None, plan, scale, "local")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        call = lambda m=method: ring_flash_attn_func(q, k, v, causal=args.causal, method=m, sharding=args.sharding)
        total = _median_ms(_step(call, mode, dout), args.reps, args.warmup, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        no_comm = lambda r=local_ring: RingAttention.apply(q, k, v, r)[0]
        compute = _median_ms(_step(no_comm, mode, dout), args.reps, args.warmup, device)
        comm = _median_ms(_comm_only(ring, k, v, mode), args.reps, args.warmup, device)
        exposed = max(0.0, total - compute)
        rows.append({"method": method, "mode": mode, "rank": rank, "time_ms": total, "compute_ms": compute,
                     "comm_ms": comm, "exposed_ms": exposed,
                     "hidden_share": max(0.0, comm - exposed) / comm if comm > 0 else None,
                     "tflops_per_gpu": flops / total / 1e9, "peak_gib": peak, "baseline_ms": baseline})
    return rows


def measure(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """This rank's rows, one per (method, mode)."""
    local = sum(b - a for a, b in shard_bounds(args.seqlen, dist.get_world_size(), dist.get_rank(), args.sharding))
    return [row for mode in args.modes for row in _measure_mode(args, device, mode, local)]


def summarize(rows: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """One row per (method, mode) over all ranks: the slowest rank sets the step time."""
    out = []
    for key in dict.fromkeys((r["method"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["method"], r["mode"]) == key]
        step = max(r["time_ms"] for r in group)
        base = group[0]["baseline_ms"]
        out.append({"method": key[0], "mode": key[1], "world_size": world, "step_ms": step,
                    "tflops_per_gpu": min(r["tflops_per_gpu"] for r in group),
                    "exposed_ms": max(r["exposed_ms"] for r in group),
                    "hidden_share": statistics.mean(r["hidden_share"] or 0.0 for r in group),
                    "baseline_ms": base, "speedup": base / step if base else None,
                    "efficiency": base / (world * step) if base else None,
                    "peak_gib": max((r["peak_gib"] or 0.0) for r in group) or None})
    return out


def _fmt(x: object, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def _print(rows: list[dict[str, Any]], summary: list[dict[str, Any]], env: dict[str, Any]) -> None:
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    head = ("method", "mode", "rank", "time_ms", "tflops_per_gpu", "compute_ms", "comm_ms", "exposed_ms",
            "hidden_share", "peak_gib")
    print("  ".join(f"{h:>14}" for h in head))
    for r in rows:
        print("  ".join(f"{_fmt(r[h]):>14}" for h in head))
    print()
    head = ("method", "mode", "world_size", "step_ms", "tflops_per_gpu", "exposed_ms", "hidden_share",
            "baseline_ms", "speedup", "efficiency")
    print("  ".join(f"{h:>14}" for h in head))
    for r in summary:
        print("  ".join(f"{_fmt(r[h]):>14}" for h in head))


def parse_args(argv: list[str] | None = None, cuda: bool | None = None) -> argparse.Namespace:
    """Parse the command line and fill the device-dependent defaults."""
    args = _parser().parse_args(argv)
    if cuda is None:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.seqlen = args.seqlen or (32768 if cuda else 512)
    args.heads = args.heads or (32 if cuda else 4)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (128 if cuda else 32)
    args.sharding = args.sharding or ("zigzag" if args.causal else "contiguous")
    args.methods = _list(args.methods, METHODS, "--methods")
    args.modes = _list(args.modes, MODES, "--modes")
    return args


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, in rank order (collective)."""
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    device_kind = args.device
    device = init_group(device_kind)
    try:
        all_rows = gather_rows(measure(args, device))
        if dist.get_rank() == 0:
            import triton

            env = {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "torch": torch.__version__,
                   "triton": triton.__version__, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                   "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE") if cuda else None}
            config = {k: v for k, v in vars(args).items() if k != "json"}
            summary = summarize(all_rows, dist.get_world_size())
            _print(all_rows, summary, env)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"env": env, "config": config, "rows": all_rows, "summary": summary}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
