"""FlashAttention-2 backward: a preprocess (delta = rowsum(dO ∘ O)), a dK/dV kernel that walks
query blocks for one key block, and a dQ kernel that walks key blocks for one query block.

No atomics: each program owns the rows it writes, so gradients are bit-identical run to run.
GQA is reduced inside the dK/dV kernel (it loops over the query heads of its kv head), so no
expanded k/v and no per-query-head dk/dv buffers exist.

P is recomputed from the forward's LSE: P = exp2(qk · scale·log2e − LSE·log2e). Rows with
LSE = -inf (they saw no key) are read as +inf, which makes their P exactly 0.
"""

import triton
import triton.language as tl

from flashlab.kernels.blocksparse import sparse_block, sparse_phase, sparse_row
from flashlab.kernels.forward import LOG2E, _load_tile, sequence_bounds
from flashlab.kernels.masking import key_block_ranges, phase_range, query_block_ranges, visible
from flashlab.kernels.scores import dropout_keep, modified_scores


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """DELTA = Σ_d O·dO (fp32, laid out like the LSE), minus dLSE when the LSE itself has a
    gradient (∂LSE/∂S = P folds into the same term). Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch)."""
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    q_start, _, seqlen_q, _ = sequence_bounds(CU_Q, CU_Q, off_b, seqlen_q, seqlen_q, IS_VARLEN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + (q_start + offs_m[:, None]) * stride_os + off_h * stride_oh
                   + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + off_b * stride_dob + (q_start + offs_m[:, None]) * stride_dos + off_h * stride_doh
                    + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, offs_m, seqlen_q):
    """LSE in log2 units (+inf for padded rows and rows that saw no key) and delta."""
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
    return lse, delta


