"""The Gluon backward (issue 5; src/flashlab/kernels/backward_gluon.py, Hopper's default at head dim
128, and the one-kernel backward_gluon_fused.py beside it): compile the kernels for sm_90 without a
GPU, or check dQ, dK, dV against the fp64 reference on odd shapes and time them beside flashlab's
`tl` backward and SDPA's (docs/perf-notes.md round 8, experiment 10; rounds 9 and 10).

Usage:
  PYTHONPATH=src python3 benchmarks/gluon_backward.py --compile-only
  PYTHONPATH=src python3 benchmarks/gluon_backward.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flashlab.gluon_backward import (  # noqa: E402
    DKDV_BLOCK_N,
    DKDV_TILES,
    DQ_BLOCK_M,
    FUSED_TILES,
    launch_bwd_gluon,
    launch_bwd_gluon_fused,
)
from flashlab.kernels.backward_gluon import attn_bwd_dkdv_gluon_kernel, attn_bwd_dq_gluon_kernel  # noqa: E402
from flashlab.kernels.backward_gluon_fused import attn_bwd_fused_gluon_kernel  # noqa: E402

# head dim -> [(dK/dV tiles, dQ tiles)] timed, the shipped ones (gluon_backward.py) first. dK/dV tiles:
# (query rows, stages) of 128-key programs; dQ tiles: (keys a block, stages) of 128-row programs.
# The fused kernel's (query rows, stages, dS buffers) are 3-tuples beside them (head dim 128 only).
VARIANTS = {64: [((64, 3), (128, 3))],
            128: [((64, 3), (128, 2)), FUSED_TILES, (32, 4, 2)]}


def gluon_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                   lse: torch.Tensor, causal: bool, softmax_scale: float, tiles=None,
                   delta: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(dQ, dK, dV) by the Gluon kernels for (batch, seqlen, heads, head_dim) CUDA tensors; ``lse``
    (batch, heads, seqlen_q) from the forward; ``tiles`` one of VARIANTS[head_dim]; ``delta``
    rowsum(dO ⊙ O) as (batch, heads, seqlen_q), computed here if not given."""
    if delta is None:
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    lse = lse.contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    tiles = tiles or VARIANTS[q.shape[-1]][0]
    if len(tiles) > 2:
        launch_bwd_gluon_fused(q, k, v, dout, dq, dk, dv, lse, delta, (lse.stride(0), lse.stride(1)), softmax_scale,
                               causal, tiles=tiles)
        return dq, dk, dv
    dkdv_tiles, dq_tiles = tiles
    launch_bwd_gluon(q, k, v, dout, dq, dk, dv, lse, delta, (lse.stride(0), lse.stride(1)), softmax_scale, causal,
                     dkdv_tiles=dkdv_tiles, dq_tiles=dq_tiles)
    return dq, dk, dv


