"""The kernels compile for real GPUs (sm_90 and sm_80) with the shipped tile configs — checked on
a CPU-only machine, where the other tests run them in Triton's interpreter (see kernel_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_compile import FEATURES


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tier compiles and runs the kernels")
def test_kernels_compile_for_hopper_and_ampere() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.splitlines()
    failures = [line for line in lines if not line.startswith("ok ")]
    assert proc.returncode == 0 and not failures, "\n".join(failures) + proc.stderr[-2000:]
    # (sm_90 + sm_80 head dims) x features x kernels, the short-sequence causal backward tiles (d80/d128 x
    # dK/dV, dQ), and the TMA forward: 4 sm_90 head dims x plain/causal
    assert len(lines) == (4 + 2) * len(FEATURES) * 3 + 2 * 2 + 4 * 2
