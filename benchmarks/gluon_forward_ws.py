"""Experiment (issue 4): the Gluon forward for Hopper with a producer warp (perf-notes round 8).

Round 7's Gluon kernel (gluon_forward.py) issued its cp.async K/V loads from the math warps and
synchronized both warpgroups with CTA barriers twice per key block; its intra-warpgroup overlap
gained nothing (H200, 2026-12-02: d128 overlap 411 vs 420 TFLOP/s without). Here the loads move to
a one-warp producer partition (``gl.warp_specialize``) that streams K/V tiles by TMA into a ring
of shared-memory stages, each stage guarded by two mbarriers: ``full`` (the TMA transaction bytes
landed) and ``empty`` (the consumers are done with it). The consumer partition (8 warps, two
warpgroups over a 128-row query block) keeps round 7's schedule: S_{j+1} = Q·K_{j+1}ᵀ issued
asynchronously before the softmax of S_j, P·V_j left in flight.

Scope as round 7's: no mask or causal (seqlen_q == seqlen_k), head dims 64/128, fp16/bf16, GQA,
seqlens multiples of the tiles, contiguous (batch, seqlen, heads, head_dim) inputs.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634


@gluon.jit
def _kv_blocks(pid_m, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """How many key blocks query block ``pid_m`` visits (both partitions must agree)."""
    n = seqlen_k // BLOCK_N
    if CAUSAL:
        n = gl.minimum(n, (pid_m * BLOCK_M + BLOCK_M + BLOCK_N - 1) // BLOCK_N)
    return n


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, full, empty, q_row, k_row, q_col, k_col,
              n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: Q once, then key block i into ring slot i % STAGES when the consumers freed it."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    for i in range(n_blocks):
        slot = i % STAGES
        # mbarriers start as if phase 1 had completed: the first pass over the ring does not wait.
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = full.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + i * BLOCK_N, k_col], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [k_row + i * BLOCK_N, k_col], bar, v_smem.index(slot))


@gluon.jit
def _softmax_step(s, m_i, l_i, blk, rows_s, cols_s, row0, qk_scale, p_layout: gl.constexpr, dtype: gl.constexpr,
                  BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Online softmax of score tile ``s`` (key block ``blk``): (P as the P·V operand, m, l, alpha)."""
    if CAUSAL:
        if (blk + 1) * BLOCK_N > row0:  # a block that crosses these rows' diagonal
            s = gl.where(blk * BLOCK_N + cols_s[None, :] <= rows_s[:, None], s, float("-inf"))
    m_ij = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_ij[:, None])
    alpha = gl.exp2(m_i - m_ij)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(dtype), p_layout), m_ij, l_i, alpha


@gluon.jit
def _attend(q_smem, k_smem, v_smem, q_bar, full, empty, row0, n_blocks, qk_scale, dtype: gl.constexpr,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            CAUSAL: gl.constexpr):
    """The consumer loop over the ring's key blocks for query rows row0 .. row0 + BLOCK_M (all the
    calling partition's warps); returns (acc, m_i, l_i), acc not yet divided by l.

    FA3's intra-warpgroup order: issue S_{j+1} = Q·K_{j+1}ᵀ, then O += P_j·V_j, wait for S_{j+1}
    only and run its softmax under P_j·V_j, then wait for P_j·V_j, free slot j and rescale O. O's
    registers are touched only with no product in flight: round 8's first order rescaled O while
    S_{j+1} ran, and ptxas serialized every wgmma for it (C7514)."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(full.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
    p_op, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, rows_s, cols_s, row0, qk_scale, p_layout, dtype, BLOCK_N,
                                          CAUSAL)
    for j in range(n_blocks - 1):
        nxt = j + 1
        mbarrier.wait(full.index(nxt % STAGES), (nxt // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(j % STAGES), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # issue order S_{j+1}, P_j·V_j: S_{j+1} is done
        p_op, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, nxt, rows_s, cols_s, row0, qk_scale, p_layout, dtype,
                                              BLOCK_N, CAUSAL)
        acc = warpgroup_mma_wait(0, deps=[acc])
        # Slot j is free once this partition's warps are past P_j·V_j: their barrier, then one arrive
        # (mbarrier.arrive is issued by the partition's first thread).
        gl.thread_barrier()
        mbarrier.arrive(empty.index(j % STAGES), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    last = n_blocks - 1
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc)
    return acc, m_i, l_i


@gluon.jit
def _store_rows(acc, m_i, l_i, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, off_b, off_h, row0,
                dtype: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """O = acc / l and LSE for rows row0 .. row0 + BLOCK_M."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    om = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + off_b.to(gl.int64) * stride_ob + off_h * stride_oh + om[:, None] * stride_os + od[None, :],
             out.to(dtype))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    lm = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + off_b.to(gl.int64) * stride_lb + off_h * stride_lh + lm, lse)


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, full, empty, pid_m, n_blocks, qk_scale, dtype: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr):
    """The default partition of attn_fwd_ws_kernel: both warpgroups over the 128-row block."""
    return _attend(q_smem, k_smem, v_smem, q_bar, full, empty, pid_m * BLOCK_M, n_blocks, qk_scale, dtype, HEAD_DIM,
                   BLOCK_M, BLOCK_N, STAGES, CAUSAL)


