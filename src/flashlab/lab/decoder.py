"""A Llama-style decoder with random weights whose attention backend is chosen by name, for the
end-to-end benchmark (``model_bench.py``): pre-norm blocks of RMSNorm, rotary GQA attention and a
SwiGLU MLP. Everything but the attention call is identical across backends.

Backends (attention on (batch, seqlen, heads, head_dim) tensors, causal):

* ``flashlab`` — :func:`flashlab.flash_attn_func`;
* ``sdpa`` (PyTorch's own choice), ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``
  — ``torch.nn.functional.scaled_dot_product_attention`` restricted to one backend (GQA through
  ``enable_gqa``);
* ``eager`` — the textbook attention that materializes the scores (``reference.naive_attention``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlab.interface import flash_attn_func
from flashlab.layer import Attention
from flashlab.reference import naive_attention
from flashlab.rotary import apply_rotary

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
BACKENDS = ("flashlab", "sdpa", *_SDPA_BACKENDS, "eager")


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 32000
    dim: int = 2048
    layers: int = 8
    heads: int = 16
    kv_heads: int = 16
    ffn: int = 5632
    rotary_base: float = 10000.0


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_backend(name: str) -> AttendFn:
    """The causal attention function called ``name`` (one of ``BACKENDS``)."""
    if name == "flashlab":
        return lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    if name == "eager":
        return lambda q, k, v: naive_attention(q, k, v, causal=True)
    if name == "sdpa" or name in _SDPA_BACKENDS:
        return _sdpa
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")


def backend_context(name: str) -> contextlib.AbstractContextManager:
    """Restricts PyTorch's SDPA to the backend ``name`` names (forward and backward run inside it)."""
    if name not in _SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[name]))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


class _Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, attend: AttendFn, **factory) -> None:
        super().__init__()
        self.attend = attend
        self.norm1, self.norm2 = _RMSNorm(cfg.dim, **factory), _RMSNorm(cfg.dim, **factory)
        # flashlab.Attention holds the projections and rotary table; the attention call is the backend's.
        self.attn = Attention(cfg.dim, cfg.heads, cfg.kv_heads, rotary_base=cfg.rotary_base, **factory)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn, bias=False, **factory)
        self.down = nn.Linear(cfg.ffn, cfg.dim, bias=False, **factory)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.split_qkv(self.norm1(x))
        o = self.attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        x = x + self.attn.out(o.flatten(-2))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    """Token ids (batch, seqlen) → logits (batch, seqlen, vocab)."""

    def __init__(self, cfg: DecoderConfig, backend: str, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        attend = attention_backend(backend)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim, **factory)
        self.blocks = nn.ModuleList(_Block(cfg, attend, **factory) for _ in range(cfg.layers))
        self.norm = _RMSNorm(cfg.dim, **factory)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False, **factory)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        cos, sin = self.blocks[0].attn.rotary(torch.arange(ids.shape[1], device=ids.device), x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy (fp32 logits)."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
