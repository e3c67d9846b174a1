"""Hugging Face transformers: ``attn_implementation="flashlab"`` through transformers' attention registry.

    import flashlab.integrations.transformers as fl_hf
    fl_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flashlab", dtype=torch.bfloat16)

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and the
mask builder that transformers uses for FlashAttention 2 to its ``AttentionMaskInterface``: the
model then hands each attention layer either no mask (a full causal batch: the dense kernel), a
2-D padding mask (batch, kv_len) with True = token (padded batches: unpadded into a packed batch
and run through :func:`flashlab.flash_attn_varlen_func`, no padding computed), or a 4-D mask a
caller built explicitly (run through :func:`flashlab.scaled_dot_product_attention`).

Needs transformers ≥ 5 (``AttentionInterface`` / ``AttentionMaskInterface``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashlab.interface import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention

NAME = "flashlab"


def register(name: str = NAME) -> None:
    """Register flashlab under ``name`` so that ``attn_implementation=name`` selects it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as err:
        raise ImportError("flashlab.integrations.transformers needs transformers >= 5 "
                          "(pip install 'transformers>=5')") from err
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    if "flash" in name:
        _preload_flash_loader(name)


_LOADER_STATE = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_lazy_define_process_function", "_pad_input",
                 "_unpad_input")


def _preload_flash_loader(name: str) -> None:
    """transformers treats every implementation whose name contains "flash" as a FlashAttention
    build and, when a model is created, asks its loader to import one for that name (a package or
    a Hub kernel). flashlab has flash-attn's three functions with flash-attn's signatures, so it is
    handed to that loader as the build already loaded for ``name``. The loader keeps one build per
    process: after a model with another flash implementation was created, call register() again."""
    from transformers import modeling_flash_attention_utils as loader

    missing = [attr for attr in _LOADER_STATE if not hasattr(loader, attr)]
    if missing:
        raise ImportError(f"this transformers version's FlashAttention loader lacks {missing} (flashlab was tested "
                          f"with transformers 5.17 and 5.23); register under a name without 'flash' instead, e.g. "
                          f"register('fl_attention')")
    from flashlab.decoding import flash_attn_with_kvcache

    loader._flash_fn, loader._flash_varlen_fn = flash_attn_func, flash_attn_varlen_func
    loader._flash_with_kvcache_fn = flash_attn_with_kvcache
    loader._pad_fn, loader._unpad_fn = loader._pad_input, loader._unpad_input
    loader._process_flash_kwargs_fn = loader._lazy_define_process_function(flash_attn_varlen_func)
    if hasattr(loader, "_process_with_kvcache_kwargs_fn"):  # newer than 5.17
        loader._process_with_kvcache_kwargs_fn = loader._lazy_define_process_function(flash_attn_with_kvcache)
    loader._loaded_implementation = name


def _target_dtype(t: torch.Tensor) -> torch.dtype:
    # fp32 activations under autocast (e.g. fp32 norms) are cast to the autocast dtype, as
    # transformers does for FlashAttention; otherwise the dtype is kept (the kernels need fp16/bf16).
    if t.dtype == torch.float32 and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _unpad_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(flat indices of the tokens, int32 cu_seqlens, max_seqlen) of a (batch, len) padding mask."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    # The exact maximum costs a host sync; while tracing the padded length is a valid bound.
    longest = mask.shape[1] if torch.compiler.is_compiling() else int(lengths.max())
    return indices, cu, longest


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, **options
                      ) -> torch.Tensor:
    """q (batch, q_len, heads, dim), k/v (batch, kv_len, kv_heads, dim); mask (batch, kv_len), True =
    token. The queries are the last q_len positions of each row (prefill: all of them)."""
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    mask = mask.bool()
    idx_k, cu_k, max_k = _unpad_indices(mask)
    if q_len == kv_len:
        idx_q, cu_q, max_q = idx_k, cu_k, max_k
    else:
        idx_q, cu_q, max_q = _unpad_indices(mask[:, -q_len:])
    packed_q = q.reshape(batch * q_len, heads, dim).index_select(0, idx_q)
    packed_k, packed_v = (t.reshape(batch * kv_len, *t.shape[2:]).index_select(0, idx_k) for t in (k, v))
    out = flash_attn_varlen_func(packed_q, packed_k, packed_v, cu_q, cu_k, max_q, max_k, **options)
    # Padding positions get zeros (as with transformers' FlashAttention 2).
    return q.new_zeros(batch * q_len, heads, dim).index_copy(0, idx_q, out).view(batch, q_len, heads, dim)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature on flashlab's kernels.

    Args:
        module: the calling attention layer (its ``is_causal`` is the default for ``is_causal``).
        query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim),
            GQA without repeating k/v.
        attention_mask: None, (batch, kv_len) bool/int padding mask (True/1 = token), or a 4-D
            bool (True = attend) / additive float mask broadcastable to (batch, heads, q_len, kv_len).
        dropout, scaling, sliding_window (keys within the last ``sliding_window`` positions),
            softcap: as transformers passes them.
        is_causal: causal, aligned to the bottom-right corner (queries are the last q_len positions).

    Returns ``(out, None)`` with out (batch, q_len, heads, head_dim); no attention weights.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by flashlab")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dtype = _target_dtype(query)
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (query, key, value))
    options = {"dropout_p": dropout, "softmax_scale": scaling, "softcap": softcap or 0.0}
    if attention_mask is not None and attention_mask.dim() == 4:
        if softcap or sliding_window is not None:
            raise NotImplementedError("softcap / sliding_window with an explicit 4-D attention_mask: fold them "
                                      "into the mask or pass a 2-D padding mask")
        out = scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype), attn_mask=attention_mask,
                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None
    options["causal"] = bool(is_causal) and q.shape[1] > 1
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, 0 if options["causal"] else sliding_window - 1)
    if attention_mask is None:
        return flash_attn_func(q, k, v, **options), None
    if attention_mask.dim() != 2 or attention_mask.shape != (q.shape[0], k.shape[1]):
        raise ValueError(f"attention_mask must be None, (batch, kv_len) = {(q.shape[0], k.shape[1])} or 4-D, got "
                         f"{tuple(attention_mask.shape)}")
    return _padded_attention(q, k, v, attention_mask, **options), None
