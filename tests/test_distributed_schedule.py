"""Ring attention's schedule, LSE merge and sharding helpers, checked without processes
(hypothesis property tests; the multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab import distributed as fd
from flashlab.distributed.plan import make_plan
from flashlab.distributed.ring import merge_
from flashlab.reference import naive_attention


# ------------------------------------------------------------------ the schedule, no processes
def _positions(world: int, rank: int, sharding: str, lens: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """(sequence, global position) of each local row, and the local cu_seqlens."""
    rows, cu = [], [0]
    for b, n in enumerate(lens):
        rows += [(b, i) for a, e in fd.shard_bounds(n, world, rank, sharding) for i in range(a, e)]
        cu.append(len(rows))
    return rows, cu


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 5), lens=st.lists(st.integers(0, 23), min_size=1, max_size=3), causal=st.booleans(),
       sharding=st.sampled_from(fd.SHARDINGS))
def test_schedule_covers_every_visible_pair_exactly_once(world, lens, causal, sharding) -> None:
    layout = [_positions(world, r, sharding, lens) for r in range(world)]
    cus = [[cu, cu] for _, cu in layout]
    seen: dict[tuple[int, int, int], int] = {}
    for r in range(world):
        plan = make_plan(r, causal, sharding, cus, varlen=True)
        for step in range(world):
            src = plan.src(step)
            for p in plan.pieces(step):
                for i in range(p.q0, p.q1):
                    for j in range(p.k0, p.k1):
                        if p.causal and j - p.k0 > i - p.q0:
                            continue  # masked inside a diagonal piece
                        (bq, gi), (bk, gj) = layout[r][0][i], layout[src][0][j]
                        assert bq == bk, "a piece mixes sequences"
                        seen[(bq, gi, gj)] = seen.get((bq, gi, gj), 0) + 1
    want = {(b, i, j) for b, n in enumerate(lens) for i in range(n) for j in range(n) if not causal or j <= i}
    assert set(seen) == want and set(seen.values()) <= {1}


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(world) -> None:
    def work(sharding: str) -> list[int]:
        cus = [[[0, n], [0, n]] for n in (len(_positions(world, r, sharding, [8 * world])[0]) for r in range(world))]
        per_rank = []
        for r in range(world):
            plan = make_plan(r, True, sharding, cus)
            per_rank.append(sum((p.q1 - p.q0) * (p.k1 - p.k0 + (1 if p.causal else 0)) // (2 if p.causal else 1)
                                for s in range(world) for p in plan.pieces(s)))
        return per_rank
    assert len(set(work("zigzag"))) == 1
    contiguous = work("contiguous")
    assert contiguous == sorted(contiguous) and contiguous[-1] > contiguous[0]


def test_plan_rejects_shards_that_are_not_zigzag() -> None:
    with pytest.raises(ValueError, match="do not match a zigzag sharding of 9 tokens over 2 ranks"):
        make_plan(0, True, "zigzag", [[[0, 6], [0, 6]], [[0, 3], [0, 3]]])


@settings(max_examples=15, deadline=None)
@given(world=st.integers(1, 4), seqlen=st.integers(1, 19), causal=st.booleans(),
       sharding=st.sampled_from(fd.SHARDINGS))
def test_schedule_and_lse_merge_reproduce_attention(world, seqlen, causal, sharding) -> None:
    from flashlab.blockwise import blockwise_attention

    gen = torch.Generator().manual_seed(seqlen * 31 + world)
    q, k, v = (torch.randn(1, seqlen, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    want = naive_attention(q, k, v, causal=causal)
    cus = [[[0, n], [0, n]] for n in (fd.shard_sequence(q, world, r, sharding=sharding).shape[1]
                                      for r in range(world))]
    for r in range(world):
        plan, ql = make_plan(r, causal, sharding, cus), fd.shard_sequence(q, world, r, sharding=sharding)
        out = torch.zeros(ql.shape, dtype=torch.float32)
        lse = torch.full((1, 4, ql.shape[1]), float("-inf"))
        for step in range(world):
            kl, vl = (fd.shard_sequence(t, world, plan.src(step), sharding=sharding) for t in (k, v))
            for p in plan.pieces(step):
                o, lp = blockwise_attention(ql[:, p.q], kl[:, p.k], vl[:, p.k], causal=p.causal)
                merge_(out[:, p.q], lse[:, :, p.q], o, lp)
        torch.testing.assert_close(out.double(), fd.shard_sequence(want, world, r, sharding=sharding), atol=2e-6,
                                   rtol=1e-5)  # fp32 accumulators


def test_merge_keeps_rows_that_saw_no_key_at_zero() -> None:
    out, lse = torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), float("-inf"))
    merge_(out, lse, torch.ones(1, 2, 1, 4), torch.tensor([[[float("-inf"), 0.0]]]))
    assert torch.equal(out[0, 0], torch.zeros(1, 4)) and torch.equal(out[0, 1], torch.ones(1, 4))
    assert lse[0, 0, 0] == float("-inf") and lse[0, 0, 1] == 0.0


# ------------------------------------------------------------------ sharding helpers
@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 6), seqlen=st.integers(0, 40), sharding=st.sampled_from(fd.SHARDINGS))
def test_shard_then_unshard_is_identity(world, seqlen, sharding) -> None:
    x = torch.arange(seqlen).view(1, seqlen, 1, 1)
    shards = [fd.shard_sequence(x, world, r, sharding=sharding) for r in range(world)]
    assert sum(s.shape[1] for s in shards) == seqlen
    assert torch.equal(fd.unshard_sequence(shards, sharding=sharding), x)


def test_zigzag_layout_and_varlen_round_trip() -> None:
    x = torch.arange(8).view(1, 8)
    assert fd.zigzag_shard(x, 2, 0).tolist() == [[0, 1, 6, 7]] and fd.zigzag_shard(x, 2, 1).tolist() == [[2, 3, 4, 5]]
    assert fd.zigzag_chunk_sizes(11, 2) == [3, 3, 3, 2]
    packed, cu = torch.arange(19).view(19, 1), torch.tensor([0, 5, 18, 19])
    shards = [fd.shard_varlen(packed, cu, 3, r, sharding="zigzag") for r in range(3)]
    assert shards[0][1].tolist() == [0, 1, 6, 7]  # chunks 0 and 5 of 5, 13 and 1 tokens: 1+0, 3+2, 1+0
    assert torch.equal(fd.unshard_varlen([s for s, _ in shards], cu, sharding="zigzag"), packed)


def test_sharding_helpers_reject_bad_arguments() -> None:
    x = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="sharding must be one of"):
        fd.shard_sequence(x, 2, 0, sharding="striped")
    with pytest.raises(ValueError, match="rank must be an int in"):
        fd.shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match=r"shard lengths \[5, 3\] do not match a zigzag sharding"):
        fd.zigzag_unshard([x[:, :5], x[:, :3]])
    with pytest.raises(ValueError, match="x has 8 tokens but cu_seqlens ends at 7"):
        fd.shard_varlen(x[0], torch.tensor([0, 7]), 2, 0)
