"""Convergence per iteration: log-likelihood, average Pmax, changes, resolution."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd

from ._base import LiveView, holoviews
from ._readers import CONVERGENCE_COLUMNS, read_convergence

__all__ = ["LiveConvergence", "convergence_plot"]

_COLOR = "#4c72b0"
# column, title, y-axis label, scale applied to the stored value
_PANELS = (
    ("log_likelihood", "Log-likelihood", "log-likelihood", 1.0),
    ("avg_pmax", "Average Pmax", "average Pmax", 1.0),
    ("changes_classes", "Changes of class", "% of particles", 100.0),
    ("changes_psi", "Changes of in-plane angle", "mean |Δψ| (°)", 1.0),
    ("current_resolution", "Resolution", "current resolution (Å)", 1.0),
    ("current_size", "Image size", "current image size (px)", 1.0),
)


def _rows(history: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """``history`` as a frame of :data:`CONVERGENCE_COLUMNS` (NaN where missing)."""
    df = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    out = pd.DataFrame({c: pd.to_numeric(df[c], errors="coerce") if c in df.columns
                        else np.full(len(df), np.nan) for c in CONVERGENCE_COLUMNS})
    return out.astype(float).reset_index(drop=True)


class LiveConvergence(LiveView):
    """Convergence plots that grow by one point per iteration.

    Parameters
    ----------
    history : iterable of dict, DataFrame, or path, optional
        Iterations so far: ``Class2DJob.history`` items or rows of
        :func:`cryonb.viz.read_convergence` (keys ``iteration``, ``log_likelihood``,
        ``avg_pmax``, ``current_resolution``, ``current_size``, ``n_empty`` and, when known,
        ``changes_classes`` as a fraction and ``changes_psi`` in degrees; other keys are
        ignored), or an output root to read them from.
    length : int, default 100000
        Iterations kept.

    Attributes
    ----------
    buffer : holoviews.streams.Buffer
        One row per iteration (:data:`CONVERGENCE_COLUMNS`); :meth:`update` sends into it.

    Notes
    -----
    :meth:`update` may be called from an asyncio task on the kernel's loop, a callback or a
    thread; every displayed view extends in place.
    """

    def __init__(self, history=None, *, length: int = 100_000):
        holoviews()
        if isinstance(history, str | os.PathLike):
            history = read_convergence(history)
        first = _rows(history if history is not None else [])
        self.buffer = hv.streams.Buffer(first, length=length, index=False)
        self._view: hv.Layout | None = None

    def update(self, row: Mapping[str, Any]) -> None:
        """Add one iteration (a ``Class2DJob.history`` item or such a dict)."""
        self.extend([row])

    def extend(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> None:
        """Add several iterations at once."""
        df = _rows(rows)
        if len(df):
            self.buffer.send(df)

    @property
    def data(self) -> pd.DataFrame:
        """Every iteration received, one row each."""
        return self.buffer.data.reset_index(drop=True)

    def _panel(self, column: str, title: str, ylabel: str, scale: float):
        def callback(data: pd.DataFrame) -> hv.Overlay:
            df = pd.DataFrame({"iteration": data["iteration"], column: data[column] * scale})
            df = df[np.isfinite(df[column])]
            curve = hv.Curve(df, "iteration", (column, ylabel)).opts(
                frame_width=260, frame_height=160, color=_COLOR, tools=["hover"], show_grid=True)
            dots = hv.Scatter(curve).opts(size=5, color=_COLOR, tools=["hover"])
            return (curve * dots).opts(title=title)

        return callback

    def view(self) -> hv.Layout:
        """Six panels (2 x 3): log-likelihood, average Pmax, class changes (% of particles),
        in-plane changes (mean |Δψ|, degrees), current resolution (Angstrom) and current image
        size (pixels) against the iteration.

        Returns
        -------
        holoviews.Layout
            DynamicMaps fed by :attr:`buffer` (the same object on every call).
        """
        if self._view is None:
            panels = [hv.DynamicMap(self._panel(*p), streams=[self.buffer]) for p in _PANELS]
            self._view = hv.Layout(panels).cols(3)
        return self._view


def convergence_plot(history_or_root, *, changes: bool = True) -> hv.Layout:
    """Log-likelihood, average Pmax, changes and resolution per iteration.

    Parameters
    ----------
    history_or_root : iterable of dict, DataFrame, or path
        ``Class2DJob.history`` (a list of dicts, see :class:`LiveConvergence`), a table, or
        an output root / iteration file whose ``<root>_it###_model.star`` (and
        ``_data.star``, for the changes) files are read.
    changes : bool, default True
        With a root: compare successive ``_data.star`` files for the changes of class and
        in-plane angle (reads every data file).

    Returns
    -------
    holoviews.Layout
        See :meth:`LiveConvergence.view`.
    """
    if isinstance(history_or_root, str | os.PathLike):
        history_or_root = read_convergence(history_or_root, changes=changes)
    return LiveConvergence(history_or_root).view()
