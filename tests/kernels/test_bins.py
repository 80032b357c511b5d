"""Several weighted histograms in one pass: against bincount, on both backends."""

import numpy as np
import pytest


@pytest.mark.parametrize("n_bins", [7, 3000])  # 3000 x 5 sums exceed shared memory
def test_weighted_bincounts_equal_bincount(xp, n_bins):
    from cryonb.kernels import weighted_bincounts

    rng = np.random.default_rng(1)
    n = 100_003
    idx = rng.integers(0, n_bins, n)
    idx[:5000] = 2  # many samples into one bin
    w = rng.uniform(-1, 1, (5, n))
    got = weighted_bincounts(xp.asarray(idx), xp.asarray(w), n_bins)
    got = got.get() if hasattr(got, "get") else got
    want = np.stack([np.bincount(idx, weights=r, minlength=n_bins) for r in w])
    assert got.shape == (5, n_bins) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    empty = weighted_bincounts(xp.asarray(idx[:0]), xp.asarray(w[:, :0]), n_bins)
    assert float(abs(empty).sum()) == 0.0 and empty.shape == (5, n_bins)


@pytest.mark.parametrize("weighted", [True, False])
def test_add_bincount_adds_bincount_in_place(xp, weighted):
    """Into a view of a larger array (a K x K table's rows), counts or float32 weights."""
    from cryonb.kernels import add_bincount

    rng = np.random.default_rng(2)
    n, n_bins = 50_001, 40_000  # K = 200 classes' K x K margins
    idx = rng.integers(0, n_bins, n)
    idx[:3000] = 7
    w = rng.uniform(0, 1, n).astype(np.float32)
    table = rng.uniform(size=(200, 200))
    want = table.reshape(-1) + np.bincount(idx, weights=w if weighted else None,
                                           minlength=n_bins)
    got = xp.asarray(table)
    add_bincount(got.reshape(-1), xp.asarray(idx), xp.asarray(w) if weighted else None)
    got = got.get() if hasattr(got, "get") else got
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-12)
    col = xp.zeros((5, 2))  # a strided column
    add_bincount(col[:, 1], xp.asarray([0, 4, 4]))
    col = col.get() if hasattr(col, "get") else col
    np.testing.assert_array_equal(col, [[0, 1], [0, 0], [0, 0], [0, 0], [0, 2]])


@pytest.mark.parametrize("shape", [(3, 129), (1000, 2, 3), (1,)])
def test_add_rows_at_sums_repeated_rows(xp, shape):
    """acc[idx[i]] += rows[i]: runs of one index (a pool's particles of one group), indices
    in any order, a single row, float32 rows into float64 sums; a strided acc too."""
    from cryonb.backend import add_rows_at

    rng = np.random.default_rng(3)
    M = shape[0]
    n = 5_003
    idx = np.sort(rng.integers(0, M, n))
    idx[-700:] = rng.integers(0, M, 700)  # an unsorted tail
    rows = rng.normal(size=(n, *shape[1:])).astype(np.float32)
    acc = rng.normal(size=shape)
    want = acc.copy()
    np.add.at(want, idx, rows.astype(np.float64))
    got = xp.asarray(acc.copy())
    add_rows_at(got, xp.asarray(idx), xp.asarray(rows))
    got = got.get() if hasattr(got, "get") else got
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    if len(shape) == 2:  # a column of a wider table: not contiguous
        wide = xp.zeros((M, 2 * shape[1]))
        add_rows_at(wide[:, ::2], xp.asarray(idx), xp.asarray(rows))
        wide = wide.get() if hasattr(wide, "get") else wide
        np.testing.assert_allclose(wide[:, ::2], want - acc, rtol=1e-12, atol=1e-9)
