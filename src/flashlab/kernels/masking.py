"""Which key blocks a query block visits, and which of them need a mask.

The causal rule everywhere: key ``j`` is visible from query ``i`` iff ``j <= i + diag_offset``
(``diag_offset = seqlen_k - seqlen_q`` for flash-attn's bottom-right alignment, 0 for PyTorch's
top-left). Key blocks split into a mask-free run (every key visible to every query row of the
block, and inside ``seqlen_k``) and a short masked run (the diagonal and the ragged tail), so the
hot loop carries no per-element predicate.
"""

import triton
import triton.language as tl


@triton.jit
def key_block_ranges(start_m, seqlen_k, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr):
    """For the query block starting at row ``start_m``: keys [0, full_hi) need no mask,
    keys [full_hi, hi) do. ``full_hi`` is a multiple of BLOCK_N."""
    if IS_CAUSAL:
        # The last row of the block sees keys up to start_m + BLOCK_M - 1 + diag_offset.
        hi = tl.minimum(start_m + BLOCK_M + diag_offset, seqlen_k)
        hi = tl.maximum(hi, 0)
        # The first row sees keys up to start_m + diag_offset: that prefix is visible to all rows.
        full_hi = tl.minimum(start_m + diag_offset + 1, seqlen_k)
        full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def query_block_ranges(start_n, seqlen_q, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       IS_CAUSAL: tl.constexpr):
    """For the key block starting at ``start_n``: query rows [lo, masked_hi) need the causal mask,
    rows [masked_hi, seqlen_q) see the whole key block. Both bounds are multiples of BLOCK_M
    (rows past seqlen_q are zero-padded and contribute nothing)."""
    if IS_CAUSAL:
        # Row i sees key start_n iff i >= start_n - diag_offset.
        lo = tl.maximum(start_n - diag_offset, 0) // BLOCK_M * BLOCK_M
        # Row i sees the whole block iff i >= start_n + BLOCK_N - 1 - diag_offset.
        masked_hi = tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0)
        masked_hi = tl.cdiv(masked_hi, BLOCK_M) * BLOCK_M
        masked_hi = tl.minimum(masked_hi, tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M)
        lo = tl.minimum(lo, masked_hi)
    else:
        lo = 0
        masked_hi = 0
    return lo, masked_hi


@triton.jit
def visible(offs_m, offs_n, seqlen_k, diag_offset, IS_CAUSAL: tl.constexpr):
    """Boolean [BLOCK_M, BLOCK_N]: key inside seqlen_k and allowed by the causal rule."""
    keep = offs_n[None, :] < seqlen_k
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
    return keep
