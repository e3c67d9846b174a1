"""GPU check of flashlab's kernels: correctness at real sizes, then speed against PyTorch's SDPA
backends measured in the same run (the FlashAttention grid: 16k tokens, heads × head_dim = 2048).

    python benchmarks/kernel_check.py --out DIR [--tune] [--seqlens 2048 8192 16384] [--fwd-tma]

``--tune`` also times tile-config variants of flashlab (monkeypatched, same run); ``--fwd-tma``
checks and times the TMA forward experiment (``FLASHLAB_FWD_TMA=1``, kernels/forward_tma.py) as
the provider ``flashlab-tma``; ``--tl`` the portable `tl` kernels where Hopper's default is Gluon
(``FLASHLAB_FWD_GLUON=0`` and ``FLASHLAB_BWD_GLUON=0`` for the whole step) as ``flashlab-tl``;
``--unfused`` the Gluon backward's two kernels where the fused one is the default
(``FLASHLAB_BWD_FUSED=0``) as ``flashlab-unfused``.
Prints a short table last; full rows go to DIR/kernel_check.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashlab
import flashlab.ops as ops
from flashlab.kernels.configs import TileConfig
from flashlab.reference import accuracy_check, naive_attention, reference_attention


def with_env(fn, name: str, value: str):
    """``fn`` run with the environment variable ``name`` set to ``value`` (restored after)."""
    def run():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return run


def check_correctness(rows: list[dict], label: str = "") -> bool:
    ok_all = True
    cases = [  # B, Sq, Sk, H, Hk, D, causal, dtype
        (2, 1024, 1024, 8, 8, 64, False, torch.bfloat16),
        (2, 1024, 1024, 8, 8, 128, True, torch.float16),
        (1, 113, 203, 6, 2, 80, True, torch.bfloat16),
        (1, 203, 113, 6, 2, 80, True, torch.float16),
        (1, 2048, 2048, 4, 1, 256, True, torch.bfloat16),
        (3, 517, 1031, 4, 2, 96, False, torch.float16),
        (1, 4096, 4096, 2, 2, 192, False, torch.bfloat16),
        (1, 1, 4097, 4, 4, 40, True, torch.float16),
    ]
    for b, sq, sk, h, hk, d, causal, dtype in cases:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype, requires_grad=True)
        out = flashlab.flash_attn_func(q, k, v, causal=causal)
        ref = reference_attention(q, k, v, causal=causal)
        low = naive_attention(q, k, v, causal=causal)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        rgrads = torch.autograd.grad(ref, (q, k, v), g.float())
        lgrads = torch.autograd.grad(low, (q, k, v), g)
        checks = [accuracy_check(out, ref, low)] + [
            accuracy_check(a, r, lo, factor=3) for a, r, lo in zip(grads, rgrads, lgrads)
        ]
        ok = all(c.ok for c in checks)
        ok_all &= ok
        name = f"{label}B{b}-S{sq}x{sk}-H{h}:{hk}-D{d}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"
        print(f"{'ok  ' if ok else 'FAIL'} {name}: " + "; ".join(f"{c.max_error:.2e}/{c.allowed:.2e}" for c in checks))
        rows.append({"kind": "correctness", "case": name, "ok": ok, "checks": [str(c) for c in checks]})
    return ok_all


def tflops(b: int, h: int, s: int, d: int, causal: bool, mode: str, ms: float) -> float:
    flops = 4 * b * h * s * s * d / (2 if causal else 1) * {"fwd": 1.0, "fwd+bwd": 3.5, "bwd": 2.5}[mode]
    return flops / ms / 1e9


CUDA_GRAPHS = False  # --cudagraph: time forward replays of a captured CUDA graph (no host launch cost)


def bench(fn, mode: str, out_grad: torch.Tensor | None, inputs) -> float:
    if mode == "fwd":
        if CUDA_GRAPHS:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def step():
        o = fn()
        torch.autograd.grad(o, inputs, out_grad)

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


FWD_TMA = False  # --fwd-tma: also the TMA forward experiment, as the provider "flashlab-tma"
TL = False  # --tl: also the `tl` kernels with the Gluon ones switched off, as the provider "flashlab-tl"
# Providers that run flashlab under switches for the whole timed step (forward and backward).
PROVIDER_ENV = {"flashlab-tl": {"FLASHLAB_FWD_GLUON": "0", "FLASHLAB_BWD_GLUON": "0"},
                "flashlab-unfused": {"FLASHLAB_BWD_FUSED": "0"}}
UNFUSED = False  # --unfused: also "flashlab-unfused"


def under_env(fn, env: dict[str, str]):
    """``fn`` run with every switch of ``env`` set (each restored after)."""
    for name, value in env.items():
        fn = with_env(fn, name, value)
    return fn


def providers(q, k, v, causal):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return run

    found = {
        "flashlab": lambda: flashlab.flash_attn_func(q, k, v, causal=causal),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    if FWD_TMA:
        found["flashlab-tma"] = with_env(found["flashlab"], "FLASHLAB_FWD_TMA", "1")
    if TL:
        found["flashlab-tl"] = found["flashlab"]  # time_grid sets its switches around the whole step
    if UNFUSED:
        found["flashlab-unfused"] = found["flashlab"]
    return found


def time_grid(rows: list[dict], seqlens: list[int], head_dims: list[int], modes: list[str], dtype) -> None:
    for d, causal, s, mode in itertools.product(head_dims, (False, True), seqlens, modes):
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
        for name, fn in providers(q, k, v, causal).items():
            try:
                grad = g if name.startswith("flashlab") else g.transpose(1, 2)
                timed = functools.partial(bench, fn, mode, grad, (q, k, v))
                ms = under_env(timed, PROVIDER_ENV.get(name, {}))()
                rows.append({"kind": "time", "provider": name, "d": d, "causal": causal, "seqlen": s, "mode": mode,
                             "ms": ms, "tflops": tflops(b, h, s, d, causal, mode, ms)})
            except Exception as e:  # a backend that cannot run this case
                rows.append({"kind": "time", "provider": name, "d": d, "causal": causal, "seqlen": s, "mode": mode,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})


FWD_VARIANTS = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
          (64, 128, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
}
BWD_VARIANTS = {  # (dK/dV kernel: streamed BLOCK_M, owned BLOCK_N), (dQ kernel: owned BLOCK_M, streamed BLOCK_N)
    64: [((32, 128, 4, 3), (128, 32, 4, 3)), ((32, 128, 4, 2), (128, 32, 4, 2)), ((64, 128, 8, 2), (128, 64, 8, 2)),
         ((32, 128, 8, 3), (128, 32, 8, 3)), ((64, 64, 4, 3), (64, 64, 4, 3)),
         ((32, 128, 8, 3), (64, 64, 8, 2)),  # fewest spills by ptxas (perf-notes round 3)
         # spill-free causal dK/dV tiles of the corrected report (perf-notes round 4, experiment 6)
         ((64, 128, 8, 1), (128, 32, 4, 3)), ((32, 128, 8, 2), (128, 32, 4, 3)),
         # 64-row query tiles with 3 stages: no dK/dV spills by ptxas, plain or causal (round 6)
         ((64, 128, 8, 3), (128, 32, 4, 3)), ((64, 128, 8, 3), (128, 64, 8, 3))],
    128: [((64, 128, 8, 2), (128, 64, 8, 2)), ((32, 128, 8, 3), (128, 32, 8, 3)), ((64, 64, 4, 3), (64, 64, 4, 3)),
          ((32, 64, 4, 3), (64, 32, 4, 3)), ((64, 64, 8, 3), (64, 64, 8, 2)), ((64, 64, 8, 2), (64, 64, 8, 2)),
          ((64, 32, 8, 1), (128, 64, 8, 2)), ((64, 32, 8, 2), (128, 64, 8, 2)), ((32, 128, 8, 1), (128, 64, 8, 2)),
          ((16, 128, 8, 2), (128, 64, 8, 2)),
          # 3 stages: dK/dV spills 76/516 -> 120/256 B (plain/causal); 16 warps halve each thread's
          # share of the fp32 dK/dV accumulators (128 registers a thread; round 6)
          ((64, 128, 8, 3), (128, 64, 8, 2)), ((64, 128, 16, 3), (128, 64, 8, 2)),
          ((64, 128, 16, 2), (128, 64, 8, 2))],
    256: [((32, 32, 8, 1), (32, 32, 8, 1)), ((32, 64, 8, 2), (64, 32, 8, 2)), ((64, 64, 8, 1), (64, 64, 8, 1)),
          ((32, 64, 4, 2), (64, 32, 4, 2)), ((16, 64, 4, 2), (64, 16, 4, 2)), ((32, 128, 8, 1), (128, 32, 8, 1)),
          ((64, 64, 8, 2), (64, 64, 8, 2)), ((64, 64, 8, 2), (64, 32, 4, 2)),
          ((64, 32, 8, 1), (64, 64, 8, 2)), ((32, 32, 8, 2), (64, 64, 8, 2)), ((32, 32, 8, 3), (64, 64, 8, 2)),
          ((64, 64, 16, 2), (64, 32, 4, 2))],
}


def _time_config(rows: list[dict], kind: str, cfg, case: dict, fn, mode: str, g, inputs, base_ms: float) -> None:
    """Times one monkeypatched tile config; a config that fails to compile is recorded, not raised."""
    try:
        ms = bench(fn, mode, g, inputs) - base_ms
        work = "fwd" if kind == "tune-fwd" else "bwd"
        rows.append({"kind": kind, "cfg": str(cfg), **case, "ms": ms,
                     "tflops": tflops(case["b"], case["h"], case["seqlen"], case["d"], case["causal"], work, ms)})
    except Exception as e:
        rows.append({"kind": kind, "cfg": str(cfg), **case, "error": f"{type(e).__name__}: {str(e)[:200]}"})


def _print_tune_row(r: dict) -> None:
    print(r["kind"], r["d"], r["seqlen"], "causal" if r["causal"] else "full",
          f"dropout {r['dropout_p']}" if "dropout_p" in r else "", r["cfg"],
          f"{r['tflops']:.0f}" if "tflops" in r else r["error"], flush=True)


def tune(rows: list[dict], seqlens: list[int], head_dims: list[int], dtype, kinds: tuple[str, ...],
         dropout_p: float = 0.0) -> None:
    """Time each tile variant (rows printed as they come, so a cut run still reports); with
    ``dropout_p`` the timed calls use dropout (its own tile question: the dK/dV kernel spills)."""
    orig_f, orig_b = ops.forward_config, ops.backward_config
    try:
        for d, causal, seqlen in itertools.product(head_dims, (False, True), seqlens):
            case = {"d": d, "causal": causal, "seqlen": seqlen, "b": 16384 // seqlen, "h": 2048 // d}
            if dropout_p:
                case["dropout_p"] = dropout_p
            q, k, v = (torch.randn(case["b"], seqlen, case["h"], d, device="cuda", dtype=dtype, requires_grad=True)
                       for _ in range(3))
            g = torch.randn_like(q)
            fn = providers(q, k, v, causal)["flashlab"]
            if dropout_p:
                fn = lambda q=q, k=k, v=v, c=causal: flashlab.flash_attn_func(q, k, v, causal=c, dropout_p=dropout_p)  # noqa: E731
            key = min(x for x in FWD_VARIANTS if x >= d)
            for cfg in map(lambda c: TileConfig(*c), FWD_VARIANTS[key] if "fwd" in kinds else []):
                ops.forward_config = lambda *a, cfg=cfg: cfg
                _time_config(rows, "tune-fwd", cfg, case, fn, "fwd", None, None, 0.0)
                _print_tune_row(rows[-1])
            ops.forward_config = orig_f
            fwd_ms = bench(fn, "fwd", None, None)
            for pair in BWD_VARIANTS[key] if "bwd" in kinds else []:
                cfgs = tuple(TileConfig(*c) for c in pair)
                ops.backward_config = lambda *a, cfgs=cfgs: cfgs
                _time_config(rows, "tune-bwd", cfgs, case, fn, "fwd+bwd", g, (q, k, v), fwd_ms)
                _print_tune_row(rows[-1])
            ops.backward_config = orig_b
    finally:
        ops.forward_config, ops.backward_config = orig_f, orig_b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-seqlens", type=int, nargs="+", default=[8192])
    ap.add_argument("--tune-head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--tune-kinds", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    ap.add_argument("--tune-dropout", type=float, default=0.0, help="tune with this dropout_p")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--cudagraph", action="store_true", help="time forwards as CUDA graph replays")
    ap.add_argument("--fwd-tma", action="store_true", help="also check and time the TMA forward experiment")
    ap.add_argument("--tl", action="store_true", help="also check and time the `tl` kernels with Gluon off")
    ap.add_argument("--unfused", action="store_true", help="also time the two-kernel Gluon backward")
    args = ap.parse_args()
    global CUDA_GRAPHS, FWD_TMA, TL, UNFUSED
    CUDA_GRAPHS, FWD_TMA, TL, UNFUSED = args.cudagraph, args.fwd_tma, args.tl, args.unfused
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [{"kind": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(), "time": time.ctime()}]
    dump = lambda: (args.out / "kernel_check.json").write_text(json.dumps(rows, indent=1))  # noqa: E731
    t0 = time.time()
    if not args.skip_correctness:
        ok = check_correctness(rows)
        if FWD_TMA:
            ok &= with_env(lambda: check_correctness(rows, "tma "), "FLASHLAB_FWD_TMA", "1")()
        if TL:
            ok &= under_env(lambda: check_correctness(rows, "tl "), PROVIDER_ENV["flashlab-tl"])()
        print("correctness:", "PASS" if ok else "FAIL", f"({time.time() - t0:.0f}s)")
    dump()
    if args.tune:
        tune(rows, args.tune_seqlens, args.tune_head_dims, torch.float16, tuple(args.tune_kinds), args.tune_dropout)
        dump()
        print(f"tune done ({time.time() - t0:.0f}s)")
    time_grid(rows, args.seqlens, args.head_dims, args.modes, torch.float16)
    dump()
    shown = ("flashlab", *(("flashlab-tma",) if FWD_TMA else ()), *(("flashlab-tl",) if TL else ()),
             *(("flashlab-unfused",) if UNFUSED else ()), "sdpa-flash", "sdpa-cudnn")
    print(f"{'d':>4} {'mask':>6} {'seqlen':>6} {'mode':>8} | " + " ".join(f"{p:>12}" for p in shown) + " | vs flash")
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["kind"] == "time":
            cell = table.setdefault((r["d"], r["causal"], r["seqlen"], r["mode"]), {})
            cell[r["provider"]] = r.get("tflops", math.nan)
    for (d, causal, s, mode), vals in table.items():
        ratio = vals.get("flashlab", math.nan) / vals.get("sdpa-flash", math.nan)
        print(f"{d:>4} {'causal' if causal else 'full':>6} {s:>6} {mode:>8} | "
              + " ".join(f"{vals.get(p, math.nan):>12.0f}" for p in shown)
              + f" | {ratio:.2f}x")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
