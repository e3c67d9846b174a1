"""Timing statistics, failure classification and CPU peak memory (fresh subprocess)."""

from __future__ import annotations

import time

import pytest
import torch

from flashlab.lab import measure
from flashlab.lab.cases import Case
from flashlab.lab.memprobe import CpuMemoryProbe, supported

MiB = 2**20


def test_time_cpu_median_and_quartiles() -> None:
    calls = []
    t = measure.time_cpu(lambda: (calls.append(1), time.sleep(0.002)), min_reps=4, budget_s=0.0, warmup=2)
    assert t.reps == 4 and len(calls) == 6
    assert 2.0 <= t.q25_ms <= t.median_ms <= t.q75_ms < 50.0


def test_time_cpu_clears_grads_between_runs() -> None:
    x = torch.ones(3, requires_grad=True)
    seen = []

    def step() -> None:
        seen.append(x.grad is None)
        (x * 2).sum().backward()
    measure.time_cpu(step, grad_to_none=[x], min_reps=3, budget_s=0.0)
    assert all(seen)


@pytest.mark.parametrize("exc, status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "oom"),
    (NotImplementedError("window_size is not supported yet"), "unsupported"),
    (RuntimeError("No available kernel. Aborting execution."), "unsupported"),
    (TypeError("q has dtype torch.float32; accepted: fp16, bf16"), "unsupported"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "error"),
])
def test_classify(exc: BaseException, status: str) -> None:
    got, msg = measure.classify(exc)
    assert got == status
    assert msg.startswith(type(exc).__name__) and "\n" not in msg


needs_proc = pytest.mark.skipif(supported() is not None, reason=str(supported()))


@needs_proc
def test_cpu_peak_memory_tells_naive_from_chunked() -> None:
    # Large enough that naive's score matrices dwarf a fresh process's allocator noise (thread arenas and
    # stacks touched on first use: up to ~10 MiB seen in full-suite runs).
    case = Case(1, 2048, 2, 16, dtype="fp32")
    scores = 2 * 2048 * 2048 * 4  # one (heads, seqlen, seqlen) fp32 matrix: 32 MiB
    # Fresh processes: in this one, memory freed by earlier tests can be reused and hide allocations.
    with CpuMemoryProbe() as probe:
        naive = probe.measure(case, "naive", "fwd")
        chunked = probe.measure(case, "test-chunked", "fwd")
    assert naive["status"] == chunked["status"] == "ok"
    assert naive["input_bytes"] == 3 * 2048 * 2 * 16 * 4
    assert naive["mem_above_bytes"] >= scores
    assert chunked["mem_above_bytes"] < naive["mem_above_bytes"] / 2
    assert naive["mem_peak_bytes"] > naive["mem_above_bytes"]


@needs_proc
def test_cpu_peak_memory_in_fresh_subprocesses() -> None:
    small, big = Case(1, 128, 2, 16, dtype="fp32"), Case(1, 1024, 2, 16, dtype="fp32")
    with CpuMemoryProbe() as probe:
        a = probe.measure(small, "naive", "fwd")
        b = probe.measure(big, "naive", "fwd")
        again = probe.measure(small, "naive", "fwd")  # a fresh process: big's memory is not in it
        oom = probe.measure(Case(1, 64, 1, 8, dtype="fp32"), "test-oom", "fwd")  # plugin loaded in the child
        bwd = probe.measure(small, "naive", "fwd+bwd")
    assert a["status"] == b["status"] == again["status"] == bwd["status"] == "ok"
    assert b["mem_above_bytes"] > 2 * 1024 * 1024 * 4  # at least one 8 MiB score matrix
    assert again["mem_above_bytes"] < b["mem_above_bytes"] / 4
    assert oom["status"] == "oom" and "out of memory" in oom["message"]
