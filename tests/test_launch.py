"""kernels/launch.py: the cache of compiled kernels hits only where Triton's specialization agrees.

The cache logic runs here with a stand-in kernel (no GPU needed); the real kernels go through it in
every GPU test."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from flashlab.kernels import launch as launch_module


class _Compiled:
    def __init__(self, log: list) -> None:
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Kernel:
    """Stands in for a @triton.jit function: ``kernel[grid](...)`` logs and returns a compiled kernel."""

    def __init__(self) -> None:
        self.log: list = []
        self.signature = inspect.signature(lambda X, n, scale, BLOCK, FLAG=False: None)

    def __getitem__(self, grid):
        def run(*args, **named):
            self.log.append(("triton", grid, args, named))
            return _Compiled(self.log)
        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(launch_module, "direct_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch_module, "_compiled", {})


def test_second_launch_runs_the_compiled_kernel_with_every_parameter(direct):
    kernel, x = _Kernel(), torch.zeros(64)
    launch_module.launch(kernel, (2, 1, 1), x, 32, 0.5, BLOCK=16, num_warps=4)
    launch_module.launch(kernel, (3, 1, 1), x, 48, 0.25, BLOCK=16, num_warps=4)
    assert [entry[0] for entry in kernel.log] == ["triton", "direct"]
    # constexprs in parameter order after the runtime arguments, defaults filled in; options dropped
    assert kernel.log[1] == ("direct", (3, 1, 1), (x, 48, 0.25, 16, False))
    launch_module.launch(kernel, (5,), x, 64, 0.5, BLOCK=16, num_warps=4)  # a 1-D grid gets its other two dims
    assert kernel.log[2] == ("direct", (5, 1, 1), (x, 64, 0.5, 16, False))


@pytest.mark.parametrize("change", ["int is 1", "int not multiple of 16", "int64", "misaligned pointer", "dtype",
                                    "constexpr", "launch option", "None"])
def test_what_triton_specializes_on_misses_the_cache(direct, change):
    kernel, x = _Kernel(), torch.zeros(64)
    args, named = [x, 32, 0.5], {"BLOCK": 16, "num_warps": 4}
    launch_module.launch(kernel, (1,), *args, **named)
    if change == "int is 1":
        args[1] = 1
    elif change == "int not multiple of 16":
        args[1] = 33
    elif change == "int64":
        args[1] = 2**40
    elif change == "misaligned pointer":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        named["BLOCK"] = 32
    elif change == "launch option":
        named["num_warps"] = 8
    else:
        args[0] = None
    launch_module.launch(kernel, (1,), *args, **named)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_launches_on_the_device_of_the_first_tensor(direct, monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: the launch (and its cache entry) is on cuda:1."""
    current = [0]

    @contextlib.contextmanager
    def on(device):
        before, current[0] = current[0], device.index
        yield
        current[0] = before

    class OnSecondGpu:  # what launch reads of a tensor on cuda:1, without a GPU here
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", on)
    kernel = _Kernel()
    launch_module.launch(kernel, (1,), OnSecondGpu(), 16, 1.0, BLOCK=16)
    assert [key[1] for key in launch_module._compiled] == [1] and current == [0]


def test_interpreter_always_launches_through_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = _Kernel()
    for _ in range(2):
        launch_module.launch(kernel, (1,), torch.zeros(4), 16, 1.0, BLOCK=16)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_a_gluon_descriptor_is_keyed_as_triton_specializes_it():
    """Gluon TMA descriptors: one compiled kernel per (dtype, block shape, layout, padding) — never
    per tensor, shape or stride (Triton passes those at launch), so a new call's descriptor hits."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashlab.gluon_forward import tile_descriptor, tile_view
    from flashlab.kernels.launch import _spec

    def desc(shape, rows=64, dtype=torch.float16):
        return tile_descriptor(tile_view(torch.randn(*shape).to(dtype))[0], rows, shape[-1])

    a = desc((2, 256, 4, 64))
    assert _spec(a) == _spec(desc((3, 100, 2, 64)))  # other tensor, shape, strides: the same kernel
    assert _spec(a) != _spec(desc((2, 256, 4, 64), rows=128))
    assert _spec(a) != _spec(desc((2, 256, 4, 64), dtype=torch.bfloat16))
    assert _spec(a) != _spec(desc((2, 256, 4, 128)))
    hash(_spec(a))
    assert a.block_shape == [1, 64, 64] and a.shape == [2, 256, 256] and a.padding == "zero"
