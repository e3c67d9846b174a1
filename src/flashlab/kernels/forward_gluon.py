"""The Hopper forward in Gluon (Triton 3.6's ``triton.experimental.gluon``): FlashAttention-3's
structure, Hopper's default forward in its scope (gluon_forward.py says when it runs;
docs/perf-notes.md round 8 how it was found).

One program per 128-row query block and (head, batch), in three warp-specialized partitions:

* a 1-warp producer issues TMA loads of the two 64-row Q halves, then of each key block's K and V
  into a ring of ``STAGES`` shared-memory slots; slot s is guarded by mbarriers ``full[s]`` (the TMA
  transaction bytes landed) and ``empty[s]`` (both consumers are done with it);
* two 4-warp consumers (one warpgroup each, the default partition and a worker) own 64 query rows
  each and never wait for each other, so one's softmax runs under the other's matrix products.

Each consumer follows FlashAttention-3's intra-warpgroup order: issue S_{j+1} = Q·K_{j+1}ᵀ, issue
O += P_j·V_j (P from registers), wait for S_{j+1} only and run its softmax under P_j·V_j, wait for
P_j·V_j, free slot j, rescale O. O's registers are touched only with no product in flight: anything
else makes ptxas serialize every wgmma (its note C7514), which is what round 8 first ran into.

Scope: no softcap / ALiBi / masks / dropout / varlen / window; causal where every query sees a key
(the diagonal offset diag >= 0);
head dims 64, 128 and 256; any seqlens; q, k, v viewed as 3-D (sequences, seqlen, columns) tensors by
the host (gluon_forward.py's tile_view): sequence ``b · seq_b + h · seq_h``, columns from
``h · col_h``. A tile that runs past a sequence's end reads TMA's zeros: keys there are masked out
of the last block's scores, query rows there are never stored.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from flashlab.kernels.gluon_ring import (
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

M_INIT = gl.constexpr(-1.0e30)  # the running max starts finite (forward.py's M_INIT)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _softmax_step(s, m_i, l_i, blk, rows_s, cols_s, first_diag, seqlen_k, qk_scale, p_layout: gl.constexpr,
                  dtype: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, EVEN_K: gl.constexpr):
    """Online softmax of score tile ``s`` (key block ``blk``, log2 domain): (P as the P·V register
    operand, the new row max, the new row sum, alpha = the rescale factor of the old O). Causal:
    ``rows_s`` are the rows' last visible keys (row + diag), ``first_diag`` the first row's.
    EVEN_K (seqlen_k a multiple of BLOCK_N) compiles the ragged-block test out."""
    if not EVEN_K:
        if (blk + 1) * BLOCK_N > seqlen_k:  # the last, ragged block: keys past the sequence
            s = gl.where(blk * BLOCK_N + cols_s[None, :] < seqlen_k, s, float("-inf"))
    if CAUSAL:
        if (blk + 1) * BLOCK_N > first_diag:  # a block that crosses these rows' diagonal
            s = gl.where(blk * BLOCK_N + cols_s[None, :] <= rows_s[:, None], s, float("-inf"))
    m_ij = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_ij[:, None])
    alpha = gl.exp2(m_i - m_ij)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(dtype), p_layout), m_ij, l_i, alpha


@gluon.jit
def _attend(q_smem, k_smem, v_smem, q_bar, full, empty, row0, diag, n_blocks, seqlen_k, qk_scale,
            dtype: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, CAUSAL: gl.constexpr, EVEN_K: gl.constexpr):
    """One consumer's loop for query rows row0 .. row0 + BLOCK_M: (acc, m_i, l_i), acc not yet / l.
    Causal: query i sees keys j <= i + diag (diag >= 0, so every row sees key 0)."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = mma_layout(NUM_WARPS, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(NUM_WARPS, HEAD_DIM)
    p_layout: gl.constexpr = operand_layout(o_layout)
    # The causal mask compares keys with the query rows shifted by diag.
    rows_s = row0 + diag + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], M_INIT, gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(q_bar, 0)
    wait_full(full, 0, STAGES)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
    p_op, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, rows_s, cols_s, row0 + diag, seqlen_k, qk_scale, p_layout,
                                          dtype, BLOCK_N, CAUSAL, EVEN_K)
    for j in range(n_blocks - 1):
        nxt = j + 1
        wait_full(full, nxt, STAGES)
        s_tok = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(j % STAGES), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # issue order S_{j+1}, P_j·V_j: S_{j+1} is done
        p_op, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, nxt, rows_s, cols_s, row0 + diag, seqlen_k, qk_scale,
                                              p_layout, dtype, BLOCK_N, CAUSAL, EVEN_K)
        acc = warpgroup_mma_wait(0, deps=[acc])
        release(empty, j, STAGES)  # slot j: this warpgroup is past P_j·V_j
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    last = n_blocks - 1
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc)
    return acc, m_i, l_i


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, full, empty, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb,
              stride_lh, off_b, off_h, row0, diag, n_blocks, seqlen_q, seqlen_k, qk_scale, dtype: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, EVEN_K: gl.constexpr):
    """One consumer warpgroup: its rows over every key block, then O = acc / l and the LSE (natural
    log) of the rows inside the sequence."""
    acc, m_i, l_i = _attend(q_smem, k_smem, v_smem, q_bar, full, empty, row0, diag, n_blocks, seqlen_k, qk_scale,
                            dtype, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, EVEN_K)
    NUM_WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = mma_layout(NUM_WARPS, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(NUM_WARPS, HEAD_DIM)
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    om = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh + om[:, None].to(gl.int64)
             * stride_os + od[None, :], out.to(dtype), mask=om[:, None] < seqlen_q)
    lse = (m_i + gl.log2(l_i)) * LN2
    lm = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh + lm, lse, mask=lm < seqlen_q)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q0, q1, k_smem, v_smem, q_bar, full, empty, q_seq, q_row, q_col, k_seq,
              k_col, n_blocks, HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: both Q halves, then the key blocks through the ring."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    load_tile(q_desc, q_seq, q_row, q_col, q_bar, q0)
    load_tile(q_desc, q_seq, q_row + HALF, q_col, q_bar, q1)
    stream_kv(k_desc, v_desc, k_smem, v_smem, full, empty, k_seq, k_col, n_blocks, BLOCK_N, STAGES)