@triton.jit
def _probs_and_dscores(qk, dp, lse, delta, qi, kj, seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in,
                       cap_out, slope, mask_base, stride_mq, stride_mk, seed, drop_base, drop_stride, dropout_p,
                       rows, start_n,
                       MASKED: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """From a q·k tile and its dO·v tile: (P after dropout, for dV; dS w.r.t. the raw q·k / scale).
    ``lse`` and ``delta`` broadcast like ``qi``; ``rows`` (1-D) and keys ``start_n`` .. + BLOCK_N
    are the tile's, which is [BLOCK_N, rows] with KEYS_FIRST (the dK/dV kernel's kᵀq tiles)."""
    s, t = modified_scores(qk, qi, kj, seqlen_q, seqlen_k, diag, qk_scale, cap_in, cap_out, slope,
                           mask_base, stride_mq, stride_mk, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND)
    p = tl.math.exp2(s - lse)
    if MASKED:
        p = tl.where(visible(qi, kj, seqlen_k, diag, left, right, HAS_UPPER, HAS_LOWER), p, 0.0)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, drop_base, rows, start_n, drop_stride, dropout_p, BLOCK_N, KEYS_FIRST)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_dropped = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p_dropped, ds


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, row_base,
                offs_n, start_n, offs_d, lo, hi, seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in, cap_out,
                slope, mask_base, stride_mq, stride_mk, seed, drop_stride, dropout_p, sp_row,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                SPARSE: tl.constexpr = False, SPARSE_M: tl.constexpr = 1, SPARSE_N: tl.constexpr = 1):
    """Accumulate query blocks [lo, hi) into one key block's dK, dV (tiles are kᵀ-oriented:
    [BLOCK_N, BLOCK_M]). With SPARSE, [lo, hi) counts rows of the query blocks listed at
    ``sp_row`` (the transposed block table, see blocksparse.py)."""
    for it in range(lo, hi, BLOCK_M):
        start_m, tile_base = sparse_block(it, sp_row, mask_base, SPARSE, SPARSE_M, SPARSE_M * SPARSE_N,
                                          SPARSE_M * SPARSE_N, MASK_KIND)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d,
                       HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, seqlen_q, offs_d,
                        HEAD_DIM, BLOCK_D, True)
        lse, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, seqlen_q)
        p_t, ds_t = _probs_and_dscores(
            tl.dot(k, tl.trans(q)), tl.dot(v, tl.trans(do)), lse[None, :], delta[None, :], offs_m[None, :],
            offs_n[:, None], seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in, cap_out, slope, tile_base,
            stride_mq, stride_mk, seed, row_base * drop_stride, drop_stride, dropout_p, offs_m, start_n,
            MASKED, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT, BLOCK_N, True)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, SLOPES, MASK, SPARSE_TABLE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_sb, stride_sh,
    stride_mb, stride_mh, stride_mq, stride_mk, stride_tb, stride_th, stride_tr,
    seqlen_q, seqlen_k, group_size, window_left, window_right, softmax_scale, cap_in, cap_out,
    seed, dropout_p, drop_stride, heads_per_split, stride_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
):
    """dK, dV for one key block of one kv head, summed over ``heads_per_split`` query heads of its
    GQA group (all of them: group_size). With fewer, split s of the group (group_split.py) writes
    its fp32 partial sums ``stride_split`` elements past DK / DV's split 0.
    Grid: (cdiv(max seqlen_k, BLOCK_N), kv_heads, batch · splits), splits = cdiv(group_size,
    heads_per_split)."""
    splits = tl.cdiv(group_size, heads_per_split)
    split = tl.program_id(2) % splits
    off_hk = tl.program_id(1)
    off_b = (tl.program_id(2) // splits).to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k = sequence_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_tile(K + off_b * stride_kb + (k_start + offs_n[:, None]) * stride_ks + off_hk * stride_kh
                   + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + off_b * stride_vb + (k_start + offs_n[:, None]) * stride_vs + off_hk * stride_vh
                   + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    lo, full_lo, full_hi, hi = query_block_ranges(start_n, seqlen_q, diag, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, HAS_UPPER, HAS_LOWER)

    g_lo = split * heads_per_split
    for g in range(g_lo, tl.minimum(g_lo + heads_per_split, group_size)):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + q_start * stride_qs + off_h * stride_qh
        do_base = DO + off_b * stride_dob + q_start * stride_dos + off_h * stride_doh
        row_base = off_b * stride_lb + off_h * stride_lh + q_start
        mask_base = MASK + off_b * stride_mb + off_h.to(tl.int64) * stride_mh  # a (B, H, S, S) mask passes 2^31
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + off_b * stride_sb + off_h * stride_sh)
        if MASK_KIND == 3:
            # Block-sparse: SPARSE_TABLE is the transposed table, one row per (batch, head, key block).
            blk_n = start_n // SPARSE_N
            sp_row, n_full, n_part = sparse_row(SPARSE_TABLE, off_b, off_h, blk_n, stride_tb, stride_th, stride_tr)
            tiles = MASK - blk_n.to(tl.int64) * SPARSE_N
            for phase in tl.static_range(2):
                row, n = sparse_phase(phase, sp_row, n_full, n_part)
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, LSE, DELTA, row_base,
                                     offs_n, start_n, offs_d, 0, n * SPARSE_M, seqlen_q, seqlen_k, diag,
                                     window_left, window_right, qk_scale, cap_in, cap_out, slope, tiles, stride_mq,
                                     stride_mk, seed, drop_stride, dropout_p, row, BLOCK_M, BLOCK_N, HEAD_DIM,
                                     BLOCK_D, phase == 1, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI,
                                     3 if phase == 1 else 0, HAS_DROPOUT, True, SPARSE_M, SPARSE_N)
        else:
            for phase in tl.static_range(3):
                # Query rows walk the band: a masked head only under an upper edge (causal), a masked
                # tail only under a lower one (query tails need no mask: their rows are zero-padded).
                if phase == 1 or (phase == 0 and HAS_UPPER) or (phase == 2 and HAS_LOWER):
                    a, b = phase_range(phase, lo, full_lo, full_hi, hi)
                    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, LSE, DELTA,
                                         row_base, offs_n, start_n, offs_d, a, b, seqlen_q, seqlen_k, diag,
                                         window_left, window_right, qk_scale, cap_in, cap_out, slope, mask_base,
                                         stride_mq, stride_mk, seed, drop_stride, dropout_p, SPARSE_TABLE, BLOCK_M,
                                         BLOCK_N, HEAD_DIM, BLOCK_D, phase != 1, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP,
                                         HAS_ALIBI, MASK_KIND, HAS_DROPOUT)

    dk *= softmax_scale
    row_ok = offs_n[:, None] < seqlen_k
    if BLOCK_D != HEAD_DIM:
        row_ok = row_ok & (offs_d[None, :] < HEAD_DIM)
    DK += split.to(tl.int64) * stride_split
    DV += split.to(tl.int64) * stride_split
    tl.store(DK + off_b * stride_dkb + (k_start + offs_n[:, None]) * stride_dks + off_hk * stride_dkh
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=row_ok)
    tl.store(DV + off_b * stride_dvb + (k_start + offs_n[:, None]) * stride_dvs + off_hk * stride_dvh
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=row_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi,
              seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in, cap_out, slope,
              mask_base, stride_mq, stride_mk, seed, drop_base, drop_stride, dropout_p, sp_row,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              SPARSE: tl.constexpr = False, SPARSE_M: tl.constexpr = 1, SPARSE_N: tl.constexpr = 1):
    """Accumulate key blocks [lo, hi) into one query block's dQ (SPARSE: as in forward._fwd_inner)."""
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(lo, hi, BLOCK_N):
        start_n, tile_base = sparse_block(it, sp_row, mask_base, SPARSE, SPARSE_N, SPARSE_N,
                                          SPARSE_M * SPARSE_N, MASK_KIND)
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        _, ds = _probs_and_dscores(
            tl.dot(q, tl.trans(k)), tl.dot(do, tl.trans(v)), lse[:, None], delta[:, None], offs_m[:, None],
            cols[None, :], seqlen_q, seqlen_k, diag, left, right, qk_scale, cap_in, cap_out, slope, tile_base,
            stride_mq, stride_mk, seed, drop_base, drop_stride, dropout_p, offs_m, start_n,
            MASKED, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT, BLOCK_N, False)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, SLOPES, MASK, SPARSE_TABLE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_sb, stride_sh,
    stride_mb, stride_mh, stride_mq, stride_mk, stride_tb, stride_th, stride_tr,
    seqlen_q, seqlen_k, group_size, window_left, window_right, softmax_scale, cap_in, cap_out,
    seed, dropout_p, drop_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
):
    """dQ for one query block. Grid: (cdiv(max seqlen_q, BLOCK_M), heads, batch)."""
    pid_m = tl.program_id(0)
    if HAS_UPPER:
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

    q = _load_tile(Q + off_b * stride_qb + (q_start + offs_m[:, None]) * stride_qs + off_h * stride_qh
                   + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + off_b * stride_dob + (q_start + offs_m[:, None]) * stride_dos + off_h * stride_doh
                    + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    row_base = off_b * stride_lb + off_h * stride_lh + q_start
    lse, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, seqlen_q)
    k_base = K + off_b * stride_kb + k_start * stride_ks + off_hk * stride_kh
    v_base = V + off_b * stride_vb + k_start * stride_vs + off_hk * stride_vh
    mask_base = MASK + off_b * stride_mb + off_h.to(tl.int64) * stride_mh  # a (B, H, S, S) mask passes 2^31
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + off_b * stride_sb + off_h * stride_sh)
    qk_scale = softmax_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if MASK_KIND == 3:
        blk_m = start_m // SPARSE_M
        sp_row, n_full, n_part = sparse_row(SPARSE_TABLE, off_b, off_h, blk_m, stride_tb, stride_th, stride_tr)
        tiles = MASK - blk_m.to(tl.int64) * (SPARSE_M * SPARSE_N)
        for phase in tl.static_range(2):
            row, n = sparse_phase(phase, sp_row, n_full, n_part)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, 0,
                           n * SPARSE_N, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, cap_in,
                           cap_out, slope, tiles, stride_mq, stride_mk, seed, row_base * drop_stride, drop_stride,
                           dropout_p, row, BLOCK_N, HEAD_DIM, BLOCK_D, phase == 1, HAS_UPPER, HAS_LOWER,
                           HAS_SOFTCAP, HAS_ALIBI, 3 if phase == 1 else 0, HAS_DROPOUT, True, SPARSE_M, SPARSE_N)
    else:
        lo, full_lo, full_hi, hi = key_block_ranges(start_m, seqlen_k, diag, window_left, window_right,
                                                    BLOCK_M, BLOCK_N, HAS_UPPER, HAS_LOWER)
        for phase in tl.static_range(3):
            # Keys walk the band: a masked head only under a lower edge (window); the masked tail
            # also covers a ragged last key block, so it is always compiled.
            if phase != 0 or HAS_LOWER:
                a, b = phase_range(phase, lo, full_lo, full_hi, hi)
                dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, a, b,
                               seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, cap_in, cap_out,
                               slope, mask_base, stride_mq, stride_mk, seed, row_base * drop_stride, drop_stride,
                               dropout_p, SPARSE_TABLE, BLOCK_N, HEAD_DIM, BLOCK_D, phase != 1, HAS_UPPER,
                               HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT)

    dq *= softmax_scale
    row_ok = offs_m[:, None] < seqlen_q
    if BLOCK_D != HEAD_DIM:
        row_ok = row_ok & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + off_b * stride_dqb + (q_start + offs_m[:, None]) * stride_dqs + off_h * stride_dqh
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok)


