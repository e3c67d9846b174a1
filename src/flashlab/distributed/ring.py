"""The ring engine: K/V rotation overlapped with compute, the LSE merge, and the backward.

Forward, on every rank, for step s = 0 .. W-1:
  1. post a batched isend/irecv (``dist.batch_isend_irecv``): send the K/V shard held now to the
     next rank, receive the following one from the previous rank;
  2. compute this step's pieces (plan.py) with the held K/V → partial (out, lse);
  3. merge them into fp32 accumulators exactly through the log-sum-exp:
     ``lse = logaddexp(lse_acc, lse_p)``, ``out = out_acc·e^(lse_acc-lse) + out_p·e^(lse_p-lse)``;
  4. wait for the transfer, swap buffers.
Backward: each piece's (dq, dk, dv) from the *global* out and lse, so its P is its slice of the
global softmax and every contribution is exact. dq accumulates locally in fp32; dK/dV accumulate
in an fp32 buffer that travels with its K/V shard and arrives back at its owner after W hops;
each hop's transfer overlaps the next step's compute.

``method="allgather"`` runs the same schedule on K/V gathered up front (one all-gather) and
returns dK/dV through one fp32 reduce-scatter: simpler traffic, O(seqlen) K/V memory per GPU.
``"local"`` (benchmark only) reuses the local K/V at every step: the compute without communication.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flashlab.distributed._local import (
    Packed,
    local_backward,
    local_forward,
    uses_kernels,
    varlen_backward,
    varlen_forward,
)
from flashlab.distributed.plan import Plan, all_gather_single

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Ring:
    """Group, plan and options shared by forward and backward."""

    group: dist.ProcessGroup | None
    plan: Plan
    softmax_scale: float
    method: str  # "ring", "allgather" or "local" (benchmark: no communication)
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # step → units

    @property
    def next_peer(self) -> int:
        return dist.get_global_rank(self._group(), (self.plan.rank + 1) % self.plan.world_size)

    @property
    def prev_peer(self) -> int:
        return dist.get_global_rank(self._group(), (self.plan.rank - 1) % self.plan.world_size)

    def _group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list[dist.Work]:
        """Post sends to the next rank and receives from the previous one as one batch."""
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group) for t in send if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.prev_peer, self.group) for t in recv if t.numel()]
        return dist.batch_isend_irecv(ops) if ops else []


@dataclass(frozen=True)
class Unit:
    """One attention call of a step: q rows × k rows along the sequence dim (slices, or index
    tensors where packed pieces are not adjacent); ``packed`` set for a single varlen call."""

    q: slice | torch.Tensor
    k: slice | torch.Tensor
    causal: bool
    packed: Packed | None = None


def _rows(ranges: list[tuple[int, int]], device: torch.device) -> slice | torch.Tensor:
    if all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:])):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([sum(lengths[:i]) for i in range(len(lengths) + 1)], dtype=torch.int32, device=device)


def units(ring: Ring, step: int, q: torch.Tensor) -> list[Unit]:
    """The step's pieces as calls: one per piece, or (varlen on the kernel path) one varlen call."""
    device = q.device
    key = (step, str(device))
    if key not in ring.cache:
        pieces = ring.plan.pieces(step)
        if ring.plan.varlen and len(pieces) > 1 and uses_kernels(q):
            lq, lk = [p.q1 - p.q0 for p in pieces], [p.k1 - p.k0 for p in pieces]
            packed = Packed(_offsets(lq, device), _offsets(lk, device), max(lq), max(lk))
            ring.cache[key] = [Unit(_rows([(p.q0, p.q1) for p in pieces], device),
                                    _rows([(p.k0, p.k1) for p in pieces], device), pieces[0].causal, packed)]
        else:
            ring.cache[key] = [Unit(p.q, p.k, p.causal) for p in pieces]
    return ring.cache[key]


def _take(t: torch.Tensor, rows: slice | torch.Tensor, dim: int) -> torch.Tensor:
    if isinstance(rows, slice):
        return t.narrow(dim, rows.start, rows.stop - rows.start)
    return t.index_select(dim, rows)


def _add_rows(t: torch.Tensor, rows: slice | torch.Tensor, value: torch.Tensor, dim: int) -> None:
    if isinstance(rows, slice):
        t.narrow(dim, rows.start, rows.stop - rows.start).add_(value)
    else:
        t.index_add_(dim, rows, value.to(t.dtype))


def _kv_shape(k: torch.Tensor, seqlen: int) -> tuple[int, ...]:
    return (k.shape[0], seqlen, *k.shape[2:])


