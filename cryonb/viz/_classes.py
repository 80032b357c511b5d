"""Class-average grid: tiles titled with class, share of particles and resolution; tap one
to see it large with the in-plane angle histogram of its particles; refreshed in place."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import param

from ..backend import to_numpy
from ._base import LiveView, holoviews, plural, scale_unit, value_range
from ._readers import ClassOutput, read_class_output, read_particle_angles

__all__ = ["LiveClassGrid", "class_grid"]

_GAP = 0.08  # space between tiles, as a fraction of a tile
_BAND = 0.26  # room for the title above each tile, as a fraction of a tile
_PSI_BINS = 36
_MAX_WIDTH = 600  # pixels of the grid's frame
_SIDE = 280  # pixels of the large view and the histogram

_ClassSelection = hv.streams.Stream.define(
    "ClassSelection", index=param.Integer(default=0, doc="0-based index of the selected class")
)


@dataclasses.dataclass(frozen=True)
class _GridData:
    """Everything one iteration's grid shows (what the Pipe carries)."""

    images: np.ndarray  # (K, N, N) as given
    pdf: np.ndarray | None
    resolution: np.ndarray | None
    iteration: int | None
    pixel_size: float | None
    order: np.ndarray  # class index of each tile
    ncols: int
    psi_counts: np.ndarray | None  # (K, _PSI_BINS)
    mosaic: np.ndarray  # (height, width) of extent, top row first
    labels: pd.DataFrame  # tile_x, tile_y, text

    @property
    def k(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of one image."""
        ny, nx = self.images.shape[-2:]
        return ny, nx

    @property
    def cell(self) -> tuple[int, int]:
        """(width, height) of one tile with its gap and title band, in mosaic pixels."""
        ny, nx = self.shape
        return nx + round(nx * _GAP), ny + round(ny * _BAND)

    @property
    def nrows(self) -> int:
        return max(1, math.ceil(self.k / self.ncols))

    @property
    def extent(self) -> tuple[int, int]:
        """(width, height) of the mosaic."""
        return self.ncols * self.cell[0], self.nrows * self.cell[1]

    def tile_at(self, x: float | None, y: float | None) -> int | None:
        """Class index of the tile under data coordinates (x, y), or None."""
        if x is None or y is None:
            return None
        (cw, ch), (_, height) = self.cell, self.extent
        col, row = math.floor(x / cw), math.floor((height - y) / ch)
        if not (0 <= col < self.ncols and 0 <= row < self.nrows):
            return None
        i = row * self.ncols + col
        return int(self.order[i]) if i < self.k else None

    def tile_box(self, index: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the image of class ``index`` in the mosaic."""
        i = int(np.flatnonzero(self.order == index)[0])
        (cw, ch), (_, height) = self.cell, self.extent
        ny, nx = self.shape
        x0 = (i % self.ncols) * cw
        y0 = height - (i // self.ncols + 1) * ch
        return x0, y0, x0 + nx, y0 + ny

    def caption(self, index: int) -> str:
        """``'3 · 18.2% · 8.1 Å'``: class number, share of particles, resolution (3 digits)."""
        parts = [str(index + 1)]
        if self.pdf is not None:
            parts.append(f"{100 * self.pdf[index]:.1f}%")
        if self.resolution is not None and 0 < self.resolution[index] < 999:
            parts.append(f"{self.resolution[index]:.3g} Å")
        return " · ".join(parts)


def _optional(values, k: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    a = to_numpy(values).astype(np.float64).reshape(-1)
    if len(a) != k:
        raise ValueError(f"{what} has {len(a)} values for {plural(k, 'class')}")
    return a


def _particle_table(particles) -> pd.DataFrame | None:
    if particles is None:
        return None
    if isinstance(particles, str | os.PathLike):
        return read_particle_angles(particles, required=True)
    return particles if isinstance(particles, pd.DataFrame) else pd.DataFrame(particles)


def _psi_counts(particles: pd.DataFrame | None, k: int) -> np.ndarray | None:
    if particles is None or not {"rlnClassNumber", "rlnAnglePsi"} <= set(particles.columns):
        return None
    cls = particles["rlnClassNumber"].to_numpy(np.int64) - 1
    psi = np.mod(particles["rlnAnglePsi"].to_numpy(np.float64) + 180.0, 360.0) - 180.0
    ok = (cls >= 0) & (cls < k) & np.isfinite(psi)
    bins = np.clip(((psi[ok] + 180.0) * (_PSI_BINS / 360.0)).astype(np.int64), 0, _PSI_BINS - 1)
    counts = np.bincount(cls[ok] * _PSI_BINS + bins, minlength=k * _PSI_BINS)
    return counts.reshape(k, _PSI_BINS)


def _prepare(out: ClassOutput, sort: bool, ncols: int | None) -> _GridData:
    images = np.asarray(out.classes, dtype=np.float32)
    if images.ndim == 2:
        images = images[np.newaxis]
    if images.ndim != 3 or 0 in images.shape:
        raise ValueError(f"class averages must be an array (K, N, N), not of shape {images.shape}")
    k = len(images)
    pdf = _optional(out.pdf, k, "pdf")
    res = _optional(out.resolution, k, "resolution")
    order = np.argsort(-pdf, kind="stable") if sort and pdf is not None else np.arange(k)
    cols = ncols or max(1, min(k, math.ceil(math.sqrt(1.6 * k))))
    data = _GridData(images, pdf, res, out.iteration, out.pixel_size, order, cols,
                     _psi_counts(out.particles, k), np.empty((0, 0)), pd.DataFrame())
    (cw, ch), (width, height) = data.cell, data.extent
    ny, nx = data.shape
    mosaic = np.full((height, width), np.nan, np.float32)  # top row first, as hv.Image wants
    tiles = scale_unit(images)[:, ::-1]  # row 0 is y = 0: put it at the bottom
    text = []
    for i, c in enumerate(order):
        row, col = divmod(i, cols)
        top = row * ch + (ch - ny)  # the title band is above the image
        mosaic[top:top + ny, col * cw:col * cw + nx] = tiles[c]
        text.append((col * cw + nx / 2, height - row * ch - (ch - ny) / 2, data.caption(int(c))))
    return dataclasses.replace(data, mosaic=mosaic,
                               labels=pd.DataFrame(text, columns=["tile_x", "tile_y", "text"]))


class LiveClassGrid(LiveView):
    """A class-average grid that refreshes in place, with a large view of the tapped class.

    Parameters
    ----------
    classes : array_like, shape (K, N, N), or path, optional
        Class averages, or a file (see :meth:`update`). ``None`` starts an empty grid that
        the first :meth:`update` fills.
    pdf, resolution, iteration, particles, pixel_size
        As for :meth:`update`.
    sort : bool, default True
        Order the tiles by decreasing share of particles (when ``pdf`` is known).
    ncols : int, optional
        Tiles per row (default: about 1.3 times as many columns as rows).
    cmap : str, default "gray"
        Colour map of the images.

    Attributes
    ----------
    pipe : holoviews.streams.Pipe
        Carries the current iteration to every view; :meth:`update` sends into it.
    selection : holoviews.streams.Stream
        ``index``: 0-based index of the class shown large; a tap on a tile sets it.
    tap : holoviews.streams.Tap
        The tap stream on the grid.

    Notes
    -----
    :meth:`update` may be called from a button callback, an asyncio task on the kernel's
    event loop, or a thread: displayed views change in the browser without re-running the
    cell. Each tile is scaled to its own 0.5-99.5 percentile range; tiles show y = 0 at the
    bottom. The object displays itself in a notebook (as :meth:`panel`) and works with
    ``pn.panel``; :meth:`view` gives the holoviews layout.
    """

    def __init__(
        self,
        classes=None,
        pdf=None,
        resolution=None,
        iteration: int | None = None,
        *,
        particles=None,
        pixel_size: float | None = None,
        sort: bool = True,
        ncols: int | None = None,
        cmap: str = "gray",
    ):
        holoviews()
        self.sort, self.ncols, self.cmap = sort, ncols, cmap
        first = (ClassOutput(np.zeros((1, 8, 8), np.float32)) if classes is None else
                 self._output(classes, pdf, resolution, iteration, particles, pixel_size))
        data = _prepare(first, sort, ncols)
        self.pipe = hv.streams.Pipe(data=data)
        self.selection = _ClassSelection(index=int(data.order[0]))
        self._view: hv.Layout | None = None
        self._dmaps: tuple[hv.DynamicMap, hv.DynamicMap, hv.DynamicMap] | None = None
        self._panel: Any = None
        # the tap's source must return a single element (holoviews attaches no linked stream
        # to a DynamicMap of overlays): the captions and the highlight are overlaid later
        self._mosaic_dmap = hv.DynamicMap(self._mosaic, streams=[self.pipe])
        self.tap = hv.streams.Tap(source=self._mosaic_dmap, x=None, y=None)
        self.tap.add_subscriber(self._on_tap)

    # ------------------------------------------------------------------ data in
    @staticmethod
    def _output(classes, pdf, resolution, iteration, particles, pixel_size) -> ClassOutput:
        if isinstance(classes, ClassOutput):
            out = dataclasses.replace(classes)
        elif isinstance(classes, str | os.PathLike):
            out = read_class_output(Path(classes))
        else:
            out = ClassOutput(to_numpy(classes).astype(np.float32, copy=False))
        given = {"pdf": pdf, "resolution": resolution, "iteration": iteration,
                 "particles": _particle_table(particles), "pixel_size": pixel_size}
        return dataclasses.replace(out, **{k: v for k, v in given.items() if v is not None})

    def update(
        self,
        classes,
        pdf=None,
        resolution=None,
        iteration: int | None = None,
        *,
        particles=None,
        pixel_size: float | None = None,
    ) -> None:
        """Show a new iteration.

        Parameters
        ----------
        classes : array_like, shape (K, N, N), ClassOutput, or path
            Class averages (row 0 of each image is y = 0); or a ``_classes.mrcs``,
            ``_model.star`` or output root, read with :func:`cryonb.viz.read_class_output`
            (which also gives the distribution, resolution and particles' angles).
        pdf : array_like, shape (K,), optional
            Fraction of particles in each class (``rlnClassDistribution``).
        resolution : array_like, shape (K,), optional
            Estimated resolution of each class, Angstrom (999 or 0: not shown).
        iteration : int, optional
            Shown in the title.
        particles : pandas.DataFrame, mapping of arrays, or path, optional
            ``rlnClassNumber`` (1-based, as in RELION) and ``rlnAnglePsi`` (degrees) of each
            particle, for the in-plane angle histograms; or a ``_data.star``.
        pixel_size : float, optional
            Angstrom per pixel (axes of the large view).

        Raises
        ------
        ValueError
            When ``pdf`` or ``resolution`` does not have one value per class.
        """
        out = self._output(classes, pdf, resolution, iteration, particles, pixel_size)
        data = _prepare(out, self.sort, self.ncols)
        if self.selection.index >= data.k:
            self.selection.update(index=int(data.order[0]))
        self.pipe.send(data)

    def select(self, class_number: int) -> None:
        """Show class ``class_number`` (1-based, as in RELION) large."""
        k = self.data.k
        if not 1 <= class_number <= k:
            raise ValueError(f"class_number must be 1-{k}, not {class_number}")
        self.selection.event(index=class_number - 1)

    @property
    def data(self) -> _GridData:
        """What is shown now."""
        return self.pipe.data

    @property
    def selected(self) -> int:
        """The class shown large (1-based)."""
        return self.selection.index + 1

    def _on_tap(self, x=None, y=None) -> None:
        index = self.data.tile_at(x, y)
        if index is not None and index != self.selection.index:
            self.selection.event(index=index)

    # ------------------------------------------------------------------ views
    @staticmethod
    def _tile_px(data: _GridData) -> int:
        return max(40, min(128, _MAX_WIDTH // data.ncols))

    def _mosaic(self, data: _GridData) -> hv.Image:
        width, height = data.extent
        frame_w = round(self._tile_px(data) * width / data.cell[0])
        title = "Class averages" + (f", iteration {data.iteration}" if data.iteration is not None
                                    else "")
        if self.sort and data.pdf is not None:
            title += " (by share of particles)"
        # own dimension names: the axes of the other views must not be linked to the mosaic's
        return hv.Image(data.mosaic, bounds=(0, 0, width, height), kdims=["tile_x", "tile_y"],
                        vdims=["intensity"]).opts(
            cmap=self.cmap, clim=(0.0, 1.0), clipping_colors={"NaN": "transparent"},
            tools=["tap"], default_tools=[], active_tools=["tap"], xaxis=None, yaxis=None,
            frame_width=frame_w, frame_height=round(frame_w * height / width),
            colorbar=False, toolbar=None, title=title)  # an overlay shows its first title

    def _captions(self, data: _GridData) -> hv.Labels:
        chars = max((len(t) for t in data.labels["text"]), default=1)
        font = f"{max(7, min(13, round(self._tile_px(data) / (0.6 * chars))))}px"
        return hv.Labels(data.labels, kdims=["tile_x", "tile_y"], vdims="text").opts(
            text_font_size=font, text_color="black")

    def _highlight(self, data: _GridData, index: int) -> hv.Rectangles:
        boxes = [data.tile_box(index)] if index < data.k else []
        return hv.Rectangles(boxes, kdims=["tile_x", "tile_y", "tile_x1", "tile_y1"]).opts(
            fill_alpha=0, line_color="#e8590c", line_width=3)

    def _large(self, data: _GridData, index: int) -> hv.Image:
        index = min(index, data.k - 1)
        img = data.images[index]
        apix = data.pixel_size or 1.0
        unit = "Å" if data.pixel_size else "px"
        hy, hx = (v * apix / 2 for v in data.shape)
        title = f"Class {index + 1}"
        if data.pdf is not None:
            title += f": {100 * data.pdf[index]:.1f}% of particles"
        if data.resolution is not None and 0 < data.resolution[index] < 999:
            title += f", {data.resolution[index]:.1f} Å"
        return hv.Image(img[::-1], bounds=(-hx, -hy, hx, hy), kdims=["x", "y"],
                        vdims=["intensity"]).opts(
            cmap=self.cmap, clim=value_range(img, 0.5, 99.5), title=title, frame_width=_SIDE,
            frame_height=round(_SIDE * hy / hx), xlabel=f"x ({unit})", ylabel=f"y ({unit})",
            colorbar=False, tools=["hover"])

    def _histogram(self, data: _GridData, index: int) -> hv.Histogram:
        index = min(index, data.k - 1)
        edges = np.linspace(-180.0, 180.0, _PSI_BINS + 1)
        if data.psi_counts is None:
            counts = np.zeros(_PSI_BINS)
            title = "In-plane angles: no particle table given"
        else:
            counts = data.psi_counts[index]
            title = f"Class {index + 1}: in-plane angles of {plural(int(counts.sum()), 'particle')}"
        return hv.Histogram((edges, counts), kdims=["psi"], vdims=["particles"]).opts(
            title=title, frame_width=_SIDE, frame_height=200, xlabel="in-plane angle ψ (°)",
            ylabel="particles", color="#4c72b0", tools=["hover"], xlim=(-180, 180))

    def _parts(self) -> tuple[hv.DynamicMap, hv.DynamicMap, hv.DynamicMap]:
        """(grid with captions and highlight, class shown large, its angle histogram)."""
        if self._dmaps is None:
            streams = [self.pipe, self.selection]
            captions = hv.DynamicMap(self._captions, streams=[self.pipe])
            highlight = hv.DynamicMap(self._highlight, streams=streams)
            self._dmaps = (self._mosaic_dmap * captions * highlight,
                           hv.DynamicMap(self._large, streams=streams),
                           hv.DynamicMap(self._histogram, streams=streams))
        return self._dmaps

    def view(self) -> hv.Layout:
        """The grid (tap a tile), the selected class large and its in-plane angles.

        Returns
        -------
        holoviews.Layout
            Three DynamicMaps fed by :attr:`pipe` and :attr:`selection`, side by side; the
            same object on every call, so that updates reach every place it is displayed.
        """
        if self._view is None:
            self._view = hv.Layout(list(self._parts())).cols(3)
        return self._view

    def panel(self):
        """The same views as a panel layout: the grid, and beside it the class shown large
        above its angle histogram (narrower than :meth:`view`; how the object displays).

        Returns
        -------
        panel.Row
        """
        import panel as pn

        if self._panel is None:
            grid, large, hist = self._parts()
            self._panel = pn.Row(pn.pane.HoloViews(grid),
                                 pn.Column(pn.pane.HoloViews(large), pn.pane.HoloViews(hist)))
        return self._panel

    def __panel__(self):
        """For ``pn.panel(grid)`` and the notebook's display: :meth:`panel`."""
        return self.panel()


def class_grid(
    classes,
    pdf=None,
    resolution=None,
    *,
    iteration: int | None = None,
    particles=None,
    pixel_size: float | None = None,
    sort: bool = True,
    ncols: int | None = None,
    cmap: str = "gray",
) -> hv.Layout:
    """Grid of class averages titled with class number, % of particles and resolution.

    Tap a tile to see the class large with the in-plane angle (``rlnAnglePsi``) histogram of
    its particles.

    Parameters
    ----------
    classes : array_like, shape (K, N, N), or path
        Class averages, or a ``<root>_it###_classes.mrcs`` (the matching ``_model.star``
        and ``_data.star`` give distribution, resolution and angles), a ``_model.star`` or
        an output root (its last iteration).
    pdf, resolution : array_like, shape (K,), optional
        Share of particles and resolution (Angstrom) of each class; override the files'.
    iteration, particles, pixel_size
        See :meth:`LiveClassGrid.update`.
    sort : bool, default True
        Tiles by decreasing share of particles.
    ncols : int, optional
        Tiles per row.
    cmap : str, default "gray"
        Colour map.

    Returns
    -------
    holoviews.Layout
        See :meth:`LiveClassGrid.view`; use :class:`LiveClassGrid` to refresh it.
    """
    return LiveClassGrid(classes, pdf, resolution, iteration, particles=particles,
                         pixel_size=pixel_size, sort=sort, ncols=ncols, cmap=cmap).view()
