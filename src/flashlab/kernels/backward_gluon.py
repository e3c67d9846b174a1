"""The Hopper backward in Gluon (Triton 3.6): a dK/dV kernel and a dQ kernel with the Gluon forward's
structure (forward_gluon.py), Hopper's default at head dim 128 (gluon_backward.py says when they
run; docs/perf-notes.md round 8, experiment 10, how they were built, round 9 how they measure).

dK/dV: one program per 128 keys and (kv head, batch). A 1-warp producer loads the program's K and V
once, then streams (Q_i, dO_i) tiles through a ring of stages (full / empty mbarriers); two 4-warp
consumers own 64 keys each and never wait for each other. Per query tile, keys as rows so that P
and dS are register operands:

    Sᵀ = K Qᵢᵀ,  dPᵀ = V dOᵢᵀ                      (issued together, asynchronously)
    Pᵀ = exp2(Sᵀ · scale · log2 e − LSEᵢ · log2 e),  dSᵀ = Pᵀ ⊙ (dPᵀ − Δᵢ)
    dV += Pᵀ dOᵢ,  dK += dSᵀ Qᵢ                     (left in flight under the next tile's Sᵀ, dPᵀ)

with Δ = rowsum(dO ⊙ O) (the `tl` preprocess kernel) and the forward's LSE; dK is scaled at the end.
GQA loops over the group's query heads inside the program — or over a split of them, when the grid
is too small (group_split.py: fp32 partial dK, dV, summed after).

dQ: one program per 128 query rows (two consumers of 64), Q and dO loaded once, K and V streamed:
S = Q Kⱼᵀ and dP = dO Vⱼᵀ together, then dQ += dS Kⱼ left in flight.

Accumulators are touched by nothing but wgmma while a product is in flight (ptxas would serialize
every wgmma otherwise: its note C7514). Causal: query i sees keys j <= i + diag (diag >= 0, the
forward's). Scope as the forward's; inputs are the forward's 3-D (sequences, seqlen, columns)
views (sequence ``b · seq_b + h · seq_h``, columns from ``h · col_h``): tiles past a sequence's end
read TMA's zeros and are masked.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from flashlab.kernels.gluon_ring import (
    acquire,
    kv_blocks,
    load_tile,
    mma_layout,
    operand_layout,
    release,
    ring_barriers,
    stream_kv,
    tile_layout,
    wait_full,
)

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _first_q_block(n0, diag, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """The first query tile that sees any of the keys n0 .. (causal: query i sees key j <= i + diag)."""
    if CAUSAL:
        return gl.maximum(n0 - diag, 0) // BLOCK_M
    return 0


@gluon.jit
def split_heads(group_size, heads_per_split, SPLIT: gl.constexpr):
    """(first query head, heads) of this dK/dV program: the kv head's whole group, or with SPLIT the
    split program_id(2) % splits of it (group_split.py). Recomputed where used: values held across
    the loop cost registers."""
    if SPLIT:
        g0 = gl.program_id(2) % gl.cdiv(group_size, heads_per_split) * heads_per_split
        return gl.program_id(1) * group_size + g0, gl.minimum(heads_per_split, group_size - g0)
    return gl.program_id(1) * group_size, group_size


@gluon.jit
def split_batch(group_size, heads_per_split, SPLIT: gl.constexpr):
    """The batch index of a dK/dV program (program_id(2) is batch · splits + split with SPLIT)."""
    if SPLIT:
        return gl.program_id(2) // gl.cdiv(group_size, heads_per_split)
    return gl.program_id(2)


@gluon.jit
def dkdv_buffers(q_desc, do_desc, k_desc, v_desc, KEYS: gl.constexpr, HEAD_DIM: gl.constexpr,
                 BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """A dK/dV program's shared memory (this kernel's and the fused one's): each consumer's K and V
    halves (KEYS keys), and the ring of STAGES (Q, dO) tiles of BLOCK_M rows."""
    dtype: gl.constexpr = q_desc.dtype
    k0 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], tile_layout(k_desc.layout))
    k1 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], tile_layout(k_desc.layout))
    v0 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], tile_layout(v_desc.layout))
    v1 = gl.allocate_shared_memory(dtype, [KEYS, HEAD_DIM], tile_layout(v_desc.layout))
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], tile_layout(q_desc.layout))
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], tile_layout(do_desc.layout))
    return k0, k1, v0, v1, q_smem, do_smem


@gluon.jit
def _probs_and_ds(s, dp, lse2, delta, keys, q_idx, in_seq, seqlen_k, diag, qk_scale, CAUSAL: gl.constexpr,
                  EVEN: gl.constexpr):
    """Pᵀ and dSᵀ (fp32, keys as rows) of one tile from Sᵀ, dPᵀ, the queries' LSE · log2 e and Δ:
    zero past either sequence's end (unless EVEN) and above the causal diagonal."""
    p = gl.exp2(s * qk_scale - lse2[None, :])
    if not EVEN:
        p = gl.where(in_seq[None, :] & (keys[:, None] < seqlen_k), p, 0.0)
    if CAUSAL:
        p = gl.where(keys[:, None] <= q_idx[None, :] + diag, p, 0.0)
    return p, p * (dp - delta[None, :])


