"""Tile configurations: chosen by a heuristic per architecture and head dim, never autotuned on a
user's first call (compile time only). The interpreter gets small tiles so CPU tests stay fast."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}


# Triton 3.9 warns that fusing multiplies and adds into FMAs stops being the default in 3.10; the
# kernels are written and tuned with it on, so they ask for it.
FP_FUSION = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1). Here rather than triton's, so that this module
    (and the CPU path that imports it) loads where Triton is not installed."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids."""
    return -(-a // b)


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two (≥ 16, the smallest tensor-core tile)."""
    return max(16, next_power_of_2(head_dim))


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, (0, 0) otherwise. Cached: torch.cuda.get_device_capability
    costs ~10 µs of host time, and the configs ask on every launch."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


@functools.cache
def num_sms(device_index: int | None) -> int:
    """SMs of a CUDA device, for grid-size rules (split-KV decoding, split GQA groups); under the
    interpreter a pretend GPU of 8, small enough that tests exercise the split paths."""
    if device_index is None or not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Wide-head tiles faster on H100 but verified only on tile-aligned shapes: with them the forward
# faults (misaligned address) on a ragged d192 case (777x777, GQA 8:1, not causal; H100 round 2,
# reproduced on H200 2026-11-29 by benchmarks/config_probe.py, while ragged d160/d256, causal d192
# and the 64x64 backward tiles on ragged d192/d256 passed). Cause unknown, so ragged wide-head
# shapes keep the small tiles that pass the GPU tests.
WIDE_ALIGN = 128


def tile_aligned(seqlen_q: int, seqlen_k: int, varlen: bool) -> bool:
    """Whether every query and key block is full (no row tails): the wide-head fast tiles need it."""
    return not varlen and seqlen_q % WIDE_ALIGN == 0 and seqlen_k % WIDE_ALIGN == 0


def forward_config(block_d: int, causal: bool, device: torch.device, aligned: bool = False) -> TileConfig:
    if interpreting():
        return TileConfig(32, 32, 4, 1)
    if device_capability(device)[0] < 9:
        # Ampere-class parts have 100-164 KB of shared memory: smaller tiles, 2 stages.
        return TileConfig(128, 64, 4, 2) if block_d <= 64 else TileConfig(64, 64, 4, 2)
    # Hopper; measured on H100 at seqlen 8k and 2k (benchmarks/results/h100-kernel-check-round{1,2}.json).
    if block_d <= 64:
        return TileConfig(128, 64, 8 if causal else 4, 3)
    if block_d <= 128:
        # 128x64 is within 2% of 128x128 at 8k and 11-15% ahead at 2k (shorter pipeline prologue).
        return TileConfig(128, 64, 8, 3)
    return TileConfig(128, 64, 8, 2) if aligned else TileConfig(64, 32, 4, 2)


SHORT_CAUSAL_KEYS = 2048  # at most this many keys, causal d128 backward takes smaller tiles


def backward_config(block_d: int, causal: bool, device: torch.device, aligned: bool = False,
                    seqlen_k: int = 0, dropout: bool = False) -> tuple[TileConfig, TileConfig]:
    """(dK/dV kernel config, dQ kernel config). BLOCK_N of the first and BLOCK_M of the second
    are the tile each program owns; the other is the tile it streams. ``seqlen_k`` (0: unknown)
    picks smaller causal tiles for short sequences at head dim 128; ``dropout`` its own tiles there."""
    if interpreting():
        return TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1)
    hopper = device_capability(device)[0] >= 9
    if block_d > 128:
        if hopper and aligned:
            # dK/dV 64x64 tiles, 8 warps, 2 stages: 2.8x the 32x32 single-stage tiles on H100 (round 2);
            # dQ 64x32, 4 warps: +6-8% backward over 64x64 w8 on the H200 (round 5).
            return TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 2)
        # The fp32 dK/dV (or dQ) accumulators of a 256-wide tile fill the register file.
        return TileConfig(32, 32, 8, 1), TileConfig(32, 32, 8, 1)
    if not hopper:
        return TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2)
    if block_d <= 64:
        return TileConfig(32, 128, 4, 3), TileConfig(128, 32, 4, 3)
    if causal and 0 < seqlen_k <= SHORT_CAUSAL_KEYS:
        # H200 tune at 2k: 262 vs 242 TFLOP/s backward; at 8k the large tiles win (300 vs 285).
        return TileConfig(32, 64, 4, 3), TileConfig(64, 32, 4, 3)
    if dropout:
        # The dK/dV kernel regenerates the mask in its transposed tiles: 228 B of spills with the
        # 64x128 tiles, 32x128 fits better (H200 tune at 8k: 212 vs 194 TFLOP/s backward, causal
        # 196 vs 184; perf-notes round 8).
        return TileConfig(32, 128, 8, 3), TileConfig(128, 32, 8, 3)
    return TileConfig(64, 128, 8, 2), TileConfig(128, 64, 8, 2)


def preprocess_block_m(block_d: int) -> int:
    return 32 if interpreting() else 128
