"""Fourier insertion kernel: Numba (CPU) and CuPy (GPU) against the NumPy reference."""

import numpy as np
import pytest

from cryonb.kernels import (
    insert_accumulated_2d,
    insert_rows_2d,
    insert_slices_2d,
    insert_slices_2d_reference,
)


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


def _accumulator(seed=2, K=3, R=4, p=40):
    """An accumulator of K * R rows (class-major) [Re | Im], its weights, coordinates per
    angle, some rows left empty, and the rows to insert in a scrambled order."""
    rng = np.random.default_rng(seed)
    acc = rng.normal(size=(K * R, 2 * p))
    accw = rng.random((K * R, p))
    coords = rng.uniform(-8.5, 8.5, (R, p, 2)).astype(np.float32)
    rows = rng.permutation(K * R)[: K * R - 3]
    return (K, 16, 9), acc, accw, coords, rows, R


def _rows_reference(shape, acc, accw, coords, rows, R):
    p = accw.shape[1]
    d, w = np.zeros(shape, complex), np.zeros(shape)
    insert_slices_2d_reference(d, w, acc[rows, :p] + 1j * acc[rows, p:], accw[rows],
                               coords[rows % R], rows // R, 7.5)
    return d, w


def test_rows_match_the_slices_reference():
    """insert_rows_2d: the chosen rows of an accumulator, read in place, as the reference
    of the materialised slices (values, weights, coordinates per row, classes)."""
    shape, acc, accw, coords, rows, R = _accumulator()
    d1, w1 = np.zeros(shape, complex), np.zeros(shape)
    insert_rows_2d(d1, w1, acc, accw, coords, rows, rows % R, rows // R, 7.5)
    d2, w2 = _rows_reference(shape, acc, accw, coords, rows, R)
    np.testing.assert_allclose(d1, d2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w1, w2, rtol=1e-12, atol=1e-12)
    assert np.abs(d1).sum() > 0


def test_rows_reject_mismatched_accumulators():
    shape, acc, accw, coords, rows, R = _accumulator()
    with pytest.raises(ValueError, match="disagree"):
        insert_rows_2d(np.zeros(shape, complex), np.zeros(shape), acc[:, :-1], accw, coords,
                       rows, rows % R, rows // R, 7.5)
    with pytest.raises(ValueError, match="one length"):
        insert_rows_2d(np.zeros(shape, complex), np.zeros(shape), acc, accw, coords, rows,
                       rows[:-1] % R, rows // R, 7.5)


@pytest.mark.gpu
def test_cupy_rows_match_the_slices_reference():
    import cupy

    shape, acc, accw, coords, rows, R = _accumulator(3)
    d1, w1 = cupy.zeros(shape, complex), cupy.zeros(shape)
    r = cupy.asarray(rows)
    insert_rows_2d(d1, w1, cupy.asarray(acc), cupy.asarray(accw), cupy.asarray(coords), r,
                   r % R, r // R, 7.5)
    d2, w2 = _rows_reference(shape, acc, accw, coords, rows, R)
    # as test_cupy_matches_reference: equal to rounding (measured 1e-8 relative on an H100)
    np.testing.assert_allclose(d1.get(), d2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w1.get(), w2, rtol=1e-5, atol=1e-7)


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


def _with_empty_rows(seed):
    """An accumulator as :func:`_accumulator` whose left-out rows are zero (no particle
    reached them), and one pixel of a kept row zero too."""
    shape, acc, accw, coords, rows, R = _accumulator(seed)
    empty = np.setdiff1d(np.arange(acc.shape[0]), rows)
    acc[empty], accw[empty] = 0.0, 0.0
    p = accw.shape[1]
    acc[rows[0], [3, p + 3]], accw[rows[0], 3] = 0.0, 0.0
    return shape, acc, accw, coords, np.sort(rows), R


def test_accumulated_rows_are_the_non_empty_rows():
    """insert_accumulated_2d: the whole accumulator's sums are those of its non-empty rows."""
    shape, acc, accw, coords, rows, R = _with_empty_rows(4)
    d1, w1 = np.zeros(shape, complex), np.zeros(shape)
    insert_accumulated_2d(d1, w1, acc, accw, coords, 7.5)
    d2, w2 = _rows_reference(shape, acc, accw, coords, rows, R)
    np.testing.assert_allclose(d1, d2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w1, w2, rtol=1e-12, atol=1e-12)
    assert np.abs(d1).sum() > 0
    with pytest.raises(ValueError, match="K \\* R rows"):
        insert_accumulated_2d(d1, w1, acc[:-1], accw[:-1], coords, 7.5)


@pytest.mark.gpu
def test_cupy_accumulated_rows_are_the_non_empty_rows():
    """GPU: every row inserted, the zero values skipped: the sums of the non-empty rows."""
    import cupy

    shape, acc, accw, coords, rows, R = _with_empty_rows(5)
    d1, w1 = cupy.zeros(shape, complex), cupy.zeros(shape)
    insert_accumulated_2d(d1, w1, cupy.asarray(acc), cupy.asarray(accw),
                          cupy.asarray(coords), 7.5)
    d2, w2 = _rows_reference(shape, acc, accw, coords, rows, R)
    np.testing.assert_allclose(d1.get(), d2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w1.get(), w2, rtol=1e-5, atol=1e-7)
