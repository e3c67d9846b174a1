"""The provider registry: name → attention implementation + what it can run + why not.

A provider builds, for one case on one device, an :class:`Attn`: a callable ``fn(q, k, v)`` in
its own layout (``"bshd"`` like flash-attn, ``"bhsd"`` like PyTorch) with the case's causal flag
and scale bound, and the corner its causal mask is aligned to. Whether it can run is answered in
two steps: :meth:`Provider.unavailable` (package missing, no GPU, GPU too old) and
:meth:`Provider.unsupported` (dtype, head dim, mask alignment for this case). Errors raised
while running are classified by :mod:`flashlab.lab.measure`.

More providers can be registered from plugin modules named in ``FLASHLAB_LAB_PLUGINS``
(comma-separated module names, imported on first use; each calls :func:`register`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from flashlab.lab import feature_providers as fp
from flashlab.lab.cases import DTYPES, Case
from flashlab.lab.errors import LabError
from flashlab.lab.features import has_features

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Attn:
    """An attention callable for one case: ``fn(q, k, v) -> out``, all in ``layout``; ``context``
    is entered around each measured step, forward and backward (a provider that switches kernels)."""

    fn: AttnFn
    layout: str  # "bshd" | "bhsd" | varlen only: "packed" (total, h, d), "packed-bhsd" (1, h, total, d)
    causal_align: str  # "bottom_right" | "top_left" (same result when seqlen_q == seqlen_k)
    context: Callable[[], AbstractContextManager] = nullcontext


@dataclass(frozen=True)
class Provider:
    """A registered attention implementation.

    ``build(case, device)`` returns an :class:`Attn`. ``requires()`` returns why the provider
    cannot run at all (missing package), or None. ``check(case, device)`` returns why it cannot
    run one case, or None. ``default_on`` lists the device types where the study and ``bench``
    use it when no ``--providers`` are given.
    """

    name: str
    description: str
    build: Callable[[Case, torch.device], Attn]
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] = DTYPES
    requires: Callable[[], str | None] = lambda: None
    check: Callable[[Case, torch.device], str | None] = lambda case, device: None
    min_capability: tuple[int, int] | None = None
    default_on: tuple[str, ...] = field(default=())

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run on ``device`` at all, or None."""
        if device.type not in self.devices:
            return f"runs on {' or '.join(self.devices)} only, not {device.type}"
        why = self.requires()
        if why:
            return why
        if device.type == "cuda" and self.min_capability is not None:
            cap = torch.cuda.get_device_capability(device)
            if cap < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                return f"needs GPU compute capability {need}+, this GPU is {cap[0]}.{cap[1]}"
        return None

    def unsupported(self, case: Case, device: torch.device) -> str | None:
        """Why this provider cannot run ``case`` on ``device``, or None."""
        why = self.unavailable(device)
        if why:
            return why
        if case.dtype not in self.dtypes:
            return f"no {case.dtype} support (supports {', '.join(self.dtypes)})"
        return self.check(case, device)


_REGISTRY: dict[str, Provider] = {}
_PLUGINS_LOADED: set[str] = set()


def register(provider: Provider) -> Provider:
    """Add (or replace) a provider in the registry."""
    _REGISTRY[provider.name] = provider
    return provider


def load_plugins() -> None:
    """Import the modules named in ``FLASHLAB_LAB_PLUGINS`` (once each)."""
    for mod in filter(None, (m.strip() for m in os.environ.get("FLASHLAB_LAB_PLUGINS", "").split(","))):
        if mod not in _PLUGINS_LOADED:
            try:
                importlib.import_module(mod)
            except ImportError as exc:
                raise LabError(f"cannot import provider plugin {mod!r} (FLASHLAB_LAB_PLUGINS): {exc}") from None
            _PLUGINS_LOADED.add(mod)


def registry() -> dict[str, Provider]:
    """All registered providers, plugins included."""
    load_plugins()
    return dict(_REGISTRY)


def get_provider(name: str) -> Provider:
    """Look a provider up by name; unknown names raise :class:`LabError`."""
    reg = registry()
    if name not in reg:
        raise LabError(f"unknown provider {name!r} (known: {', '.join(reg)})")
    return reg[name]


def resolve_providers(names: list[str] | tuple[str, ...] | None, device: torch.device) -> list[Provider]:
    """The providers to run: the named ones (validated), or the available defaults for the device."""
    if names:
        return [get_provider(n) for n in dict.fromkeys(names)]
    return [p for p in registry().values() if device.type in p.default_on and p.unavailable(device) is None]