@triton.jit
def dkdv_split_reduce_kernel(
    PART_DK, PART_DV, DK, DV, n, splits, size_s, size_h, size_d,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    BLOCK: tl.constexpr,
):
    """DK, DV (batch, seqlen_k, kv_heads, head_dim) by their strides = the sums over the splits of a
    split group's fp32 partials (group_split.py): PART_DK, PART_DV contiguous (splits, n), n the
    elements of DK in (batch, seqlen_k, kv_heads, head_dim) order; summed in split order, so the
    result is the same every run. Grid: (cdiv(n, BLOCK),)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dk = tl.zeros([BLOCK], dtype=tl.float32)
    dv = tl.zeros([BLOCK], dtype=tl.float32)
    part_dk, part_dv = PART_DK + offs, PART_DV + offs
    for _ in range(splits):
        dk += tl.load(part_dk, mask=ok, other=0.0)
        dv += tl.load(part_dv, mask=ok, other=0.0)
        part_dk += n  # pointer steps: splits × n may pass 2^31
        part_dv += n
    d = offs % size_d
    h = offs // size_d % size_h
    pos = offs // (size_d * size_h) % size_s
    b = (offs // (size_d * size_h * size_s)).to(tl.int64)
    tl.store(DK + b * stride_dkb + pos * stride_dks + h * stride_dkh + d, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b * stride_dvb + pos * stride_dvs + h * stride_dvh + d, dv.to(DV.dtype.element_ty), mask=ok)
