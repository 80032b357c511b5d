"""Attributes of a package imported on first access (PEP 562), for cheap package imports."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str],
                 names: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose public names live in submodules.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    where : mapping of str to str
        Public name -> submodule (relative, e.g. ``"_panel"``) that defines it.
    names : iterable of str
        The package's ``__all__``.

    Returns
    -------
    (__getattr__, __dir__)
        Assign them at the package's top level. A name is imported on first access and then
        stored in the package, so later accesses cost nothing.
    """
    listed = sorted(names)

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
