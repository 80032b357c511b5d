"""External tools in tests: skip on a laptop without them, fail in CI (``CI=true``).

Every program a test needs (RELION's, ``mpirun``, Chromium) must be installed by ``.ci/run``;
a test that silently skipped in CI would hide a missing install step.
"""

from __future__ import annotations

import os
import shutil

__all__ = ["IN_CI", "missing", "require_module", "require_tool"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str):
    """Skip the calling test (laptop) or fail it (CI) because ``what`` is not available."""
    import pytest

    if IN_CI:
        pytest.fail(f"{what} is missing in CI: .ci/run must install it")
    pytest.skip(f"{what} not available")


def require_tool(name: str) -> str:
    """Path of the program ``name``; skip (laptop) or fail (CI) without it."""
    path = shutil.which(name)
    if path is None:
        missing(f"program {name!r}")
    return path


def require_module(name: str):
    """Import and return module ``name``; skip (laptop) or fail (CI) without it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name!r}")
