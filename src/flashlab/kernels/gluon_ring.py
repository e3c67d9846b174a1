"""What the Gluon kernels share (forward_gluon.py, backward_gluon.py): the producer / consumer
protocol of their shared-memory ring, and the layouts of their tensor-core tiles.

A ring of ``STAGES`` shared-memory slots, each guarded by two mbarriers: ``full[s]`` completes when
the TMA bytes of the tile in slot s have landed (the producer arms it with the byte count), and
``empty[s]`` when both consumer warpgroups are done with it (count 2, one arrive each). Item i of
the stream sits in slot i % STAGES and is waited for with phase (i // STAGES) & 1; mbarriers start
as if phase 1 had completed, so the producer's first pass over the ring does not wait.

Tiles come through 3-D descriptors over (sequences, seqlen, columns) views (gluon_forward.py's
``tile_view``): a tile that runs past its sequence's end is filled with TMA's zeros rather than the
next sequence's rows, so a non-finite value in one sequence never reaches another's output.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma


@gluon.constexpr_function
def mma_layout(num_warps, n):
    """The wgmma accumulator layout of a [rows, n] tile over ``num_warps`` warps (a warpgroup per 64 rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def operand_layout(accumulator_layout):
    """The layout of a 16-bit register A operand whose product lands in ``accumulator_layout``."""
    return gl.DotOperandLayout(operand_index=0, parent=accumulator_layout, k_width=2)


@gluon.constexpr_function
def tile_layout(desc_layout):
    """The 2-D shared-memory layout of a [rows, dim] tile a [1, rows, dim] descriptor fills."""
    return gl.NVMMASharedLayout(swizzle_byte_width=desc_layout.swizzle_byte_width,
                                element_bitwidth=desc_layout.element_bitwidth, rank=2)


@gluon.jit
def load_tile(desc, seq, row, col, bar, dst):
    """TMA: rows ``row`` .. of sequence ``seq``, columns from ``col``, into the 2-D tile ``dst``;
    completes on mbarrier ``bar``."""
    tma.async_copy_global_to_shared(desc, [seq, row, col], bar, dst.reshape([1, dst.shape[0], dst.shape[1]]))


@gluon.jit
def ring_barriers(STAGES: gl.constexpr):
    """(the once-loaded tiles' barrier, full, empty), initialized: two consumers free each slot."""
    once_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(once_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    fence_async_shared()  # the initialization, before the async proxy uses the barriers
    return once_bar, full, empty


@gluon.jit
def wait_full(full, i, STAGES: gl.constexpr):
    """Consumer: wait until stream item ``i`` has landed in its slot."""
    mbarrier.wait(full.index(i % STAGES), (i // STAGES) & 1)


@gluon.jit
def release(empty, i, STAGES: gl.constexpr):
    """Consumer: this warpgroup is done with item ``i``'s slot. Its four warps meet first: the arrive
    is issued by the partition's first thread only."""
    gl.thread_barrier()
    mbarrier.arrive(empty.index(i % STAGES), count=1)


@gluon.jit
def acquire(empty, full, i, nbytes, STAGES: gl.constexpr):
    """Producer: wait until item ``i``'s slot is free, arm its full barrier for ``nbytes``; returns it."""
    mbarrier.wait(empty.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
    bar = full.index(i % STAGES)
    mbarrier.expect(bar, nbytes)
    return bar


@gluon.jit
def stream_kv(k_desc, v_desc, k_smem, v_smem, full, empty, k_seq, k_col, n_blocks, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):
    """Producer: key blocks 0 .. n_blocks - 1 (rows j · BLOCK_N of sequence k_seq, columns from
    k_col) of K and V into the ring."""
    for j in range(n_blocks):
        bar = acquire(empty, full, j, k_desc.block_type.nbytes + v_desc.block_type.nbytes, STAGES)
        load_tile(k_desc, k_seq, j * BLOCK_N, k_col, bar, k_smem.index(j % STAGES))
        load_tile(v_desc, k_seq, j * BLOCK_N, k_col, bar, v_smem.index(j % STAGES))


@gluon.jit
def kv_blocks(m0, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """How many key blocks the query rows m0 .. m0 + BLOCK_M visit; with CAUSAL, ``m0`` is the first
    row's last visible key (row + diag: key j is visible to row i iff j <= i + diag)."""
    n = gl.cdiv(seqlen_k, BLOCK_N)
    if CAUSAL:
        n = gl.minimum(n, (m0 + BLOCK_M + BLOCK_N - 1) // BLOCK_N)
    return n
