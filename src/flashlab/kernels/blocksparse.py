"""Block-sparse masks inside the kernels: walking a block table (built by flashlab/block_mask.py).

A table row lists, for one (batch, head, query block) — or, transposed, one key block — the
blocks of the other axis to visit: ``[n_full, n_partial, blk_0, tile_0, blk_1, tile_1, …]``,
the ``n_full`` fully visible blocks first (run with no mask at all), then the ``n_partial``
partial ones, whose element mask is tile ``tile_i`` of a pool of (SPARSE_M, SPARSE_N) uint8
tiles (MASK_KIND 3). Blocks in no list are fully masked and never read.

The kernels' loops count "virtual" indices: slot ``it`` is offset ``it % BLOCK`` inside the
``it // BLOCK``-th listed block, so one flat loop (pipelined like the dense one) walks every
kernel tile of every listed block. Kernel tiles divide the mask blocks (ops.py clamps them).
"""

import triton
import triton.language as tl


@triton.jit
def sparse_row(TABLE, off_b, off_h, blk, stride_b, stride_h, stride_r):
    """(pointer to the first (blk, tile) pair, n_full, n_partial) of one table row."""
    row = TABLE + off_b * stride_b + off_h * stride_h + blk * stride_r
    return row + 2, tl.load(row), tl.load(row + 1)


@triton.jit
def sparse_block(it, sp_row, mask_base, SPARSE: tl.constexpr, BLOCK: tl.constexpr, UNIT: tl.constexpr,
                 TILE: tl.constexpr, MASK_KIND: tl.constexpr):
    """Slot ``it`` of the listed blocks at ``sp_row`` → (its index on the walked axis, the base
    pointer that modified_scores offsets by ``qi · SPARSE_N + kj`` to read the element mask).
    Without SPARSE (a dense walk) the slot is the index itself and the mask base is unchanged.

    ``BLOCK`` is the mask block size along the walked axis, ``UNIT`` the tile-pointer offset of
    one block along it (SPARSE_N for keys, SPARSE_M · SPARSE_N for queries), ``TILE`` the
    elements of one tile. ``mask_base`` already has the fixed axis's block offset subtracted."""
    # One return after static branches: the compiler generates code after an early return in a
    # constexpr branch too, and a dense walk's sp_row is a dummy pointer of the input's dtype.
    start = it
    tile_base = mask_base
    if SPARSE:
        i = it // BLOCK
        blk = tl.load(sp_row + 2 * i)
        start = blk * BLOCK + (it - i * BLOCK)
        if MASK_KIND == 3:
            tile = tl.load(sp_row + 2 * i + 1)
            tile_base = mask_base + (tile.to(tl.int64) * TILE - blk.to(tl.int64) * UNIT)
    return start, tile_base


@triton.jit
def sparse_phase(phase: tl.constexpr, sp_row, n_full, n_part):
    """(first (blk, tile) pair, count) of the listed blocks walked in ``phase``: 0 the fully
    visible ones (no mask), 1 the partial ones (element mask)."""
    row, n = sp_row, n_full
    if phase == 1:
        row, n = sp_row + 2 * n_full, n_part
    return row, n
