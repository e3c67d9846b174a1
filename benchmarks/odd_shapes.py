"""Small and odd work on a GPU (issue 4, target 3): batch 1 with few heads, short sequences, head
dims 80/96/192, GQA 8:1 — flashlab against PyTorch's SDPA backends, measured in the same run.

    python benchmarks/odd_shapes.py --out DIR [--modes fwd fwd+bwd]

Timing and FLOPs as in kernel_check.py (``do_bench`` medians; 4·B·H·S²·D forward, causal halves,
fwd+bwd 3.5×). A backend that cannot run a case is recorded with its error. Rows go to
DIR/odd_shapes.json; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_check import bench, tflops  # benchmarks/ is the script's directory, hence on sys.path
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashlab

# (label, batch, seqlen, heads, kv_heads, head_dim)
CASES = [
    ("B1 H4 S512", 1, 512, 4, 4, 128),
    ("B1 H4 S1024", 1, 1024, 4, 4, 128),
    ("B1 H4 S4096", 1, 4096, 4, 4, 128),
    ("B1 H8 S2048 d64", 1, 2048, 8, 8, 64),
    ("d80 B4 S4096", 4, 4096, 16, 16, 80),
    ("d96 B4 S4096", 4, 4096, 16, 16, 96),
    ("d192 B4 S4096", 4, 4096, 8, 8, 192),
    ("d80 ragged 3x1537", 3, 1537, 16, 16, 80),
    ("GQA 8:1 B4 S4096", 4, 4096, 32, 4, 128),
    ("GQA 8:1 B1 S1024", 1, 1024, 32, 4, 128),
]
BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def providers(q, k, v, causal: bool) -> dict:
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
        return run

    return {"flashlab": lambda: flashlab.flash_attn_func(q, k, v, causal=causal),
            **{name: sdpa(b) for name, b in BACKENDS.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [{"kind": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "time": time.ctime()}]
    t0 = time.time()
    for (label, b, s, h, hk, d), causal, mode in ((c, causal, m) for c in CASES for causal in (False, True)
                                                   for m in args.modes):
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn_like(q)
        for name, fn in providers(q, k, v, causal).items():
            row = {"kind": "time", "case": label, "causal": causal, "mode": mode, "provider": name}
            try:
                ms = bench(fn, mode, g if name == "flashlab" else g.transpose(1, 2), (q, k, v))
                rows.append({**row, "ms": ms, "tflops": tflops(b, h, s, d, causal, mode, ms)})
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this case
                rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        (args.out / "odd_shapes.json").write_text(json.dumps(rows, indent=1))
    names = ["flashlab", *BACKENDS]
    print(f"{'case':<20} {'mask':>6} {'mode':>8} | " + " ".join(f"{n:>14}" for n in names)
          + " | vs flash | vs best SDPA")
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["kind"] == "time":
            cells.setdefault((r["case"], r["causal"], r["mode"]), {})[r["provider"]] = r.get("tflops", math.nan)
    for (label, causal, mode), vals in cells.items():
        best = max((vals.get(n, math.nan) for n in BACKENDS if not math.isnan(vals.get(n, math.nan))),
                   default=math.nan)
        print(f"{label:<20} {'causal' if causal else 'full':>6} {mode:>8} | "
              + " ".join(f"{vals.get(n, math.nan):>14.0f}" for n in names)
              + f" | {vals.get('flashlab', math.nan) / vals.get('sdpa-flash', math.nan):>7.2f}x"
              + f" | {vals.get('flashlab', math.nan) / best:.2f}x")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
