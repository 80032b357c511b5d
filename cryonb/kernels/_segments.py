"""Reductions over contiguous segments: per-particle maxima, first maxima and sums.

The E-step's second pass keeps its samples grouped by particle (a particle's samples are one
contiguous run). Per-particle maxima and sums over them were scatter operations (``bincount``,
``scatter_max``): on the GPU every sample of a particle then adds into the same address, and
the atomic operations of 10^5-10^6 samples per particle serialise. Here each segment is one
CUDA block that reduces its run in shared memory, in a fixed order (deterministic float64
sums, first maximum on ties). On the CPU, ``ufunc.reduceat`` over the runs.

Segments are given by their boundaries ``starts`` of shape (n_seg + 1,): segment ``i`` is
``values[starts[i]:starts[i + 1]]`` (empty when the two are equal).

:func:`nonzero_each`: the positions of the true values of several masks with one copy to
the host for all their sizes (``flatnonzero`` makes one per mask, and each stops the host
until the device has caught up).
"""

from __future__ import annotations

import functools

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function
from ._host import to_host

__all__ = ["nonzero_each", "segment_argmax", "segment_starts", "segment_sums"]


def nonzero_each(*masks, before_wait=None):
    """``flatnonzero`` of each mask, sized with one device-to-host copy for all of them.

    Parameters
    ----------
    *masks : bool arrays (any shapes)
    before_wait : callable, optional
        Called once the copy is queued, before the host waits for it (see
        :func:`cryonb.kernels.to_host`): work it queues keeps the device busy meanwhile and
        while the host queues what follows.

    Returns
    -------
    list of int64 arrays
        For each mask, the flat positions of its true values, ascending (as
        ``numpy.flatnonzero``).

    Notes
    -----
    GPU: each mask's running count (a scan), the last counts of all masks read back in one
    copy, then one kernel per mask writes position ``i`` at its count's place.
    """
    xp = array_module(*masks)
    if xp is np:
        if before_wait is not None:
            before_wait()
        return [np.flatnonzero(m) for m in masks]
    flat = [xp.ascontiguousarray(m, dtype=xp.bool_).reshape(-1) for m in masks]
    ranks = [xp.cumsum(m, dtype=xp.int64) for m in flat]
    ends = [r[-1:] if r.size else xp.zeros(1, xp.int64) for r in ranks]
    sizes = to_host(xp.concatenate(ends), before_wait)  # the one wait for the device
    out = []
    for m, r, n in zip(flat, ranks, sizes):
        idx = xp.empty(int(n), xp.int64)
        if n:
            _compact_kernel()(m, r, idx, size=m.size)
        out.append(idx)
    return out


@functools.cache
def _compact_kernel():
    import cupy

    return cupy.ElementwiseKernel("raw bool m, raw int64 r", "raw int64 out",
                                  "if (m[i]) out[r[i] - 1] = i;", "cryonb_compact_nonzero")


def segment_starts(seg, n_seg: int):
    """Boundaries of the runs of a non-decreasing segment id array.

    Parameters
    ----------
    seg : int array of shape (n,)
        Segment ids in ``0..n_seg-1``, non-decreasing.
    n_seg : int

    Returns
    -------
    int64 array of shape (n_seg + 1,)
        ``starts[i]`` is the first index of segment ``i`` (``starts[n_seg] = n``).
    """
    xp = array_module(seg)
    return xp.searchsorted(seg, xp.arange(n_seg + 1), side="left").astype(xp.int64)


