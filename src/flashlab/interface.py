"""Public attention functions: argument checks, layouts, defaults and the choice of path.

Paths: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernels through
the ``flashlab::attn_fwd`` op; other CPU tensors run ``blockwise.py``, the same online-softmax
algorithm in PyTorch ops (causal, GQA and variable length; the other options need the kernels).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from flashlab import checks
from flashlab.block_mask import BlockMask, check_block_mask
from flashlab.kernels.configs import interpreting
from flashlab.ops import AttentionOptions, attention_forward, dropout_pattern
from flashlab.philox import dense_dropout_pattern


class _NothingToAttend(torch.autograd.Function):
    """seqlen_q or seqlen_k is 0: the output is zeros (not NaN) and so are the gradients."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return q.new_zeros(q.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels are stride-generic except along head_dim, where loads must be contiguous.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _uses_kernels(t: torch.Tensor) -> bool:
    # Called before the argument checks: a non-tensor gets the kernels' dtypes, then check_qkv's TypeError.
    return not isinstance(t, torch.Tensor) or t.is_cuda or interpreting()


def _dropout_seed(dropout_p: float) -> int:
    # Drawn from torch's default generator, so torch.manual_seed reproduces a run. While tracing
    # (torch.compile), seeded.py's op draws it at run time instead: .item() would break the graph.
    if dropout_p <= 0 or torch.compiler.is_compiling():
        return 0
    return int(torch.randint(0, 2**62, (1,)).item())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
              bottom_right: bool, options: AttentionOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch checked inputs — dense (batch, seqlen, heads, dim) views, or packed (total, heads,
    dim) with ``options.cu_seqlens_*`` — to the kernels or the CPU path. Returns (out, lse)."""
    options = options or AttentionOptions()
    varlen = options.cu_seqlens_q is not None
    heads = q.shape[-2]
    if q.shape[-3] == 0 or k.shape[-3] == 0:
        lse_shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])
        lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
        return _NothingToAttend.apply(q, k, v), lse
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if _uses_kernels(q):
        if options.dropout_p > 0 and torch.compiler.is_compiling():
            from flashlab.seeded import seeded_attention_forward

            return seeded_attention_forward(q, k, v, softmax_scale, causal, bottom_right, options)
        return attention_forward(q, k, v, softmax_scale, causal, bottom_right, options)
    from flashlab.cpu_path import cpu_attention

    return cpu_attention(q, k, v, softmax_scale, causal, bottom_right, options)


def _feature_options(q: torch.Tensor, batch: int, window_size, softcap, alibi_slopes, dropout_p,
                     **varlen) -> AttentionOptions:
    left, right = checks.check_window(window_size)
    p = checks.check_dropout(dropout_p)
    return AttentionOptions(window_left=left, window_right=right, softcap=checks.check_softcap(softcap),
                            alibi_slopes=checks.check_alibi(alibi_slopes, batch, q.shape[-2], q.device),
                            dropout_p=p, seed=_dropout_seed(p), **varlen)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_mask: BlockMask | None = None,
):
    """Exact attention, flash-attn's ``flash_attn_func`` signature and semantics.

    Args:
        q: (batch, seqlen_q, heads, head_dim), fp16 or bf16 (CPU path: also fp32, fp64).
        k, v: (batch, seqlen_k, kv_heads, head_dim); ``heads % kv_heads == 0`` (GQA/MQA: query
            head ``h`` attends with kv head ``h // (heads // kv_heads)``; k/v are never expanded).
        dropout_p: probability of dropping an attention weight (training); the pattern comes from
            Philox seeded by torch's default generator (``torch.manual_seed`` reproduces it) and
            the backward regenerates it. Pass 0.0 at evaluation.
        softmax_scale: scale of QKᵀ before the softmax; default ``1 / sqrt(head_dim)``.
        causal: causal mask aligned to the bottom-right corner: query ``i`` sees key ``j`` iff
            ``j <= i + seqlen_k - seqlen_q``. A query that sees no key returns zeros.
        window_size: (left, right) sliding window: query ``i`` sees keys in
            ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]``; -1 is unbounded.
            Blocks outside the window are skipped, so cost grows linearly with seqlen.
        softcap: if > 0, scores become ``softcap · tanh(scores / softcap)`` before the softmax.
        alibi_slopes: fp32 (heads,) or (batch, heads); adds ``-slope · |i + seqlen_k - seqlen_q - j|``.
        deterministic: if True, gradients are bit-identical run to run. Only the Hopper backward at
            head dim 128, causal, from 8k tokens sums dQ with fp32 atomics (one fused kernel, faster:
            docs/performance.md); True (or ``torch.use_deterministic_algorithms(True)``) keeps it on
            the deterministic two-kernel backward. Every other call is deterministic anyway.
        return_attn_probs: if True, return ``(out, softmax_lse, dropout_keep)``; ``softmax_lse`` is
            fp32, natural log, (batch, heads, seqlen_q), -inf for rows that see no key;
            ``dropout_keep`` is the bool (batch, heads, seqlen_q, seqlen_k) pattern of kept weights
            when ``dropout_p > 0`` (for testing; it is seqlen²) and None otherwise.
        block_mask: a :class:`flashlab.BlockMask` from :func:`flashlab.block_mask` (flashlab's
            extension): fully masked blocks are skipped, fully visible ones run mask-free. Not
            combinable with causal / window_size (put them in the predicate).

    Returns:
        out: (batch, seqlen_q, heads, head_dim), dtype of q. Differentiable w.r.t. q, k, v.

    Any seqlen ≥ 0 and head_dim 1..256 work; inputs may be strided views (e.g. slices of a packed
    qkv tensor) and are not copied unless the head dim is not unit-stride.
    """
    kernels = _uses_kernels(q)
    checks.check_qkv(q, k, v, ("q", "k", "v"), rank=4, head_axis=2, allowed_dtypes=checks.accepted_dtypes(kernels),
                     kernels=kernels)
    scale = checks.resolve_scale(softmax_scale, q.shape[-1], "softmax_scale")
    options = _feature_options(q, q.shape[0], window_size, softcap, alibi_slopes, dropout_p,
                               deterministic=bool(deterministic))
    if block_mask is not None:
        conflicts = {"causal": bool(causal), "window_size": (options.window_left, options.window_right) != (-1, -1)}
        bm = check_block_mask(block_mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device, conflicts)
        options = replace(options, block_mask=bm)
    out, lse = attention(q, k, v, scale, bool(causal), True, options)
    if return_attn_probs:
        keep = None
        if options.dropout_p and torch.compiler.is_compiling():
            raise NotImplementedError("return_attn_probs=True with dropout_p > 0 (the dropout pattern) is not "
                                      "available under torch.compile; call it eagerly")
        if options.dropout_p:
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            keep = (dropout_pattern(*shape, options, q.device) if _uses_kernels(q) else
                    dense_dropout_pattern(options.seed, options.dropout_p, *shape))
        return out, lse, keep
    return out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Attention over a packed batch of variable-length sequences (flash-attn's semantics).

    Args:
        q: (total_q, heads, head_dim) — sequence b is rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``.
        k, v: (total_k, kv_heads, head_dim), likewise with ``cu_seqlens_k``.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), starting at 0, non-decreasing (sequences
            of length 0 are allowed).
        max_seqlen_q, max_seqlen_k: ints ≥ the longest sequence (they size the launch grid).
        Other arguments as in :func:`flash_attn_func`; causal and windows align each sequence's
        own bottom-right corner; alibi_slopes (heads,) or (batch, heads).

    Returns ``out`` (total_q, heads, head_dim), or ``(out, softmax_lse, None)`` with
    ``softmax_lse`` (heads, total_q) when ``return_attn_probs``. No padding is materialized.
    """
    kernels = _uses_kernels(q)
    checks.check_qkv(q, k, v, ("q", "k", "v"), rank=3, head_axis=1, allowed_dtypes=checks.accepted_dtypes(kernels),
                     batch_axis=None, kernels=kernels)
    cu_q, _ = checks.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q",
                                      q.device)
    cu_k, _ = checks.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k",
                                      q.device)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_q.numel()} and {cu_k.numel()}")
    scale = checks.resolve_scale(softmax_scale, q.shape[-1], "softmax_scale")
    options = _feature_options(q, cu_q.numel() - 1, window_size, softcap, alibi_slopes, dropout_p,
                               cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(max_seqlen_q, 1),
                               max_seqlen_k=max(max_seqlen_k, 1))
    out, lse = attention(q, k, v, scale, bool(causal), True, options)
    return (out, lse, None) if return_attn_probs else out


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    block_mask: BlockMask | None = None,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (batch, heads, seqlen_q, head_dim); also (heads, seqlen, head_dim) or any number of
            leading batch dims, as PyTorch accepts.
        key, value: (batch, kv_heads, seqlen_k, head_dim); ``kv_heads != heads`` needs
            ``enable_gqa=True`` (as in PyTorch).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            (batch, heads, seqlen_q, seqlen_k), as PyTorch defines it. A row with nothing to attend
            returns zeros (PyTorch returns NaN).
        dropout_p: dropout on the attention weights (as in :func:`flash_attn_func`).
        is_causal: causal mask aligned to the top-left corner, as PyTorch defines it: query ``i``
            sees key ``j`` iff ``j <= i``. Cannot be combined with attn_mask (as in PyTorch).
        scale: default ``1 / sqrt(head_dim)``.
        block_mask: a :class:`flashlab.BlockMask` (flashlab's extension, like FlexAttention's
            ``block_mask``); not combinable with attn_mask or is_causal.

    dtypes: fp16 and bf16 everywhere. fp32/fp64 run only on the CPU path (no GPU kernel for them:
    ``TypeError`` on CUDA tensors — cast to bf16/fp16 or use PyTorch's SDPA).

    Returns (batch, heads, seqlen_q, head_dim) in the dtype of query, differentiable.
    """
    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dimensions (heads, seqlen, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key, value must have the same rank, got {query.dim()}, {key.dim()}, "
                         f"{value.dim()}")
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(f"leading (batch) dims of query {tuple(lead)}, key {tuple(key.shape[:-3])} and "
                         f"value {tuple(value.shape[:-3])} differ")
    four_d = query.dim() == 4  # the common case needs no reshapes (each costs host time at short sequences)
    q, k, v = (query, key, value) if four_d else (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    kernels = _uses_kernels(q)
    checks.check_qkv(q, k, v, ("query", "key", "value"), rank=4, head_axis=1,
                     allowed_dtypes=checks.accepted_dtypes(kernels), kernels=kernels)
    batch, heads, seqlen_q, _ = q.shape
    if heads != k.shape[1] and not enable_gqa:
        raise ValueError(f"query has {heads} heads and key/value {k.shape[1]}: pass enable_gqa=True "
                         "for grouped-query attention")
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as in PyTorch)")
    mask = None
    if attn_mask is not None:
        full = (*lead, heads, seqlen_q, k.shape[2])
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() <= len(full):
            try:
                attn_mask = attn_mask.expand(full).reshape(batch, heads, seqlen_q, k.shape[2])
            except RuntimeError:
                pass  # check_attn_mask reports the shape
        mask = checks.check_attn_mask(attn_mask, batch, heads, seqlen_q, k.shape[2], q.device)
    p = checks.check_dropout(dropout_p)
    conflicts = {"attn_mask": attn_mask is not None, "is_causal": bool(is_causal)}
    bm = check_block_mask(block_mask, batch, heads, seqlen_q, k.shape[2], q.device, conflicts)
    options = AttentionOptions(attn_mask=mask, dropout_p=p, seed=_dropout_seed(p), block_mask=bm)
    softmax_scale = checks.resolve_scale(scale, q.shape[-1], "scale")
    out, _ = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale, bool(is_causal),
                       False, options)
    out = out.transpose(1, 2)
    return out if four_d else out.reshape(*lead, *out.shape[1:])
