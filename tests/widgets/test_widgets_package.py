"""The package: cheap import, lazy names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cryonb.widgets as widgets


def test_import_loads_no_widget_or_plot_library():
    code = ("import sys, cryonb.widgets; "
            "bad = [m for m in ('ipywidgets', 'holoviews', 'bokeh') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in widgets.__all__:
        assert getattr(widgets, name) is not None
    assert sorted(dir(widgets)) == sorted(widgets.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        widgets.nope  # noqa: B018


def test_panel_without_views_imports_no_holoviews():
    code = ("import sys; from cryonb.widgets import Class2DPanel; p = Class2DPanel(devices=0); "
            "p.config; assert 'holoviews' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
