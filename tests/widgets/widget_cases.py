"""Helpers of the panel tests (a module of its own: test modules import nothing from conftest)."""

from __future__ import annotations


def tiny(particles, out, **kw) -> dict:
    """The runs' options: fast, CPU path."""
    base = {"i": str(particles), "o": str(out / "run"), "K": 2, "iter": 3, "psi_step": 30.0,
            "offset_range": 2.0, "pool": 20, "cpu": True, "random_seed": 1}
    return base | kw
