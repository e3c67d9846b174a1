"""Timing, peak memory and failure classification.

CUDA timing follows ``triton.testing.do_bench`` (CUDA events around each run, the L2 cache
flushed by writing a buffer larger than it before each run, a warm-up phase, gradients set to
None between runs) and reports the median and quartiles; unlike do_bench it never runs fewer
than ``min_reps`` timed repetitions. CPU timing is wall clock (``time.perf_counter``) around each
run, median and quartiles of the repeats.

CUDA peak memory: one extra run between ``torch.cuda.reset_peak_memory_stats`` and
``torch.cuda.max_memory_allocated``; "above inputs" subtracts what was allocated just before the
run (the inputs, and for ``bwd`` the saved forward). CPU peak memory lives in
:mod:`flashlab.lab.memprobe` (a fresh forked process per measurement).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per run: median and quartiles over ``reps`` timed runs."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    reps: int


def _summary(times_ms: Sequence[float]) -> Timing:
    ts = sorted(times_ms)
    if len(ts) == 1:
        return Timing(ts[0], ts[0], ts[0], 1)
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return Timing(statistics.median(ts), q[0], q[2], len(ts))


def _clear(grad_to_none: Sequence[torch.Tensor] | None) -> None:
    for t in grad_to_none or ():
        t.grad = None


def time_cpu(fn: Callable[[], object], *, grad_to_none: Sequence[torch.Tensor] | None = None,
             warmup: int = 1, min_reps: int = 3, max_reps: int = 50, budget_s: float = 0.3) -> Timing:
    """Wall-clock time of ``fn``: ``warmup`` untimed runs, then at least ``min_reps`` timed runs,
    more until ``budget_s`` seconds were spent or ``max_reps`` is reached."""
    for _ in range(warmup):
        _clear(grad_to_none)
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < max_reps):
        _clear(grad_to_none)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    return _summary(times)


_L2_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _L2_FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        _L2_FLUSH[key] = torch.empty(max(256 << 20, 2 * l2) // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[key]


def time_cuda(fn: Callable[[], object], device: torch.device, *,
              grad_to_none: Sequence[torch.Tensor] | None = None, warmup_ms: float = 25.0,
              rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000) -> Timing:
    """CUDA-event time of ``fn`` with the L2 cache flushed before each run (do_bench's method)."""
    cache = _flush_buffer(device)
    fn()  # first call: compilation, autotuning, handle creation
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        _clear(grad_to_none)
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate))
    n_rep = min(max_reps, max(min_reps, int(rep_ms / estimate)))
    for _ in range(n_warmup):
        _clear(grad_to_none)
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        _clear(grad_to_none)
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def peak_cuda(fn: Callable[[], object], device: torch.device,
              grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[int, int]:
    """(peak bytes allocated during one run, the part of it above what was allocated before).

    The total leaves out the timer's own L2-flush buffer."""
    _clear(grad_to_none)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _clear(grad_to_none)
    flush = sum(b.numel() * b.element_size() for k, b in _L2_FLUSH.items() if k == str(device))
    return peak - flush, peak - base


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached CUDA blocks back (after a case, and after an OOM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ failure classification
_UNSUPPORTED_TEXT = ("no available kernel", "no viable backend", "only supports", "not supported",
                     "unsupported", "not implemented")


def is_oom(exc: BaseException) -> bool:
    """Out of memory on the GPU (torch.OutOfMemoryError) or on the host (allocation failure)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or isinstance(exc, MemoryError))


def is_unsupported(exc: BaseException) -> bool:
    """A provider saying it cannot run this case (dtype, head dim, missing kernel, not implemented)."""
    if isinstance(exc, (NotImplementedError, ValueError, TypeError)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _UNSUPPORTED_TEXT)


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, one-line message) for an exception raised while running a case."""
    status = "oom" if is_oom(exc) else "unsupported" if is_unsupported(exc) else "error"
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return status, msg[:300]
