"""Public functions: context-parallel (ring) attention on sequence shards over torch.distributed."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from flashlab.checks import accepted_dtypes
from flashlab.distributed._local import uses_kernels
from flashlab.distributed.plan import METHODS, Plan, build_plan
from flashlab.distributed.ring import Ring, RingAttention
from flashlab.distributed.sharding import check_sharding

MAX_HEAD_DIM = 256


def _check_group(group: dist.ProcessGroup | None) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ring attention needs torch.distributed: call torch.distributed.init_process_group "
                           "first (launch with torchrun; backend 'nccl' for CUDA tensors, 'gloo' for CPU)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")


def _check_tensors(q: object, k: object, v: object, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    allowed = accepted_dtypes(uses_kernels(q))
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; accepted on {q.device.type}: {', '.join(map(str, allowed))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"q and k must share a head_dim in 1..{MAX_HEAD_DIM}, got {q.shape[-1]} and {k.shape[-1]}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")


def _check_options(q: torch.Tensor, group: dist.ProcessGroup | None, softmax_scale: float | None, method: str,
                   sharding: str) -> float:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    check_sharding(sharding)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise TypeError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if str(dist.get_backend(group)) == "nccl" and not q.is_cuda:
        raise ValueError(f"the group's backend is NCCL but q is on {q.device}: NCCL needs CUDA tensors "
                         "(use a gloo group for CPU tensors)")
    return float(softmax_scale)


def _fields(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, method: str, sharding: str,
            varlen: bool, nseq: int) -> dict[str, object]:
    return {"varlen": varlen, "batch": 1 if varlen else q.shape[0], "seqlen_q": q.shape[-3],
            "seqlen_k": k.shape[-3], "heads": q.shape[-2], "kv_heads": k.shape[-2], "head_dim": q.shape[-1],
            "dtype": q.dtype, "causal": bool(causal), "sharding": sharding, "method": method, "nseq": nseq,
            "softmax_scale": scale}


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, plan: Plan,
         scale: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    return RingAttention.apply(q, k, v, Ring(group, plan, scale, method))


def ring_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    method: str = "ring",
    sharding: str = "contiguous",
    return_attn_probs: bool = False,
):
    """Exact attention over a sequence sharded across the ranks of ``group`` (context parallel).

    Collective: every rank of ``group`` calls it with its own shard, in the same order.

    Args:
        q: (batch, seqlen_q_local, heads, head_dim) — this rank's shard of the queries, layout of
            ``flash_attn_func``. fp16/bf16 (CUDA, NCCL); on CPU (gloo) also fp32/fp64.
        k, v: (batch, seqlen_k_local, kv_heads, head_dim) — this rank's shard of the keys/values.
            GQA/MQA: ``heads % kv_heads == 0``; query head h reads kv head ``h // (heads // kv_heads)``.
        group: the process group the sequence is sharded over (default: the world).
        causal: causal mask over the *global* sequence: global query i sees global key j iff j <= i
            (q and k shards must then hold the same tokens: equal local lengths on every rank).
        softmax_scale: default ``1 / sqrt(head_dim)``.
        method: ``"ring"`` (default; K/V rotate with batched isend/irecv overlapped with compute,
            O(seqlen / W) memory) or ``"allgather"`` (gather all K/V first, reduce-scatter dK/dV;
            O(seqlen) K/V memory per GPU, fewer and larger messages).
        sharding: how the global sequence was split — ``"contiguous"`` (rank r holds the r-th
            piece; ``flashlab.distributed.shard_sequence``) or ``"zigzag"`` (chunks r and 2W-1-r;
            ``zigzag_shard``: equal causal work on every rank). Only matters when ``causal=True``;
            it must describe the actual shards or the causal result is wrong. Shard lengths may
            differ across ranks (contiguous), or follow ``zigzag_shard``'s split of any length.
        return_attn_probs: if True return ``(out, lse, None)`` like ``flash_attn_func``.

    Returns:
        out: (batch, seqlen_q_local, heads, head_dim), this rank's rows of the global attention
        output, dtype of q, differentiable w.r.t. q, k, v (the backward is collective too).
        lse (with ``return_attn_probs``): fp32 (batch, heads, seqlen_q_local), natural log.

    Raises ValueError/TypeError on every rank (not only the one with the bad input) for bad shapes,
    dtypes, options, ranks that disagree, or shard lengths that do not match ``sharding``.
    """
    _check_group(group)
    error, fields, scale = None, {}, 1.0
    try:
        _check_tensors(q, k, v, 4, "(batch, seqlen, heads, head_dim)")
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"batch size of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
        scale = _check_options(q, group, softmax_scale, method, sharding)
        fields = _fields(q, k, causal, scale, method, sharding, varlen=False, nseq=1)
    except (TypeError, ValueError) as e:
        error = e
    plan = build_plan(group, error, fields)
    out, lse = _run(q, k, v, group, plan, scale, method)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    method: str = "ring",
    sharding: str = "contiguous",
    return_attn_probs: bool = False,
):
    """Ring attention on packed variable-length sequences, each sharded across the group.

    Every sequence of the batch is split across the ranks (``shard_varlen``: contiguous or zigzag,
    sequence by sequence); each rank packs its pieces in batch order.

    Args:
        q: (total_q_local, heads, head_dim); k, v: (total_k_local, kv_heads, head_dim).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) integer offsets of this rank's pieces in q and k
            (``shard_varlen``'s second output); same batch on every rank. Read on the host.
        group, causal, softmax_scale, method, sharding, return_attn_probs: as ``ring_flash_attn_func``.

    Returns:
        out (total_q_local, heads, head_dim); with ``return_attn_probs`` ``(out, lse, None)``,
        lse fp32 (heads, total_q_local) as flash-attn's varlen functions return it.

    Each step computes one piece per sequence (a kernel call each on the kernel path).
    """
    _check_group(group)
    error, fields, scale, cu_q, cu_k = None, {}, 1.0, None, None
    try:
        _check_tensors(q, k, v, 3, "(total_tokens, heads, head_dim)")
        scale = _check_options(q, group, softmax_scale, method, sharding)
        cu_q, cu_k = _cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0]), _cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
        if len(cu_q) != len(cu_k):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                             f"{len(cu_q)} and {len(cu_k)}")
        fields = _fields(q, k, causal, scale, method, sharding, varlen=True, nseq=len(cu_q) - 1)
    except (TypeError, ValueError) as e:
        error = e
    plan = build_plan(group, error, fields, cu_q, cu_k)
    out, lse = _run(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), group, plan, scale, method)
    out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse, None) if return_attn_probs else out


def _cu(cu: object, name: str, total: int) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.is_floating_point():
        raise TypeError(f"{name} must be a 1-D integer tensor of batch + 1 offsets, got "
                        f"{type(cu).__name__ if not isinstance(cu, torch.Tensor) else (cu.dtype, tuple(cu.shape))}")
    values = [int(c) for c in cu.tolist()]
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])) or values[-1] != total:
        raise ValueError(f"{name} must run from 0, non-decreasing, to the local token count {total}; got {values}")
    return values


__all__ = ["ring_flash_attn_func", "ring_flash_attn_varlen_func"]
