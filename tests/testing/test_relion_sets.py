"""Tests of cryonb.testing: RELION-made 2D-classification sets and the scores used on them.

The RELION cases make a small set (200 particles, 40 px) with RELION's own programs and check
that it is a valid RELION 3.1 data set whose truth describes its images: every particle is
predicted independently here (a psi = 0 projection of its view made by ``relion_project``,
turned by psi, moved by its origin and multiplied by the CTF written out below), and must match
its own view best. That pins the psi, origin and CTF conventions documented in
``docs/relion_outputs.md``. The metric tests use synthetic labels only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy import ndimage

from cryonb.errors import InputError
from cryonb.testing import (
    ClassSet,
    RelionCommandError,
    circular_median_deg,
    class_purity,
    fibonacci_views,
    inplane_errors,
    make_class2d_set,
    offset_errors,
    rotate_2d,
    run_relion_class2d,
    score_class2d,
    score_relion_run,
)
from cryonb.testing.tools import require_tool

BOX = 40
N = 200
VIEWS = 4


# ------------------------------------------------------------------------------------------
# helpers: an independent forward model of one particle (NumPy/SciPy only)
# ------------------------------------------------------------------------------------------


def turn(img, psi_deg):
    """``out(p) = img(R(psi) p)``, p = (x=column, y=row) about (box//2, box//2)."""
    n = img.shape[0]
    c = n // 2
    t = np.deg2rad(psi_deg)
    y, x = np.indices(img.shape) - c
    xs = np.cos(t) * x - np.sin(t) * y
    ys = np.sin(t) * x + np.cos(t) * y
    return ndimage.map_coordinates(img, [ys + c, xs + c], order=3, mode="constant")


def ctf_2d(n, apix, du, dv, dang, voltage_kv=300.0, cs_mm=2.7, q0=0.1):
    """RELION's CTF on the full FFT grid (numpy order): sin(chi + asin(q0)), > 0 at s = 0."""
    fy = np.fft.fftfreq(n)[:, None] / apix
    fx = np.fft.fftfreq(n)[None, :] / apix
    v = voltage_kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))
    a = np.arctan2(fy, fx) - np.deg2rad(dang)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * a)
    s2 = fx**2 + fy**2
    chi = np.pi * lam * df * s2 - 0.5 * np.pi * cs_mm * 1e7 * lam**3 * s2**2
    return np.sin(chi + np.arcsin(q0))


def predict(p0, row, apix, voltage_kv=300.0, cs_mm=2.7, q0=0.1):
    """Particle predicted from the psi=0 projection of its view and its truth row."""
    n = p0.shape[0]
    img = turn(p0, row.psi)
    f = np.fft.fft2(np.fft.ifftshift(img))
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.fftfreq(n)[None, :]
    # the content moves by -origin (RELION: the particle's centre is at -origin)
    f *= np.exp(-2j * np.pi * (kx * -row.origin_x_px + ky * -row.origin_y_px))
    f *= ctf_2d(n, apix, row.defocus_u, row.defocus_v, row.defocus_angle, voltage_kv, cs_mm, q0)
    return np.fft.fftshift(np.real(np.fft.ifft2(f)))


def project_view(cs, rot, tilt, workdir: Path):
    """psi = 0, origin 0, no-CTF projection of the set's map by relion_project."""
    out = workdir / f"view_{rot:.3f}_{tilt:.3f}.mrc"
    subprocess.run(
        ["relion_project", "--i", str(cs.map), "--o", str(out), "--rot", f"{rot:.6f}",
         "--tilt", f"{tilt:.6f}", "--psi", "0", "--angpix", f"{cs.pixel_size:.6f}"],
        check=True, capture_output=True,
    )
    with mrcfile.open(out) as m:
        return np.asarray(m.data, dtype=np.float64).reshape(cs.box, cs.box)


def ncc(a, b, mask=None):
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ------------------------------------------------------------------------------------------
# the RELION-made set
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    require_tool("relion_project")
    require_tool("relion_preprocess")
    require_tool("relion_image_handler")
    d = tmp_path_factory.mktemp("class2d_set")
    return make_class2d_set(d, n_particles=N, box=BOX, n_views=VIEWS, snr=0.3, seed=3)


