"""Experiment (round 10): where the fused Gluon backward's time goes. Times the fused kernel
(kernels/backward_gluon_fused.py) with its parts left out — ABLATE 1: the dQ atomics predicated off;
2: no dQ product, atomics or dS hand-over — beside the two-kernel Gluon backward, on the
FlashAttention grid at head dim 128 (fp16). Ablated runs compute wrong dQ: timing only.

Usage: PYTHONPATH=src:benchmarks python3 benchmarks/fused_ablation.py   (Hopper, Triton 3.6)
"""

from __future__ import annotations

import torch
import triton
from gluon_backward import gluon_backward

import flashlab
from flashlab.gluon_backward import launch_bwd_gluon_fused


def point(causal: bool, seqlen: int) -> None:
    """One line: the two-kernel backward and each fused variant × ablation, ms (TFLOP/s by 2.5×)."""
    if True:
        heads, batch, d = 16, 16384 // seqlen, 128
        q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.float16) for _ in range(3))
        scale = d ** -0.5
        out, lse = flashlab.ops.attention_forward(q, k, v, scale, causal, True)
        g = torch.randn_like(out)
        delta = (g.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        lse = lse.contiguous()
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))

        def bench(fn) -> float:
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        line = {"two-kernel": bench(lambda: gluon_backward(q, k, v, out, g, lse, causal, scale, ((64, 3), (128, 2)),
                                                           delta))}
        for tiles in ((64, 2, 2), (32, 4, 2), (64, 2, 3)):
            for ablate in (0, 1, 2):
                line[f"{tiles} a{ablate}"] = bench(lambda t=tiles, a=ablate: launch_bwd_gluon_fused(
                    q, k, v, g, dq, dk, dv, lse, delta, (lse.stride(0), lse.stride(1)), scale, causal, tiles=t,
                    ablate=a))
        work = 2.5 * 4 * batch * heads * seqlen * seqlen * d / (2 if causal else 1)
        print(f"{'causal' if causal else 'full'} {seqlen}: " + "  ".join(
            f"{n} {ms:.2f} ({work / ms / 1e9:.0f})" for n, ms in line.items()), flush=True)


def main() -> None:
    print("ms per backward (Δ given); columns: two-kernel, then fused tiles × ablation")
    for causal, seqlen in ((False, 16384), (True, 16384), (False, 4096)):
        point(causal, seqlen)


if __name__ == "__main__":
    main()
