"""The short automatic reading of a run: out-of-memory cells, speed-ups and memory ratios against
naive, the fastest provider, trends along the seed study's sweeps, accuracy and failures.
Every sentence is computed from the rows; nothing is hard-coded but the seed's own claims."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from flashlab.lab.cases import Case, Table, case_param

MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward + backward"}


def short(case: Case) -> str:
    """``B32×S1024`` plus what differs from the study's usual shape."""
    s = f"B{case.batch}×S{case.seqlen_q}"
    return s + (" causal" if case.causal else "")


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×" if x >= 100 else f"{x:.1f}×"


def fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.1f} MiB" if mb < 10 else f"{mb:.0f} MiB"


def ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("time_ms") is not None


def main_provider(providers: list[str], rows: list[dict[str, Any]]) -> str | None:
    """flashlab if it produced numbers, else the first non-naive provider that did."""
    has = {r["provider"] for r in rows if ok(r)}
    for p in ["flashlab"] + providers:
        if p != "naive" and p in has:
            return p
    return None


def _pairs(index: dict, cases: list[Case], a: str, b: str, mode: str) -> list[tuple[Case, dict, dict]]:
    out = []
    for c in cases:
        ra, rb = index.get((c, a, mode)), index.get((c, b, mode))
        if ok(ra) and ok(rb):
            out.append((c, ra, rb))
    return out


def compare_sentences(index: dict, cases: list[Case], main: str, mode: str, where: str) -> list[str]:
    """Speed-up and memory ratio of ``main`` against naive over ``cases``."""
    pairs = _pairs(index, cases, main, "naive", mode)
    if not pairs:
        return []
    speed = [(rn["time_ms"] / rm["time_ms"], c) for c, rm, rn in pairs]
    vals = [s for s, _ in speed]
    lo, hi = min(speed, key=lambda t: t[0]), max(speed, key=lambda t: t[0])
    faster = sum(v > 1 for v in vals)
    out = [f"{main} was {fmt_ratio(lo[0])}–{fmt_ratio(hi[0])} as fast as naive ({MODE_NAMES[mode]}, median "
           f"{fmt_ratio(statistics.median(vals))}) over the {len(vals)} {where} cases both ran; faster in {faster}; "
           f"largest gain at {short(hi[1])}."]
    mem = [(rn["mem_above_inputs_mb"] / rm["mem_above_inputs_mb"], c, rm, rn) for c, rm, rn in pairs
           if rm.get("mem_above_inputs_mb") and rn.get("mem_above_inputs_mb")]
    if mem:
        best = max(mem, key=lambda t: t[0])
        out.append(f"{main} used {fmt_ratio(best[0])} less memory than naive at {short(best[1])} "
                   f"(above the inputs: {fmt_mb(best[2]['mem_above_inputs_mb'])} vs "
                   f"{fmt_mb(best[3]['mem_above_inputs_mb'])}).")
    return out


def busy_warning(env: dict[str, Any]) -> list[str]:
    """A warning when the CPU was busy with other work as the run started (CPU timings suffer)."""
    load, cpus = env.get("load_avg_1m"), env.get("cpu_count")
    if env.get("device") == "cpu" and load and cpus and load > 0.75 * cpus:
        return [f"**Warning**: the machine was busy when the run started (1-minute load average {load:g} on "
                f"{cpus} CPUs): CPU timings include waiting for other processes; rerun on an idle machine."]
    return []


def oom_sentences(rows: list[dict[str, Any]], cap: float | None) -> list[str]:
    by_p: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "oom":
            by_p[r["provider"]].append(r)
    capped = f" (memory capped at {cap:g} GiB)" if cap else ""
    out = []
    for p, rs in by_p.items():
        cells = sorted({(r["batch"], r["seqlen_q"], bool(r.get("causal"))) for r in rs})
        names = ", ".join(f"B{b}×S{s}" + (" causal" if c else "") for b, s, c in cells)
        out.append(f"{p} ran out of memory at {names}{capped}.")
    if not out:
        out.append(f"No provider ran out of memory{capped}.")
    return out