@gluon.jit
def attn_fwd_ws_kernel(q_desc, k_desc, v_desc, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                       heads, seqlen_q, seqlen_k, group_size, qk_scale,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """O[b, i, h] = softmax(Q·Kᵀ · scale) · V for one BLOCK_M query block; LSE (natural log).
    q_desc / k_desc / v_desc view the inputs as 2-D (batch · seqlen, heads · head_dim).
    Grid: (seqlen_q / BLOCK_M, heads, batch)."""
    dtype: gl.constexpr = q_desc.dtype

    pid_m = gl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        pid_m = gl.num_programs(0) - 1 - pid_m
    off_h = gl.program_id(1)
    off_b = gl.program_id(2)
    off_hk = off_h // group_size
    n_blocks = _kv_blocks(pid_m, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()  # the barriers' initialization, before the async proxy uses them

    q_row = off_b * seqlen_q + pid_m * BLOCK_M
    k_row = off_b * seqlen_k
    acc, m_i, l_i = gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, full, empty, pid_m, n_blocks, qk_scale, dtype, HEAD_DIM,
                     BLOCK_M, BLOCK_N, STAGES, CAUSAL)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, full, empty, q_row, k_row,
                     off_h * HEAD_DIM, off_hk * HEAD_DIM, n_blocks, BLOCK_N, STAGES)),
    ], [1], [24])

    _store_rows(acc, m_i, l_i, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, off_b, off_h,
                pid_m * BLOCK_M, dtype, HEAD_DIM, BLOCK_M, BLOCK_N)


@gluon.jit
def _half_block(q_smem, k_smem, v_smem, q_bar, full, empty, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb,
                stride_lh, off_b, off_h, row0, n_blocks, qk_scale, dtype: gl.constexpr, HEAD_DIM: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """One consumer warpgroup of the split kernel: its half of the block, then its own epilogue.
    Both warpgroups release each slot (empty barriers count 2), so neither waits for the other:
    their softmaxes drift apart and can run under each other's matrix products (FA3's ping-pong,
    left to the warp schedulers)."""
    acc, m_i, l_i = _attend(q_smem, k_smem, v_smem, q_bar, full, empty, row0, n_blocks, qk_scale, dtype, HEAD_DIM,
                            BLOCK_M, BLOCK_N, STAGES, CAUSAL)
    _store_rows(acc, m_i, l_i, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, off_b, off_h, row0,
                dtype, HEAD_DIM, BLOCK_M, BLOCK_N)


@gluon.jit
def _producer2(q_desc, k_desc, v_desc, q0, q1, k_smem, v_smem, q_bar, full, empty, q_row, k_row, q_col, k_col,
               n_blocks, HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The split kernel's producer: both Q halves, then the K/V ring (as _producer)."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q0)
    tma.async_copy_global_to_shared(q_desc, [q_row + HALF, q_col], q_bar, q1)
    for i in range(n_blocks):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = full.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + i * BLOCK_N, k_col], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [k_row + i * BLOCK_N, k_col], bar, v_smem.index(slot))


