"""Tiles and split counts of the decoding kernels (kernels/decode.py), chosen on the host.

The split count spreads each sequence's keys over programs until the GPU is full; the tile's
pipeline depth follows from it (measurements in docs/perf-notes.md, rounds 2 and 5).
"""

from __future__ import annotations

import math

import torch

from flashlab.kernels.configs import TileConfig, interpreting, next_power_of_2

MAX_SPLITS = 128
# The heuristic never gives a split fewer keys than this (GPU): two 64-key tiles. H200, kernel alone,
# B1 x 1k keys: 8 splits of 128 keys 6.8 us, 4 of 256 8.5 us (perf-notes round 5).
MIN_SPLIT_KEYS = 128
CTAS_PER_SM = 2  # split until batch × kv_heads × splits programs fill this many per SM
SLIVER = 0.25  # a second wave under this share of the slots is not worth its programs (choose_num_splits)
FEW_SPLITS = 4  # up to this many splits per sequence, a contiguous cache streams with 2 stages


def decode_config(rows: int, block_d: int, paged: bool, device: torch.device, num_splits: int = 0) -> TileConfig:
    """Tile for ``rows = seqlen_q × group`` query rows per kv head (BLOCK_M ≥ 16 for tl.dot).
    ``num_splits`` (0: not yet chosen; the block sizes do not depend on it) picks the stages.

    A 64 × 128 K tile and its V tile are 32 KB; 3 stages keep two of them in flight. With few
    splits the grid is large (batch × kv heads programs already fill the SMs) and 2 stages are
    faster (H200, CUDA graphs, GQA 32:8 d128: B64 × 8k 554 → 483 µs, B32 × 4k 141 → 128, B64 × 1k
    72 → 65); with many (a short batch, long caches) 3 (B1 × 32k 39 vs 42 µs; perf-notes round 5).
    Paged loads are indirect (the page index is loaded first), so Triton's pipeliner needs 2 more
    stages for the same depth (checked on the sm_90 TTGIR: 5 stages paged = 3 contiguous = 72 KB
    of shared)."""
    if interpreting():
        return TileConfig(16 if rows <= 16 else 32, 32, 4, 1)
    block_m = min(64, max(16, next_power_of_2(rows)))
    if block_d > 128:  # 256-wide rows: half the keys per tile, 8 warps for the accumulator (no spills)
        return TileConfig(block_m, 32, 8, 5 if paged else 3)
    stages = 5 if paged else (2 if 1 <= num_splits <= FEW_SPLITS else 3)
    return TileConfig(block_m, 64, 4, stages)


def choose_num_splits(batch: int, kv_heads: int, m_blocks: int, max_keys: int, num_sms: int,
                      min_split_keys: int) -> int:
    """Splits per (sequence, kv head): enough programs to fill ``CTAS_PER_SM`` per SM — rounded up,
    unless that spills only a sliver into a second wave (under ``SLIVER`` of the slots), then
    rounded down. H200, GQA 32:8, graph replays (perf-notes rounds 6–7): B4 × 32k (32 tiles, 264
    slots) 8 splits 125 µs, the 9 of the ceiling 143 (24 programs past the wave); B16 × 8k / 32k
    (128 tiles) 3 splits 126 / 471 µs, the 2 of the floor 137 / 519 (a memory-bound kernel keeps
    streaming through a substantial second wave). No split is shorter than ``min_split_keys`` of
    the longest sequence, and there are at most ``MAX_SPLITS``."""
    tiles = max(batch * kv_heads * m_blocks, 1)
    slots = CTAS_PER_SM * num_sms
    want = -(-slots // tiles)
    if want > 1 and 0 < want * tiles - slots < SLIVER * slots:
        want -= 1
    useful = math.ceil(max(max_keys, 1) / min_split_keys)
    return max(1, min(want, useful, MAX_SPLITS))