@pytest.fixture(scope="module")
def view_projections(small_set, tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    return [project_view(small_set, rot, tilt, d) for rot, tilt in small_set.view_angles]


@pytest.mark.relion
def test_star_is_valid_relion31(small_set):
    cs = small_set
    blocks = starfile.read(cs.particles_star, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    text = cs.particles_star.read_text()
    assert text.count("# version 30001") == 2
    optics, parts = blocks["optics"], blocks["particles"]
    assert len(optics) == 1
    for col, val in [("rlnOpticsGroup", 1), ("rlnImageSize", BOX), ("rlnImageDimensionality", 2),
                     ("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7),
                     ("rlnAmplitudeContrast", 0.1)]:
        assert optics[col].iloc[0] == pytest.approx(val)
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(cs.pixel_size, abs=1e-6)
    assert len(parts) == N
    for col in ("rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnDefocusV",
                "rlnDefocusAngle", "rlnOpticsGroup"):
        assert col in parts.columns
    # no pose columns: the poses are the truth, not an input
    assert not {"rlnAnglePsi", "rlnOriginXAngst", "rlnClassNumber"} & set(parts.columns)
    names = parts["rlnImageName"].str.split("@", expand=True)
    assert (names[0].astype(int).to_numpy() == np.arange(1, N + 1)).all()
    assert (names[1] == "particles.mrcs").all()  # relative to the STAR's folder
    assert (cs.particles_star.parent / "particles.mrcs").resolve() == cs.stack.resolve()
    np.testing.assert_allclose(parts["rlnDefocusU"], cs.truth["defocus_u"], atol=1e-5)
    with mrcfile.open(cs.stack) as m:
        assert m.data.shape == (N, BOX, BOX)
        assert m.data.dtype == np.float32
        assert m.voxel_size.x == pytest.approx(cs.pixel_size, abs=1e-4)
        assert m.header.ispg == 0  # an image stack
    with mrcfile.open(cs.map) as m:
        assert m.data.shape == (BOX,) * 3
        assert m.voxel_size.x == pytest.approx(cs.pixel_size, abs=1e-4)


@pytest.mark.relion
def test_relion_reads_the_star(small_set):
    exe = require_tool("relion_star_printtable")
    out = subprocess.run([exe, cs_name(small_set), "data_particles", "rlnImageName"],
                         cwd=small_set.outdir, check=True, capture_output=True, text=True)
    assert out.stdout.split() == list(small_set.truth["image_name"])


def cs_name(cs):
    return cs.particles_star.name


@pytest.mark.relion
def test_truth_table_and_csv(small_set):
    t = small_set.truth
    csv = pd.read_csv(small_set.outdir / "truth.csv")
    assert list(csv.columns) == list(t.columns)
    np.testing.assert_allclose(csv["psi"], t["psi"], atol=1e-5)
    counts = t["view"].value_counts()
    assert sorted(counts.index) == list(range(VIEWS))
    assert counts.max() - counts.min() <= 1
    assert ((t["psi"] >= 0) & (t["psi"] < 360)).all()
    r = np.hypot(t["origin_x_px"], t["origin_y_px"])
    assert r.max() <= 3.0 + 1e-9
    np.testing.assert_allclose(t["origin_x_A"], t["origin_x_px"] * small_set.pixel_size)
    assert (t["defocus_u"] >= t["defocus_v"]).all()
    assert small_set.snr == pytest.approx(0.3)
    assert small_set.view_separation_deg.min() > 60  # 4 views: far apart


@pytest.mark.relion
def test_load_round_trip(small_set):
    again = ClassSet.load(small_set.outdir)
    pd.testing.assert_frame_equal(again.truth, small_set.truth, check_exact=False, atol=1e-5)
    assert again.pixel_size == pytest.approx(small_set.pixel_size)
    assert again.particle_diameter == small_set.particle_diameter
    np.testing.assert_allclose(again.view_angles, small_set.view_angles)
    assert again.stack == small_set.stack
    assert "3.1" in json.loads((small_set.outdir / "set.json").read_text())["relion_version"]


@pytest.mark.relion
def test_normalised_like_relion(small_set):
    with mrcfile.open(small_set.stack) as m:
        d = np.asarray(m.data, dtype=np.float64)
    g = np.arange(BOX) - BOX // 2
    bg = (g[:, None] ** 2 + g[None, :] ** 2) > small_set.bg_radius**2
    # relion_preprocess --norm: background mean 0, stddev 1 (after removing a ramp)
    assert np.abs(d[:, bg].mean(axis=1)).max() < 1e-3
    np.testing.assert_allclose(d[:, bg].std(axis=1), 1.0, atol=0.02)


@pytest.mark.relion
def test_clean_projections_follow_documented_conventions(small_set, view_projections):
    """relion_project's output = turn(P_view, psi), moved by -origin, times the CTF."""
    cs = small_set
    with mrcfile.open(cs.outdir / "clean.mrcs") as m:
        clean = np.asarray(m.data, dtype=np.float64)
    g = np.arange(BOX) - BOX // 2
    inner = (g[:, None] ** 2 + g[None, :] ** 2) < (BOX // 2 - 4) ** 2
    scores = []
    for i in range(0, N, 5):
        row = cs.truth.iloc[i]
        pred = predict(view_projections[row.view], row, cs.pixel_size)
        scores.append(ncc(pred, clean[i], inner))
    assert min(scores) > 0.97, scores


@pytest.mark.relion
def test_optics_groups_each_with_their_own_ctf(small_set, tmp_path):
    """With ``optics_groups`` the micrographs are dealt to the groups in turn, the STAR file
    has one data_optics row per group, and relion_project gives each particle its own group's
    CTF (the forward model with the group's voltage, Cs and Q0 fits; the other group's not)."""
    groups = [{}, {"voltage": 200.0, "cs": 1.4, "amplitude_contrast": 0.07}]
    cs = make_class2d_set(tmp_path / "g2", n_particles=40, box=BOX, n_views=VIEWS, snr=0.3,
                          seed=3, particles_per_micrograph=10, optics_groups=groups,
                          defocus_range=(20000.0, 30000.0))
    star = starfile.read(cs.particles_star)
    assert star["optics"]["rlnOpticsGroup"].tolist() == [1, 2]
    assert star["optics"]["rlnVoltage"].tolist() == [300.0, 200.0]
    assert star["optics"]["rlnSphericalAberration"].tolist() == [2.7, 1.4]
    expected = (np.arange(40) // 10) % 2 + 1
    np.testing.assert_array_equal(star["particles"]["rlnOpticsGroup"], expected)
    np.testing.assert_array_equal(cs.truth["optics_group"], expected)
    with mrcfile.open(cs.outdir / "clean.mrcs") as m:
        clean = np.asarray(m.data, dtype=np.float64)
    views = [project_view(cs, rot, tilt, tmp_path) for rot, tilt in cs.view_angles]
    g = np.arange(BOX) - BOX // 2
    inner = (g[:, None] ** 2 + g[None, :] ** 2) < (BOX // 2 - 4) ** 2
    params = [(300.0, 2.7, 0.1), (200.0, 1.4, 0.07)]
    for i in range(0, 40, 3):
        row = cs.truth.iloc[i]
        own, other = params[row.optics_group - 1], params[2 - row.optics_group]
        fit = ncc(predict(views[row.view], row, cs.pixel_size, *own), clean[i], inner)
        wrong = ncc(predict(views[row.view], row, cs.pixel_size, *other), clean[i], inner)
        # the other group's CTF leaves several times the residual of the particle's own
        assert fit > 0.99 and 1 - wrong > 4 * (1 - fit), (i, fit, wrong)
    with pytest.raises(InputError, match="unknown key"):
        make_class2d_set(tmp_path / "bad", n_particles=10, box=32, optics_groups=[{"kv": 1}])


@pytest.mark.relion
def test_each_particle_matches_its_own_view(small_set, view_projections):
    cs = small_set
    with mrcfile.open(cs.stack) as m:
        data = np.asarray(m.data, dtype=np.float64)
    g = np.arange(BOX) - BOX // 2
    inner = (g[:, None] ** 2 + g[None, :] ** 2) < (cs.particle_diameter / 2 / cs.pixel_size) ** 2
    best = []
    for i in range(N):
        row = cs.truth.iloc[i]
        c = [ncc(predict(p, row, cs.pixel_size), data[i], inner) for p in view_projections]
        best.append(int(np.argmax(c)))
    agree = np.mean(np.array(best) == cs.truth["view"].to_numpy())
    assert agree > 0.95


@pytest.mark.relion
def test_reproducible_and_seed_dependent(small_set, tmp_path):
    again = make_class2d_set(tmp_path / "a", n_particles=N, box=BOX, n_views=VIEWS, snr=0.3,
                             seed=3)
    pd.testing.assert_frame_equal(again.truth, small_set.truth)
    with mrcfile.open(again.stack) as a, mrcfile.open(small_set.stack) as b:
        np.testing.assert_array_equal(a.data, b.data)
    other = make_class2d_set(tmp_path / "b", n_particles=N, box=BOX, n_views=VIEWS, snr=0.3,
                             seed=4)
    assert not np.allclose(other.truth["psi"], small_set.truth["psi"])


@pytest.mark.relion
def test_input_errors(tmp_path):
    require_tool("relion_project")
    with pytest.raises(InputError, match="not found"):
        make_class2d_set(tmp_path / "x", map_path=tmp_path / "missing.mrc", n_particles=10,
                         box=32)
    blank = tmp_path / "novox.mrc"
    with mrcfile.new(blank) as m:
        m.set_data(np.zeros((16, 16, 16), np.float32))
    with pytest.raises(InputError, match="map_pixel_size"):
        make_class2d_set(tmp_path / "y", map_path=blank, n_particles=10, box=32)
    with pytest.raises(InputError, match="even box"):
        make_class2d_set(tmp_path / "z", n_particles=10, box=33)
    with pytest.raises(RelionCommandError, match="relion_image_handler"):
        make_class2d_set(tmp_path / "w", n_particles=10, box=32, relion_bin_dir=tmp_path)


@pytest.mark.relion
@pytest.mark.slow
def test_run_relion_class2d_small(small_set, tmp_path):
    require_tool("relion_refine")
    run = run_relion_class2d(small_set.particles_star, tmp_path / "c2d", K=VIEWS, iterations=2,
                             particle_diameter=small_set.particle_diameter, psi_step=20,
                             threads=2, progress=False)
    assert run.iterations == 2
    assert run.seconds_per_iteration.shape == (2,)
    assert (run.seconds_per_iteration >= 0).all()
    assert np.isfinite(run.cpu_seconds_per_iteration).all()
    assert run.total_cpu_seconds >= np.nansum(run.cpu_seconds_per_iteration) - 1
    for f in (run.data_star, run.model_star, run.classes_mrcs, run.optimiser_star,
              run.sampling_star):
        assert f.is_file(), f
    with mrcfile.open(run.classes_mrcs) as m:
        assert m.data.shape == (VIEWS, BOX, BOX)
    gen = run.model_general()
    assert list(gen["iteration"]) == [0, 1, 2]
    assert (gen["rlnCurrentImageSize"] <= BOX).all()
    score = score_relion_run(run, small_set)
    assert 0.25 <= score["purity"] <= 1.0


# ------------------------------------------------------------------------------------------
# metrics on synthetic labels
# ------------------------------------------------------------------------------------------


def test_class_purity_examples():
    assert class_purity([1, 1, 2, 2], [0, 0, 1, 1]) == 1.0
    assert class_purity([5, 5, 7, 7], [1, 1, 0, 0]) == 1.0  # label names do not matter
    assert class_purity([1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1]) == pytest.approx(5 / 6)
    assert class_purity([1, 1, 1, 1], [0, 1, 2, 3]) == 0.25
    # splitting a view into two classes is not penalised
    assert class_purity([1, 2, 3, 3], [0, 0, 1, 1]) == 1.0
    with pytest.raises(InputError):
        class_purity([1, 2], [0])


def test_class_purity_random_labels_is_low():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 8, 4000)
    c = rng.integers(0, 8, 4000)
    assert class_purity(c, v) < 0.2
    assert class_purity(v + 10, v) == 1.0


def test_circular_median_wraps():
    assert circular_median_deg([359.0, 1.0, 2.0, 358.5, 0.5]) in (359.0, 0.5)
    assert circular_median_deg([10, 20, 30, 100, 350]) == 20


@pytest.mark.parametrize("sign", [1, -1])
def test_inplane_errors_recover_class_rotation(sign):
    rng = np.random.default_rng(1)
    n = 600
    cls = rng.integers(1, 4, n)
    rot = {1: 17.0, 2: 250.0, 3: 359.0}
    psi_true = rng.uniform(0, 360, n)
    noise = rng.normal(0, 2.0, n)
    psi_est = np.mod(sign * psi_true + np.array([rot[k] for k in cls]) + noise, 360)
    psi_est[:30] = rng.uniform(0, 360, 30)  # some outliers
    res = inplane_errors(cls, psi_est, psi_true, sign=sign)
    for k, r in rot.items():
        d = abs((res.class_rotation[k] - r + 180) % 360 - 180)
        assert d < 1.0
    assert np.median(res.errors[30:]) < 2.5
    assert res.errors.max() <= 180
    wrong = inplane_errors(cls, psi_est, psi_true, sign=-sign)
    assert np.median(wrong.errors) > 30


def test_offset_errors_recover_class_shift():
    rng = np.random.default_rng(2)
    n = 500
    cls = rng.integers(1, 3, n)
    shift = {1: np.array([4.0, -2.0]), 2: np.array([0.0, 6.5])}
    psi = rng.uniform(0, 360, n)
    o_true = rng.uniform(-3, 3, (n, 2))
    s = np.stack([shift[k] for k in cls])
    o_est = o_true + rotate_2d(s, -psi) + rng.normal(0, 0.1, (n, 2))
    res = offset_errors(cls, psi, o_est, o_true)
    for k, v in shift.items():
        np.testing.assert_allclose(res.class_shift[k], v, atol=0.1)
    assert np.median(res.errors) < 0.2
    with pytest.raises(InputError):
        offset_errors(cls, psi, o_est[:, :1], o_true)


def test_rotate_2d_direction():
    np.testing.assert_allclose(rotate_2d([[1.0, 0.0]], 90.0), [[0.0, 1.0]], atol=1e-12)


def test_score_class2d_perfect_and_swapped():
    rng = np.random.default_rng(3)
    n = 400
    view = rng.integers(0, 4, n)
    truth = pd.DataFrame({
        "view": view, "psi": rng.uniform(0, 360, n),
        "origin_x_A": rng.uniform(-10, 10, n), "origin_y_A": rng.uniform(-10, 10, n),
    })
    est = pd.DataFrame({
        "rlnClassNumber": (view + 1)[::-1].copy(),  # deliberately wrong order first
        "rlnAnglePsi": np.mod(truth["psi"] + 40 * view, 360),
        "rlnOriginXAngst": truth["origin_x_A"], "rlnOriginYAngst": truth["origin_y_A"],
    })
    bad = score_class2d(est, truth)
    assert bad["purity"] < 0.5
    est["rlnClassNumber"] = view + 1
    good = score_class2d(est, truth, pixel_size=2.0)
    assert good["purity"] == 1.0
    assert good["inplane_median_deg"] == pytest.approx(0.0, abs=1e-9)
    assert good["offset_median_A"] == pytest.approx(0.0, abs=1e-9)
    assert good["class_to_view"] == {k + 1: k for k in range(4)}
    with pytest.raises(InputError, match="same particles"):
        score_class2d(est.iloc[:10], truth)


def test_fibonacci_views_are_separated_and_seeded():
    a, sep = fibonacci_views(8, np.random.default_rng(0))
    b, _ = fibonacci_views(8, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 2)
    assert sep.min() > 55  # 8 points on the sphere: optimum ~74 deg
    assert ((a[:, 0] >= 0) & (a[:, 0] < 360)).all()
    assert ((a[:, 1] >= 0) & (a[:, 1] <= 180)).all()
    c, _ = fibonacci_views(8, np.random.default_rng(1))
    assert not np.allclose(a, c)
