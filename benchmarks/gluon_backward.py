"""Experiment (issue 5): the dK/dV half of the backward in Gluon for Hopper, with the Gluon
forward's structure (src/flashlab/kernels/forward_gluon.py; docs/perf-notes.md round 8).

One program per 128 keys and (kv head, batch): a 1-warp producer loads the program's K and V once,
then streams (Q_i, dO_i) tiles of 64 query rows by TMA through a ring of stages (full / empty
mbarriers); two 4-warp consumers own 64 keys each and never wait for each other. Per query tile a
consumer computes, in the keys-as-rows orientation (so P and dS are register operands):

    Sᵀ = K Qᵢᵀ,  dPᵀ = V dOᵢᵀ                      (issued together, asynchronously)
    Pᵀ = exp2(Sᵀ · scale · log2 e − LSEᵢ · log2 e),  dSᵀ = Pᵀ ⊙ (dPᵀ − Δᵢ)
    dV += Pᵀ dOᵢ,  dK += dSᵀ Qᵢ                     (left in flight under the next tile's Sᵀ, dPᵀ)

with Δ = rowsum(dO ⊙ O) and the forward's LSE; dK is scaled once at the end. dQ stays with
flashlab's `tl` dQ kernel. GQA loops over the group's query heads inside the program. Scope as
the forward's: head dims 64 / 128, causal only square, any lengths, (batch, seqlen, heads, dim)
inputs, q and dO in the same memory order. Never run on a GPU (written 2026-12-02 after the device
budget was spent): `--compile-only` compiles it for sm_90; on a GPU the script checks dK/dV against
the fp64 reference and times it beside flashlab's whole backward.

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
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)
BLOCK_N, MAXNREG = 128, 168
# head dim -> [(query rows a tile, ring stages)], the default first. d128 with 64-row tiles spills
# 140 B (508 causal) in the consumers by ptxas (dK and dV take 128 of their 240 registers); 32 rows: 0 (4).
TILES = {64: [(64, 3)], 128: [(32, 4), (64, 3)]}


@gluon.jit
def _first_q_block(n0, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """The first query tile that sees any of the keys n0 .. (square causal: query >= key)."""
    if CAUSAL:
        return n0 // BLOCK_M
    return 0


@gluon.jit
def _dkdv_consumer(k_smem, v_smem, q_smem, do_smem, kv_bar, full, empty, LSE, DELTA, DK, DV,
                   stride_lb, stride_lh, stride_kb, stride_ks, stride_kh, off_b, off_hk, key0, n0, group_size,
                   seqlen_q, seqlen_k, qk_scale, softmax_scale, dtype: gl.constexpr, HEAD_DIM: gl.constexpr,
                   BLOCK_M: gl.constexpr, KEYS: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """One consumer warpgroup: keys key0 .. key0 + KEYS over every (query head of the group, query
    tile), then dK, dV of its keys."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    keys = key0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([KEYS, BLOCK_M], gl.float32, layout=s_layout)
    dk = warpgroup_mma_init(gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=o_layout))
    dv = warpgroup_mma_init(gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=o_layout))

    mbarrier.wait(kv_bar, 0)
    i_start = _first_q_block(n0, BLOCK_M, CAUSAL)
    n_q = gl.cdiv(seqlen_q, BLOCK_M)
    it = 0
    for g in range(group_size):
        off_h = off_hk * group_size + g
        lse_base = LSE + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        delta_base = DELTA + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        for i in range(i_start, n_q):
            slot = it % STAGES
            mbarrier.wait(full.index(slot), (it // STAGES) & 1)
            s_tok = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            q_idx = i * BLOCK_M + cols
            in_seq = q_idx < seqlen_q
            lse2 = gl.load(lse_base + q_idx, mask=in_seq, other=0.0) * LOG2E
            delta = gl.load(delta_base + q_idx, mask=in_seq, other=0.0)
            s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])  # the previous tile's dV, dK are done too
            if it > 0:
                # The previous slot's Q and dO have been read by this warpgroup's dV, dK products:
                # its four warps' barrier, then its one arrive (both consumers arrive: count 2).
                gl.thread_barrier()
                mbarrier.arrive(empty.index((it - 1) % STAGES), count=1)
            p = gl.exp2(s * qk_scale - lse2[None, :])
            visible = in_seq[None, :] & (keys[:, None] < seqlen_k)
            if CAUSAL:
                visible = visible & (keys[:, None] <= q_idx[None, :])
            p = gl.where(visible, p, 0.0)
            ds = p * (dp - delta[None, :])
            dv = warpgroup_mma(gl.convert_layout(p.to(dtype), op_layout), do_smem.index(slot), dv, is_async=True)
            dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), q_smem.index(slot), dk, is_async=True)
            it += 1
    dk, dv = warpgroup_mma_wait(0, deps=[dk, dv])

    rows = key0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    offs = (off_b.to(gl.int64) * stride_kb + rows[:, None].to(gl.int64) * stride_ks + off_hk.to(gl.int64) * stride_kh
            + dims[None, :])
    ok = rows[:, None] < seqlen_k
    gl.store(DK + offs, (dk * softmax_scale).to(dtype), mask=ok)
    gl.store(DV + offs, dv.to(dtype), mask=ok)