@gluon.jit
def _load_kv_halves(k_desc, v_desc, k0, k1, v0, v1, kv_bar, k_seq, n0, k_col, KEYS: gl.constexpr):
    """Producer: the two consumers' K and V halves (keys n0 .., n0 + KEYS ..), completing on kv_bar."""
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    load_tile(k_desc, k_seq, n0, k_col, kv_bar, k0)
    load_tile(k_desc, k_seq, n0 + KEYS, k_col, kv_bar, k1)
    load_tile(v_desc, k_seq, n0, k_col, kv_bar, v0)
    load_tile(v_desc, k_seq, n0 + KEYS, k_col, kv_bar, v1)


@gluon.jit
def _store_dkdv(dk, dv, DK, DV, stride_kb, stride_ks, stride_kh, off_b, off_hk, key0, seqlen_k, softmax_scale,
                group_size, heads_per_split, stride_split, o_layout: gl.constexpr, KEYS: gl.constexpr,
                HEAD_DIM: gl.constexpr, SPLIT: gl.constexpr):
    """A consumer's finished dK (scaled here) and dV of keys key0 .. key0 + KEYS, those in the sequence,
    in DK / DV's element type; a split group's (fp32 partials) ``stride_split`` elements a split on."""
    rows = key0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    offs = (off_b.to(gl.int64) * stride_kb + rows[:, None].to(gl.int64) * stride_ks
            + off_hk.to(gl.int64) * stride_kh + dims[None, :])
    if SPLIT:
        offs += (gl.program_id(2) % gl.cdiv(group_size, heads_per_split)).to(gl.int64) * stride_split
    ok = rows[:, None] < seqlen_k
    gl.store(DK + offs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


@gluon.jit
def _dkdv_consumer(k_smem, v_smem, q_smem, do_smem, kv_bar, full, empty, LSE, DELTA, DK, DV,
                   stride_lb, stride_lh, stride_kb, stride_ks, stride_kh, off_b, off_hk, key0, n0, group_size,
                   heads_per_split, stride_split, seqlen_q, seqlen_k, diag, qk_scale, softmax_scale,
                   dtype: gl.constexpr, HEAD_DIM: gl.constexpr,
                   BLOCK_M: gl.constexpr, KEYS: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                   EVEN: gl.constexpr, SPLIT: gl.constexpr):
    """One consumer warpgroup: keys key0 .. key0 + KEYS over every (query head of its split of the
    group, query tile), then dK, dV of its keys. EVEN: no ragged query tile or key block (no bounds
    mask)."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = mma_layout(NUM_WARPS, BLOCK_M)
    o_layout: gl.constexpr = mma_layout(NUM_WARPS, HEAD_DIM)
    op_layout: gl.constexpr = operand_layout(o_layout)
    keys = key0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([KEYS, BLOCK_M], gl.float32, layout=s_layout)
    dk = warpgroup_mma_init(gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=o_layout))
    dv = warpgroup_mma_init(gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=o_layout))

    mbarrier.wait(kv_bar, 0)
    i_start = _first_q_block(n0, diag, BLOCK_M, CAUSAL)
    n_q = gl.cdiv(seqlen_q, BLOCK_M)
    it = 0
    h0, n_heads = split_heads(group_size, heads_per_split, SPLIT)
    for g in range(n_heads):
        off_h = h0 + g
        lse_base = LSE + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        delta_base = DELTA + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        for i in range(i_start, n_q):
            slot = it % STAGES
            wait_full(full, it, STAGES)
            s_tok = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            q_idx = i * BLOCK_M + cols
            in_seq = q_idx < seqlen_q
            lse2 = gl.load(lse_base + q_idx, mask=in_seq, other=0.0) * LOG2E
            delta = gl.load(delta_base + q_idx, mask=in_seq, other=0.0)
            s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])  # the previous tile's dV, dK are done too
            if it > 0:
                release(empty, it - 1, STAGES)  # the previous tile's Q, dO: read by its dV, dK products
            p, ds = _probs_and_ds(s, dp, lse2, delta, keys, q_idx, in_seq, seqlen_k, diag, qk_scale, CAUSAL, EVEN)
            dv = warpgroup_mma(gl.convert_layout(p.to(dtype), op_layout), do_smem.index(slot), dv, is_async=True)
            dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), q_smem.index(slot), dk, is_async=True)
            it += 1
    dk, dv = warpgroup_mma_wait(0, deps=[dk, dv])
    _store_dkdv(dk, dv, DK, DV, stride_kb, stride_ks, stride_kh, off_b, off_hk, key0, seqlen_k, softmax_scale,
                group_size, heads_per_split, stride_split, o_layout, KEYS, HEAD_DIM, SPLIT)


@gluon.jit
def _dkdv_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k0, k1, v0, v1, kv_bar, full, empty, k_seq,
                   k_col, q_seq_b, q_seq_h, q_col_h, off_b, n0, group_size, heads_per_split, seqlen_q, diag,
                   KEYS: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                   SPLIT: gl.constexpr):
    """One warp: both consumers' K and V halves, then (Q_i, dO_i) of every (query head, tile)."""
    _load_kv_halves(k_desc, v_desc, k0, k1, v0, v1, kv_bar, k_seq, n0, k_col, KEYS)
    i_start = _first_q_block(n0, diag, BLOCK_M, CAUSAL)
    n_q = gl.cdiv(seqlen_q, BLOCK_M)
    it = 0
    h0, n_heads = split_heads(group_size, heads_per_split, SPLIT)
    for g in range(n_heads):
        off_h = h0 + g
        q_seq = off_b * q_seq_b + off_h * q_seq_h
        for i in range(i_start, n_q):
            slot = it % STAGES
            bar = acquire(empty, full, it, q_desc.block_type.nbytes + do_desc.block_type.nbytes, STAGES)
            load_tile(q_desc, q_seq, i * BLOCK_M, off_h * q_col_h, bar, q_smem.index(slot))
            load_tile(do_desc, q_seq, i * BLOCK_M, off_h * q_col_h, bar, do_smem.index(slot))
            it += 1


@gluon.jit
def attn_bwd_dkdv_gluon_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                               stride_kb, stride_ks, stride_kh, q_seq_b, q_seq_h, q_col_h, k_seq_b, k_seq_h,
                               k_col_h, seqlen_q, seqlen_k, diag, group_size, qk_scale, softmax_scale,
                               heads_per_split, stride_split, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                               EVEN: gl.constexpr, SPLIT: gl.constexpr):
    """dK, dV of keys n0 .. n0 + BLOCK_N of kv head program_id(1), batch program_id(2), summed over
    the query heads of its split of the group (module docstring). DK / DV are (batch, seqlen_k,
    kv_heads, head_dim) with K's strides, split s's ``s · stride_split`` elements on (fp32 partials
    when the group is split, group_split.py); LSE / DELTA (batch, heads, seqlen_q) fp32.
    Grid: (cdiv(seqlen_k, BLOCK_N), kv_heads, batch · splits), splits = cdiv(group_size,
    heads_per_split), SPLIT: splits > 1; num_warps=4."""
    KEYS: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = q_desc.dtype
    n0 = gl.program_id(0) * BLOCK_N
    off_hk = gl.program_id(1)
    off_b = split_batch(group_size, heads_per_split, SPLIT)

    k0, k1, v0, v1, q_smem, do_smem = dkdv_buffers(q_desc, do_desc, k_desc, v_desc, KEYS, HEAD_DIM, BLOCK_M, STAGES)
    kv_bar, full, empty = ring_barriers(STAGES)

    k_seq = off_b * k_seq_b + off_hk * k_seq_h
    gl.warp_specialize([
        (_dkdv_consumer, (k0, v0, q_smem, do_smem, kv_bar, full, empty, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                          stride_kb, stride_ks, stride_kh, off_b, off_hk, n0, n0, group_size, heads_per_split,
                          stride_split, seqlen_q, seqlen_k, diag, qk_scale, softmax_scale, dtype, HEAD_DIM, BLOCK_M,
                          KEYS, STAGES, CAUSAL, EVEN, SPLIT)),
        (_dkdv_consumer, (k1, v1, q_smem, do_smem, kv_bar, full, empty, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                          stride_kb, stride_ks, stride_kh, off_b, off_hk, n0 + KEYS, n0, group_size,
                          heads_per_split, stride_split, seqlen_q, seqlen_k, diag, qk_scale, softmax_scale, dtype,
                          HEAD_DIM, BLOCK_M, KEYS, STAGES, CAUSAL, EVEN, SPLIT)),
        (_dkdv_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k0, k1, v0, v1, kv_bar, full, empty,
                          k_seq, off_hk * k_col_h, q_seq_b, q_seq_h, q_col_h, off_b, n0, group_size,
                          heads_per_split, seqlen_q, diag, KEYS, BLOCK_M, STAGES, CAUSAL, SPLIT)),
    ], [4, 1], [240, 24])


