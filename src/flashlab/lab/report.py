"""The report of a run (Markdown + self-contained HTML + PNG figures), from saved results only.

For the seed study it reproduces each table of the seed document with measured numbers: the
batch × seqlen grid (time, TFLOP/s, peak memory, speed-up and memory ratio against naive) and
the one-at-a-time sweeps (batch, seqlen, heads, embedding, causal). For ``bench`` runs it makes
one table per metric with a row per case and a column per provider.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashlab.lab import doc, plots, reading
from flashlab.lab.cases import Case, Table, case_param
from flashlab.lab.results import load_results

STATUS_CELL = {"oom": "OOM", "unsupported": "n/a", "error": "error"}
PARAM_NAMES = {"batch": "batch", "seqlen": "seqlen", "heads": "heads", "embed": "embedding", "causal": "causal"}


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def cell(row: dict[str, Any] | None, field: str, fmt: Callable[[Any], str] = _num) -> str:
    """A table cell: the value, or OOM / n/a / error / – (not run)."""
    if row is None:
        return "–"
    if row.get("status") != "ok":
        return STATUS_CELL.get(row.get("status", ""), "?")
    value = row.get(field)
    return "–" if value is None else fmt(value)


def _ratio_cell(num: dict[str, Any] | None, den: dict[str, Any] | None, field: str) -> str:
    if num is None or den is None:
        return "–"
    if den.get("status") != "ok":
        return STATUS_CELL.get(den.get("status", ""), "–")
    if num.get("status") != "ok":
        return f"naive {STATUS_CELL.get(num.get('status', ''), '?')}"
    a, b = num.get(field), den.get(field)
    return reading.fmt_ratio(a / b) if a and b else "–"


def index_rows(rows: list[dict[str, Any]]) -> dict[tuple[Case, str, str], dict[str, Any]]:
    """(case, provider, mode) → row."""
    return {(Case.from_dict(r), r["provider"], r["mode"]): r for r in rows}


def _providers(config: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    seen = list(config.get("providers") or [])
    for r in rows:
        if r["provider"] not in seen:
            seen.append(r["provider"])
    return seen


def _modes(config: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    modes = list(config.get("modes") or [])
    return modes + [m for m in dict.fromkeys(r["mode"] for r in rows) if m not in modes]


def _time_iqr(r: dict[str, Any]) -> str:
    return f"{_num(r['time_ms'])} [{_num(r.get('time_q25_ms'))}–{_num(r.get('time_q75_ms'))}]"


def _acc(r: dict[str, Any] | None) -> str:
    if r is None or r.get("status") != "ok":
        return ""
    if r.get("acc_ok") is None:
        return "not checked" if r.get("acc_what") else ""
    verdict = "ok" if r["acc_ok"] else "FAIL"
    return f"{verdict} ({r['max_abs_err']:.1e})"


# -------------------------------------------------------------------------------------- study
def _grid_tables(d: doc.Doc, index: dict, table: Table, providers: list[str], mode: str) -> None:
    def rows_for(fn: Callable[[Case, str], str]) -> list[list[str]]:
        return [[str(c.batch), str(c.seqlen_q)] + [fn(c, p) for p in providers] for c in table.cases]

    head = ["batch", "seqlen"] + providers
    m = reading.MODE_NAMES[mode]
    get = lambda c, p: index.get((c, p, mode))  # noqa: E731
    d.add(doc.Table(head, rows_for(lambda c, p: cell(get(c, p), "time_ms")), f"{m} time (ms, median)", 2),
          doc.Table(head, rows_for(lambda c, p: cell(get(c, p), "tflops")), f"{m} TFLOP/s", 2),
          doc.Table(head, rows_for(lambda c, p: cell(get(c, p), "mem_above_inputs_mb")),
                    "peak memory above the inputs (MiB)", 2),
          doc.Table(head, rows_for(lambda c, p: cell(get(c, p), "mem_peak_mb")), "peak memory, total (MiB)", 2))
    others = [p for p in providers if p != "naive"]
    if "naive" in providers and others:
        h2 = ["batch", "seqlen"] + others
        d.add(doc.Table(h2, [[str(c.batch), str(c.seqlen_q)] + [_ratio_cell(get(c, "naive"), get(c, p), "time_ms")
                                                                 for p in others] for c in table.cases],
                        "speed-up over naive (naive time / provider time)", 2),
              doc.Table(h2, [[str(c.batch), str(c.seqlen_q)] +
                             [_ratio_cell(get(c, "naive"), get(c, p), "mem_above_inputs_mb") for p in others]
                             for c in table.cases],
                        "memory ratio (naive / provider, peak above the inputs)", 2))


def _sweep_table(d: doc.Doc, index: dict, table: Table, providers: list[str], mode: str) -> None:
    pname = PARAM_NAMES.get(table.param, table.param)
    head = [pname, "provider", "time ms [IQR]", "TFLOP/s", "% of matmul peak", "peak MiB (total)",
            "above inputs MiB", "speed-up vs naive", "memory ratio vs naive", "accuracy"]
    body = []
    for c in table.cases:
        naive = index.get((c, "naive", mode))
        for p in providers:
            r = index.get((c, p, mode))
            if r is None:
                continue
            body.append([str(case_param(c, table.param)).lower(), p,
                         cell(r, "time_ms", lambda _v, r=r: _time_iqr(r)), cell(r, "tflops"),
                         cell(r, "pct_peak", lambda v: f"{v:.1f}"), cell(r, "mem_peak_mb"),
                         cell(r, "mem_above_inputs_mb"),
                         "1×" if p == "naive" and r.get("status") == "ok" else _ratio_cell(naive, r, "time_ms"),
                         "1×" if p == "naive" and r.get("status") == "ok" else
                         _ratio_cell(naive, r, "mem_above_inputs_mb"), _acc(r)])
    d.add(doc.Table(head, body, f"{reading.MODE_NAMES[mode]}; other parameters at their defaults", 2))


def _series(index: dict, cases: list[Case], providers: list[str], mode: str, metric: str,
            x: Callable[[Case], float]) -> dict[str, list[tuple[float, float | None, str]]]:
    out: dict[str, list[tuple[float, float | None, str]]] = {}
    for p in providers:
        pts = []
        for c in cases:
            r = index.get((c, p, mode))
            if r is not None and r.get("status") in ("ok", "oom"):
                pts.append((x(c), r.get(metric), r["status"]))
        if pts:
            out[p] = pts
    return out


def _grid_figures(d: doc.Doc, out_dir: Path, index: dict, table: Table, defaults: dict[str, Any],
                  providers: list[str], mode: str) -> None:
    b0, s0 = defaults.get("batch"), defaults.get("seqlen")
    by_s = [c for c in table.cases if c.batch == b0] or list(table.cases)
    by_b = [c for c in table.cases if c.seqlen_q == s0] or list(table.cases)
    for metric in ("time_ms", "tflops", "mem_above_inputs_mb"):
        panels = [
            plots.Panel(f"batch {b0}", "seqlen", _series(index, by_s, providers, mode, metric, lambda c: c.seqlen_q)),
            plots.Panel(f"seqlen {s0}", "batch", _series(index, by_b, providers, mode, metric, lambda c: c.batch))]
        name = f"figures/{table.key}-{mode.replace('+', '_')}-{metric}.png"
        label = plots.METRIC_LABELS[metric][0]
        if plots.draw(out_dir / name, f"{table.title}: {reading.MODE_NAMES[mode]} {label}", metric, panels):
            d.add(doc.Image(name, f"{table.title} {label}"))


def _study(d: doc.Doc, out_dir: Path, env: dict, config: dict, index: dict, rows: list, providers: list[str],
           modes: list[str]) -> None:
    tables = [Table.from_dict(t) for t in config.get("tables", [])]
    defaults = config.get("defaults", {})
    d.add(doc.Heading(1, "Reading"),
          doc.Bullets(reading.busy_warning(env) +
                      reading.study_reading(index, tables, providers, rows, modes, config.get("memory_cap_gib"))))
    n = 0
    for t in tables:
        for mode in modes:
            n += 1
            title = t.title if len(modes) == 1 else f"{t.title} — {reading.MODE_NAMES[mode]}"
            d.add(doc.Heading(1, f"Table {n}: {title}"))
            if t.kind == "grid":
                _grid_tables(d, index, t, providers, mode)
                _grid_figures(d, out_dir, index, t, defaults, providers, mode)
            else:
                _sweep_table(d, index, t, providers, mode)


# -------------------------------------------------------------------------------------- bench
def _bench(d: doc.Doc, out_dir: Path, env: dict, config: dict, index: dict, rows: list, providers: list[str],
           modes: list[str]) -> None:
    cases = list(dict.fromkeys(Case.from_dict(r) for r in rows))
    d.add(doc.Heading(1, "Reading"),
          doc.Bullets(reading.busy_warning(env) +
                      reading.bench_reading(index, cases, providers, rows, modes, config.get("memory_cap_gib"))))
    groups: dict[tuple, list[Case]] = defaultdict(list)
    for c in cases:
        groups[(c.scope, c.dtype)].append(c)
    for (scope, dtype), cs in groups.items():
        for mode in modes:
            m = reading.MODE_NAMES[mode]
            d.add(doc.Heading(1, f"{m}, {dtype}, scope {scope}"))
            head = ["case"] + providers
            for field, what in (("tflops", "TFLOP/s"), ("time_ms", "time (ms, median)"),
                                ("mem_above_inputs_mb", "peak memory above the inputs (MiB)")):
                body = [[c.label] + [cell(index.get((c, p, mode)), field) for p in providers] for c in cs]
                d.add(doc.Table(head, body, f"{m} {what}"))
            if mode == "fwd" and scope == "op" and all(c.seqlen_q <= 16 for c in cs):
                # decoding shapes are memory-bound: K/V read rate, against the device copy rate
                body = [[c.label] + [cell(index.get((c, p, mode)), "kv_gbps") for p in providers] for c in cs]
                copy = config.get("ceilings", {}).get("copy_tb_s")
                note = f" (device copy: {copy * 1000:.0f} GB/s)" if copy else ""
                d.add(doc.Table(head, body, f"{m} K/V read rate (GB/s){note}"))
            sub: dict[tuple, list[Case]] = defaultdict(list)
            for c in cs:
                sub[(c.head_dim, c.heads, c.causal)].append(c)
            panels = []
            for (hd, h, causal), cc in list(sub.items())[:8]:
                by_seq = len({c.seqlen_q for c in cc}) > 1
                xs = (lambda c: c.seqlen_q) if by_seq else (lambda c: c.batch)
                panels.append(plots.Panel(f"heads {h}, head dim {hd}{', causal' if causal else ''}",
                                          "seqlen" if by_seq else "batch",
                                          _series(index, cc, providers, mode, "tflops", xs)))
            name = f"figures/bench-{scope}-{dtype}-{mode.replace('+', '_')}-tflops.png"
            if plots.draw(out_dir / name, f"{m} TFLOP/s ({dtype}, {scope})", "tflops", panels):
                d.add(doc.Image(name, f"{m} TFLOP/s"))


# -------------------------------------------------------------------------------------- common
def _header(d: doc.Doc, env: dict, config: dict) -> None:
    dev = env.get("gpu") or f"CPU: {env.get('cpu')} ({env.get('torch_threads')} threads)"
    parts = [f"**Device**: {dev}"]
    if config.get("scale"):
        parts.append(f"**scale**: {config['scale']} ({config.get('scale_note', '')})")
    cap = config.get("memory_cap_gib")
    parts.append(f"**memory cap**: {f'{cap:g} GiB (emulated smaller GPU)' if cap else 'none'}")
    if config.get("scopes"):
        parts.append(f"**scope**: {', '.join(config['scopes'])}")
    d.add(doc.Para("; ".join(parts) + "."))
    if config.get("command"):
        d.add(doc.Para(f"Command: `{config['command']}`"))
    opts = config.get("options", {})
    ceil = config.get("ceilings", {}).get("matmul_tflops", {})
    method = [f"Timing: {opts.get('timing', '?')}.",
              f"Peak memory: {opts.get('memory_method', '?')}; 'above inputs' excludes the input tensors (and for "
              "bwd the saved forward), 'total' is everything allocated at the peak "
              "(on CPU: the process's peak RSS, torch's runtime included).",
              "FLOPs: FlashAttention convention, 4·B·H·Sq·Sk·D forward, causal halves, backward 2.5×, "
              "forward + backward 3.5×; layer scope adds its projections (8·B·S·E² forward).",
              "Accuracy: max |out − ref| against the fp32 reference (fp64 for fp32 inputs) on the first batch "
              "element; 'ok' means within 2× the same-dtype reference's error (3× for gradients)."]
    if ceil:
        method.append("Measured matmul peak (TFLOP/s): " + ", ".join(f"{k} {v:g}" for k, v in ceil.items()) + ".")
    d.add(doc.Heading(1, "Method"), doc.Bullets(method))


def _footer(d: doc.Doc, env: dict, config: dict) -> None:
    unavailable = config.get("providers_unavailable") or {}
    if unavailable:
        d.add(doc.Heading(1, "Providers not run"),
              doc.Bullets([f"**{k}**: {v}" for k, v in unavailable.items()]))
    d.add(doc.Heading(1, "Environment"),
          doc.Table(["key", "value"], [[k, str(v)] for k, v in env.items()], align_right_from=9))


def build(results: Path | str, out_dir: Path | str | None = None) -> tuple[Path, Path]:
    """Render ``report.md``, ``report.html`` and ``figures/`` for saved results; return the two paths."""
    env, config, rows = load_results(results)
    src = Path(results)
    out = Path(out_dir) if out_dir else (src if src.is_dir() else src.parent)
    out.mkdir(parents=True, exist_ok=True)
    index = index_rows(rows)
    providers, modes = _providers(config, rows), _modes(config, rows)
    kind = config.get("kind", "bench")
    title = f"flashlab {kind}: {config.get('name', '')}".rstrip(": ")
    d = doc.Doc(title)
    _header(d, env, config)
    if not rows:
        d.add(doc.Para("No rows were measured."))
    elif kind == "study":
        _study(d, out, env, config, index, rows, providers, modes)
    else:
        _bench(d, out, env, config, index, rows, providers, modes)
    _footer(d, env, config)
    md, html_path = out / "report.md", out / "report.html"
    md.write_text(doc.render_markdown(d), encoding="utf-8")
    html_path.write_text(doc.render_html(d, out), encoding="utf-8")
    return md, html_path
