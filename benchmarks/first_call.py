"""First-call time of flashlab on a GPU: the compile a user pays once, then the cached start.

    python benchmarks/first_call.py [--head-dims 64 128 256] [--seqlen 1024] [--out DIR]

Each measurement runs in a fresh process with its own Triton cache folder: "cold" is the first
call with an empty cache (JIT compile of every kernel it launches), "cached" is the first call of a
new process whose cache that cold run filled (what every later program start pays). Forward, then
forward + backward, bf16, 16 heads, batch 2 at seqlen 1024 (16k tokens a batch from 8192 on: batch
1 at 16384; from 8192 at head dim 128 the causal backward is the fused kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(head_dim: int, causal: bool, seqlen: int) -> dict[str, float]:
    import torch

    import flashlab

    batch = 2 if seqlen < 8192 else max(16384 // seqlen, 1)
    q, k, v = (torch.randn(batch, seqlen, 16, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.sum().backward()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"fwd_s": t1 - t0, "bwd_s": t2 - t1}


def _run(head_dim: int, causal: bool, seqlen: int, cache: str) -> dict[str, float]:
    env = {**os.environ, "TRITON_CACHE_DIR": cache}
    p = subprocess.run([sys.executable, __file__, "--worker", str(head_dim), str(int(causal)), str(seqlen)], env=env,
                       capture_output=True, text=True, timeout=600, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(int(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    print(f"{'d':>4} {'mask':>6} | {'cold fwd':>9} {'cold bwd':>9} | {'cached fwd':>10} {'cached bwd':>10}  (s)")
    for d in args.head_dims:
        for causal in (False, True):
            with tempfile.TemporaryDirectory() as cache:
                cold, cached = _run(d, causal, args.seqlen, cache), _run(d, causal, args.seqlen, cache)
            rows.append({"head_dim": d, "causal": causal, "seqlen": args.seqlen, "cold": cold, "cached": cached})
            print(f"{d:>4} {'causal' if causal else 'full':>6} | {cold['fwd_s']:>9.2f} {cold['bwd_s']:>9.2f} | "
                  f"{cached['fwd_s']:>10.3f} {cached['bwd_s']:>10.3f}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "first_call.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
