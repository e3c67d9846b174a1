"""Lab providers for flashlab's opt-in kernels, so a run can put them beside the peers.

``flashlab-gluon``: flash_attn_func with ``FLASHLAB_FWD_GLUON=1`` during the call (the Gluon forward,
kernels/forward_gluon.py; the backward is the standard one). It refuses every case outside the
Gluon kernel's scope — there the call would quietly run the standard kernel, and the lab would
report that kernel's time under this provider's name.
"""

from __future__ import annotations

import os

import torch

from flashlab.lab.cases import Case
from flashlab.lab.features import has_features
from flashlab.lab.providers import Attn, Provider, register

_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _check_gluon(case: Case, device: torch.device) -> str | None:
    import triton

    from flashlab.gluon_forward import gluon_shape_ok, triton_has_gluon_36

    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the Gluon forward is written for Hopper (compute capability 9.0)"
    if not triton_has_gluon_36():
        return f"the Gluon forward is written for Triton 3.6's Gluon API, this is Triton {triton.__version__}"
    flags = dict(IS_VARLEN=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False, HAS_LOWER=False,
                 HAS_UPPER=case.causal, MASK_KIND=0, BOTTOM_RIGHT=True)
    if has_features(case) or case.scope != "op" or not gluon_shape_ok(
            flags, case.head_dim, case.seqlen_q, case.seqlen_k, _TORCH[case.dtype], 0):
        return ("outside the Gluon forward's scope (head dim 128 from 1024 tokens, or 64 from 4096; causal "
                "where every query sees a key; no features)")
    return None


def _build_gluon(case: Case, device: torch.device) -> Attn:
    import flashlab

    scale = case.head_dim ** -0.5

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        before = os.environ.get("FLASHLAB_FWD_GLUON")
        os.environ["FLASHLAB_FWD_GLUON"] = "1"
        try:
            return flashlab.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal)
        finally:
            if before is None:
                del os.environ["FLASHLAB_FWD_GLUON"]
            else:
                os.environ["FLASHLAB_FWD_GLUON"] = before
    return Attn(fn, "bshd", "bottom_right")


register(Provider(
    "flashlab-gluon", "flashlab's opt-in Gluon forward (FLASHLAB_FWD_GLUON=1: FlashAttention-3's structure for "
    "Hopper, Triton 3.6) with the standard backward; only cases in its scope",
    build=_build_gluon, devices=("cuda",), dtypes=("fp16", "bf16"), check=_check_gluon, min_capability=(9, 0)))
