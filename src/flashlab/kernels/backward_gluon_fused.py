"""The Hopper backward in one Gluon kernel: dK, dV and dQ from one pass over the scores (5 matrix
products a (query tile, key block) pair, not the two-kernel split's 7: backward_gluon.py recomputes
S and dP for dQ). dQ is summed over key blocks by fp32 atomics, so its low bits depend on the order
programs finish: not deterministic (the two-kernel split is). Head dim 128 (half of it is one
64-row wgmma). flashlab's backward where gluon_backward.fused_eligible says (causal, from 8k tokens,
unless deterministic gradients are asked for); docs/perf-notes.md round 10 has how it was built.

The program is backward_gluon.py's dK/dV program (128 keys, two consumers of 64 keys, a producer
warp streaming (Q_i, dO_i) through the ring) with one more product a tile:

    dQᵢᵀ[dims of consumer c] = Σ_h K_hᵀ[dims of c] · dS_hᵀ      (h: the two consumers' key halves)

Each consumer writes its dSᵀ (keys × queries) to shared memory and computes half of dQᵢᵀ's head dim
from both halves, so a CTA adds 128 keys' worth of dQ at once and the consumers' work stays equal.
The halves meet through two mbarrier rings over NBUF dS buffers: ``ds_ready[b]`` (both halves of
buffer b written) and ``ds_free[b]`` (both consumers' dQ products have read it). A consumer issues
tile i's dQ product one tile late, after tile i+1's dS, so it waits on the other only if that one
is more than a tile behind. The consumers stage their fp32 dQᵀ halves in shared memory and the
producer warp adds them into DQ_ACC with 16-byte atomics between its loads (round 10: atomics by
the consumers themselves cost 15% of the kernel's time; from the producer, nothing measurable).

dQ accumulates, scaled, into ``DQ_ACC`` fp32 (batch, heads, head_dim, queries), queries contiguous;
the host zeroes it and casts it into dq.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from flashlab.kernels.backward_gluon import (
    _first_q_block,
    _load_kv_halves,
    _probs_and_ds,
    _store_dkdv,
    dkdv_buffers,
    split_batch,
    split_heads,
)
from flashlab.kernels.gluon_ring import (
    acquire,
    load_tile,
    mma_layout,
    operand_layout,
    release,
    ring_barriers,
    wait_full,
)

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _dq_product(k0, k1, ds_smem, ds_ready, n, half, acc_zero, HALF_D: gl.constexpr, NBUF: gl.constexpr):
    """Issue dQᵀ of stream item ``n`` for this consumer's dims (both key halves' dSᵀ, once ready)."""
    b = n % NBUF
    mbarrier.wait(ds_ready.index(b), (n // NBUF) & 1)
    a0 = k0.permute((1, 0)).slice(half * HALF_D, HALF_D, dim=0)
    a1 = k1.permute((1, 0)).slice(half * HALF_D, HALF_D, dim=0)
    tok = warpgroup_mma(a0, ds_smem.index(2 * b), acc_zero, use_acc=False, is_async=True)
    return warpgroup_mma(a1, ds_smem.index(2 * b + 1), tok, is_async=True)


@gluon.jit
def _dq_stage(dq, dq_stage, dq_ready, dq_free, n, half):
    """This consumer's dQᵀ of item ``n`` into its half of the staging buffer, for the producer warp to
    add into DQ_ACC; waits until the producer has drained item n - 1."""
    mbarrier.wait(dq_free.index(0), (n & 1) ^ 1)
    dq_stage.index(half).store(dq)
    gl.thread_barrier()
    mbarrier.arrive(dq_ready.index(0), count=1)


@gluon.jit
def _dq_drain(dq_stage, dq_ready, dq_free, DQ_ACC, n, off_b, off_h, tile, stride_ab, stride_ah, stride_ad,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr):
    """The producer warp: item ``n``'s staged dQᵀ (both halves) added into DQ_ACC by 16-byte atomics,
    CH dims at a time, then the buffer freed."""
    CH: gl.constexpr = 4  # dims at a time (the producer's 32 registers)
    # The same bytes as [chunks, CH, queries]: the swizzle's phase is the dim mod 4 either way.
    chunks = dq_stage._reinterpret(gl.float32, [HEAD_DIM // CH, CH, BLOCK_M], dq_stage.layout)
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // BLOCK_M, BLOCK_M // 4], [1, 1], [1, 0])
    mbarrier.wait(dq_ready.index(0), n & 1)
    base = DQ_ACC + off_b.to(gl.int64) * stride_ab + off_h.to(gl.int64) * stride_ah + tile * BLOCK_M
    rows = gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, layout))
    for j in range(HEAD_DIM // CH):  # chunk j: dims j · CH ..
        part = chunks.index(j).load(layout)
        gl.atomic_add(base + (j * CH + rows)[:, None] * stride_ad + cols[None, :], part, sem="relaxed")
    gl.thread_barrier()
    mbarrier.arrive(dq_free.index(0), count=1)


@gluon.jit
def _fused_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k0, k1, v0, v1, kv_bar, full, empty,
                    dq_stage, dq_ready, dq_free, DQ_ACC, stride_ab, stride_ah, stride_ad, k_seq, k_col, q_seq_b,
                    q_seq_h, q_col_h, off_b, n0, group_size, heads_per_split, seqlen_q, diag,
                    HEAD_DIM: gl.constexpr,
                    KEYS: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                    SPLIT: gl.constexpr):
    """One warp: backward_gluon.py's dK/dV producer over the consumers' flattened stream, draining
    item it - STAGES's dQ after loading item it (and the last items' after the loop)."""
    _load_kv_halves(k_desc, v_desc, k0, k1, v0, v1, kv_bar, k_seq, n0, k_col, KEYS)
    i_start = _first_q_block(n0, diag, BLOCK_M, CAUSAL)
    per_head = gl.cdiv(seqlen_q, BLOCK_M) - i_start
    h0, n_heads = split_heads(group_size, heads_per_split, SPLIT)
    items = n_heads * per_head
    for it in range(items):
        g = it // per_head
        off_h = h0 + g
        q_seq = off_b * q_seq_b + off_h * q_seq_h
        i = i_start + it - g * per_head
        bar = acquire(empty, full, it, q_desc.block_type.nbytes + do_desc.block_type.nbytes, STAGES)
        load_tile(q_desc, q_seq, i * BLOCK_M, off_h * q_col_h, bar, q_smem.index(it % STAGES))
        load_tile(do_desc, q_seq, i * BLOCK_M, off_h * q_col_h, bar, do_smem.index(it % STAGES))
        if it >= STAGES:
            n = it - STAGES
            gn = n // per_head
            _dq_drain(dq_stage, dq_ready, dq_free, DQ_ACC, n, off_b, h0 + gn,
                      i_start + n - gn * per_head, stride_ab, stride_ah, stride_ad, HEAD_DIM, BLOCK_M)
    for n in range(gl.maximum(items - STAGES, 0), items):
        gn = n // per_head
        _dq_drain(dq_stage, dq_ready, dq_free, DQ_ACC, n, off_b, h0 + gn,
                  i_start + n - gn * per_head, stride_ab, stride_ah, stride_ad, HEAD_DIM, BLOCK_M)


@gluon.jit
def _tile_scores(k_own, v_own, q_smem, do_smem, ds_smem, full, empty, ds_ready, ds_free, LSE, DELTA, stride_lb,
                 stride_lh, off_b, off_h, i, it, half, keys, cols, s_zero, seqlen_q, seqlen_k, diag, qk_scale,
                 dtype: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, NBUF: gl.constexpr,
                 CAUSAL: gl.constexpr, EVEN: gl.constexpr):
    """Stream item ``it`` (query tile i of head off_h): Pᵀ and dSᵀ of this consumer's keys, dSᵀ also
    written to its half of dS buffer it % NBUF and signalled ready. Returns (Pᵀ, dSᵀ) in ``dtype``."""
    slot = it % STAGES
    wait_full(full, it, STAGES)
    s_tok = warpgroup_mma(k_own, q_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(v_own, do_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    q_idx = i * BLOCK_M + cols
    in_seq = q_idx < seqlen_q
    row_base = off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
    lse2 = gl.load(LSE + row_base + q_idx, mask=in_seq, other=0.0) * LOG2E
    delta = gl.load(DELTA + row_base + q_idx, mask=in_seq, other=0.0)
    s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])  # every earlier product of this consumer too
    if it > 0:
        release(empty, it - 1, STAGES)  # the previous tile's Q, dO: read by its dV, dK products
    p, ds = _probs_and_ds(s, dp, lse2, delta, keys, q_idx, in_seq, seqlen_k, diag, qk_scale, CAUSAL, EVEN)
    ds = ds.to(dtype)
    # Into this item's buffer once both consumers' dQ products of its last use are done.
    b = it % NBUF
    mbarrier.wait(ds_free.index(b), ((it // NBUF) & 1) ^ 1)
    ds_smem.index(2 * b + half).store(ds)
    fence_async_shared()  # generic-proxy stores, read next by wgmma (the async proxy)
    gl.thread_barrier()
    mbarrier.arrive(ds_ready.index(b), count=1)
    return p.to(dtype), ds


@gluon.jit
def _fused_consumer(k_own, v_own, k0, k1, q_smem, do_smem, ds_smem, dq_stage, dq_ready, dq_free, kv_bar, full,
                    empty, ds_ready, ds_free, LSE, DELTA, DK, DV, stride_lb, stride_lh, stride_kb, stride_ks,
                    stride_kh, off_b, off_hk, half, n0, group_size, heads_per_split, stride_split, seqlen_q,
                    seqlen_k, diag, qk_scale, softmax_scale,
                    dtype: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, KEYS: gl.constexpr,
                    STAGES: gl.constexpr, NBUF: gl.constexpr, CAUSAL: gl.constexpr, EVEN: gl.constexpr,
                    SPLIT: gl.constexpr):
    """Consumer ``half``: keys n0 + half · KEYS .. over every (query head of the group, query tile) —
    one stream of items, item 0 peeled so the loop issues item it-1's dQ product unconditionally;
    dK, dV of its keys; dQ of its half of the head dim (module docstring)."""
    HALF_D: gl.constexpr = HEAD_DIM // 2
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = mma_layout(NUM_WARPS, BLOCK_M)
    o_layout: gl.constexpr = mma_layout(NUM_WARPS, HEAD_DIM)
    op_layout: gl.constexpr = operand_layout(o_layout)
    key0 = n0 + half * KEYS
    keys = key0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([KEYS, BLOCK_M], gl.float32, layout=s_layout)
    dq_zero = gl.zeros([HALF_D, BLOCK_M], gl.float32, layout=s_layout)
    dk = warpgroup_mma_init(gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=o_layout))
    dv = warpgroup_mma_init(gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=o_layout))

    mbarrier.wait(kv_bar, 0)
    i_start = _first_q_block(n0, diag, BLOCK_M, CAUSAL)
    per_head = gl.cdiv(seqlen_q, BLOCK_M) - i_start
    h0, n_heads = split_heads(group_size, heads_per_split, SPLIT)
    items = n_heads * per_head
    if items > 0:
        off_h = h0
        p, ds = _tile_scores(k_own, v_own, q_smem, do_smem, ds_smem, full, empty, ds_ready, ds_free, LSE, DELTA,
                             stride_lb, stride_lh, off_b, off_h, i_start, 0, half, keys, cols, s_zero, seqlen_q,
                             seqlen_k, diag, qk_scale, dtype, BLOCK_M, STAGES, NBUF, CAUSAL, EVEN)
        dv = warpgroup_mma(gl.convert_layout(p, op_layout), do_smem.index(0), dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds, op_layout), q_smem.index(0), dk, is_async=True)
    for it in range(1, items):
        g = it // per_head
        i = i_start + it - g * per_head
        off_h = h0 + g
        p, ds = _tile_scores(k_own, v_own, q_smem, do_smem, ds_smem, full, empty, ds_ready, ds_free, LSE, DELTA,
                             stride_lb, stride_lh, off_b, off_h, i, it, half, keys, cols, s_zero, seqlen_q,
                             seqlen_k, diag, qk_scale, dtype, BLOCK_M, STAGES, NBUF, CAUSAL, EVEN)
        # The previous item's dQ (its dS is ready unless the other consumer lags a tile), then this
        # item's dV, dK, left in flight under the dQ atomics.
        slot = it % STAGES
        dq = _dq_product(k0, k1, ds_smem, ds_ready, it - 1, half, dq_zero, HALF_D, NBUF)
        dv = warpgroup_mma(gl.convert_layout(p, op_layout), do_smem.index(slot), dv, is_async=True)
        # dSᵀ from registers: 10-15% faster at causal 8k-16k than as an operand from its shared copy.
        dk = warpgroup_mma(gl.convert_layout(ds, op_layout), q_smem.index(slot), dk, is_async=True)
        dq = warpgroup_mma_wait(2, deps=[dq])
        release(ds_free, it - 1, NBUF)
        _dq_stage(dq * softmax_scale, dq_stage, dq_ready, dq_free, it - 1, half)
    if items > 0:
        dq = _dq_product(k0, k1, ds_smem, ds_ready, items - 1, half, dq_zero, HALF_D, NBUF)
        dq = warpgroup_mma_wait(0, deps=[dq])
        _dq_stage(dq * softmax_scale, dq_stage, dq_ready, dq_free, items - 1, half)
    dk, dv = warpgroup_mma_wait(0, deps=[dk, dv])
    _store_dkdv(dk, dv, DK, DV, stride_kb, stride_ks, stride_kh, off_b, off_hk, key0, seqlen_k, softmax_scale,
                group_size, heads_per_split, stride_split, o_layout, KEYS, HEAD_DIM, SPLIT)


@gluon.jit
def attn_bwd_fused_gluon_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, DQ_ACC, stride_lb, stride_lh,
                                stride_kb, stride_ks, stride_kh, stride_ab, stride_ah, stride_ad,
                                q_seq_b, q_seq_h, q_col_h, k_seq_b, k_seq_h, k_col_h, seqlen_q, seqlen_k, diag,
                                group_size, qk_scale, softmax_scale, heads_per_split, stride_split,
                                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                STAGES: gl.constexpr, NBUF: gl.constexpr, CAUSAL: gl.constexpr, EVEN: gl.constexpr,
                                SPLIT: gl.constexpr):
    """dK, dV of keys n0 .. n0 + BLOCK_N of kv head program_id(1), batch program_id(2), and their
    part of every visible query's dQ (module docstring). DK / DV as backward_gluon.py's; DQ_ACC fp32
    (batch, heads, head_dim, queries) by (stride_ab, stride_ah, stride_ad), queries contiguous,
    zeroed, covering every query tile (cdiv(seqlen_q, BLOCK_M) · BLOCK_M rows: ragged tiles add
    zeros past seqlen_q).
    A split group (group_split.py) sums its heads only, into fp32 partials as backward_gluon.py's.
    Grid: (cdiv(seqlen_k, BLOCK_N), kv_heads, batch · splits), SPLIT: splits > 1; num_warps=4."""
    KEYS: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = q_desc.dtype
    n0 = gl.program_id(0) * BLOCK_N
    off_hk = gl.program_id(1)
    off_b = split_batch(group_size, heads_per_split, SPLIT)

    k0, k1, v0, v1, q_smem, do_smem = dkdv_buffers(q_desc, do_desc, k_desc, v_desc, KEYS, HEAD_DIM, BLOCK_M, STAGES)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2 * NBUF, KEYS, BLOCK_M], ds_layout)
    kv_bar, full, empty = ring_barriers(STAGES)
    ds_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NBUF):
        mbarrier.init(ds_ready.index(b), count=2)
        mbarrier.init(ds_free.index(b), count=2)
    dq_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    dq_free = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(dq_ready.index(0), count=2)
    mbarrier.init(dq_free.index(0), count=1)
    # Each consumer's [dims, queries] half; 32-byte units swizzled by the dim mod 4, so a wgmma-layout
    # store (8 dims × 32 bytes a warp) meets each bank twice at most.
    stage_layout: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 4, [1, 0])
    dq_stage = gl.allocate_shared_memory(gl.float32, [2, HEAD_DIM // 2, BLOCK_M], stage_layout)
    fence_async_shared()

    k_seq = off_b * k_seq_b + off_hk * k_seq_h
    gl.warp_specialize([
        (_fused_consumer, (k0, v0, k0, k1, q_smem, do_smem, ds_smem, dq_stage, dq_ready, dq_free, kv_bar, full,
                           empty, ds_ready, ds_free, LSE, DELTA, DK, DV, stride_lb, stride_lh, stride_kb, stride_ks,
                           stride_kh, off_b, off_hk, 0, n0, group_size, heads_per_split, stride_split, seqlen_q,
                           seqlen_k, diag, qk_scale, softmax_scale, dtype, HEAD_DIM, BLOCK_M, KEYS, STAGES, NBUF,
                           CAUSAL, EVEN, SPLIT)),
        (_fused_consumer, (k1, v1, k0, k1, q_smem, do_smem, ds_smem, dq_stage, dq_ready, dq_free, kv_bar, full,
                           empty, ds_ready, ds_free, LSE, DELTA, DK, DV, stride_lb, stride_lh, stride_kb, stride_ks,
                           stride_kh, off_b, off_hk, 1, n0, group_size, heads_per_split, stride_split, seqlen_q,
                           seqlen_k, diag, qk_scale, softmax_scale, dtype, HEAD_DIM, BLOCK_M, KEYS, STAGES, NBUF,
                           CAUSAL, EVEN, SPLIT)),
        (_fused_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k0, k1, v0, v1, kv_bar, full, empty,
                           dq_stage, dq_ready, dq_free, DQ_ACC, stride_ab, stride_ah, stride_ad, k_seq,
                           off_hk * k_col_h, q_seq_b, q_seq_h, q_col_h, off_b, n0, group_size, heads_per_split,
                           seqlen_q, diag, HEAD_DIM, KEYS, BLOCK_M, STAGES, CAUSAL, SPLIT)),
    ], [4, 1], [240, 32])  # the producer's 32: both consumers keep 240