@gluon.jit
def _dkdv_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k0, k1, v0, v1, kv_bar, full, empty, k_row,
                   k_col, q_rows_b, q_rows_h, q_col_h, off_b, off_hk, n0, group_size, seqlen_q, KEYS: gl.constexpr,
                   BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """One warp: both consumers' K and V halves, then (Q_i, dO_i) of every (query head, tile)."""
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row, k_col], kv_bar, k0)
    tma.async_copy_global_to_shared(k_desc, [k_row + KEYS, k_col], kv_bar, k1)
    tma.async_copy_global_to_shared(v_desc, [k_row, k_col], kv_bar, v0)
    tma.async_copy_global_to_shared(v_desc, [k_row + KEYS, k_col], kv_bar, v1)
    i_start = _first_q_block(n0, BLOCK_M, CAUSAL)
    n_q = gl.cdiv(seqlen_q, BLOCK_M)
    it = 0
    for g in range(group_size):
        off_h = off_hk * group_size + g
        q_row = off_b * q_rows_b + off_h * q_rows_h
        for i in range(i_start, n_q):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            bar = full.index(slot)
            mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + i * BLOCK_M, off_h * q_col_h], bar, q_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [q_row + i * BLOCK_M, off_h * q_col_h], bar, do_smem.index(slot))
            it += 1


