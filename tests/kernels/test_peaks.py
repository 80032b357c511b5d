"""Peak kernels: Numba (CPU) and CuPy (GPU) against the plain references."""

from __future__ import annotations

import numpy as np
import pytest

from cryonb.backend import to_numpy
from cryonb.kernels import (
    find_peaks_2d,
    find_peaks_2d_reference,
    prune_peak_clusters,
    prune_peak_clusters_reference,
    remove_close_peaks,
    remove_close_peaks_reference,
    update_best_2d,
    update_best_2d_reference,
)


def _map(seed: int, shape=(64, 80)) -> np.ndarray:
    """A smooth random map with plateaus (equal neighbours) and exact threshold values."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=shape)
    f = (f + np.roll(f, 1, 0) + np.roll(f, 1, 1)) / 3
    f = np.round(f, 1)  # ties everywhere
    return f


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_find_peaks_matches_reference(xp, seed, strict):
    f = _map(seed)
    rng = np.random.default_rng(seed + 10)
    sd = rng.uniform(0.5, 1.5, f.shape)
    mu = rng.normal(size=f.shape)
    region = (3, 60, 2, 77)
    for opts in ({}, {"stddev": sd, "mean": mu, "max_stddev_noise": 1.2, "min_avg_noise": -0.5}):
        dev = {k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
        got = find_peaks_2d(xp.asarray(f), 0.2, region, neighbours_above_threshold=strict, **dev)
        want = find_peaks_2d_reference(f, 0.2, region, neighbours_above_threshold=strict, **opts)
        assert isinstance(got[0], np.ndarray) and got[0].dtype == np.int64
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert len(want[0]) > 5
    iy, ix = want
    v = f[iy, ix]
    assert (v >= 0.2).all() and (f[iy - 1, ix] <= v).all() and (f[iy, ix + 1] <= v).all()
    assert ((iy >= 3) & (iy < 60) & (ix >= 2) & (ix < 77)).all()


def test_find_peaks_rules():
    f = np.zeros((7, 7))
    f[3, 3] = 1.0
    f[2, 3] = 0.5  # a neighbour above the threshold
    for strict, expected in ((True, 0), (False, 1)):
        iy, _ = find_peaks_2d(f, 0.3, (1, 6, 1, 6), neighbours_above_threshold=strict)
        assert len(iy) == expected  # RELION: with --shrink 1 the 4 neighbours must pass too
    f[2:5, 2:5] = 1.0  # a plateau: every pixel whose neighbours are not higher
    iy, ix = find_peaks_2d(f, 0.3, (1, 6, 1, 6))
    assert list(zip(iy, ix)) == [(3, 3)]
    with pytest.raises(ValueError, match="one pixel away"):
        find_peaks_2d(f, 0.3, (0, 7, 0, 7))


def _candidates(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, n)
    y = rng.integers(0, 200, n)
    fom = np.round(rng.random(n), 2)  # ties
    return x, y, fom


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_matches_reference(seed):
    x, y, fom = _candidates(seed)
    for cluster_r2, min_d2 in ((25.0, 100.0), (100.0, 36.0), (625.0, 1024.0)):
        got = prune_peak_clusters(x, y, fom, cluster_r2, min_d2)
        want = prune_peak_clusters_reference(x, y, fom, cluster_r2, min_d2)
        np.testing.assert_array_equal(got, want)
        assert len(np.unique(got)) == len(got)


def test_prune_semantics():
    # two chained candidates (linked through the middle one) and a lone one
    x = np.array([0, 4, 8, 50])
    y = np.zeros(4, np.int64)
    fom = np.array([0.5, 0.9, 0.7, 0.1])
    # one cluster {0, 1, 2}: keep 1 (best), drop 0 and 2 (closer than 6); then the lone one
    np.testing.assert_array_equal(prune_peak_clusters(x, y, fom, 25.0, 36.0), [1, 3])
    # with a small minimum distance, 0 and 2 survive in the same cluster (best first)
    np.testing.assert_array_equal(prune_peak_clusters(x, y, fom, 25.0, 9.0), [1, 2, 0, 3])
    # min_d2 = 0 terminates (every kept peak leaves its cluster)
    assert len(prune_peak_clusters(x, y, fom, 25.0, 0.0)) == 4
    assert len(prune_peak_clusters([], [], [], 1.0, 1.0)) == 0


def test_remove_close_matches_reference():
    x, y, _ = _candidates(3, 200)
    for min_d2 in (0.0, 16.0, 400.0):
        np.testing.assert_array_equal(remove_close_peaks(x, y, min_d2),
                                      remove_close_peaks_reference(x, y, min_d2))
    # both members of a close pair go; a single peak stays; the distance is strict
    np.testing.assert_array_equal(remove_close_peaks([0, 3, 20], [0, 4, 0], 24.5),
                                  [True, True, True])
    np.testing.assert_array_equal(remove_close_peaks([0, 3, 20], [0, 4, 0], 25.0),
                                  [False, False, True])
    np.testing.assert_array_equal(remove_close_peaks([5], [5], 1e9), [True])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_update_best_matches_reference(xp, sign):
    rng = np.random.default_rng(5)
    maps = np.round(rng.normal(size=(6, 33, 40)), 1).astype(np.float32)  # ties
    got_b = xp.full((33, 40), -np.inf, dtype=xp.float32)
    got_i = xp.zeros((33, 40), dtype=xp.int16)
    want_b = np.full((33, 40), -np.inf, dtype=np.float32)
    want_i = np.zeros((33, 40), dtype=np.int16)
    for start in (0, 3):  # two batches of three maps
        update_best_2d(got_b, got_i, xp.asarray(maps[start:start + 3]), start, sign)
        update_best_2d_reference(want_b, want_i, maps[start:start + 3], start, sign)
    np.testing.assert_array_equal(to_numpy(got_b), want_b)
    np.testing.assert_array_equal(to_numpy(got_i), want_i)
    np.testing.assert_array_equal(want_b, (sign * maps).max(axis=0))
    np.testing.assert_array_equal(want_i, (sign * maps).argmax(axis=0))  # first of equals


def test_update_best_checks():
    with pytest.raises(ValueError, match="float32"):
        update_best_2d(np.zeros((2, 2)), np.zeros((2, 2), np.int16), np.zeros((1, 2, 2)), 0)
    with pytest.raises(ValueError, match="must be"):
        update_best_2d(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int16),
                       np.zeros((1, 3, 2)), 0)
