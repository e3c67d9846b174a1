"""Which pieces of attention a rank computes at each ring step, from every rank's shard layout.

At step ``s`` rank ``r`` holds the K/V shard of rank ``src = (r - s) mod W``. Per sequence, the
piece it computes is one of (layouts in ``sharding.py``):

* not causal: all local queries × all of src's keys;
* causal, ``src == r`` (step 0): local queries × local keys under a causal mask — the local tokens
  are in global order and identical for q and k, so it is the top-left mask of a square block,
  for both layouts;
* causal contiguous: ``src < r`` → all × all unmasked (src's tokens all precede ours);
  ``src > r`` → nothing (all follow);
* causal zigzag (rank r holds chunks r and 2W-1-r): ``src < r`` → all local queries × src's first
  chunk, unmasked (chunk src precedes both of ours, chunk 2W-1-src follows both);
  ``src > r`` → our second chunk's queries × all of src's keys, unmasked (chunk r precedes both of
  src's chunks, chunk 2W-1-r follows both). Both are (2c × c) blocks: equal work on every rank.

Every rank learns every rank's layout through one small all-gather (two for varlen), which also
validates the inputs collectively: a bad argument on one rank raises on *every* rank (the same
ValueError, or that rank's own error) instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashlab.distributed.sharding import SHARDINGS, zigzag_chunk_sizes

METHODS: tuple[str, ...] = ("ring", "allgather")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = ("ok", "varlen", "batch", "seqlen_q", "seqlen_k", "heads", "kv_heads", "head_dim", "dtype", "causal",
           "sharding", "method", "nseq", "softmax_scale")
_MUST_AGREE = tuple(f for f in _FIELDS if f not in ("ok", "seqlen_q", "seqlen_k"))

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Piece:
    """q rows [q0, q1) of this rank × k rows [k0, k1) of the held K/V shard (sequence dim)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    @property
    def q(self) -> slice:
        return slice(self.q0, self.q1)

    @property
    def k(self) -> slice:
        return slice(self.k0, self.k1)


@dataclass(frozen=True)
class RankLayout:
    """One rank's shards: per sequence ``(offset, length)`` in its local q and k, and the length
    of the first zigzag chunk (the whole length for contiguous shards)."""

    seq_q: tuple[tuple[int, int], ...]
    seq_k: tuple[tuple[int, int], ...]
    first_q: tuple[int, ...]
    first_k: tuple[int, ...]

    @property
    def seqlen_k(self) -> int:
        return sum(n for _, n in self.seq_k)


@dataclass(frozen=True)
class Plan:
    """The schedule of one rank: ``pieces(step)`` against the K/V of rank ``src(step)``."""

    rank: int
    world_size: int
    causal: bool
    sharding: str
    layouts: tuple[RankLayout, ...]
    varlen: bool = False

    def src(self, step: int) -> int:
        return (self.rank - step) % self.world_size

    def kv_len(self, rank: int) -> int:
        return self.layouts[rank].seqlen_k

    def pieces(self, step: int) -> list[Piece]:
        src, me = self.src(step), self.layouts[self.rank]
        kv = self.layouts[src]
        out: list[Piece] = []
        for b, ((qo, ql), (ko, kl)) in enumerate(zip(me.seq_q, kv.seq_k)):
            q0, q1, k0, k1, causal = qo, qo + ql, ko, ko + kl, False
            if self.causal and src == self.rank:
                causal = True
            elif self.causal and self.sharding == "contiguous" and src > self.rank:
                continue
            elif self.causal and self.sharding == "zigzag":
                if src < self.rank:
                    k1 = ko + kv.first_k[b]
                else:
                    q0 = qo + me.first_q[b]
            if q1 > q0 and k1 > k0:
                out.append(Piece(q0, q1, k0, k1, causal))
        return out


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where this group's metadata collectives run: CPU when the group has gloo (including mixed
    ``"cpu:gloo,cuda:nccl"`` groups), the current CUDA device for a pure NCCL group."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _header(error: BaseException | None, fields: dict[str, object]) -> list[int]:
    if error is not None:
        return [0] * len(_FIELDS)
    codes = {"dtype": _DTYPES.index(fields["dtype"]), "sharding": SHARDINGS.index(fields["sharding"]),
             "method": METHODS.index(fields["method"]), "softmax_scale": _bits(float(fields["softmax_scale"]))}
    return [1] + [int(codes.get(f, fields.get(f, 0))) for f in _FIELDS[1:]]  # type: ignore[call-overload]