@gluon.jit
def attn_fwd_gluon_kernel(q_desc, k_desc, v_desc, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                          q_seq_b, q_seq_h, q_col_h, k_seq_b, k_seq_h, k_col_h, seqlen_q, seqlen_k, diag,
                          group_size, qk_scale,
                          HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, CAUSAL: gl.constexpr, EVEN_K: gl.constexpr):
    """O[b, i, h] = softmax(Q·Kᵀ · scale) · V for one BLOCK_M query block, LSE[b, h, i] (natural log).
    ``qk_scale`` = softmax scale · log2 e; with CAUSAL, query i sees keys j <= i + ``diag`` (diag >= 0:
    seqlen_k - seqlen_q for flash-attn's bottom-right alignment, 0 for PyTorch's top-left); EVEN_K:
    seqlen_k % BLOCK_N == 0 (no ragged last block). Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch);
    launch with ``num_warps=4`` (the default partition) and a register cap (``maxnreg``) for 12 warps."""
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first so the tail is short
        pid_m = gl.num_programs(0) - 1 - pid_m
    off_h = gl.program_id(1)
    off_b = gl.program_id(2)
    off_hk = off_h // group_size
    n_blocks = kv_blocks(pid_m * BLOCK_M + diag, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

    q0 = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], tile_layout(q_desc.layout))
    q1 = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], tile_layout(q_desc.layout))
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_layout(k_desc.layout))
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_layout(v_desc.layout))
    q_bar, full, empty = ring_barriers(STAGES)

    row0 = pid_m * BLOCK_M
    q_seq = off_b * q_seq_b + off_h * q_seq_h
    k_seq = off_b * k_seq_b + off_hk * k_seq_h
    gl.warp_specialize([
        (_consumer, (q0, k_smem, v_smem, q_bar, full, empty, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb,
                     stride_lh, off_b, off_h, row0, diag, n_blocks, seqlen_q, seqlen_k, qk_scale, dtype, HEAD_DIM, HALF,
                     BLOCK_N, STAGES, CAUSAL, EVEN_K)),
        (_consumer, (q1, k_smem, v_smem, q_bar, full, empty, Out, LSE, stride_ob, stride_os, stride_oh, stride_lb,
                     stride_lh, off_b, off_h, row0 + HALF, diag, n_blocks, seqlen_q, seqlen_k, qk_scale, dtype,
                     HEAD_DIM, HALF, BLOCK_N, STAGES, CAUSAL, EVEN_K)),
        (_producer, (q_desc, k_desc, v_desc, q0, q1, k_smem, v_smem, q_bar, full, empty, q_seq, row0,
                     off_h * q_col_h, k_seq, off_hk * k_col_h, n_blocks, HALF, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])
