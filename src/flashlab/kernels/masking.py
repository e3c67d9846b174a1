"""Which blocks a program visits, and which of them need an element-wise mask.

Visibility everywhere (flash-attn's semantics): key ``j`` is visible from query ``i`` iff
``i + diag - left <= j <= i + diag + right``, where ``diag = seqlen_k - seqlen_q`` for flash-attn's
bottom-right alignment or 0 for PyTorch's top-left, ``right = 0`` under causal, and an unbounded
side (window -1, no causal) drops its inequality (``HAS_UPPER`` / ``HAS_LOWER`` are constexpr).

A program's blocks split into masked head [lo, full_lo), mask-free middle [full_lo, full_hi) and
masked tail [full_hi, hi): the hot loop carries no predicate, blocks outside the window are never
visited (sliding-window cost grows linearly with seqlen), and only diagonal/edge blocks pay for
the mask.
"""

import triton
import triton.language as tl


@triton.jit
def _order(lo, full_lo, full_hi, hi):
    """Clamp so that lo <= full_lo <= full_hi <= hi (empty ranges where nothing is visible)."""
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_block_ranges(start_m, seqlen_k, diag, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr):
    """Key ranges (lo, full_lo, full_hi, hi) for the query rows [start_m, start_m + BLOCK_M).
    All but ``hi`` are multiples of BLOCK_N; keys in [full_lo, full_hi) are visible to every row."""
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if HAS_UPPER:
        # The last row sees keys up to start_m + BLOCK_M - 1 + diag + right, the first row up to
        # start_m + diag + right.
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + diag + right, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + diag + right + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_LOWER:
        # The first row sees keys from start_m + diag - left, the last from start_m + BLOCK_M - 1 + diag - left.
        lo = tl.maximum(start_m + diag - left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diag - left, 0), BLOCK_N) * BLOCK_N
    return _order(lo, full_lo, full_hi, hi)


@triton.jit
def phase_range(phase: tl.constexpr, lo, full_lo, full_hi, hi):
    """[a, b) walked in ``phase`` of a band: 0 the masked head, 1 the mask-free middle, 2 the masked tail."""
    a, b = full_hi, hi
    if phase == 0:
        a, b = lo, full_lo
    if phase == 1:
        a, b = full_lo, full_hi
    return a, b


@triton.jit
def query_block_ranges(start_n, seqlen_q, diag, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr):
    """Query ranges (lo, full_lo, full_hi, hi) for the keys [start_n, start_n + BLOCK_N), all
    multiples of BLOCK_M; rows in [full_lo, full_hi) see every key of the block. Rows past
    seqlen_q are zero-padded by the caller and contribute nothing."""
    lo = 0
    full_lo = 0
    hi = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    full_hi = hi
    if HAS_UPPER:
        # Row i sees key j only if i >= j - diag - right.
        lo = tl.maximum(start_n - diag - right, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - right, 0), BLOCK_M) * BLOCK_M
    if HAS_LOWER:
        # Row i sees key j only if i <= j - diag + left.
        hi = tl.minimum(hi, tl.cdiv(tl.maximum(start_n + BLOCK_N - diag + left, 0), BLOCK_M) * BLOCK_M)
        full_hi = tl.minimum(full_hi, tl.maximum(start_n - diag + left + 1, 0) // BLOCK_M * BLOCK_M)
    return _order(lo, full_lo, full_hi, hi)


@triton.jit
def visible(qi, kj, seqlen_k, diag, left, right, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr):
    """Boolean tile: key inside seqlen_k and inside the (causal/window) band. ``qi`` / ``kj`` are
    query / key indices shaped to broadcast ([M, 1] and [1, N], or transposed)."""
    keep = kj < seqlen_k
    if HAS_UPPER:
        keep = keep & (kj <= qi + diag + right)
    if HAS_LOWER:
        keep = keep & (kj >= qi + diag - left)
    return keep
