"""Host time per call on a GPU: where does an eager flashlab call spend its CPU time?

    python benchmarks/host_overhead.py [--out DIR]

At short sequences a call is host-bound when its host time exceeds the kernel time: the GPU then
waits for launches and ``do_bench`` measures the host. Each entry runs back-to-back calls on a tiny
shape without synchronizing (the host's rate). The flashlab forward and forward+backward are then
profiled with cProfile (top functions by own time) and torch.profiler (CPU and CUDA time per op
and kernel), written to DIR/host_profile.txt. "op ..." entries call ``flashlab::attn_fwd`` through
the dispatcher with its registered autograd (the traced path) for comparison with the eager one.

A breakdown of the training call follows (``breakdown``): the backward alone (autograd.grad on a
kept graph, flashlab and SDPA), ``_launch_bwd`` called directly (no autograd), forward, forward +
backward and decoding without launch plans (``FLASHLAB_LAUNCH_PLANS=0``, launch_plans.py), forward +
backward with every kernel launch replaced by a no-op (the Python and torch part of the host time;
with and without plans), and one forward launch four ways: Triton's ``kernel[grid](...)``,
flashlab's cached ``launch``, the compiled kernel's runner alone (Triton's C launcher) and the
cache key alone.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import flashlab
from flashlab import ops
from flashlab.decoding import flash_attn_with_kvcache
from flashlab.kernels import launch as launch_module

CALLS = 300


@triton.jit
def _tiny_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)


def per_call_us(fn, calls: int = CALLS) -> float:
    """Mean host time of ``fn`` over back-to-back calls (the GPU never waits for the host here:
    the shapes are tiny, so the loop measures the host)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashlab::attn_fwd`` through the dispatcher, causal, default scale."""
    return torch.ops.flashlab.attn_fwd(q, k, v, None, None, 0, 0, q.shape[-1] ** -0.5, True, True, -1, -1, 0.0,
                                       None, None, 0.0, 0)


def entries() -> dict[str, object]:
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 128, 8, 64, device=dev, dtype=dt) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    qtg, ktg, vtg = (t.clone().requires_grad_() for t in (qt, kt, vt))
    kc = torch.randn(1, 1024, 8, 64, device=dev, dtype=dt)
    lens = torch.full((1,), 1024, dtype=torch.int32, device=dev)
    q1 = torch.randn(1, 1, 8, 64, device=dev, dtype=dt)

    def fwd_bwd() -> None:
        flashlab.flash_attn_func(qg, kg, vg, causal=True).sum().backward()

    def sdpa_fwd_bwd() -> None:
        F.scaled_dot_product_attention(qtg, ktg, vtg, is_causal=True).sum().backward()

    def op_fwd_bwd() -> None:  # the op's registered autograd (what traced code uses), called eagerly
        op_fwd(qg, kg, vg)[0].sum().backward()

    def fwd_no_grad() -> None:
        with torch.no_grad():
            flashlab.flash_attn_func(q, k, v, causal=True)

    return {
        "flashlab fwd": lambda: flashlab.flash_attn_func(q, k, v, causal=True),
        "flashlab fwd (no_grad)": fwd_no_grad,
        "flashlab fwd (grad inputs)": lambda: flashlab.flash_attn_func(qg, kg, vg, causal=True),
        "flashlab fwd+bwd": fwd_bwd,
        "op fwd (grad inputs)": lambda: op_fwd(qg, kg, vg),
        "op fwd+bwd": op_fwd_bwd,
        "flashlab sdpa layout": lambda: flashlab.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        "flashlab kvcache": lambda: flash_attn_with_kvcache(q1, kc, kc, cache_seqlens=lens),
        "torch sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        "torch sdpa fwd+bwd": sdpa_fwd_bwd,
        "torch matmul (launch floor)": lambda: torch.matmul(qt, kt.transpose(-1, -2)),
        "triton tiny kernel (3 args)": lambda: _tiny_kernel[(1,)](lens, 1, BLOCK=16),
    }


def breakdown() -> dict[str, float]:
    """Host µs per call of the parts of a training call (module docstring)."""
    dev, dt = "cuda", torch.bfloat16
    q, k, v, g = (torch.randn(1, 128, 8, 64, device=dev, dtype=dt) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qt, kt, vt, gt = (t.transpose(1, 2).contiguous() for t in (q, k, v, g))
    qtg, ktg, vtg = (t.clone().requires_grad_() for t in (qt, kt, vt))
    out = flashlab.flash_attn_func(qg, kg, vg, causal=True)
    out_t = F.scaled_dot_product_attention(qtg, ktg, vtg, is_causal=True)
    o, lse = ops._launch_fwd(q, k, v, None, None, 0, 0, 0.125, True, True, -1, -1, 0.0, None, None, 0.0, 0)
    rows = {
        "flashlab bwd only (autograd.grad)": per_call_us(
            lambda: torch.autograd.grad(out, (qg, kg, vg), g, retain_graph=True)),
        "torch sdpa bwd only (autograd.grad)": per_call_us(
            lambda: torch.autograd.grad(out_t, (qtg, ktg, vtg), gt, retain_graph=True)),
        "flashlab _launch_bwd direct": per_call_us(
            lambda: ops._launch_bwd(g, q, k, v, o, lse, None, None, None, 0, 0, 0.125, True, True, -1, -1, 0.0,
                                    None, None, 0.0, 0)),
    }

    def fwd_bwd() -> None:
        torch.autograd.grad(flashlab.flash_attn_func(qg, kg, vg, causal=True), (qg, kg, vg), g)

    kc = torch.randn(1, 1024, 8, 64, device=dev, dtype=dt)
    lens = torch.full((1,), 1024, dtype=torch.int32, device=dev)

    def decode() -> None:
        flash_attn_with_kvcache(q[:, :1], kc, kc, cache_seqlens=lens)

    real_launch, real_run_compiled = launch_module.launch, launch_module.run_compiled
    calls = []
    try:
        os.environ["FLASHLAB_LAUNCH_PLANS"] = "0"
        rows["flashlab fwd, no launch plans"] = per_call_us(lambda: flashlab.flash_attn_func(q, k, v, causal=True))
        rows["flashlab fwd+bwd, no launch plans"] = per_call_us(fwd_bwd)
        rows["flashlab kvcache, no launch plans"] = per_call_us(decode)
        launch_module.launch = lambda *a, **kw: None
        rows["flashlab fwd+bwd, launches stubbed, no plans"] = per_call_us(fwd_bwd)
        del os.environ["FLASHLAB_LAUNCH_PLANS"]
        # Plans recorded earlier replay through the compiled runners: stub those as well (round 6's
        # run stubbed only launch() and so timed real launches in this row).
        launch_module.run_compiled = lambda *a: None
        rows["flashlab fwd+bwd, launches stubbed"] = per_call_us(fwd_bwd)
        rows["flashlab kvcache, launches stubbed"] = per_call_us(decode)  # its Python and torch part
        launch_module.run_compiled = real_run_compiled
        launch_module.launch = lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw))
        os.environ["FLASHLAB_LAUNCH_PLANS"] = "0"
        ops._launch_fwd(q, k, v, None, None, 0, 0, 0.125, True, True, -1, -1, 0.0, None, None, 0.0, 0)
    finally:
        launch_module.launch, launch_module.run_compiled = real_launch, real_run_compiled
        os.environ.pop("FLASHLAB_LAUNCH_PLANS", None)
    kernel, grid, a, kw = calls[0]
    rows["one fwd launch: kernel[grid](...)"] = per_call_us(lambda: kernel[grid](*a, **kw))
    rows["one fwd launch: flashlab launch"] = per_call_us(lambda: launch_module.launch(kernel, grid, *a, **kw))
    key = (kernel, torch.cuda.current_device(), tuple(kw.items()), tuple(map(launch_module._spec, a)))
    hit = launch_module._compiled.get(key)  # filled by the launches just timed (unless FLASHLAB_TRITON_LAUNCH=1)
    if hit is not None:
        compiled, tail = hit
        grid3 = (*grid, 1, 1)[:3]
        rows["one fwd launch: compiled runner only"] = per_call_us(lambda: compiled[grid3](*a, *tail))
        rows["one fwd launch: its key only"] = per_call_us(
            lambda: (kernel, torch.cuda.current_device(), tuple(kw.items()), tuple(map(launch_module._spec, a))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [{"name": name, "host_us_per_call": per_call_us(fn)} for name, fn in entries().items()]
    try:
        rows += [{"name": name, "host_us_per_call": us} for name, us in breakdown().items()]
    except Exception as e:  # a diagnostic: keep the rest of the run
        print(f"breakdown failed: {type(e).__name__}: {e}")
    for r in rows:
        print(f"{r['name']:<36} {r['host_us_per_call']:8.1f} µs/call")
    text = io.StringIO()
    for name in ("flashlab fwd", "flashlab fwd+bwd"):
        fn = entries()[name]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(CALLS):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text.write(f"== cProfile: {name}, {CALLS} calls\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    text.write(device_profile(entries()["flashlab fwd+bwd"]))
    print(text.getvalue()[-8000:])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.json").write_text(json.dumps(rows, indent=1))
        (args.out / "host_profile.txt").write_text(text.getvalue())


def device_profile(fn, calls: int = 20) -> str:
    """torch.profiler's table for ``fn``: CPU and CUDA time per op and kernel (is a slow call
    waiting on the host or on a kernel?)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    return f"== torch.profiler: {calls} calls, by CUDA time\n{table}\n"


if __name__ == "__main__":
    main()
