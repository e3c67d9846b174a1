"""Run cases × providers × modes: time, peak memory and accuracy per row; failures recorded.

Every failure of one row (out of memory, a provider refusing the case, any other exception) is
caught, recorded with its message, memory is freed and the sweep goes on. Rows are saved as
they finish; rows already in the store (``--resume``) are skipped.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flashlab.lab import accuracy, measure
from flashlab.lab.cases import Case
from flashlab.lab.env import device_name
from flashlab.lab.flops import case_flops, kv_bytes, tflops_per_s
from flashlab.lab.memprobe import CpuMemoryProbe, measure_here
from flashlab.lab.memprobe import supported as cpu_memory_supported
from flashlab.lab.providers import TORCH_DTYPES, Attn, Provider
from flashlab.lab.results import COLUMNS, ResultStore, row_key
from flashlab.lab.workload import Workload

MB = 2**20


@dataclass
class RunOptions:
    """How to measure. ``memory``: ``auto`` (CUDA allocator stats on GPU, a fresh subprocess per
    case on CPU), ``subprocess``, ``inprocess`` or ``off``."""

    device: torch.device
    modes: tuple[str, ...] = ("fwd",)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_min_reps: int = 3
    cpu_budget_s: float = 0.3
    memory: str = "auto"
    accuracy: bool = True
    acc_max_scores: int = 1 << 28
    memory_cap_gib: float | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        mem = self.memory if self.memory != "auto" else ("cuda-allocator" if cuda else "subprocess")
        return {
            "modes": list(self.modes),
            "timing": (f"CUDA events, L2 flushed before each run, warm-up {self.warmup_ms:g} ms, "
                       f"repeats for {self.rep_ms:g} ms (at least 5), median and quartiles") if cuda else
                      (f"wall clock, 1 warm-up run, at least {self.cpu_min_reps} repeats and "
                       f"{self.cpu_budget_s:g} s, median and quartiles"),
            "memory_method": mem,
            "accuracy": self.accuracy,
            "accuracy_max_scores": self.acc_max_scores,
            "memory_cap_gib": self.memory_cap_gib,
        }


def apply_memory_cap(device: torch.device, cap_gib: float | None, console: Console) -> float | None:
    """Limit this process's CUDA allocator to ``cap_gib`` GiB (emulates a smaller GPU)."""
    if cap_gib is None:
        return None
    if device.type != "cuda":
        console.print(f"[yellow]--memory-cap {cap_gib:g} applies to CUDA devices only; ignored on {device.type}")
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    frac = cap_gib * 2**30 / total
    if frac >= 1:
        console.print(f"[yellow]--memory-cap {cap_gib:g} GiB is not below this GPU's {total / 2**30:.1f} GiB; ignored")
        return None
    torch.cuda.set_per_process_memory_fraction(frac, device)
    return cap_gib


