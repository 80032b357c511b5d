"""Class-average grid: tiles, titles, tap selection, live updates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryonb.viz import LiveClassGrid, class_grid, read_class_output


def _views(grid: LiveClassGrid):
    overlay_dmap, large, hist = list(grid.view())
    return overlay_dmap, large, hist


def _title(dmap) -> str:
    element = dmap[()]
    if hasattr(element, "Image"):  # the grid: its title is on the image
        element = element.Image.I
    return element.opts.get().kwargs["title"]


def test_grid_from_array_renders(render):
    rng = np.random.default_rng(0)
    pdf = np.array([0.1, 0.5, 0.4])
    layout = class_grid(rng.normal(size=(3, 16, 16)), pdf, resolution=[20.0, 8.0, 999.0])
    render(layout)


def test_tiles_sorted_and_titled():
    grid = LiveClassGrid(np.zeros((3, 8, 8)), pdf=[0.1, 0.5, 0.4], resolution=[20.0, 8.0, 999],
                         iteration=7)
    d = grid.data
    assert list(d.order) == [1, 2, 0]
    assert list(d.labels["text"]) == ["2 · 50.0% · 8 Å", "3 · 40.0%", "1 · 10.0% · 20 Å"]
    assert grid.selected == 2  # the largest class is shown large first
    unsorted = LiveClassGrid(np.zeros((3, 8, 8)), pdf=[0.1, 0.5, 0.4], sort=False)
    assert list(unsorted.data.order) == [0, 1, 2]


def test_grid_from_files(class2d_root, class2d_facts):
    f = class2d_facts
    last = f"{class2d_root}_it{f.iterations - 1:03d}_classes.mrcs"
    out = read_class_output(last)
    assert out.classes.shape == (f.K, f.N, f.N)
    assert out.iteration == f.iterations - 1 and out.pixel_size == pytest.approx(f.pixel_size)
    assert out.pdf[f.K - 1] == 0 and len(out.particles) == f.n_particles
    grid = LiveClassGrid(last)  # rendered by test_viz_show
    assert "iteration 2" in _title(_views(grid)[0])
    # the root, and the model file, lead to the same last iteration
    assert read_class_output(class2d_root).source == out.source
    model = read_class_output(f"{class2d_root}_it001_model.star")
    assert model.iteration == 1 and model.particles is not None


def test_tap_selects_the_class_under_the_pointer(class2d_root):
    grid = LiveClassGrid(class2d_root)
    d = grid.data
    target = int(d.order[-1])
    x0, y0, x1, y1 = d.tile_box(target)
    grid.tap.event(x=(x0 + x1) / 2, y=(y0 + y1) / 2)
    assert grid.selected == target + 1
    _, large, hist = _views(grid)
    assert _title(large).startswith(f"Class {target + 1}")
    counts = hist[()].dimension_values("particles")
    expected = (grid.data.psi_counts[target]).sum()
    assert counts.sum() == expected
    grid.tap.event(x=-5.0, y=-5.0)  # outside every tile: nothing changes
    assert grid.selected == target + 1
    grid.select(1)
    assert grid.selected == 1
    with pytest.raises(ValueError, match="class_number must be 1-4"):
        grid.select(5)


def _callbacks_of(plot, stream) -> list:
    """The plot callbacks (at any depth) that feed ``stream`` from the browser."""
    found = [cb for cb in getattr(plot, "callbacks", []) if any(s is stream for s in cb.streams)]
    subplots = getattr(plot, "subplots", None) or {}
    for sub in subplots.values() if isinstance(subplots, dict) else subplots:
        found += _callbacks_of(sub, stream)
    return found


def test_live_update_pushes_new_data():
    import holoviews as hv

    rng = np.random.default_rng(1)
    grid = LiveClassGrid(rng.normal(size=(4, 12, 12)), np.full(4, 0.25), iteration=1)
    plot = hv.renderer("bokeh").get_plot(grid.view())  # the updates below refresh it
    # a browser click must come back: the tap stream is attached to the rendered mosaic
    assert [type(cb).__name__ for cb in _callbacks_of(plot, grid.tap)] == ["TapCallback"]
    first = grid.pipe.data
    particles = pd.DataFrame({"rlnClassNumber": [1, 1, 2, 5, 0],
                              "rlnAnglePsi": [10.0, 190.0, -170.0, 0.0, 0.0]})
    grid.update(rng.normal(size=(4, 12, 12)), [0.7, 0.1, 0.1, 0.1], [9.0, 9, 9, 9], 2,
                particles=particles)
    second = grid.pipe.data
    assert second is not first and second.iteration == 2
    assert not np.array_equal(first.images, second.images)
    # psi 190 wraps to -170: classes 1 and 2 share that bin; class 5 and 0 do not exist
    assert second.psi_counts.sum() == 3 and second.psi_counts[:, 1].sum() == 2
    grid.update(rng.normal(size=(2, 12, 12)), iteration=3)  # fewer classes
    assert grid.pipe.data.k == 2 and grid.selection.index < 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="pdf has 2 values for 3 classes"):
        class_grid(np.zeros((3, 8, 8)), pdf=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"array \(K, N, N\)"):
        class_grid(np.zeros((2, 2, 8, 8)))


def test_rectangular_images():
    grid = LiveClassGrid(np.random.default_rng(2).normal(size=(5, 10, 20)), ncols=2)
    assert grid.data.mosaic.shape[1] == 2 * grid.data.cell[0]
    box = grid.data.tile_box(4)
    assert grid.data.tile_at(box[0] + 1, box[1] + 1) == 4
