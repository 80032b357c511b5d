"""Fourier insertion kernel: Numba (CPU) and CuPy (GPU) against the NumPy reference."""

import numpy as np
import pytest

from cryonb.kernels import insert_slices_2d, insert_slices_2d_reference


def _data(seed=0, K=3, py=16, px=9, m=6, p=50):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(m, p)) + 1j * rng.normal(size=(m, p))
    w = rng.random((m, p))
    c = rng.uniform(-8.5, 8.5, (m, p, 2)).astype(np.float32)
    s = rng.integers(0, K, m)
    return (K, py, px), v, w, c, s


def test_numba_matches_reference():
    shape, v, w, c, s = _data()
    d1, w1 = np.zeros(shape, complex), np.zeros(shape)
    d2, w2 = np.zeros(shape, complex), np.zeros(shape)
    insert_slices_2d(d1, w1, v, w, c, s, 7.5)
    insert_slices_2d_reference(d2, w2, v, w, c, s, 7.5)
    np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(w1, w2, rtol=1e-6, atol=1e-9)
    assert np.abs(d1).sum() > 0


def test_friedel_and_bounds():
    shape = (1, 8, 5)
    d, wg = np.zeros(shape, complex), np.zeros(shape)
    v = np.array([[1 + 2j]])
    insert_slices_2d(d, wg, v, np.ones((1, 1)), np.array([[[-2.0, 1.0]]], np.float32),
                     np.array([0]), 10)
    # x < 0 -> stored at (-x, -y) conjugated: ky=-1 -> row 4 - 1 = 3, kx = 2
    assert d[0, 3, 2] == pytest.approx(1 - 2j)
    assert wg.sum() == pytest.approx(1.0)


def test_rejects_single_precision_grids():
    shape, v, w, c, s = _data()
    with pytest.raises(ValueError, match="complex128"):
        insert_slices_2d(np.zeros(shape, np.complex64), np.zeros(shape), v, w, c, s, 7.5)


@pytest.mark.gpu
def test_cupy_matches_reference():
    import cupy

    shape, v, w, c, s = _data(1)
    d1, w1 = cupy.zeros(shape, complex), cupy.zeros(shape)
    insert_slices_2d(d1, w1, cupy.asarray(v), cupy.asarray(w), cupy.asarray(c),
                     cupy.asarray(s), 7.5)
    d2, w2 = np.zeros(shape, complex), np.zeros(shape)
    insert_slices_2d_reference(d2, w2, v, w, c, s, 7.5)
    np.testing.assert_allclose(d1.get(), d2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w1.get(), w2, rtol=1e-5, atol=1e-7)
