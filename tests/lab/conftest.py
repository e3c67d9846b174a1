"""Lab tests: CPU only, tiny shapes; test providers come from lab_plugins.py."""

from __future__ import annotations

import pytest

from flashlab.lab import providers


@pytest.fixture(scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("flashlab-cache")


@pytest.fixture(autouse=True)
def lab_env(monkeypatch: pytest.MonkeyPatch, _cache_dir):
    """Plugins on, ceilings cached once per session in a temp dir, no stray interrupt.

    tests/conftest.py turns on Triton's interpreter for the kernel tests; the lab measures
    flashlab's CPU path as a user gets it (blockwise PyTorch), so it is off here.
    """
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FLASHLAB_LAB_PLUGINS", "lab_plugins")
    monkeypatch.setenv("FLASHLAB_CACHE_DIR", str(_cache_dir))
    monkeypatch.delenv("FLASHLAB_TEST_INTERRUPT_AT", raising=False)
    providers.load_plugins()
    yield


# fast timing for every CLI run in these tests
FAST = ["--cpu-repeats", "2", "--cpu-budget", "0", "--device", "cpu"]
