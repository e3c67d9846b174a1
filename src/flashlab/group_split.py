"""Splitting a GQA group's query heads over several dK/dV programs when the grid is too small.

A dK/dV program owns one key block of one kv head and sums over every query head of its group, so
its grid is (key blocks, kv heads, batch) whatever the group size. With few kv heads and short
sequences that grid leaves most SMs idle: MQA (32:1) at 4k tokens is 32 programs on 132 SMs, and
its backward ran at 151 TFLOP/s against 32:8's 411 (H200, round 11). Causal masks make it worse: the
first key block sees every query tile, so the longest program sets the pace.

Splitting the group into ``splits`` runs of ``heads_per_split`` query heads gives splits × the
programs; each writes its partial dK, dV in fp32 to its own slice of (splits, *dk.shape) buffers,
and one reduction launch over the splits (in a fixed order: deterministic) casts the sums into dk
and dv. The split is the fastest-varying part of program_id(2) (batch · splits + split). The extra
memory is bounded by the grid it fills: only small grids split, at most MAX_SPLITS ways.
``FLASHLAB_BWD_GROUP_SPLIT=0`` turns splitting off.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flashlab.kernels.configs import num_sms

# A split must shorten the estimated time by this share to be taken: it costs a partial buffer
# written and read in fp32, and a reduction launch.
MIN_GAIN = 0.05
# At most this many splits: the fp32 partials of dK and dV are then at most 16x their own memory
# (MQA's dK, dV are a group's worth smaller than dQ already).
MAX_SPLITS = 8


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


def makespan(lens: list[int], programs_per_len: int, group: int, per: int, slots: int) -> float:
    """Finishing time of a dK/dV grid on ``slots`` program slots that take programs in launch order
    (key block fastest, then kv head, then batch · split) as they free up: key block j's program
    walks lens[j] query tiles for each of its split's heads (``per``, fewer in a ragged last split).
    ``programs_per_len`` is kv heads × batch: how often the key blocks repeat."""
    splits = math.ceil(group / per)
    free = [0.0] * slots  # a heap of the slots' next free times
    end = 0.0
    for z in range(programs_per_len * splits):
        heads = min(per, group - (z % splits) * per)
        for n in lens:
            start = heapq.heappop(free)
            finish = start + n * heads
            heapq.heappush(free, finish)
            end = max(end, finish)
    return end


@functools.cache
def heads_per_split(batch: int, kv_heads: int, group: int, seqlen_q: int, seqlen_k: int, block_m: int,
                    block_n: int, causal_diag: int | None, sms: int, ctas_per_sm: int = 1) -> int:
    """Query heads a dK/dV program sums over (``group``: no split). Each candidate's grid is
    scheduled on sms × ctas_per_sm slots (makespan; co-resident programs share an SM, so a slot runs
    at 1 / ctas_per_sm of its speed, which is why the longest program matters); from one split up,
    more splits are taken only where they cut the time by MIN_GAIN, up to MAX_SPLITS. Grids of 4
    waves or more are not split (no program is then much longer than the mean wave), nor split past
    16 waves."""
    lens = query_tiles_per_key_block(seqlen_q, seqlen_k, block_m, block_n, causal_diag)
    slots = sms * ctas_per_sm
    programs = batch * kv_heads * len(lens)
    if group <= 1 or programs == 0 or programs >= 4 * slots:
        return max(group, 1)
    best = group
    best_time = makespan(lens, batch * kv_heads, group, group, slots)
    for splits in range(2, min(group, MAX_SPLITS) + 1):
        per = math.ceil(group / splits)
        if per == best or programs * math.ceil(group / per) > 16 * slots:
            continue
        time = makespan(lens, batch * kv_heads, group, per, slots)
        if time < (1 - MIN_GAIN) * best_time:
            best, best_time = per, time
    return best


def upper_diagonal(run) -> int | None:
    """The causal diagonal of a launch_args.Launch for query_tiles_per_key_block: None without an
    upper band edge; with one, query i sees keys up to i + diagonal."""
    if not run.flags["HAS_UPPER"]:
        return None
    diag = run.seqlen_k - run.seqlen_q if run.flags["BOTTOM_RIGHT"] else 0
    return diag + max(run.scalars[1], 0)


REDUCE_BLOCK = 1024  # elements a program of the reduction sums


@dataclass
class DkDvTargets:
    """Where a dK/dV launch writes: dk / dv themselves (one split), or fp32 partials (splits, *dk's
    shape) each, whose split 0 the kernel's pointers address (``stride_split`` elements a split)."""

    heads_per_split: int
    splits: int
    dk: torch.Tensor
    dv: torch.Tensor
    stride_split: int  # 0 without a split

    def strides(self, varlen: bool) -> tuple[int, ...]:
        """(batch, row, head) strides of dk then dv as the kernels take them (batch 0 when varlen)."""
        dk, dv = (t.stride()[-4:-1] for t in (self.dk, self.dv))
        return (0 if varlen else dk[0]), dk[1], dk[2], (0 if varlen else dv[0]), dv[1], dv[2]

    def finish(self, dk4: torch.Tensor, dv4: torch.Tensor, launch_fn: Callable[..., object]) -> None:
        """After the dK/dV launch: dk4, dv4 (4-D, any strides) = the sums over the splits, cast to
        their dtype, by one launch through ``launch_fn`` (nothing to do with one split)."""
        if self.splits == 1:
            return
        from flashlab.kernels.backward import dkdv_split_reduce_kernel

        n = dk4.numel()
        launch_fn(dkdv_split_reduce_kernel, (math.ceil(n / REDUCE_BLOCK),), self.dk, self.dv, dk4, dv4, n,
                  self.splits, *dk4.shape[1:], *dk4.stride()[:3], *dv4.stride()[:3], BLOCK=REDUCE_BLOCK)


def targets(dk4: torch.Tensor, dv4: torch.Tensor, batch: int, kv_heads: int, group: int, seqlen_q: int,
            seqlen_k: int, block_m: int, block_n: int, upper_diag: int | None, ctas_per_sm: int = 1,
            alloc: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> DkDvTargets:
    """The split (heads_per_split) for a dK/dV launch of (block_m query rows, block_n keys) tiles, of
    which ``ctas_per_sm`` programs fit an SM, on dk4's device, and the tensors it writes. ``alloc``
    makes an fp32 partials tensor of a shape (launch_plans.scratch: a planned call replays the
    allocation); default torch.empty."""
    if os.environ.get("FLASHLAB_BWD_GROUP_SPLIT", "1") == "0":  # off: one program sums the whole group
        per = max(group, 1)
    else:
        per = heads_per_split(batch, kv_heads, group, seqlen_q, seqlen_k, block_m, block_n, upper_diag,
                              num_sms(dk4.device.index), ctas_per_sm)
    splits = math.ceil(group / per) if group > 0 else 1
    if splits == 1:
        return DkDvTargets(per, 1, dk4, dv4, 0)
    shape = (splits, *dk4.shape)
    make = alloc or (lambda shape: torch.empty(shape, device=dk4.device, dtype=torch.float32))
    dk, dv = make(shape), make(shape)
    return DkDvTargets(per, splits, dk, dv, dk.stride(0))