def base_row(case: Case, provider: str, mode: str, device: torch.device) -> dict[str, Any]:
    """A row with every column present (None where not measured)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(case.to_dict(), provider=provider, label=case.label, embed=case.embed, mode=mode, status="ok",
               message="", flops=case_flops(case, mode), device=device_name(device))
    return row


class Runner:
    """Runs a list of cases on a list of providers, writing rows into a :class:`ResultStore`."""

    def __init__(self, opts: RunOptions, store: ResultStore, ceilings: dict[str, Any] | None = None,
                 console: Console | None = None) -> None:
        self.opts, self.store = opts, store
        self.peaks = (ceilings or {}).get("matmul_tflops", {})
        self.console = console or Console(stderr=True)
        self._probe: CpuMemoryProbe | None = None
        mem = opts.memory
        if mem == "auto":
            mem = "cuda" if opts.device.type == "cuda" else "subprocess"
        if opts.device.type == "cpu" and mem in ("subprocess", "inprocess"):
            why = cpu_memory_supported()
            if why:
                self.console.print(f"[yellow]peak memory not measured: {why}")
                mem = "off"
        self.memory = mem

    # -------------------------------------------------------------------------------- driving
    def run(self, cases: Sequence[Case], providers: Sequence[Provider]) -> None:
        gc.freeze()  # torch's import leaves a large heap: keep gc.collect() between rows cheap
        tasks = [(c, p) for c in cases for p in providers]
        total = len(tasks) * len(self.opts.modes)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        try:
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task("measuring", total=total)
                for case, provider in tasks:
                    progress.update(task, description=f"{case.label} · {provider.name}")
                    for _ in self._run_pair(case, provider):
                        progress.advance(task)
        finally:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def _run_pair(self, case: Case, provider: Provider):  # noqa: ANN202 - a generator of None
        dev = self.opts.device
        rows = [base_row(case, provider.name, m, dev) for m in self.opts.modes]
        pending = [r for r in rows if not self.store.done(row_key(r))]
        for _ in range(len(rows) - len(pending)):
            yield
        if not pending:
            return
        why = provider.unsupported(case, dev)
        attn = None
        if why is None:
            try:
                attn = provider.build(case, dev)
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                status, msg = measure.classify(exc)
                why = msg if status == "unsupported" else None
                if why is None:
                    for r in pending:
                        self.store.add({**r, "status": status, "message": msg})
                        yield
                    return
        if why is not None:
            for r in pending:
                self.store.add({**r, "status": "unsupported", "message": why})
                yield
            return
        acc_cache: dict[str, dict[str, Any]] = {}
        for r in pending:
            self._measure(r, case, provider, attn, acc_cache)
            self.store.add(r)
            measure.free_memory(dev)
            yield

    # -------------------------------------------------------------------------------- one row
    def _measure(self, row: dict[str, Any], case: Case, provider: Provider, attn: Attn,
                 acc_cache: dict[str, dict[str, Any]]) -> None:
        opts, dev, mode = self.opts, self.opts.device, row["mode"]
        grad = mode != "fwd"
        wl = fn = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wl = Workload(case, attn, dev, requires_grad=grad, seed=opts.seed)
                row["inputs_mb"] = wl.input_bytes / MB
                fn = wl.mode_fn(mode)
                leaves = wl.leaves if grad else None
                if dev.type == "cuda":
                    t = measure.time_cuda(fn, dev, grad_to_none=leaves, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
                else:
                    t = measure.time_cpu(fn, grad_to_none=leaves, min_reps=opts.cpu_min_reps,
                                         budget_s=opts.cpu_budget_s)
                row.update(time_ms=t.median_ms, time_q25_ms=t.q25_ms, time_q75_ms=t.q75_ms, reps=t.reps)
                row["tflops"] = tflops_per_s(row["flops"], t.median_ms)
                peak = self.peaks.get(case.dtype)
                row["pct_peak"] = 100.0 * row["tflops"] / peak if peak and row["tflops"] else None
                kv = kv_bytes(case, TORCH_DTYPES[case.dtype].itemsize)
                if mode == "fwd" and kv and t.median_ms:
                    row["kv_gbps"] = kv / (t.median_ms * 1e-3) / 1e9
                if self.memory == "cuda":
                    total, above = measure.peak_cuda(fn, dev, grad_to_none=leaves)
                    row.update(mem_peak_mb=total / MB, mem_above_inputs_mb=above / MB, mem_method="cuda-allocator")
        except Exception as exc:  # noqa: BLE001 - OOM and every other failure: recorded, sweep goes on
            row["status"], row["message"] = measure.classify(exc)
        finally:
            fn = None
        if row["status"] != "ok":
            return
        if self.memory in ("subprocess", "inprocess"):
            wl = None
            measure.free_memory(dev)
            self._cpu_memory(row, case, provider, mode)
        if opts.accuracy:
            self._accuracy(row, wl, case, attn, grad, acc_cache)

    def _cpu_memory(self, row: dict[str, Any], case: Case, provider: Provider, mode: str) -> None:
        if self.memory == "subprocess":
            if self._probe is None:
                self._probe = CpuMemoryProbe()
            res = self._probe.measure(case, provider.name, mode, self.opts.seed)
        else:
            res = measure_here(case, provider.name, mode, self.opts.seed)
        if res.get("status") == "ok":
            row.update(mem_peak_mb=res["mem_peak_bytes"] / MB, mem_above_inputs_mb=res["mem_above_bytes"] / MB,
                       mem_method=f"{self.memory} peak RSS")
        else:
            row["message"] = f"memory not measured: {res.get('message', res.get('status'))}"

    def _accuracy(self, row: dict[str, Any], wl: Workload | None, case: Case, attn: Attn, grad: bool,
                  acc_cache: dict[str, dict[str, Any]]) -> None:
        what = "grad" if grad else "out"
        if case.dropout:  # each peer draws its own random mask: nothing to compare with (features.py)
            acc_cache[what] = {"acc_what": f"{what} (not checked: dropout draws a random mask)"}
        if what not in acc_cache:
            dev = self.opts.device
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if wl is None:
                        wl = Workload(case, attn, dev, requires_grad=grad, seed=self.opts.seed)
                    if accuracy.too_large(wl, self.opts.acc_max_scores):
                        acc_cache[what] = {"acc_what": f"{what} (not checked: case too large)"}
                    else:
                        acc_cache[what] = accuracy.check_grads(wl) if grad else accuracy.check_output(wl)
            except Exception as exc:  # noqa: BLE001
                _, msg = measure.classify(exc)
                acc_cache[what] = {"acc_what": f"{what} (check failed: {msg[:120]})"}
            finally:
                wl = None
                measure.free_memory(dev)
        row.update(acc_cache[what])
