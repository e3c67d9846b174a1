"""Providers' attention callables for cases with features (features.py): each peer runs the
equivalent computation in its own terms, or says why it cannot ("unsupported", never a crash).

* flashlab: ``flash_attn_func`` with window_size / softcap / alibi_slopes / dropout_p, a
  ``flashlab.block_mask`` for document and prefix masks, ``flash_attn_varlen_func`` on the packed
  batch; ``flashlab-loop`` runs ``flash_attn_func`` once per sequence of a varlen batch;
  ``flashlab-sdpa`` is the SDPA drop-in with the same dense ``attn_mask`` as PyTorch SDPA.
* PyTorch SDPA: a dense bool mask (seqlen²) or an additive float mask for ALiBi, ``dropout_p``;
  varlen runs the padded batch (causal: ``is_causal``, exact on the valid rows; otherwise a
  key-padding mask). No softcap; the flash backend takes no mask.
* FlexAttention: ``mask_mod`` = the same predicate and a ``create_block_mask`` BlockMask,
  ``score_mod`` for softcap and ALiBi; varlen as a document mask over the packed batch. No dropout.
* flash-attn: window_size / softcap / alibi_slopes / dropout_p, ``flash_attn_varlen_func``; no
  document or prefix mask.
* naive: ``flashlab.reference.naive_attention`` with the same options (also the accuracy
  reference); no random dropout (the reference takes an explicit keep pattern).

Layouts (``Attn.layout``): "bshd" / "bhsd" (dense, or for varlen the padded batch), "packed"
(total, heads, dim) and "packed-bhsd" (1, heads, total, dim).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from flashlab.lab import features
from flashlab.lab.cases import Case


def _scale(case: Case) -> float:
    return 1.0 / math.sqrt(case.head_dim)


def _mask_kind(case: Case) -> str:
    return features.parse_mask(case.mask)[0]


def varlen_padding_mask(lengths: list[int], seqlen: int, device: torch.device) -> torch.Tensor:
    """Bool (batch, 1, 1, seqlen): key j of sequence b exists."""
    return (torch.arange(seqlen, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None]


# ------------------------------------------------------------------------------------ naive
def naive_kwargs(case: Case, device: torch.device, layout: str) -> dict[str, Any]:
    """``naive_attention`` keyword arguments for the case's features (varlen: the padded batch)."""
    kind = _mask_kind(case)
    kw: dict[str, Any] = {"softmax_scale": _scale(case), "layout": layout, "causal": case.causal}
    if kind == "window":
        kw["window_size"] = features.window_size(case)
    elif kind:
        kw["attn_mask"] = features.dense_mask(case, case.seqlen_q, device)
        kw["causal"] = False  # the predicate has it
    if case.varlen:
        kw["attn_mask"] = varlen_padding_mask(features.varlen_lengths(case), case.seqlen_q, device)
    if case.softcap:
        kw["softcap"] = float(case.softcap)
    if case.alibi:
        kw["alibi_slopes"] = features.alibi_slopes(case.heads, device)
    return kw


# ------------------------------------------------------------------------------------ flashlab
def _flashlab_kwargs(case: Case, device: torch.device) -> dict[str, Any]:
    import flashlab

    kind = _mask_kind(case)
    kw: dict[str, Any] = {"softmax_scale": _scale(case), "causal": case.causal,
                          "window_size": features.window_size(case), "softcap": float(case.softcap),
                          "dropout_p": float(case.dropout)}
    if case.alibi:
        kw["alibi_slopes"] = features.alibi_slopes(case.heads, device)
    if kind in ("document", "prefix"):
        kw["causal"] = False
        kw["block_mask"] = flashlab.block_mask(features.predicate(case, device), None, None, case.seqlen_q,
                                               case.seqlen_k, device=device)
    return kw


def flashlab_fn(case: Case, device: torch.device) -> tuple[Any, str]:
    import flashlab

    kw = _flashlab_kwargs(case, device)
    if not case.varlen:
        return (lambda q, k, v: flashlab.flash_attn_func(q, k, v, **kw)), "bshd"
    lengths = features.varlen_lengths(case)
    cu, top = features.cu_seqlens(lengths, device), max(lengths)
    return (lambda q, k, v: flashlab.flash_attn_varlen_func(q, k, v, cu, cu, top, top, **kw)), "packed"


def flashlab_loop_fn(case: Case, device: torch.device) -> tuple[Any, str]:
    """Varlen as a Python loop of flash_attn_func over the sequences (the baseline varlen beats)."""
    import flashlab

    kw = _flashlab_kwargs(case, device)
    bounds = features.cu_seqlens(features.varlen_lengths(case), torch.device("cpu")).tolist()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = [flashlab.flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], **kw)[0]
                for a, b in zip(bounds, bounds[1:])]
        return torch.cat(outs)
    return fn, "packed"


def kvcache_fn(case: Case) -> tuple[Any, str]:
    """The decoding path: ``flash_attn_with_kvcache`` with k, v as full caches of seqlen_k keys
    (``cache_seqlens=None``: every key read, nothing appended)."""
    import flashlab

    scale = _scale(case)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and q.requires_grad:
            raise NotImplementedError("flash_attn_with_kvcache is inference only (no backward): measure mode fwd")
        return flashlab.flash_attn_with_kvcache(q, k, v, softmax_scale=scale, causal=case.causal)
    return fn, "bshd"


