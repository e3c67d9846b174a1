"""The forward of the plain dense case with tensor-memory-accelerator (TMA) loads: an experiment.

Same algorithm and block walk as forward.py (masked head, mask-free middle, masked tail; see
masking.py), restricted to what most training calls are: dense batches, causal or sliding-window
or full, GQA, no softcap / ALiBi / mask / dropout / varlen. Q, K, V and O are read and written
through device-side tensor descriptors (``tl.make_tensor_descriptor``), one per (batch, head)
program, over the 2-D ``(seqlen, head_dim)`` slice of each tensor: Hopper's TMA unit copies whole
tiles into shared memory, zero-filling rows past the sequence and columns past the head dim, and
clips the output tile's store the same way. Whether Triton 3.6 pipelines these loads better than
the pointer loads of forward.py is what the experiment measures (docs/perf-notes.md, round 4);
until then ops.py uses this kernel only with ``FLASHLAB_FWD_TMA=1``.

Descriptors need 16-byte-aligned bases and strides (ops.tma_eligible checks) and a global scratch
allocator for the descriptors themselves (ops.py sets one before the launch).
"""

import triton
import triton.language as tl

from flashlab.kernels.forward import LN2, LOG2E, M_INIT, online_softmax_step, shifted_scores
from flashlab.kernels.masking import key_block_ranges, phase_range


@triton.jit
def _tma_inner(acc, l_i, m_i, q, k_desc, v_desc, offs_m, lo, hi, seqlen_k, diag, left, right, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i) of one query block."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([start_n, 0])
        # Keys past seqlen_k were zero-filled by the descriptor: the masked tiles hide them too. No score
        # options here, so the softcap / ALiBi / mask arguments are unread zeros.
        s, m_ij = shifted_scores(tl.dot(q, tl.trans(k)), m_i, offs_m[:, None], start_n + offs_n[None, :], 0, seqlen_k,
                                 diag, left, right, qk_scale, 0.0, 0.0, 0.0, 0, 0, 0, MASKED, HAS_UPPER, HAS_LOWER,
                                 False, False, 0)
        p, l_i, acc = online_softmax_step(s, m_i, m_ij, l_i, acc)
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def attn_fwd_tma_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, window_left, window_right, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr,
):
    """forward.attn_fwd_kernel's result for the plain dense case (module docstring).
    Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch)."""
    pid_m = tl.program_id(0)
    if HAS_UPPER:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest rows first: a shorter tail
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // group_size
    start_m = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0

    q_desc = tl.make_tensor_descriptor(Q + off_b * stride_qb + off_h * stride_qh, shape=[seqlen_q, HEAD_DIM],
                                       strides=[stride_qs, 1], block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + off_b * stride_kb + off_hk * stride_kh, shape=[seqlen_k, HEAD_DIM],
                                       strides=[stride_ks, 1], block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + off_b * stride_vb + off_hk * stride_vh, shape=[seqlen_k, HEAD_DIM],
                                       strides=[stride_vs, 1], block_shape=[BLOCK_N, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(O + off_b * stride_ob + off_h * stride_oh, shape=[seqlen_q, HEAD_DIM],
                                       strides=[stride_os, 1], block_shape=[BLOCK_M, BLOCK_D])

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([start_m, 0])
    qk_scale = softmax_scale * LOG2E
    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_block_ranges(start_m, seqlen_k, diag, window_left, window_right,
                                                BLOCK_M, BLOCK_N, HAS_UPPER, HAS_LOWER)
    for phase in tl.static_range(3):
        a, b = phase_range(phase, lo, full_lo, full_hi, hi)
        acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, k_desc, v_desc, offs_m, a, b, seqlen_k, diag, window_left,
                                   window_right, qk_scale, BLOCK_N, phase != 1, HAS_UPPER, HAS_LOWER)

    # A row that saw no key has l = 0: output zeros and LSE = -inf rather than 0/0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)
    o_desc.store([start_m, 0], acc.to(O.dtype.element_ty))
