"""Inference: attention of a few new tokens against a KV cache, with in-place append (flash-decoding).

``flash_attn_with_kvcache`` follows flash-attn's function of the same name. Host side only:
argument checks, the split-count heuristic and two ``torch.library`` ops that launch the kernels of
``kernels/decode.py``:

* ``flashlab::kvcache_append`` (mutates ``k_cache``/``v_cache``): writes new k/v at
  ``cache_seqlens[b] ..`` (through the block table for a paged cache);
* ``flashlab::kvcache_attn``: split-KV attention + log-sum-exp combine, returns ``(out, lse)``.

CPU tensors outside Triton's interpreter take a PyTorch path (gather + ``blockwise_attention``).
"""

from __future__ import annotations

import math
import os

import torch
from torch.library import wrap_triton

from flashlab import checks, launch_plans
from flashlab.decode_tiles import MAX_SPLITS, MIN_SPLIT_KEYS, choose_num_splits, decode_config
from flashlab.kernels.configs import cdiv, device_capability, interpreting, next_power_of_2, num_sms, padded_head_dim
from flashlab.kvcache_checks import check_index, check_rotary, check_tensor, check_values
from flashlab.kvcache_torch import append_torch, attend_torch
from flashlab.library import kernel_op, kvcache_append_fake, kvcache_attn_fake
from flashlab.rotary import rotate_at_positions

MAX_HEAD_DIM = 256


