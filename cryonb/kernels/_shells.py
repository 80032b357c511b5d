"""Power per Fourier shell: ``sum |X|^2`` over each bin's pixels, per image.

The E-step needs each particle's image power per resolution shell three times over: the
noise model's residual beyond the current size (over the whole box), the residual's image
term (over the current size's pixels) and the images' norms ``sum |X|^2 / sigma2`` of both
passes (constant over a shell for a given optics group, so a weighted sum of the shells'
powers). As array expressions that was a gather of the pixels, two squares, a sum, a copy and
a matrix product with a one-hot table, per use: on a GPU about ten passes over the pool's
pixels, the gather of the whole box the largest of them.

Here the pixels are ordered by bin once per table (:func:`shell_table`); on the GPU one CUDA
block per image, one warp per bin, reads the bin's pixels, squares them in float32 and sums in
float64 in a fixed order (a warp's lanes, then a shuffle tree): deterministic, and each image's
sums independent of the others in its pool. On the CPU, the same float32 squares summed per
bin in float64 with ``add.reduceat`` (as fast as the float32 BLAS product with a one-hot table
it replaces, whose sums for an image depended on the other images of the product).
:func:`shell_sums` does the same for float64 values (the residual's per-pixel sums of the
second pass), optionally weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["ShellTable", "shell_power", "shell_power_reference", "shell_sums", "shell_table"]


@dataclass(frozen=True)
class ShellTable:
    """Pixels ordered by bin (made by :func:`shell_table`).

    Attributes
    ----------
    order : int32 array of shape (n_valid,)
        The pixels with a bin, sorted by bin (stable: ascending within a bin).
    starts : int32 array of shape (n_bins + 1,)
        Bin ``i``'s pixels are ``order[starts[i]:starts[i + 1]]``.
    n_bins : int
    n_pixels : int
        Pixels per image (the length of ``bins``).
    nonempty : ndarray of int, host
        The bins with pixels.
    nonempty_starts : ndarray of int64, host
        ``starts`` of those bins (strictly increasing; for ``add.reduceat``).
    """

    order: object
    starts: object
    n_bins: int
    n_pixels: int
    nonempty: np.ndarray
    nonempty_starts: np.ndarray


def shell_table(bins, n_bins: int, xp=np) -> ShellTable:
    """The pixel order of :func:`shell_power` for one binning of an image's pixels.

    Parameters
    ----------
    bins : int array of shape (P,)
        Each pixel's bin; pixels with a bin outside ``0..n_bins-1`` are left out.
    n_bins : int
    xp : module
        Where the table is used (``numpy`` or ``cupy``).

    Returns
    -------
    ShellTable
    """
    bins = np.asarray(bins.get() if hasattr(bins, "get") else bins).astype(np.int64)
    valid = np.flatnonzero((bins >= 0) & (bins < n_bins))
    order = valid[np.argsort(bins[valid], kind="stable")]
    counts = np.bincount(bins[valid], minlength=n_bins)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nonempty = np.flatnonzero(counts > 0)
    return ShellTable(xp.asarray(order, dtype=xp.int32), xp.asarray(starts, dtype=xp.int32),
                      int(n_bins), int(bins.size), nonempty, starts[nonempty])


def shell_power_reference(X, bins, n_bins: int):
    """Array-expression version (the tests' reference): ``bincount`` per image.

    Parameters
    ----------
    X : complex array of shape (B, P)
    bins : int array of shape (P,)
    n_bins : int

    Returns
    -------
    float64 array of shape (B, n_bins)
    """
    xp = array_module(X)
    bins = xp.asarray(bins)
    keep = (bins >= 0) & (bins < n_bins)
    p = (X.real**2 + X.imag**2).astype(xp.float64)[:, keep]
    return xp.stack([xp.bincount(bins[keep], weights=row, minlength=n_bins) for row in p]) \
        if X.shape[0] else xp.zeros((0, n_bins))


_CUDA_SRC = r"""
extern "C" __global__
void shell_power(const float2* X, long long P, const int* order, const int* starts, int n_bins,
                 double* out, const float* bg, const float2* C, int has_bg)
{
    const float2* x = X + (long long)blockIdx.x * P;
    double* o = out + (long long)blockIdx.x * n_bins;
    const float g = has_bg ? bg[blockIdx.x] : 0.0f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int s = warp; s < n_bins; s += nw) {
        double acc = 0.0;
        for (int j = starts[s] + lane; j < starts[s + 1]; j += 32) {
            float2 v = x[order[j]];
            if (has_bg) {  // a term left out of X: X + bg C
                const float2 e = C[order[j]];
                v = make_float2(__fadd_rn(v.x, __fmul_rn(g, e.x)),
                                __fadd_rn(v.y, __fmul_rn(g, e.y)));
            }
            acc += (double)(v.x * v.x + v.y * v.y);
        }
        for (int d = 16; d > 0; d >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, d);
        if (lane == 0) o[s] = acc;
    }
}