@gluon.jit
def _dq_consumer(q_smem, do_smem, k_smem, v_smem, q_bar, full, empty, LSE, DELTA, DQ, stride_lb, stride_lh,
                 stride_qb, stride_qs, stride_qh, off_b, off_h, row0, n_blocks, seqlen_q, seqlen_k, diag, qk_scale,
                 softmax_scale, dtype: gl.constexpr, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, EVEN: gl.constexpr):
    """One consumer warpgroup of the dQ kernel: query rows row0 .. row0 + ROWS over the ring's key
    blocks — S = Q Kⱼᵀ and dP = dO Vⱼᵀ together, then dQ += dS Kⱼ left in flight — then dQ."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = mma_layout(NUM_WARPS, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(NUM_WARPS, HEAD_DIM)
    op_layout: gl.constexpr = operand_layout(o_layout)
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    in_seq = rows < seqlen_q
    row_base = off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
    lse2 = gl.load(LSE + row_base + rows, mask=in_seq, other=0.0) * LOG2E
    delta = gl.load(DELTA + row_base + rows, mask=in_seq, other=0.0)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    dq = warpgroup_mma_init(gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout))

    mbarrier.wait(q_bar, 0)
    for j in range(n_blocks):
        slot = j % STAGES
        wait_full(full, j, STAGES)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do_smem, v_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])  # the previous block's dQ product is done too
        if j > 0:
            release(empty, j - 1, STAGES)  # block j-1's K, V: read by its dQ product
        p = gl.exp2(s * qk_scale - lse2[:, None])
        key_idx = j * BLOCK_N + cols
        if not EVEN:  # a ragged last key block (rows past seqlen_q are never stored)
            p = gl.where(key_idx[None, :] < seqlen_k, p, 0.0)
        if CAUSAL:
            p = gl.where(key_idx[None, :] <= rows[:, None] + diag, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), k_smem.index(slot), dq, is_async=True)
    dq = warpgroup_mma_wait(0, deps=[dq])

    out_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    offs = (off_b.to(gl.int64) * stride_qb + out_rows[:, None].to(gl.int64) * stride_qs
            + off_h.to(gl.int64) * stride_qh + dims[None, :])
    gl.store(DQ + offs, (dq * softmax_scale).to(dtype), mask=out_rows[:, None] < seqlen_q)


@gluon.jit
def _dq_producer(q_desc, do_desc, k_desc, v_desc, q0, q1, do0, do1, k_smem, v_smem, q_bar, full, empty, q_seq,
                 q_row, q_col, k_seq, k_col, n_blocks, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr):
    """One warp: both consumers' Q and dO halves, then key block j's K and V into slot j % STAGES."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    load_tile(q_desc, q_seq, q_row, q_col, q_bar, q0)
    load_tile(q_desc, q_seq, q_row + ROWS, q_col, q_bar, q1)
    load_tile(do_desc, q_seq, q_row, q_col, q_bar, do0)
    load_tile(do_desc, q_seq, q_row + ROWS, q_col, q_bar, do1)
    stream_kv(k_desc, v_desc, k_smem, v_smem, full, empty, k_seq, k_col, n_blocks, BLOCK_N, STAGES)


