"""``show(anything)``: the view that fits a file, a Class2D output root, or an object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd

from ..backend import to_numpy
from ..errors import InputError
from ..io import MrcVolume, read_mrc, read_mrc_header, read_star
from ._base import holoviews, plural
from ._classes import LiveClassGrid, class_grid
from ._convergence import LiveConvergence, convergence_plot
from ._curves import ssnr_plot
from ._dashboard import LoadDashboard, load_dashboard
from ._devices import device_layout, is_device_map
from ._maps import map_viewer
from ._monitor import LoadMonitor
from ._readers import find_class2d_roots, parse_iteration_path, star_summary

__all__ = ["show", "star_view"]

_MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".ccp4", ".st", ".rec", ".ali")
_MAX_STACK = 100  # images of a plain stack shown by show()


def _table(df: pd.DataFrame, title: str) -> hv.Table:
    return hv.Table(df).opts(title=title, width=min(900, 40 + 110 * len(df.columns)),
                             height=min(400, 34 + 26 * len(df)))


def star_view(blocks: Mapping[str, pd.DataFrame] | str | os.PathLike) -> hv.Layout:
    """Summary tables of a STAR file: its blocks, and particles per class and optics group.

    Parameters
    ----------
    blocks : path or mapping of str to DataFrame
        A STAR file, or its blocks (:func:`cryonb.io.read_star`).

    Returns
    -------
    holoviews.Layout
        Tables of :func:`cryonb.viz.star_summary` (one column), titled.
    """
    holoviews()
    name = ""
    if isinstance(blocks, str | os.PathLike):
        name = Path(blocks).name
        blocks = read_star(blocks)
    tables = star_summary(blocks)
    n = len(tables["blocks"])
    items = [_table(tables["blocks"], f"{name or 'STAR file'}: {plural(n, 'block')}")]
    for key, title in (("classes", "Particles per class"),
                       ("optics groups", "Particles per optics group")):
        if key in tables:
            items.append(_table(tables[key], title))
    return hv.Layout(items).cols(1)


def _kind_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz").removesuffix(".bz2")
    if name.endswith(".star"):
        return "star"
    if name.endswith(_MRC_SUFFIXES):
        return "mrc"
    with open(path, "rb") as f:
        head = f.read(1024)
    if head[208:211] == b"MAP":
        return "mrc"
    if b"data_" in head and b"\x00" not in head:
        return "star"
    raise InputError(
        "cannot show this file: it is neither a STAR file (.star), an MRC map or stack "
        f"({', '.join(_MRC_SUFFIXES)}) nor a Class2D output root (<root>_it###_model.star)",
        path,
    )


def _show_mrc(path: Path, stack_limit: int) -> hv.Layout:
    header = read_mrc_header(path)
    parsed = parse_iteration_path(path)
    if parsed is not None and parsed[2] == "classes":
        return class_grid(path)
    if len(header.shape) == 3 and header.is_stack:
        n = header.shape[0]
        vol = read_mrc(path, mmap=True)
        assert vol.data is not None
        images = np.array(vol.data[:stack_limit])
        title = f"{path.name}: " + (f"first {stack_limit} of {n} images" if n > stack_limit
                                    else plural(n, "image"))
        return class_grid(images, sort=False, pixel_size=vol.voxel_size).relabel(title)
    if len(header.shape) == 2:
        vol = read_mrc(path)
        return class_grid(vol.data, sort=False, pixel_size=vol.voxel_size)
    return map_viewer(path)


def _show_root(root: str) -> hv.Layout:
    grid = class_grid(root)
    conv = convergence_plot(root)
    return (grid + conv).cols(3).relabel(f"Class2D {Path(root).name}")


def _show_path(p: Path, stack_limit: int) -> hv.Layout:
    if not p.exists() or p.is_dir():
        roots = find_class2d_roots(p)
        if len(roots) == 1:
            return _show_root(roots[0])
        if len(roots) > 1:
            listed = ", ".join(Path(r).name for r in roots)
            raise InputError(f"holds several Class2D output roots ({listed}): show one of "
                             "them", p)
        if p.is_dir():
            raise InputError("is a folder without Class2D output (<root>_it###_model.star): "
                             "show a file in it", p)
        raise InputError("no such file, and no Class2D output root <root>_it###_model.star", p)
    kind = _kind_of(p)
    if kind == "mrc":
        return _show_mrc(p, stack_limit)
    blocks = read_star(p)
    summary = star_view(blocks).relabel(p.name)
    if any(name.startswith("model_class_") for name in blocks):
        try:
            return (summary + ssnr_plot(blocks)).cols(1).relabel(p.name)
        except InputError:  # model blocks without SSNR: the tables alone
            pass
    return summary


def show(obj, *, kind: str | None = None, stack_limit: int = _MAX_STACK):
    """Display whatever ``obj`` is, as the view that fits it.

    Parameters
    ----------
    obj : path, array, DataFrame, or cryonb object
        - a STAR file: summary tables (blocks; particles per class and optics group); a
          ``_model.star`` also gets its SSNR curves;
        - an MRC map: :func:`map_viewer`; a ``_classes.mrcs``: :func:`class_grid` with its
          model and data files; another stack: its first ``stack_limit`` images as a grid;
        - a Class2D output root or a folder holding one: class grid of the last iteration
          and :func:`convergence_plot`;
        - an array: 3D with ``kind="map"`` (default for a cube) a map, else a stack of
          images; a 2D array one image;
        - a DataFrame: a table; a dict of DataFrames: STAR summary; a list of dicts:
          convergence (``Class2DJob.history``);
        - a DeviceMap: :func:`device_layout`; a LoadMonitor: :func:`load_dashboard`; a
          live view or a holoviews object: itself; an object with ``summary()`` and
          ``history`` (a ``Class2DJob``): its classes and convergence.
    kind : {"map", "stack"}, optional
        How to read a 3D array.
    stack_limit : int, default 100
        Images of a plain stack to show.

    Returns
    -------
    holoviews object
        Displayed by the notebook as the value of the cell.

    Raises
    ------
    InputError
        For a missing file, a file of unknown type (naming the kinds shown), or a folder
        without Class2D output.
    TypeError
        For objects of other types.
    """
    holoviews()
    if isinstance(obj, str | os.PathLike):
        return _show_path(Path(obj), stack_limit)
    if isinstance(obj, hv.core.Dimensioned):
        return obj
    if isinstance(obj, LiveClassGrid | LiveConvergence | LoadDashboard):
        return obj.view()
    if isinstance(obj, LoadMonitor):
        return load_dashboard(obj)
    if is_device_map(obj):
        return device_layout(obj)
    if isinstance(obj, MrcVolume):
        return map_viewer(obj) if not obj.is_stack else class_grid(obj.data, sort=False)
    if isinstance(obj, pd.DataFrame):
        return _table(obj, f"{plural(len(obj), 'row')}")
    if isinstance(obj, Mapping) and obj and all(isinstance(v, pd.DataFrame)
                                                for v in obj.values()):
        return star_view(obj)
    if isinstance(obj, list | tuple) and obj and all(isinstance(v, Mapping) for v in obj):
        return convergence_plot(obj)
    if hasattr(obj, "summary") and hasattr(obj, "history"):
        s = obj.summary()
        grid = class_grid(s["classes"], s["pdf_class"], iteration=s["iteration"])
        return (grid + convergence_plot(obj.history)).cols(3) if obj.history else grid
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        a = to_numpy(obj)
        if kind not in (None, "map", "stack"):
            raise ValueError(f"kind must be 'map' or 'stack', not {kind!r}")
        if a.ndim == 3 and (kind == "map" or (kind is None and len(set(a.shape)) == 1)):
            return map_viewer(a)
        if a.ndim in (2, 3):
            return class_grid(a, sort=False)
        raise ValueError(f"cannot show an array of shape {a.shape}: give a 2D image, a 3D "
                         "map or a stack of images")
    raise TypeError(f"cannot show a {type(obj).__name__}: give a file path, an array, a "
                    "DataFrame, a DeviceMap, a LoadMonitor or a Class2D job")
