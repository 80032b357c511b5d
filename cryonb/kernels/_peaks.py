"""Best-of maps, peak search and peak pruning, as RELION's template autopicker does them.

Four steps of ``AutoPicker::autoPickOneMicrograph`` (``src/autopicker.cpp``):

:func:`update_best_2d`
    The running maximum over in-plane angles of the cross-correlation maps, and the angle that
    reached it: a Numba kernel (CPU), a CuPy ``RawKernel`` (GPU) and a NumPy reference.

:func:`find_peaks_2d` (``peakSearch``)
    Every pixel of a region whose value reaches the threshold, whose local background passes
    the noise tests and whose four neighbours are not higher. A map-sized scan: a Numba kernel
    (CPU), a CuPy ``RawKernel`` (GPU) and a plain NumPy reference (:func:`find_peaks_2d_reference`).
:func:`prune_peak_clusters` (``prunePeakClusters``)
    Single-linkage clusters of candidates, then a greedy choice of the best peak in each
    cluster, dropping its neighbours closer than a minimum distance.
:func:`remove_close_peaks` (``removeTooCloselyNeighbouringPeaks``)
    Drop every peak whose nearest other peak is too close (both members of a close pair go).

The last two are order-dependent loops over a few hundred to a few thousand candidates; they
run on the host (Numba), whatever device made the map, and have plain-Python references.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_numpy

__all__ = [
    "find_peaks_2d",
    "find_peaks_2d_reference",
    "prune_peak_clusters",
    "prune_peak_clusters_reference",
    "remove_close_peaks",
    "remove_close_peaks_reference",
    "update_best_2d",
    "update_best_2d_reference",
]


_cuda_kernels: dict = {}


def _get_cuda_kernel(name: str, source: str):
    """A compiled CUDA kernel for the calling thread's current device (cached)."""
    import cupy

    key = (name, cupy.cuda.Device().id)
    if key not in _cuda_kernels:
        _cuda_kernels[key] = cupy.RawKernel(source, name)
    return _cuda_kernels[key]


# ----------------------------------------------------------------------------- best-of maps
def _check_best(best, best_index, maps):
    if best.ndim != 2 or best_index.shape != best.shape or maps.shape[1:] != best.shape \
            or maps.ndim != 3:
        raise ValueError(f"best {best.shape}, best_index {best_index.shape} and maps "
                         f"{maps.shape} must be (ny, nx), (ny, nx) and (b, ny, nx)")
    if best.dtype != np.float32 or best_index.dtype != np.int16:
        raise ValueError("best must be float32 and best_index int16")
    if not (best.flags.c_contiguous and best_index.flags.c_contiguous):
        raise ValueError("best and best_index must be C-contiguous")


def update_best_2d_reference(best, best_index, maps, first_index: int, sign: float = 1.0):
    """Plain NumPy reference of :func:`update_best_2d`."""
    _check_best(best, best_index, maps)
    for i in range(maps.shape[0]):
        v = (np.float32(sign) * np.asarray(maps[i], dtype=np.float32)).astype(np.float32)
        better = v > best
        best[better] = v[better]
        best_index[better] = first_index + i


_numba_best = None


def _get_numba_best():
    global _numba_best
    if _numba_best is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kern(best, best_index, maps, first, sign):
            b = maps.shape[0]
            n = best.size
            bf = best.reshape(-1)
            xf = best_index.reshape(-1)
            mf = maps.reshape(b, n)
            for i in range(b):
                index = np.int16(first + i)
                for t in range(n):
                    v = sign * mf[i, t]
                    if v > bf[t]:
                        bf[t] = v
                        xf[t] = index

        _numba_best = kern
    return _numba_best


_BEST_SRC = r"""
extern "C" __global__
void update_best(float* best, short* best_index, const float* maps, long long npix, int b,
                 int first, float sign)
{
    long long t = blockDim.x * (long long)blockIdx.x + threadIdx.x;
    if (t >= npix) return;
    float v0 = best[t];
    short i0 = best_index[t];
    for (int i = 0; i < b; ++i) {
        float v = sign * maps[i * npix + t];
        if (v > v0) { v0 = v; i0 = (short)(first + i); }
    }
    best[t] = v0;
    best_index[t] = i0;
}
"""


