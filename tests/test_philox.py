"""philox.py reproduces the kernels' dropout bits: Triton's tl.randint4x words bit for bit (checked
against the interpreter, or the GPU, which run Triton's own Philox), split into 16-bit halves, so the
CPU path's dropout masks are the kernels' masks."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from flashlab import ops
from flashlab.philox import (
    counter_stride,
    dense_dropout_pattern,
    dropout_keep,
    dropout_keep_rows,
    dropout_threshold,
    philox_bits16,
)


@triton.jit
def _randint4x_kernel(OUT, OFFSETS, seed, n, BLOCK: tl.constexpr):
    """OUT[4i + w] = word w of tl.randint4x(seed, OFFSETS[i]) (as int64, so uint32 stays positive)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offsets = tl.load(OFFSETS + i, mask=i < n, other=0)
    u0, u1, u2, u3 = tl.randint4x(seed, offsets)
    tl.store(OUT + 4 * i, u0.to(tl.int64), mask=i < n)
    tl.store(OUT + 4 * i + 1, u1.to(tl.int64), mask=i < n)
    tl.store(OUT + 4 * i + 2, u2.to(tl.int64), mask=i < n)
    tl.store(OUT + 4 * i + 3, u3.to(tl.int64), mask=i < n)


@pytest.mark.parametrize("seed", [0, 1234567, 2**40 + 17, 2**62 - 1])
def test_bits_are_halves_of_tl_randint4x(seed, device):
    """Counter c's 16 bits are half c % 2 of word (c // 8) % 4 of tl.randint4x(seed, 4 (c // 32) + (c % 8) // 2)."""
    groups = torch.cat([torch.arange(0, 300), torch.arange(2**32 - 150, 2**32 + 150),  # across the word edge
                        torch.randint(0, 2**48, (300,))]).to(torch.int64)
    words = torch.empty(4 * groups.numel(), dtype=torch.int64, device=device)
    _randint4x_kernel[(triton.cdiv(groups.numel(), 128),)](words, groups.to(device), seed, groups.numel(), BLOCK=128)
    words = words.cpu().reshape(-1, 4)
    assert words.min() >= 0 and words.max() < 2**32 and words.unique().numel() > 3000  # real uint32 words
    want = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(-1)  # group g's word w, half h at 8g + 2w + h
    # the counters group g serves: span g // 4, t = g % 4, keys 32 span + 8 w + 2 t + h
    offsets = (8 * torch.arange(4)[:, None] + torch.arange(2)).reshape(-1)  # 8w + h, in (w, h) order
    counters = (32 * (groups[:, None] // 4) + 2 * (groups[:, None] % 4) + offsets).reshape(-1)
    assert torch.equal(philox_bits16(seed, counters), want)


def test_threshold_and_keep_rate():
    assert [dropout_threshold(p) for p in (0.0, 0.1, 0.25, 0.5, 0.999999)] == [0, 6554, 16384, 32768, 65536]
    counters = torch.arange(2**20, dtype=torch.int64)
    for p in (0.1, 0.5, 0.9):
        rate = dropout_keep(7, counters, p).double().mean().item()
        assert abs(rate - (1 - p)) < 3e-3  # 2^20 draws: ~5 standard deviations
    assert counter_stride(1) == 32 and counter_stride(33) == 64 and counter_stride(64) == 64


@pytest.mark.parametrize("seed,p", [(99, 0.2), (2**61 + 5, 0.75)])
def test_dense_pattern_matches_the_kernels(seed, p, device):
    want = ops.dropout_pattern(2, 3, 19, 33, ops.AttentionOptions(dropout_p=p, seed=seed), device=device)
    assert torch.equal(dense_dropout_pattern(seed, p, 2, 3, 19, 33), want.cpu())


@pytest.mark.parametrize("j0,j1", [(0, 33), (3, 40), (5, 6), (9, 15), (31, 97), (64, 128)])
def test_rows_of_keys_equal_per_counter_draws(j0, j1):
    """dropout_keep_rows (one Philox per eight keys, the CPU path's tiles) equals dropout_keep per counter,
    also for key ranges that start or end inside a 32-key span."""
    rows = torch.arange(2 * 3 * 5, dtype=torch.int64).reshape(2, 3, 5, 1) * counter_stride(130) + 2**33 * 32
    want = dropout_keep(2**45 + 3, rows + torch.arange(j0, j1), 0.4)
    assert torch.equal(dropout_keep_rows(2**45 + 3, rows, j0, j1, 0.4), want)
