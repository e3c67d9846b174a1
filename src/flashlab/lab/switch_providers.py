"""Lab providers for flashlab's kernel switches, so a run can put one kernel beside another.

``flashlab-tl``: flash_attn_func with the Gluon kernels switched off (``FLASHLAB_FWD_GLUON=0``,
``FLASHLAB_BWD_GLUON=0``) for each measured step, forward and backward: flashlab's portable `tl`
kernels, the ones every GPU but Hopper runs. Beside ``flashlab`` it shows what the Gluon kernels
add. It refuses the cases where ``flashlab`` would run the `tl` kernels anyway (no Hopper GPU, not
Triton 3.6, outside the Gluon forward's scope or under its least work): there the two would time
the same code.

``flashlab-deterministic``: flash_attn_func with ``deterministic=True``: the atomics-free backward
where the default takes the fused one (Hopper, head dim 128, causal, from 8k tokens, no GQA:
gluon_backward.fused_eligible) — the price of bit-identical gradients. It refuses every other case
(flashlab is deterministic there anyway); its forward is flashlab's (the flag changes the backward
only), so time it in the fwd+bwd or bwd modes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flashlab.lab.cases import Case
from flashlab.lab.features import has_features
from flashlab.lab.providers import Attn, Provider, register

_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}
SWITCHES = ("FLASHLAB_FWD_GLUON", "FLASHLAB_BWD_GLUON")


def _why_not_gluon(case: Case, device: torch.device) -> str | None:
    """Why flashlab would not run its Gluon kernels on ``case`` (None if it would)."""
    import triton

    from flashlab.gluon_forward import enough_work, gluon_shape_ok, triton_has_gluon_36

    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the Gluon kernels are Hopper's (compute capability 9.0)"
    if not triton_has_gluon_36():
        return f"the Gluon kernels need Triton 3.6, not {triton.__version__}"
    flags = dict(IS_VARLEN=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False, HAS_LOWER=False,
                 HAS_UPPER=case.causal, MASK_KIND=0, BOTTOM_RIGHT=True)
    if has_features(case) or case.scope != "op" or not gluon_shape_ok(
            flags, case.head_dim, case.seqlen_q, case.seqlen_k, _TORCH[case.dtype], 0):
        return ("outside the Gluon forward's scope (head dim 128 or 256 from 1024 tokens, 64 from 4096; "
                "causal where every query sees a key; no features)")
    if not enough_work(case.batch, case.heads, case.seqlen_q, case.seqlen_k, case.head_dim, case.causal):
        return "too little work a call for the Gluon launch's host time to pay (gluon_forward.MIN_WORK)"
    return None


def _check_tl(case: Case, device: torch.device) -> str | None:
    why = _why_not_gluon(case, device)
    return None if why is None else "flashlab runs its `tl` kernels here anyway: " + why


@contextmanager
def gluon_off() -> Iterator[None]:
    """Both Gluon switches off inside, restored after."""
    before = {name: os.environ.get(name) for name in SWITCHES}
    os.environ.update({name: "0" for name in SWITCHES})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _build_tl(case: Case, device: torch.device) -> Attn:
    import flashlab

    scale = case.head_dim ** -0.5

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flashlab.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal)
    return Attn(fn, "bshd", "bottom_right", context=gluon_off)


register(Provider(
    "flashlab-tl", "flashlab with its Gluon kernels switched off: the portable `tl` kernels; only cases where "
    "flashlab would run the Gluon forward (Hopper, Triton 3.6, in its scope)",
    build=_build_tl, devices=("cuda",), dtypes=("fp16", "bf16"), check=_check_tl, min_capability=(9, 0)))


def _check_deterministic(case: Case, device: torch.device) -> str | None:
    from flashlab.gluon_backward import FUSED_MAX_GROUP, FUSED_MIN_SEQLEN, fused_eligible

    why = _why_not_gluon(case, device)
    anyway = "flashlab's backward is deterministic here anyway: "
    if why is not None:
        return anyway + why
    if not fused_eligible(case.causal, case.seqlen_q, case.seqlen_k, case.head_dim, False,
                          case.heads // case.kv_heads):
        return anyway + (f"the fused backward runs at head dim 128, causal, from {FUSED_MIN_SEQLEN} tokens, "
                         f"up to {FUSED_MAX_GROUP} query heads a kv head only")
    return None


def _build_deterministic(case: Case, device: torch.device) -> Attn:
    import flashlab

    scale = case.head_dim ** -0.5

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flashlab.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal, deterministic=True)
    return Attn(fn, "bshd", "bottom_right")


register(Provider(
    "flashlab-deterministic", "flashlab with deterministic=True: the atomics-free backward; only cases where the "
    "default takes the fused backward (Hopper, Triton 3.6, head dim 128, causal, from 8k tokens, no GQA)",
    build=_build_deterministic, devices=("cuda",), dtypes=("fp16", "bf16"), check=_check_deterministic,
    min_capability=(9, 0)))
