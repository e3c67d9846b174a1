"""Splitting a GQA group's query heads over several dK/dV programs when the grid is too small.

A dK/dV program owns one key block of one kv head and sums over every query head of its group, so
its grid is (key blocks, kv heads, batch) whatever the group size. With few kv heads and short
sequences that grid leaves most SMs idle: MQA (32:1) at 4k tokens is 32 programs on 132 SMs, and
its backward ran at 151 TFLOP/s against 32:8's 411 (H200, round 11). Causal masks make it worse: the
first key block sees every query tile, so the longest program sets the pace.

Splitting the group into ``splits`` runs of ``heads_per_split`` query heads gives splits × the
programs; each writes its partial dK, dV in fp32 to its own slice of a (2, splits, *dk.shape)
buffer, and one reduction over the splits (in a fixed order: deterministic) casts the sums into dk
and dv. The split is the fastest-varying part of program_id(2) (batch · splits + split). The extra
memory is bounded by the grid it fills: only small grids split. ``FLASHLAB_BWD_GROUP_SPLIT=0`` turns
splitting off.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from flashlab.decode_tiles import num_sms

# A split must shorten the estimated time by this share to be taken: it costs a partial buffer
# written and read in fp32, and a reduction launch.
MIN_GAIN = 0.05


def query_tiles_per_key_block(seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                              causal_diag: int | None) -> list[int]:
    """Query tiles each key block's program walks: all of them, or with a causal mask (query i sees
    key j iff j <= i + causal_diag) those from the first tile that sees one of the block's keys."""
    n_q = math.ceil(seqlen_q / block_m)
    lens = []
    for n0 in range(0, seqlen_k, block_n):
        first = 0 if causal_diag is None else max(0, n0 - causal_diag) // block_m
        lens.append(max(n_q - first, 0))
    return lens


@functools.cache
def heads_per_split(batch: int, kv_heads: int, group: int, seqlen_q: int, seqlen_k: int, block_m: int,
                    block_n: int, causal_diag: int | None, sms: int) -> int:
    """Query heads a dK/dV program sums over (``group``: no split). A candidate's time is estimated
    as max(the longest program, whole waves of the mean program), a program's work being (query
    tiles it walks) × (heads it sums); from one split up, more splits are taken only where they cut
    the estimate by MIN_GAIN."""
    lens = query_tiles_per_key_block(seqlen_q, seqlen_k, block_m, block_n, causal_diag)
    programs = batch * kv_heads * len(lens)
    if group <= 1 or programs == 0 or programs >= sms:
        return max(group, 1)
    longest, mean = max(lens), sum(lens) / len(lens)

    def estimate(per: int) -> float:
        splits = math.ceil(group / per)
        waves = math.ceil(programs * splits / sms)
        return max(longest * per, waves * mean * per)

    best = group
    best_time = estimate(group)
    for splits in range(2, group + 1):
        per = math.ceil(group / splits)
        if per != best and estimate(per) < (1 - MIN_GAIN) * best_time:
            best, best_time = per, estimate(per)
    return best


def upper_diagonal(run) -> int | None:
    """The causal diagonal of a launch_args.Launch for query_tiles_per_key_block: None without an
    upper band edge; with one, query i sees keys up to i + diagonal."""
    if not run.flags["HAS_UPPER"]:
        return None
    diag = run.seqlen_k - run.seqlen_q if run.flags["BOTTOM_RIGHT"] else 0
    return diag + max(run.scalars[1], 0)


@dataclass
class DkDvTargets:
    """Where a dK/dV launch writes: dk / dv themselves (one split), or split 0 of fp32 partials."""

    heads_per_split: int
    splits: int
    dk: torch.Tensor
    dv: torch.Tensor
    stride_split: int  # elements from one split's partials to the next (0: no split)
    partials: torch.Tensor | None  # (2, splits, *dk.shape) fp32, dK then dV

    def finish(self, dk4: torch.Tensor, dv4: torch.Tensor) -> None:
        """After the launch: dk4, dv4 = the sums over the splits, cast to their dtype (one split:
        nothing to do)."""
        if self.partials is not None:
            sums = self.partials.sum(dim=1)
            dk4.copy_(sums[0])
            dv4.copy_(sums[1])


def targets(dk4: torch.Tensor, dv4: torch.Tensor, batch: int, kv_heads: int, group: int, seqlen_q: int,
            seqlen_k: int, block_m: int, block_n: int, upper_diag: int | None) -> DkDvTargets:
    """The split (heads_per_split) for a dK/dV launch of (block_m query rows, block_n keys) tiles on
    dk4's device, and the tensors it writes."""
    per = heads_per_split(batch, kv_heads, group, seqlen_q, seqlen_k, block_m, block_n, upper_diag,
                          num_sms(dk4.device.index))
    if os.environ.get("FLASHLAB_BWD_GROUP_SPLIT", "1") == "0":  # off: one program sums the whole group
        per = max(group, 1)
    splits = math.ceil(group / per) if group > 0 else 1
    if splits == 1:
        return DkDvTargets(per, 1, dk4, dv4, 0, None)
    partials = torch.empty((2, splits, *dk4.shape), device=dk4.device, dtype=torch.float32)
    return DkDvTargets(per, splits, partials[0, 0], partials[1, 0], partials.stride(1), partials)
