"""Tidy result rows (one per provider × case × mode) with an environment header.

An output folder holds ``results.json`` (``{"env": …, "config": …, "rows": […]}``, rewritten
atomically after every case) and ``results.csv`` (``# key: value`` header lines with the
environment, then one row per line, appended as each case finishes). ``--resume`` reopens a
folder and skips every row already there.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from flashlab.lab.errors import LabError

COLUMNS = (
    "provider", "label", "scope", "mode", "dtype", "batch", "seqlen_q", "seqlen_k", "heads", "kv_heads",
    "head_dim", "embed", "causal", "status", "message", "time_ms", "time_q25_ms", "time_q75_ms", "reps",
    "flops", "tflops", "pct_peak", "kv_gbps", "mem_peak_mb", "mem_above_inputs_mb", "inputs_mb", "mem_method",
    "max_abs_err", "rel_err", "acc_ok", "acc_what", "device",
)
KEY_FIELDS = ("provider", "label", "scope", "mode", "dtype", "batch", "seqlen_q", "seqlen_k", "heads", "kv_heads",
              "head_dim", "causal")
JSON_NAME, CSV_NAME = "results.json", "results.csv"


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a measurement: provider, case and mode."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove a file can be written there, or raise :class:`LabError`."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".flashlab-write-test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise LabError(f"cannot write to output directory {str(out_dir)!r}: {exc.strerror or exc}") from None


class ResultStore:
    """The results of one run, kept on disk as they come in."""

    def __init__(self, out_dir: Path, env: dict[str, Any], config: dict[str, Any], *, resume: bool = False) -> None:
        self.out_dir = Path(out_dir)
        check_writable(self.out_dir)
        self.json_path, self.csv_path = self.out_dir / JSON_NAME, self.out_dir / CSV_NAME
        self.rows: list[dict[str, Any]] = []
        self.env, self.config = env, dict(config)
        if resume and self.json_path.exists():
            old_env, old_config, rows = load_results(self.json_path)
            self.rows = rows
            self.env = old_env
            self.env.setdefault("resumed_utc", []).append(env.get("time_utc"))
            self.config = {**old_config, **config}
        elif resume:
            pass  # nothing to resume: a fresh run in this folder
        elif self.json_path.exists():
            raise LabError(f"{self.json_path} already exists: pass --resume to continue that run, "
                           "or choose another --out")
        self._done = {row_key(r) for r in self.rows}
        self._write_json()
        self._rewrite_csv()

    def done(self, key: tuple[Any, ...]) -> bool:
        return key in self._done

    def add(self, row: dict[str, Any]) -> None:
        """Record one row (replacing an earlier one with the same key) and save."""
        key = row_key(row)
        if key in self._done:
            self.rows = [r for r in self.rows if row_key(r) != key]
            self.rows.append(row)
            self._rewrite_csv()
        else:
            self.rows.append(row)
            with self.csv_path.open("a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow([_flat(row.get(c)) for c in COLUMNS])
        self._done.add(key)
        self._write_json()

    def set_config(self, **items: Any) -> None:
        self.config.update(items)
        self._write_json()

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"env": self.env, "config": self.config, "rows": self.rows}, indent=1,
                                  default=str), encoding="utf-8")
        os.replace(tmp, self.json_path)

    def _rewrite_csv(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            for k, v in self.env.items():
                f.write(f"# {k}: {_flat(v)}\n")
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for row in self.rows:
                w.writerow([_flat(row.get(c)) for c in COLUMNS])
        os.replace(tmp, self.csv_path)


def load_results(path: Path | str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(env, config, rows) from a results folder or its ``results.json``; bad input → LabError."""
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabError(f"no results file at {str(p)!r}") from None
    except OSError as exc:
        raise LabError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise LabError(f"{p}: not a valid results file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise LabError(f"{p}: not a flashlab results file (expected keys env, config, rows)")
    return dict(data.get("env") or {}), dict(data.get("config") or {}), list(data["rows"])


def default_out_dir(kind: str, root: Path | str = "results") -> Path:
    """A new timestamped folder name under ``root``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{kind}-{stamp}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = Path(f"{base}-{i}")
    return out


def latest_out_dir(root: Path | str = "results") -> Path | None:
    """The most recently modified results folder under ``root`` (for ``--resume`` without ``--out``)."""
    r = Path(root)
    if not r.is_dir():
        return None
    found = [d for d in r.iterdir() if (d / JSON_NAME).exists()]
    return max(found, key=lambda d: (d / JSON_NAME).stat().st_mtime) if found else None
