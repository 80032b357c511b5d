"""Several weighted histograms over the same bins, in one pass.

:func:`weighted_bincounts`: the E-step's class statistics (class weights, offsets, angular
and translational spreads) are sums of per-sample weights into the sample's class. As
``bincount`` calls that is one pass per statistic, each with float64 atomic adds that the
10^5-10^7 samples of a pool make into the same K addresses (they serialise on the GPU). Here
each CUDA block adds its share of the samples into its own copy of the bins in shared
memory and then adds that copy to the result: one pass, and K atomic adds per block and
statistic in global memory. On the CPU, ``bincount`` per statistic (the reference).

:func:`add_bincount`: ``out += bincount(idx, weights)`` without reading anything back. CuPy's
``bincount`` copies ``(idx < 0).any()`` and ``idx.max()`` to the host, two device
synchronisations per call: each one stops the host from queueing the pool's next kernels
until the device has finished every kernel before it.

:func:`add_rows_runs`: ``acc[idx[i]] += rows[i]`` on the GPU (``cryonb.backend.add_rows_at``,
:func:`add_bincount`). ``cupy.add.at`` makes one atomic add per value: a pool's 16,000
particles' per-shell sums into the rows of one or a few optics or scale groups serialised
on those few addresses (0.3 ms per call on an H200). The pool's rows come grouped by index
(a data set's particles by micrograph): each thread sums a run of rows with one index in a
register and adds the run's sum once.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["add_bincount", "add_rows_runs", "weighted_bincounts",
           "weighted_bincounts_reference"]

#: the shared-memory copy of the bins holds at most this many float64 sums (48 KiB)
_SHARED_SUMS = 6144


def weighted_bincounts_reference(idx, weights, n_bins: int):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`weighted_bincounts`.
    """
    xp = array_module(weights)
    return xp.stack([xp.bincount(idx, weights=w, minlength=n_bins) for w in weights])


_CUDA_SRC = r"""
extern "C" __global__
void weighted_bincounts(const long long* idx, const double* w, long long n, int c,
                        int n_bins, double* out)
{
    extern __shared__ double s[];
    for (int j = threadIdx.x; j < c * n_bins; j += blockDim.x) s[j] = 0.0;
    __syncthreads();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int k = (int)idx[i];
        for (int q = 0; q < c; ++q) atomicAdd(&s[q * n_bins + k], w[q * n + i]);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < c * n_bins; j += blockDim.x)
        if (s[j] != 0.0) atomicAdd(&out[j], s[j]);
}

extern "C" __global__
void add_rows_runs(double* acc, const long long* idx, const double* rows, long long n,
                   long long D, int chunk)
{
    // a block takes rows r0 .. r1 - 1, its threads the columns: the rows of one run of equal
    // indices are summed in a register, one atomic add per run and column
    const long long r0 = (long long)blockIdx.x * chunk;
    const long long r1 = min(n, r0 + chunk);
    for (long long c = threadIdx.x; c < D; c += blockDim.x) {
        long long cur = idx[r0];
        double sum = 0.0;
        for (long long r = r0; r < r1; ++r) {
            const long long g = idx[r];
            if (g != cur) {
                atomicAdd(acc + cur * D + c, sum);
                sum = 0.0;
                cur = g;
            }
            sum += rows[r * D + c];
        }
        atomicAdd(acc + cur * D + c, sum);
    }
}
"""

#: rows per CUDA block of :func:`add_rows_runs`
_RUN_CHUNK = 128


def weighted_bincounts(idx, weights, n_bins: int):
    """Weighted histograms of one index array, one per row of weights.

    Parameters
    ----------
    idx : int array of shape (n,)
        Bin of each sample, in ``0..n_bins-1``.
    weights : float64 array of shape (c, n)
        One row of sample weights per histogram.
    n_bins : int

    Returns
    -------
    float64 array of shape (c, n_bins)
        ``out[q, k] = sum(weights[q, idx == k])``. On the GPU the order of the additions
        is not fixed (float64 atomic adds).
    """
    xp = array_module(weights)
    c, n = weights.shape
    if xp is np or c * n_bins > _SHARED_SUMS:
        return weighted_bincounts_reference(idx, weights, n_bins)
    out = xp.zeros((c, n_bins), xp.float64)
    if n == 0 or c == 0:
        return out
    nt = 256
    blocks = int(min((n + nt - 1) // nt, 1024))
    cuda_function(_CUDA_SRC, "weighted_bincounts")(
        (blocks,), (nt,),
        (xp.ascontiguousarray(idx, dtype=xp.int64), xp.ascontiguousarray(weights, dtype=xp.float64),
         np.int64(n), np.int32(c), np.int32(n_bins), out),
        shared_mem=8 * c * n_bins)
    return out


def add_bincount(out, idx, weights=None) -> None:
    """``out += bincount(idx, weights, minlength=len(out))``, in place.

    Parameters
    ----------
    out : float64 array of shape (n_bins,)
    idx : int array of shape (n,)
        Bin of each sample, in ``0..n_bins-1`` (not checked on the GPU).
    weights : float array of shape (n,), optional
        Each sample's weight (default 1).

    Notes
    -----
    CPU: ``numpy.bincount`` (summation in sample order). GPU: float64 atomic adds
    (:func:`add_rows_runs` into a contiguous ``out``, else ``cupy.add.at``), in no fixed
    order, and no device synchronisation: indices outside ``0..n_bins-1`` are not detected
    (CuPy's ``bincount`` reads the largest one back to size its result).
    """
    xp = array_module(out)
    if xp is np:
        out += np.bincount(idx, weights=weights, minlength=out.shape[0])
        return
    w = (xp.ones(idx.shape, out.dtype) if weights is None
         else xp.asarray(weights).astype(out.dtype, copy=False))
    if out.dtype == xp.float64 and out.flags.c_contiguous:
        add_rows_runs(out.reshape(-1, 1), idx, w.reshape(-1, 1))
    else:
        xp.add.at(out, idx, w)


def add_rows_runs(acc, idx, rows) -> None:
    """``acc[idx[i]] += rows[i]`` for every ``i`` on the GPU (in place), one atomic add per
    run of equal consecutive indices and column (float64, in no fixed order).

    Parameters
    ----------
    acc : C-contiguous float64 CuPy array of shape (M, ...)
    idx : int array of shape (n,)
        In ``0..M-1`` (not checked); fastest where equal indices come together.
    rows : float array of shape (n, ...)
        ``acc``'s trailing shape; summed in float64.
    """
    import cupy

    n = int(idx.shape[0])
    if n == 0:
        return
    D = int(np.prod(acc.shape[1:], dtype=np.int64))
    rows = cupy.ascontiguousarray(rows.reshape(n, D), dtype=cupy.float64)
    threads = int(min(128, 32 * ((D + 31) // 32)))
    cuda_function(_CUDA_SRC, "add_rows_runs")(
        ((n + _RUN_CHUNK - 1) // _RUN_CHUNK,), (threads,),
        (acc, cupy.ascontiguousarray(idx, dtype=cupy.int64), rows, np.int64(n), np.int64(D),
         np.int32(_RUN_CHUNK)))
