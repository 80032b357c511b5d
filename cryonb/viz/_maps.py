"""3D map viewer: orthogonal slices with a slider per axis, and projections."""

from __future__ import annotations

import os
from pathlib import Path

import holoviews as hv
import numpy as np

from ..backend import to_numpy
from ..io import MrcVolume, read_map
from ._base import holoviews, value_range

__all__ = ["map_viewer"]

# (axis sliced, name of its slider, horizontal axis, vertical axis) in (z, y, x) order
_VIEWS = ((0, "z", "x", "y"), (1, "y", "x", "z"), (2, "x", "y", "z"))


def _as_volume(volume, voxel_size: float | None) -> tuple[np.ndarray, float | None, str]:
    if isinstance(volume, str | os.PathLike):
        data, apix = read_map(volume)
        return data, voxel_size or apix, Path(volume).name
    if isinstance(volume, MrcVolume):
        if volume.data is None:
            raise ValueError(f"{volume.path}: the MrcVolume holds no data (header-only read)")
        return np.asarray(volume.data, np.float32), voxel_size or volume.voxel_size, \
            volume.path.name
    return to_numpy(volume).astype(np.float32, copy=False), voxel_size, ""


def map_viewer(
    volume,
    voxel_size: float | None = None,
    *,
    cmap: str = "gray",
    size: int = 280,
    title: str | None = None,
) -> hv.Layout:
    """Orthogonal central slices with a slider per axis, and the projections of a 3D map.

    Parameters
    ----------
    volume : array_like, shape (z, y, x), MrcVolume, or path
        The map; a path is read with :func:`cryonb.io.read_map` (any MRC/CCP4 file, plain
        or compressed; a single image gives one z section).
    voxel_size : float, optional
        Angstrom per voxel; default the file's (axes in voxels when unknown).
    cmap : str, default "gray"
        Colour map.
    size : int, default 280
        Width in pixels of each panel's longer side.
    title : str, optional
        Default: the file name and shape.

    Returns
    -------
    holoviews.Layout
        Top row: the slices z = k (x horizontal, y up), y = k (x, z up) and x = k (y, z up)
        as DynamicMaps over the integer key dimensions ``z``, ``y``, ``x`` (one slider each
        in a notebook, starting at the central slice), all three on the same colour scale
        (0.1-99.9 percentiles of the map). Bottom row: the sums along z, y and x, each on
        its own scale. Axes in Angstrom when the voxel size is known, centred on the map.

    Raises
    ------
    ValueError
        For an array that is not 3D (2D arrays are taken as one section).
    cryonb.errors.InputError
        For an unreadable file.
    """
    holoviews()
    data, apix, name = _as_volume(volume, voxel_size)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3 or 0 in data.shape:
        raise ValueError(f"a map must be a 3D array (z, y, x), not of shape {data.shape}")
    step = apix or 1.0
    unit = "Å" if apix else "voxels"
    half = {ax: data.shape[i] * step / 2 for i, ax in enumerate("zyx")}
    clim = value_range(data)
    longest = max(data.shape)

    def image(plane: np.ndarray, h: str, v: str, clim_, title_: str) -> hv.Image:
        # plane is (v, h) with row 0 at v = 0: hv.Image wants the top row first
        return hv.Image(plane[::-1], bounds=(-half[h], -half[v], half[h], half[v]),
                        kdims=[h, v], vdims=["density"]).opts(
            cmap=cmap, clim=clim_, title=title_, xlabel=f"{h} ({unit})", ylabel=f"{v} ({unit})",
            frame_width=max(60, round(size * 2 * half[h] / (longest * step))),
            frame_height=max(60, round(size * 2 * half[v] / (longest * step))),
            colorbar=False, tools=["hover"])

    def slicer(axis: int, s: str, h: str, v: str):
        def callback(index):
            k = int(index)
            return image(np.take(data, k, axis=axis), h, v, clim, f"slice {s} = {k}")

        return callback

    panels = []
    for axis, s, h, v in _VIEWS:
        n = data.shape[axis]
        dim = hv.Dimension(s, label=f"{s} slice", range=(0, n - 1), default=n // 2, step=1,
                           type=int)
        panels.append(hv.DynamicMap(slicer(axis, s, h, v), kdims=[dim]))
    for axis, s, h, v in _VIEWS:
        proj = data.sum(axis=axis, dtype=np.float64)
        panels.append(image(proj, h, v, value_range(proj), f"sum along {s}"))
    shape = " x ".join(str(n) for n in data.shape[::-1])
    default = f"{name} ({shape}" + (f", {apix:.3g} Å/voxel)" if apix else ")")
    return hv.Layout(panels, label=title or default.strip()).cols(3)
