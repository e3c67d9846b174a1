"""The kernels' dropout randomness in PyTorch ops, bit for bit: the CPU path's dropout draws the
same masks as the kernels (kernels/scores.py ``dropout_keep``) for the same seed.

Weight (query row r, key j) has the counter ``c = r · stride + j`` with ``stride = counter_stride(
seqlen_k)`` (a multiple of 32). Its random number is a 16-bit half of Triton's
``tl.randint4x(seed, group(c))`` (10 rounds of Philox-4x32 on the counter (low 32 bits, high 32
bits, 0, 0) with the key (seed low 32 bits, seed high 32 bits)), ``group(c) = 4 · (c // 32) +
(c % 8) // 2``: word ``(c // 8) % 4``, its low half for even ``c``, its high half for odd. So one
Philox call serves the eight keys ``32s + 8w + 2t + {0, 1}`` (w = 0..3) of a 32-key span: the
keys one thread holds of a tensor-core accumulator row, where the kernels build the mask. The
weight is kept iff that half is ``>= dropout_threshold(p)`` (``p · 65536`` rounded), so the keep
rate is ``1 - p`` to within 2^-17 — flash-attn's CUDA kernels compare 8-bit parts of the same kind
of words. uint32 arithmetic is done here in int64 tensors, products split into 16-bit halves so
nothing overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    cross = a_hi * b_lo + a_lo * b_hi
    high = a_hi * b_hi + ((cross + (low >> 16)) >> 16)
    return high, ((cross << 16) + low) & _MASK32


def counter_stride(seqlen_k: int) -> int:
    """Dropout counters per query row: seqlen_k rounded up to a multiple of 32, so that each
    32-key span's four Philox calls serve keys of one row only."""
    return (int(seqlen_k) + 31) // 32 * 32


def philox_group(counters: Tensor) -> Tensor:
    """The Philox counter (``tl.randint4x`` offset) that serves each dropout counter."""
    return 4 * (counters >> 5) + ((counters & 7) >> 1)


def dropout_threshold(dropout_p: float) -> int:
    """The 16-bit threshold the kernels compare against: ``p · 65536 + 0.5`` in fp32, truncated
    (the kernels compute it from their fp32 ``dropout_p`` the same way; exact, 65536 is a power of 2)."""
    t = torch.tensor(dropout_p, dtype=torch.float32) * 65536.0 + 0.5
    return int(t.item())


def philox_words(seed: int, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four uint32 output words (in int64 tensors) of ``tl.randint4x(seed, offsets)``."""
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        high_b, low_b = _mul32(_ROUND_B, c2)
        high_a, low_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_bits16(seed: int, counters: Tensor) -> Tensor:
    """The 16-bit random number (0 … 65535, int64) of each non-negative int64 dropout counter."""
    words = torch.stack(philox_words(seed, philox_group(counters)), dim=-1)
    word = words.gather(-1, ((counters >> 3) & 3).unsqueeze(-1)).squeeze(-1)
    return torch.where((counters & 1) == 1, word >> 16, word & 0xFFFF)


def dropout_keep(seed: int, counters: Tensor, dropout_p: float) -> Tensor:
    """True where a weight survives dropout (module docstring), one Philox evaluation per counter."""
    return philox_bits16(seed, counters) >= dropout_threshold(dropout_p)


def dropout_keep_rows(seed: int, row_counters: Tensor, j0: int, j1: int, dropout_p: float) -> Tensor:
    """``dropout_keep`` of keys ``j0 .. j1 - 1`` for rows whose key 0 has counter ``row_counters[..., 0]``
    (a multiple of 32; shape [..., 1]): the same bits, one Philox evaluation per eight keys as in
    the kernels instead of one per key. Returns [..., j1 - j0]."""
    s0, s1 = j0 // 32, -(-j1 // 32)  # the 32-key spans covered
    groups = (row_counters >> 3)[..., None] + 4 * torch.arange(s0, s1, dtype=torch.int64)[:, None] + torch.arange(4)
    words = torch.stack(philox_words(seed, groups), dim=-1)  # [..., span, t, word]
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)  # [..., span, t, word, high]
    bits = halves.transpose(-3, -2).flatten(-4)  # key 32·span + 8·word + 2t + high
    start = j0 - 32 * s0
    return bits[..., start:start + j1 - j0] >= dropout_threshold(dropout_p)


def dense_dropout_pattern(seed: int, dropout_p: float, batch: int, heads: int, seqlen_q: int,
                          seqlen_k: int) -> Tensor:
    """The bool (batch, heads, seqlen_q, seqlen_k) keep pattern of dense attention: counter
    ((b · heads + h) · seqlen_q + i) · counter_stride(seqlen_k) + j, as ``ops.dropout_pattern`` on a GPU."""
    rows = torch.arange(batch * heads * seqlen_q, dtype=torch.int64).reshape(batch, heads, seqlen_q, 1)
    return dropout_keep_rows(seed, rows * counter_stride(seqlen_k), 0, seqlen_k, dropout_p)
