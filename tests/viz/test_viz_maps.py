"""Map viewer: slices with sliders, projections."""

from __future__ import annotations

import numpy as np
import pytest

from cryonb.io import read_mrc
from cryonb.viz import map_viewer


def test_map_from_file_renders(map_file, render):
    layout = map_viewer(map_file)
    render(layout)
    slices = list(layout)[:3]
    assert [d.kdims[0].name for d in slices] == ["z", "y", "x"]
    assert [d.kdims[0].default for d in slices] == [10, 12, 14]  # central slices
    z7 = slices[0][7]
    assert z7.kdims[0].name == "x" and z7.kdims[1].name == "y"
    vol = read_mrc(map_file).data
    # row 0 of the map is y = 0, shown at the bottom
    np.testing.assert_allclose(z7.data[-1], vol[7, 0], rtol=1e-6)  # hv.Image: top row first
    assert layout.label == "map.mrc (28 x 24 x 20, 1.5 Å/voxel)"
    # Layout.opts() would give the DynamicMaps a custom option id, which IPython's cleanup of
    # option trees can later point at another element's options (wrong titles in a notebook)
    assert [d.id for d in slices] == [None, None, None]


def test_projections_are_sums():
    vol = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    layout = map_viewer(vol)
    proj_z = list(layout)[3]
    assert proj_z.dimension_values(2).sum() == pytest.approx(vol.sum(), rel=1e-5)


def test_image_and_bad_shape():
    assert next(iter(map_viewer(np.ones((5, 6))))).kdims[0].range == (0, 0)
    with pytest.raises(ValueError, match="3D array"):
        map_viewer(np.ones((2, 3, 4, 5)))
