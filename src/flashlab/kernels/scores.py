"""Element-wise score modifications shared by the forward and backward kernels.

Order (flash-attn's): scale, softcap (``softcap · tanh(score / softcap)``), ALiBi
(``− slope · |i + diag − j|``), then the user's mask (boolean: keep where True; float: added).
Everything is in log2 units (× log2 e) because the kernels exponentiate with ``exp2``.
Dropout keeps a score's probability with chance ``1 − p``, decided by Philox on a counter that is
unique per (batch, head, query, key), so the backward regenerates the same pattern (philox.py).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def tanh(x):
    """tanh via exp2 (portable to the interpreter); saturates to ±1 without NaN."""
    e = tl.math.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def modified_scores(qk, qi, kj, seqlen_q, seqlen_k, diag, qk_scale, cap_in, cap_out, slope,
                    mask_base, stride_mq, stride_mk,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr):
    """Raw q·k tile → (scores in log2 units, the tanh term of the softcap, or qk without one).

    ``qi`` / ``kj`` are the query and key indices shaped to broadcast against the tile
    ([M, 1] and [1, N], or transposed for the dK/dV kernel's kᵀq tiles).
    ``cap_in = scale / softcap`` and ``cap_out = softcap · log2 e`` (host-computed); MASK_KIND is
    0 (none), 1 (boolean, stored as uint8), 2 (additive float) or 3 (a block-sparse mask's
    uint8 tile, ``mask_base`` already offset to it)."""
    if HAS_SOFTCAP:
        t = tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        dist = tl.abs(qi + diag - kj).to(tl.float32)
        s = s - (slope * LOG2E) * dist
    if MASK_KIND == 3:
        # A block-sparse mask's tile (blocksparse.py): always in bounds, so an unmasked load.
        keep = tl.load(mask_base + qi * stride_mq + kj * stride_mk)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND != 0:
        in_bounds = (qi < seqlen_q) & (kj < seqlen_k)
        # 64-bit rows: a dense mask of one head may hold more than 2^31 elements (seqlen 46341+).
        ptrs = mask_base + qi.to(tl.int64) * stride_mq + kj * stride_mk
        if MASK_KIND == 1:
            keep = tl.load(ptrs, mask=in_bounds, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s = s + tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    return s, t


@triton.jit
def _half(w0, w1, w2, w3, word, high):
    """16-bit half (``high``: the upper one) of word ``word`` (0..3) of four uint32 words, as int32."""
    w = tl.where(word < 2, tl.where(word == 0, w0, w1), tl.where(word == 2, w2, w3))
    return tl.where(high, w >> 16, w & 0xFFFF).to(tl.int32)


@triton.jit
def dropout_keep(seed, counter_base, rows, start_n, stride_counter_m, dropout_p, BLOCK_N: tl.constexpr,
                 TRANSPOSED: tl.constexpr = False):
    """Boolean tile [rows, BLOCK_N] (TRANSPOSED: [BLOCK_N, rows], the dK/dV kernel's orientation) of
    query ``rows`` (1-D) and keys ``start_n + j``: True where the weight survives dropout.

    Counter c = (LSE row of the query) × stride + key, the stride, ``counter_base`` and ``start_n``
    multiples of 32. Its random number is 16-bit half ``c % 2`` of word ``(c // 8) % 4`` of
    ``tl.randint4x(seed, 4 · (c // 32) + (c % 8) // 2)`` (philox.py mirrors it and documents the
    threshold): one Philox call serves keys {8w + 2t, 8w + 2t + 1 : w < 4} of a 32-key span, which
    are the ones a thread holds of a wgmma / mma accumulator row, so the tile is built where the
    scores live, with no layout conversion (perf-notes round 8).

    Tiles narrower than 32 on either side draw the same numbers one Philox call per element: the
    joined form gave wrong patterns in 16 × 16 block-sparse partial tiles on the H200 (Triton 3.6,
    GPU only; perf-notes round 8), and the per-element form was right there."""
    threshold = tl.cast(dropout_p * 65536.0 + 0.5, tl.int32)  # philox.dropout_threshold
    row_base = counter_base + rows.to(tl.int64) * stride_counter_m + start_n  # multiples of 32
    if BLOCK_N < 32 or rows.shape[0] < 32:
        c = row_base[:, None] + tl.arange(0, BLOCK_N)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, 4 * (c >> 5) + ((c & 7) >> 1))
        keep = _half(w0, w1, w2, w3, ((c >> 3) & 3).to(tl.int32), (c & 1) != 0) >= threshold
    else:
        # groups [rows, span, t]: 4 · (row_base + 32 · span) / 32 + t
        groups = ((row_base >> 3)[:, None, None] + 4 * tl.arange(0, BLOCK_N // 32)[None, :, None]
                  + tl.arange(0, 4)[None, None, :])
        w0, w1, w2, w3 = tl.randint4x(seed, groups)
        words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [rows, span, t, x, y]: word 2x + y
        words = tl.permute(words, (0, 1, 3, 4, 2))  # [rows, span, x, y, t]
        halves = tl.join((words & 0xFFFF).to(tl.int32), (words >> 16).to(tl.int32))  # [..., t, high]
        keep = tl.reshape(halves, [rows.shape[0], BLOCK_N]) >= threshold  # key 32·span + 8·word + 2t + high
    if TRANSPOSED:
        keep = tl.trans(keep)
    return keep


@triton.jit
def dropout_pattern_kernel(OUT, seed, dropout_p, seqlen_q, seqlen_k, drop_stride, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """OUT[b, h, i, j] = 1 where dense attention (LSE rows b·H·Sq + h·Sq + i, ``drop_stride``
    counters a row) keeps weight (i, j). Grid: (cdiv(seqlen_q, BLOCK_M), heads, batch). For tests:
    it is seqlen² bytes."""
    row0 = (tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * seqlen_q
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, row0 * drop_stride, offs_m, start_n, drop_stride, dropout_p, BLOCK_N)
        ok = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
        tl.store(OUT + (row0 + offs_m[:, None]) * seqlen_k + offs_n[None, :], keep.to(tl.uint8), mask=ok)
