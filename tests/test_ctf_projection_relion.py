"""CTF and projection exactly as RELION: cross-checked against ``relion_project --ctf``."""

import subprocess

import numpy as np
import pandas as pd
import pytest

from cryonb.ctf import CTFParams, ctf_2d, electron_wavelength
from cryonb.data import euler_to_matrix
from cryonb.fourier import Projector, ifft2_centered, shift_phases_2d
from cryonb.io import read_stack, write_mrc, write_star
from cryonb.simulate import phantom_map
from cryonb.testing.tools import require_tool


def test_wavelength_300kv():
    assert electron_wavelength(300.0) == pytest.approx(0.019687, rel=1e-4)


def test_ctf_values_relion_formula():
    c = ctf_2d(CTFParams(15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1), 64, 2.0)
    assert c[0, 0] == pytest.approx(0.1, rel=1e-4)  # -sin(-K3) = Q at the origin
    lam = electron_wavelength(300.0)
    u2 = (10 / (64 * 2.0)) ** 2
    arg = np.pi * lam * (-15000) * u2 + np.pi / 2 * 2.7e7 * lam**3 * u2**2 - np.arctan(
        0.1 / np.sqrt(1 - 0.01))
    assert c[0, 10] == pytest.approx(-np.sin(arg), abs=1e-5)
    # astigmatism: defocus U along the angle, V perpendicular
    a = ctf_2d(CTFParams(20000.0, 10000.0, 0.0), 64, 2.0)
    b = ctf_2d(CTFParams(10000.0, 20000.0, 90.0), 64, 2.0)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_intact_first_peak_and_bfactor():
    p = CTFParams(20000.0, 20000.0, bfactor=100.0)
    c = ctf_2d(p, 64, 2.0, intact_first_peak=True)
    assert c[0, 1] == pytest.approx(1.0 * np.exp(-25 * (1 / 128) ** 2), rel=1e-4)
    assert np.abs(ctf_2d(p, 64, 2.0)[0, 30]) < 1


@pytest.mark.relion
def test_ctf_from_precomputed_features():
    """Per-particle CTFs at given pixels from their precomputed factors (as the E-step does
    once per grid) are those computed from the indices; scale factors other than 1 apply."""
    from cryonb.ctf import ctf_at, ctf_features

    rng = np.random.default_rng(2)
    kx, ky = rng.integers(0, 33, 200).astype(float), rng.integers(-32, 33, 200).astype(float)
    p = CTFParams(rng.uniform(1e4, 3e4, 5), rng.uniform(1e4, 3e4, 5), rng.uniform(0, 180, 5),
                  bfactor=np.array([0.0, 50, 0, 0, 0]), scale=np.array([1, 1, 0.5, 1, 1.0]))
    want = ctf_at(p, kx, ky, 64, 1.5)
    got = ctf_at(p, kx, ky, 64, 1.5, features=ctf_features(kx, ky))
    assert got.shape == (5, 200) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    p.scale = 1.0
    unscaled = ctf_at(p, kx, ky, 64, 1.5)
    np.testing.assert_allclose(want[2], 0.5 * unscaled[2], rtol=1e-6)
    np.testing.assert_array_equal(want[[0, 1, 3, 4]], unscaled[[0, 1, 3, 4]])


def test_projection_with_ctf_matches_relion_project(tmp_path):
    exe = require_tool("relion_project")
    rng = np.random.default_rng(7)
    n, box, apix = 8, 48, 3.0
    vol = phantom_map(box, seed=2)
    write_mrc(tmp_path / "map.mrc", vol, apix)
    rot, tilt, psi = rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n)
    ox, oy = rng.uniform(-4, 4, n), rng.uniform(-4, 4, n)
    dfu = rng.uniform(8000, 30000, n)
    dfv = dfu - rng.uniform(0, 2000, n)
    dfa = rng.uniform(0, 180, n)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["g1"], "rlnOpticsGroup": [1],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
                          "rlnOriginXAngst": ox * apix, "rlnOriginYAngst": oy * apix,
                          "rlnDefocusU": dfu, "rlnDefocusV": dfv, "rlnDefocusAngle": dfa,
                          "rlnOpticsGroup": 1})
    write_star(tmp_path / "ang.star", {"optics": optics, "particles": parts})
    subprocess.run([exe, "--i", "map.mrc", "--ang", "ang.star", "--o", "proj", "--ctf",
                    "--angpix", str(apix)], cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    relion, _ = read_stack(tmp_path / "proj.mrcs", mmap=False)
    f = Projector(vol).project(euler_to_matrix(rot, tilt, psi))
    f = f * shift_phases_2d(box, -np.stack([ox, oy], axis=1))  # RELION: shift by -origin
    f = f * ctf_2d(CTFParams(dfu, dfv, dfa, 300.0, 2.7, 0.1), box, apix)
    ours = ifft2_centered(f.astype(np.complex64), box)
    for i in range(n):
        cc = np.corrcoef(ours[i].ravel(), relion[i].ravel())[0, 1]
        assert cc >= 0.99, f"image {i}: correlation {cc:.4f} with relion_project"
        assert np.std(ours[i]) == pytest.approx(np.std(relion[i]), rel=0.05)
