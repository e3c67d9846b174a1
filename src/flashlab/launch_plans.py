"""Replays of recorded kernel launches: less host time for a call repeated with the same shapes.

A training step calls attention with the same shapes every time, yet each eager call re-derives
~45 launch arguments per kernel (tile config, strides, grid, constexprs) and rebuilds the compiled-
kernel cache key of ``kernels/launch.py`` from them: at short sequences that host time, not the GPU,
sets the pace (docs/perf-notes.md, rounds 4–5). A *plan* records the launches a launcher makes on the
first call with a given signature — kernel, grid, arguments, constexprs, with each tensor argument
replaced by its slot among the call's tensors — and later calls with that signature fill the slots
and launch (through the compiled kernel directly once ``launch`` has returned it for the same
pointer alignments on the current device).

The signature must fix every non-tensor argument the launcher derives: callers build it from the
tensors' shapes, strides, dtype and device and every option the launch reads, and pass None (no
plan) for calls whose arguments vary otherwise (a dropout seed) or whose tensors the launcher
replaces by views. A launcher that passes a tensor not among the call's tensors, or a tensor after a
non-tensor argument, gets no plan (recorded as such; it always runs unplanned); so does one that
returns ``UNPLANNED`` (it launched something outside the function it was given: the Gluon kernels,
the TMA forward). A launcher that needs a scratch tensor (a split GQA group's fp32 partials) takes it
from ``scratch(launch_fn, ...)``: recorded, a replay allocates one alike and passes it where the
recorded call passed its own. Under Triton's interpreter plans still skip the derivation;
``FLASHLAB_LAUNCH_PLANS=0`` turns them off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import torch

from flashlab.kernels import launch as launch_module
from flashlab.kernels.configs import interpreting

MAX_PLANS = 1024  # signatures kept; a process that exceeds it starts over (shapes that never repeat)

LaunchFn = Callable[..., object]
UNPLANNED = object()  # a launcher's return value: some of its launches bypassed the launch function


@dataclass
class _Step:
    """One recorded launch."""

    kernel: object
    grid: tuple[int, ...]
    slots: tuple[int, ...]  # its leading tensor arguments, as indices into the call's tensors
    static: tuple  # the arguments after them
    named: dict
    runners: dict = field(default_factory=dict)  # pointer alignments -> launch.Runner

    def __post_init__(self) -> None:
        if len(self.slots) > 1:
            self.pick = itemgetter(*self.slots)
        else:  # itemgetter returns a bare item for one slot
            self.pick = lambda tensors: tuple(tensors[i] for i in self.slots)


@dataclass
class _Scratch:
    """A scratch tensor the recorded launcher allocated: replays allocate one alike (torch.empty) and
    append it to the call's tensors, where the recorded launches found it."""

    shape: tuple[int, ...]
    dtype: torch.dtype


_plans: dict[tuple, list[_Step | _Scratch] | None] = {}


def scratch(launch_fn: LaunchFn, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor for a launcher's launches through ``launch_fn``; under ``run`` its
    allocation is part of the plan (a replay makes a fresh one)."""
    alloc = getattr(launch_fn, "scratch", None)
    if alloc is not None:
        return alloc(tuple(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def enabled() -> bool:
    return os.environ.get("FLASHLAB_LAUNCH_PLANS", "1") != "0"


def layout(*tensors: torch.Tensor | None) -> tuple:
    """The part of a signature the tensors give: dtype, shape and strides of each (None when absent),
    the device and whether Triton's interpreter runs the kernels (it changes the tiles)."""
    first = tensors[0]
    return (first.device, interpreting(), *[None if t is None else (t.dtype, t.shape, t.stride()) for t in tensors])


def run(signature: tuple | None, tensors: Sequence[torch.Tensor | None],
        launcher: Callable[[LaunchFn], object]) -> None:
    """``launcher(launch)``, or a replay of what it launched for an earlier call with ``signature``.

    ``tensors`` are every tensor the launcher passes to its kernels (inputs and the outputs the
    caller allocated; None for an absent optional one); ``launcher`` makes its launches through
    the function it is given, or returns UNPLANNED."""
    if signature is None or not enabled():
        launcher(launch_module.launch)
        return
    tensors = [t for t in tensors if t is not None]
    # Which of the tensors are the same object is part of the signature: a plan recorded for f(q, x, x)
    # must not serve f(q, k, v).
    ids = tuple(map(id, tensors))
    signature = (signature, tuple(map(ids.index, ids)))
    if signature in _plans:
        steps = _plans[signature]
        if steps is None:
            launcher(launch_module.launch)
        else:
            _replay(steps, tensors)
        return
    recorded: list[tuple | _Scratch] = []

    def record(kernel, grid, *args, **named):
        recorded.append((kernel, tuple(grid), args, named))
        return launch_module.launch(kernel, grid, *args, **named)

    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=tensors[0].device)
        recorded.append(_Scratch(shape, dtype))
        tensors.append(t)  # later launches find it among the call's tensors
        return t
    record.scratch = allocate

    bypassed = launcher(record) is UNPLANNED
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[signature] = None if bypassed else _plan(recorded, tensors)


def _plan(recorded: list[tuple | _Scratch], tensors: Sequence[torch.Tensor]) -> list[_Step | _Scratch] | None:
    steps: list[_Step | _Scratch] = []
    for item in recorded:
        if isinstance(item, _Scratch):
            steps.append(item)
            continue
        kernel, grid, args, named = item
        lead = 0
        while lead < len(args) and isinstance(args[lead], torch.Tensor):
            lead += 1
        if any(isinstance(a, torch.Tensor) for a in args[lead:]):
            return None
        slots = []
        for arg in args[:lead]:
            slot = next((i for i, t in enumerate(tensors) if t is arg), None)
            if slot is None:
                return None
            slots.append(slot)
        steps.append(_Step(kernel, grid, tuple(slots), args[lead:], dict(named)))
    return steps


def _direct(device: torch.device) -> bool:
    """Whether compiled kernels may be called directly for tensors on ``device`` (launch.py)."""
    return device.type == "cuda" and launch_module.direct_enabled() and device.index == torch.cuda.current_device()


def _replay(steps: list[_Step | _Scratch], tensors: list[torch.Tensor]) -> None:
    device = tensors[0].device
    direct = _direct(device)
    # Triton specializes pointers on 16-byte alignment: one compiled kernel per alignment pattern.
    aligned = tuple(not t.data_ptr() & 15 for t in tensors) if direct else None
    for step in steps:
        if isinstance(step, _Scratch):
            tensors.append(torch.empty(step.shape, dtype=step.dtype, device=device))
            if direct:
                aligned += (True,)  # the caching allocator's blocks are 512-byte aligned
            continue
        args = step.pick(tensors) + step.static
        runner = step.runners.get(aligned) if direct else None
        if runner is not None:
            launch_module.run_compiled(runner, step.grid, args)
            continue
        runner = launch_module.launch(step.kernel, step.grid, *args, **step.named)
        if direct and runner is not None:
            step.runners[aligned] = runner
