"""torch.library ops around the Triton kernels: the only place that launches them.

``flashlab::attn_fwd`` and ``flashlab::attn_bwd`` are ``triton_op``s, so ``torch.compile`` sees
through them to the kernels, and autograd is registered on the forward. Both take tensors in
(batch, seqlen, heads, head_dim) *logical* layout with any strides (the head dim must be
unit-stride); the caller checks arguments (interface.py).

Stable entry points (ring attention and split-KV decoding build on them):
* ``attention_forward(q, k, v, softmax_scale, causal, bottom_right) -> (out, lse)``
* ``attention_backward(dout, q, k, v, out, lse, softmax_scale, causal, bottom_right, dlse=None)
  -> (dq, dk, dv)`` — accepts an external out/LSE (e.g. merged across ring steps).
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from flashlab.kernels import backward as bwd_kernels
from flashlab.kernels import forward as fwd_kernels
from flashlab.kernels.configs import backward_config, forward_config, padded_head_dim, preprocess_block_m


def _diag_offset(seqlen_q: int, seqlen_k: int, bottom_right: bool) -> int:
    return seqlen_k - seqlen_q if bottom_right else 0


def _bshd_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@triton_op("flashlab::attn_fwd", mutates_args=())
def attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool, bottom_right: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    block_d = padded_head_dim(head_dim)
    cfg = forward_config(block_d, causal, q.device)
    grid = (triton.cdiv(seqlen_q, cfg.block_m), heads, batch)
    wrap_triton(fwd_kernels.attn_fwd_kernel)[grid](
        q, k, v, out, lse,
        *_bshd_strides(q), *_bshd_strides(k), *_bshd_strides(v), *_bshd_strides(out),
        seqlen_q, seqlen_k, heads // kv_heads, _diag_offset(seqlen_q, seqlen_k, bottom_right), softmax_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, **cfg.launch_kwargs(),
    )
    return out, lse


@triton_op("flashlab::attn_bwd", mutates_args=())
def attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    block_d = padded_head_dim(head_dim)
    diag_offset = _diag_offset(seqlen_q, seqlen_k, bottom_right)
    dq = torch.empty((batch, seqlen_q, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, seqlen_k, kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, seqlen_k, kv_heads, head_dim), dtype=v.dtype, device=v.device)
    delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)

    pre_m = preprocess_block_m(block_d)
    wrap_triton(bwd_kernels.attn_bwd_preprocess_kernel)[(triton.cdiv(seqlen_q, pre_m), heads, batch)](
        out, dout, dlse if dlse is not None else delta, delta,
        *_bshd_strides(out), *_bshd_strides(dout), seqlen_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m, HAS_DLSE=dlse is not None,
    )
    cfg_kv, cfg_q = backward_config(block_d, causal, q.device)
    wrap_triton(bwd_kernels.attn_bwd_dkdv_kernel)[(triton.cdiv(seqlen_k, cfg_kv.block_n), kv_heads, batch)](
        q, k, v, dout, lse, delta, dk, dv,
        *_bshd_strides(q), *_bshd_strides(k), *_bshd_strides(v), *_bshd_strides(dout),
        *_bshd_strides(dk), *_bshd_strides(dv),
        seqlen_q, seqlen_k, heads, heads // kv_heads, diag_offset, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, **cfg_kv.launch_kwargs(),
    )
    wrap_triton(bwd_kernels.attn_bwd_dq_kernel)[(triton.cdiv(seqlen_q, cfg_q.block_m), heads, batch)](
        q, k, v, dout, lse, delta, dq,
        *_bshd_strides(q), *_bshd_strides(k), *_bshd_strides(v), *_bshd_strides(dout), *_bshd_strides(dq),
        seqlen_q, seqlen_k, heads // kv_heads, diag_offset, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, **cfg_q.launch_kwargs(),
    )
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, causal, bottom_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.causal, ctx.bottom_right = softmax_scale, causal, bottom_right


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, ctx.causal, ctx.bottom_right)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("flashlab::attn_fwd", _backward, setup_context=_setup_context)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool, bottom_right: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable forward: ``(out, lse)``, out (batch, seqlen_q, heads, head_dim) contiguous,
    lse fp32 (batch, heads, seqlen_q), natural log, -inf for rows that see no key."""
    return torch.ops.flashlab.attn_fwd(q, k, v, softmax_scale, causal, bottom_right)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    bottom_right: bool,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) from an output and LSE computed elsewhere (same layouts as forward)."""
    return torch.ops.flashlab.attn_bwd(dout, q, k, v, out, lse, dlse, softmax_scale, causal, bottom_right)
