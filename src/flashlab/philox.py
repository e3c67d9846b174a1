"""The kernels' dropout randomness in PyTorch ops, bit for bit: the CPU path's dropout draws the
same masks as the kernels (kernels/scores.py ``dropout_keep``) for the same seed.

Weight (query row r, key j) has the counter ``c = r · stride + j`` with ``stride = counter_stride(
seqlen_k)`` (a multiple of 4). Its uniform is output word ``c % 4`` of Triton's ``tl.rand4x(seed,
c // 4)``: 10 rounds of Philox-4x32 on the counter (low 32 bits, high 32 bits, 0, 0) with the key
(seed low 32 bits, seed high 32 bits); each word as an int32 ``x``, negatives folded with ``~x``,
scaled by 4.6566127342e-10 in fp32. One Philox call serves four keys. uint32 arithmetic is done here
in int64 tensors, products split into 16-bit halves so nothing overflows.
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
    """Dropout counters per query row: seqlen_k rounded up to a multiple of 4, so that each Philox
    call's four words serve four keys of one row."""
    return (int(seqlen_k) + 3) // 4 * 4


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


def _uniform(word: Tensor) -> Tensor:
    x = torch.where(word >= 1 << 31, word - (1 << 32), word)  # the word as an int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_uniform(seed: int, counters: Tensor) -> Tensor:
    """The fp32 uniform in [0, 1) of each non-negative int64 dropout counter (module docstring)."""
    words = torch.stack(philox_words(seed, counters >> 2))
    return _uniform(words.gather(0, (counters & 3).unsqueeze(0)).squeeze(0))


def dropout_keep(seed: int, counters: Tensor, dropout_p: float) -> Tensor:
    """True where a weight survives dropout: the kernels' ``uniform >= p`` (fp32)."""
    return philox_uniform(seed, counters) >= torch.tensor(dropout_p, dtype=torch.float32)


def dropout_keep_rows(seed: int, row_counters: Tensor, j0: int, j1: int, dropout_p: float) -> Tensor:
    """``dropout_keep`` of keys ``j0 .. j1 - 1`` for rows whose key 0 has counter ``row_counters[..., 0]``
    (a multiple of 4; shape [..., 1]): the same bits, one Philox evaluation per four keys as in the
    kernels instead of one per key. Returns [..., j1 - j0]."""
    g0, g1 = j0 // 4, -(-j1 // 4)
    groups = (row_counters >> 2) + torch.arange(g0, g1, dtype=torch.int64)
    uniforms = _uniform(torch.stack(philox_words(seed, groups), dim=-1).flatten(-2))  # word w of group g: key 4g + w
    start = j0 - 4 * g0
    return uniforms[..., start:start + j1 - j0] >= torch.tensor(dropout_p, dtype=torch.float32)


def dense_dropout_pattern(seed: int, dropout_p: float, batch: int, heads: int, seqlen_q: int,
                          seqlen_k: int) -> Tensor:
    """The bool (batch, heads, seqlen_q, seqlen_k) keep pattern of dense attention: counter
    ((b · heads + h) · seqlen_q + i) · counter_stride(seqlen_k) + j, as ``ops.dropout_pattern`` on a GPU."""
    rows = torch.arange(batch * heads * seqlen_q, dtype=torch.int64).reshape(batch, heads, seqlen_q, 1)
    return dropout_keep_rows(seed, rows * counter_stride(seqlen_k), 0, seqlen_k, dropout_p)