_CUDA_SRC = r"""
#define NT 256
extern "C" __global__
void seg_sum(const double* x, const long long* starts, double* out)
{
    __shared__ double s[NT];
    const long long a = starts[blockIdx.x], b = starts[blockIdx.x + 1];
    double acc = 0.0;
    for (long long i = a + threadIdx.x; i < b; i += NT) acc += x[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int h = NT / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__
void seg_argmax(const VT* x, const long long* starts, VT* vmax, long long* imax)
{
    __shared__ VT sv[NT];
    __shared__ long long si[NT];
    const long long a = starts[blockIdx.x], b = starts[blockIdx.x + 1];
    VT best = NEG_INF;
    long long bi = -1;
    for (long long i = a + threadIdx.x; i < b; i += NT) {
        const VT v = x[i];
        if (bi < 0 || v > best) { best = v; bi = i; }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int h = NT / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) {
            const VT v = sv[threadIdx.x + h];
            const long long j = si[threadIdx.x + h];
            const long long i0 = si[threadIdx.x];
            if (j >= 0 && (i0 < 0 || v > sv[threadIdx.x] ||
                           (v == sv[threadIdx.x] && j < i0))) {
                sv[threadIdx.x] = v;
                si[threadIdx.x] = j;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) { vmax[blockIdx.x] = sv[0]; imax[blockIdx.x] = si[0]; }
}
"""
_NT = 256
def _cuda_kernel(name: str, dtype=np.float64):
    vt = "float" if np.dtype(dtype) == np.float32 else "double"
    inf = ("(-__int_as_float(0x7f800000))" if vt == "float"
           else "(-__longlong_as_double(0x7ff0000000000000LL))")
    return cuda_function(f"#define VT {vt}\n#define NEG_INF {inf}\n" + _CUDA_SRC, name)


def segment_sums(values, starts):
    """Float64 sums of ``values`` over each segment.

    Parameters
    ----------
    values : float array of shape (n,)
    starts : int64 array of shape (n_seg + 1,)
        Segment boundaries (:func:`segment_starts`).

    Returns
    -------
    float64 array of shape (n_seg,)
        0 for empty segments. The summation order is fixed (the same result on every run).
    """
    xp = array_module(values)
    n_seg = int(starts.shape[0]) - 1
    x = values.astype(xp.float64, copy=False)
    if xp is np:
        out = np.zeros(n_seg, np.float64)
        lo = starts[:-1]
        nonempty = starts[1:] > lo
        if x.size and nonempty.any():
            out[nonempty] = np.add.reduceat(x, lo[nonempty])
        return out
    out = xp.zeros(n_seg, xp.float64)
    if n_seg and x.size:
        _cuda_kernel("seg_sum")((n_seg,), (_NT,), (xp.ascontiguousarray(x),
                                                   xp.ascontiguousarray(starts), out))
    return out


def segment_argmax(values, starts):
    """Maximum of each segment and the index of its first occurrence.

    Parameters
    ----------
    values : float32 or float64 array of shape (n,)
        ``-inf`` allowed; no NaN.
    starts : int64 array of shape (n_seg + 1,)
        Segment boundaries (:func:`segment_starts`).

    Returns
    -------
    vmax : array of shape (n_seg,), the dtype of ``values``
        ``-inf`` for empty segments.
    imax : int64 array of shape (n_seg,)
        Index into ``values`` of the segment's first maximum; -1 for empty segments.
    """
    xp = array_module(values)
    n_seg = int(starts.shape[0]) - 1
    x = values if values.dtype in (np.float32, np.float64) else values.astype(np.float64)
    if xp is np:
        vmax = np.full(n_seg, -np.inf, x.dtype)
        imax = np.full(n_seg, -1, np.int64)
        lo = starts[:-1]
        ne = np.flatnonzero(starts[1:] > lo)
        if ne.size:
            vmax[ne] = np.maximum.reduceat(x, lo[ne])
            seg = np.repeat(np.arange(n_seg), np.diff(starts))
            top = np.flatnonzero(x == vmax[seg])
            first = np.r_[True, seg[top][1:] != seg[top][:-1]]
            imax[seg[top[first]]] = top[first]
        return vmax, imax
    vmax = xp.empty(n_seg, x.dtype)
    imax = xp.empty(n_seg, xp.int64)
    if n_seg:
        _cuda_kernel("seg_argmax", x.dtype)((n_seg,), (_NT,), (xp.ascontiguousarray(x),
                                                      xp.ascontiguousarray(starts), vmax, imax))
    return vmax, imax