def _describe(field: str, value: int) -> object:
    if field == "dtype":
        return _DTYPES[value]
    if field in ("sharding", "method"):
        return (SHARDINGS if field == "sharding" else METHODS)[value]
    if field == "softmax_scale":
        return struct.unpack("<d", struct.pack("<q", value))[0]
    return value


def build_plan(
    group: dist.ProcessGroup | None,
    error: BaseException | None,
    fields: dict[str, object],
    cu_q: list[int] | None = None,
    cu_k: list[int] | None = None,
) -> Plan:
    """Exchange every rank's layout, validate it collectively and return this rank's Plan.

    Args:
        error: this rank's argument error (raised after the exchange, on every rank), or None.
        fields: the header values named in ``_FIELDS`` (ignored when ``error`` is set).
        cu_q, cu_k: this rank's local cumulative sequence lengths (varlen) or None (dense).
    Collective over ``group``: every rank must call it.
    """
    world, rank, device = dist.get_world_size(group), dist.get_rank(group), comm_device(group)
    mine = torch.tensor(_header(error, fields), dtype=torch.int64, device=device)
    table_t = torch.empty(world * len(_FIELDS), dtype=torch.int64, device=device)
    all_gather_single(table_t, mine, group=group)
    table = [dict(zip(_FIELDS, row)) for row in table_t.view(world, -1).tolist()]
    bad = [r for r, row in enumerate(table) if not row["ok"]]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"ring attention: invalid arguments on rank(s) {bad} of the group (see the error "
                         "raised there); every rank stops")
    for f in _MUST_AGREE:
        values = [row[f] for row in table]
        if len(set(values)) > 1:
            shown = [_describe(f, v) for v in values]
            raise ValueError(f"ring attention: ranks disagree on {f}: {shown} (rank order); every rank must "
                             "pass the same shapes, dtype and options")
    head = table[0]
    if head["varlen"]:
        n = head["nseq"] + 1
        both = torch.tensor([cu_q, cu_k], dtype=torch.int64, device=device)
        gathered = torch.empty(world * 2 * n, dtype=torch.int64, device=device)
        all_gather_single(gathered, both.flatten(), group=group)
        cus = gathered.view(world, 2, n).tolist()
    else:
        cus = [[[0, row["seqlen_q"]], [0, row["seqlen_k"]]] for row in table]
    return make_plan(rank, bool(head["causal"]), SHARDINGS[head["sharding"]], cus, varlen=bool(head["varlen"]))


def make_plan(rank: int, causal: bool, sharding: str, cus: list[list[list[int]]], varlen: bool = False) -> Plan:
    """Validate every rank's layout and build ``rank``'s Plan (pure: no communication).

    Args:
        cus: per rank ``[cu_q, cu_k]``, the cumulative local sequence lengths of its q and k shards
            (``[[0, seqlen_q], [0, seqlen_k]]`` for dense tensors).
    """
    world = len(cus)
    lens_q = [[b - a for a, b in zip(cq, cq[1:])] for cq, _ in cus]
    if causal:
        mismatch = [r for r, (cq, ck) in enumerate(cus) if cq != ck]
        if mismatch:
            what = "cu_seqlens_q != cu_seqlens_k" if varlen else "seqlen_q != seqlen_k"
            raise ValueError(f"ring attention: causal=True needs q and k shards of the same tokens, but "
                             f"{what} on rank(s) {mismatch}")
    firsts = [list(lq) for lq in lens_q]
    if causal and sharding == "zigzag":
        for b in range(len(lens_q[0])):
            total = sum(lq[b] for lq in lens_q)
            sizes = zigzag_chunk_sizes(total, world)
            want = [sizes[r] + sizes[2 * world - 1 - r] for r in range(world)]
            got = [lq[b] for lq in lens_q]
            if got != want:
                seq = f" of sequence {b}" if varlen else ""
                raise ValueError(
                    f"ring attention: shard lengths{seq} {got} do not match a zigzag sharding of {total} tokens "
                    f"over {world} ranks, which gives {want} (chunks {sizes}); shard with "
                    "flashlab.distributed.zigzag_shard / shard_varlen(sharding='zigzag')")
            for r in range(world):
                firsts[r][b] = sizes[r]
    layouts = []
    for r, (cq, ck) in enumerate(cus):
        seq_q = tuple((a, b - a) for a, b in zip(cq, cq[1:]))
        seq_k = tuple((a, b - a) for a, b in zip(ck, ck[1:]))
        layouts.append(RankLayout(seq_q, seq_k, tuple(firsts[r]), tuple(firsts[r])))
    return Plan(rank, world, causal, sharding, tuple(layouts), varlen)
