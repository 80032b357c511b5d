"""describe(): a summary for every shared file, or a clear error."""

from __future__ import annotations

import pytest

from cryonb.errors import InputError
from cryonb.io import describe


def test_describe_every_manifest_file(manifest_entry, shared_data):
    path = shared_data / manifest_entry.local
    if manifest_entry.kind in ("other", "star_fail"):
        with pytest.raises(InputError) as err:
            describe(path)
        assert manifest_entry.name in str(err.value)
        return
    text = describe(path)
    assert str(path) in text.splitlines()[0]
    if manifest_entry.kind == "star":
        for name in manifest_entry.blocks:
            assert f"data_{name}:" in text
    else:
        assert "MRC file" in text


def test_describe_particles(shared_data):
    text = describe(shared_data / "ml-struct-bio+cryodrgn/tests/data/relion31.6opticsgroups.star")
    assert "RELION 3.1+ particles: 139 particles, 6 optics groups" in text
    assert "pixel size: 1.24, 1.25 A" in text
    assert "box: 196 px" in text


def test_describe_mrc(shared_data):
    text = describe(shared_data / "ccpem+mrcfile/tests/test_data/EMD-3001.map")
    assert "volume 73 x 25 x 43 (z, y, x), mode 2 (float32), voxel size 0.4482 A" in text
    assert "axis order MAPC/MAPR/MAPS 3, 1, 2" in text
    assert "min -0.368143, max 0.72161" in text
    bad = describe(shared_data / "exiftool+exiftool/t/images/MRC.mrc")
    assert "INVALID:" in bad and "truncated" in bad and "FEI1" in bad


def test_describe_unknown(shared_data):
    with pytest.raises(InputError, match=r"empiar_10076_7.cs: is a cryoSPARC .cs"):
        describe(shared_data / "ml-struct-bio+cryodrgn/tests/data/empiar_10076_7.cs")
    with pytest.raises(InputError, match=r"README.txt: is neither a STAR nor an MRC file"):
        describe(shared_data / "ccpem+mrcfile/tests/test_data/README.txt")
