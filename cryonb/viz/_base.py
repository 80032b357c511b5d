"""What every view shares: the offline bokeh extension, image scaling, small helpers.

Nothing here imports holoviews at module level: :func:`holoviews` imports it, and loads the
bokeh extension, only when a view is being built.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["ensure_extension"]

_lock = threading.Lock()
_loaded = False


def ensure_extension(force: bool = False) -> None:
    """Load holoviews' bokeh extension with BokehJS inline (works without internet).

    Call it first in a notebook, before any other holoviews, hvplot or panel extension
    load: BokehJS then travels inside the notebook instead of coming from a CDN, which is
    unreachable on offline machines (plots would stay blank with no error). Every view calls
    it too, so that a view built first still loads the extension.

    Parameters
    ----------
    force : bool, default False
        Load again even if already loaded in this process, e.g. after the browser page was
        reloaded on a kernel that kept running (a reattached kernel otherwise sends no
        BokehJS to the new page).

    Notes
    -----
    Idempotent and thread-safe. Also sets ``panel.config.inline``, so that the stylesheets of
    panel's widgets (e.g. the map viewer's sliders) are inlined too instead of coming from
    its CDN. Adds about 6 MB of JavaScript to the cell's output the first time in a
    notebook: keep outputs out of committed notebooks. Returns nothing, so that a cell
    ending with it shows no output of its own.
    """
    global _loaded
    import holoviews as hv
    import panel as pn

    with _lock:
        if force or not _loaded:
            pn.config.inline = True  # type: ignore[misc]  # a settable property
            hv.extension("bokeh", inline=True, logo=False)
            _loaded = True


class LiveView:
    """Display of the live objects: through panel, whose path also inlines the widgets'
    stylesheets (see :func:`ensure_extension`). Subclasses define ``view()``."""

    def view(self) -> Any:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __panel__(self) -> Any:
        """The view as a panel object (for ``pn.panel(...)``; how the object displays)."""
        import panel as pn

        return pn.pane.HoloViews(self.view())

    def _repr_mimebundle_(self, include=None, exclude=None) -> Any:
        return self.__panel__()._repr_mimebundle_(include, exclude)


def holoviews() -> ModuleType:
    """:mod:`holoviews` with the bokeh extension loaded (see :func:`ensure_extension`)."""
    ensure_extension()
    import holoviews as hv

    return hv


def scale_unit(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale an image (or each image of a stack) to [0, 1] between two percentiles.

    Parameters
    ----------
    image : numpy.ndarray, shape (y, x) or (n, y, x)
        One image or a stack; a stack is scaled image by image.
    low, high : float
        Percentiles mapped to 0 and 1 (values beyond are clipped).

    Returns
    -------
    numpy.ndarray, float32, same shape
        Constant images (or NaN-only ones) become 0.5.
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        return scale_unit(a[np.newaxis], low, high)[0]
    flat = a.reshape(len(a), -1)
    finite = np.isfinite(flat)
    if finite.all():
        lo, hi = np.percentile(flat, [low, high], axis=1)
    else:
        lo, hi = (np.nanpercentile(np.where(finite, flat, np.nan), q, axis=1) if finite.any()
                  else np.zeros(len(a)) for q in (low, high))
    lo = np.nan_to_num(lo)[:, None, None]
    span = np.nan_to_num(hi)[:, None, None] - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1), 0.5)
    return np.clip(np.nan_to_num(out, nan=0.5), 0, 1).astype(np.float32)


def value_range(data: np.ndarray, low: float = 0.1, high: float = 99.9) -> tuple[float, float]:
    """Colour limits of ``data``: two percentiles of its finite values (never equal)."""
    a = np.asarray(data, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(a, [low, high]))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def plural(n: int, word: str) -> str:
    """``'1 class'``, ``'3 classes'`` (English ``-s``/``-es`` plurals only)."""
    suffix = "es" if word.endswith(("s", "x", "sh", "ch")) else "s"
    return f"{n} {word}{suffix * (n != 1)}"
