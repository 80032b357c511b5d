"""Notebook views (holoviews + bokeh): class averages, maps, convergence, curves, load.

Layer 4: reads through :mod:`cryonb.io`; takes device maps of :mod:`cryonb.parallel.devices`
by their attributes (it imports nothing of :mod:`cryonb.parallel`); nothing below imports it.
Importing :mod:`cryonb.viz` is cheap: holoviews is imported when a view module is first used,
and the bokeh extension is loaded, with BokehJS inline (offline machines), when the first
view is built or :func:`ensure_extension` is called. In a notebook call
:func:`ensure_extension` first.

Every view returns a holoviews object (render it with ``hv.render(obj, backend="bokeh")``,
wrap it with ``pn.pane.HoloViews``). The live objects keep their streams as attributes, so
that a panel can feed them from an asyncio task, a callback or a thread, and display
themselves through panel.

Views
    :func:`class_grid`, :class:`LiveClassGrid` (``.update(classes, pdf, resolution,
    iteration)``); :func:`map_viewer`; :func:`convergence_plot`, :class:`LiveConvergence`
    (``.update(dict)``); :func:`ssnr_plot`; :func:`device_layout` (and its
    :func:`device_table`); :func:`load_dashboard`, :class:`LoadDashboard`;
    :func:`star_view`; :func:`show`.
Data (NumPy, pandas, psutil, NVML: no holoviews)
    :class:`LoadMonitor` (GPU, host and process load sampled in a thread, plus the ranks'
    reports), :data:`SAMPLE_COLUMNS`; :func:`read_class_output`, :class:`ClassOutput`,
    :func:`read_convergence`, :func:`read_particle_angles`, :func:`star_summary`,
    :func:`find_class2d_roots`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__all__ = [
    "SAMPLE_COLUMNS",
    "ClassOutput",
    "LiveClassGrid",
    "LiveConvergence",
    "LoadDashboard",
    "LoadMonitor",
    "class_grid",
    "convergence_plot",
    "device_layout",
    "device_table",
    "ensure_extension",
    "find_class2d_roots",
    "load_dashboard",
    "map_viewer",
    "read_class_output",
    "read_convergence",
    "read_particle_angles",
    "show",
    "ssnr_plot",
    "star_summary",
    "star_view",
]

# public name -> private module (imported on first access, PEP 562)
_WHERE = {
    "ensure_extension": "_base",
    "ClassOutput": "_readers",
    "find_class2d_roots": "_readers",
    "read_class_output": "_readers",
    "read_convergence": "_readers",
    "read_particle_angles": "_readers",
    "star_summary": "_readers",
    "SAMPLE_COLUMNS": "_monitor",
    "LoadMonitor": "_monitor",
    "LiveClassGrid": "_classes",
    "class_grid": "_classes",
    "map_viewer": "_maps",
    "LiveConvergence": "_convergence",
    "convergence_plot": "_convergence",
    "ssnr_plot": "_curves",
    "device_layout": "_devices",
    "device_table": "_devices",
    "LoadDashboard": "_dashboard",
    "load_dashboard": "_dashboard",
    "show": "_show",
    "star_view": "_show",
}

if TYPE_CHECKING:
    from ._base import ensure_extension
    from ._classes import LiveClassGrid, class_grid
    from ._convergence import LiveConvergence, convergence_plot
    from ._curves import ssnr_plot
    from ._dashboard import LoadDashboard, load_dashboard
    from ._devices import device_layout, device_table
    from ._maps import map_viewer
    from ._monitor import SAMPLE_COLUMNS, LoadMonitor
    from ._readers import (
        ClassOutput,
        find_class2d_roots,
        read_class_output,
        read_convergence,
        read_particle_angles,
        star_summary,
    )
    from ._show import show, star_view


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
