"""Experiment (round 10): where the fused Gluon backward's time goes, and whether moving its dQ
atomics to the producer warp helps. The fused kernel (kernels/backward_gluon_fused.py) is first
checked against the two-kernel Gluon backward on odd shapes (both writers), then timed on the
FlashAttention grid at head dim 128 (fp16) beside it: WRITER 0 (each consumer adds its dQᵀ) or 1
(consumers stage dQᵀ in shared memory, the producer warp adds it), and ABLATE 1 (the atomics
predicated off) / 2 (no dQ at all) — ablated runs compute wrong dQ: timing only.

Usage: PYTHONPATH=src:benchmarks python3 benchmarks/fused_ablation.py   (Hopper, Triton 3.6)
"""

from __future__ import annotations

import torch
import triton
from gluon_backward import gluon_backward

import flashlab
from flashlab.gluon_backward import launch_bwd_gluon_fused

TWO_KERNEL = ((64, 3), (128, 2))
TIMED = [((64, 2, 2), 0, 0), ((64, 2, 2), 0, 1), ((64, 2, 2), 1, 1), ((64, 2, 2), 2, 0), ((32, 4, 2), 0, 0),
         ((32, 4, 2), 0, 1), ((32, 3, 3), 0, 1), ((64, 2, 3), 0, 1)]  # (tiles, ablate, writer)


def inputs(batch: int, seqlen: int, heads: int, kv_heads: int, causal: bool, dtype: torch.dtype):
    """q, k, v, out, dO, lse, Δ of one point."""
    q = torch.randn(batch, seqlen, heads, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, seqlen, kv_heads, 128, device="cuda", dtype=dtype) for _ in range(2))
    out, lse = flashlab.ops.attention_forward(q, k, v, 128 ** -0.5, causal, True)
    g = torch.randn_like(out)
    delta = (g.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    return q, k, v, out, g, lse.contiguous(), delta


def fused(q, k, v, g, lse, delta, causal: bool, tiles, ablate: int = 0, writer: int = 0):
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    launch_bwd_gluon_fused(q, k, v, g, dq, dk, dv, lse, delta, (lse.stride(0), lse.stride(1)), 128 ** -0.5, causal,
                           tiles=tiles, ablate=ablate, writer=writer)
    return dq, dk, dv


def check() -> bool:
    """Both writers against the two-kernel backward: the largest relative error of each gradient."""
    ok = True
    for batch, seqlen, heads, kv_heads, causal, dtype in ((1, 1100, 6, 2, True, torch.bfloat16),
                                                          (2, 2048, 16, 16, False, torch.float16),
                                                          (1, 1030, 4, 1, False, torch.float16)):
        q, k, v, out, g, lse, delta = inputs(batch, seqlen, heads, kv_heads, causal, dtype)
        want = gluon_backward(q, k, v, out, g, lse, causal, 128 ** -0.5, TWO_KERNEL, delta)
        for tiles, writer in (((64, 2, 2), 0), ((64, 2, 2), 1), ((32, 4, 2), 1)):
            got = fused(q, k, v, g, lse, delta, causal, tiles, writer=writer)
            errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want)]
            bad = any(not e < 2e-2 for e in errs) or any(t.isnan().any().item() for t in got)
            ok &= not bad
            print("check", "FAIL" if bad else "PASS", (batch, seqlen, heads, kv_heads, causal, str(dtype)), tiles,
                  f"writer {writer}", "rel err dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return ok


def point(causal: bool, seqlen: int) -> None:
    """One line: the two-kernel backward and each TIMED variant, ms (TFLOP/s by 2.5×)."""
    q, k, v, out, g, lse, delta = inputs(16384 // seqlen, seqlen, 16, 16, causal, torch.float16)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    line = {"two-kernel": bench(lambda: gluon_backward(q, k, v, out, g, lse, causal, 128 ** -0.5, TWO_KERNEL,
                                                       delta))}
    for tiles, ablate, writer in TIMED:
        line[f"{tiles} a{ablate} w{writer}"] = bench(
            lambda t=tiles, a=ablate, w=writer: fused(q, k, v, g, lse, delta, causal, t, a, w))
    work = 2.5 * 4 * 16384 * 16 * seqlen * 128 / (2 if causal else 1)
    print(f"{'causal' if causal else 'full'} {seqlen}: " + "  ".join(
        f"{n} {ms:.2f} ({work / ms / 1e9:.0f})" for n, ms in line.items()), flush=True)


def main() -> None:
    if not check():
        print("correctness FAILED: not timed")
        return
    print("ms per backward (Δ given); columns: two-kernel, then fused tiles × ablation × writer")
    for causal, seqlen in ((False, 16384), (True, 16384), (False, 4096), (True, 4096)):
        point(causal, seqlen)


if __name__ == "__main__":
    main()