def update_best_2d(best, best_index, maps, first_index: int, sign: float = 1.0) -> None:
    """Running maximum of a batch of maps, and which map gave it (in place).

    For every pixel and ``i = 0 .. b-1`` in order: where ``sign * maps[i] > best`` (strictly,
    so the first of equal values wins), ``best`` becomes that value and ``best_index``
    becomes ``first_index + i``.

    Parameters
    ----------
    best : float32 array of shape (ny, nx), C-contiguous
        Start with ``-inf``.
    best_index : int16 array of shape (ny, nx), C-contiguous
    maps : array of shape (b, ny, nx), real
        E.g. cross-correlation maps of ``b`` successive in-plane angles (read as float32).
    first_index : int
        Index of ``maps[0]`` (e.g. of its angle).
    sign : float
        +1 for a running maximum, -1 for a running minimum (of ``maps``; ``best`` then holds
        ``-min``).

    Notes
    -----
    NumPy arrays use a Numba kernel, CuPy arrays a CUDA kernel (one thread per pixel); both
    equal :func:`update_best_2d_reference`.
    """
    _check_best(best, best_index, maps)
    xp = array_module(best)
    m = xp.ascontiguousarray(maps, dtype=xp.float32)
    if xp is np:
        _get_numba_best()(best, best_index, m, np.int64(first_index), np.float32(sign))
        return
    npix = best.size
    if npix:
        _get_cuda_kernel("update_best", _BEST_SRC)(
            ((npix + 255) // 256,), (256,),
            (best, best_index, m, np.int64(npix), np.int32(m.shape[0]), np.int32(first_index),
             np.float32(sign)))


# ----------------------------------------------------------------------------- peak search
def _check_region(fom, region) -> tuple[int, int, int, int]:
    if fom.ndim != 2:
        raise ValueError(f"the figure-of-merit map must be 2D, not shape {fom.shape}")
    y0, y1, x0, x1 = (int(v) for v in region)
    ny, nx = fom.shape
    if y0 < 1 or x0 < 1 or y1 > ny - 1 or x1 > nx - 1:
        raise ValueError(f"region {region} must keep one pixel away from the edges of a "
                         f"{ny} x {nx} map (every candidate needs its four neighbours)")
    return y0, max(y0, y1), x0, max(x0, x1)


def _noise_maps(fom, stddev, mean):
    xp = array_module(fom)
    dummy = xp.zeros((1, 1), dtype=xp.float64)
    s = dummy if stddev is None else xp.ascontiguousarray(stddev, dtype=xp.float64)
    m = dummy if mean is None else xp.ascontiguousarray(mean, dtype=xp.float64)
    for name, a in (("stddev", stddev), ("mean", mean)):
        if a is not None and a.shape != fom.shape:
            raise ValueError(f"{name} map {a.shape} and figure-of-merit map {fom.shape} differ")
    return s, m


def find_peaks_2d_reference(fom, threshold: float, region, *, stddev=None, mean=None,
                            max_stddev_noise: float = -1.0, min_avg_noise: float = -999.0,
                            neighbours_above_threshold: bool = True):
    """Plain NumPy reference of :func:`find_peaks_2d` (array slices, for the tests)."""
    y0, y1, x0, x1 = _check_region(fom, region)
    f = np.asarray(to_numpy(fom), dtype=np.float64)
    c = f[y0:y1, x0:x1]
    ok = c >= threshold
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = f[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        ok &= nb <= c
        if neighbours_above_threshold:
            ok &= nb >= threshold
    if stddev is not None and max_stddev_noise > 0:
        ok &= ~(to_numpy(stddev)[y0:y1, x0:x1] > max_stddev_noise)
    if mean is not None and min_avg_noise > -900:
        ok &= ~(to_numpy(mean)[y0:y1, x0:x1] < min_avg_noise)
    iy, ix = np.nonzero(ok)
    return (iy + y0).astype(np.int64), (ix + x0).astype(np.int64)


_numba_peak_mask = None


def _get_numba_peak_mask():
    global _numba_peak_mask
    if _numba_peak_mask is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kern(fom, sd, mu, out, thr, y0, y1, x0, x1, max_sd, min_mu, strict, use_sd, use_mu):
            for i in range(y0, y1):
                for j in range(x0, x1):
                    v = fom[i, j]
                    if not (v >= thr):
                        continue
                    if use_sd and sd[i, j] > max_sd:
                        continue
                    if use_mu and mu[i, j] < min_mu:
                        continue
                    a = fom[i - 1, j]
                    b = fom[i + 1, j]
                    c = fom[i, j - 1]
                    d = fom[i, j + 1]
                    if a > v or b > v or c > v or d > v:
                        continue
                    if strict and (a < thr or b < thr or c < thr or d < thr):
                        continue
                    out[i - y0, j - x0] = 1

        _numba_peak_mask = kern
    return _numba_peak_mask


_PEAK_SRC = r"""
extern "C" __global__
void peak_mask(const double* fom, const double* sd, const double* mu, unsigned char* out,
               int nx, double thr, int y0, int y1, int x0, int x1, double max_sd,
               double min_mu, int strict, int use_sd, int use_mu)
{
    int w = x1 - x0;
    long long t = blockDim.x * (long long)blockIdx.x + threadIdx.x;
    if (t >= (long long)(y1 - y0) * w) return;
    int i = y0 + (int)(t / w), j = x0 + (int)(t % w);
    long long o = (long long)i * nx + j;
    double v = fom[o];
    if (!(v >= thr)) return;
    if (use_sd && sd[o] > max_sd) return;
    if (use_mu && mu[o] < min_mu) return;
    double a = fom[o - nx], b = fom[o + nx], c = fom[o - 1], d = fom[o + 1];
    if (a > v || b > v || c > v || d > v) return;
    if (strict && (a < thr || b < thr || c < thr || d < thr)) return;
    out[t] = 1;
}
"""


def find_peaks_2d(fom, threshold: float, region, *, stddev=None, mean=None,
                  max_stddev_noise: float = -1.0, min_avg_noise: float = -999.0,
                  neighbours_above_threshold: bool = True):
    """Candidate peaks of a figure-of-merit map (RELION's ``peakSearch``).

    Parameters
    ----------
    fom : array of shape (ny, nx), real (NumPy or CuPy)
        Figure-of-merit map; read as float64.
    threshold : float
        A candidate has ``fom >= threshold`` (RELION's ``--threshold``).
    region : (int, int, int, int)
        ``(y0, y1, x0, x1)``: rows ``y0 <= i < y1`` and columns ``x0 <= j < x1`` are scanned.
        It must stay one pixel inside the map (``y0, x0 >= 1``, ``y1 <= ny - 1``,
        ``x1 <= nx - 1``).
    stddev, mean : arrays of shape (ny, nx), optional
        Local background standard deviation and mean of the micrograph at each pixel.
    max_stddev_noise : float
        When > 0, pixels with ``stddev > max_stddev_noise`` are no candidates.
    min_avg_noise : float
        When > -900, pixels with ``mean < min_avg_noise`` are no candidates.
    neighbours_above_threshold : bool
        Also require the four neighbours to reach the threshold (RELION does so when the maps
        are not shrunk, ``--shrink 1``).

    Returns
    -------
    iy, ix : numpy.ndarray of shape (m,), int64
        Row and column of each candidate, in row-major order (as RELION scans), on the host.
        A candidate's four neighbours (up, down, left, right) are all ``<= fom[iy, ix]``.

    Notes
    -----
    NumPy maps use a Numba kernel, CuPy maps a CUDA kernel; both mark candidates in a mask of
    the region and agree exactly with :func:`find_peaks_2d_reference` (same float64 compares).
    """
    y0, y1, x0, x1 = _check_region(fom, region)
    xp = array_module(fom)
    f = xp.ascontiguousarray(fom, dtype=xp.float64)
    sd, mu = _noise_maps(f, stddev, mean)
    use_sd = stddev is not None and max_stddev_noise > 0
    use_mu = mean is not None and min_avg_noise > -900
    h, w = y1 - y0, x1 - x0
    out = xp.zeros((h, w), dtype=xp.uint8)
    if h and w:
        args = (float(threshold), y0, y1, x0, x1, float(max_stddev_noise), float(min_avg_noise))
        flags = (bool(neighbours_above_threshold), bool(use_sd), bool(use_mu))
        if xp is np:
            _get_numba_peak_mask()(f, sd, mu, out, *args, *flags)
        else:
            n = h * w
            i32, f64 = np.int32, np.float64
            _get_cuda_kernel("peak_mask", _PEAK_SRC)(
                ((n + 255) // 256,), (256,),
                (f, sd, mu, out, i32(f.shape[1]), f64(args[0]), i32(y0), i32(y1), i32(x0),
                 i32(x1), f64(args[5]), f64(args[6]), *(i32(v) for v in flags)))
    iy, ix = (to_numpy(v) for v in xp.nonzero(out))  # only the indices travel
    return (iy + y0).astype(np.int64), (ix + x0).astype(np.int64)


# ----------------------------------------------------------------------------- pruning
def _check_peaks(x, y, fom=None):
    x = np.ascontiguousarray(to_numpy(x), dtype=np.int64)
    y = np.ascontiguousarray(to_numpy(y), dtype=np.int64)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"x {x.shape} and y {y.shape} must be 1D arrays of the same length")
    if fom is None:
        return x, y
    fom = np.ascontiguousarray(to_numpy(fom), dtype=np.float64)
    if fom.shape != x.shape:
        raise ValueError(f"fom {fom.shape} and x {x.shape} differ")
    return x, y, fom


def prune_peak_clusters_reference(x, y, fom, cluster_r2: float, min_d2: float) -> np.ndarray:
    """Plain-Python reference of :func:`prune_peak_clusters` (RELION's loops, line by line)."""
    x, y, fom = _check_peaks(x, y, fom)
    remaining = list(range(len(x)))
    kept: list[int] = []
    while remaining:
        cluster = [remaining.pop(0)]
        k = 0
        while k < len(cluster):
            c = cluster[k]
            i = 0
            while i < len(remaining):
                p = remaining[i]
                if float((x[c] - x[p]) ** 2 + (y[c] - y[p]) ** 2) < cluster_r2:
                    cluster.append(remaining.pop(i))
                else:
                    i += 1
            k += 1
        while cluster:
            best = cluster[0]
            for c in cluster[1:]:
                if fom[c] > fom[best]:
                    best = c
            kept.append(best)
            cluster = [c for c in cluster if c != best
                       and float((x[c] - x[best]) ** 2 + (y[c] - y[best]) ** 2) >= min_d2]
    return np.asarray(kept, dtype=np.int64)


_numba_prune = None


def _get_numba_prune():
    global _numba_prune
    if _numba_prune is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def prune(x, y, fom, cluster_r2, min_d2):
            n = x.shape[0]
            # remaining peaks, in order, as a linked list (erasing keeps the order)
            nxt = np.arange(1, n + 1)
            prv = np.arange(-1, n - 1)
            head = 0 if n else n
            cluster = np.empty(n, np.int64)
            alive = np.zeros(n, np.bool_)
            kept = np.empty(n, np.int64)
            n_kept = 0
            while head < n:
                first = head
                head = nxt[first]
                if head < n:
                    prv[head] = -1
                cluster[0] = first
                size = 1
                k = 0
                while k < size:
                    c = cluster[k]
                    p = head
                    while p < n:
                        q = nxt[p]
                        dx = x[c] - x[p]
                        dy = y[c] - y[p]
                        if float(dx * dx + dy * dy) < cluster_r2:
                            cluster[size] = p
                            size += 1
                            if prv[p] >= 0:
                                nxt[prv[p]] = q
                            else:
                                head = q
                            if q < n:
                                prv[q] = prv[p]
                        p = q
                    k += 1
                for k in range(size):
                    alive[cluster[k]] = True
                left = size
                while left > 0:
                    best = -1
                    for k in range(size):
                        c = cluster[k]
                        if alive[c] and (best < 0 or fom[c] > fom[best]):
                            best = c
                    kept[n_kept] = best
                    n_kept += 1
                    for k in range(size):
                        c = cluster[k]
                        if alive[c]:
                            dx = x[c] - x[best]
                            dy = y[c] - y[best]
                            if c == best or float(dx * dx + dy * dy) < min_d2:
                                alive[c] = False
                                left -= 1
            return kept[:n_kept]

        _numba_prune = prune
    return _numba_prune


def prune_peak_clusters(x, y, fom, cluster_r2: float, min_d2: float) -> np.ndarray:
    """Keep the best peak of each cluster of candidates (RELION's ``prunePeakClusters``).

    Candidates closer than ``sqrt(cluster_r2)`` to a cluster member join the cluster
    (single linkage, clusters grown in input order). In each cluster the highest-``fom`` peak
    is kept (the first one on ties), members closer than ``sqrt(min_d2)`` to it are dropped,
    and this repeats until the cluster is empty.

    Parameters
    ----------
    x, y : int arrays of shape (n,)
        Peak positions (pixels of the figure-of-merit map).
    fom : array of shape (n,)
    cluster_r2 : float
        Squared linkage distance (RELION: squared particle mask radius times scale^2).
    min_d2 : float
        Squared minimum distance between kept peaks of one cluster.

    Returns
    -------
    numpy.ndarray of shape (k,), int64
        Indices into the input of the kept peaks, in RELION's output order (cluster by
        cluster, best first).

    Notes
    -----
    Runs on the host (Numba) for NumPy or CuPy inputs; equal to
    :func:`prune_peak_clusters_reference`. A peak is always removed from its cluster once
    kept, so ``min_d2 = 0`` terminates (RELION would loop forever).
    """
    x, y, fom = _check_peaks(x, y, fom)
    if not len(x):
        return np.empty(0, np.int64)
    return _get_numba_prune()(x, y, fom, float(cluster_r2), float(min_d2))


def remove_close_peaks_reference(x, y, min_d2: float) -> np.ndarray:
    """Plain-Python reference of :func:`remove_close_peaks`."""
    x, y = _check_peaks(x, y)
    keep = np.zeros(len(x), bool)
    for i in range(len(x)):
        nearest = 9999999999.0
        for j in range(len(x)):
            if j != i:
                nearest = min(nearest, float((x[j] - x[i]) ** 2 + (y[j] - y[i]) ** 2))
        keep[i] = nearest > min_d2
    return keep


_numba_remove = None


def _get_numba_remove():
    global _numba_remove
    if _numba_remove is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def remove(x, y, min_d2):
            n = x.shape[0]
            keep = np.zeros(n, np.bool_)
            for i in range(n):
                nearest = 9999999999.0
                for j in range(n):
                    if j != i:
                        dx = x[j] - x[i]
                        dy = y[j] - y[i]
                        d2 = float(dx * dx + dy * dy)
                        if d2 < nearest:
                            nearest = d2
                keep[i] = nearest > min_d2
            return keep

        _numba_remove = remove
    return _numba_remove


def remove_close_peaks(x, y, min_d2: float) -> np.ndarray:
    """Which peaks have no other peak within ``sqrt(min_d2)`` (RELION's
    ``removeTooCloselyNeighbouringPeaks``).

    Parameters
    ----------
    x, y : int arrays of shape (n,)
    min_d2 : float
        Squared minimum distance.

    Returns
    -------
    numpy.ndarray of shape (n,), bool
        True where the nearest other peak is farther than ``sqrt(min_d2)`` (strictly): both
        peaks of a close pair are dropped. A single peak is kept.
    """
    x, y = _check_peaks(x, y)
    if not len(x):
        return np.zeros(0, bool)
    return _get_numba_remove()(x, y, float(min_d2))
