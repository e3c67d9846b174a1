"""Which tile configs fault or miscompute on which shapes? Each (config, case) runs in a fresh
process with CUDA_LAUNCH_BLOCKING=1, because a faulting kernel poisons its CUDA context.

    python benchmarks/config_probe.py [--out DIR] [--jobs N]

Edit EXPERIMENTS to probe other configs; prints one line per experiment (ok / error / accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# (name, forward config or None for the default, backward config pair or None, case, run backward)
# case: batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal
D192_TAIL = (1, 777, 777, 8, 1, 192, False)
D256_TAIL = (1, 777, 777, 8, 1, 256, False)
FAST_FWD = (128, 64, 8, 2)  # the Hopper wide-head forward tile, today used only on tile-aligned shapes
FAST_BWD = ((64, 64, 8, 2), (64, 64, 8, 2))  # likewise for the backward
SAFE_FWD = (64, 32, 4, 2)
EXPERIMENTS = [
    ("fwd default, d192 tail", None, None, D192_TAIL, False),
    ("fwd fast, d192 tail", FAST_FWD, None, D192_TAIL, False),
    ("fwd fast, d192 tail causal", FAST_FWD, None, (1, 777, 777, 8, 1, 192, True), False),
    ("fwd fast, d256 tail", FAST_FWD, None, D256_TAIL, False),
    ("fwd fast, d160 tail", FAST_FWD, None, (1, 1537, 1537, 2, 2, 160, False), False),
    ("fwd fast, d192 seqlen 1", FAST_FWD, None, (2, 1, 300, 6, 2, 192, False), False),
    ("fwd fast, d192 no tail", FAST_FWD, None, (1, 1024, 1024, 8, 1, 192, False), False),
    ("bwd default, d192 tail", None, None, D192_TAIL, True),
    ("bwd fast, d192 tail", SAFE_FWD, FAST_BWD, D192_TAIL, True),
    ("bwd fast, d256 tail", SAFE_FWD, FAST_BWD, D256_TAIL, True),
    ("bwd fast, d192 tail causal", SAFE_FWD, FAST_BWD, (1, 777, 777, 8, 1, 192, True), True),
    ("fwd+bwd fast, d256 113x203", FAST_FWD, FAST_BWD, (2, 113, 203, 6, 2, 256, True), True),
]


def run_one(spec: dict) -> dict:
    import torch

    import flashlab
    import flashlab.ops as ops
    from flashlab.kernels.configs import TileConfig
    from flashlab.reference import accuracy_check, naive_attention, reference_attention

    if spec["fwd"]:
        ops.forward_config = lambda *a: TileConfig(*spec["fwd"])
    if spec["bwd"]:
        ops.backward_config = lambda *a: tuple(TileConfig(*c) for c in spec["bwd"])
    b, sq, sk, h, hk, d, causal = spec["case"]
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    torch.cuda.synchronize()
    checks = [accuracy_check(out, reference_attention(q, k, v, causal=causal), naive_attention(q, k, v, causal=causal))]
    if spec["bwd"] is not None or spec["backward"]:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        torch.cuda.synchronize()
        want = torch.autograd.grad(reference_attention(q, k, v, causal=causal), (q, k, v), g.float())
        same = torch.autograd.grad(naive_attention(q, k, v, causal=causal), (q, k, v), g)
        checks += [accuracy_check(a, r, s, factor=3) for a, r, s in zip(got, want, same)]
    return {"ok": all(c.ok for c in checks), "checks": [str(c) for c in checks]}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_one(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--jobs", type=int, default=4, help="probes run at once")
    args = ap.parse_args()
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}

    def probe(exp: tuple) -> dict:
        name, fwd, bwd, case, backward = exp
        spec = {"fwd": fwd, "bwd": bwd, "case": case, "backward": backward}
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                           env=env, timeout=300)
        if p.returncode == 0:
            res = json.loads(p.stdout.strip().splitlines()[-1])
            line = ("ok   " if res["ok"] else "WRONG") + " " + "; ".join(res["checks"])
        else:
            err = [x for x in p.stderr.splitlines() if "Error" in x or "error" in x]
            where = [x.strip() for x in p.stderr.splitlines() if "_kernel" in x]  # the launch that faulted
            res = {"ok": False, "stderr": p.stderr[-3000:]}
            line = "FAULT " + (err[-1][:120] if err else p.stderr[-120:]) + (f" at {where[-1][:80]}" if where else "")
        print(f"{name:<32} {line}", flush=True)
        return {"name": name, **spec, **res}

    # Separate processes (a fault poisons its context); several at once, since compiling dominates.
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(probe, EXPERIMENTS))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
