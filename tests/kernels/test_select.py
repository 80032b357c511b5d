"""Significant samples: the radix select (Numba, CUDA) against the sort and a plain definition."""

import math

import numpy as np
import pytest

from cryonb.kernels import (
    significant_in_segments,
    significant_samples,
    significant_samples_reference,
)


def _by_definition(lw, fraction, maxsig=-1):
    """Row by row: the fewest largest weights whose sum reaches ``fraction`` of the total."""
    out = np.zeros(lw.shape, bool)
    for b, row in enumerate(lw):
        w = np.exp(row - row.max())
        srt = sorted(w.tolist(), reverse=True)
        target = fraction * math.fsum(srt)
        n, acc = 0, 0.0
        while n < len(srt):
            acc += srt[n]
            n += 1
            if acc >= target:
                break
        if maxsig > 0:
            n = min(n, maxsig)
        out[b] = w >= srt[n - 1]
    return out


def _rows(seed=0, B=12, N=3000):
    """Peaked, broad and flat rows, with excluded samples (-inf) and exact ties."""
    rng = np.random.default_rng(seed)
    lw = rng.normal(size=(B, N)).astype(np.float32) * np.linspace(0.5, 40, B)[:, None]
    lw[1, ::7] = -np.inf
    lw[2, :] = 0.0  # all equal
    lw[3, :100] = lw[3].max() + 1  # 100 tied maxima
    lw[4, rng.integers(0, N, 50)] = -np.inf
    return lw


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("maxsig", [-1, 1, 37])
def test_reference_follows_the_definition(fraction, maxsig):
    lw = _rows()
    got = significant_samples(lw, fraction, maxsig)
    assert got.dtype == bool and got.shape == lw.shape
    want = _by_definition(lw.astype(np.float64), fraction, maxsig)
    # float32 weights vs float64 sums: rows may differ only at an exact tie of rounding
    assert np.mean(np.all(got == want, axis=1)) >= 11 / 12
    assert np.array_equal(got[2], np.ones(lw.shape[1], bool)) or maxsig > 0
    assert got[3, :100].all()
    assert not got[1, ::7].any()


def test_significant_counts():
    lw = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    assert significant_samples_reference(lw, 0.79).sum(axis=1).tolist() == [2, 4]
    assert significant_samples_reference(lw, 0.81).sum(axis=1).tolist() == [3, 4]
    assert significant_samples_reference(lw, 0.81, maxsig=1).sum(axis=1).tolist() == [1, 4]


def _segments(seed=0, n_seg=40):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, n_seg)
    sizes[3] = 1
    seg = np.repeat(np.arange(n_seg), sizes)
    lw = (rng.normal(size=seg.size) * rng.uniform(0.5, 30, n_seg)[seg]).astype(np.float32)
    lw[seg == 5] = 2.0  # a segment of ties
    return lw, seg, sizes


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("maxsig", [-1, 3])
def test_segments_follow_the_rows(fraction, maxsig):
    """Variable-length segments give what each segment gives as a row of its own."""
    lw, seg, sizes = _segments()
    got = significant_in_segments(lw, seg, len(sizes), fraction, maxsig)
    for k in np.flatnonzero(sizes):
        row = significant_samples_reference(lw[seg == k][None], fraction, maxsig)[0]
        assert np.array_equal(got[seg == k], row), k
    assert significant_in_segments(lw[:0], seg[:0], 3, fraction).shape == (0,)


def _host(a):
    return a.get() if hasattr(a, "get") else a


def test_segments_match_the_sort(xp):
    lw, seg, sizes = _segments(1, n_seg=300)
    for fraction in (0.5, 0.999):
        ref = np.zeros(seg.size, bool)
        for k in np.flatnonzero(sizes):
            ref[seg == k] = significant_samples_reference(lw[seg == k][None], fraction)[0]
        got = _host(significant_in_segments(xp.asarray(lw), xp.asarray(seg), len(sizes),
                                            fraction))
        assert np.mean(got == ref) >= 0.999


@pytest.mark.parametrize("maxsig", [-1, 5, 400])
def test_select_matches_the_sort(xp, maxsig):
    for seed, (B, N) in enumerate([(12, 3000), (5, 250_000), (3, 1)]):
        lw = _rows(seed, B, N) if N > 1 else np.zeros((B, N), np.float32)
        for fraction in (0.5, 0.9, 0.999):
            ref = significant_samples_reference(lw, fraction, maxsig)
            got = _host(significant_samples(xp.asarray(lw), fraction, maxsig))
            # exact ties and rounding of the cumulative sums aside, the same samples
            assert np.mean(got == ref) >= 0.9999, (B, N, fraction)
            assert np.mean(np.all(got == ref, axis=1)) >= 0.75, (B, N, fraction)
            again = _host(significant_samples(xp.asarray(lw), fraction, maxsig))
            assert np.array_equal(got, again)


