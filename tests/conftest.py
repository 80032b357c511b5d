"""Shared fixtures: backends, the shared real-data folder, external tools.

- ``xp``: parametrised over NumPy and (when a GPU is usable) CuPy, as scipy's conftest does.
- ``shared_data``: ``../shared/data`` beside the checkout (or ``$CRYONB_SHARED_DATA``).
- ``require_tool(name)``: skip when an external program is missing on a laptop, but FAIL in
  CI (``CI=true``), where every tool the tests use must be installed by ``.ci/run``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cryonb.backend import gpu_available
from cryonb.testing.tools import IN_CI, missing, require_tool  # noqa: F401  (re-export)

ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("CRYONB_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = _shared_data_dir()
    if not d.is_dir():
        missing(f"shared data folder {d}")
    return d


_BACKENDS = ["numpy"] + (["cupy"] if gpu_available() else [])


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """Array module under test; the CuPy case is a GPU test and skips without a GPU."""
    if request.param == "numpy":
        return np
    if "cupy" not in _BACKENDS:
        pytest.skip("no usable GPU (CuPy)")
    import cupy

    return cupy


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "xp" in getattr(item, "fixturenames", ()) and "[cupy" in item.nodeid:
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("gpu") and not gpu_available():
            item.add_marker(pytest.mark.skip(reason="no usable GPU (CuPy)"))
