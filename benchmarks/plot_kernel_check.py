"""Tables and a figure from a kernel_check.json (committed results → docs/performance.md).

    python benchmarks/plot_kernel_check.py benchmarks/results/h100-kernel-check-round2.json \
        --figure docs/figures/kernel-check-h100.png

Prints one markdown table per mode (TFLOP/s per provider and flashlab's ratio to SDPA-flash).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("flashlab", "flashlab-tl", "flashlab-unfused", "flashlab-tma", "sdpa-flash", "sdpa-cudnn")


def providers(cells: dict[tuple, dict[str, float]]) -> list[str]:
    """The providers the results hold, in ORDER."""
    return [p for p in ORDER if any(p in v for v in cells.values())]


def load(path: Path) -> dict[tuple, dict[str, float]]:
    """(head_dim, causal, seqlen, mode) -> {provider: TFLOP/s}."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in json.loads(path.read_text()):
        if r["kind"] == "time" and "tflops" in r:
            cells.setdefault((r["d"], r["causal"], r["seqlen"], r["mode"]), {})[r["provider"]] = r["tflops"]
    return cells


def markdown(cells: dict[tuple, dict[str, float]], mode: str) -> str:
    shown = providers(cells)
    lines = ["| head dim | mask | seqlen | " + " | ".join(shown) + " | vs SDPA-flash | vs cuDNN |",
             "|---:|---|---:|" + "---:|" * (len(shown) + 2)]
    for (d, causal, s, m), v in sorted(cells.items()):
        if m != mode:
            continue
        vals = " | ".join(f"{v[p]:.0f}" if p in v else "–" for p in shown)
        lines.append(f"| {d} | {'causal' if causal else 'full'} | {s} | {vals} | "
                     f"{v['flashlab'] / v['sdpa-flash']:.2f}× | {v['flashlab'] / v['sdpa-cudnn']:.2f}× |")
    return "\n".join(lines)


def figure(cells: dict[tuple, dict[str, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({k[3] for k in cells}, key=["fwd", "fwd+bwd"].index)
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        keys = sorted(k for k in cells if k[3] == mode)
        shown = providers(cells)
        width = 0.8 / len(shown)
        for i, p in enumerate(shown):
            ax.bar([x + i * width for x in range(len(keys))], [cells[k].get(p, 0) for k in keys], width, label=p)
        ax.set_xticks([x + width for x in range(len(keys))])
        ax.set_xticklabels([f"d{d} {'c' if c else 'f'}\n{s // 1024}k" for d, c, s, _ in keys], fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{title} — {mode}")
        ax.legend(fontsize=8, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args()
    cells = load(args.results)
    env = json.loads(args.results.read_text())[0]
    for mode in ("fwd", "fwd+bwd"):
        print(f"\n**{mode}** (TFLOP/s, fp16, 16k tokens, heads × head dim = 2048)\n")
        print(markdown(cells, mode))
    if args.figure:
        title = f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}"
        figure(cells, args.figure, title)


if __name__ == "__main__":
    main()
