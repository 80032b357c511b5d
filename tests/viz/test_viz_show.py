"""show(): the view that fits each kind of input."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import pytest

from cryonb.errors import InputError
from cryonb.io import read_star, write_mrc
from cryonb.parallel.devices import resolve_device_map
from cryonb.viz import LiveConvergence, LoadMonitor, show, star_summary


def _kinds(layout) -> list[str]:
    return [type(item).__name__ for item in layout]


def test_star_file_summary(class2d_root, render):
    data = f"{class2d_root}_it002_data.star"
    tables = star_summary(read_star(data))
    assert tables["blocks"]["rows"].tolist() == [2, 60]
    assert tables["classes"]["particles"].sum() == 60
    assert tables["optics groups"]["name"].tolist() == ["og1", "og2"]
    layout = show(data)
    assert _kinds(layout) == ["Table"] * 3
    render(layout)


def test_model_star_gets_ssnr(class2d_root):
    layout = show(f"{class2d_root}_it002_model.star")
    assert _kinds(layout) == ["Table", "Overlay"]


def test_mrc_files(map_file, class2d_root, tmp_path):
    assert _kinds(show(map_file))[:3] == ["DynamicMap"] * 3  # map viewer
    grid = show(f"{class2d_root}_it001_classes.mrcs")
    assert len(grid) == 3
    assert "iteration 1" in next(iter(grid))[()].Image.I.opts.get().kwargs["title"]
    stack = tmp_path / "particles.mrcs"
    write_mrc(stack, np.random.default_rng(0).normal(size=(7, 10, 10)), 1.0)
    small = show(stack, stack_limit=5)
    assert small.label == "particles.mrcs: first 5 of 7 images"
    image = tmp_path / "one.mrc"
    write_mrc(image, np.ones((10, 12)), 1.0)
    assert len(show(image)) == 3  # a single image: one tile


def test_class2d_root_and_folder(class2d_root, render):
    layout = show(class2d_root)
    assert len(layout) == 3 + 6  # grid, large class, histogram; six convergence panels
    assert all(item.id is None for item in layout)  # see test_viz_maps
    assert len(show(class2d_root.parent)) == 9
    render(layout)


def test_objects(render):
    cube = np.random.default_rng(0).random((8, 8, 8))
    assert _kinds(show(cube))[0] == "DynamicMap"
    assert len(show(cube, kind="stack")) == 3
    assert len(show(np.ones((8, 12)))) == 3
    assert isinstance(show(pd.DataFrame({"a": [1, 2]})), hv.Table)
    assert len(show({"particles": pd.DataFrame({"rlnImageName": ["1@a.mrcs"]})})) == 1
    assert len(show([{"iteration": 1, "log_likelihood": 2.0}])) == 6
    assert len(show(resolve_device_map("0", ranks=2, n_devices=1))) == 2
    live = LiveConvergence()
    assert show(live) is live.view()
    monitor = LoadMonitor(gpus=False)
    assert len(show(monitor)) == 5  # live: its refresh thread waits for the monitor ...
    monitor.stop()  # ... and ends with it
    element = hv.Curve([1, 2])
    assert show(element) is element


def test_errors(tmp_path):
    odd = tmp_path / "notes.txt"
    odd.write_text("hello\n")
    with pytest.raises(InputError, match="neither a STAR file"):
        show(odd)
    with pytest.raises(InputError, match="no such file"):
        show(tmp_path / "missing.star")
    with pytest.raises(InputError, match="folder without Class2D output"):
        show(tmp_path)
    with pytest.raises(TypeError, match="cannot show a set"):
        show({1, 2})
    with pytest.raises(ValueError, match="shape"):
        show(np.ones(5))
