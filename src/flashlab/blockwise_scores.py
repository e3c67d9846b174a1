"""Score modifications of the CPU path (blockwise.py), tile by tile, with the kernels' semantics.

In flash-attn's order, on scores already multiplied by the softmax scale: softcap
``cap · tanh(s / cap)``; ALiBi ``-slope[h] · |i + off - j|``; the band — causal and/or a sliding
window, key ``j`` visible from query ``i`` iff ``i + off - left <= j <= i + off + right`` (``right``
is 0 under causal, -1 means unbounded); then ``attn_mask`` (bool: True = attend, float: added).
``off`` is the causal alignment offset (seqlen_k - seqlen_q bottom-right, 0 top-left).

Tiles are in blockwise.py's grouped row order: (batch, kv_heads, rows, keys), row ``r`` of a tile
starting at query ``i0`` being query ``i0 + r // group`` of head ``kv_head · group + r % group``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashlab.philox import dropout_keep_rows


@dataclass(frozen=True)
class ScoreMods:
    """What the CPU path applies to each score tile (defaults: nothing)."""

    causal: bool = False
    offset: int = 0  # causal / window / ALiBi alignment: query i sits at key position i + offset
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None  # (heads,) or (batch, heads), fp32
    attn_mask: Tensor | None = None  # (batch, heads, seqlen_q, seqlen_k) view: bool keep or float bias
    # Dropout as in the kernels: weight (b, h, i, j) is kept iff philox(seed, counter) >= dropout_p,
    # counter = (dropout_rows[b, h] + i) · dropout_stride + j (dropout_rows: the LSE row of query 0).
    dropout_p: float = 0.0
    dropout_seed: int = 0
    dropout_rows: Tensor | None = None  # (batch, heads) int64
    dropout_stride: int = 0

    @property
    def right(self) -> int:
        """The band's right edge relative to the diagonal (-1: unbounded)."""
        return 0 if self.causal else self.window_right

    @property
    def banded(self) -> bool:
        return self.right >= 0 or self.window_left >= 0

    def band_covers(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Whether every (query, key) of the tile is inside the band (no band mask needed)."""
        right_ok = self.right < 0 or j1 - 1 <= i0 + self.offset + self.right
        left_ok = self.window_left < 0 or j0 >= i1 - 1 + self.offset - self.window_left
        return right_ok and left_ok

    def key_range(self, i0: int, i1: int, seqlen_k: int) -> tuple[int, int]:
        """Keys [lo, hi) that any query of [i0, i1) can see through the band; (0, 0) if none."""
        hi = seqlen_k if self.right < 0 else min(seqlen_k, i1 + self.offset + self.right)
        lo = 0 if self.window_left < 0 else max(0, i0 + self.offset - self.window_left)
        return (lo, hi) if lo < hi else (0, 0)

    def query_range(self, j0: int, j1: int, seqlen_q: int) -> tuple[int, int]:
        """Queries [lo, hi) that can see any key of [j0, j1) through the band; (0, 0) if none."""
        lo = 0 if self.right < 0 else max(0, j0 - self.offset - self.right)
        hi = seqlen_q if self.window_left < 0 else min(seqlen_q, j1 - self.offset + self.window_left)
        return (lo, hi) if lo < hi else (0, 0)


def _positions(i0: int, i1: int, j0: int, j1: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.arange(i0, i1, device=device)[:, None], torch.arange(j0, j1, device=device)[None, :]


def modify(s: Tensor, mods: ScoreMods, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, Tensor | None, bool]:
    """Apply ``mods`` to the tile ``s`` (B, Hkv, (i1 - i0)·G, j1 - j0) of scaled scores.

    Returns the modified scores; with a softcap ``tanh(s / cap)`` (the backward's chain factor is
    ``1 - tanh²``), else None; and whether a mask was applied (hidden entries are -inf, and only
    such tiles can hold them). ``s`` must be the caller's own fresh tile: it may be overwritten (in
    place saves a pass over the tile)."""
    b, kv_heads, rows, keys = s.shape
    ti = i1 - i0
    group = rows // ti
    t = None
    if mods.softcap > 0:
        t = torch.tanh(s / mods.softcap)
        s = t * mods.softcap
    if mods.alibi_slopes is None and not mods.banded and mods.attn_mask is None:
        return s, t, False
    s5 = s.reshape(b, kv_heads, ti, group, keys)  # (B, Hkv, Ti, G, K): rows split into (query, member)
    i, j = _positions(i0, i1, j0, j1, s.device)
    if mods.alibi_slopes is not None:
        slopes = mods.alibi_slopes.reshape(-1, kv_heads, 1, group, 1).to(s.dtype)  # (B|1, Hkv, 1, G, 1)
        dist = (i + mods.offset - j).abs().to(s.dtype)  # (Ti, K)
        s5 = s5.sub_(slopes * dist[None, None, :, None, :])
    band_masked = mods.banded and not mods.band_covers(i0, i1, j0, j1)
    if band_masked:
        hidden = torch.zeros(ti, keys, dtype=torch.bool, device=s.device)
        if mods.right >= 0:
            hidden |= j > i + mods.offset + mods.right
        if mods.window_left >= 0:
            hidden |= j < i + mods.offset - mods.window_left
        s5 = s5.masked_fill_(hidden[None, None, :, None, :], float("-inf"))
    if mods.attn_mask is not None:
        m = mods.attn_mask[:, :, i0:i1, j0:j1]  # (B, H, Ti, K), a view of the broadcast mask
        m = m.reshape(m.shape[0], kv_heads, group, ti, keys).permute(0, 1, 3, 2, 4)  # (B, Hkv, Ti, G, K)
        s5 = s5.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s5.add_(m.to(s.dtype))
    return s5.reshape(b, kv_heads, rows, keys), t, band_masked or mods.attn_mask is not None


def exp_shifted(s: Tensor, shift: Tensor, masked: bool) -> Tensor:
    """``exp(s - shift)`` in place, with exact zeros where ``s - shift`` is -inf. The CPU's vector
    exp is several times slower on -inf and on arguments below float32's underflow (about -87) than
    on ordinary ones: arguments are clamped at -80 (e^-80 ≈ 2e-35 of the row maximum, far below any
    rounding) and masked entries are zeroed after."""
    x = s.sub_(shift)
    hidden = x == float("-inf") if masked else None
    p = x.clamp_(min=-80.0).exp_()
    return p.masked_fill_(hidden, 0.0) if hidden is not None else p


def dropout_tile(mods: ScoreMods, kv_heads: int, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Bool keep pattern (B, Hkv, (i1 - i0)·G, j1 - j0) of the tile, in the grouped row order."""
    rows = mods.dropout_rows
    b, heads = rows.shape
    group = heads // kv_heads
    i = torch.arange(i0, i1, dtype=torch.int64)
    lse_rows = rows.reshape(b, kv_heads, 1, group, 1) + i[None, None, :, None, None]  # (B, Hkv, Ti, G, 1)
    keep = dropout_keep_rows(mods.dropout_seed, lse_rows * mods.dropout_stride, j0, j1, mods.dropout_p)
    return keep.reshape(b, kv_heads, (i1 - i0) * group, j1 - j0)
