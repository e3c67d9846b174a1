"""philox.py reproduces Triton's tl.rand4x bit for bit (checked against the interpreter, which runs
Triton's own Philox), so the CPU path's dropout masks are the kernels' masks."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from flashlab import ops
from flashlab.philox import dense_dropout_pattern, philox_uniform


@triton.jit
def _rand4x_kernel(OUT, OFFSETS, seed, n, BLOCK: tl.constexpr):
    """OUT[4i + w] = word w of tl.rand4x(seed, OFFSETS[i])."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offsets = tl.load(OFFSETS + i, mask=i < n, other=0)
    u0, u1, u2, u3 = tl.rand4x(seed, offsets)
    tl.store(OUT + 4 * i, u0, mask=i < n)
    tl.store(OUT + 4 * i + 1, u1, mask=i < n)
    tl.store(OUT + 4 * i + 2, u2, mask=i < n)
    tl.store(OUT + 4 * i + 3, u3, mask=i < n)


@pytest.mark.parametrize("seed", [0, 1234567, 2**40 + 17, 2**62 - 1])
def test_uniforms_match_tl_rand4x(seed, device):
    """Counter c's uniform is word c % 4 of tl.rand4x(seed, c // 4)."""
    groups = torch.cat([torch.arange(0, 300), torch.arange(2**32 - 150, 2**32 + 150),  # across the word edge
                        torch.randint(0, 2**48, (300,))]).to(torch.int64)
    want = torch.empty(4 * groups.numel(), dtype=torch.float32, device=device)
    _rand4x_kernel[(triton.cdiv(groups.numel(), 128),)](want, groups.to(device), seed, groups.numel(), BLOCK=128)
    counters = (4 * groups[:, None] + torch.arange(4)).reshape(-1)
    assert torch.equal(philox_uniform(seed, counters), want.cpu())


@pytest.mark.parametrize("seed,p", [(99, 0.2), (2**61 + 5, 0.75)])
def test_dense_pattern_matches_the_kernels(seed, p, device):
    want = ops.dropout_pattern(2, 3, 19, 33, ops.AttentionOptions(dropout_p=p, seed=seed), device=device)
    assert torch.equal(dense_dropout_pattern(seed, p, 2, 3, 19, 33), want.cpu())


@pytest.mark.parametrize("j0,j1", [(0, 33), (3, 40), (5, 6), (64, 128)])
def test_rows_of_keys_equal_per_counter_draws(j0, j1):
    """dropout_keep_rows (one Philox per four keys, the CPU path's tiles) equals dropout_keep per counter,
    also for key ranges that start or end inside a group of four."""
    from flashlab.philox import counter_stride, dropout_keep, dropout_keep_rows

    rows = torch.arange(2 * 3 * 5, dtype=torch.int64).reshape(2, 3, 5, 1) * counter_stride(130) + 2**33 * 4
    want = dropout_keep(2**45 + 3, rows + torch.arange(j0, j1), 0.4)
    assert torch.equal(dropout_keep_rows(2**45 + 3, rows, j0, j1, 0.4), want)
