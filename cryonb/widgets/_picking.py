"""Pick one micrograph interactively: threshold and minimum-distance sliders, picks drawn over
the micrograph and its figure-of-merit map (issue 6, item 3).

The figure-of-merit maps of a micrograph are computed once (:meth:`TemplatePicker.maps`), so
moving a slider only re-runs the peak search (:meth:`TemplatePicker.peaks`): the picks shown
are exactly those ``cryonb autopick`` writes with these values.
"""

from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd

__all__ = ["PickExplorer"]

_DISPLAY = 800  # largest side of the micrograph as shown (pixels, after binning)


def _binned(image: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    """``image`` averaged over ``b x b`` blocks so that no side exceeds ``limit``; ``b``."""
    b = max(1, math.ceil(max(image.shape) / limit))
    ny, nx = image.shape[0] // b * b, image.shape[1] // b * b
    return image[:ny, :nx].reshape(ny // b, b, nx // b, b).mean(axis=(1, 3)), b


class PickExplorer:
    """Pick one micrograph with sliders; the picks are drawn over it as they change.

    Parameters
    ----------
    config : AutopickConfig
        The job's options (inputs, references, filters); ``threshold`` and ``min_distance``
        are the sliders' start values.
    micrograph : int
        Index of the micrograph shown first.
    panel : AutopickPanel, optional
        "Use these values" writes the sliders into its options; "Run on all micrographs"
        then starts it.
    device : int, optional
        CUDA device for the maps (default: the CPU).
    display_size : int
        Largest side of the micrograph as shown (it is binned down to it).

    Attributes
    ----------
    micrograph, threshold, min_distance : ipywidgets slider
        CSS classes ``cryonb-pick-micrograph``, ``cryonb-pick-threshold``,
        ``cryonb-pick-min-distance``; ``min_distance`` in Angstrom.
    count : ipywidgets.HTML
        ``N picks`` (CSS class ``cryonb-pick-count``).
    pipe : holoviews.streams.Pipe
        Carries ``(micrograph index, picks)`` to the view.
    widget : ipywidgets.VBox
    """

    def __init__(self, config, micrograph: int = 0, *, panel=None, device: int | None = None,
                 display_size: int = _DISPLAY):
        from ..pick import open_picker
        from ..viz import ensure_extension

        ensure_extension()
        import holoviews as hv

        self.config = config.validate()
        self.panel = panel
        self.display_size = int(display_size)
        self.picker, self.mics = open_picker(self.config, device)
        self._maps: dict[int, Any] = {}
        self._images: dict[int, tuple[np.ndarray, int]] = {}
        t = self.picker.templates
        default_distance = t.box * t.pixel_size / 2
        distance = self.config.min_distance if self.config.min_distance > 0 else default_distance
        style = {"description_width": "120px"}
        layout = w.Layout(width="460px")
        self.micrograph = w.IntSlider(value=int(micrograph), min=0, max=len(self.mics) - 1,
                                      description="micrograph", continuous_update=False,
                                      style=style, layout=layout)
        self.threshold = w.FloatSlider(value=self.config.threshold, min=-0.5, max=1.5,
                                       step=0.01, description="--threshold",
                                       continuous_update=False, style=style, layout=layout,
                                       tooltip="minimum figure of merit of a pick")
        self.min_distance = w.FloatSlider(value=round(distance, 1), min=1.0,
                                          max=round(max(4 * default_distance, 2 * distance), 1),
                                          step=1.0, description="--min_distance (Å)",
                                          continuous_update=False, style=style, layout=layout)
        for widget, css in ((self.micrograph, "micrograph"), (self.threshold, "threshold"),
                            (self.min_distance, "min-distance")):
            widget.add_class(f"cryonb-pick-{css}")
            widget.observe(lambda _c: self.update(), "value")
        self.count = w.HTML()
        self.count.add_class("cryonb-pick-count")
        controls = [self.micrograph, self.threshold, self.min_distance, self.count]
        if panel is not None:
            use = w.Button(description="Use these values", icon="check",
                           layout=w.Layout(width="170px"))
            use.add_class("cryonb-pick-use")
            use.on_click(lambda _b: self.apply())
            run = w.Button(description="Run on all micrographs", button_style="success",
                           icon="play", layout=w.Layout(width="200px"))
            run.add_class("cryonb-pick-run")
            run.on_click(lambda _b: panel._safely(self.run_all))
            controls.append(w.HBox([use, run]))
        self.pipe = hv.streams.Pipe(data=self._state())
        self._view = None
        self.output = w.Output(layout=w.Layout(width="100%"))
        self.output.add_class("cryonb-view-picks")
        self.widget = w.VBox([*controls, self.output])
        self.widget.add_class("cryonb-pick-explorer")
        self.update()
        from ._panel import in_kernel

        if in_kernel():
            self.output.append_display_data(self.view())

    # ------------------------------------------------------------------ picking
    def maps(self, index: int):
        """The figure-of-merit maps of micrograph ``index`` (computed once)."""
        if index not in self._maps:
            self._maps[index] = self.picker.maps(self.mics.image(index), self.mics.ctf(index),
                                                 index=index)
        return self._maps[index]

    def picks(self, index: int | None = None) -> pd.DataFrame:
        """The picks of a micrograph (default: the one shown) with the sliders' values.

        Returns
        -------
        pandas.DataFrame
            As ``cryonb autopick`` writes them (``rlnCoordinateX/Y`` in micrograph pixels).
        """
        i = self.micrograph.value if index is None else int(index)
        return self.picker.peaks(self.maps(i), threshold=float(self.threshold.value),
                                 min_distance=float(self.min_distance.value))

    def _state(self) -> tuple[int, pd.DataFrame]:
        i = self.micrograph.value
        return i, self.picks(i)

    def update(self) -> None:
        """Pick again with the sliders' values and redraw."""
        i, picks = self._state()
        self.count.value = (f"<b>{len(picks)} picks</b> on {html.escape(self.mics.names[i])}"
                            f" (threshold {self.threshold.value:.2f}, min. distance "
                            f"{self.min_distance.value:.0f} Å)")
        if hasattr(self, "pipe"):
            self.pipe.send((i, picks))

    def apply(self) -> None:
        """Write the threshold and minimum distance into the panel's options."""
        if self.panel is None:
            raise RuntimeError("no panel to write the values into")
        self.panel.form["threshold"].value = float(self.threshold.value)
        self.panel.form["min_distance"].value = float(self.min_distance.value)

    def run_all(self):
        """Use these values and run the panel on all micrographs; returns its RunHandle."""
        self.apply()
        return self.panel.run()

    # ------------------------------------------------------------------ views
    def _image(self, index: int) -> tuple[np.ndarray, int]:
        if index not in self._images:
            self._images[index] = _binned(self.mics.image(index).astype(np.float32),
                                          self.display_size)
        return self._images[index]

    def _micrograph_view(self, data):
        import holoviews as hv

        from ..viz._base import value_range

        index, picks = data
        image, b = self._image(index)
        ny, nx = image.shape[0] * b, image.shape[1] * b
        title = f"{self.mics.names[index]}: {len(picks)} picks"
        img = hv.Image(image[::-1], bounds=(0, 0, nx, ny), kdims=["x", "y"],
                       vdims=["density"]).opts(
            cmap="gray", clim=value_range(image, 0.5, 99.5), frame_width=420,
            frame_height=round(420 * ny / nx), title=title, xlabel="x (px)", ylabel="y (px)",
            colorbar=False, tools=["hover"])
        return img * self._points(picks)

    def _fom_view(self, data):
        import holoviews as hv

        index, picks = data
        maps = self.maps(index)
        fom = maps.fom.max(axis=0)
        g = maps.geometry
        ny, nx = self.mics.shape()
        c, s = g.work_size // 2, g.scale  # map index i is at (i - c + scaled size // 2) / s
        x0 = (int(np.float32(g.xsize) * np.float32(s)) // 2 - c) / s
        y0 = (int(np.float32(g.ysize) * np.float32(s)) // 2 - c) / s
        span = g.work_size / s
        img = hv.Image(fom[::-1], bounds=(x0, y0, x0 + span, y0 + span), kdims=["x", "y"],
                       vdims=["fom"]).opts(
            cmap="viridis", frame_width=420, frame_height=round(420 * ny / nx),
            title="Figure of merit (best reference)", xlabel="x (px)", ylabel="y (px)",
            colorbar=True, tools=["hover"])
        return img * self._points(picks)

    def _points(self, picks: pd.DataFrame):
        import holoviews as hv

        radius = self.picker.templates.box / 2
        pts = pd.DataFrame({"x": picks["rlnCoordinateX"], "y": picks["rlnCoordinateY"],
                            "fom": picks["rlnAutopickFigureOfMerit"],
                            "reference": picks["rlnClassNumber"]})
        return hv.Points(pts, ["x", "y"], ["fom", "reference"]).opts(
            marker="circle", fill_alpha=0, line_color="#e8590c", line_width=2,
            size=max(6, min(40, round(2 * radius * 420 / max(self.mics.shape())))),
            tools=["hover"])

    def view(self):
        """The micrograph and its figure-of-merit map with the picks drawn (live).

        Returns
        -------
        holoviews.Layout
            Two DynamicMaps fed by :attr:`pipe` (the same object on every call).
        """
        if self._view is None:
            import holoviews as hv

            self._view = (hv.DynamicMap(self._micrograph_view, streams=[self.pipe])
                          + hv.DynamicMap(self._fom_view, streams=[self.pipe])).cols(2)
        return self._view

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
