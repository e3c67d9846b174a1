"""FlashAttention-2's online-softmax algorithm in plain PyTorch ops: the CPU path (any device works).

Same contract as the Triton kernels: layout (batch, seqlen, heads, head_dim), GQA/MQA by head
grouping, causal mask "key j visible from query i iff j <= i + causal_offset", sliding windows,
softcap, ALiBi, ``attn_mask`` and dropout (blockwise_scores.py applies them per tile), forward returning
the natural-log LSE, and a backward that takes an external ``out``/``lse`` (ring attention).

Memory. Both passes walk (query tile × key tile) pairs of ``block_size`` rows each, so the largest
temporary is a (batch, heads, block_size, block_size) score/probability tile in the compute dtype.
Everything else is O(seqlen): per-row statistics, and copies of q/k/v/out/dout (and fp32 dq/dk/dv
accumulators) in the compute dtype and the grouped row order described below. No
seqlen_q × seqlen_k buffer is ever allocated, in forward or backward.

GQA without expanding k/v. Query rows are regrouped per kv head as (batch, kv_heads, seqlen_q ·
group, head_dim), row ``i * group + g`` holding position i of query head ``kv_head * group + g``.
A query tile is then a contiguous row slice, every matmul is a plain 4-D batched matmul against
the shared kv head, and ``Pᵀ dO`` / ``dSᵀ Q`` sum over the group for free.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from flashlab.blockwise_scores import ScoreMods, dropout_tile, exp_shifted, modify
from flashlab.philox import counter_stride

__all__ = ["ScoreMods", "blockwise_attention", "blockwise_attention_backward"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32 (as the kernels do); fp32/fp64 keep their own precision.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on (batch, seqlen_k, kv_heads), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must agree on batch and head_dim, got {tuple(q.shape)}, {tuple(k.shape)}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is not None:
        return float(softmax_scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _rows(x: Tensor, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """(B, S, H, D) → (B, Hkv, S·G, D) in ``dtype``; row i·G + g is head hkv·G + g at position i."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, kv_heads, h // kv_heads, d).permute(0, 2, 1, 3, 4)
    return x.to(dtype).reshape(b, kv_heads, s * (h // kv_heads), d)


def _unrows(x: Tensor, seqlen: int, heads: int) -> Tensor:
    """Inverse of ``_rows`` (without the dtype change): (B, Hkv, S·G, D) → (B, S, H, D)."""
    b, kv_heads, _, d = x.shape
    x = x.reshape(b, kv_heads, seqlen, heads // kv_heads, d).permute(0, 2, 1, 3, 4)
    return x.reshape(b, seqlen, heads, d)


def _lse_rows(lse: Tensor, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """(B, H, S) → (B, Hkv, S·G), matching ``_rows``."""
    b, h, s = lse.shape
    return lse.reshape(b, kv_heads, h // kv_heads, s).transpose(2, 3).to(dtype).reshape(b, kv_heads, -1)


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mods: ScoreMods, block: int) -> tuple[Tensor, Tensor]:
    """Returns out (B, Sq, H, Dv) in q's dtype and lse (B, H, Sq) in the compute dtype."""
    b, sq, h, _ = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group, cdt = h // hkv, _compute_dtype(q.dtype)
    qr = _rows(q, hkv, cdt) * scale  # fold the scale into q once (O(Sq·D) instead of O(Sq·Sk))
    kr = k.transpose(1, 2).to(cdt)
    vr = v.transpose(1, 2).to(cdt)
    out = qr.new_zeros(b, hkv, sq * group, dv)
    lse = qr.new_full((b, hkv, sq * group), -math.inf)
    for i0 in range(0, sq, block):
        i1 = min(i0 + block, sq)
        # Causal / window: only the keys inside the band of this query tile are visited.
        k_lo, k_hi = mods.key_range(i0, i1, sk)
        if k_hi <= k_lo:
            continue  # no key visible from any row of this tile: out 0, lse -inf
        q_t = qr[:, :, i0 * group : i1 * group]
        m = q_t.new_full(q_t.shape[:3], -math.inf)  # running row max
        l_sum = q_t.new_zeros(q_t.shape[:3])  # running row sum of exp(s - m)
        acc = q_t.new_zeros(*q_t.shape[:3], dv)
        for j0 in range(k_lo, k_hi, block):
            j1 = min(j0 + block, k_hi)
            s, _, masked = modify(q_t @ kr[:, :, j0:j1].transpose(-1, -2), mods, i0, i1, j0, j1)
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp gives 0, not NaN.
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
            p = exp_shifted(s, m_safe[..., None], masked)  # in place: s is this tile's own buffer
            alpha = torch.exp(m - m_safe)  # rescales the old statistics to the new max
            l_sum = l_sum.mul_(alpha).add_(p.sum(dim=-1))
            if mods.dropout_p > 0:  # the normalizer sums the undropped weights; only P·V sees dropout
                p = p.masked_fill_(~dropout_tile(mods, hkv, i0, i1, j0, j1).to(p.device), 0.0)
            acc = acc.mul_(alpha[..., None]).add_(p @ vr[:, :, j0:j1])
            m = m_new
        seen = l_sum > 0
        keep_scale = 1.0 / (1.0 - mods.dropout_p)
        out[:, :, i0 * group : i1 * group] = acc / torch.where(seen, l_sum, 1.0)[..., None] * keep_scale
        lse[:, :, i0 * group : i1 * group] = torch.where(seen, m + torch.log(l_sum), -math.inf)
    lse = lse.reshape(b, hkv, sq, group).transpose(2, 3).reshape(b, h, sq)
    return _unrows(out, sq, h).to(q.dtype), lse


def blockwise_attention_backward(
    dout: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    block_size: int = 256,
    dlse: Tensor | None = None,
    mods: ScoreMods | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward from an external ``out``/``lse``, recomputing P tile by tile.

    Args:
        dout: (B, Sq, H, Dv) gradient of ``out``, or None (zero).
        q: (B, Sq, H, D); k: (B, Sk, Hkv, D); v: (B, Sk, Hkv, Dv).
        out: (B, Sq, H, Dv) forward output; lse: (B, H, Sq) natural-log LSE (-inf: row saw no key).
        dlse: optional (B, H, Sq) gradient of ``lse`` (ring attention merges chunks through it).
        mods: the score modifications of the forward (blockwise_scores.py); when given, its
            ``causal`` and ``offset`` are used instead of ``causal`` / ``causal_offset``.
        The rest as in ``blockwise_attention``.

    Returns (dq, dk, dv) shaped and typed like (q, k, v). Extra memory as in the module docstring.
    """
    _check_inputs(q, k, v, block_size)
    mods = mods if mods is not None else ScoreMods(causal=bool(causal), offset=int(causal_offset))
    b, sq, h, _ = q.shape
    sk, hkv, d_v = k.shape[1], k.shape[2], v.shape[3]
    if out.shape != (b, sq, h, d_v) or lse.shape != (b, h, sq):
        raise ValueError(
            f"out must be {(b, sq, h, d_v)} and lse {(b, h, sq)}, got {tuple(out.shape)}, {tuple(lse.shape)}"
        )
    if dout is not None and dout.shape != out.shape:
        raise ValueError(f"dout must have out's shape {tuple(out.shape)}, got {tuple(dout.shape)}")
    scale, group, cdt = _scale(softmax_scale, q.shape[3]), h // hkv, _compute_dtype(q.dtype)
    qr = _rows(q, hkv, cdt) * scale
    kr, vr = k.transpose(1, 2).to(cdt), v.transpose(1, 2).to(cdt)
    do = _rows(dout, hkv, cdt) if dout is not None else qr.new_zeros(b, hkv, sq * group, d_v)
    # delta = rowsum(dO ∘ O) = Σ_j P_ij dP_ij; a gradient on lse adds dlse_i · P_ij to dS_ij.
    delta = (do * _rows(out, hkv, cdt)).sum(dim=-1)
    if dlse is not None:
        delta = delta - _lse_rows(dlse, hkv, cdt)
    # A row with lse = -inf saw no key: use +inf so that P = exp(S - lse) = 0 there, never NaN.
    lse_r = _lse_rows(lse, hkv, cdt)
    lse_r = lse_r.masked_fill(lse_r == -math.inf, math.inf)
    dq = torch.zeros_like(qr)
    # dk/dv accumulate in (B, Sk, Hkv, D) storage so that the returned gradients are contiguous.
    dk = kr.new_zeros(b, sk, hkv, kr.shape[3]).transpose(1, 2)
    dv = vr.new_zeros(b, sk, hkv, d_v).transpose(1, 2)
    for j0 in range(0, sk, block_size):
        j1 = min(j0 + block_size, sk)
        # Causal / window: only the query tiles whose band reaches this key tile.
        q_lo, q_hi = mods.query_range(j0, j1, sq)
        k_t, v_t = kr[:, :, j0:j1], vr[:, :, j0:j1]
        dk_t, dv_t = dk[:, :, j0:j1], dv[:, :, j0:j1]
        for i0 in range((q_lo // block_size) * block_size, q_hi, block_size):
            i1 = min(i0 + block_size, sq)
            rows = slice(i0 * group, i1 * group)
            q_t, do_t = qr[:, :, rows], do[:, :, rows]
            s, tanh, masked = modify(q_t @ k_t.transpose(-1, -2), mods, i0, i1, j0, j1)
            p = exp_shifted(s, lse_r[:, :, rows, None], masked)  # in place: s is this tile's own buffer
            dp = do_t @ v_t.transpose(-1, -2)
            p_used = p
            if mods.dropout_p > 0:
                keep = dropout_tile(mods, hkv, i0, i1, j0, j1).to(p.device)
                p_used = p.masked_fill(~keep, 0.0).div_(1.0 - mods.dropout_p)
                dp = dp.masked_fill_(~keep, 0.0).div_(1.0 - mods.dropout_p)
            dv_t += p_used.transpose(-1, -2) @ do_t  # sums over the GQA group too (rows hold all g)
            ds = dp.sub_(delta[:, :, rows, None]).mul_(p)
            if tanh is not None:
                ds = ds.mul_(1 - tanh * tanh)  # d(cap · tanh(s / cap)) / ds
            dq[:, :, rows] += ds @ k_t
            dk_t += ds.transpose(-1, -2) @ q_t  # q_t already carries the scale
    dq = _unrows(dq * scale, sq, h).to(q.dtype)
    return dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mods, block):  # type: ignore[override]
        out, lse = _forward(q, k, v, scale, mods, block)
        # Keep lse in the compute dtype (fp64 for fp64 inputs) so the backward loses nothing.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, mods, block)
        ctx.set_materialize_grads(False)  # an unused out/lse gives None: skip its term
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        scale, mods, block = ctx.args
        if dout is None and dlse is None:
            return None, None, None, None, None, None
        dq, dk, dv = blockwise_attention_backward(dout, q, k, v, out, lse, softmax_scale=scale, block_size=block,
                                                  dlse=dlse, mods=mods)
        return dq, dk, dv, None, None, None


def blockwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    block_size: int = 256,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_rows: Tensor | None = None,
    dropout_stride: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention by FlashAttention-2's online softmax, in PyTorch ops, differentiable.

    Args:
        q: (batch, seqlen_q, heads, head_dim), any float dtype.
        k: (batch, seqlen_k, kv_heads, head_dim); v: (batch, seqlen_k, kv_heads, head_dim_v).
            GQA/MQA: heads % kv_heads == 0, query head h reads kv head h // (heads // kv_heads);
            k/v are never expanded.
        softmax_scale: defaults to 1 / sqrt(head_dim).
        causal: key j is visible from query i iff j <= i + causal_offset. Pass
            causal_offset = seqlen_k - seqlen_q for flash-attn's bottom-right alignment,
            0 for PyTorch's top-left. A row that sees no key gives out 0 and lse -inf.
        block_size: rows per query tile and per key tile.
        window_size: (left, right) sliding window around the same diagonal, -1 = unbounded.
        softcap: > 0 replaces scaled scores s by softcap · tanh(s / softcap).
        alibi_slopes: (heads,) or (batch, heads) fp32: adds -slope · |i + causal_offset - j|.
        attn_mask: broadcastable to (batch, heads, seqlen_q, seqlen_k): bool (True = attend) or
            float (added to the scores); no gradient flows into it.
        dropout_p, dropout_seed: dropout on the attention weights with the kernels' pattern
            (philox.py): weight (b, h, i, j) is kept iff counter (rows[b, h] + i) · stride + j
            passes philox.dropout_keep; ``dropout_rows`` (batch, heads) int64 defaults to (b · heads
            + h) · seqlen_q and ``dropout_stride`` (a multiple of 32) to counter_stride(seqlen_k), as
            for dense attention in the kernels.

    Returns:
        out (batch, seqlen_q, heads, head_dim_v) in q's dtype, and lse (batch, heads, seqlen_q),
        fp32, natural log. fp16/bf16 compute in fp32; fp32/fp64 in their own dtype.

    Memory: a (batch, heads, block_size, block_size) tile plus O(seqlen) per pass, forward and
    backward (the backward recomputes P per tile; tiles outside a causal/window band are skipped).
    """
    _check_inputs(q, k, v, block_size)
    scale = _scale(softmax_scale, q.shape[3])
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    left, right = (int(w) for w in window_size)
    batch, seqlen_q, heads = q.shape[:3]
    if dropout_p > 0 and dropout_rows is None:
        dropout_rows = torch.arange(batch * heads, dtype=torch.int64).reshape(batch, heads) * seqlen_q
    if dropout_stride is None:
        dropout_stride = counter_stride(k.shape[1])
    elif dropout_stride % 32:
        raise ValueError(f"dropout_stride must be a multiple of 32 (philox.counter_stride), got {dropout_stride}")
    mods = ScoreMods(causal=bool(causal), offset=int(causal_offset), window_left=left, window_right=right,
                     softcap=float(softcap), alibi_slopes=alibi_slopes, attn_mask=attn_mask,
                     dropout_p=float(dropout_p), dropout_seed=int(dropout_seed), dropout_rows=dropout_rows,
                     dropout_stride=int(dropout_stride))
    out, lse = _BlockwiseAttention.apply(q, k, v, scale, mods, block_size)
    return out, lse.float()