extern "C" __global__
void shell_sums(const double* V, const float* W, int weighted, long long P, const int* order,
                const int* starts, int n_bins, double* out)
{
    const double* v = V + (long long)blockIdx.x * P;
    const float* w = W + (weighted ? (long long)blockIdx.x * P : 0);
    double* o = out + (long long)blockIdx.x * n_bins;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int s = warp; s < n_bins; s += nw) {
        double acc = 0.0;
        for (int j = starts[s] + lane; j < starts[s + 1]; j += 32) {
            const int p = order[j];
            acc += weighted ? v[p] * (double)w[p] : v[p];
        }
        for (int d = 16; d > 0; d >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, d);
        if (lane == 0) o[s] = acc;
    }
}
"""


def _output(X, table: ShellTable, who: str):
    """The array module of ``X`` (B, P) and the zeroed float64 sums (B, table.n_bins); a
    ``ValueError`` where ``P`` is not the table's."""
    xp = array_module(X)
    if X.shape[1] != table.n_pixels:
        raise ValueError(f"{who}: the images have {X.shape[1]} pixels, the table "
                         f"{table.n_pixels}")
    return xp, xp.zeros((int(X.shape[0]), table.n_bins), xp.float64)


def shell_power(X, table: ShellTable, outside=None):
    """Per image, the power ``|X|^2`` summed over each bin's pixels.

    Parameters
    ----------
    X : complex64 array of shape (B, P)
        Images' Fourier pixels (``P == table.n_pixels``); a GPU table needs CuPy images.
    table : ShellTable
        From :func:`shell_table` for the same array module.
    outside : (bg, C), optional
        A term left out of ``X``: the power of ``X + bg[:, None] * C`` (``bg`` float32 (B,),
        ``C`` complex64 (P,); :func:`cryonb.kernels.window_shift`'s ``outside``).

    Returns
    -------
    float64 array of shape (B, table.n_bins)
        The squares in float32, their sums in float64 (0 for a bin without pixels).
    """
    xp, out = _output(X, table, "shell_power")
    B = out.shape[0]
    if out.size == 0 or table.nonempty.size == 0:
        return out
    if outside is not None and xp is np:
        X = X + np.asarray(outside[0], np.float32)[:, None] * outside[1]
    if xp is np:
        p = X.real * X.real
        p += X.imag * X.imag
        out[:, table.nonempty] = np.add.reduceat(np.take(p, table.order, axis=1),
                                                 table.nonempty_starts, axis=1, dtype=np.float64)
        return out
    from ._prepare import _outside_args

    cuda_function(_CUDA_SRC, "shell_power")(
        (B,), (256,), (xp.ascontiguousarray(X, dtype=xp.complex64), np.int64(X.shape[1]),
                       table.order, table.starts, np.int32(table.n_bins), out,
                       *_outside_args(xp, outside, B, int(X.shape[1]))))
    return out


def shell_sums(V, table: ShellTable, weight=None):
    """Per image, values summed over each bin's pixels (in float64, a fixed order).

    Parameters
    ----------
    V : float64 array of shape (B, P)
    table : ShellTable
        From :func:`shell_table` for the same array module (``P == table.n_pixels``).
    weight : float32 array of shape (B, P), optional
        Each value's factor.

    Returns
    -------
    float64 array of shape (B, table.n_bins)
        ``sum V * weight`` per bin (0 for a bin without pixels).
    """
    xp, out = _output(V, table, "shell_sums")
    B = out.shape[0]
    if out.size == 0 or table.nonempty.size == 0:
        return out
    if xp is np:
        v = np.asarray(V, np.float64)[:, table.order]
        if weight is not None:
            v = v * np.asarray(weight, np.float32)[:, table.order]
        out[:, table.nonempty] = np.add.reduceat(v, table.nonempty_starts, axis=1)
        return out
    w = (xp.empty(1, xp.float32) if weight is None
         else xp.ascontiguousarray(weight, dtype=xp.float32))
    cuda_function(_CUDA_SRC, "shell_sums")(
        (B,), (256,), (xp.ascontiguousarray(V, dtype=xp.float64), w,
                       np.int32(weight is not None), np.int64(V.shape[1]), table.order,
                       table.starts, np.int32(table.n_bins), out))
    return out
