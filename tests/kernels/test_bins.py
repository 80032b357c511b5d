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
