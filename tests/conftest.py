"""Test setup: without a GPU, run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any flashlab kernel module is imported (triton.jit decides
then), so it is set here, at collection start.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
if os.environ.get("TRITON_INTERPRET") == "1":
    # flashlab imports its kernels at their first launch, and triton.jit picks interpreted or compiled
    # then. Tests of the CPU path switch the interpreter off for a while: import every kernel now,
    # so that none is first imported inside such a test (compiled, then called from interpreted code).
    import flashlab.kernels.backward  # noqa: F401
    import flashlab.kernels.decode  # noqa: F401
    import flashlab.kernels.forward  # noqa: F401
    import flashlab.kernels.scores  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where the kernel tests run: the GPU if there is one, else the interpreter on the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
