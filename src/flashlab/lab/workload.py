"""Inputs and callables for one case and one provider: the attention op or a full attention layer.

``scope="op"``: leaves are q, k, v, allocated contiguous in the provider's layout.
``scope="layer"``: leaves are x (batch, seqlen, embed) and the two projection weights; the layer
is ``out_proj(attention(split(qkv_proj(x))))`` with no bias, q/k/v being strided views of the
packed projection (what a model's attention layer does).

Modes: ``fwd`` runs the forward under ``torch.no_grad()`` (inference: no autograd state kept);
``bwd`` runs the backward of a forward done once beforehand; ``fwd+bwd`` runs both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashlab.lab.cases import Case
from flashlab.lab.features import varlen_lengths
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

        self.lengths = varlen_lengths(c) if c.varlen else None
        if c.scope == "op" and self.lengths is not None:
            total = sum(self.lengths)
            packed = [randn(total, c.heads, c.head_dim), randn(total, c.kv_heads, c.head_dim),
                      randn(total, c.kv_heads, c.head_dim)]
            self.leaves = [self._varlen_layout(t) for t in packed]
            self.n_batched = 3
        elif c.scope == "op":
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

    def _varlen_layout(self, t: torch.Tensor) -> torch.Tensor:
        """Packed (total, h, d) → the provider's layout: packed, (1, h, total, d), or padded to
        (batch, seqlen, h, d) / (batch, h, seqlen, d) with zeros past each length."""
        layout = self.attn.layout
        if layout == "packed":
            return t
        if layout == "packed-bhsd":
            return t.transpose(0, 1).unsqueeze(0).contiguous()
        padded = t.new_zeros(len(self.lengths), self.case.seqlen_q, *t.shape[1:])
        start = 0
        for b, n in enumerate(self.lengths):
            padded[b, :n] = t[start:start + n]
            start += n
        return padded if layout == "bshd" else padded.transpose(1, 2).contiguous()

    def first_item(self, t: torch.Tensor) -> torch.Tensor:
        """Batch element 0 of an input, output or gradient, as a 4-D tensor in
        :attr:`reference_layout` (for varlen: the first sequence, padding cut off)."""
        if self.lengths is None:
            return t[:1]
        n, layout = self.lengths[0], self.attn.layout
        if layout == "packed":
            return t[:n].unsqueeze(0)
        if layout == "bshd":
            return t[:1, :n]
        return t[:1, :, :n]  # bhsd padded, or packed-bhsd (the first sequence comes first)

    @property
    def reference_layout(self) -> str:
        return {"packed": "bshd", "packed-bhsd": "bhsd"}.get(self.attn.layout, self.attn.layout)

    def reference_case(self) -> Case:
        """The case :meth:`first_item` slices describe: batch 1, and for varlen the first sequence."""
        if self.lengths is None:
            return self.case
        n = self.lengths[0]
        return dataclasses.replace(self.case, batch=1, seqlen_q=n, seqlen_k=n, varlen=0)

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
        if self.lengths is not None and self.case.scope == "op":
            # varlen: drawn packed, then laid out like the output (zero on padding rows, which
            # are not part of the problem and must not feed the gradients)
            g = torch.randn(sum(self.lengths), *out.shape[-2:] if self.attn.layout in ("packed", "bshd")
                            else (out.shape[1], out.shape[-1]), generator=gen, device=out.device, dtype=out.dtype)
            return self._varlen_layout(g)
        return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def mode_fn(self, mode: str) -> Callable[[], object]:
        """A callable that runs one step of ``mode``; for ``bwd`` the forward runs here, once.

        The workload must have been built with ``requires_grad=True`` for ``bwd`` / ``fwd+bwd``.
        """
        context = self.attn.context
        if mode == "fwd":
            def fwd() -> object:
                with torch.no_grad(), context():
                    return self.forward()
            return fwd
        if mode == "bwd":
            with context():
                out = self.forward()
            dout = self.grad_output(out)

            def bwd() -> None:
                with context():
                    out.backward(dout, retain_graph=True)
            return bwd
        if mode == "fwd+bwd":
            dout_box: list[torch.Tensor] = []

            def fwd_bwd() -> None:
                with context():
                    out = self.forward()
                    if not dout_box:
                        dout_box.append(self.grad_output(out))
                    out.backward(dout_box[0])
            return fwd_bwd
        raise ValueError(f"unknown mode {mode!r}")
