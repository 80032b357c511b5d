"""Segment reductions (per-particle maxima and sums of the second pass) against plain loops."""

import numpy as np
import pytest

from cryonb.kernels import segment_argmax, segment_starts, segment_sums


def _segments(seed=0, n_seg=50, dtype=np.float32):
    """Runs of random length (some empty, one of ties, one of -inf, one long)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, n_seg)
    sizes[[0, 7]] = 0
    sizes[3] = 1
    sizes[9] = 5000  # longer than a block
    seg = np.repeat(np.arange(n_seg), sizes)
    x = (rng.normal(size=seg.size) * 10).astype(dtype)
    x[seg == 5] = 2.0
    x[seg == 6] = -np.inf
    return x, seg, sizes


def _to_np(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_reductions_follow_loops(xp, dtype):
    x, seg, sizes = _segments(dtype=dtype)
    starts = segment_starts(xp.asarray(seg), len(sizes))
    assert _to_np(starts).tolist() == [0, *np.cumsum(sizes).tolist()]
    vmax, imax = segment_argmax(xp.asarray(x), starts)
    sums = segment_sums(xp.asarray(np.where(x > -np.inf, x, 0)), starts)
    vmax, imax, sums = _to_np(vmax), _to_np(imax), _to_np(sums)
    assert vmax.dtype == dtype and sums.dtype == np.float64
    for k, n in enumerate(sizes):
        part = x[seg == k]
        if n == 0:
            assert vmax[k] == -np.inf and imax[k] == -1 and sums[k] == 0
            continue
        first = int(np.flatnonzero(seg == k)[0])
        assert vmax[k] == part.max()
        assert imax[k] == first + int(np.argmax(part))  # the first maximum on ties
        want = np.sum(part[part > -np.inf].astype(np.float64))
        assert sums[k] == pytest.approx(want, rel=1e-12, abs=1e-9)
    assert imax[5] == np.flatnonzero(seg == 5)[0]
    assert vmax[6] == -np.inf and imax[6] == np.flatnonzero(seg == 6)[0]


def test_gpu_sums_are_deterministic(xp):
    x, seg, sizes = _segments(1, n_seg=200, dtype=np.float64)
    starts = segment_starts(xp.asarray(seg), len(sizes))
    a = _to_np(segment_sums(xp.asarray(x), starts))
    b = _to_np(segment_sums(xp.asarray(x), starts))
    assert np.array_equal(a, b)


def test_nonzero_each_is_flatnonzero_of_each_mask(xp):
    """Several masks' positions with one copy to the host: those of ``flatnonzero``."""
    from cryonb.kernels import nonzero_each

    rng = np.random.default_rng(3)
    masks = [rng.random(1000) < 0.3, rng.random((40, 5, 3)) < 0.01, np.zeros(7, bool),
             np.zeros(0, bool), np.ones(5, bool)]
    got = nonzero_each(*(xp.asarray(m) for m in masks))
    assert len(got) == len(masks)
    for m, g in zip(masks, got):
        g = g.get() if hasattr(g, "get") else g
        assert g.dtype == np.int64
        assert np.array_equal(g, np.flatnonzero(m))
