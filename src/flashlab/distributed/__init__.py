"""Context-parallel ring attention over torch.distributed (NCCL on GPUs, gloo on CPUs).

Each rank holds a shard of the sequence; K/V shards rotate around the ring (batched isend/irecv
overlapped with compute) and partial outputs merge exactly through the log-sum-exp. See
docs/distributed.md for launching, memory per GPU, and ring vs all-gather.

    out = ring_flash_attn_func(q_local, k_local, v_local, causal=True, sharding="zigzag")
"""

from flashlab.distributed.api import ring_flash_attn_func, ring_flash_attn_varlen_func
from flashlab.distributed.plan import METHODS
from flashlab.distributed.sharding import (
    SHARDINGS,
    gather_sequence,
    gather_shards,
    gather_varlen,
    shard_bounds,
    shard_sequence,
    shard_varlen,
    unshard_sequence,
    unshard_varlen,
    zigzag_chunk_sizes,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = [
    "METHODS",
    "SHARDINGS",
    "gather_sequence",
    "gather_shards",
    "gather_varlen",
    "ring_flash_attn_func",
    "ring_flash_attn_varlen_func",
    "shard_bounds",
    "shard_sequence",
    "shard_varlen",
    "unshard_sequence",
    "unshard_varlen",
    "zigzag_chunk_sizes",
    "zigzag_shard",
    "zigzag_unshard",
]
