"""CPU peak memory of one run, measured in a fresh process.

Method (Linux): a helper process (``python -m flashlab.lab.memprobe``) imports torch, flashlab
and the providers once, then forks a fresh child for every measurement. The child

1. runs the provider once on a tiny case of the same kind (loads libraries, starts thread pools),
2. allocates the case's inputs (and for ``bwd`` runs the forward whose graph the backward needs),
3. resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmRSS``:
   the baseline — the process doing nothing but holding its inputs,
4. runs the measured step once and reads ``VmHWM``, the peak resident set size since the reset.

"Above inputs" is ``VmHWM − baseline``; "total" is ``VmHWM`` (the whole process, torch's own
runtime included). A fresh child per measurement keeps one case's freed-but-cached memory from
hiding the next case's allocations. ``in_process`` runs the same steps in the calling process
(faster, but memory freed earlier may be reused and hide allocations: an approximation).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch

from flashlab.lab.cases import Case

PAGE_KB = 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * PAGE_KB
    raise OSError(f"{field} not in /proc/self/status")


def supported() -> str | None:
    """Why CPU peak memory cannot be measured here, or None."""
    if not sys.platform.startswith("linux"):
        return "CPU peak memory needs Linux (/proc/self/clear_refs and VmHWM)"
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        _status_kb("VmHWM")
    except OSError as exc:
        return f"cannot reset the peak RSS mark: {exc}"
    return None


def _tiny(case: Case) -> Case:
    s = min(case.seqlen_q, 16)
    return dataclasses.replace(case, batch=1, seqlen_q=s, seqlen_k=min(case.seqlen_k, s) if case.scope == "op" else s)


def measure_here(case: Case, provider_name: str, mode: str, seed: int = 0) -> dict[str, Any]:
    """Steps 1–4 above in the current process; returns a dict with ``status`` and byte counts."""
    from flashlab.lab.measure import classify
    from flashlab.lab.providers import get_provider
    from flashlab.lab.workload import Workload

    device = torch.device("cpu")
    try:
        provider = get_provider(provider_name)
        warm = Workload(_tiny(case), provider.build(_tiny(case), device), device, requires_grad=mode != "fwd")
        warm.mode_fn(mode)()
        del warm
        wl = Workload(case, provider.build(case, device), device, requires_grad=mode != "fwd", seed=seed)
        fn = wl.mode_fn(mode)
        wl.clear_grads()
        gc.collect()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
        return {"status": "ok", "mem_peak_bytes": peak, "mem_above_bytes": max(0, peak - base),
                "input_bytes": wl.input_bytes}
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        status, msg = classify(exc)
        return {"status": status, "message": msg}


def _serve() -> None:
    """The helper process: one JSON request per stdin line, one JSON answer per stdout line."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything else printed stays off the answer channel
    threads = int(os.environ.get("FLASHLAB_MEMPROBE_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    import flashlab.lab.providers as providers
    import flashlab.lab.workload  # noqa: F401 - imported before forking, once

    providers.load_plugins()
    gc.freeze()  # the children's gc.collect() then skips the imported modules' objects
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fresh child
            os.close(r)
            try:
                ans = measure_here(Case.from_dict(req["case"]), req["provider"], req["mode"], req.get("seed", 0))
                payload = json.dumps(ans).encode()
            except BaseException as exc:  # noqa: BLE001
                payload = json.dumps({"status": "error", "message": f"{type(exc).__name__}: {exc}"[:300]}).encode()
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, wstatus = os.waitpid(pid, 0)
        if data:
            out.write(data.decode() + "\n")
        else:
            sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
            why = f"killed by signal {sig} (out of host memory?)" if sig else "exited without an answer"
            status = "oom" if sig == 9 else "error"
            out.write(json.dumps({"status": status, "message": f"memory probe child {why}"}) + "\n")


class CpuMemoryProbe:
    """Client of the helper process; start it once per run, call :meth:`measure` per case."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["FLASHLAB_MEMPROBE_THREADS"] = str(torch.get_num_threads())
        # A fixed mmap threshold (glibc): large temporaries are mapped and unmapped on free, so the
        # peak RSS follows live memory. glibc's default raises the threshold as blocks are freed,
        # after which a loop of freed 512 KB temporaries grew the forked child's RSS by their sum.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        self._proc = subprocess.Popen([sys.executable, "-m", "flashlab.lab.memprobe"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        return self._proc

    def measure(self, case: Case, provider: str, mode: str, seed: int = 0) -> dict[str, Any]:
        """Peak memory of one ``mode`` step of ``provider`` on ``case`` in a fresh process."""
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"case": case.to_dict(), "provider": provider, "mode": mode,
                                         "seed": seed}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self._log.seek(0)
            tail = " ".join(self._log.read().strip().splitlines()[-1:])[:200]
            self.close()
            return {"status": "error", "message": f"memory probe process died: {tail}"}
        return json.loads(line)

    def close(self) -> None:
        """Stop the helper process."""
        if self._proc is not None:
            try:
                if self._proc.stdin:
                    self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
            self._proc = None

    def __enter__(self) -> CpuMemoryProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve()
