"""FlashAttention-2 forward: one program per (query block, head, batch), online softmax over keys.

Features are constexpr switches, so the plain kernel pays nothing for them: causal / sliding
window (``HAS_UPPER`` / ``HAS_LOWER``, see masking.py), packed variable-length batches
(``IS_VARLEN``: rows of sequence b are ``cu_seqlens[b] .. cu_seqlens[b + 1]``), softcap, ALiBi,
a user mask (``MASK_KIND`` 1/2, see scores.py), a block-sparse mask (``MASK_KIND`` 3, see
blocksparse.py) and dropout (see scores.py).

Scores live in the log2 domain (``qk_scale = softmax_scale · log2 e``) so the exponentials are
``exp2``; the log-sum-exp is written back in natural log. Tensors are addressed through their
strides, so (batch, seqlen, heads, dim) and (batch, heads, seqlen, dim) views reach the same code;
only the head dimension must be unit-stride.
"""

import triton
import triton.language as tl

from flashlab.kernels.blocksparse import sparse_block, sparse_phase, sparse_row
from flashlab.kernels.masking import key_block_ranges, phase_range, visible
from flashlab.kernels.scores import dropout_keep, modified_scores

# Running max starts finite: a row whose keys are all masked keeps m = M_INIT, so its
# exponentials are exp2(-inf - M_INIT) = 0 instead of exp2(-inf + inf) = NaN.
M_INIT = tl.constexpr(-1.0e30)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero-filling rows >= n_rows (if CHECK_ROWS) and padded dims."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def shifted_scores(qk, m_i, qi, kj, seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in, cap_out, slope,
                   mask_base, stride_mq, stride_mk, MASKED: tl.constexpr, HAS_UPPER: tl.constexpr,
                   HAS_LOWER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   MASK_KIND: tl.constexpr):
    """A raw q·k tile → (its scores in log2 units shifted by the new row max, that max ``m_ij``).
    Score options as in scores.modified_scores; MASKED tiles also hide keys outside seqlen_k and
    the causal / window band (masking.visible). ``qi`` / ``kj``: [M, 1] / [1, N] indices."""
    if HAS_SOFTCAP or HAS_ALIBI or MASK_KIND != 0 or MASKED:
        s, _ = modified_scores(qk, qi, kj, seqlen_q, seqlen_k, diag, qk_scale, cap_in, cap_out, slope, mask_base,
                               stride_mq, stride_mk, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND)
        if MASKED:
            s = tl.where(visible(qi, kj, seqlen_k, diag, left, right, HAS_UPPER, HAS_LOWER), s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        return s - m_ij[:, None], m_ij
    # Plain scores: fold the scale into one FMA after the row max.
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    return qk * qk_scale - m_ij[:, None], m_ij


@triton.jit
def online_softmax_step(s, m_i, m_ij, l_i, acc):
    """One key tile of the online softmax: ``s`` holds the tile's scores already shifted by the new
    row max ``m_ij`` (log2 domain). Returns P = exp2(s), and l_i and acc rescaled from the old max
    ``m_i`` to ``m_ij`` (l_i with this tile's row sums added; acc still waits for P·V)."""
    p = tl.math.exp2(s)
    alpha = tl.math.exp2(m_i - m_ij)
    return p, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi,
               seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in, cap_out, slope,
               mask_base, stride_mq, stride_mk, seed, drop_base, drop_stride, dropout_p, sp_row,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               SPARSE: tl.constexpr = False, SPARSE_M: tl.constexpr = 1, SPARSE_N: tl.constexpr = 1):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i) of one query block.

    With SPARSE, [lo, hi) counts keys of the listed block-mask blocks: the i-th listed block is
    ``tl.load(sp_row + i)`` (see blocksparse.py), and with MASK_KIND 3 its element mask is tile
    ``tl.load(sp_row + i + tile_offset)`` of the pool at ``mask_base``."""
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(lo, hi, BLOCK_N):
        start_n, tile_base = sparse_block(it, sp_row, mask_base, SPARSE, SPARSE_N, SPARSE_N,
                                          SPARSE_M * SPARSE_N, MASK_KIND)
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        s, m_ij = shifted_scores(tl.dot(q, tl.trans(k)), m_i, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k,
                                 diag, left, right, qk_scale, cap_in, cap_out, slope, tile_base, stride_mq, stride_mk,
                                 MASKED, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND)
        p, l_i, acc = online_softmax_step(s, m_i, m_ij, l_i, acc)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        if HAS_DROPOUT:
            # The normalizer l_i sums the undropped P; only the P·V product sees the dropout.
            p = tl.where(dropout_keep(seed, drop_base, offs_m, start_n, drop_stride, dropout_p, BLOCK_N), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def sequence_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first row of q, first row of k, seqlen_q, seqlen_k) of sequence ``off_b``."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
        seqlen_k = tl.load(CU_K + off_b + 1) - k_start
        return q_start, k_start, seqlen_q, seqlen_k
    return 0, 0, seqlen_q, seqlen_k


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, SLOPES, MASK, SPARSE_TABLE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_sb, stride_sh,
    stride_mb, stride_mh, stride_mq, stride_mk, stride_tb, stride_th, stride_tr,
    seqlen_q, seqlen_k, group_size, window_left, window_right, softmax_scale, cap_in, cap_out,
    seed, dropout_p, drop_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
):
    """O[b, i, h] = softmax(scores(Q[b, i, h], K[b, :, h // group])) · V[b, :, h // group];
    LSE[b, h, i] (fp32, natural log; -inf where row i sees no key).

    Grid: (cdiv(max seqlen_q, BLOCK_M), heads, batch). With IS_VARLEN, ``seqlen_q/k`` are the
    maxima and the batch strides are unused (rows are offset by cu_seqlens). MASK_KIND 3 is a
    block-sparse mask: SPARSE_TABLE rows per (batch, head, SPARSE_M query block), MASK the pool
    of (SPARSE_M, SPARSE_N) element-mask tiles (blocksparse.py)."""
    pid_m = tl.program_id(0)
    if HAS_UPPER:
        # Later query blocks have the most keys: launch them first so the tail is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    off_hk = off_h // group_size
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b * stride_qb + q_start * stride_qs + off_h * stride_qh
    k_base = K + off_b * stride_kb + k_start * stride_ks + off_hk * stride_kh
    v_base = V + off_b * stride_vb + k_start * stride_vs + off_hk * stride_vh
    mask_base = MASK + off_b * stride_mb + off_h.to(tl.int64) * stride_mh  # a (B, H, S, S) mask passes 2^31
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + off_b * stride_sb + off_h * stride_sh)
    lse_row = off_b * stride_lb + off_h * stride_lh + q_start
    drop_base = lse_row * drop_stride  # dropout counters: (LSE row) × stride + key (scores.dropout_keep)

    q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, seqlen_q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    qk_scale = softmax_scale * LOG2E
    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if MASK_KIND == 3:
        # Block-sparse: the fully visible blocks of the table run mask-free, then the partial ones.
        blk_m = start_m // SPARSE_M
        sp_row, n_full, n_part = sparse_row(SPARSE_TABLE, off_b, off_h, blk_m, stride_tb, stride_th, stride_tr)
        tiles = MASK - blk_m.to(tl.int64) * (SPARSE_M * SPARSE_N)
        for phase in tl.static_range(2):
            row, n = sparse_phase(phase, sp_row, n_full, n_part)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, 0,
                                       n * SPARSE_N, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale,
                                       cap_in, cap_out, slope, tiles, stride_mq, stride_mk, seed, drop_base,
                                       drop_stride, dropout_p, row, BLOCK_N, HEAD_DIM, BLOCK_D, phase == 1,
                                       HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, 3 if phase == 1 else 0,
                                       HAS_DROPOUT, True, SPARSE_M, SPARSE_N)
    else:
        lo, full_lo, full_hi, hi = key_block_ranges(start_m, seqlen_k, diag, window_left, window_right,
                                                    BLOCK_M, BLOCK_N, HAS_UPPER, HAS_LOWER)
        for phase in tl.static_range(3):
            # Phase 1 is the mask-free middle; 0 and 2 are the masked edges of the band. The head
            # exists only under a lower edge (window); the tail also covers a ragged last key block.
            if phase != 0 or HAS_LOWER:
                a, b = phase_range(phase, lo, full_lo, full_hi, hi)
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                           a, b, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale,
                                           cap_in, cap_out, slope, mask_base, stride_mq, stride_mk, seed, drop_base,
                                           drop_stride, dropout_p, SPARSE_TABLE, BLOCK_N, HEAD_DIM, BLOCK_D,
                                           phase != 1, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
                                           HAS_DROPOUT)

    # A row that saw no key has l = 0: output zeros and LSE = -inf rather than 0/0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)

    row_ok = offs_m < seqlen_q
    tl.store(LSE + lse_row + offs_m, lse, mask=row_ok)
    o_ptrs = (O + off_b * stride_ob + q_start * stride_os + off_h * stride_oh + offs_m[:, None] * stride_os
              + offs_d[None, :])
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
