"""Test providers for the lab, loaded through FLASHLAB_LAB_PLUGINS=lab_plugins (also in the
memory-probe subprocess, which imports this module from sys.path).

* ``test-oom``: raises ``torch.OutOfMemoryError`` from seqlen 64 on (like naive on a small GPU),
  computes the naive attention below that.
* ``test-chunked``: a memory-efficient attention in plain PyTorch (queries in chunks of 16), so
  the memory measurement has something to tell apart from naive.
* ``test-interrupt``: raises KeyboardInterrupt on the case named by FLASHLAB_TEST_INTERRUPT_AT.
* ``test-broken``: always raises a RuntimeError (an unexpected failure, status "error").
"""

from __future__ import annotations

import os

import torch

from flashlab.lab.cases import Case
from flashlab.lab.providers import Attn, Provider, naive_attn, register

OOM_FROM_SEQLEN = 64


def _build_oom(case: Case, device: torch.device) -> Attn:
    naive = naive_attn(case)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if case.seqlen_q >= OOM_FROM_SEQLEN:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB (test provider)")
        return naive.fn(q, k, v)
    return Attn(fn, naive.layout, naive.causal_align)


def _build_chunked(case: Case, device: torch.device) -> Attn:
    scale = case.head_dim ** -0.5

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        sk = k.shape[2]
        for start in range(0, q.shape[2], 16):
            s = q[:, :, start:start + 16] @ k.transpose(-2, -1) * scale
            if case.causal:
                i = torch.arange(start, start + s.shape[2], device=q.device)[:, None]
                j = torch.arange(sk, device=q.device)[None, :]
                s = s.masked_fill(j > i + (sk - q.shape[2]), float("-inf"))
            outs.append(torch.softmax(s, dim=-1) @ v)
        return torch.cat(outs, dim=2)
    return Attn(fn, "bhsd", "bottom_right")


def _build_interrupt(case: Case, device: torch.device) -> Attn:
    naive = naive_attn(case)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if os.environ.get("FLASHLAB_TEST_INTERRUPT_AT") == case.label:
            raise KeyboardInterrupt
        return naive.fn(q, k, v)
    return Attn(fn, naive.layout, naive.causal_align)


def _build_broken(case: Case, device: torch.device) -> Attn:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom: a deliberately broken provider")
    return Attn(fn, "bhsd", "top_left")


register(Provider("test-oom", "test: out of memory from seqlen 64", build=_build_oom))
register(Provider("test-chunked", "test: query-chunked attention", build=_build_chunked))
register(Provider("test-interrupt", "test: Ctrl-C on one case", build=_build_interrupt))
register(Provider("test-broken", "test: always fails", build=_build_broken))