def compile_only() -> None:
    """Compile both kernels for sm_90 as a launch specializes them, each tile choice and mask."""
    from gluon_forward import compile_report

    kinds = (("fp16", False), ("bf16", True))
    dkdv = {(d, t[0]) for d, vs in VARIANTS.items() for t in vs if len(t) == 2}
    dq = {(d, t[1]) for d, vs in VARIANTS.items() for t in vs if len(t) == 2}
    points = [("dkdv", attn_bwd_dkdv_gluon_kernel, d, bm, DKDV_BLOCK_N, st, bm, DKDV_BLOCK_N // 2, c)
              for d, (bm, st) in sorted(dkdv) for c in kinds]
    points += [("dq", attn_bwd_dq_gluon_kernel, d, DQ_BLOCK_M, bn, st, DQ_BLOCK_M // 2, bn, c)
               for d, (bn, st) in sorted(dq) for c in kinds]
    points += [("fused", attn_bwd_fused_gluon_kernel, d, t[0], DKDV_BLOCK_N, t[1:], t[0], DKDV_BLOCK_N // 2, c)
               for d, vs in VARIANTS.items() for t in vs if len(t) > 2 for c in kinds]
    types = {"LSE": "*fp32", "DELTA": "*fp32", "DK": "*{ty}", "DV": "*{ty}", "DQ": "*{ty}", "DQ_ACC": "*fp32",
             "qk_scale": "fp32", "softmax_scale": "fp32"}
    # The dK/dV kernels with a split GQA group (group_split.py), at head dim 128's shipped tiles.
    points += [(what + " split", kernel, 128, bm, bn, st, qr, kr, ("bf16", True))
               for what, kernel, d, bm, bn, st, qr, kr, (ty, causal) in points
               if what in ("dkdv", "fused") and d == 128 and causal and st in (DKDV_TILES[128][1], FUSED_TILES[1:])]
    for what, kernel, head_dim, block_m, block_n, stages, q_rows, kv_rows, (ty, causal) in points:
        blocks = {"q_desc": [q_rows, head_dim], "do_desc": [q_rows, head_dim], "k_desc": [kv_rows, head_dim],
                  "v_desc": [kv_rows, head_dim]}
        # Full rows compile the tile-multiple kernels, causal rows the ragged ones (EVEN off).
        consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "CAUSAL": causal, "EVEN": not causal}
        if what != "dq":
            consts["SPLIT"] = what.endswith("split")
        if what.startswith("fused"):
            stages, consts["NBUF"] = stages
        consts["STAGES"] = stages
        # A launch finds the dQ accumulator's dim stride 16-divisible: 16-byte atomics.
        report = compile_report(kernel, consts, blocks, ty, types, divisible=("stride_ad",))
        buffers = f", {consts['NBUF']} dS buffers" if "NBUF" in consts else ""
        print(f"{what} d{head_dim} {block_m} x {block_n} tiles, {stages} stages{buffers}, {ty} "
              f"{'causal, ragged' if causal else 'full, even'}: {report}", flush=True)


def _time_point(head_dim: int, causal: bool, seqlen: int) -> dict[str, float]:
    """Median ms of the Gluon backward's two kernels (each tile choice; Δ given, not timed), flashlab's
    whole `tl` backward (the Gluon one switched off) and SDPA's backends' backward on one point of
    the FlashAttention grid (16k tokens, heads × head dim = 2048, fp16)."""
    import torch.nn.functional as F
    from kernel_check import with_env
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashlab

    heads, batch = 2048 // head_dim, 16384 // seqlen
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    scale = head_dim ** -0.5
    out, lse = flashlab.ops.attention_forward(q.detach(), k.detach(), v.detach(), scale, causal, True)
    g = torch.randn_like(out)

    def timed(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    delta = (g.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # the `tl` preprocess's job
    line = {f"gluon {t}": timed(lambda t=t: gluon_backward(q, k, v, out, g, lse, causal, scale, t, delta))
            for t in VARIANTS[head_dim]}
    fl_out = flashlab.flash_attn_func(q, k, v, causal=causal)
    line["tl bwd"] = timed(with_env(lambda: torch.autograd.grad(fl_out, (q, k, v), g, retain_graph=True),
                                    "FLASHLAB_BWD_GLUON", "0"))
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    backends = (("sdpa-flash bwd", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn bwd", SDPBackend.CUDNN_ATTENTION))
    for name, backend in backends:
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            line[name] = timed(lambda o=o: torch.autograd.grad(o, (qt, kt, vt), g.transpose(1, 2), retain_graph=True))
    return line


def check_and_time(out_dir: Path) -> None:
    """dQ, dK, dV by the accuracy rule (fp64 reference, same-dtype naive attention) on odd shapes,
    then the kernels' times beside flashlab's whole backward and SDPA's backends' (same run)."""
    import flashlab
    from flashlab.reference import accuracy_check, naive_attention, reference_attention

    rows: list[dict] = [{"kind": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__}]
    ok = True
    for batch, sq, sk, heads, kv_heads, head_dim, dtype, causal in [
            (2, 1024, 1024, 8, 8, 128, torch.bfloat16, False), (2, 1024, 1024, 8, 8, 128, torch.float16, True),
            (1, 1100, 1100, 6, 2, 128, torch.bfloat16, True), (3, 1030, 2049, 4, 1, 128, torch.float16, False),
            (1, 4096, 4096, 8, 2, 64, torch.float16, False), (1, 300, 300, 2, 2, 64, torch.bfloat16, True),
            (1, 1030, 2100, 4, 2, 128, torch.bfloat16, True)]:  # causal bottom-right with a key prefix
        torch.manual_seed(sq + sk)
        q = torch.randn(batch, sq, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(batch, sk, kv_heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                for _ in range(2))
        scale = head_dim ** -0.5
        out, lse = flashlab.ops.attention_forward(q.detach(), k.detach(), v.detach(), scale, causal, True)
        g = torch.randn_like(out)
        ref = reference_attention(q, k, v, dtype=torch.float64, causal=causal)
        low = naive_attention(q, k, v, causal=causal)
        want = dict(zip("qkv", torch.autograd.grad(ref, (q, k, v), g.double())))
        same = dict(zip("qkv", torch.autograd.grad(low, (q, k, v), g)))
        for tiles in VARIANTS[head_dim]:
            got = gluon_backward(q.detach(), k.detach(), v.detach(), out, g, lse, causal, scale, tiles)
            for w, a in zip("qkv", got):
                name, r, s = f"d{w}", want[w], same[w]
                check = accuracy_check(a, r, s, factor=3.0)
                ok &= check.ok and not a.isnan().any().item()
                rows.append({"kind": "check", "grad": name, "tiles": str(tiles), "ok": check.ok,
                             "shape": [batch, sq, sk, heads, kv_heads, head_dim], "dtype": str(dtype),
                             "causal": causal, "detail": str(check)})
                print("check", "PASS" if check.ok else "FAIL", name, tiles, rows[-1]["shape"], dtype,
                      "causal" if causal else "full", check, flush=True)
    if ok:
        for head_dim, causal, seqlen in itertools.product((64, 128), (False, True), (2048, 8192, 16384)):
            line = _time_point(head_dim, causal, seqlen)
            for name, ms in line.items():
                rows.append({"kind": "time", "what": name, "d": head_dim, "causal": causal, "seqlen": seqlen,
                             "ms": ms})
            heads, batch = 2048 // head_dim, 16384 // seqlen
            work = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)  # the forward's FLOPs
            best = min(ms for n, ms in line.items() if n.startswith("gluon"))
            # The backward's work by the usual convention: 2.5 × the forward's (5 matmuls; dQ's kernel
            # recomputes S and dP, 2 more, not counted).
            print(f"d{head_dim} {'causal' if causal else 'full'} {seqlen}: "
                  + "  ".join(f"{n} {ms:.3f}" for n, ms in line.items())
                  + f" ms; TFLOP/s: gluon {2.5 * work / best / 1e9:.0f}, tl bwd "
                  f"{2.5 * work / line['tl bwd'] / 1e9:.0f}, "
                  f"cuDNN {2.5 * work / line['sdpa-cudnn bwd'] / 1e9:.0f}", flush=True)
    else:
        print("correctness FAILED: not timed")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gluon_backward.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("gluon-backward"))
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
    else:
        check_and_time(args.out)


if __name__ == "__main__":
    main()