@pytest.mark.parametrize("maxsig", [-1, 7])
def test_indices_are_the_masks_columns(xp, maxsig):
    """significant_indices: per row the count and the ascending columns of the mask, rows
    one after another (on the GPU from the select's counts and a compaction kernel)."""
    from cryonb.kernels import significant_indices

    rng = np.random.default_rng(8)
    lw = (rng.normal(size=(9, 70_000)) * np.linspace(3, 3000, 9)[:, None]).astype(np.float32)
    lw[2, :] = -np.inf
    lw[2, [5, 69_999]] = 0.0  # two samples, one in the last tile
    lw[4, 1000:2025] = 10_000.0  # a selection filling whole tiles
    for fraction in (0.5, 0.999):
        d = xp.asarray(lw)
        mask = _host(significant_samples(d, fraction, maxsig))
        counts, idx = (_host(a) for a in significant_indices(d, fraction, maxsig,
                                                             rowmax=d.max(axis=1)))
        rows, cols = np.nonzero(mask)
        assert counts.tolist() == np.bincount(rows, minlength=9).tolist()
        assert np.array_equal(idx, cols)
        assert counts.min() >= 1
        # the counts also on the host, from the copy that sized idx
        *_, on_host = significant_indices(d, fraction, maxsig, host_counts=True)
        assert isinstance(on_host, np.ndarray) and on_host.tolist() == counts.tolist()
        # work queued while the host waits for that copy (once; the same selection, and
        # that work's own result, the same as without the wait between)
        calls = []
        *got, on_host = significant_indices(
            d, fraction, maxsig, host_counts=True,
            before_wait=lambda d=d, calls=calls: calls.append(_host(d[:, :100].sum(axis=1))))
        assert len(calls) == 1 and on_host.tolist() == counts.tolist()
        assert np.array_equal(_host(got[1]), cols)
        np.testing.assert_array_equal(calls[0], _host(d[:, :100].sum(axis=1)))
    assert np.array_equal(idx[counts[:2].sum():counts[:3].sum()], [5, 69_999])
    for shape in ((0, 10), (3, 0)):  # no rows, no samples
        counts, idx = (_host(a) for a in significant_indices(xp.zeros(shape, np.float32), 0.9))
        assert counts.tolist() == [0] * shape[0] and idx.size == 0
        calls = []
        *_, on_host = significant_indices(xp.zeros(shape, np.float32), 0.9, host_counts=True,
                                          before_wait=lambda calls=calls: calls.append(1))
        assert isinstance(on_host, np.ndarray) and on_host.tolist() == [0] * shape[0]
        assert calls == [1]


def test_select_peaked_rows_with_given_maxima(xp):
    """Rows whose weights mostly underflow to zero (the coarse pass at 128 px and beyond),
    with the row maxima passed in as the coarse pass does."""
    rng = np.random.default_rng(3)
    lw = (rng.normal(size=(16, 120_000)) * np.linspace(50, 2000, 16)[:, None]).astype(np.float32)
    lw[5, : lw.shape[1] // 2] = -np.inf
    lw[7, :] = -np.inf
    lw[7, [10, 11, 500]] = [1.0, 1.0, 0.5]  # three finite samples, two tied
    for fraction, maxsig in ((0.999, -1), (0.9, 3)):
        ref = _by_definition(lw, fraction, maxsig)
        d = xp.asarray(lw)
        got = _host(significant_samples(d, fraction, maxsig, rowmax=d.max(axis=1)))
        assert np.mean(np.all(got == ref, axis=1)) >= 0.9, fraction
        assert np.mean(got == ref) >= 0.99999
        assert got[7, [10, 11]].all() and not got[7, 12]


@pytest.mark.gpu
def test_cpu_and_gpu_select_the_same_samples():
    """The Numba and CUDA selects are one algorithm: on rows of tied weight levels (integer
    log-weights), the same samples wherever the two exponentials round alike."""
    import cupy

    rng = np.random.default_rng(4)
    lw = -rng.integers(0, 60, size=(20, 20_000)).astype(np.float32)
    lw[:, 0] = 0.0
    for fraction, maxsig in ((0.5, -1), (0.999, -1), (0.999, 250)):
        cpu = significant_samples(lw, fraction, maxsig)
        gpu = significant_samples(cupy.asarray(lw), fraction, maxsig).get()
        assert np.mean(np.all(cpu == gpu, axis=1)) >= 0.9, (fraction, maxsig)
        assert np.mean(cpu == gpu) >= 0.9999, (fraction, maxsig)


@pytest.mark.gpu
@pytest.mark.parametrize("n_high", [40, 4096, 4097])
def test_gpu_select_from_its_first_pass_candidates(n_high):
    """Rows with ``n_high`` samples of weight 2^-24 and above (the GPU's first pass keeps up
    to 4096 such samples, and its later passes read them instead of the row where the
    threshold lies among them) and the rest far below: the CPU's selection, whether the
    candidates fit or not."""
    import cupy

    rng = np.random.default_rng(n_high)
    lw = np.full((6, 50_000), -60.0, np.float32)  # e^-60: far below 2^-24 (e^-16.6)
    for b in range(6):
        lw[b, rng.choice(50_000, n_high, replace=False)] = -rng.integers(0, 16, n_high)
    lw[5, :] = np.where(lw[5] > -60, lw[5], -17.0)  # the rest just below: the row's threshold
    for fraction, maxsig in ((0.5, -1), (0.999, -1), (0.999999, -1), (0.999, 100)):
        cpu = significant_samples(lw, fraction, maxsig)
        gpu = significant_samples(cupy.asarray(lw), fraction, maxsig).get()
        assert np.mean(np.all(cpu == gpu, axis=1)) >= 0.8, (fraction, maxsig)
        assert np.mean(cpu == gpu) >= 0.9999, (fraction, maxsig)
        ref = _by_definition(lw, fraction, maxsig)
        assert np.mean(gpu == ref) >= 0.9999, (fraction, maxsig)
