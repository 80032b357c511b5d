"""Fourier tools: normalisation, shifts, rotations, projection; NumPy and CuPy paths agree."""

import numpy as np
import pytest

from cryonb.backend import to_numpy
from cryonb.data import euler_to_matrix, inplane_matrix
from cryonb.fourier import (
    Projector,
    fft2_centered,
    ifft2_centered,
    pad_centered,
    radial_index_2d,
    rotate_2d,
    shell_average,
    shift_2d,
    window_2d,
)
from cryonb.simulate import phantom_map


def test_fft_roundtrip_and_relion_normalisation(xp):
    rng = np.random.default_rng(0)
    img = xp.asarray(rng.normal(size=(3, 32, 32)).astype(np.float32))
    f = fft2_centered(img)
    assert f.shape == (3, 32, 17)
    # RELION divides the forward transform by the number of pixels: DC = mean
    np.testing.assert_allclose(to_numpy(f[:, 0, 0].real), to_numpy(img.mean(axis=(1, 2))),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ifft2_centered(f, 32)), to_numpy(img), atol=1e-5)


def test_integer_shift_moves_content(xp):
    img = np.zeros((32, 32), np.float32)
    img[16, 16] = 1  # the centre
    f = fft2_centered(xp.asarray(img))
    out = to_numpy(ifft2_centered(shift_2d(f, xp.asarray([3.0, -2.0])), 32))
    assert np.unravel_index(out.argmax(), out.shape) == (14, 19)  # (y, x)


def test_rotation_convention_and_inverse(xp):
    img = np.zeros((32, 32), np.float32)
    img[16, 20] = 1  # x = +4
    out = to_numpy(rotate_2d(xp.asarray(img), 90.0))
    # RELION's 2D convention: the rotated image at p equals the original at A^T... (y down)
    assert np.unravel_index(out.argmax(), out.shape) == (12, 16)
    phantom = phantom_map(32)[16]
    back = to_numpy(rotate_2d(rotate_2d(xp.asarray(phantom), 37.0), -37.0))
    assert np.corrcoef(back.ravel(), phantom.ravel())[0, 1] > 0.99


def test_projection_equals_real_space_sum_for_identity(xp):
    vol = phantom_map(32)
    proj = Projector(xp.asarray(vol))
    img = to_numpy(ifft2_centered(proj.project(xp.asarray(euler_to_matrix(0.0, 0.0, 0.0))), 32))
    direct = vol.sum(axis=0)
    assert np.corrcoef(img.ravel(), direct.ravel())[0, 1] > 0.999


def test_projection_tilt_90_is_side_view():
    vol = phantom_map(64)
    img = ifft2_centered(Projector(vol).project(euler_to_matrix(0.0, 90.0, 0.0)), 64)
    # tilt 90 about y: projecting along x of the map, image x <- map -z
    side = vol.sum(axis=2)  # (z, y)
    cands = [side.T, side.T[:, ::-1], side, side[::-1], side[:, ::-1], side.T[::-1]]
    cc = [np.corrcoef(img.ravel(), np.ascontiguousarray(c).ravel())[0, 1] for c in cands]
    assert int(np.argmax(cc)) == 1 and cc[1] > 0.97


def test_2d_projector_matches_inplane_matrix(xp):
    img = xp.asarray(phantom_map(32)[16])
    p = Projector(img)
    a = p.project(xp.asarray(inplane_matrix(np.array([10.0, 200.0]))))
    assert a.shape == (2, 32, 17)


def test_projector_stack_equals_separate_projectors(xp):
    """A stack of 2D references gives each reference's values bit for bit (as the E-step
    samples every class at once), for sample() and project(), one rotation or several."""
    rng = np.random.default_rng(4)
    cls = xp.asarray(rng.normal(size=(3, 33, 33)).astype(np.float32))
    stack = Projector(cls, stack=True)
    coords = xp.asarray(rng.uniform(-20, 20, size=(5, 40, 2)).astype(np.float32))
    got = to_numpy(stack.sample(coords))
    assert got.shape == (3, 5, 40)
    rots = xp.asarray(inplane_matrix(np.array([10.0, 200.0])))
    for k in range(3):
        one = Projector(cls[k])
        np.testing.assert_array_equal(got[k], to_numpy(one.sample(coords)))
        np.testing.assert_array_equal(to_numpy(stack.project(rots))[k],
                                      to_numpy(one.project(rots)))
        np.testing.assert_array_equal(to_numpy(stack.project(rots[0]))[k],
                                      to_numpy(one.project(rots[0])))
    with pytest.raises(ValueError, match=r"\(K, n, n\)"):
        Projector(cls[0], stack=True)


def test_window_pad_shells(xp):
    rng = np.random.default_rng(1)
    img = xp.asarray(rng.normal(size=(32, 32)).astype(np.float32))
    f = fft2_centered(img)
    w = window_2d(f, 16)
    assert w.shape == (16, 9)
    assert complex(to_numpy(w[1, 2])) == complex(to_numpy(f[1, 2]))
    assert complex(to_numpy(w[-1, 2])) == complex(to_numpy(f[-1, 2]))
    assert pad_centered(img, 48).shape == (48, 48)
    sh = radial_index_2d(32, xp)
    avg = shell_average(xp.abs(f) ** 2, sh, 17)
    assert avg.shape == (17,)


@pytest.mark.gpu
def test_numpy_and_cupy_projection_agree():
    import cupy

    vol = phantom_map(32)
    rot = euler_to_matrix(np.array([10.0, 80.0]), np.array([30.0, 100.0]), np.array([5.0, 270.0]))
    a = Projector(vol).project(rot)
    b = Projector(cupy.asarray(vol)).project(cupy.asarray(rot)).get()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
