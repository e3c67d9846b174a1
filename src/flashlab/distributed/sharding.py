"""How a global sequence is split across the ranks of a group, and put back together.

Two layouts (``sharding=``):

* ``"contiguous"``: rank ``r`` holds the ``r``-th of ``W`` near-equal contiguous pieces
  (the first ``seqlen % W`` pieces are one token longer). Under a causal mask rank ``W-1`` does
  ``W`` times the work of rank 0.
* ``"zigzag"``: the sequence is cut into ``2W`` near-equal chunks (the first ``seqlen % 2W``
  chunks one token longer) and rank ``r`` holds chunks ``r`` and ``2W-1-r``, concatenated in that
  order. Every rank then does the same causal work (load-balanced). Use it for ``causal=True``.

For non-causal attention the layout does not change any result; it only matters under a causal
mask, where the ring functions must be told which layout the shards are in.

Varlen (packed) tensors are sharded sequence by sequence: every sequence of the batch is split
as above and each rank packs its pieces in batch order (``shard_varlen``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist

Sharding = Literal["contiguous", "zigzag"]
SHARDINGS: tuple[str, ...] = ("contiguous", "zigzag")

__all__ = [
    "SHARDINGS",
    "Sharding",
    "gather_sequence",
    "gather_shards",
    "gather_varlen",
    "shard_bounds",
    "shard_sequence",
    "shard_varlen",
    "unshard_sequence",
    "unshard_varlen",
    "zigzag_chunk_sizes",
    "zigzag_shard",
    "zigzag_unshard",
]


def check_sharding(sharding: object) -> str:
    """Return ``sharding`` if it names a layout, else raise a ValueError listing the layouts."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(map(repr, SHARDINGS))}, got {sharding!r}")
    return sharding  # type: ignore[return-value]


