"""philox.py reproduces Triton's tl.rand bit for bit (checked against the interpreter, which runs
Triton's own Philox), so the CPU path's dropout masks are the kernels' masks."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from flashlab import ops
from flashlab.philox import dense_dropout_pattern, philox_uniform


@triton.jit
def _rand_kernel(OUT, OFFSETS, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offsets = tl.load(OFFSETS + i, mask=i < n, other=0)
    tl.store(OUT + i, tl.rand(seed, offsets), mask=i < n)


@pytest.mark.parametrize("seed", [0, 1234567, 2**40 + 17, 2**62 - 1])
def test_uniforms_match_tl_rand(seed, device):
    offsets = torch.cat([torch.arange(0, 300), torch.arange(2**32 - 150, 2**32 + 150),  # across the word edge
                         torch.randint(0, 2**50, (300,))]).to(torch.int64)
    want = torch.empty(offsets.shape, dtype=torch.float32, device=device)
    _rand_kernel[(triton.cdiv(offsets.numel(), 128),)](want, offsets.to(device), seed, offsets.numel(), BLOCK=128)
    assert torch.equal(philox_uniform(seed, offsets), want.cpu())


@pytest.mark.parametrize("seed,p", [(99, 0.2), (2**61 + 5, 0.75)])
def test_dense_pattern_matches_the_kernels(seed, p, device):
    want = ops.dropout_pattern(2, 3, 19, 33, ops.AttentionOptions(dropout_p=p, seed=seed), device=device)
    assert torch.equal(dense_dropout_pattern(seed, p, 2, 3, 19, 33), want.cpu())
