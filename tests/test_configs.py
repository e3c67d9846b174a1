"""Tile-config selection (host logic only; the configs' speed is measured in benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from flashlab.kernels import configs


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "device_capability", lambda device: (9, 0))
    return torch.device("cuda")


def test_tile_aligned():
    assert configs.tile_aligned(2048, 4096, varlen=False)
    assert not configs.tile_aligned(777, 777, varlen=False)
    assert not configs.tile_aligned(2048, 2049, varlen=False)
    assert not configs.tile_aligned(2048, 2048, varlen=True)


@pytest.mark.parametrize("causal", [False, True])
def test_wide_heads_use_fast_tiles_only_on_aligned_shapes(hopper, causal):
    """Round 2 saw the fast 256-wide tiles fault on a ragged shape: ragged shapes keep the verified ones."""
    fast_f, safe_f = configs.forward_config(256, causal, hopper, True), configs.forward_config(256, causal, hopper)
    fast_b, safe_b = configs.backward_config(256, causal, hopper, True), configs.backward_config(256, causal, hopper)
    assert (fast_f.block_m, fast_f.block_n) == (128, 64) and (safe_f.block_m, safe_f.block_n) == (64, 32)
    assert fast_b[0].block_n == 64 and safe_b[0].block_n == 32
    # Narrower heads do not depend on alignment.
    assert configs.forward_config(128, causal, hopper, True) == configs.forward_config(128, causal, hopper, False)


def test_interpreter_tiles_are_small():
    if not configs.interpreting():
        pytest.skip("runs where the kernels run in Triton's interpreter")
    assert configs.forward_config(256, False, torch.device("cpu"), True).block_m == 32


def test_decode_stages_follow_the_split_count(monkeypatch):
    """Few splits (a large grid): 2 stages; many, or not yet chosen: 3; paged: 5 (round 5's decode tune)."""
    from flashlab import decode_tiles

    monkeypatch.setattr(decode_tiles, "interpreting", lambda: False)
    cpu = torch.device("cpu")
    assert decode_tiles.decode_config(4, 128, False, cpu, num_splits=1).num_stages == 2
    assert decode_tiles.decode_config(4, 128, False, cpu, num_splits=decode_tiles.FEW_SPLITS).num_stages == 2
    assert decode_tiles.decode_config(4, 128, False, cpu, num_splits=33).num_stages == 3
    assert decode_tiles.decode_config(4, 128, False, cpu).num_stages == 3
    assert decode_tiles.decode_config(4, 128, True, cpu, num_splits=1).num_stages == 5
    # The block sizes (which the split heuristic reads) never depend on the split count.
    tiles = {(c.block_m, c.block_n) for n in (0, 1, 33) for c in [decode_tiles.decode_config(4, 128, False, cpu, n)]}
    assert tiles == {(16, 64)}


def test_short_causal_d128_backward_takes_smaller_tiles(hopper):
    """Round 5's tune: 32x64 / 64x32 tiles at 2k keys (+8%), the 64x128 / 128x64 ones from 8k."""
    short = configs.backward_config(128, True, hopper, True, seqlen_k=configs.SHORT_CAUSAL_KEYS)
    long = configs.backward_config(128, True, hopper, True, seqlen_k=8192)
    assert (short[0].block_n, short[1].block_m) == (64, 64) and (long[0].block_n, long[1].block_m) == (128, 128)
    assert configs.backward_config(128, True, hopper, True) == long  # length unknown: the long-sequence tiles
    assert configs.backward_config(128, False, hopper, True, seqlen_k=1024) == configs.backward_config(
        128, False, hopper, True, seqlen_k=8192)  # not causal: unchanged


def test_dropout_d128_backward_takes_its_own_tiles(hopper):
    """Round 8's dropout tune at d128, 8k: 32x128 / 128x32 tiles (+9% full, +7% causal); other head
    dims and the short causal case keep their tiles."""
    kv, dq = configs.backward_config(128, False, hopper, True, 8192, dropout=True)
    assert (kv.block_m, kv.block_n, kv.num_stages, dq.block_m, dq.block_n) == (32, 128, 3, 128, 32)
    assert configs.backward_config(64, False, hopper, True, 8192, dropout=True) == configs.backward_config(
        64, False, hopper, True, 8192)
    short = configs.backward_config(128, True, hopper, True, configs.SHORT_CAUSAL_KEYS, dropout=True)
    assert short == configs.backward_config(128, True, hopper, True, configs.SHORT_CAUSAL_KEYS)


def test_decode_splits_fill_the_slots_without_a_sliver_of_a_second_wave():
    """The split count fills CTAS_PER_SM programs per SM — rounded up unless the overflow is a
    sliver (under SLIVER of the slots) — never splits shorter than the minimum, and is at least 1."""
    from flashlab import decode_tiles

    slots = decode_tiles.CTAS_PER_SM * 132
    for batch, kv_heads, keys in ((1, 8, 32768), (4, 8, 32768), (16, 8, 8192), (3, 5, 100000), (64, 8, 8192),
                                  (32, 8, 4096), (2, 3, 50000)):
        n = decode_tiles.choose_num_splits(batch, kv_heads, 1, keys, 132, 128)
        tiles = batch * kv_heads
        assert 1 <= n <= decode_tiles.MAX_SPLITS
        if n < -(-keys // 128):  # keys did not run out: the rule decided
            over = tiles * n - slots
            assert over <= 0 or n == 1 or over >= decode_tiles.SLIVER * slots, (batch, n)  # no sliver
            # not too few: the slots are full, or one split more would spill only a sliver
            assert tiles * n >= slots or 0 < tiles * (n + 1) - slots < decode_tiles.SLIVER * slots, (batch, n)
    assert decode_tiles.choose_num_splits(4, 8, 1, 32768, 132, 128) == 8  # 256 programs, not 9 → 288
    assert decode_tiles.choose_num_splits(16, 8, 1, 8192, 132, 128) == 3  # 384 programs, not 2 → 256
    assert decode_tiles.choose_num_splits(1, 8, 1, 32768, 132, 128) == 33  # exactly the 264 slots
    assert decode_tiles.choose_num_splits(1, 8, 1, 1024, 132, 128) == 8  # 1024 keys: no split under 128 keys
    assert decode_tiles.choose_num_splits(64, 8, 1, 8192, 132, 128) == 1