def kvcache_unsupported(case: Case, device: torch.device) -> str | None:
    if features.has_features(case):
        return "the decoding path takes no window / softcap / ALiBi / block mask / varlen in the lab"
    if case.scope != "op":
        return "the decoding path is measured at scope 'op'"
    if device.type == "cuda" and case.dtype not in ("fp16", "bf16"):
        return f"flashlab's GPU kernels take fp16/bf16, not {case.dtype}"
    return None


def flashlab_sdpa_fn(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """``flashlab.scaled_dot_product_attention`` given exactly what PyTorch SDPA is given
    (``sdpa_args``: a dense bool or additive float ``attn_mask``, ``is_causal``) and ``dropout_p``."""
    import flashlab

    mask, causal = sdpa_args(case, device, dtype)
    gqa, scale, p = case.kv_heads != case.heads, _scale(case), float(case.dropout)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flashlab.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                     scale=scale, enable_gqa=gqa)
    return fn, "bhsd"


# ------------------------------------------------------------------------------------ SDPA
def sdpa_unsupported(case: Case, backend: str | None) -> str | None:
    if case.softcap:
        return "PyTorch SDPA has no softcap"
    if backend == "FLASH_ATTENTION" and (_mask_kind(case) or case.alibi or (case.varlen and not case.causal)):
        return "SDPA's flash backend takes no attn_mask (needed for this mask / ALiBi / key padding)"
    return None


def sdpa_args(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for F.scaled_dot_product_attention: a bool mask, or a float one with ALiBi."""
    kind = _mask_kind(case)
    if case.varlen:
        if case.causal and not case.alibi:
            return None, True  # padded keys come after every valid query: exact on valid rows
        keep = varlen_padding_mask(features.varlen_lengths(case), case.seqlen_q, device)
        if case.causal:
            keep = keep & features.dense_mask(case, case.seqlen_q, device)
    elif kind:
        keep = features.dense_mask(case, case.seqlen_q, device)
    else:
        keep = None
    if not case.alibi:
        return keep, bool(case.causal) and keep is None
    bias = features.alibi_bias(case.heads, case.seqlen_q, device, dtype)[None]
    if keep is None and case.causal:
        keep = features.dense_mask(case, case.seqlen_q, device)
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias, False


# ------------------------------------------------------------------------------------ FlexAttention
def flex_mods(case: Case, device: torch.device) -> tuple[Any, Any, int]:
    """(mask_mod or None, score_mod or None, sequence length flex sees: total tokens for varlen)."""
    if case.varlen:
        lengths = features.varlen_lengths(case)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        if case.causal:
            def mask_mod(b, h, q, kv):  # noqa: ANN001, ANN202 - flex signature
                return (seq[q] == seq[kv]) & (q >= kv)
        else:
            def mask_mod(b, h, q, kv):  # noqa: ANN001, ANN202
                return seq[q] == seq[kv]
        length = sum(lengths)
    else:
        mask_mod, length = features.predicate(case, device), case.seqlen_q
    score_mod = None
    if case.softcap or case.alibi:
        cap = float(case.softcap)
        slopes = features.alibi_slopes(case.heads, device)
        alibi = case.alibi

        def score_mod(score, b, h, q, kv):  # noqa: ANN001, ANN202
            if cap:
                score = torch.tanh(score / cap) * cap
            if alibi:
                score = score - slopes[h] * (q - kv).abs()
            return score
    return mask_mod, score_mod, length


# ------------------------------------------------------------------------------------ flash-attn
def flash_pkg_fn(case: Case, module: str) -> tuple[Any, str] | str:
    """flash-attn's callable for the case, or why it cannot run it."""
    if module != "flash_attn":
        return "only flash-attn 2's interface is wired for features in the lab"
    if _mask_kind(case) in ("document", "prefix"):
        return "flash-attn has no document / prefix mask (use its varlen interface for documents)"
    mod = importlib.import_module(module)
    kw: dict[str, Any] = {"softmax_scale": _scale(case), "causal": case.causal,
                          "window_size": features.window_size(case), "softcap": float(case.softcap),
                          "dropout_p": float(case.dropout)}

    def out_only(r: Any) -> torch.Tensor:
        return r[0] if isinstance(r, (tuple, list)) else r

    def with_slopes(q: torch.Tensor) -> dict[str, Any]:
        return {**kw, "alibi_slopes": features.alibi_slopes(case.heads, q.device)} if case.alibi else kw

    if not case.varlen:
        return (lambda q, k, v: out_only(mod.flash_attn_func(q, k, v, **with_slopes(q)))), "bshd"
    lengths = features.varlen_lengths(case)
    top = max(lengths)

    cache: dict[torch.device, tuple[torch.Tensor, dict[str, Any]]] = {}

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device not in cache:  # built once, outside the timed runs after the first call
            cache[q.device] = (features.cu_seqlens(lengths, q.device), with_slopes(q))
        cu, kwargs = cache[q.device]
        return out_only(mod.flash_attn_varlen_func(q, k, v, cu, cu, top, top, **kwargs))
    return fn, "packed"
