"""Power per Fourier shell: NumPy and CuPy against bincount per image."""

import numpy as np
import pytest

from cryonb.kernels import shell_power, shell_power_reference, shell_table


def _host(a):
    return a.get() if hasattr(a, "get") else a


@pytest.mark.parametrize("B", [0, 1, 9])
def test_shell_power_is_a_bincount_of_the_power(xp, B):
    rng = np.random.default_rng(B)
    P, nbins = 700, 40
    X = (rng.normal(size=(B, P)) + 1j * rng.normal(size=(B, P))).astype(np.complex64)
    # bins with no pixels, pixels without a bin (negative, and beyond the last)
    bins = rng.integers(-3, nbins + 5, P)
    bins[bins == 17] = 18
    table = shell_table(bins, nbins, xp)
    got = _host(shell_power(xp.asarray(X), table))
    want = shell_power_reference(X, bins, nbins)
    assert got.shape == (B, nbins) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if B:
        assert np.all(got[:, 17] == 0)
        # each image's sums are its own, whichever images share the call; and repeatable
        np.testing.assert_array_equal(_host(shell_power(xp.asarray(X[1:2]), table)), got[1:2])
        np.testing.assert_array_equal(_host(shell_power(xp.asarray(X), table)), got)


def test_shell_power_checks_the_table(xp):
    table = shell_table(np.arange(10) % 3, 3, xp)
    with pytest.raises(ValueError, match="11 pixels, the table 10"):
        shell_power(xp.zeros((2, 11), xp.complex64), table)


@pytest.mark.parametrize("weighted", [False, True])
def test_shell_sums_are_bincounts(xp, weighted):
    from cryonb.kernels import shell_sums

    rng = np.random.default_rng(7)
    B, P, nbins = 5, 300, 12
    V = rng.normal(size=(B, P))
    W = rng.uniform(0, 2, (B, P)).astype(np.float32)
    bins = rng.integers(-1, nbins, P)
    table = shell_table(bins, nbins, xp)
    got = _host(shell_sums(xp.asarray(V), table, xp.asarray(W) if weighted else None))
    vals = V * W if weighted else V
    keep = bins >= 0
    want = np.stack([np.bincount(bins[keep], row[keep], minlength=nbins) for row in vals])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="299 pixels"):
        shell_sums(xp.asarray(V[:, 1:]), table)