def _scale(case: Case) -> float:
    return 1.0 / math.sqrt(case.head_dim)


def _needs_module(module: str, package: str) -> Callable[[], str | None]:
    def requires() -> str | None:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"{package} is not installed (import {module} failed)"
    return requires


# ---------------------------------------------------------------- naive: flashlab.reference
def naive_attn(case: Case, layout: str = "bhsd", causal_align: str = "bottom_right") -> Attn:
    """The naive attention of ``flashlab.reference`` (materializes the scores) as an :class:`Attn`."""
    from flashlab.reference import naive_attention

    if case.dropout:
        raise NotImplementedError("the naive attention has no random dropout (reference.naive_attention takes an "
                                  "explicit keep pattern)")
    if has_features(case):
        kwargs: dict[torch.device, dict] = {}

        def fn_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if q.device not in kwargs:  # masks built once per device, outside the timed runs after the first
                kwargs[q.device] = fp.naive_kwargs(case, q.device, layout)
            return naive_attention(q, k, v, causal_align=causal_align, **kwargs[q.device])
        return Attn(fn_features, layout, causal_align)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return naive_attention(q, k, v, causal=case.causal, softmax_scale=_scale(case), layout=layout,
                               causal_align=causal_align)
    return Attn(fn, layout, causal_align)


register(Provider(
    "naive", "the original PyTorch attention: matmul, softmax, matmul; materializes the scores "
    "(flashlab.reference.naive_attention)",
    build=lambda case, device: naive_attn(case), default_on=("cpu", "cuda")))


# ---------------------------------------------------------------- flashlab
def _build_flashlab(case: Case, device: torch.device) -> Attn:
    import flashlab

    scale = _scale(case)
    if has_features(case):
        fn_f, layout = fp.flashlab_fn(case, device)
        return Attn(fn_f, layout, "bottom_right")
    if device.type == "cuda":
        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flashlab.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal)
        return Attn(fn, "bshd", "bottom_right")
    gqa = case.kv_heads != case.heads

    def fn_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flashlab.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=scale, enable_gqa=gqa)
    return Attn(fn_cpu, "bhsd", "top_left")


def _check_flashlab(case: Case, device: torch.device) -> str | None:
    if device.type == "cuda" and case.dtype not in ("fp16", "bf16"):
        return f"flashlab's GPU kernels take fp16/bf16, not {case.dtype}"
    return None  # the CPU path takes every lab dtype, feature cases included


def _check_flashlab_loop(case: Case, device: torch.device) -> str | None:
    if not case.varlen:
        return "a per-sequence loop is only for varlen cases"
    return _check_flashlab(case, device)


def _check_flashlab_sdpa(case: Case, device: torch.device) -> str | None:
    if case.softcap:
        return "the SDPA drop-in has no softcap (the 'flashlab' provider's flash_attn_func has)"
    return _check_flashlab(case, device)


register(Provider(
    "flashlab", "flashlab: flash_attn_func (Triton FlashAttention-2) on CUDA; on CPU the blockwise "
    "online-softmax path of flashlab.scaled_dot_product_attention",
    build=_build_flashlab, check=_check_flashlab, default_on=("cpu", "cuda")))


def _build_flashlab_sdpa(case: Case, device: torch.device) -> Attn:
    import flashlab

    if has_features(case):  # the dense attn_mask PyTorch SDPA gets, not flashlab's block masks
        return Attn(*fp.flashlab_sdpa_fn(case, device, TORCH_DTYPES[case.dtype]), "top_left")
    scale, gqa = _scale(case), case.kv_heads != case.heads

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flashlab.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=scale, enable_gqa=gqa)
    return Attn(fn, "bhsd", "top_left")


register(Provider(
    "flashlab-sdpa", "flashlab.scaled_dot_product_attention (PyTorch layout, drop-in for F.sdpa; feature cases "
    "get the same dense attn_mask / dropout_p as PyTorch SDPA)",
    build=_build_flashlab_sdpa, check=_check_flashlab_sdpa))
register(Provider(
    "flashlab-kvcache", "flashlab.flash_attn_with_kvcache (the decoding path: split-KV, GQA rows in one tile) "
    "on a full cache of seqlen_k keys",
    build=lambda case, device: Attn(*fp.kvcache_fn(case), "bottom_right"), check=fp.kvcache_unsupported))
register(Provider(
    "flashlab-loop", "flashlab.flash_attn_func called once per sequence of a varlen batch (varlen cases only)",
    build=lambda case, device: Attn(*fp.flashlab_loop_fn(case, device), "bottom_right"),
    check=_check_flashlab_loop))


