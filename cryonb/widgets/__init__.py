"""Notebook panels (ipywidgets): job options, live checks, Run/Stop/Continue, progress, views.

Layer 5: builds on :mod:`cryonb.parallel`, :mod:`cryonb.pick` and :mod:`cryonb.viz`; nothing
imports it. Importing :mod:`cryonb.widgets` is cheap: ipywidgets is imported when a panel is
first used, holoviews when its views are built.

Panels
    :class:`Class2DPanel`, :class:`AutopickPanel` and :class:`JobPanel` (any job
    configuration): one widget per option from the configuration's field metadata, the
    ``--gpu`` string checked on every keystroke (resolved device table, or the error with a
    caret under the fault), the memory or disc the I/O mode needs, the equivalent ``cryonb``
    and ``mpirun ... relion_*`` command lines, Run/Stop/Continue, progress per iteration and
    rank, and live views (class averages, convergence, load of every device, device layout).
    ``panel.config`` is the configuration object the command line builds.
Picking
    :class:`PickExplorer`: pick one micrograph with threshold and minimum-distance sliders,
    the picks drawn over it.
Parts
    :class:`ConfigForm`, :class:`ProgressView`, :class:`RunProgress`, :class:`RunHandle`,
    :func:`device_report`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__all__ = [
    "AutopickPanel",
    "Class2DPanel",
    "ConfigForm",
    "DeviceReport",
    "JobPanel",
    "PickExplorer",
    "ProgressView",
    "RunHandle",
    "RunProgress",
    "device_report",
    "visible_gpus",
]

# public name -> private module (imported on first access, PEP 562)
_WHERE = {
    "AutopickPanel": "_panel",
    "Class2DPanel": "_panel",
    "JobPanel": "_panel",
    "ConfigForm": "_form",
    "DeviceReport": "_checks",
    "device_report": "_checks",
    "visible_gpus": "_checks",
    "PickExplorer": "_picking",
    "ProgressView": "_progress",
    "RunProgress": "_progress",
    "RunHandle": "_run",
}

if TYPE_CHECKING:
    from ._checks import DeviceReport, device_report, visible_gpus
    from ._form import ConfigForm
    from ._panel import AutopickPanel, Class2DPanel, JobPanel
    from ._picking import PickExplorer
    from ._progress import ProgressView, RunProgress
    from ._run import RunHandle


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
