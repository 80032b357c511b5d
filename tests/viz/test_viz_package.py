"""The package: cheap import, lazy names, the offline extension."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cryonb.viz as viz


def test_import_does_not_load_holoviews():
    code = ("import sys, cryonb, cryonb.viz as v; v.LoadMonitor; v.read_convergence; "
            "v.star_summary; assert 'holoviews' not in sys.modules, 'holoviews imported'; "
            "assert 'bokeh' not in sys.modules, 'bokeh imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in viz.__all__:
        assert getattr(viz, name) is not None
    assert sorted(dir(viz)) == sorted(viz.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        viz.nope  # noqa: B018


def test_ensure_extension_is_idempotent():
    import holoviews as hv
    import panel as pn

    assert viz.ensure_extension() is None
    assert hv.Store.current_backend == "bokeh" and pn.config.inline
    viz.ensure_extension()
    viz.ensure_extension(force=True)
    assert hv.Store.current_backend == "bokeh"


def test_cryonb_show_delegates(map_file):
    import cryonb

    assert type(cryonb.show(map_file)) is type(viz.show(map_file))


def test_live_objects_display_through_panel():
    import numpy as np
    import panel as pn

    grid = viz.LiveClassGrid(np.zeros((2, 8, 8)))
    row = pn.panel(grid)
    assert isinstance(row, pn.Row) and grid.panel() is row  # grid | (large over histogram)
    assert isinstance(pn.panel(viz.LiveConvergence()), pn.pane.HoloViews)
    monitor = viz.LoadMonitor(gpus=False)
    assert isinstance(pn.panel(viz.LoadDashboard(monitor)), pn.pane.HoloViews)
