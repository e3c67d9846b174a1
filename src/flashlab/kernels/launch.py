"""A cheaper launch for the attention kernels than ``kernel[grid](...)``.

Triton's launch binds and specializes every argument (~45 for the attention kernels), looks up its
cache and reads its runtime knobs on every call: tens of microseconds of host time per launch, the
floor of a short-sequence call (docs/perf-notes.md, round 4). ``launch`` keys a cache of compiled
kernels by what Triton specializes on — each tensor's dtype and 16-byte alignment, each int's value
being 1, its divisibility by 16 and its width, None — plus the constexprs, launch options and the
current device; on a hit it calls the compiled kernel directly. A miss goes through Triton's own
launch (which compiles if needed) and caches the kernel it returns. The key is never coarser than
Triton's specialization, so a hit runs the kernel Triton would have picked.

Under the interpreter, or with ``FLASHLAB_TRITON_LAUNCH=1`` (to rule this module out when
debugging), every launch goes through Triton.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from flashlab.kernels.configs import interpreting

_compiled: dict[tuple, tuple[object, tuple]] = {}


_I32, _I64 = 2**31, 2**63


def _spec(arg: object) -> object:
    # What Triton's specialization reads from a runtime argument (native_specialize_impl, 3.6–3.9).
    # Ints first and by exact class: most arguments are strides, and this runs ~45 times a launch.
    cls = arg.__class__
    if cls is int:
        return arg == 1, not arg & 15, -_I32 <= arg < _I32, arg < _I64
    if cls is float:
        return float
    if isinstance(arg, torch.Tensor):
        return arg.dtype, not arg.data_ptr() & 15
    if cls.__name__ == "TensorDescriptor":  # a Gluon kernel's TMA descriptor (gluon_forward.py)
        # Triton specializes it on its dtype, block shape and layout (repr), not on any value.
        return cls, arg.base.dtype, tuple(arg.block_shape), repr(getattr(arg, "layout", None)), arg.padding
    return arg if arg is None or cls is bool else (cls, arg)


def direct_enabled() -> bool:
    """Whether launches may bypass Triton's ``kernel[grid](...)`` (not under the interpreter, not
    with ``FLASHLAB_TRITON_LAUNCH=1``)."""
    return not interpreting() and os.environ.get("FLASHLAB_TRITON_LAUNCH", "0") in ("", "0")


Runner = tuple[object, tuple]  # (Triton's compiled kernel, the arguments after the given ones)


def launch(kernel, grid: Sequence[int], *args: object, **named: object) -> Runner | None:
    """``kernel[grid](*args, **named)``, through a cache of compiled kernels (module docstring).

    ``args`` are the kernel's leading parameters (tensors, Gluon TensorDescriptors, ints, floats,
    bools, None); ``named`` holds the rest (constexprs; absent ones take their defaults) and launch
    options (num_warps, ...). The kernel runs on the device of ``args[0]`` (a descriptor's: its
    base's; Triton would use the current device). Returns the
    compiled kernel and its trailing arguments when it launched directly (``run_compiled`` replays
    it for arguments Triton specializes the same way), else None."""
    device = getattr(getattr(args[0], "base", args[0]), "device", None)
    if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            launch(kernel, grid, *args, **named)
        return None
    if not direct_enabled():
        kernel[grid](*args, **named)
        return None
    key = (kernel, torch.cuda.current_device(), tuple(named.items()), tuple(map(_spec, args)))
    hit = _compiled.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **named)
        if compiled is None:  # a stand-in kernel (tests): nothing to call directly
            return None
        params = list(kernel.signature.parameters.values())[len(args):]
        hit = _compiled[key] = (compiled, tuple(named.get(p.name, p.default) for p in params))
        return hit
    run_compiled(hit, grid, args)
    return hit


def run_compiled(runner: Runner, grid: Sequence[int], args: Sequence[object]) -> None:
    """Launch a compiled kernel returned by ``launch`` on the current device."""
    compiled, tail = runner
    compiled[(*grid, 1, 1)[:3]](*args, *tail)  # the compiled kernel's runner reads three grid dims
