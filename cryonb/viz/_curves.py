"""Resolution-dependent curves: SSNR per class, FSC/FRC."""

from __future__ import annotations

import os
from collections.abc import Mapping

import holoviews as hv
import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import read_star
from ._base import holoviews
from ._readers import fsc_table, ssnr_table

__all__ = ["ssnr_plot"]

_MAX_LEGEND = 12  # more classes than this: no legend (hover names the class)
_FRAME = {"frame_width": 420, "frame_height": 260}


def _angstrom_axis():
    """A tick formatter writing 1/Angstrom positions as Angstrom (runs in the browser)."""
    from bokeh.models import CustomJSTickFormatter

    return CustomJSTickFormatter(code="return tick > 0 ? (1 / tick).toPrecision(3) : '∞';")


def _curves(df: pd.DataFrame, key: str, value: str, label: str, title: str, *,
            logy: bool, lines: tuple[float, ...], legend: bool) -> hv.Overlay:
    curves = {}
    for name, part in df.groupby(key, sort=False):
        part = part.astype({value: float, "resolution": float})
        part = part[np.isfinite(part[value]) & (part["resolution"] > 0)]
        curves[name] = hv.Curve(part, ("resolution", "resolution (Å)"), [(value, label),
                                *[c for c in part.columns if c not in (key, value, "resolution")]]
                                ).opts(tools=["hover"], line_width=1.5)
    overlay = hv.NdOverlay(curves, kdims=[key]).opts(
        title=title, logy=logy, xformatter=_angstrom_axis(), show_legend=legend,
        legend_position="right", show_grid=True, **_FRAME)
    guides = [hv.HLine(y).opts(color="gray", line_dash="dashed", line_width=1) for y in lines]
    return hv.Overlay([overlay, *guides]).opts(title=title)


def ssnr_plot(
    model_star: str | os.PathLike | Mapping[str, pd.DataFrame],
    *,
    frc: Mapping[str, tuple[np.ndarray, np.ndarray]] | pd.DataFrame | None = None,
) -> hv.Layout:
    """SSNR of every class against resolution, and FSC/FRC curves where there are any.

    Parameters
    ----------
    model_star : path or mapping of str to DataFrame
        A ``_model.star`` (``rlnSsnrMap`` and ``rlnResolution`` in its
        ``data_model_class_N`` blocks), or its blocks as :func:`cryonb.io.read_star` gives
        them. Columns naming an FSC or FRC (``rlnGoldStandardFsc``, a postprocess
        ``data_fsc`` block, ...) become the second panel.
    frc : mapping or DataFrame, optional
        More FRC-style curves: ``{name: (resolution in 1/Angstrom, values)}``, or a table
        with the columns ``curve``, ``resolution``, ``value``.

    Returns
    -------
    holoviews.Layout
        The SSNR per class on a log scale with the SSNR = 1 line (where RELION puts each
        class's resolution), the x axis labelled in Angstrom at positions linear in
        1/Angstrom; and, when there are FSC/FRC curves, those with the 0.143 and 0.5 lines.
        Legends list the classes (and their estimated resolution) up to 12 classes; above
        that, hover names them.

    Raises
    ------
    InputError
        When the file has neither SSNR nor FSC/FRC curves.
    """
    holoviews()
    blocks = read_star(model_star) if isinstance(model_star, str | os.PathLike) else model_star
    where = model_star if isinstance(model_star, str | os.PathLike) else None
    ssnr = ssnr_table(blocks)
    fsc = fsc_table(blocks)
    if frc is not None:
        extra = frc if isinstance(frc, pd.DataFrame) else pd.concat(
            [pd.DataFrame({"curve": name, "resolution": np.asarray(r, float),
                           "value": np.asarray(v, float)}) for name, (r, v) in frc.items()],
            ignore_index=True)
        extra = extra[["curve", "resolution", "value"]]
        fsc = extra if fsc.empty else pd.concat([fsc, extra], ignore_index=True)
    panels = []
    if len(ssnr):
        ssnr = ssnr.assign(ssnr=ssnr["ssnr"].where(ssnr["ssnr"] > 0))
        ssnr["class"] = [f"{k} ({r:.1f} Å)" if 0 < r < 999 else str(k)
                         for k, r in zip(ssnr["class"], ssnr["estimated_resolution"])]
        ssnr = ssnr.drop(columns="estimated_resolution")
        n = ssnr["class"].nunique()
        panels.append(_curves(ssnr, "class", "ssnr", "SSNR", f"SSNR of {n} classes",
                              logy=True, lines=(1.0,), legend=n <= _MAX_LEGEND))
    if len(fsc):
        n = fsc["curve"].nunique()
        panels.append(_curves(fsc, "curve", "value", "correlation", "FSC / FRC", logy=False,
                              lines=(0.143, 0.5), legend=n <= _MAX_LEGEND))
    if not panels:
        raise InputError("has no SSNR (data_model_class_N blocks with rlnSsnrMap) and no "
                         "FSC/FRC curves to plot", where)
    return hv.Layout(panels).cols(1)
