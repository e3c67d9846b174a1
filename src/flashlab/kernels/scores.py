"""Element-wise score modifications shared by the forward and backward kernels.

Order (flash-attn's): scale, softcap (``softcap · tanh(score / softcap)``), ALiBi
(``− slope · |i + diag − j|``), then the user's mask (boolean: keep where True; float: added).
Everything is in log2 units (× log2 e) because the kernels exponentiate with ``exp2``.
Dropout keeps a score's probability with chance ``1 − p``, decided by Philox on a counter that is
unique per (batch, head, query, key), so the backward regenerates the same pattern (philox.py).
"""

import os

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


# Experiment (docs/perf-notes.md round 8): draw narrow (< 32 key) tiles' numbers one Philox call
# per element instead of joining eight halves; the 16-block block-sparse dropout bug's probe sets it.
NARROW_ELEMENTWISE = tl.constexpr(os.environ.get("FLASHLAB_DROPOUT_NARROW", "join") == "elementwise")


@triton.jit
def _halves(w):
    """uint32 words → (low 16 bits, high 16 bits) as int32."""
    return (w & 0xFFFF).to(tl.int32), (w >> 16).to(tl.int32)


@triton.jit
def dropout_keep(seed, counter_base, rows, start_n, stride_counter_m, dropout_p, BLOCK_N: tl.constexpr,
                 TRANSPOSED: tl.constexpr = False):
    """Boolean tile [rows, BLOCK_N] (TRANSPOSED: [BLOCK_N, rows], the dK/dV kernel's orientation) of
    query ``rows`` (1-D) and keys ``start_n + j``: True where the weight survives dropout.

    Counter = (LSE row of the query) × stride + key, the stride, ``counter_base`` and ``start_n``
    multiples of 8; its random number is 16-bit half ``counter % 8`` of the four words of
    ``tl.randint4x(seed, counter // 8)`` (word (c % 8) // 2, low half for even c): one Philox call
    per eight keys (philox.py mirrors it on the CPU and documents the threshold)."""
    threshold = tl.cast(dropout_p * 65536.0 + 0.5, tl.int32)  # philox.dropout_threshold
    if NARROW_ELEMENTWISE and BLOCK_N < 32:
        c = (counter_base + rows.to(tl.int64)[:, None] * stride_counter_m + start_n
             + tl.arange(0, BLOCK_N)[None, :])
        w0, w1, w2, w3 = tl.randint4x(seed, c >> 3)
        sel = (c & 7).to(tl.int32)
        word = tl.where(sel < 4, tl.where(sel < 2, w0, w1), tl.where(sel < 6, w2, w3))
        half = tl.where((sel & 1) == 0, word & 0xFFFF, word >> 16).to(tl.int32)
        keep = half >= threshold
        if TRANSPOSED:
            keep = tl.trans(keep)
        return keep
    groups = (counter_base + rows.to(tl.int64)[:, None] * stride_counter_m + start_n
              + 8 * tl.arange(0, BLOCK_N // 8)[None, :]) >> 3
    w0, w1, w2, w3 = tl.randint4x(seed, groups)
    h0, h1 = _halves(w0)
    h2, h3 = _halves(w1)
    h4, h5 = _halves(w2)
    h6, h7 = _halves(w3)
    # Each join appends an axis: [rows, N/8, a, b, c] is flattened as key 8g + 4a + 2b + c, so the
    # innermost join picks a, the outermost c (half h_k sits at key 8g + k).
    bits = tl.join(tl.join(tl.join(h0, h4), tl.join(h2, h6)), tl.join(tl.join(h1, h5), tl.join(h3, h7)))
    bits = tl.reshape(bits, [rows.shape[0], BLOCK_N])
    keep = bits >= threshold
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