@gluon.jit
def attn_fwd_ws2_kernel(q_desc, k_desc, v_desc, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                        heads, seqlen_q, seqlen_k, group_size, qk_scale,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """As attn_fwd_ws_kernel, with the 128-row block split between two independent consumer
    partitions (the default one, 4 warps, and a 4-warp worker); q_desc's blocks are BLOCK_M / 2 rows."""
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    off_h = gl.program_id(1)
    off_b = gl.program_id(2)
    n_blocks = _kv_blocks(pid_m, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

    q0 = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], q_desc.layout)
    q1 = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # one arrive from each consumer warpgroup
    fence_async_shared()

    row0 = pid_m * BLOCK_M
    gl.warp_specialize([
        (_half_block, (q0, k_smem, v_smem, q_bar, full, empty, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb,
                       stride_lh, off_b, off_h, row0, n_blocks, qk_scale, dtype, HEAD_DIM, HALF, BLOCK_N, STAGES,
                       CAUSAL)),
        (_half_block, (q1, k_smem, v_smem, q_bar, full, empty, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb,
                       stride_lh, off_b, off_h, row0 + HALF, n_blocks, qk_scale, dtype, HEAD_DIM, HALF, BLOCK_N,
                       STAGES, CAUSAL)),
        (_producer2, (q_desc, k_desc, v_desc, q0, q1, k_smem, v_smem, q_bar, full, empty, off_b * seqlen_q + row0,
                      off_b * seqlen_k, off_h * HEAD_DIM, (off_h // group_size) * HEAD_DIM, n_blocks, HALF, BLOCK_N,
                      STAGES)),
    ], [4, 1], [240, 24])


# head dim -> (BLOCK_M, BLOCK_N, STAGES, maxnreg, SPLIT); 8 consumer warps + 1 producer warp (12
# warps allocated: maxnreg · 384 threads must fit the 64K-register file). SPLIT: the two consumer
# warpgroups as independent partitions (attn_fwd_ws2_kernel).
WS_VARIANTS = {64: [(128, 128, 3, 168, False), (128, 128, 3, 168, True), (128, 128, 2, 168, True)],
               128: [(128, 128, 2, 168, False), (128, 128, 3, 168, False), (128, 128, 2, 168, True),
                     (128, 128, 3, 168, True)]}


def ws_variant_name(tiles: tuple[int, int, int, int, bool]) -> str:
    return f"ws{'2-' if tiles[4] else ''}{tiles[1]}s{tiles[2]}"


def gluon_ws_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                       softmax_scale: float | None = None, tiles: tuple[int, int, int, int] | None = None,
                       poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for contiguous (batch, seqlen, heads, head_dim) fp16/bf16 CUDA tensors (the
    experiment's scope: see the module docstring)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    block_m, block_n, stages, maxnreg, split = tiles or WS_VARIANTS[head_dim][0]
    if seqlen_q % block_m or seqlen_k % block_n or (causal and seqlen_q != seqlen_k):
        raise ValueError(f"the Gluon experiment needs seqlen_q % {block_m} == seqlen_k % {block_n} == 0 "
                         "(and seqlen_q == seqlen_k when causal)")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("the Gluon experiment needs contiguous q, k, v")
    gl_dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_rows = block_m // 2 if split else block_m  # the split kernel loads each consumer's half
    q_layout = gl.NVMMASharedLayout.get_default_for([q_rows, head_dim], gl_dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl_dtype)
    q_desc = TensorDescriptor.from_tensor(q.view(batch * seqlen_q, heads * head_dim), [q_rows, head_dim], q_layout)
    k_desc = TensorDescriptor.from_tensor(k.view(batch * seqlen_k, kv_heads * head_dim), [block_n, head_dim],
                                          kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(batch * seqlen_k, kv_heads * head_dim), [block_n, head_dim],
                                          kv_layout)
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    kernel = attn_fwd_ws2_kernel if split else attn_fwd_ws_kernel
    kernel[(seqlen_q // block_m, heads, batch)](
        q_desc, k_desc, v_desc, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        heads, seqlen_q, seqlen_k, heads // kv_heads, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        num_warps=4 if split else 8, maxnreg=maxnreg)
    return out, lse


def wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas serializes the kernel's wgmma (its C7514 note): the overlap is then gone."""
    import subprocess
    import tempfile
    from pathlib import Path

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                                capture_output=True, text=True).stderr
    return "C7514" in report


def compile_only() -> None:
    """Compile every variant for sm_90 without a GPU; prints registers / spills per variant."""
    import re
    import sys
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from kernel_compile import ptxas_resources

    names = list(attn_fwd_ws_kernel.arg_names)
    for head_dim, variants in WS_VARIANTS.items():
        for (block_m, block_n, stages, maxnreg, split), (ty, causal) in (
                (t, c) for t in variants for c in (("fp16", False), ("bf16", True))):
            gl_ty = gl.float16 if ty == "fp16" else gl.bfloat16
            q_rows = block_m // 2 if split else block_m
            descs = {"q_desc": [q_rows, head_dim], "k_desc": [block_n, head_dim], "v_desc": [block_n, head_dim]}
            consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages,
                      "CAUSAL": causal}
            sig = {}
            for n in names:
                if n in consts:
                    sig[n] = "constexpr"
                elif n in descs:  # the string a launch specializes a TensorDescriptor to
                    layout = gl.NVMMASharedLayout.get_default_for(descs[n], gl_ty)
                    fake = torch.empty(1024, 1024, dtype=torch.float16 if ty == "fp16" else torch.bfloat16)
                    sig[n] = mangle_type(TensorDescriptor.from_tensor(fake, descs[n], layout))
                elif n in ("Out", "LSE"):
                    sig[n] = f"*{ty}" if n == "Out" else "*fp32"
                else:
                    sig[n] = "fp32" if n == "qk_scale" else "i32"
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                     if n in ("Out", "LSE") or n.startswith(("stride", "seqlen"))}
            fn = attn_fwd_ws2_kernel if split else attn_fwd_ws_kernel
            src = GluonASTSource(fn, sig, {(names.index(n),): v for n, v in consts.items()}, attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": 4 if split else 8, "maxnreg": maxnreg})
            ptx = kernel.asm["ptx"]
            regs = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*[.]u32\s*(\d+)", ptx)})
            serialized = " WGMMA SERIALIZED (ptxas C7514)" if wgmma_serialized(ptx) else ""
            print(f"{ws_variant_name((block_m, block_n, stages, maxnreg, split))} d{head_dim} {ty} "
                  f"{'causal' if causal else 'full'} {block_m}x{block_n} stages {stages} setmaxnreg {regs} "
                  f"maxnreg {maxnreg}: shared {kernel.metadata.shared} B, {ptxas_resources(ptx, 90)}{serialized}",
                  flush=True)


if __name__ == "__main__":
    compile_only()
