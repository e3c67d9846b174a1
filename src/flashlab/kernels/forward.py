"""FlashAttention-2 forward: one program per (query block, head, batch), online softmax over keys.

Scores live in the log2 domain (``qk_scale = softmax_scale · log2 e``) so the exponentials are
``exp2``; the log-sum-exp is written back in natural log. Tensors are addressed through their
strides, so (batch, seqlen, heads, dim) and (batch, heads, seqlen, dim) views reach the same code;
only the head dimension must be unit-stride.
"""

import triton
import triton.language as tl

from flashlab.kernels.masking import key_block_ranges, visible

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
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi,
               seqlen_k, diag_offset, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i) of one query block."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            keep = visible(offs_m, cols, seqlen_k, diag_offset, IS_CAUSAL)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    seqlen_q, seqlen_k, group_size, diag_offset, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """O[b, i, h] = softmax(scale · Q[b, i, h] · K[b, :, h // group]ᵀ) · V[b, :, h // group];
    LSE[b, h, i] (fp32, natural log; -inf where row i sees no key).

    Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch).
    """
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Later query blocks have the most keys: launch them first so the tail is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // group_size

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh

    q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, seqlen_q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    qk_scale = softmax_scale * LOG2E
    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_hi, hi = key_block_ranges(start_m, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               0, full_hi, seqlen_k, diag_offset, qk_scale,
                               BLOCK_N, HEAD_DIM, BLOCK_D, False, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               full_hi, hi, seqlen_k, diag_offset, qk_scale,
                               BLOCK_N, HEAD_DIM, BLOCK_D, True, IS_CAUSAL)

    # A row that saw no key has l = 0: output zeros and LSE = -inf rather than 0/0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)

    row_ok = offs_m < seqlen_q
    lse_ptrs = LSE + (off_b * tl.num_programs(1) + off_h) * seqlen_q + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