@gluon.jit
def attn_bwd_dq_gluon_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQ, stride_lb, stride_lh, stride_qb,
                             stride_qs, stride_qh, q_seq_b, q_seq_h, q_col_h, k_seq_b, k_seq_h, k_col_h,
                             seqlen_q, seqlen_k, diag, group_size, qk_scale, softmax_scale, HEAD_DIM: gl.constexpr,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                             CAUSAL: gl.constexpr, EVEN: gl.constexpr):
    """dQ of query rows pid · BLOCK_M .. of head program_id(1), batch program_id(2). DQ has q's
    strides; q_desc / do_desc blocks are BLOCK_M / 2 rows (one a consumer). Grid: (cdiv(seqlen_q,
    BLOCK_M), heads, batch); num_warps=4."""
    ROWS: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        pid_m = gl.num_programs(0) - 1 - pid_m
    off_h = gl.program_id(1)
    off_b = gl.program_id(2)
    off_hk = off_h // group_size
    row0 = pid_m * BLOCK_M
    n_blocks = kv_blocks(row0 + diag, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

    q0 = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], tile_layout(q_desc.layout))
    q1 = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], tile_layout(q_desc.layout))
    do0 = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], tile_layout(do_desc.layout))
    do1 = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], tile_layout(do_desc.layout))
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_layout(k_desc.layout))
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_layout(v_desc.layout))
    q_bar, full, empty = ring_barriers(STAGES)

    q_seq = off_b * q_seq_b + off_h * q_seq_h
    k_seq = off_b * k_seq_b + off_hk * k_seq_h
    gl.warp_specialize([
        (_dq_consumer, (q0, do0, k_smem, v_smem, q_bar, full, empty, LSE, DELTA, DQ, stride_lb, stride_lh,
                        stride_qb, stride_qs, stride_qh, off_b, off_h, row0, n_blocks, seqlen_q, seqlen_k, diag,
                        qk_scale, softmax_scale, dtype, HEAD_DIM, ROWS, BLOCK_N, STAGES, CAUSAL, EVEN)),
        (_dq_consumer, (q1, do1, k_smem, v_smem, q_bar, full, empty, LSE, DELTA, DQ, stride_lb, stride_lh,
                        stride_qb, stride_qs, stride_qh, off_b, off_h, row0 + ROWS, n_blocks, seqlen_q, seqlen_k,
                        diag, qk_scale, softmax_scale, dtype, HEAD_DIM, ROWS, BLOCK_N, STAGES, CAUSAL, EVEN)),
        (_dq_producer, (q_desc, do_desc, k_desc, v_desc, q0, q1, do0, do1, k_smem, v_smem, q_bar, full, empty,
                        q_seq, row0, off_h * q_col_h, k_seq, off_hk * k_col_h, n_blocks, ROWS, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])
