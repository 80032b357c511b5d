"""Pieces of the picker and the extractor, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryonb.errors import ConfigError, InputError, ResourceError
from cryonb.fourier import Projector, fft2_centered
from cryonb.io import read_particles, read_star, write_mrc, write_star
from cryonb.pick import (
    AutopickConfig,
    MicrographSet,
    PickGeometry,
    PickTemplates,
    coordinate_path,
    divide_equally,
    estimate_particle_diameter,
    good_fourier_size,
    match_picks,
    micrograph_root,
    open_picker,
    prepare_micrograph,
    read_coordinates,
    read_references,
    relion_fourier_rows,
    resize_images_fourier,
    score_picks,
)
from cryonb.pick.extract import (
    ExtractConfig,
    extract_boxes,
    normalise_particles,
    run_extract,
)


# ----------------------------------------------------------------------------- sizes, names
def test_divide_equally_as_relion():
    blocks = [divide_equally(20, 3, r) for r in range(3)]
    assert blocks == [(0, 7), (7, 14), (14, 20)]
    assert [divide_equally(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ConfigError):
        divide_equally(5, 2, 2)


def test_good_fourier_size_and_geometry():
    assert good_fourier_size(512, 512) == 510  # 257 is prime
    assert good_fourier_size(512, 512, optimise=False) == 512
    assert good_fourier_size(510, 512) == 510
    assert good_fourier_size(256, 512) == 256
    g = PickGeometry.for_micrographs(512, 512, 5.0, lowpass=20)
    assert (g.size, g.downsize, g.work_size) == (512, 256, 510)
    assert g.scale == pytest.approx(510 / 512)
    g = PickGeometry.for_micrographs(512, 400, 5.0, lowpass=20, shrink=0)
    assert (g.size, g.work_size, g.scale) == (512, 256, 0.5)
    # RELION's peak region: the micrograph's own rows only, less half a box
    assert g.search_region(64) == (128 - 100 + 16, 128 - 100 + 200 - 16, 16, 240)
    x, y = g.peak_position(np.array([128]), np.array([128]))
    assert (x[0] / g.scale, y[0] / g.scale) == (256.0, 200.0)
    with pytest.raises(ConfigError, match="Nyquist"):
        PickGeometry.for_micrographs(512, 512, 5.0, lowpass=8)
    with pytest.raises(ConfigError, match="--shrink"):
        PickGeometry.for_micrographs(512, 512, 5.0, shrink=600)


def test_output_names_as_relion():
    assert micrograph_root("MotionCorr/job002/Movies/m1.mrc") == "Movies/m1"
    assert micrograph_root("Micrographs/mic001.mrc") == "Micrographs/mic001"
    assert micrograph_root("/data/x/job123/a/b.tiff") == "a/b"
    assert str(coordinate_path("AutoPick/job011/", "MotionCorr/job002/Movies/m1.mrc")) == \
        "AutoPick/job011/Movies/m1_autopick.star"
    assert coordinate_path("c", "Micrographs/m.mrc", suffix="_manualpick.star").name == \
        "m_manualpick.star"


def test_relion_fourier_rows():
    np.testing.assert_array_equal(relion_fourier_rows(6), [0, 1, 2, 3, -2, -1])
    np.testing.assert_array_equal(relion_fourier_rows(5), [0, 1, 2, -2, -1])


# ----------------------------------------------------------------------------- references
def _blob(box: int = 48, radius: float = 12.0) -> np.ndarray:
    ax = np.arange(box) - box // 2
    r2 = ax[:, None] ** 2 + ax[None, :] ** 2
    return np.exp(-r2 / (2 * (radius / 2) ** 2)) * (r2 < radius**2)


def test_resize_keeps_values_and_centre():
    ax = np.arange(48) - 24
    img = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / 72.0)[None].astype(np.float32)
    big = resize_images_fourier(img, 96)
    small = resize_images_fourier(img, 24)
    assert big.shape == (1, 96, 96) and small.shape == (1, 24, 24)
    assert np.unravel_index(big[0].argmax(), big[0].shape) == (48, 48)
    assert np.unravel_index(small[0].argmax(), small[0].shape) == (12, 12)
    assert big[0].max() == pytest.approx(img.max(), rel=0.02)  # grey values keep their scale
    np.testing.assert_allclose(resize_images_fourier(big, 48), img, atol=1e-5)


def test_particle_diameter_from_references():
    refs = np.zeros((2, 40, 40), np.float32)
    refs[0, 20, 10:30] = 1.0  # 20 pixels wide on the centre row
    refs[1, 20, 14:26] = 1.0  # 12
    assert estimate_particle_diameter(refs, 2.0) == pytest.approx((19 + 11) / 2 * 2.0)


def test_templates_masks_and_rescaling():
    refs = np.stack([_blob(), 2 * _blob()]).astype(np.float32)
    t = PickTemplates.from_references(refs, 4.0, ref_pixel_size=2.0, particle_diameter=80,
                                      invert=True)
    assert t.box == 24  # 2 ROUND(24 * 2 / 4)
    assert t.radius2 == (10 - 2) ** 2  # ROUND(80 / 8) - shrink 2
    assert t.n_in + t.n_bg == 24 * 24
    assert (t.refs[:, 12, 12] < 0).all() and (t.refs.sum(axis=(1, 2)) < 0).all()  # inverted
    _, background = t.masks(24)
    assert (t.refs[:, background > 0] == 0).all()
    with pytest.raises(ConfigError, match="larger than the reference box"):
        PickTemplates.from_references(refs, 4.0, particle_diameter=500)
    with pytest.raises(ConfigError, match="mask radius"):
        PickTemplates.from_references(refs, 4.0, particle_diameter=10)


def test_rotated_transforms_match_the_projector():
    """The compact oversampled grid interpolates like cryonb's Projector (RELION's, without
    gridding) on the reference put in the micrograph box."""
    refs = np.stack([_blob(32, 9) * (1 + 0.5 * np.arange(32)[None, :] / 32)]).astype(np.float32)
    t = PickTemplates.from_references(refs, 2.0, particle_diameter=60, shrink_particle_mask=0)
    size, d = 64, 32
    got = t.rotated_transforms(0, size, d, [0.0, 33.0])
    box = np.zeros((size, size), np.float32)
    box[16:48, 16:48] = t.refs[0]
    from cryonb.data.conventions import inplane_matrix

    want = Projector(box, padding=2, r_max=d // 2, gridding=False).project(
        inplane_matrix(np.array([0.0, 33.0])), size)
    kx = np.arange(d // 2 + 1)[None, :]
    ky = relion_fourier_rows(d)[:, None]
    inner = kx**2 + ky**2 < (d // 2 - 1) ** 2  # RELION zeroes the grid beyond r_max
    np.testing.assert_allclose(got[:, inner], want[:, ky[:, 0] % size][:, :, : d // 2 + 1][
        :, inner], rtol=1e-4, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(got[0, inner], fft2_centered(box)[ky[:, 0] % size][
        :, : d // 2 + 1][inner], rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_read_references(tmp_path):
    refs = np.stack([_blob(), _blob(48, 8)]).astype(np.float32)
    write_mrc(tmp_path / "classes.mrcs", refs, 3.0)
    got, apix = read_references(tmp_path / "classes.mrcs")
    np.testing.assert_allclose(got, refs)
    assert apix == pytest.approx(3.0)
    write_star(tmp_path / "refs.star", {"": pd.DataFrame(
        {"rlnReferenceImage": ["000002@classes.mrcs", "000001@classes.mrcs"]})})
    got, _ = read_references(tmp_path / "refs.star")
    np.testing.assert_allclose(got, refs[::-1])
    write_mrc(tmp_path / "map.mrc", np.zeros((8, 8, 8), np.float32), 3.0)
    with pytest.raises(InputError, match="3D map"):
        read_references(tmp_path / "map.mrc")
    write_star(tmp_path / "bad.star", {"": pd.DataFrame({"rlnClassNumber": [1]})})
    with pytest.raises(InputError, match="rlnReferenceImage or rlnImageName"):
        read_references(tmp_path / "bad.star")
    write_star(tmp_path / "far.star", {"": pd.DataFrame(
        {"rlnImageName": ["000009@classes.mrcs"]})})
    with pytest.raises(InputError, match="holds 2 images"):
        read_references(tmp_path / "far.star")


# ----------------------------------------------------------------------------- micrographs
def test_prepare_micrograph():
    rng = np.random.default_rng(0)
    img = rng.normal(5.0, 2.0, (40, 64)).astype(np.float32)
    img[3, 4] = 45.0  # 20 sigma: becomes the mean (statistics taken before, as RELION)
    g = PickGeometry.for_micrographs(64, 40, 1.0)
    x = prepare_micrograph(img, g, 8.0, np.random.default_rng(1))
    assert x.shape == (64, 64)
    inner = x[12:52]
    assert inner[3, 4] == pytest.approx(0.0, abs=1e-6)
    assert abs(np.delete(inner.ravel(), 3 * 64 + 4).std() - 1) < 0.1
    assert abs(x[:12].std() - 1) < 0.2  # N(0, 1) padding
    with pytest.raises(InputError, match="same size"):
        prepare_micrograph(img[:30], g)
    with pytest.raises(InputError, match="constant"):
        prepare_micrograph(np.ones((40, 64)), g)


def test_micrograph_set_errors(tmp_path, pick_set):
    with pytest.raises(ConfigError, match="--ctf needs a micrographs STAR"):
        MicrographSet.read(str(tmp_path / "*.mrc"), 1.0, need_ctf=True)
    with pytest.raises(InputError, match="no file matches"):
        MicrographSet.read(str(tmp_path / "*.mrc"), 1.0)
    blocks = read_star(pick_set.micrographs_star)
    star = pick_set.micrographs_star.parent / f"noctf_{tmp_path.name}.star"
    write_star(star, {"optics": blocks["optics"],
                      "micrographs": blocks["micrographs"][["rlnMicrographName"]]})
    with pytest.raises(InputError, match="rlnDefocusU"):
        MicrographSet.read(str(star), need_ctf=True)
    mics = MicrographSet.read(str(pick_set.micrographs_star), angpix=3.0)
    assert mics.pixel_size == pick_set.pixel_size  # the STAR file wins, as in RELION
    assert mics.ctf(0).defocus_u == pytest.approx(blocks["micrographs"].rlnDefocusU.iloc[0])


def test_config_errors(pick_config, tmp_path):
    with pytest.raises(ConfigError, match="--ang"):
        AutopickConfig(psi_step=0).validate()
    with pytest.raises(ConfigError, match="--lowpass"):
        AutopickConfig(lowpass=0).validate()
    with pytest.raises(ConfigError, match="--ctf_intact_first_peak needs --ctf"):
        AutopickConfig(ctf_intact_first_peak=True).validate()
    assert AutopickConfig(psi_step=7).n_psi == 51
    assert AutopickConfig(psi_step=360).psi_angles == [0.0]
    with pytest.raises(ConfigError, match="--ref is required"):
        open_picker(pick_config(tmp_path, ref=""))
    with pytest.raises(ResourceError, match="no GPU"):
        from cryonb.backend import gpu_available

        if gpu_available():
            pytest.skip("a GPU is usable here")
        open_picker(pick_config(tmp_path), device=0)


def test_relion_command_line(pick_config, tmp_path):
    config = pick_config(tmp_path, ranks=4, psi_step=5.0)
    cmd = config.relion_command_line()
    assert cmd.startswith("mpirun -n 4 relion_autopick_mpi ")
    for part in ("--ang 5.0", "--lowpass 20.0", "--ctf", "--invert", "--threshold 0.1",
                 "--shrink 0.0", "--particle_diameter 270.0"):
        assert part in cmd
    assert "--ranks" not in cmd and "--pool" not in cmd
    e = ExtractConfig(i="m.star", coord_dir="c/", extract_size=64, norm=True, bg_radius=25)
    assert e.relion_command_line().startswith("relion_preprocess --extract ")


# ----------------------------------------------------------------------------- scoring, I/O
def test_match_and_score():
    pi, ti = match_picks([[0, 0], [10, 0], [50, 50]], [[1, 0], [9, 1], [100, 100]], 3.0)
    assert sorted(zip(pi, ti)) == [(0, 0), (1, 1)]
    picks = pd.DataFrame({"rlnMicrographName": ["a", "a", "b"], "rlnCoordinateX": [0, 10, 5],
                          "rlnCoordinateY": [0, 0, 5]})
    truth = pd.DataFrame({"rlnMicrographName": ["a", "b", "b"], "rlnCoordinateX": [1, 5, 40],
                          "rlnCoordinateY": [0, 6, 40]})
    s = score_picks(picks, truth, 3.0)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    with pytest.raises(InputError, match="rlnMicrographName"):
        score_picks(picks.drop(columns="rlnMicrographName"), truth, 3.0)


def test_read_coordinates_formats(tmp_path):
    (tmp_path / "a.box").write_text("10 20 100 100\n30 40 100 100\n")
    df = read_coordinates(tmp_path / "a.box")
    np.testing.assert_allclose(df.rlnCoordinateX, [60, 80])
    (tmp_path / "a.txt").write_text("1.5 2.5\n3 4\n")
    np.testing.assert_allclose(read_coordinates(tmp_path / "a.txt").rlnCoordinateY, [2.5, 4])
    (tmp_path / "empty.star").write_text("")  # RELION 3.1 writes this for no picks
    assert read_coordinates(tmp_path / "empty.star").empty
    with pytest.raises(InputError, match="not found"):
        read_coordinates(tmp_path / "missing.star")
    (tmp_path / "bad.txt").write_text("x y\n")
    with pytest.raises(InputError, match="cannot read coordinates"):
        read_coordinates(tmp_path / "bad.txt")


# ----------------------------------------------------------------------------- extraction
def test_extract_boxes_and_normalise():
    img = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    boxes = extract_boxes(img, [10.9, 2.0], [20.2, 99.0], 8)
    assert boxes.shape == (2, 8, 8)
    assert boxes[0, 4, 4] == img[20, 10]  # truncated, on pixel (B/2, B/2)
    assert (boxes[1, 7] == boxes[1, 4]).all()  # rows beyond the edge repeat the last one
    assert (boxes[1, :, 0] == boxes[1, :, 2]).all()
    with pytest.raises(InputError, match="completely outside"):
        extract_boxes(img, [-10.0], [50.0], 8)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = (rng.normal(size=(3, 32, 32)) + 0.3 * xx - 0.2 * yy + 7).astype(np.float32)
    out = normalise_particles(imgs, 12)
    bg = (xx - 16) ** 2 + (yy - 16) ** 2 > 144
    np.testing.assert_allclose(out[:, bg].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, bg].std(1), 1, atol=1e-5)
    assert abs(np.polyfit(xx[bg], out[0][bg], 1)[0]) < 0.02  # the ramp is gone
    with pytest.warns(UserWarning, match="constant background"):
        normalise_particles(np.ones((1, 8, 8)), 2)


def test_extract_carries_ctf_and_reads_back(picked, pick_set, tmp_path):
    """Extraction from autopicking's list: a RELION 3.1 STAR with each micrograph's CTF."""
    _, result = picked
    config = ExtractConfig(i=str(pick_set.micrographs_star), coord_list=str(
        result.coordinate_list), part_dir=f"{tmp_path}/Extract/", extract_size=64, scale=32,
        norm=True, bg_radius=14, invert_contrast=True, ranks=2, j=2)
    out = run_extract(config)
    assert out.n_particles == result.n_picks and len(out.stacks) == 20
    pt = read_particles(out.particles_star)
    assert pt.box == 32 and pt.pixel_size == pytest.approx(2 * pick_set.pixel_size)
    mics = read_star(pick_set.micrographs_star)["micrographs"].set_index("rlnMicrographName")
    ctf = pt.ctf_params()
    np.testing.assert_allclose(ctf["defocus_u"],
                               mics.rlnDefocusU.loc[pt.particles.rlnMicrographName])
    assert (pt.particles.rlnAutopickFigureOfMerit >= 0.1).all()
    images = pt.images(slice(0, 50))
    assert images.shape == (50, 32, 32)
    assert images[:, 16, 16].mean() > 0  # inverted: white particles
    with pytest.raises(ConfigError, match="--norm needs --bg_radius"):
        ExtractConfig(i="m.star", extract_size=64, norm=True).validate()
    with pytest.raises(ConfigError, match="even"):
        ExtractConfig(i="m.star", extract_size=63).validate()
    with pytest.raises(InputError, match="no particles to extract"):
        run_extract(ExtractConfig(i=str(pick_set.micrographs_star),
                                  coord_dir=f"{tmp_path}/nothing/", extract_size=64,
                                  part_dir=f"{tmp_path}/E2/"))