def kv_source(ring: Ring, k: torch.Tensor, v: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(step, k_held, v_held)`` for every step, communicating as ``ring.method`` says."""
    plan, world = ring.plan, ring.plan.world_size
    if ring.method == "allgather" and world > 1:
        kv = gather_padded(ring, torch.stack((k, v)))  # (W, 2, batch, max_seqlen_k, kv_heads, head_dim)
        for step in range(world):
            n = plan.kv_len(plan.src(step))
            yield step, kv[plan.src(step), 0, :, :n], kv[plan.src(step), 1, :, :n]
        return
    if ring.method == "local" or world == 1:
        for step in range(world):
            n = plan.kv_len(plan.src(step))
            yield step, _resized(k, n), _resized(v, n)
        return
    k_cur, v_cur = k.contiguous(), v.contiguous()
    for step in range(world):
        works: list[dist.Work] = []
        if step + 1 < world:
            shape = _kv_shape(k, plan.kv_len(plan.src(step + 1)))
            k_next, v_next = k.new_empty(shape), v.new_empty(shape)
            works = ring.exchange([k_cur, v_cur], [k_next, v_next])
        yield step, k_cur, v_cur
        for w in works:
            w.wait()
        if step + 1 < world:
            k_cur, v_cur = k_next, v_next


def _resized(t: torch.Tensor, n: int) -> torch.Tensor:
    if n <= t.shape[1]:
        return t[:, :n]
    return torch.cat([t, t.new_zeros(_kv_shape(t, n - t.shape[1]))], dim=1)


def gather_padded(ring: Ring, kv: torch.Tensor) -> torch.Tensor:
    """All-gather (2, batch, seqlen_k, ...) shards padded to the longest: (W, 2, batch, max, ...)."""
    longest = max(ring.plan.kv_len(r) for r in range(ring.plan.world_size))
    if kv.shape[2] != longest:
        pad = kv.new_zeros(kv.shape[0], kv.shape[1], longest - kv.shape[2], *kv.shape[3:])
        kv = torch.cat([kv, pad], dim=2)
    world = ring.plan.world_size
    out = kv.new_empty(world * kv.shape[0], *kv.shape[1:])  # concatenated along dim 0, as collectives want
    all_gather_single(out, kv.contiguous(), group=ring.group)
    return out.view(world, *kv.shape)


class DkvSink:
    """Collects dK/dV contributions (fp32) per step and delivers this rank's dK/dV at the end.

    ring: the buffer travels with its K/V shard (one batched send/recv per step, overlapped with the
    next step's compute) and is back at its owner after W hops. allgather: one slot per source
    rank, summed onto the owners by a reduce-scatter. local / world size 1: one local buffer.
    """

    def __init__(self, ring: Ring, k: torch.Tensor) -> None:
        self.ring, self.k = ring, k
        plan = ring.plan
        self.longest = max(plan.kv_len(r) for r in range(plan.world_size))
        self.mode = ring.method if plan.world_size > 1 else "local"
        self.pending: tuple[list[dist.Work], torch.Tensor, torch.Tensor] | None = None
        if self.mode == "allgather":
            self.acc = self._zeros(self.longest, plan.world_size)
        elif self.mode == "local":
            self.acc = self._zeros(self.longest)

    def _zeros(self, n: int, *lead: int) -> torch.Tensor:
        return torch.zeros(*lead, 2, *_kv_shape(self.k, n), dtype=torch.float32, device=self.k.device)

    def add(self, step: int, parts: list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Add a step's ``(k rows, dk, dv)`` pieces for the K/V held at ``step``, then pass it on."""
        plan = self.ring.plan
        if self.mode == "allgather":
            acc = self.acc[plan.src(step)]
        elif self.mode == "local":
            acc = self.acc
        elif step == 0:
            acc = self._zeros(self.k.shape[1])
        else:
            works, acc = self.pending[0], self.pending[1]  # type: ignore[index]
            self.pending = None  # drops the buffer sent last step (its send completes in the wait)
            for w in works:
                w.wait()
        for rows, dk, dv in parts:
            _add_rows(acc[0], rows, dk, 1)
            _add_rows(acc[1], rows, dv, 1)
        if self.mode == "ring":
            # Receive the buffer of the shard held next (after step W-1: our own, home again).
            shape = (2, *_kv_shape(self.k, plan.kv_len(plan.src(step + 1))))
            incoming = torch.empty(shape, dtype=torch.float32, device=self.k.device)
            self.pending = (self.ring.exchange([acc], [incoming]), incoming, acc)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (dk, dv), fp32, shaped like its K/V shard."""
        n = self.k.shape[1]
        if self.mode == "ring":
            works, acc, _ = self.pending  # type: ignore[misc]
            for w in works:
                w.wait()
        elif self.mode == "allgather":
            acc = self.acc.new_empty(self.acc.shape[1:])
            reduce_scatter_sum(self.ring, acc, self.acc)
            acc = acc[:, :, :n]
        else:
            acc = self.acc[:, :, :n]
        return acc[0], acc[1]


def reduce_scatter_sum(ring: Ring, out: torch.Tensor, full: torch.Tensor) -> None:
    """``out = sum over ranks of full[this rank]`` (full: (W, *out.shape)), a reduce-scatter.

    CPU tensors (gloo, the test path; its reduce-scatter support varies across torch versions): an
    all-reduce that keeps this rank's slot (twice the traffic, same result).
    """
    if not full.is_cuda:
        dist.all_reduce(full, group=ring.group)
        out.copy_(full[ring.plan.rank])
        return
    _reduce_scatter_single(out, full.reshape(-1, *out.shape[1:]).contiguous(), group=ring.group)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_p: torch.Tensor, lse_p: torch.Tensor) -> None:
    """Merge a partial result into the accumulators, in place, exactly through the LSE.

    out_acc: fp32 (batch, seqlen, heads, head_dim) view; lse_acc: fp32 (batch, heads, seqlen) view;
    out_p, lse_p: the partial result for the same rows. Rows with lse -inf (no key seen yet)
    contribute nothing and never produce NaN.
    """
    lse_new = torch.logaddexp(lse_acc, lse_p)
    safe = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
    w_old = torch.exp(lse_acc - safe).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse_p - safe).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_old).addcmul_(out_p, w_new)  # no fp32 copy of the partial output
    lse_acc.copy_(lse_new)


def ring_forward(ring: Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse fp32 (batch, heads, seqlen_q)) of local queries against all keys."""
    batch, seqlen_q, heads, _ = q.shape
    out = torch.zeros(*q.shape[:3], v.shape[3], dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    scale = ring.softmax_scale
    for step, k_held, v_held in kv_source(ring, k, v):
        for u in units(ring, step, q):
            q_u, k_u, v_u = _take(q, u.q, 1), _take(k_held, u.k, 1), _take(v_held, u.k, 1)
            if u.packed is None:
                o, lse_p = local_forward(q_u, k_u, v_u, scale, u.causal)
            else:
                o, lse_p = varlen_forward(q_u[0], k_u[0], v_u[0], u.packed, scale, u.causal)
                o, lse_p = o.unsqueeze(0), lse_p.unsqueeze(0)
            if isinstance(u.q, slice):
                merge_(out[:, u.q], lse[:, :, u.q], o, lse_p)
            else:  # gather, merge, scatter back
                out_u, lse_u = out.index_select(1, u.q), lse.index_select(2, u.q)
                merge_(out_u, lse_u, o, lse_p)
                out.index_copy_(1, u.q, out_u)
                lse.index_copy_(2, u.q, lse_u)
    return out.to(q.dtype), lse


def ring_backward(
    ring: Ring,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this rank's shards; fp32 accumulation, cast to the inputs' dtypes."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    sink = DkvSink(ring, k)
    scale = ring.softmax_scale
    for step, k_held, v_held in kv_source(ring, k, v):
        parts = []
        for u in units(ring, step, q):
            do_u, q_u, out_u = (_take(t, u.q, 1) for t in (dout, q, out))
            lse_u, dlse_u = _take(lse, u.q, 2), None if dlse is None else _take(dlse, u.q, 2)
            k_u, v_u = _take(k_held, u.k, 1), _take(v_held, u.k, 1)
            if u.packed is None:
                grads = local_backward(do_u, q_u, k_u, v_u, out_u, lse_u, dlse_u, scale, u.causal)
            else:
                grads = varlen_backward(do_u[0], q_u[0], k_u[0], v_u[0], out_u[0], lse_u[0],
                                        None if dlse_u is None else dlse_u[0], u.packed, scale, u.causal)
                grads = tuple(g.unsqueeze(0) for g in grads)
            _add_rows(dq, u.q, grads[0], 1)
            parts.append((u.k, grads[1], grads[2]))
        sink.add(step, parts)
    dk, dv = sink.finish()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Differentiable ``(out, lse)`` of ring attention on (batch, seqlen, heads, head_dim) shards."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring):  # type: ignore[override]
        out, lse = ring_forward(ring, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        # Every rank must take part in the backward's communication, even with no gradient here.
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = ring_backward(ctx.ring, dout, q, k, v, out, lse, dlse)
        return dq, dk, dv, None
