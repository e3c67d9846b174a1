"""The environment header of every result file, and the device's measured ceilings.

Ceilings (``flashlab env``): the matmul rate per dtype (CUDA: 8192³ fp16/bf16/fp32 products;
CPU: 2048³ fp32) and, on CUDA, the device-to-device copy bandwidth (bytes read + written). They
are measured once per device and software stack and cached in
``$FLASHLAB_CACHE_DIR`` (default ``$XDG_CACHE_HOME/flashlab`` or ``~/.cache/flashlab``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from flashlab.lab.measure import time_cpu, time_cuda


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` gets the current device's index."""
    from flashlab.lab.errors import LabError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LabError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LabError(f"--device {name} was asked for but no CUDA GPU is visible to torch")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise LabError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def _git_commit() -> str | None:
    """HEAD of the checkout flashlab runs from (``-dirty`` if modified), or $FLASHLAB_GIT_COMMIT
    where the code was copied without its .git (e.g. onto a GPU machine)."""
    if os.environ.get("FLASHLAB_GIT_COMMIT"):
        return os.environ["FLASHLAB_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not there"
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and time: the header written with every result file."""
    import flashlab

    env: dict[str, Any] = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "flashlab": flashlab.__version__,
        "git_commit": _git_commit(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_sms": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 2),
            "gpu_l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "driver": _driver(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        })
    return env


def device_name(device: torch.device) -> str:
    """A short human name: the GPU's, or the CPU model with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------ ceilings
def cache_dir() -> Path:
    if os.environ.get("FLASHLAB_CACHE_DIR"):
        return Path(os.environ["FLASHLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashlab"


def _ceiling_key(device: torch.device) -> str:
    return f"{device_name(device)} | torch {torch.__version__}"


def measure_ceilings(device: torch.device) -> dict[str, Any]:
    """Measure the matmul TFLOP/s per dtype (and copy bandwidth on CUDA) now."""
    out: dict[str, Any] = {"matmul_tflops": {}}
    if device.type == "cuda":
        n = 8192
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            t = time_cuda(lambda a=a, b=b: a @ b, device, warmup_ms=50, rep_ms=200)
            out["matmul_tflops"][name] = round(2 * n**3 / (t.median_ms * 1e-3) / 1e12, 1)
            del a, b
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src), device, warmup_ms=25, rep_ms=100)
        out["copy_tb_s"] = round(2 * src.numel() / (t.median_ms * 1e-3) / 1e12, 2)
        out["fp32_matmul_note"] = f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
        del src, dst
        torch.cuda.empty_cache()
    else:
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_cpu(lambda: a @ b, min_reps=5, budget_s=1.0)
        out["matmul_tflops"]["fp32"] = round(2 * n**3 / (t.median_ms * 1e-3) / 1e12, 4)
    out["measured_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return out


def ceilings(device: torch.device, *, refresh: bool = False) -> dict[str, Any]:
    """Cached ceilings for this device and torch version, measured on first use (or ``refresh``)."""
    path = cache_dir() / "ceilings.json"
    key = _ceiling_key(device)
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if not refresh and key in cache:
        return {**cache[key], "cached": True}
    result = measure_ceilings(device)
    cache[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the numbers are still returned and written into the results header
    return {**result, "cached": False}
