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

from flashlab.kernels.forward import LOG2E, _load_tile
from flashlab.kernels.masking import key_block_ranges, query_block_ranges, visible


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """DELTA[b, h, i] = Σ_d O·dO (fp32), minus dLSE[b, h, i] when the LSE itself has a gradient
    (∂LSE/∂S = P folds into the same term). Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch)."""
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                    + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = (off_b * tl.num_programs(1) + off_h) * seqlen_q + offs_m
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
def _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, row_base,
                offs_n, offs_d, lo, hi, seqlen_q, diag_offset, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr):
    """Accumulate query blocks [lo, hi) into one key block's dK, dV (transposed orientation)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d,
                       HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, seqlen_q, offs_d,
                        HEAD_DIM, BLOCK_D, True)
        lse, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, seqlen_q)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag_offset, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    seqlen_q, seqlen_k, heads, group_size, diag_offset, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """dK, dV for one key block of one kv head, summed over the query heads of its GQA group.
    Grid: (cdiv(seqlen_k, BLOCK_N), kv_heads, batch)."""
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_tile(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    lo, masked_hi = query_block_ranges(start_n, seqlen_q, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)

    for g in range(group_size):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * heads + off_h) * seqlen_q
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, LSE, DELTA, row_base,
                             offs_n, offs_d, lo, masked_hi, seqlen_q, diag_offset, qk_scale,
                             BLOCK_M, HEAD_DIM, BLOCK_D, True)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, LSE, DELTA, row_base,
                             offs_n, offs_d, masked_hi, seqlen_q, seqlen_q, diag_offset, qk_scale,
                             BLOCK_M, HEAD_DIM, BLOCK_D, False)

    dk *= softmax_scale
    row_ok = offs_n[:, None] < seqlen_k
    if BLOCK_D != HEAD_DIM:
        row_ok = row_ok & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=row_ok)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=row_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi,
              seqlen_k, diag_offset, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Accumulate key blocks [lo, hi) into one query block's dQ."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(visible(offs_m, cols, seqlen_k, diag_offset, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k, group_size, diag_offset, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """dQ for one query block. Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch)."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // group_size
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                    + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    row_base = (off_b * tl.num_programs(1) + off_h) * seqlen_q
    lse, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, seqlen_q)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    qk_scale = softmax_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_hi, hi = key_block_ranges(start_m, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, 0, full_hi,
                   seqlen_k, diag_offset, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, False, IS_CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, full_hi, hi,
                   seqlen_k, diag_offset, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, True, IS_CAUSAL)

    dq *= softmax_scale
    row_ok = offs_m[:, None] < seqlen_q
    if BLOCK_D != HEAD_DIM:
        row_ok = row_ok & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok)