def _split_sizes(n: int, parts: int) -> list[int]:
    base, rem = divmod(n, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def zigzag_chunk_sizes(seqlen: int, world_size: int) -> list[int]:
    """Lengths of the ``2 * world_size`` zigzag chunks of a ``seqlen``-token sequence."""
    return _split_sizes(seqlen, 2 * world_size)


def shard_bounds(seqlen: int, world_size: int, rank: int, sharding: str = "contiguous") -> list[tuple[int, int]]:
    """Global ``[start, end)`` token ranges held by ``rank``, in the order they are concatenated.

    One range for ``"contiguous"``, two (chunk ``rank`` then chunk ``2W-1-rank``) for ``"zigzag"``.
    """
    check_sharding(sharding)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if not isinstance(seqlen, int) or seqlen < 0:
        raise ValueError(f"seqlen must be a non-negative int, got {seqlen!r}")
    sizes = _split_sizes(seqlen, world_size) if sharding == "contiguous" else zigzag_chunk_sizes(seqlen, world_size)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    chunks = [rank] if sharding == "contiguous" else [rank, 2 * world_size - 1 - rank]
    return [(starts[c], starts[c + 1]) for c in chunks]


def _check_tensor(x: object, dim: int, name: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(
    x: torch.Tensor, world_size: int, rank: int, *, sharding: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """This rank's shard of a global tensor along the sequence dim ``dim`` (1 for flash layout).

    Example: ``q_local = shard_sequence(q, W, r, sharding="zigzag")`` for q (batch, seqlen, heads,
    head_dim). Differentiable (a concatenation of narrow views).
    """
    dim = _check_tensor(x, dim)
    pieces = [x.narrow(dim, a, b - a) for a, b in shard_bounds(x.shape[dim], world_size, rank, sharding)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], *, sharding: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence``: the global tensor from every rank's shard (list in rank order).

    Raises a ValueError if the shard lengths are not those ``shard_sequence`` produces for
    their total length and ``len(shards)`` ranks.
    """
    if not isinstance(shards, Sequence) or not shards:
        raise TypeError("shards must be a non-empty list of tensors, one per rank in rank order")
    dims = {_check_tensor(s, dim, f"shards[{i}]") for i, s in enumerate(shards)}
    d = dims.pop()
    world = len(shards)
    seqlen = sum(s.shape[d] for s in shards)
    placed: list[tuple[int, torch.Tensor]] = []
    for r, s in enumerate(shards):
        bounds = shard_bounds(seqlen, world, r, sharding)
        want = sum(b - a for a, b in bounds)
        if s.shape[d] != want:
            got = [t.shape[d] for t in shards]
            expect = [sum(b - a for a, b in shard_bounds(seqlen, world, i, sharding)) for i in range(world)]
            raise ValueError(f"shard lengths {got} do not match a {sharding} sharding of {seqlen} tokens over "
                             f"{world} ranks, which gives {expect}")
        offset = 0
        for a, b in bounds:
            placed.append((a, s.narrow(d, offset, b - a)))
            offset += b - a
    placed.sort(key=lambda item: item[0])
    return torch.cat([t for _, t in placed], dim=d)


def zigzag_shard(x: torch.Tensor, world_size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """``shard_sequence(x, world_size, rank, sharding="zigzag", dim=dim)``: chunks r and 2W-1-r."""
    return shard_sequence(x, world_size, rank, sharding="zigzag", dim=dim)


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """``unshard_sequence(shards, sharding="zigzag", dim=dim)``."""
    return unshard_sequence(shards, sharding="zigzag", dim=dim)


def _cu_list(cu_seqlens: object, name: str = "cu_seqlens") -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError(f"{name} must be a 1-D integer tensor (batch + 1,), got {cu_seqlens!r:.80}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {cu_seqlens.dtype}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu}")
    return cu


def shard_varlen(
    x: torch.Tensor, cu_seqlens: torch.Tensor, world_size: int, rank: int, *, sharding: str = "contiguous"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard a packed (total, heads, head_dim) tensor sequence by sequence.

    Args:
        x: (total_tokens, ...) packed sequences; cu_seqlens: (batch + 1,) global offsets.
    Returns:
        (x_local, cu_seqlens_local): this rank's pieces of every sequence, packed in batch order,
        and their int32 offsets (on cu_seqlens' device) — the inputs of ``ring_flash_attn_varlen_func``.
    """
    cu = _cu_list(cu_seqlens)
    _check_tensor(x, 0)
    if x.shape[0] != cu[-1]:
        raise ValueError(f"x has {x.shape[0]} tokens but cu_seqlens ends at {cu[-1]}")
    pieces, local = [], [0]
    for a, b in zip(cu, cu[1:]):
        shard = shard_sequence(x.narrow(0, a, b - a), world_size, rank, sharding=sharding, dim=0)
        pieces.append(shard)
        local.append(local[-1] + shard.shape[0])
    out = torch.cat(pieces, dim=0) if pieces else x.narrow(0, 0, 0)
    return out, torch.tensor(local, dtype=torch.int32, device=cu_seqlens.device)


def unshard_varlen(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *, sharding: str = "contiguous"
                   ) -> torch.Tensor:
    """Inverse of ``shard_varlen``: the packed global tensor from every rank's packed shard.

    ``cu_seqlens`` are the *global* offsets (the ones given to ``shard_varlen``).
    """
    if not isinstance(shards, Sequence) or not shards:
        raise TypeError("shards must be a non-empty list of tensors, one per rank in rank order")
    cu, world = _cu_list(cu_seqlens), len(shards)
    offsets = [0] * world
    seqs = []
    for a, b in zip(cu, cu[1:]):
        parts = []
        for r, s in enumerate(shards):
            n = sum(e - s0 for s0, e in shard_bounds(b - a, world, r, sharding))
            if offsets[r] + n > s.shape[0]:
                raise ValueError(f"shards[{r}] has {s.shape[0]} tokens, fewer than cu_seqlens {cu} implies")
            parts.append(s.narrow(0, offsets[r], n))
            offsets[r] += n
        seqs.append(unshard_sequence(parts, sharding=sharding, dim=0))
    for r, s in enumerate(shards):
        if offsets[r] != s.shape[0]:
            raise ValueError(f"shards[{r}] has {s.shape[0]} tokens, cu_seqlens {cu} implies {offsets[r]}")
    return torch.cat(seqs, dim=0) if seqs else shards[0].narrow(0, 0, 0)


def gather_shards(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> list[torch.Tensor]:
    """Every rank's shard, in rank order, on every rank (not differentiable). Shards may differ in
    length along ``dim`` (they are padded for the collective). Collective over ``group``."""
    d = _check_tensor(x, dim)
    world = dist.get_world_size(group)
    lengths = torch.tensor([x.shape[d]], dtype=torch.int64, device=x.device)
    all_lengths = [torch.empty_like(lengths) for _ in range(world)]
    dist.all_gather(all_lengths, lengths, group=group)
    sizes = [int(t.item()) for t in all_lengths]
    pad = list(x.shape)
    pad[d] = max(sizes)
    buf = x.new_zeros(pad)
    buf.narrow(d, 0, x.shape[d]).copy_(x)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [b.narrow(d, 0, n) for b, n in zip(bufs, sizes)]


def gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, *, sharding: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """The global tensor, on every rank, from every rank's ``shard_sequence`` shard (collective,
    not differentiable). E.g. the full attention output from ``ring_flash_attn_func``'s shards."""
    check_sharding(sharding)
    return unshard_sequence(gather_shards(x.detach(), group, dim), sharding=sharding, dim=dim)


def gather_varlen(
    x: torch.Tensor, cu_seqlens: torch.Tensor, group: dist.ProcessGroup | None = None, *,
    sharding: str = "contiguous",
) -> torch.Tensor:
    """The packed global tensor, on every rank, from every rank's ``shard_varlen`` shard
    (collective, not differentiable); ``cu_seqlens`` are the global offsets."""
    check_sharding(sharding)
    return unshard_varlen(gather_shards(x.detach(), group, 0), cu_seqlens, sharding=sharding)
