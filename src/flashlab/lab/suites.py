"""Suite files: sweeps as data (TOML or YAML), shipped ones resolved by name.

A suite file holds optional ``name``, ``description``, ``providers``, ``modes``, default sweep
keys (e.g. ``dtype = "fp16"``) and one or more ``[[sweep]]`` tables; each sweep is expanded by
:func:`flashlab.lab.cases.expand_sweep` (lists multiply out). Example (the shipped ``fa-grid``)::

    name = "fa-grid"
    modes = ["fwd", "fwd+bwd"]
    dtype = "fp16"

    [[sweep]]
    tokens = 16384                 # batch = tokens / seqlen
    seqlen = [512, 1024, 2048, 4096, 8192, 16384]
    embed = 2048                   # heads = embed / head_dim
    head_dim = [64, 128, 256]
    causal = [false, true]
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashlab.lab.cases import SWEEP_KEYS, Case, expand_sweep
from flashlab.lab.errors import LabError
from flashlab.lab.flops import MODES

SUFFIXES = (".toml", ".yaml", ".yml")
TOP_KEYS = ("name", "description", "providers", "modes", "sweep")


@dataclass(frozen=True)
class Suite:
    """A loaded suite: its cases, and the providers and modes it asks for (None: the CLI's)."""

    name: str
    description: str
    source: str
    cases: tuple[Case, ...]
    providers: tuple[str, ...] | None
    modes: tuple[str, ...] | None


def shipped_suites() -> dict[str, Any]:
    """Suites shipped in ``flashlab/lab/suites``: name → resource."""
    root = importlib.resources.files("flashlab.lab") / "suites"
    out: dict[str, Any] = {}
    if root.is_dir():
        for entry in root.iterdir():
            name = entry.name
            for sfx in SUFFIXES:
                if name.endswith(sfx):
                    out[name[: -len(sfx)]] = entry
    return dict(sorted(out.items()))


def _read(text: str, suffix: str, where: str) -> dict[str, Any]:
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise LabError(f"{where}: reading TOML needs Python 3.11+ or the 'tomli' package") from None
            data = tomllib.loads(text)
        else:
            try:
                import yaml
            except ModuleNotFoundError:
                raise LabError(f"{where}: reading YAML needs the 'pyyaml' package") from None
            data = yaml.safe_load(text)
    except LabError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        msg = " ".join(str(exc).split())
        raise LabError(f"{where}: malformed suite file: {msg}") from None
    if not isinstance(data, dict):
        raise LabError(f"{where}: malformed suite file: expected a table of keys at the top level")
    return data


def _str_list(data: dict[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise LabError(f"{where}: '{key}' must be a non-empty list of names")
    return tuple(value)


def parse_suite(data: dict[str, Any], *, where: str, default_name: str) -> Suite:
    """Validate a suite's parsed contents and expand its sweeps."""
    unknown = sorted(set(data) - set(TOP_KEYS) - set(SWEEP_KEYS))
    if unknown:
        raise LabError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS + SWEEP_KEYS)})")
    sweeps = data.get("sweep")
    if isinstance(sweeps, dict):
        sweeps = [sweeps]
    if not isinstance(sweeps, list) or not sweeps or not all(isinstance(s, dict) for s in sweeps):
        raise LabError(f"{where}: needs at least one [[sweep]] table")
    modes = _str_list(data, "modes", where)
    for m in modes or ():
        if m not in MODES:
            raise LabError(f"{where}: unknown mode {m!r} (known: {', '.join(MODES)})")
    defaults = {k: v for k, v in data.items() if k in SWEEP_KEYS}
    cases: list[Case] = []
    for i, sweep in enumerate(sweeps, 1):
        merged = {**defaults, **sweep}
        if "tokens" in sweep and "batch" in defaults:
            merged.pop("batch")
        if "batch" in sweep and "tokens" in defaults:
            merged.pop("tokens")
        try:
            cases += expand_sweep(merged, where=f"{where}: sweep {i}")
        except LabError:
            raise
        except (TypeError, ValueError) as exc:
            raise LabError(f"{where}: sweep {i}: {exc}") from None
    name = data.get("name", default_name)
    description = data.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise LabError(f"{where}: 'name' and 'description' must be strings")
    return Suite(name, description, where, tuple(dict.fromkeys(cases)), _str_list(data, "providers", where), modes)


def load_suite(ref: str) -> Suite:
    """Load a suite by shipped name (``fa-grid``) or by path to a .toml/.yaml file."""
    shipped = shipped_suites()
    path = Path(ref)
    if ref in shipped and not path.exists():
        res = shipped[ref]
        suffix = Path(res.name).suffix
        return parse_suite(_read(res.read_text(encoding="utf-8"), suffix, ref), where=f"suite {ref}",
                           default_name=ref)
    if path.suffix not in SUFFIXES:
        names = ", ".join(shipped) or "none"
        raise LabError(f"unknown suite {ref!r} (shipped: {names}; or a path to a .toml/.yaml file)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LabError(f"cannot read suite file {ref}: {exc.strerror or exc}") from None
    suffix = ".yaml" if path.suffix == ".yml" else path.suffix
    return parse_suite(_read(text, suffix, str(path)), where=str(path), default_name=path.stem)