def _grid_rows(q: torch.Tensor, kv_heads: int) -> int:
    return q.shape[1] * (q.shape[2] // kv_heads)


def _capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


def _index_args(cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None,
                block_table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    # Absent index tensors are replaced by a dummy pointer; the kernel's constexpr flags skip them.
    bt = block_table if block_table is not None else cache_seqlens
    return (cache_batch_idx if cache_batch_idx is not None else cache_seqlens, bt,
            block_table.stride(0) if block_table is not None else 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether the combine kernel launches as a programmatic dependent of the split kernel (its
    launch overlapping that kernel's tail): opt-in with ``FLASHLAB_DECODE_PDL=1`` until measured, and
    only on a Hopper-class GPU (not under the interpreter)."""
    if os.environ.get("FLASHLAB_DECODE_PDL", "0") != "1" or device.type != "cuda" or interpreting():
        return False
    return device_capability(device)[0] >= 9


def _traced_launch(kernel, grid: tuple[int, ...], *args: object, **named: object) -> None:
    """A launch inside a traced op (fake or functional tensors, torch.compile): through wrap_triton."""
    wrap_triton(kernel)[grid](*args, **named)


def _eager(like: torch.Tensor) -> bool:
    return type(like) is torch.Tensor and not torch.compiler.is_compiling()


def _signature(*tensors: torch.Tensor | None) -> tuple:
    """What the launch arguments derive from besides the scalars: layouts and the config function."""
    return (decode_config, *launch_plans.layout(*tensors))


def _run(signature: tuple | None, tensors: tuple, launches, like: torch.Tensor) -> None:
    """``launches(launch_fn)``: replayed from a launch plan in eager calls (launch_plans.py; the
    dispatcher and Triton's argument binding cost more than a short decoding kernel runs), through
    wrap_triton while traced."""
    if _eager(like):
        launch_plans.run(signature, tensors, launches)
    else:
        launches(_traced_launch)


def _append_impl(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None,
                 block_table: torch.Tensor | None) -> None:
    """k_cache/v_cache ← k/v (batch, seqlen_new, kv_heads, head_dim) at cache_seqlens[b] + i."""
    tensors = (k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table)
    _run(_signature(*tensors), tensors, lambda launch_fn: _append_launches(*tensors, launch_fn), k)


def _append_launches(k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, launch_fn) -> None:
    from flashlab.kernels import decode as kernels  # here: importing flashlab needs no Triton
    batch, seqlen_new, kv_heads, _ = k.shape
    head_dim, page_size = int(k.shape[3]), int(k_cache.shape[1])  # constexprs: specialized under dynamic shapes
    batch_idx, bt, stride_btb = _index_args(cache_seqlens, cache_batch_idx, block_table)
    block_s = 16
    launch_fn(
        kernels.kvcache_append_kernel, (cdiv(seqlen_new, block_s), kv_heads, batch),
        k, v, k_cache, v_cache, cache_seqlens, batch_idx, bt,
        *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        stride_btb, seqlen_new, _capacity(k_cache, block_table),
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_S=block_s, PAGE_SIZE=page_size,
        PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None,
    )


def _attn_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None, seqlen_new: int,
               softmax_scale: float, causal: bool, num_splits: int, min_chunk: int, window_left: int = -1,
               window_right: int = -1, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (batch, seqlen_q, heads, head_dim) in q's dtype, lse fp32 (batch, heads, seqlen_q))."""
    batch, seqlen_q, heads, head_dim = q.shape
    out = torch.empty((batch, seqlen_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if num_splits > 1:
        rows = seqlen_q * heads
        o_part = torch.empty((num_splits, batch, rows, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, batch, rows), dtype=torch.float32, device=q.device)
    else:  # unread without SPLIT: lse (fp32 too) stands in, two allocations fewer on the decoding step
        o_part = lse_part = lse
    tensors = (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, alibi_slopes, out, lse, o_part,
               lse_part)
    scalars = (seqlen_new, softmax_scale, causal, num_splits, min_chunk, window_left, window_right, softcap)
    # The PDL switch changes the launches: part of the plan's signature.
    _run((*_signature(*tensors[:7]), *scalars, num_splits > 1 and pdl_enabled(q.device)), tensors,
         lambda launch_fn: _attn_launches(tensors, scalars, launch_fn), q)
    return out, lse


def _attn_launches(tensors: tuple, scalars: tuple, launch_fn) -> None:
    """The split-KV attention launch and, with splits, the combine launch (``tensors`` / ``scalars``
    as _attn_impl builds them)."""
    from flashlab.kernels import decode as kernels
    q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, alibi_slopes, out, lse, o_part, lse_part = \
        tensors
    seqlen_new, softmax_scale, causal, num_splits, min_chunk, window_left, window_right, softcap = scalars
    batch, seqlen_q, heads, _ = q.shape
    kv_heads = k_cache.shape[2]
    head_dim, page_size = int(q.shape[3]), int(k_cache.shape[1])  # constexprs: specialized under dynamic shapes
    block_d = padded_head_dim(head_dim)
    cfg = decode_config(int(_grid_rows(q, kv_heads)), block_d, block_table is not None, q.device, num_splits)
    m_blocks = cdiv(_grid_rows(q, kv_heads), cfg.block_m)
    min_chunk = cdiv(max(min_chunk, 1), cfg.block_n) * cfg.block_n
    split = num_splits > 1
    rows = seqlen_q * heads
    batch_idx, bt, stride_btb = _index_args(cache_seqlens, cache_batch_idx, block_table)
    capacity = _capacity(k_cache, block_table)
    # ALiBi slopes (heads,) or (batch, heads); absent, cache_seqlens stands in as the unread pointer.
    slopes, slope_strides = cache_seqlens, (0, 0)
    if alibi_slopes is not None:
        slopes = alibi_slopes
        slope_strides = (alibi_slopes.stride(0), alibi_slopes.stride(1)) if alibi_slopes.dim() == 2 else (
            0, alibi_slopes.stride(0))
    right = 0 if causal else window_right
    # Traced launches (wrap_triton) take kernel arguments only: no launch options beside num_warps.
    pdl = split and launch_fn is not _traced_launch and pdl_enabled(q.device)
    launch_fn(
        kernels.decode_attn_kernel, (num_splits, kv_heads * m_blocks, batch),
        q, k_cache, v_cache, out, lse, o_part, lse_part, cache_seqlens, batch_idx, bt, slopes,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3], stride_btb, *slope_strides,
        batch, seqlen_q, seqlen_new, capacity, heads, heads // kv_heads, num_splits, min_chunk, softmax_scale,
        window_left, right, softmax_scale / softcap if softcap > 0 else 0.0, softcap * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size, PAGED=block_table is not None,
        HAS_BATCH_IDX=cache_batch_idx is not None, HAS_UPPER=causal or right >= 0, HAS_LOWER=window_left >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, SPLIT=split, PDL=pdl, **cfg.launch_kwargs(),
    )
    if split:
        launch_fn(
            kernels.decode_combine_kernel, (rows, batch),
            out, lse, o_part, lse_part, cache_seqlens, *out.stride()[:3],
            batch, seqlen_q, seqlen_new, capacity, heads, num_splits, min_chunk, window_left,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=cfg.block_n, SPLITS_P2=next_power_of_2(num_splits),
            HAS_LOWER=window_left >= 0, PDL=pdl,
            num_warps=8 if next_power_of_2(num_splits) * block_d > 8192 else 4,  # the [splits, dim] tile
            **({"launch_pdl": True} if pdl else {}),
        )


# Under torch.compile the kernels are reached through these ops (traced, graph-safe); in eager mode
# the implementations are called directly (see _run): the dispatcher costs ~10-20 µs per op,
# more than a short decoding kernel runs.
kvcache_append = kernel_op("flashlab::kvcache_append", mutates_args={"k_cache", "v_cache"},
                           fake=kvcache_append_fake)(_append_impl)
kvcache_attn = kernel_op("flashlab::kvcache_attn", mutates_args=(), fake=kvcache_attn_fake)(_attn_impl)


def _op(name: str, impl):
    return getattr(torch.ops.flashlab, name) if torch.compiler.is_compiling() else impl


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    check_inputs: bool | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
):
    """Attention of new queries against a KV cache, appending new keys/values in place
    (flash-attn's ``flash_attn_with_kvcache`` semantics).

    Args:
        q: (batch, seqlen_q, heads, head_dim), fp16 or bf16; seqlen_q 1 (decoding) to a few hundred
            (speculative decoding).
        k_cache, v_cache: contiguous layout (batch_cache, seqlen_cache, kv_heads, head_dim), or paged
            (num_blocks, block_size, kv_heads, head_dim) with ``block_table``. Any strides with a
            unit-stride head_dim. ``heads % kv_heads == 0``: query head h reads kv head
            ``h // (heads // kv_heads)`` (GQA/MQA, never expanded).
        k, v: optional new tokens (batch, seqlen_new, kv_heads, head_dim), written into the cache
            *in place* at positions ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1``;
            attention then covers ``cache_seqlens[b] + seqlen_new`` keys.
        cache_seqlens: int or int32 (batch,): tokens already in each sequence's cache. None: every
            cache is full (capacity), which leaves no room for k/v.
        cache_batch_idx: int32 (batch,): the cache row of each batch row (contiguous cache only).
        block_table: int32 (batch, max_blocks): page indices into k_cache/v_cache; key position j of
            sequence b is at ``[block_table[b, j // block_size], j % block_size]``. Any block_size.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        causal: bottom-right aligned over the total key length n = cache_seqlens[b] + seqlen_new:
            query i sees key j iff ``j <= i + n - seqlen_q``. Rows that see no key give 0.
        num_splits: keys of a sequence are split over this many programs and merged by
            log-sum-exp; 0 picks it from batch, kv heads, SM count and the longest cache (at most
            128). Each sequence uses fewer splits when its own cache is short.
        return_softmax_lse: also return the LSE, fp32 (batch, heads, seqlen_q), natural log.
        window_size, softcap, alibi_slopes: as in :func:`flash_attn_func`, aligned like causal (query
            i sits at key position i + n - seqlen_q); alibi_slopes fp32 (heads,) or (batch, heads).
        rotary_cos, rotary_sin: keyword-only, flash-attn's rotary tables (seqlen_ro, rotary_dim / 2):
            the new k is rotated at positions cache_seqlens[b] + i before it is appended, q likewise
            when causal or windowed, else every query at cache_seqlens[b]; the first rotary_dim
            channels are rotated, pairs (i, i + rotary_dim / 2), or (2i, 2i + 1) with
            ``rotary_interleaved`` (flash-attn's default, True). Needs k and v.
        check_inputs: range checks on the *values* of cache_seqlens / cache_batch_idx / block_table
            (cache too small for the new tokens, indices out of range). They need those values on the
            host: None (default) checks them when all are on the host (CPU tensors, an int length)
            and skips them otherwise (no device sync in the decoding step; the kernels still clamp
            lengths to the capacity); True always checks (one sync) and then sizes splits from the real lengths
            instead of the capacity; False never checks.

    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype, or ``(out, softmax_lse)``. Not
        differentiable (inference only).
    """
    check_tensor("q", q, 4)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if k is not None:
        check_tensor("k", k, 4)
        check_tensor("v", v, 4)
        tensors.update(k=k, v=v)
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k_cache, v_cache, k, v must share one")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: they must share a device")
    on_torch_path = q.device.type == "cpu" and not interpreting()
    dtypes = checks.accepted_dtypes(not on_torch_path)
    if q.dtype not in dtypes:
        raise TypeError(f"q has dtype {q.dtype}; accepted: {', '.join(str(d) for d in dtypes)}")
    window_left, window_right = checks.check_window(window_size)
    softcap = checks.check_softcap(softcap)

    batch, seqlen_q, heads, head_dim = q.shape
    alibi_slopes = checks.check_alibi(alibi_slopes, batch, heads, q.device)
    check_rotary(rotary_cos, rotary_sin, head_dim, q.device, k is not None)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    _, cache_len, kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and k_cache ({cache_dim}) differ")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads of q ({heads}) must be a multiple of the kv heads of k_cache ({kv_heads})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and head_dim > 1:
            raise ValueError(f"{name} must be unit-stride along head_dim (it is updated in place, never copied), "
                             f"got strides {t.stride()}")
    seqlen_new = 0
    if k is not None:
        if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k and v must be (batch={batch}, seqlen_new, kv_heads={kv_heads}, "
                             f"head_dim={head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        seqlen_new = k.shape[1]

    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache is addressed "
                             "through the block table only)")
        block_table = check_index("block_table", block_table, (batch, -1), q.device)
        if cache_len < 1:
            raise ValueError("paged k_cache must have block_size >= 1")
    elif cache_batch_idx is not None:
        cache_batch_idx = check_index("cache_batch_idx", cache_batch_idx, (batch,), q.device)
    elif k_cache.shape[0] != batch:
        raise ValueError(f"k_cache has {k_cache.shape[0]} sequences but q has batch {batch}; pass "
                         "cache_batch_idx to map batch rows to cache rows")
    capacity = _capacity(k_cache, block_table)
    if seqlen_new > capacity:
        raise ValueError(f"cache too small: {seqlen_new} new tokens > capacity {capacity}")

    if cache_seqlens is None:
        if k is not None:
            raise ValueError("k/v given without cache_seqlens: cache_seqlens says where to append")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}")
    # Values can be checked for free when every index tensor is on the host (an int length is).
    host_known = all(t is None or t.device.type == "cpu" for t in (
        cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None, cache_batch_idx, block_table))
    if isinstance(cache_seqlens, int):
        seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
        lens_host = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    else:
        seqlens = lens_host = check_index("cache_seqlens", cache_seqlens, (batch,), q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not math.isfinite(
            softmax_scale):
        raise TypeError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")

    # Value checks read the index tensors on the host: never while capturing a CUDA graph or tracing.
    capturing = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    max_keys = capacity
    if (check_inputs or (check_inputs is None and host_known)) and not capturing:
        max_keys = check_values(lens_host, seqlen_new, capacity, cache_batch_idx, k_cache.shape[0], block_table,
                                 cache_len, k_cache.shape[0])
        reach = max_keys - seqlen_new + max(seqlen_new, seqlen_q)  # one past the last rotated position
        if rotary_cos is not None and reach > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions; the new tokens reach "
                             f"position {reach - 1}")
    if rotary_cos is not None:
        # flash-attn's convention: new keys at cache_seqlens + i; queries likewise when causal or windowed,
        # else all at cache_seqlens.
        pos = seqlens.long()[:, None] + torch.arange(max(seqlen_new, seqlen_q), device=q.device)[None, :]
        k = rotate_at_positions(k, rotary_cos, rotary_sin, pos[:, :seqlen_new], bool(rotary_interleaved))
        banded = causal or (window_left, window_right) != (-1, -1)
        q = rotate_at_positions(q, rotary_cos, rotary_sin, pos[:, :seqlen_q] if banded else pos[:, :1].expand(
            batch, seqlen_q), bool(rotary_interleaved))

    if k is not None and on_torch_path:
        append_torch(k, v, k_cache, v_cache, seqlens, cache_batch_idx, block_table)
    elif k is not None:
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        _op("kvcache_append", _append_impl)(k, v, k_cache, v_cache, seqlens, cache_batch_idx, block_table)
    if seqlen_q == 0 or batch == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((batch, heads, 0), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_softmax_lse else out
    if on_torch_path:
        out, lse = attend_torch(q, k_cache, v_cache, seqlens, seqlen_new, cache_batch_idx, block_table,
                                 float(softmax_scale), bool(causal), (window_left, window_right), softcap,
                                 alibi_slopes)
        return (out, lse) if return_softmax_lse else out
    q = q if q.stride(-1) == 1 else q.contiguous()
    cfg = decode_config(_grid_rows(q, kv_heads), padded_head_dim(head_dim), block_table is not None, q.device)
    auto = num_splits == 0
    min_split_keys = cfg.block_n if interpreting() else MIN_SPLIT_KEYS
    if auto:
        if window_left >= 0:  # the kernels split only the keys inside the window (kernels/decode.py)
            max_keys = min(max_keys, window_left + seqlen_q + cfg.block_n)
        m_blocks = cdiv(_grid_rows(q, kv_heads), cfg.block_m)
        num_splits = choose_num_splits(batch, kv_heads, m_blocks, max_keys, num_sms(q.device.index), min_split_keys)
    out, lse = _op("kvcache_attn", _attn_impl)(
        q, k_cache, v_cache, seqlens, cache_batch_idx, block_table, seqlen_new, float(softmax_scale), bool(causal),
        min(num_splits, MAX_SPLITS), min_split_keys if auto else 1, window_left, window_right, softcap, alibi_slopes)
    return (out, lse) if return_softmax_lse else out
