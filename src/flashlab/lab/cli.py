"""``flashlab``: study | bench | report | env | providers.

Bad input (unknown provider, malformed suite, impossible case, unwritable output) prints one
line, ``flashlab: error: …``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from flashlab.lab.cases import DTYPES, SCALES, SCOPES, seed_study
from flashlab.lab.errors import LabError
from flashlab.lab.flops import MODES

console = Console(stderr=True)
out_console = Console()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise LabError(f"{message} (see: {self.prog} --help)")


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _ints(values: list[str] | None, flag: str) -> list[int] | None:
    items = _split(values)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise LabError(f"{flag} takes integers, got {','.join(items)!r}") from None


def _floats(values: list[str] | None, flag: str) -> list[float] | None:
    items = _split(values)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise LabError(f"{flag} takes numbers, got {','.join(items)!r}") from None


def _bools(values: list[str] | None, flag: str = "--causal") -> list[bool] | None:
    items = _split(values)
    if items is None:
        return None
    table = {"true": [True], "1": [True], "yes": [True], "false": [False], "0": [False], "no": [False],
             "both": [False, True]}
    out: list[bool] = []
    for v in items:
        if v.lower() not in table:
            raise LabError(f"{flag} takes true, false or both, got {v!r}")
        out += table[v.lower()]
    return list(dict.fromkeys(out))


def _choices(values: list[str] | None, allowed: tuple[str, ...], flag: str) -> list[str] | None:
    items = _split(values)
    for v in items or ():
        if v not in allowed:
            raise LabError(f"{flag}: unknown value {v!r} (known: {', '.join(allowed)})")
    return items


# ----------------------------------------------------------------------------------- running
def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--providers", action="append", help="comma-separated provider names (default: the "
                   "available defaults for the device; see `flashlab providers`)")
    g.add_argument("--modes", action="append", help=f"comma-separated, of {', '.join(MODES)} (default fwd)")
    g.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    g.add_argument("--memory-cap", type=float, metavar="GiB", help="emulate a smaller GPU: cap this process's "
                   "CUDA memory (torch.cuda.set_per_process_memory_fraction)")
    g.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: warm-up per measurement (ms)")
    g.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: timed repeats per measurement (ms)")
    g.add_argument("--cpu-repeats", type=int, default=3, help="CPU: minimum timed repeats")
    g.add_argument("--cpu-budget", type=float, default=0.3, metavar="S", help="CPU: seconds of repeats per row")
    g.add_argument("--memory", choices=("auto", "subprocess", "inprocess", "off"), default="auto",
                   help="peak memory method (auto: CUDA allocator stats on a GPU; on CPU a fresh subprocess per "
                   "row; subprocess / inprocess: CPU only)")
    g.add_argument("--no-accuracy", action="store_true", help="skip the accuracy checks")
    g.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="output folder (default: a new timestamped folder under results/)")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (default: the "
                   "latest folder under results/), skipping rows already measured")


def _out_dir(args: argparse.Namespace, kind: str) -> Path:
    from flashlab.lab.results import check_writable, default_out_dir, latest_out_dir

    if args.out is not None:
        out = args.out
    elif args.resume:
        out = latest_out_dir()
        if out is None:
            raise LabError("--resume without --out: no earlier run found under results/")
    else:
        out = default_out_dir(kind)
    if not args.resume and (out / "results.json").exists():
        raise LabError(f"{out / 'results.json'} already exists: pass --resume to continue that run, "
                       "or choose another --out")
    check_writable(out)
    return out


def _execute(args: argparse.Namespace, argv: list[str], kind: str, name: str, cases: list, config: dict[str, Any],
             default_modes: tuple[str, ...], default_providers: list[str] | None = None) -> int:
    import torch

    from flashlab.lab import report
    from flashlab.lab.env import ceilings, environment, pick_device
    from flashlab.lab.providers import registry, resolve_providers
    from flashlab.lab.results import ResultStore
    from flashlab.lab.runner import Runner, RunOptions, apply_memory_cap

    device = pick_device(args.device)
    if device.type == "cuda" and args.memory in ("subprocess", "inprocess"):
        # They measure a CPU run's RSS: on a GPU they would rerun every row on the CPU (once breaking
        # the compiled FlexAttention of later GPU rows; perf-notes.md, round 4).
        raise LabError(f"--memory {args.memory} measures CPU runs; on {device} use --memory auto (CUDA "
                       "allocator stats) or off")
    modes = tuple(_choices(args.modes, MODES, "--modes") or default_modes)
    providers = resolve_providers(_split(args.providers) or default_providers, device)
    if not providers:
        raise LabError(f"no provider can run on {device.type} here (see `flashlab providers`)")
    if args.memory_cap is not None and not args.memory_cap > 0:
        raise LabError(f"--memory-cap must be a positive number of GiB, got {args.memory_cap:g}")
    out = _out_dir(args, kind)
    console.print(f"[bold]flashlab {kind} {name}[/]: {len(cases)} cases × {len(providers)} providers × "
                  f"{len(modes)} modes on {device} → [bold]{out}[/]")
    chosen = {p.name for p in providers}
    not_run = {n: (p.unavailable(device) or "not selected (not a default on this device)")
               for n, p in registry().items() if n not in chosen}
    cap = apply_memory_cap(device, args.memory_cap, console)
    opts = RunOptions(device=device, modes=modes, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                      cpu_min_reps=args.cpu_repeats, cpu_budget_s=args.cpu_budget, memory=args.memory,
                      accuracy=not args.no_accuracy, acc_max_scores=1 << (28 if device.type == "cuda" else 24),
                      memory_cap_gib=cap, seed=args.seed)
    console.print("measuring the device's matmul peak (cached after the first time)…")
    ceil = ceilings(device)
    config = {**config, "kind": kind, "name": name, "command": "flashlab " + " ".join(map(shlex.quote, argv)),
              "providers": [p.name for p in providers], "providers_unavailable": not_run, "modes": list(modes),
              "options": opts.describe(), "ceilings": ceil, "memory_cap_gib": cap}
    store = ResultStore(out, environment(device), config, resume=args.resume)
    runner = Runner(opts, store, ceil, console)
    code = 0
    try:
        runner.run(cases, providers)
    except KeyboardInterrupt:
        hint = config["command"]
        if args.out is None:
            hint += f" --out {shlex.quote(str(out))}"
        if not args.resume:
            hint += " --resume"
        console.print(f"interrupted: {len(store.rows)} rows saved in {out}; continue with: {hint}",
                      markup=False, style="yellow")
        code = 130
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    md, html = report.build(out)
    _summary(store.rows, [p.name for p in providers])
    console.print(f"results: {store.json_path}, {store.csv_path}\nreport:  {md}, {html}")
    out_console.print(str(out))
    return code


def _summary(rows: list[dict[str, Any]], providers: list[str]) -> None:
    """A compact table: one line per case and mode, the median time (ms) per provider."""
    table = RichTable(title="median time (ms); OOM = out of memory, n/a = cannot run this case",
                      show_lines=False, pad_edge=False, box=None)
    table.add_column("case", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    for p in providers:
        table.add_column(p, justify="right", no_wrap=True)
    index: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        index.setdefault((r["label"], r["mode"]), {})[r["provider"]] = r
    for (label, mode), by_p in index.items():
        cells = []
        for p in providers:
            r = by_p.get(p)
            if r is None:
                cells.append("–")
            elif r["status"] != "ok":
                cells.append({"oom": "[red]OOM", "unsupported": "n/a"}.get(r["status"], "[red]error"))
            else:
                cells.append(f"{r['time_ms']:.3g}")
        table.add_row(label, mode, *cells)
    longest = max((len(label) for label, _ in index), default=4)
    width = max(console.width, longest + 10 + sum(max(len(p), 7) + 2 for p in providers))
    Console(stderr=True, width=width).print(table)


# ----------------------------------------------------------------------------------- commands
def cmd_study(args: argparse.Namespace, argv: list[str]) -> int:
    from flashlab.lab.env import pick_device

    device = pick_device(args.device)
    scale = args.scale or ("full" if device.type == "cuda" else "cpu")
    scopes = tuple(SCOPES) if args.scope == "both" else (args.scope,)
    study = seed_study(scale, scopes, args.dtype)
    sc = study.scale
    config = {"scale": scale, "scale_note": sc.note, "scopes": list(scopes), "defaults": study.defaults,
              "tables": [t.to_dict() for t in study.tables]}
    return _execute(args, argv, "study", study.name, study.cases, config, ("fwd",))


def cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from flashlab.lab.cases import expand_sweep
    from flashlab.lab.env import pick_device
    from flashlab.lab.suites import load_suite

    flags = {"batch": _ints(args.batch, "--batch"), "tokens": _ints(args.tokens, "--tokens"),
             "seqlen": _ints(args.seqlen, "--seqlen"), "seqlen_k": _ints(args.seqlen_k, "--seqlen-k"),
             "heads": _ints(args.heads, "--heads"), "kv_heads": _ints(args.kv_heads, "--kv-heads"),
             "head_dim": _ints(args.head_dim, "--head-dim"), "embed": _ints(args.embed, "--embed"),
             "causal": _bools(args.causal), "dtype": _choices(args.dtypes, DTYPES, "--dtypes"),
             "scope": _choices(args.scope, SCOPES, "--scope"), "mask": _split(args.mask),
             "softcap": _floats(args.softcap, "--softcap"), "alibi": _bools(args.alibi, "--alibi"),
             "varlen": _ints(args.varlen, "--varlen"), "dropout": _floats(args.dropout, "--dropout")}
    given = {k: v for k, v in flags.items() if v is not None}
    suite_providers, suite_modes = None, None
    if args.suite:
        suite = load_suite(args.suite)
        name, suite_providers, suite_modes = suite.name, suite.providers, suite.modes
        cases = list(suite.cases)
        if given:
            raise LabError("give either --suite or shape flags (--batch, --seqlen, ...), not both")
    else:
        device = pick_device(args.device)
        spec = {"seqlen": [1024], "heads": [16], "head_dim": [64],
                "dtype": ["fp16" if device.type == "cuda" else "fp32"], **given}
        if "tokens" not in spec:
            spec.setdefault("batch", [4])
        if "embed" in given:
            spec.pop("heads" if "head_dim" in given and "heads" not in given else "head_dim")
        name = "flags"
        cases = expand_sweep(spec, where="flags")
    return _execute(args, argv, "bench", name, cases, {"suite": args.suite}, tuple(suite_modes or ("fwd",)),
                    list(suite_providers) if suite_providers else None)


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from flashlab.lab import report
    from flashlab.lab.results import check_writable

    if args.out is not None:
        check_writable(args.out)
    md, html = report.build(args.results, args.out)
    console.print(f"report: {md}, {html}")
    return 0


def cmd_env(args: argparse.Namespace, argv: list[str]) -> int:
    from flashlab.lab.env import ceilings, environment, pick_device

    device = pick_device(args.device)
    table = RichTable(title=f"flashlab env ({device})", show_header=False)
    for k, v in environment(device).items():
        table.add_row(k, str(v))
    c = ceilings(device, refresh=args.refresh)
    for k, v in c.get("matmul_tflops", {}).items():
        table.add_row(f"matmul {k} TFLOP/s", f"{v:g}")
    if "copy_tb_s" in c:
        table.add_row("device copy TB/s", f"{c['copy_tb_s']:g}")
    table.add_row("ceilings", f"{'cached' if c.get('cached') else 'measured now'} ({c.get('measured_utc')})")
    out_console.print(table)
    return 0


def cmd_providers(args: argparse.Namespace, argv: list[str]) -> int:
    from flashlab.lab.env import pick_device
    from flashlab.lab.providers import registry

    device = pick_device(args.device)
    table = RichTable(title=f"providers on {device}")
    for col in ("name", "runs here", "default", "why not / description"):
        table.add_column(col)
    for name, p in registry().items():
        why = p.unavailable(device)
        default = "yes" if device.type in p.default_on else ""
        table.add_row(name, "no" if why else "yes", default, why or p.description)
    out_console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flashlab", description="The lab: benchmark attention implementations.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("study", help="reproduce the seed study's tables with measured numbers")
    p.add_argument("name", nargs="?", default="seed", choices=("seed",), help="the study (seed)")
    p.add_argument("--scope", choices=("op", "layer", "both"), default="op",
                   help="op: attention on q, k, v (default); layer: QKV projection + attention + output projection")
    p.add_argument("--scale", choices=tuple(SCALES), help="full (GPU default), cpu (CPU default) or tiny")
    p.add_argument("--dtype", choices=DTYPES, help="default: fp16 at full scale, fp32 on CPU")
    _add_run_options(p)
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("bench", help="run any sweep from flags or a suite file")
    p.add_argument("--suite", help="a shipped suite name (fa-grid, fa-grid-small, sliding-window, varlen, "
                   "block-sparse, softcap-alibi, features-tiny) or a .toml/.yaml path")
    p.add_argument("--distributed", action="store_true",
                   help="ring attention across torchrun processes (`torchrun ... -m flashlab.lab.cli bench "
                        "--distributed ...`); every other flag then goes to flashlab.distributed.bench "
                        "(see `python -m flashlab.distributed.bench --help` and docs/distributed.md)")
    for flag, what in (("batch", "batch sizes"), ("tokens", "tokens per batch (batch = tokens / seqlen)"),
                       ("seqlen", "sequence lengths"), ("seqlen-k", "key lengths (default: seqlen)"),
                       ("heads", "query heads"), ("kv-heads", "key/value heads (GQA)"), ("head-dim", "head dims"),
                       ("embed", "embedding dims (heads or head dim derived)"), ("causal", "true, false or both"),
                       ("dtypes", f"of {', '.join(DTYPES)}"), ("scope", "op or layer"),
                       ("mask", "masks: window:W, document:N, prefix:P (docs/lab.md)"),
                       ("softcap", "softcaps (0 = off)"),
                       ("alibi", "true, false or both"), ("varlen", "shortest sequence of a varlen batch (0 = off)"),
                       ("dropout", "attention dropout rates (0 = off; not accuracy-checked)")):
        p.add_argument(f"--{flag}", action="append", help=f"comma-separated {what}")
    _add_run_options(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="re-render the report of saved results")
    p.add_argument("results", type=Path, help="a results folder or its results.json")
    p.add_argument("--out", type=Path, help="where to write the report (default: next to the results)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("env", help="device, versions and measured ceilings")
    p.add_argument("--device", default="auto")
    p.add_argument("--refresh", action="store_true", help="measure the ceilings again")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("providers", help="list providers and why one cannot run here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_providers)
    return parser


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # `timeout` and job schedulers send SIGTERM: stop like Ctrl-C (results kept, report written)
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if argv[:1] == ["bench"] and "--distributed" in argv:
            # Its own flags (world size, sharding, methods): a different sweep, run by every rank.
            from flashlab.distributed.bench import main as distributed_main

            return distributed_main([a for a in argv[1:] if a != "--distributed"])
        args = build_parser().parse_args(argv)
        return args.func(args, argv)
    except LabError as exc:
        console.print(f"flashlab: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("flashlab: interrupted", markup=False)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
