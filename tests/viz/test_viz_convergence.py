"""Convergence plots from a job's history and from files; live growth."""

from __future__ import annotations

import numpy as np
import pytest

from cryonb.errors import InputError
from cryonb.viz import LiveConvergence, convergence_plot, read_convergence

HISTORY = [
    {"iteration": 1, "log_likelihood": -5.0, "avg_pmax": 0.1, "current_resolution": 20.0,
     "current_size": 30, "n_empty": 0, "reseeded": [2]},
    {"iteration": 2, "log_likelihood": -3.0, "avg_pmax": 0.3, "current_resolution": 15.0,
     "current_size": 34, "n_empty": 1, "reseeded": []},
]


def test_from_history():
    layout = convergence_plot(HISTORY)
    assert len(layout) == 6
    resolution = list(layout)[4][()]
    assert list(resolution.Curve.I.dimension_values(1)) == [20.0, 15.0]


def test_from_files(class2d_root):  # rendered by test_viz_show
    df = read_convergence(class2d_root)
    assert list(df["iteration"]) == [1, 2]
    assert list(df["log_likelihood"]) == [2000.0, 3000.0]
    assert list(df["n_empty"]) == [0, 1]
    assert ((df["changes_classes"] > 0) & (df["changes_classes"] <= 1)).all()
    assert ((df["changes_psi"] >= 0) & (df["changes_psi"] <= 180)).all()
    no_changes = read_convergence(f"{class2d_root}_it001_model.star", changes=False)
    assert no_changes["changes_classes"].isna().all()
    assert len(convergence_plot(class2d_root)) == 6
    with pytest.raises(InputError, match=r"no <root>_it###_model\.star"):
        read_convergence(class2d_root.parent / "other")


def test_live_update_grows_buffer(render):
    live = LiveConvergence()
    layout = live.view()
    render(layout)  # empty; the updates below refresh this bokeh model
    live.update(HISTORY[0])
    assert len(live.data) == 1
    live.update(HISTORY[1] | {"changes_classes": 0.25})
    data = live.data
    assert list(data["iteration"]) == [1, 2]
    assert np.isnan(data["changes_classes"][0]) and data["changes_classes"][1] == 0.25
    changes = list(layout)[2][()]
    assert list(changes.Curve.I.dimension_values(1)) == [25.0]  # shown in %