@gluon.jit
def attn_bwd_dkdv_gluon_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                               stride_kb, stride_ks, stride_kh, q_rows_b, q_rows_h, q_col_h, k_rows_b, k_rows_h,
                               k_col_h, seqlen_q, seqlen_k, group_size, qk_scale, softmax_scale,
                               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """dK, dV of keys n0 .. n0 + BLOCK_N of kv head program_id(1), batch program_id(2) (module
    docstring). DK / DV are (batch, seqlen_k, kv_heads, head_dim) with K's strides; LSE / DELTA
    (batch, heads, seqlen_q) fp32. Grid: (cdiv(seqlen_k, BLOCK_N), kv_heads, batch); num_warps=4."""
    KEYS: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = q_desc.dtype
    n0 = gl.program_id(0) * BLOCK_N
    off_hk = gl.program_id(1)
    off_b = gl.program_id(2)

    k0 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], k_desc.layout)
    k1 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], k_desc.layout)
    v0 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], v_desc.layout)
    v1 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    fence_async_shared()

    k_row = off_b * k_rows_b + off_hk * k_rows_h + n0
    gl.warp_specialize([
        (_dkdv_consumer, (k0, v0, q_smem, do_smem, kv_bar, full, empty, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                          stride_kb, stride_ks, stride_kh, off_b, off_hk, n0, n0, group_size, seqlen_q, seqlen_k,
                          qk_scale, softmax_scale, dtype, HEAD_DIM, BLOCK_M, KEYS, STAGES, CAUSAL)),
        (_dkdv_consumer, (k1, v1, q_smem, do_smem, kv_bar, full, empty, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                          stride_kb, stride_ks, stride_kh, off_b, off_hk, n0 + KEYS, n0, group_size, seqlen_q,
                          seqlen_k, qk_scale, softmax_scale, dtype, HEAD_DIM, BLOCK_M, KEYS, STAGES, CAUSAL)),
        (_dkdv_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k0, k1, v0, v1, kv_bar, full, empty,
                          k_row, off_hk * k_col_h, q_rows_b, q_rows_h, q_col_h, off_b, off_hk, n0, group_size,
                          seqlen_q, KEYS, BLOCK_M, STAGES, CAUSAL)),
    ], [4, 1], [240, 24])


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

    names = list(attn_bwd_dkdv_gluon_kernel.arg_names)
    points = [(d, t, c) for d, ts in TILES.items() for t in ts for c in (("fp16", False), ("bf16", True))]
    for head_dim, (block_m, stages), (ty, causal) in points:
        torch_ty, gl_ty = (torch.float16, gl.float16) if ty == "fp16" else (torch.bfloat16, gl.bfloat16)
        blocks = {"q_desc": block_m, "do_desc": block_m, "k_desc": BLOCK_N // 2, "v_desc": BLOCK_N // 2}
        consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": BLOCK_N, "STAGES": stages, "CAUSAL": causal}
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
                sig[n] = {"LSE": "*fp32", "DELTA": "*fp32", "DK": f"*{ty}", "DV": f"*{ty}", "qk_scale": "fp32",
                          "softmax_scale": "fp32"}.get(n, "i32")
        src = GluonASTSource(attn_bwd_dkdv_gluon_kernel, sig, {(names.index(n),): v for n, v in consts.items()}, {})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAXNREG})
        ptx = kernel.asm["ptx"]
        regs = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*[.]u32\s*(\d+)", ptx)})
        serialized = " WGMMA SERIALIZED (ptxas C7514)" if wgmma_serialized(ptx) else ""
        print(f"dkdv d{head_dim} {block_m}-row tiles, {stages} stages, {ty} {'causal' if causal else 'full'}: "
              f"shared {kernel.metadata.shared} B, "
              f"setmaxnreg {regs}, {ptxas_resources(ptx, 90)}{serialized}", flush=True)


def _time_point(head_dim: int, causal: bool, seqlen: int) -> dict[str, float]:
    """Median ms of the Gluon dK/dV kernel, flashlab's whole backward and SDPA's backends' backward
    on one point of the FlashAttention grid (16k tokens, heads × head dim = 2048, fp16)."""
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
    """dK, dV by the accuracy rule (fp64 reference, same-dtype naive attention) on odd shapes, then
    the kernel's time beside flashlab's whole backward and SDPA's backends' (same run)."""
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
        want = torch.autograd.grad(ref, (k, v), g.double())
        same = torch.autograd.grad(low, (k, v), g)
        for tiles in TILES[head_dim]:
            got = gluon_dkdv(q.detach(), k.detach(), v.detach(), out, g, lse, causal, scale, tiles)
            for name, a, r, s in zip(("dk", "dv"), got, want, same):
                check = accuracy_check(a, r, s, factor=3.0)
                ok &= check.ok
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
            work = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)  # 2 matmuls' FLOPs
            # dK/dV are 4 of the backward's 5 matmuls (2.5 × the forward's work by the usual convention).
            print(f"d{head_dim} {'causal' if causal else 'full'} {seqlen}: "
                  + "  ".join(f"{n} {ms:.3f} ms" for n, ms in line.items())
                  + f"  gluon dK/dV {2 * work / min(v for n, v in line.items() if n.startswith('gluon')) / 1e9:.0f}"
                  " TFLOP/s (4 matmuls, best tiles)", flush=True)
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
