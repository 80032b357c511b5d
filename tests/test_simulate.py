"""Simulation: reproducible, written as RELION 3.1 files, truth round trip."""

import subprocess

import numpy as np
import pandas as pd
import pytest

from cryonb.ctf import CTFParams, ctf_2d
from cryonb.data import euler_to_matrix
from cryonb.fourier import Projector, ifft2_centered, shift_phases_2d
from cryonb.io import read_particles, read_star
from cryonb.simulate import (
    discrete_views,
    simulate_micrographs,
    simulate_particles,
    write_micrograph_set,
    write_particle_set,
)
from cryonb.testing.tools import require_tool


def test_particles_reproducible_and_truth_roundtrip(tmp_path):
    a = simulate_particles(n=40, box=32, n_views=4, snr=0.5, seed=3)
    b = simulate_particles(n=40, box=32, n_views=4, snr=0.5, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    star = write_particle_set(a, tmp_path)
    t = read_particles(star)
    assert t.n == 40 and t.box == 32 and t.pixel_size == pytest.approx(a.pixel_size)
    np.testing.assert_allclose(t.images(np.arange(40)), a.images, atol=1e-6)
    truth = pd.read_csv(tmp_path / "particles_truth.csv")
    assert set(truth.view) == {0, 1, 2, 3}
    np.testing.assert_allclose(t.ctf_params()["defocus_u"], truth.defocus_u)
    # the particle table carries no poses: those are what a job must find
    assert "rlnAnglePsi" not in t.particles and "rlnOriginXAngst" not in t.particles


def test_particle_names_as_relion_finds_them(tmp_path, monkeypatch):
    """Stacks are named relative to the project folder (the current one), as RELION's
    programs run there look them up; absolute when written outside it."""
    sim = simulate_particles(n=6, box=32, n_views=2, snr=0.5, seed=1)
    monkeypatch.chdir(tmp_path)
    star = write_particle_set(sim, "sim")
    names = read_star(star)["particles"]["rlnImageName"]
    assert names.iloc[0] == "000001@sim/particles.mrcs"
    # cryonb reads the file from anywhere
    (tmp_path / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "deeper")
    np.testing.assert_allclose(read_particles(tmp_path / "sim" / "particles.star").images([0]),
                               sim.images[:1], atol=1e-6)
    outside = write_particle_set(sim, tmp_path / "sim2")  # not under the current folder
    assert read_star(outside)["particles"]["rlnImageName"].iloc[0] == \
        f"000001@{tmp_path / 'sim2' / 'particles.mrcs'}"
    own = write_particle_set(sim, tmp_path / "sim3", project=tmp_path / "sim3")
    assert read_star(own)["particles"]["rlnImageName"].iloc[0] == "000001@particles.mrcs"


@pytest.mark.relion
def test_relion_reads_simulated_particles(tmp_path, monkeypatch):
    handler = require_tool("relion_image_handler")
    sim = simulate_particles(n=4, box=32, n_views=2, snr=0.5, seed=1)
    monkeypatch.chdir(tmp_path)
    write_particle_set(sim, "sim")
    out = subprocess.run([handler, "--i", "sim/particles.star", "--stats"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("sim/particles.mrcs") == 4


def test_noiseless_particles_are_the_model(xp):
    """The images are the model computed here on the host, whether projected on the host or
    on a GPU (``xp``); chunks of 2 cover a partial last chunk."""
    sim = simulate_particles(n=5, box=32, n_views=2, snr=np.inf, seed=1, normalise=False,
                             xp=xp, chunk=2)
    assert isinstance(sim.images, np.ndarray)
    tr = sim.truth
    f = Projector(sim.volume).project(euler_to_matrix(tr.rot.values, tr.tilt.values,
                                                      tr.psi.values))
    f = f * shift_phases_2d(32, -np.c_[tr.origin_x, tr.origin_y])
    f = f * ctf_2d(CTFParams(tr.defocus_u.values, tr.defocus_v.values,
                             tr.defocus_angle.values), 32, sim.pixel_size)
    np.testing.assert_allclose(ifft2_centered(f.astype(np.complex64), 32), sim.images,
                               atol=1e-4 * np.abs(sim.images).max())


def test_gpu_simulation_is_the_host_one(xp):
    """Noise, normalisation and truth are drawn on the host: the set made on ``xp`` is the
    host's up to float32 rounding of the projections."""
    a = simulate_particles(n=12, box=48, n_views=3, snr=0.1, seed=4)
    b = simulate_particles(n=12, box=48, n_views=3, snr=0.1, seed=4, xp=xp)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    np.testing.assert_allclose(b.images, a.images, atol=1e-4 * np.abs(a.images).max())


def test_snr_definition():
    sim = simulate_particles(n=200, box=32, n_views=2, snr=0.1, seed=0, normalise=False,
                             ctf=False)
    clean = simulate_particles(n=200, box=32, n_views=2, snr=np.inf, seed=0,
                               normalise=False, ctf=False).images
    noise = sim.images - clean
    ax = np.arange(32) - 16
    mask = ax[:, None] ** 2 + ax[None] ** 2 <= (0.75 * 32 / 2) ** 2
    snr = np.mean(clean[:, mask].var(axis=1)) / noise.var()
    assert snr == pytest.approx(0.1, rel=0.05)


def test_views_are_distinct():
    v = discrete_views(8, 0)
    d = np.linalg.norm(v[:, None] - v[None], axis=-1) + np.eye(8) * 1e3
    assert d.min() > 5


def test_micrographs_known_coordinates(tmp_path):
    sim = simulate_micrographs(n_micrographs=2, size=256, particles_per_micrograph=6,
                               snr=1.0, seed=4)
    assert len(sim.micrographs) == 2 and len(sim.coordinates) >= 8
    star = write_micrograph_set(sim, tmp_path)
    blocks = read_star(star)
    assert list(blocks["micrographs"].rlnMicrographName) == ["Micrographs/mic001.mrc",
                                                             "Micrographs/mic002.mrc"]
    coords = read_star(tmp_path / "truth" / "mic001_truth.star")
    block = next(iter(coords.values()))
    c = sim.coordinates[sim.coordinates.micrograph == 0]
    np.testing.assert_allclose(block.rlnCoordinateX, c.x)
    # particles are dark in raw micrographs: the signal at a particle centre is negative
    mic = sim.micrographs[0]
    vals = [mic[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3].mean() for x, y in zip(c.x, c.y)]
    assert np.mean(vals) < 0