# ---------------------------------------------------------------- PyTorch SDPA
def _sdpa_builder(backend: str | None) -> Callable[[Case, torch.device], Attn]:
    def build(case: Case, device: torch.device) -> Attn:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        scale, gqa = _scale(case), case.kv_heads != case.heads
        kw: dict[str, object] = {"enable_gqa": True} if gqa else {}
        causal = case.causal
        if has_features(case):
            mask, causal = fp.sdpa_args(case, device, TORCH_DTYPES[case.dtype])
            if mask is not None:
                kw["attn_mask"] = mask
            if case.dropout:
                kw["dropout_p"] = float(case.dropout)
        if backend is None:
            def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)
        else:
            forced = getattr(SDPBackend, backend)

            def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                with sdpa_kernel(forced):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)
        return Attn(fn, "bhsd", "top_left")
    return build


def _sdpa_checker(backend: str | None) -> Callable[[Case, torch.device], str | None]:
    def check(case: Case, device: torch.device) -> str | None:
        if case.causal and case.seqlen_q != case.seqlen_k:
            return "PyTorch SDPA aligns the causal mask top-left; cases with seqlen_q != seqlen_k are skipped"
        return fp.sdpa_unsupported(case, backend) if has_features(case) else None
    return check


for _name, _backend, _devices, _default, _desc in (
    ("sdpa", None, ("cpu", "cuda"), ("cuda",), "PyTorch F.scaled_dot_product_attention, backend chosen by PyTorch"),
    ("sdpa-flash", "FLASH_ATTENTION", ("cpu", "cuda"), ("cpu", "cuda"),
     "PyTorch SDPA forced to its flash backend (FlashAttention-2 on CUDA; a flash kernel on CPU)"),
    ("sdpa-efficient", "EFFICIENT_ATTENTION", ("cuda",), ("cuda",),
     "PyTorch SDPA forced to its memory-efficient (xformers) backend"),
    ("sdpa-cudnn", "CUDNN_ATTENTION", ("cuda",), ("cuda",), "PyTorch SDPA forced to its cuDNN backend"),
    ("sdpa-math", "MATH", ("cpu", "cuda"), ("cpu", "cuda"),
     "PyTorch SDPA forced to its math backend (materializes the scores)"),
):
    register(Provider(_name, _desc, build=_sdpa_builder(_backend), devices=_devices, check=_sdpa_checker(_backend),
                      default_on=_default))


# ---------------------------------------------------------------- FlexAttention
from flashlab.lab import flex_provider  # noqa: E402, F401 - registers flex (here: the listing's order)


# ---------------------------------------------------------------- flash-attn packages
def _out_only(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result  # type: ignore[return-value]


def _flash_pkg_builder(module: str, attr: str) -> Callable[[Case, torch.device], Attn]:
    def build(case: Case, device: torch.device) -> Attn:
        if has_features(case):
            got = fp.flash_pkg_fn(case, module)
            if isinstance(got, str):
                raise NotImplementedError(got)
            return Attn(got[0], got[1], "bottom_right")
        func = getattr(importlib.import_module(module), attr)
        scale = _scale(case)

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _out_only(func(q, k, v, softmax_scale=scale, causal=case.causal))
        return Attn(fn, "bshd", "bottom_right")
    return build


for _name, _module, _attr, _pkg, _cap, _desc in (
    ("flash-attn", "flash_attn", "flash_attn_func", "flash-attn (FlashAttention-2)", (8, 0),
     "Tri Dao's flash-attn package, FlashAttention-2 (flash_attn.flash_attn_func)"),
    ("fa3", "flash_attn_interface", "flash_attn_func", "FlashAttention-3 (flash-attn hopper build)", (9, 0),
     "FlashAttention-3 for Hopper (flash_attn_interface.flash_attn_func)"),
    ("fa4", "flash_attn.cute", "flash_attn_func", "FlashAttention-4 (flash-attn-cute)", (9, 0),
     "FlashAttention-4, CuTe DSL (flash_attn.cute.flash_attn_func)"),
):
    register(Provider(_name, _desc, build=_flash_pkg_builder(_module, _attr), devices=("cuda",),
                      dtypes=("fp16", "bf16"), requires=_needs_module(_module, _pkg), min_capability=_cap,
                      default_on=("cuda",)))

from flashlab.lab import switch_providers  # noqa: E402, F401 - registers flashlab-tl
