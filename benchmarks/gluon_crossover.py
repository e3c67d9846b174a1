"""Where the Gluon kernels start to pay (issue 4; gluon_forward.MIN_WORK): the forward and the
training step of flashlab with its Gluon kernels on and off, batch 1, over head counts and sequence
lengths that span the host-bound calls and the kernel-bound ones. Calls are timed back to back
(do_bench medians), so a call whose host time exceeds its kernel's shows its host time: a Gluon
launch costs more host time than a `tl` launch-plan replay.

The floor lifted (MIN_WORK 0) so every call of the sweep in the Gluon scope takes the Gluon kernels.

``--host``: only the host time a call (host_overhead.py's measure), on a call too small to keep
the GPU busy (batch 1 × 1024 tokens × 2 heads × d128), 300 back-to-back calls of each path.

Usage: PYTHONPATH=src python3 benchmarks/gluon_crossover.py [--host]   (a Hopper GPU, Triton 3.6)
"""

from __future__ import annotations

import sys

import torch
import triton
from host_overhead import per_call_us
from kernel_check import under_env

import flashlab
import flashlab.gluon_forward


def switched(fn, on: str):
    """``fn`` with both Gluon switches set to ``on`` ("1" / "0") for the call."""
    return under_env(fn, {"FLASHLAB_FWD_GLUON": on, "FLASHLAB_BWD_GLUON": on})


def host_time() -> None:
    """µs a call of the forward and the training step, Gluon on and off, where the GPU work is
    negligible: the host time of each path."""
    q, k, v = (torch.randn(1, 1024, 2, 128, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return flashlab.flash_attn_func(q, k, v)

    def step():
        return torch.autograd.grad(flashlab.flash_attn_func(q, k, v), (q, k, v), g)
    for on, name in (("1", "gluon"), ("0", "tl")):
        print(f"{name}: forward {per_call_us(switched(fwd, on)):.0f} µs a call, "
              f"step {per_call_us(switched(step, on)):.0f} µs a call", flush=True)


def main() -> None:
    flashlab.gluon_forward.MIN_WORK = 0
    if "--host" in sys.argv:
        host_time()
        return
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")  # noqa: E731
    print("work = 4·B·H·Sq·Sk·D (halved causal); columns: Gluon on, off (`tl`) in µs, and off / on")
    for head_dim, seqlens in ((128, (1024, 2048, 4096, 8192)), (64, (4096, 8192))):
        for heads in (1, 4, 16):
            for seqlen in seqlens:
                for causal in (False, True):
                    q, k, v = (torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.float16,
                                           requires_grad=True) for _ in range(3))
                    g = torch.randn_like(q)

                    def fwd(q=q, k=k, v=v, causal=causal):
                        return flashlab.flash_attn_func(q, k, v, causal=causal)

                    def step(q=q, k=k, v=v, g=g, causal=causal):
                        return torch.autograd.grad(flashlab.flash_attn_func(q, k, v, causal=causal), (q, k, v), g)
                    with torch.no_grad():
                        fwd_on, fwd_off = bench(switched(fwd, "1")), bench(switched(fwd, "0"))
                    step_on, step_off = bench(switched(step, "1")), bench(switched(step, "0"))
                    work = 4 * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
                    print(f"d{head_dim} h{heads:>3} s{seqlen:>5} {'causal' if causal else 'full  '} work {work:.2e} | "
                          f"fwd {fwd_on * 1e3:7.0f} {fwd_off * 1e3:7.0f} {fwd_off / fwd_on:5.2f}x | "
                          f"step {step_on * 1e3:7.0f} {step_off * 1e3:7.0f} {step_off / step_on:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
