"""Block-sparse attention masks: a predicate on (batch, head, q_idx, kv_idx) compiled into block
tables, so the kernels skip fully masked blocks, run fully visible ones mask-free, and apply an
element mask only inside partial blocks.

    doc = torch.tensor([...])                       # document id of every token
    mask = flashlab.block_mask(lambda b, h, q, kv: doc[q] == doc[kv], None, None, 16384, 16384, device="cuda")
    out = flashlab.flash_attn_func(q, k, v, block_mask=mask)

The predicate is evaluated once, vectorized, on broadcastable int64 index tensors — ``b`` of
shape (B, 1, 1, 1), ``h`` (1, H, 1, 1), ``q_idx`` (1, 1, M, 1), ``kv_idx`` (1, 1, 1, N) — and
must return a bool tensor broadcastable to (B, H, M, N): write it with tensor ops (comparisons,
``&``, ``|``, indexing a tensor with ``q_idx``), as for FlexAttention's ``mask_mod``. It is
evaluated over chunks of query blocks, so the S×S mask never exists at once.

What is stored (per broadcast batch × head): two int32 tables and a pool of partial tiles.
``kv_table`` (B, H, n_q_blocks, 2 + 2·n_kv_blocks): per query block ``[n_full, n_partial,
(kv_block, tile)…]`` — full blocks first; ``q_table`` the same transposed (per key block, the
query blocks), for the dK/dV kernel. ``tiles``: uint8 (n_tiles, block_m, block_n), one per
distinct partial block (identical partial blocks share a tile). Memory is
O(B·H·(S/block)²) ints plus the distinct partial tiles, not O(S²).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_CHUNK_ELEMENTS = 1 << 26  # predicate values evaluated at once


@dataclass(frozen=True)
class BlockMask:
    """A compiled block-sparse mask (build it with :func:`block_mask`).

    ``batch`` / ``heads`` are None when the mask is the same for every batch element / head.
    ``block_m`` × ``block_n`` is the mask's block; the kernels' tiles divide it."""

    batch: int | None
    heads: int | None
    seqlen_q: int
    seqlen_k: int
    block_m: int
    block_n: int
    kv_table: torch.Tensor
    q_table: torch.Tensor
    tiles: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.kv_table.device

    def counts(self) -> dict[str, int]:
        """Numbers of full, partial and skipped (fully masked) blocks over all batch × heads."""
        full = int(self.kv_table[..., 0].sum())
        partial = int(self.kv_table[..., 1].sum())
        total = self.kv_table[..., 0].numel() * ((self.kv_table.shape[-1] - 2) // 2)
        return {"full": full, "partial": partial, "skipped": total - full - partial, "tiles": self.tiles.shape[0]}

    def sparsity(self) -> float:
        """Fraction of blocks skipped."""
        c = self.counts()
        return c["skipped"] / max(1, c["full"] + c["partial"] + c["skipped"])

    def to_dense(self) -> torch.Tensor:
        """The bool (B or 1, H or 1, seqlen_q, seqlen_k) mask the tables describe (for tests and
        for peers that take a dense mask). It is seqlen_q × seqlen_k: small sizes only."""
        bt, ht, nq = self.kv_table.shape[:3]
        nk = (self.kv_table.shape[-1] - 2) // 2
        dense = torch.zeros(bt, ht, nq, nk, self.block_m, self.block_n, dtype=torch.bool, device=self.device)
        n_full, n_part = self.kv_table[..., 0:1].long(), self.kv_table[..., 1:2].long()
        pos = torch.arange(nk, device=self.device)
        blocks, tile = self.kv_table[..., 2::2].long(), self.kv_table[..., 3::2].long()
        for listed, is_full in ((pos < n_full, True), ((pos >= n_full) & (pos < n_full + n_part), False)):
            b, h, m, i = listed.nonzero(as_tuple=True)
            n = blocks[b, h, m, i]
            dense[b, h, m, n] = True if is_full else self.tiles[tile[b, h, m, i]].bool()
        dense = dense.permute(0, 1, 2, 4, 3, 5).reshape(bt, ht, nq * self.block_m, nk * self.block_n)
        return dense[:, :, : self.seqlen_q, : self.seqlen_k]

    def __repr__(self) -> str:
        c = self.counts()
        return (f"BlockMask(batch={self.batch}, heads={self.heads}, seqlen_q={self.seqlen_q}, "
                f"seqlen_k={self.seqlen_k}, block=({self.block_m}, {self.block_n}), full={c['full']}, "
                f"partial={c['partial']}, skipped={c['skipped']}, tiles={c['tiles']})")


def _size(value: object, name: str, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive int or None (same mask for all)" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def _block_size(block_size: object) -> tuple[int, int]:
    pair = (block_size, block_size) if isinstance(block_size, int) and not isinstance(block_size, bool) else block_size
    try:
        bm, bn = pair  # type: ignore[misc]
    except (TypeError, ValueError):
        bm = bn = None
    for v in (bm, bn):
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v > 256 or v & (v - 1):
            raise ValueError(f"block_size must be a power of two in 16..256 or a pair of them, got {block_size!r}")
    return bm, bn


def _evaluate(predicate: Predicate, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
              shape: tuple[int, int, int, int]) -> torch.Tensor:
    out = predicate(b, h, q, kv)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"predicate must return a bool tensor (e.g. q_idx >= kv_idx), got {got}")
    try:
        return out.expand(shape)
    except RuntimeError:
        raise ValueError(f"predicate returned shape {tuple(out.shape)}, which does not broadcast to "
                         f"(batch, heads, q_idx, kv_idx) = {shape}") from None


def _tables(kind: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
    """Rows [n_full, n_partial, (blk, tile)…] from per-block kinds (2 full, 1 partial, 0 skipped)."""
    n = kind.shape[-1]
    pos = torch.arange(n, device=kind.device)
    order = torch.argsort(torch.where(kind == 2, pos, torch.where(kind == 1, n + pos, 2 * n + pos)), dim=-1)
    table = torch.zeros(*kind.shape[:-1], 2 + 2 * n, dtype=torch.int32, device=kind.device)
    table[..., 0] = (kind == 2).sum(-1)
    table[..., 1] = (kind == 1).sum(-1)
    table[..., 2::2] = order
    table[..., 3::2] = torch.gather(tile, -1, order)
    return table.contiguous()


def block_mask(predicate: Predicate, batch: int | None, heads: int | None, seqlen_q: int, seqlen_k: int,
               device: torch.device | str = "cpu", block_size: int | tuple[int, int] = 128) -> BlockMask:
    """Compile ``predicate(b, h, q_idx, kv_idx) -> bool`` (True = attend) into a :class:`BlockMask`.

    Args:
        predicate: vectorized mask function (see the module docstring for the index shapes).
        batch, heads: sizes the mask varies over, or None when it is the same for all (the mask
            then broadcasts, and ``b`` / ``h`` passed to the predicate are 0).
        seqlen_q, seqlen_k: the attention's query and key lengths.
        device: where the tables live — the device of q, k, v.
        block_size: the mask block (power of two, 16..256, or a (block_m, block_n) pair); larger
            blocks mean smaller tables and fewer partial blocks at coarse boundaries, smaller
            blocks skip more at fine ones. 128 matches FlexAttention's default.
    """
    if not callable(predicate):
        raise TypeError(f"predicate must be callable (b, h, q_idx, kv_idx) -> bool tensor, got "
                        f"{type(predicate).__name__}")
    bsz, hsz = _size(batch, "batch", True), _size(heads, "heads", True)
    sq, sk = _size(seqlen_q, "seqlen_q", False), _size(seqlen_k, "seqlen_k", False)
    bm, bn = _block_size(block_size)
    device = torch.device(device)
    bt, ht = bsz or 1, hsz or 1
    nq, nk = -(-sq // bm), -(-sk // bn)
    b_idx = torch.arange(bt, device=device).view(-1, 1, 1, 1)
    h_idx = torch.arange(ht, device=device).view(1, -1, 1, 1)
    kv_idx = torch.arange(nk * bn, device=device).view(1, 1, 1, -1)
    kind = torch.zeros(bt, ht, nq, nk, dtype=torch.int8, device=device)
    tile = torch.zeros(bt, ht, nq, nk, dtype=torch.long, device=device)
    pieces: list[torch.Tensor] = []
    n_tiles = 0
    rows = max(1, _CHUNK_ELEMENTS // (bt * ht * bm * nk * bn))
    # Columns past seqlen_k are never visible, and a block reaching past seqlen_k is never "full"
    # (the kernels' mask-free loop loads whole key tiles); rows past seqlen_q are don't-care.
    col_ok = kv_idx < sk
    col_block_whole = torch.arange(nk, device=device) * bn + bn <= sk
    for m0 in range(0, nq, rows):
        m1 = min(nq, m0 + rows)
        q_idx = torch.arange(m0 * bm, m1 * bm, device=device).view(1, 1, -1, 1)
        shape = (bt, ht, (m1 - m0) * bm, nk * bn)
        keep = _evaluate(predicate, b_idx, h_idx, q_idx.clamp(max=sq - 1), kv_idx.clamp(max=sk - 1), shape)
        row_ok = q_idx < sq
        keep = keep & col_ok & row_ok
        blocks = keep.view(bt, ht, m1 - m0, bm, nk, bn)
        any_ = blocks.any(dim=5).any(dim=3)
        full = (keep | ~row_ok).view(bt, ht, m1 - m0, bm, nk, bn).all(dim=5).all(dim=3) & col_block_whole
        partial = any_ & ~full
        kind[:, :, m0:m1] = torch.where(full, 2, torch.where(partial, 1, 0)).to(torch.int8)
        count = int(partial.sum())
        if count:
            tile[:, :, m0:m1][partial] = torch.arange(n_tiles, n_tiles + count, device=device)
            pieces.append(blocks.permute(0, 1, 2, 4, 3, 5)[partial].to(torch.uint8))
            n_tiles += count
    if pieces:
        flat = torch.cat(pieces).view(n_tiles, bm * bn)
        tiles, inverse = torch.unique(flat, dim=0, return_inverse=True)
        tiles = tiles.view(-1, bm, bn).contiguous()
        tile = torch.where(kind == 1, inverse[tile], 0)
    else:
        tiles = torch.zeros(1, bm, bn, dtype=torch.uint8, device=device)
    return BlockMask(bsz, hsz, sq, sk, bm, bn, _tables(kind, tile), _tables(kind.transpose(2, 3), tile.transpose(2, 3)),
                     tiles)


def check_block_mask(mask: object, batch: int, heads: int, seqlen_q: int, seqlen_k: int, device: torch.device,
                     conflicts: dict[str, bool]) -> BlockMask | None:
    """Validate ``block_mask=`` against the call: shapes, device, and options it cannot combine
    with (``conflicts``: argument name → whether the call uses it)."""
    if mask is None:
        return None
    if not isinstance(mask, BlockMask):
        raise TypeError(f"block_mask must be a flashlab.BlockMask (from flashlab.block_mask(...)) or None, got "
                        f"{type(mask).__name__}")
    if (mask.seqlen_q, mask.seqlen_k) != (seqlen_q, seqlen_k):
        raise ValueError(f"block_mask was built for seqlen_q, seqlen_k = {mask.seqlen_q}, {mask.seqlen_k}, the "
                         f"inputs have {seqlen_q}, {seqlen_k}")
    for name, built, got in (("batch", mask.batch, batch), ("heads", mask.heads, heads)):
        if built is not None and built != got:
            raise ValueError(f"block_mask was built for {name} = {built}, the inputs have {got} (build it with "
                             f"{name}={got}, or None to broadcast)")
    if mask.device != device:
        raise ValueError(f"block_mask is on {mask.device}, the inputs on {device}")
    used = [name for name, on in conflicts.items() if on]
    if used:
        raise ValueError(f"block_mask cannot be combined with {used[0]}: express it in the predicate "
                         "(e.g. causal: q_idx >= kv_idx)")
    return mask
