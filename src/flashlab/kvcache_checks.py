"""Argument checks of ``flash_attn_with_kvcache`` (decoding.py): shapes and dtypes of the index
tensors, and the range checks that read their values (on the host, so never while tracing or
capturing a CUDA graph). Every failure names the argument, what it got and what is accepted."""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t: object, dims: int) -> None:
    """``t`` is a tensor of ``dims`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def check_index(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int32/int64 index tensor of ``shape`` (-1: any length) on ``device``; returned as contiguous int32."""
    check_tensor(name, t, len(shape))
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 tensor, got {t.dtype}")
    if any(want not in (-1, got) for want, got in zip(shape, t.shape)):
        want = "(" + ", ".join("max_blocks" if n == -1 else str(n) for n in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}: they must share a device")
    return t if t.dtype == torch.int32 and t.stride(-1) == 1 else t.to(torch.int32).contiguous()


def check_values(seqlens: torch.Tensor, seqlen_new: int, capacity: int, cache_batch_idx: torch.Tensor | None,
                  batch_cache: int, block_table: torch.Tensor | None, page_size: int, num_pages: int) -> int:
    """Range checks that read the index tensors (a device sync if they are on a GPU). Returns the
    longest total key length."""
    lens = seqlens.cpu().long()
    if (lens < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got {lens.min().item()}")
    if (lens + seqlen_new > capacity).any():
        b = int((lens + seqlen_new > capacity).nonzero()[0, 0])
        raise ValueError(f"cache too small: sequence {b} holds {lens[b].item()} tokens + {seqlen_new} new > "
                         f"capacity {capacity} (cache_seqlens[b] + k.shape[1] must be <= capacity)")
    if cache_batch_idx is not None:
        idx = cache_batch_idx.cpu().long()
        if ((idx < 0) | (idx >= batch_cache)).any():
            raise ValueError(f"cache_batch_idx entries must be in [0, {batch_cache}), got {idx.tolist()}")
    if block_table is not None:
        bt = block_table.cpu().long()
        used = torch.arange(bt.shape[1])[None, :] < ((lens + seqlen_new + page_size - 1) // page_size)[:, None]
        bad = used & ((bt < 0) | (bt >= num_pages))
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {bt[b, j].item()} is out of range: k_cache has "
                             f"{num_pages} blocks")
    return int(lens.max().item()) + seqlen_new if lens.numel() else 0


def check_rotary(cos: object, sin: object, head_dim: int, device: torch.device, has_new_keys: bool) -> None:
    """flash-attn's rotary tables: (seqlen_ro, rotary_dim / 2) each, rotary_dim even and ≤ head_dim,
    float, on q's device, and only with new k/v (the tokens they rotate)."""
    if (cos is None) != (sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if cos is None:
        return
    if not has_new_keys:
        raise ValueError("rotary_cos/rotary_sin rotate the new tokens: they need k and v")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        check_tensor(name, t, 2)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, q on {device}")
    if cos.shape != sin.shape or not 1 <= 2 * cos.shape[1] <= head_dim:
        raise ValueError(f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim ≤ "
                         f"head_dim ({head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
