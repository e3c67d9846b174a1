"""Matplotlib figures (Agg backend, PNG): one line per provider, out-of-memory points marked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

METRIC_LABELS = {
    "time_ms": ("time (ms)", True),
    "tflops": ("TFLOP/s", False),
    "mem_above_inputs_mb": ("peak memory above inputs (MiB)", True),
    "mem_peak_mb": ("peak memory, total (MiB)", True),
}


@dataclass
class Panel:
    """One subplot: x values, and per provider a list of (x, value or None, status)."""

    title: str
    xlabel: str
    series: dict[str, list[tuple[float, float | None, str]]] = field(default_factory=dict)


def draw(path: Path, title: str, metric: str, panels: list[Panel]) -> bool:
    """Draw ``panels`` side by side into ``path``; False when there is nothing to plot."""
    if not any(pt for p in panels for pts in p.series.values() for pt in pts):
        return False
    ylabel, log_y = METRIC_LABELS.get(metric, (metric, False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.4, 3.9), squeeze=False)
    providers = sorted({name for p in panels for name in p.series})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(providers)}
    any_oom = False
    for ax, panel in zip(axes[0], panels):
        xs_all: set[float] = set()
        oom_rank: dict[float, int] = {}
        trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        for name in providers:
            pts = sorted(panel.series.get(name, []))
            ok = [(x, y) for x, y, s in pts if s == "ok" and y is not None and y > 0]
            xs_all.update(x for x, _, _ in pts)
            if ok:
                ax.plot([x for x, _ in ok], [y for _, y in ok], marker="o", ms=4, color=colors[name], label=name)
            for x in (x for x, _, s in pts if s == "oom"):
                any_oom = True
                k = oom_rank[x] = oom_rank.get(x, -1) + 1  # stack markers of several providers
                y = 0.95 - 0.08 * k
                ax.scatter([x], [y], marker="x", s=50, color=colors[name], transform=trans, clip_on=False, zorder=5)
                ax.annotate(f"{name} OOM", (x, y), xycoords=trans, xytext=(-6, 0), textcoords="offset points",
                            ha="right", va="center", fontsize=7, color=colors[name])
        if xs_all:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(xs_all))
            ax.set_xticklabels([f"{x:g}" for x in sorted(xs_all)])
            ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colors[n], marker="o", ms=4, label=n) for n in providers]
    if any_oom:
        handles.append(Line2D([], [], color="gray", marker="x", ls="", ms=7, label="out of memory"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / (4.6 * len(panels) + 1.4), 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
