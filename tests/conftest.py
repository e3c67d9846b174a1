"""Test setup: without a GPU, run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any flashlab kernel module is imported (triton.jit decides
then), so it is set here, at collection start.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


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
