"""Experiment (issue 5): the backward in Gluon for Hopper — a dK/dV kernel and a dQ kernel — with
the Gluon forward's structure (src/flashlab/kernels/forward_gluon.py; docs/perf-notes.md round 8,
experiment 10). The kernels are in gluon_bwd_kernels.py; this file launches, checks and times them.

dK/dV: one program per 128 keys and (kv head, batch): a 1-warp producer loads the program's K and V once,
then streams (Q_i, dO_i) tiles of 64 query rows by TMA through a ring of stages (full / empty
mbarriers); two 4-warp consumers own 64 keys each and never wait for each other. Per query tile a
consumer computes, in the keys-as-rows orientation (so P and dS are register operands):

    Sᵀ = K Qᵢᵀ,  dPᵀ = V dOᵢᵀ                      (issued together, asynchronously)
    Pᵀ = exp2(Sᵀ · scale · log2 e − LSEᵢ · log2 e),  dSᵀ = Pᵀ ⊙ (dPᵀ − Δᵢ)
    dV += Pᵀ dOᵢ,  dK += dSᵀ Qᵢ                     (left in flight under the next tile's Sᵀ, dPᵀ)

with Δ = rowsum(dO ⊙ O) and the forward's LSE; dK is scaled once at the end. GQA loops over the
group's query heads inside the program.

dQ: one program per 128 query rows (two consumers of 64), Q and dO loaded once, K and V streamed:
S = Q Kⱼᵀ and dP = dO Vⱼᵀ together, then dQ += dS Kⱼ left in flight (FA2's separate-kernel split: no
atomics, S and dP computed twice in all).

Scope as the forward's: head dims 64 / 128, causal only square, any lengths, dense inputs with q /
dO and k / v each in one memory order. Never run on a GPU (written 2026-12-02 after the device
budget was spent): `--compile-only` compiles both for sm_90; on a GPU the script checks dQ, dK, dV
against the fp64 reference and times them beside flashlab's whole backward and SDPA's.

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
from triton.experimental.gluon import language as gl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_bwd_kernels import attn_bwd_dkdv_gluon_kernel, attn_bwd_dq_gluon_kernel  # noqa: E402

BLOCK_N, MAXNREG = 128, 168
# head dim -> [(query rows a tile, ring stages)], the default first. d128 with 64-row tiles spills
# 140 B (508 causal) in the consumers by ptxas (dK and dV take 128 of their 240 registers); 32 rows: 0 (4).
TILES = {64: [(64, 3)], 128: [(32, 4), (64, 3)]}
# The dQ kernel: 128 query rows a program (64 a consumer); head dim -> [(keys a block, ring stages)].
DQ_BLOCK_M = 128
DQ_TILES = {64: [(128, 3)], 128: [(64, 3), (128, 2)]}


def gluon_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
               lse: torch.Tensor, causal: bool, softmax_scale: float,
               tiles: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dK, dV) for (batch, seqlen, heads, head_dim) fp16/bf16 CUDA tensors; ``lse`` (batch, heads,
    seqlen_q) fp32 from the forward (natural log); ``tiles`` one of TILES[head_dim]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from flashlab.gluon_forward import rows_view

    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    block_m, stages = tiles or TILES[head_dim][0]
    if causal and seqlen_q != seqlen_k:
        raise ValueError("the experiment takes causal only with seqlen_q == seqlen_k")
    views = [rows_view(t) for t in (q, dout, k, v)]
    if any(x is None for x in views) or views[0][1:] != views[1][1:] or views[2][1:] != views[3][1:]:
        raise ValueError("the experiment needs dense inputs, q / dout and k / v each in one memory order")
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # rowsum(dO ⊙ O), (B, H, Sq)
    gl_dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, head_dim], gl_dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N // 2, head_dim], gl_dtype)
    q_desc, do_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [block_m, head_dim], q_layout)
                       for t, *_ in views[:2])
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [BLOCK_N // 2, head_dim], kv_layout)
                      for t, *_ in views[2:])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if dk.stride() != k.stride() or dv.stride() != k.stride():
        dk, dv = (torch.empty(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
        if dk.stride() != k.stride():
            raise ValueError("the experiment stores dK / dV with k's strides: pass a contiguous k")
    (_, q_rows_b, q_rows_h, q_col_h), (_, k_rows_b, k_rows_h, k_col_h) = views[0], views[2]
    lse = lse.contiguous()
    attn_bwd_dkdv_gluon_kernel[(triton.cdiv(seqlen_k, BLOCK_N), kv_heads, batch)](
        q_desc, do_desc, k_desc, v_desc, lse, delta, dk, dv, lse.stride(0), lse.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), q_rows_b, q_rows_h, q_col_h, k_rows_b, k_rows_h, k_col_h,
        seqlen_q, seqlen_k, heads // kv_heads, softmax_scale * 1.4426950408889634, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=BLOCK_N, STAGES=stages, CAUSAL=bool(causal),
        num_warps=4, maxnreg=MAXNREG)
    return dk, dv


def gluon_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             lse: torch.Tensor, causal: bool, softmax_scale: float,
             tiles: tuple[int, int] | None = None) -> torch.Tensor:
    """dQ for the same inputs as gluon_dkdv; ``tiles`` one of DQ_TILES[head_dim]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from flashlab.gluon_forward import rows_view

    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    block_n, stages = tiles or DQ_TILES[head_dim][0]
    views = [rows_view(t) for t in (q, dout, k, v)]
    if any(x is None for x in views) or views[0][1:] != views[1][1:] or views[2][1:] != views[3][1:]:
        raise ValueError("the experiment needs dense inputs, q / dout and k / v each in one memory order")
    if causal and seqlen_q != seqlen_k:
        raise ValueError("the experiment takes causal only with seqlen_q == seqlen_k")
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    gl_dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_layout = gl.NVMMASharedLayout.get_default_for([DQ_BLOCK_M // 2, head_dim], gl_dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl_dtype)
    q_desc, do_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [DQ_BLOCK_M // 2, head_dim], q_layout)
                       for t, *_ in views[:2])
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [block_n, head_dim], kv_layout)
                      for t, *_ in views[2:])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    (_, q_rows_b, q_rows_h, q_col_h), (_, k_rows_b, k_rows_h, k_col_h) = views[0], views[2]
    lse = lse.contiguous()
    attn_bwd_dq_gluon_kernel[(triton.cdiv(seqlen_q, DQ_BLOCK_M), heads, batch)](
        q_desc, do_desc, k_desc, v_desc, lse, delta, dq, lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2), q_rows_b, q_rows_h, q_col_h, k_rows_b, k_rows_h, k_col_h,
        seqlen_q, seqlen_k, heads // kv_heads, softmax_scale * 1.4426950408889634, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_M=DQ_BLOCK_M, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        num_warps=4, maxnreg=MAXNREG)
    return dq