def sweep_trend(index: dict, table: Table, provider: str, mode: str) -> str | None:
    """How ``provider``'s time and memory move along one sweep of the seed study."""
    pts = [(case_param(c, table.param), index.get((c, provider, mode))) for c in table.cases]
    pts = [(v, r) for v, r in pts if ok(r)]
    if len(pts) < 2:
        return None
    (v0, r0), (v1, r1) = pts[0], pts[-1]
    t = r1["time_ms"] / r0["time_ms"]
    if table.param == "causal":
        return (f"{provider}: causal ran in {r1['time_ms'] / r0['time_ms']:.2f}× the time of full attention "
                f"(ideal 0.5×: half the FLOPs); TFLOP/s {r0['tflops']:.3g} → {r1['tflops']:.3g}.")
    mem = ""
    if r0.get("mem_above_inputs_mb") and r1.get("mem_above_inputs_mb"):
        mem = f", memory above inputs ×{r1['mem_above_inputs_mb'] / r0['mem_above_inputs_mb']:.2g}"
    return (f"{provider}, {table.param} {v0} → {v1} (×{v1 / v0:g}): time ×{t:.2g}{mem}, "
            f"TFLOP/s {r0['tflops']:.3g} → {r1['tflops']:.3g}.")


def fastest_sentence(index: dict, case: Case, providers: list[str], mode: str) -> str | None:
    rs = [(index[(case, p, mode)]["time_ms"], p) for p in providers if ok(index.get((case, p, mode)))]
    if not rs:
        return None
    rs.sort()
    best_t, best = rs[0]
    tail = ""
    main = [(t, p) for t, p in rs[1:] if p == "flashlab"]
    if main:
        tail = f"; flashlab {main[0][0]:.3g} ms ({fmt_ratio(main[0][0] / best_t)} its time)"
    return f"Fastest at {case.label} ({MODE_NAMES[mode]}): {best}, {best_t:.3g} ms{tail}."


def accuracy_sentences(rows: list[dict[str, Any]]) -> list[str]:
    checked = [r for r in rows if r.get("acc_ok") is not None]
    failed = [r for r in checked if r.get("acc_ok") is False]
    if not checked:
        return ["No accuracy check ran (cases too large, or checks off)."]
    if not failed:
        return [f"All {len(checked)} checked rows passed the accuracy rule (max error ≤ 2× the same-dtype "
                "reference's, 3× for gradients, against the fp32/fp64 reference)."]
    names = ", ".join(sorted({f"{r['provider']} {r['label']} {r['mode']}" for r in failed})[:6])
    return [f"{len(failed)} of {len(checked)} checked rows FAILED the accuracy rule: {names}."]


def failure_sentences(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for status, verb in (("unsupported", "could not run"), ("error", "failed with an error on")):
        by_p: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r.get("status") == status:
                by_p[r["provider"]].append(r)
        for p, rs in by_p.items():
            out.append(f"{p} {verb} {len(rs)} row(s); first reason: {rs[0].get('message') or '?'}")
    return out


def study_reading(index: dict, tables: list[Table], providers: list[str], rows: list[dict[str, Any]],
                  modes: list[str], cap: float | None) -> list[str]:
    """Bullets for the seed study."""
    out = oom_sentences(rows, cap)
    main = main_provider(providers, rows)
    grids = [t for t in tables if t.kind == "grid"]
    for mode in modes:
        for g in grids:
            if main:
                out += compare_sentences(index, list(g.cases), main, mode, f"{g.scope} grid")
            big = g.cases[-1]
            fs = fastest_sentence(index, big, providers, mode)
            if fs:
                out.append(fs)
        if main:
            for t in tables:
                if t.kind == "sweep":
                    s = sweep_trend(index, t, main, mode)
                    if s:
                        out.append(s)
    if grids:
        naive_oom = sorted({short(Case.from_dict(r)) for r in rows
                            if r["provider"] == "naive" and r["status"] == "oom"})
        seen = ", ".join(naive_oom) if naive_oom else "nowhere"
        out.append(f"The seed saw PyTorch (naive) run out of memory at b64 × seqlen ≥ 1024 on a small GPU; "
                   f"here naive ran out of memory {'at ' if naive_oom else ''}{seen}.")
    return out + accuracy_sentences(rows) + failure_sentences(rows)


def bench_reading(index: dict, cases: list[Case], providers: list[str], rows: list[dict[str, Any]],
                  modes: list[str], cap: float | None) -> list[str]:
    """Bullets for a ``flashlab bench`` run."""
    out = oom_sentences(rows, cap)
    main = main_provider(providers, rows)
    for mode in modes:
        if main:
            out += compare_sentences(index, cases, main, mode, "")
        wins: dict[str, int] = defaultdict(int)
        for c in cases:
            rs = [(index[(c, p, mode)]["time_ms"], p) for p in providers if ok(index.get((c, p, mode)))]
            if rs:
                wins[min(rs)[1]] += 1
        if wins:
            desc = ", ".join(f"{p} {n}" for p, n in sorted(wins.items(), key=lambda t: -t[1]))
            out.append(f"Fastest provider per case ({MODE_NAMES[mode]}): {desc}.")
    return out + accuracy_sentences(rows) + failure_sentences(rows)
