"""Why do gradients differ under torch.compile (Inductor) on a GPU? Runs scenarios eagerly and
compiled under variants, each in a fresh process, and prints the largest gradient difference.

    python benchmarks/compile_probe.py [--out DIR]

Variants: ``base``; ``nopad`` (Inductor's shape and comprehensive padding off); ``contig`` (every
tensor input of the attention backward made contiguous before the launch); ``both``. On an H200
(torch 2.11, 2026-11-29), before ops._backward copied q, k, v under compile, ``base`` and ``nopad``
gave wrong gradients (MHA with a padding mask) or a device fault (packed qkv); ``contig`` fixed both. With --out, the
base variant's Inductor output code is written there (output_code.log) for reading the launches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCENARIOS = ("mha-padding-mask", "block-packed-qkv", "block-separate-qkv")
VARIANTS = ("base", "nopad", "contig", "both")


def _scenario(name: str):
    """(fn, inputs) with parameters inside fn; inputs require grad."""
    import torch

    import flashlab

    dev, f16 = "cuda", torch.float16
    torch.manual_seed(0)
    if name == "mha-padding-mask":
        mha = flashlab.MultiheadAttention(32, 2, batch_first=True, dtype=f16, device=dev)
        pad = torch.zeros(2, 12, dtype=torch.bool, device=dev)
        pad[1, 9:] = True
        x = torch.randn(2, 12, 32, dtype=f16, device=dev, requires_grad=True)
        return (lambda x: mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]), (x,)
    if name.startswith("block"):
        dim, heads = 2048, 16
        qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.bfloat16, device=dev)
        out = torch.nn.Linear(dim, dim, dtype=torch.bfloat16, device=dev)
        packed = name == "block-packed-qkv"

        def block(x):
            b, s, d = x.shape
            t = qkv(x).view(b, s, 3, heads, d // heads)
            q, k, v = t.unbind(2) if packed else (u.contiguous() for u in t.unbind(2))
            return x + out(flashlab.flash_attn_func(q, k, v, causal=True).reshape(b, s, d))

        x = torch.randn(2, 2048, dim, dtype=torch.bfloat16, device=dev, requires_grad=True)
        return block, (x,)
    raise ValueError(f"unknown scenario {name!r}")


def run_one(scenario: str, variant: str) -> dict:
    import torch

    import flashlab.ops as ops

    if variant in ("nopad", "both"):
        torch._inductor.config.shape_padding = False
        torch._inductor.config.comprehensive_padding = False
    if variant in ("contig", "both"):
        original = ops.attn_bwd

        def contiguous_bwd(*args):
            return original(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))

        ops.attn_bwd = contiguous_bwd
    fn, inputs = _scenario(scenario)
    want = fn(*inputs)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, inputs, g)
    got = torch.compile(fn, fullgraph=True)(*inputs)
    got_grads = torch.autograd.grad(got, inputs, g)
    torch.cuda.synchronize()
    return {"out": (got - want).abs().max().item(),
            "grad": max((a.float() - b.float()).abs().max().item() for a, b in zip(got_grads, want_grads)),
            "grad_scale": max(b.float().abs().max().item() for b in want_grads)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2], sys.argv[3])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def probe(job: tuple[str, str]) -> dict:
        scenario, variant = job
        env = dict(os.environ)
        if args.out and variant == "base":
            env["TORCH_LOGS"] = "output_code"
        p = subprocess.run([sys.executable, __file__, "--one", scenario, variant], capture_output=True,
                           text=True, env=env, timeout=400)
        if args.out and variant == "base":
            (args.out / f"output_code-{scenario}.log").write_text(p.stderr)
        if p.returncode == 0:
            r = json.loads(p.stdout.strip().splitlines()[-1])
            line = f"out diff {r['out']:.3g}  grad diff {r['grad']:.3g} (grad max {r['grad_scale']:.3g})"
        else:
            r = {"error": p.stderr[-2000:]}
            line = "ERROR " + p.stderr.strip().splitlines()[-1][:140]
        print(f"{scenario:<20} {variant:<7} {line}", flush=True)
        return {"scenario": scenario, "variant": variant, **r}

    # One process per run (compiles dominate; a failure stays in its process), several at once.
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(probe, itertools.product(SCENARIOS, args.variants)))
    if args.out:
        (args.out / "compile_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