def compile_only() -> None:
    """Compile for sm_90 as a launch specializes it: shared memory, registers, ptxas's C7514 note."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gluon_forward import wgmma_serialized
    from kernel_compile import ptxas_resources

    kinds = (("fp16", False), ("bf16", True))
    points = [("dkdv", attn_bwd_dkdv_gluon_kernel, d, bm, BLOCK_N, st, bm, BLOCK_N // 2, c)
              for d, ts in TILES.items() for bm, st in ts for c in kinds]
    points += [("dq", attn_bwd_dq_gluon_kernel, d, DQ_BLOCK_M, bn, st, DQ_BLOCK_M // 2, bn, c)
               for d, ts in DQ_TILES.items() for bn, st in ts for c in kinds]
    for what, kern, head_dim, block_m, block_n, stages, q_rows, kv_rows, (ty, causal) in points:
        names = list(kern.arg_names)
        torch_ty, gl_ty = (torch.float16, gl.float16) if ty == "fp16" else (torch.bfloat16, gl.bfloat16)
        blocks = {"q_desc": q_rows, "do_desc": q_rows, "k_desc": kv_rows, "v_desc": kv_rows}
        consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages, "CAUSAL": causal}
        sig = {}
        for n in names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in blocks:
                shape = [blocks[n], head_dim]
                layout = gl.NVMMASharedLayout.get_default_for(shape, gl_ty)
                sig[n] = mangle_type(TensorDescriptor.from_tensor(torch.empty(1024, 1024, dtype=torch_ty), shape,
                                                                  layout))
            else:
                sig[n] = {"LSE": "*fp32", "DELTA": "*fp32", "DK": f"*{ty}", "DV": f"*{ty}", "DQ": f"*{ty}",
                          "qk_scale": "fp32", "softmax_scale": "fp32"}.get(n, "i32")
        src = GluonASTSource(kern, sig, {(names.index(n),): v for n, v in consts.items()}, {})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAXNREG})
        ptx = kernel.asm["ptx"]
        regs = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*[.]u32\s*(\d+)", ptx)})
        serialized = " WGMMA SERIALIZED (ptxas C7514)" if wgmma_serialized(ptx) else ""
        mask = "causal" if causal else "full"
        print(f"{what} d{head_dim} {block_m} x {block_n} tiles, {stages} stages, {ty} {mask}: "
              f"shared {kernel.metadata.shared} B, "
              f"setmaxnreg {regs}, {ptxas_resources(ptx, 90)}{serialized}", flush=True)


def _time_point(head_dim: int, causal: bool, seqlen: int) -> dict[str, float]:
    """Median ms of the Gluon dK/dV and dQ kernels (each tile choice), flashlab's whole backward and
    SDPA's backends' backward on one point of the FlashAttention grid (16k tokens, heads × head dim =
    2048, fp16)."""
    import torch.nn.functional as F
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
    line = {f"gluon dK/dV {t[0]}x{t[1]}": timed(lambda t=t: gluon_dkdv(q, k, v, out, g, lse, causal, scale, t))
            for t in TILES[head_dim]}
    line.update({f"gluon dQ {t[0]}x{t[1]}": timed(lambda t=t: gluon_dq(q, k, v, out, g, lse, causal, scale, t))
                 for t in DQ_TILES[head_dim]})
    fl_out = flashlab.flash_attn_func(q, k, v, causal=causal)
    line["flashlab bwd"] = timed(lambda: torch.autograd.grad(fl_out, (q, k, v), g, retain_graph=True))
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
            (1, 4096, 4096, 8, 2, 64, torch.float16, False), (1, 300, 300, 2, 2, 64, torch.bfloat16, True)]:
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
        runs = [(t, ("k", "v"), gluon_dkdv(q.detach(), k.detach(), v.detach(), out, g, lse, causal, scale, t))
                for t in TILES[head_dim]]
        runs += [(t, ("q",), (gluon_dq(q.detach(), k.detach(), v.detach(), out, g, lse, causal, scale, t),))
                 for t in DQ_TILES[head_dim]]
        for tiles, which, got in runs:
            for w, a in zip(which, got):
                name, r, s = f"d{w}", want[w], same[w]
                check = accuracy_check(a, r, s, factor=3.0)
                ok &= check.ok and not a.isnan().any().item()
                rows.append({"kind": "check", "grad": name, "tiles": list(tiles), "ok": check.ok,
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
            best = sum(min(ms for n, ms in line.items() if n.startswith(f"gluon {k}")) for k in ("dK/dV", "dQ"))
            # The backward's work by the usual convention: 2.5 × the forward's (5 matmuls; dQ's kernel
            # recomputes S and dP, 2 more, not counted).
            print(f"d{head_dim} {'causal' if causal else 'full'} {seqlen}: "
                  + "  ".join(f"{n} {ms:.3f}" for n, ms in line.items())
                  + f" ms; TFLOP/s: gluon dK/dV + dQ {2.5 * work / best / 1e9:.0f}, flashlab bwd "
                  f"{2.5 * work / line['flashlab bwd'] / 1e9:.0f}, "
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
