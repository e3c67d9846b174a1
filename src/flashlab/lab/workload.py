"""Inputs and callables for one case and one provider: the attention op or a full attention layer.

``scope="op"``: leaves are q, k, v, allocated contiguous in the provider's layout.
``scope="layer"``: leaves are x (batch, seqlen, embed) and the two projection weights; the layer
is ``out_proj(attention(split(qkv_proj(x))))`` with no bias, q/k/v being strided views of the
packed projection (what a model's attention layer does).

Modes: ``fwd`` runs the forward under ``torch.no_grad()`` (inference: no autograd state kept);
``bwd`` runs the backward of a forward done once beforehand; ``fwd+bwd`` runs both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashlab.lab.cases import Case
from flashlab.lab.providers import TORCH_DTYPES, Attn


class Workload:
    """The tensors and the forward function of one case for one provider's :class:`Attn`."""

    def __init__(self, case: Case, attn: Attn, device: torch.device, *, requires_grad: bool = False,
                 seed: int = 0) -> None:
        self.case, self.attn, self.device = case, attn, device
        dtype = TORCH_DTYPES[case.dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        c = case

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
            return t.mul_(scale) if scale != 1.0 else t

        if c.scope == "op":
            if attn.layout == "bshd":
                shapes = [(c.batch, c.seqlen_q, c.heads, c.head_dim), (c.batch, c.seqlen_k, c.kv_heads, c.head_dim)]
            else:
                shapes = [(c.batch, c.heads, c.seqlen_q, c.head_dim), (c.batch, c.kv_heads, c.seqlen_k, c.head_dim)]
            self.leaves = [randn(*shapes[0]), randn(*shapes[1]), randn(*shapes[1])]
            self.n_batched = 3
        else:
            qkv_out = (c.heads + 2 * c.kv_heads) * c.head_dim
            w = 1.0 / c.embed ** 0.5
            self.leaves = [randn(c.batch, c.seqlen_q, c.embed), randn(qkv_out, c.embed, scale=w),
                           randn(c.embed, c.embed, scale=w)]
            self.n_batched = 1
        if requires_grad:
            for t in self.leaves:
                t.requires_grad_(True)

    @property
    def input_bytes(self) -> int:
        """Bytes of the leaf tensors (the inputs)."""
        return sum(t.numel() * t.element_size() for t in self.leaves)

    def compute(self, leaves: list[torch.Tensor], attn: Attn) -> torch.Tensor:
        """The forward on ``leaves`` (same structure as ``self.leaves``) with ``attn``."""
        if self.case.scope == "op":
            return attn.fn(*leaves)
        c = self.case
        x, w_qkv, w_o = leaves
        batch, seqlen = x.shape[0], x.shape[1]
        qkv = F.linear(x, w_qkv)
        q, k, v = qkv.split([c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], dim=-1)
        q = q.view(batch, seqlen, c.heads, c.head_dim)
        k = k.view(batch, seqlen, c.kv_heads, c.head_dim)
        v = v.view(batch, seqlen, c.kv_heads, c.head_dim)
        if attn.layout == "bhsd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = attn.fn(q, k, v)
        if attn.layout == "bhsd":
            o = o.transpose(1, 2)
        return F.linear(o.reshape(batch, seqlen, c.embed), w_o)

    def forward(self) -> torch.Tensor:
        """The provider's forward on this workload's inputs."""
        return self.compute(self.leaves, self.attn)

    def grad_output(self, out: torch.Tensor, seed: int = 1) -> torch.Tensor:
        """A random upstream gradient shaped like ``out``."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def mode_fn(self, mode: str) -> Callable[[], object]:
        """A callable that runs one step of ``mode``; for ``bwd`` the forward runs here, once.

        The workload must have been built with ``requires_grad=True`` for ``bwd`` / ``fwd+bwd``.
        """
        if mode == "fwd":
            def fwd() -> object:
                with torch.no_grad():
                    return self.forward()
            return fwd
        if mode == "bwd":
            out = self.forward()
            dout = self.grad_output(out)

            def bwd() -> None:
                out.backward(dout, retain_graph=True)
            return bwd
        if mode == "fwd+bwd":
            dout_box: list[torch.Tensor] = []

            def fwd_bwd() -> None:
                out = self.forward()
                if not dout_box:
                    dout_box.append(self.grad_output(out))
                out.backward(dout_box[0])
            return fwd_bwd
        raise ValueError(f"unknown mode {mode!r}")
