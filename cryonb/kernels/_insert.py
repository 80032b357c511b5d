"""Bilinear insertion of rotated 2D Fourier slices into oversampled half-plane grids.

The adjoint of :meth:`cryonb.fourier.Projector.sample` for 2D references: every value is
scattered with bilinear weights to the four grid points around its (padded) coordinate, with
Friedel symmetry for ``x < 0`` (the value is conjugated and its coordinate negated), exactly
as RELION's ``BackProjector::backrotate2D``. This is a scatter with colliding writes, so it
cannot be an array expression: a Numba kernel (CPU), a CuPy ``RawKernel`` with atomic adds
(GPU) and a plain NumPy reference (tests) implement the same function.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module

__all__ = ["insert_accumulated_2d", "insert_rows_2d", "insert_slices_2d",
           "insert_slices_2d_reference"]


def _check_grids(data_grid, weight_grid):
    if data_grid.ndim != 3 or weight_grid.shape != data_grid.shape:
        raise ValueError("data_grid and weight_grid must both have shape (K, Py, Px)")
    if data_grid.dtype != np.complex128 or weight_grid.dtype != np.float64:
        raise ValueError("grids must be complex128 / float64 (sums are kept in double)")
    if not (data_grid.flags.c_contiguous and weight_grid.flags.c_contiguous):
        raise ValueError("grids must be C-contiguous")


def _check(data_grid, weight_grid, values, weights, coords, slot):
    _check_grids(data_grid, weight_grid)
    m, p = values.shape
    if weights.shape != (m, p) or coords.shape != (m, p, 2) or slot.shape != (m,):
        raise ValueError("values/weights (m, p), coords (m, p, 2) and slot (m,) disagree")


def _check_rows(data_grid, weight_grid, acc, acc_weight, coords, rows, rot, slot):
    _check_grids(data_grid, weight_grid)
    M, p = acc_weight.shape
    if acc.shape != (M, 2 * p) or coords.ndim != 3 or coords.shape[1:] != (p, 2):
        raise ValueError("acc (M, 2p), acc_weight (M, p) and coords (R, p, 2) disagree")
    if not (len(rows) == len(rot) == len(slot)):
        raise ValueError("rows, rot and slot must have one length")


def insert_slices_2d_reference(data_grid, weight_grid, values, weights, coords, slot, r_max):
    """Plain NumPy reference of :func:`insert_slices_2d` (slow, for tests)."""
    _check(data_grid, weight_grid, values, weights, coords, slot)
    py, px = data_grid.shape[1:]
    half = py // 2
    for i in range(values.shape[0]):
        k = int(slot[i])
        for j in range(values.shape[1]):
            x, y = float(coords[i, j, 0]), float(coords[i, j, 1])
            if x * x + y * y > r_max * r_max:
                continue
            v = complex(values[i, j])
            w = float(weights[i, j])
            if x < 0:
                x, y, v = -x, -y, v.conjugate()
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - x0, y - y0
            for dy in (0, 1):
                for dx in (0, 1):
                    b = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
                    xi, yi = x0 + dx, y0 + dy + half
                    if 0 <= xi < px and 0 <= yi < py:
                        data_grid[k, yi, xi] += b * v
                        weight_grid[k, yi, xi] += b * w


_numba_kernel = None


def _get_numba_kernel():
    global _numba_kernel
    if _numba_kernel is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kern(dg, wg, acc, accw, coords, rows, rot, slot, r_max2):
            py, px = wg.shape[1], wg.shape[2]
            half = py // 2
            p = accw.shape[1]
            for i in range(rows.shape[0]):
                a, c, k = rows[i], rot[i], slot[i]
                for j in range(p):
                    x = coords[c, j, 0]
                    y = coords[c, j, 1]
                    if x * x + y * y > r_max2:
                        continue
                    re = acc[a, j]
                    im = acc[a, p + j]
                    if x < 0:
                        x = -x
                        y = -y
                        im = -im
                    x0 = int(np.floor(x))
                    y0 = int(np.floor(y))
                    fx = x - x0
                    fy = y - y0
                    for dy in range(2):
                        for dx in range(2):
                            b = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
                            xi = x0 + dx
                            yi = y0 + dy + half
                            if 0 <= xi < px and 0 <= yi < py:
                                dg[k, yi, xi] += complex(b * re, b * im)
                                wg[k, yi, xi] += b * accw[a, j]

        _numba_kernel = kern
    return _numba_kernel


_CUDA_SRC = r"""
extern "C" __global__
void insert2d(double* dg, double* wg, const double* acc, const double* accw,
              const float* coords, const int* rows, const int* rot, const int* slot, int m,
              int p, int py, int px, float r_max2)
{
    long long t = blockDim.x * (long long)blockIdx.x + threadIdx.x;
    if (t >= (long long)m * p) return;
    int i = t / p, j = t - (long long)i * p;
    long long a = rows[i], c = (long long)rot[i] * p + j;
    float x = coords[2 * c], y = coords[2 * c + 1];
    if (x * x + y * y > r_max2) return;
    double re = acc[2 * a * p + j], im = acc[2 * a * p + p + j], ww = accw[a * p + j];
    // a value that adds nothing (rows or pixels no particle reached) is not added
    if (re == 0.0 && im == 0.0 && ww == 0.0) return;
    if (x < 0.f) { x = -x; y = -y; im = -im; }
    int x0 = (int)floorf(x), y0 = (int)floorf(y);
    float fx = x - x0, fy = y - y0;
    int half = py / 2;
    long long base = (long long)slot[i] * py * px;
    for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
            double b = (dx ? fx : 1.0 - fx) * (dy ? fy : 1.0 - fy);
            int xi = x0 + dx, yi = y0 + dy + half;
            if (xi >= 0 && xi < px && yi >= 0 && yi < py) {
                long long o = base + (long long)yi * px + xi;
                atomicAdd(dg + 2 * o, b * re);
                atomicAdd(dg + 2 * o + 1, b * im);
                atomicAdd(wg + o, b * ww);
            }
        }
    }
}
"""
_cuda_kernels: dict = {}


def _get_cuda_kernel():
    import cupy

    dev = cupy.cuda.Device().id
    if dev not in _cuda_kernels:
        _cuda_kernels[dev] = cupy.RawKernel(_CUDA_SRC, "insert2d")
    return _cuda_kernels[dev]


def insert_slices_2d(data_grid, weight_grid, values, weights, coords, slot, r_max: float):
    """Scatter-add rotated 2D Fourier slices into per-class oversampled grids (in place).

    Parameters
    ----------
    data_grid : complex128 array of shape (K, Py, Px)
        Half-plane grid, ``y`` axis centred (index ``Py // 2`` is ky = 0), ``x`` from 0.
    weight_grid : float64 array of shape (K, Py, Px)
    values : complex array of shape (m, p)
        Slice values (e.g. ``w * CTF * X / sigma2``); summed in double precision.
    weights : real array of shape (m, p)
        Slice weights (e.g. ``w * CTF^2 / sigma2``).
    coords : real array of shape (m, p, 2)
        (x, y) grid coordinates of each value (already multiplied by the padding factor).
    slot : int array of shape (m,)
        Class (first grid axis) of each slice.
    r_max : float
        Values beyond this radius (grid units) are skipped.

    Notes
    -----
    NumPy inputs use a Numba kernel, CuPy inputs a CUDA kernel with double-precision atomic
    adds; both agree with :func:`insert_slices_2d_reference` to rounding. The slices of an
    accumulator with one row per (class, angle) go in without these copies:
    :func:`insert_rows_2d`.
    """
    _check(data_grid, weight_grid, values, weights, coords, slot)
    xp = array_module(data_grid)
    m = values.shape[0]
    acc = xp.concatenate([values.real, values.imag], axis=1).astype(xp.float64, copy=False)
    every = xp.arange(m)
    insert_rows_2d(data_grid, weight_grid, acc, weights, coords, every, every, slot, r_max)


def insert_rows_2d(data_grid, weight_grid, acc, acc_weight, coords, rows, rot, slot,
                   r_max: float):
    """Scatter-add chosen rows of a slice accumulator into per-class grids (in place).

    The E-step sums each (class, angle)'s back-projected images in one row of an
    accumulator, its values as ``[Re | Im]`` and its weights apart, and the angles' pixel
    coordinates are the same for every class: this inserts rows ``rows`` straight from
    there (:func:`insert_slices_2d` of ``acc[rows, :p] + 1j acc[rows, p:]``,
    ``acc_weight[rows]``, ``coords[rot]`` and ``slot``, without making those arrays).

    Parameters
    ----------
    data_grid : complex128 array of shape (K, Py, Px)
        As :func:`insert_slices_2d`.
    weight_grid : float64 array of shape (K, Py, Px)
    acc : float64 array of shape (M, 2 p)
        Accumulated values, real parts then imaginary parts.
    acc_weight : float64 array of shape (M, p)
    coords : float32 array of shape (R, p, 2)
        (x, y) grid coordinates of the pixels at each angle (padding included).
    rows, rot, slot : int arrays of shape (m,)
        Each inserted slice's row of ``acc``, its angle (row of ``coords``) and its class;
        inserted in this order.
    r_max : float
        Values beyond this radius (grid units) are skipped.
    """
    _check_rows(data_grid, weight_grid, acc, acc_weight, coords, rows, rot, slot)
    xp = array_module(data_grid)
    if xp is np:
        _get_numba_kernel()(
            data_grid, weight_grid, np.ascontiguousarray(acc, np.float64),
            np.ascontiguousarray(acc_weight, np.float64), np.ascontiguousarray(coords, np.float32),
            *(np.ascontiguousarray(v, np.int64) for v in (rows, rot, slot)), float(r_max) ** 2)
        return
    import cupy

    m, p = len(rows), acc_weight.shape[1]
    n = m * p
    if n:
        _get_cuda_kernel()(
            ((n + 255) // 256,), (256,),
            (data_grid, weight_grid, cupy.ascontiguousarray(acc, cupy.float64),
             cupy.ascontiguousarray(acc_weight, cupy.float64),
             cupy.ascontiguousarray(coords, cupy.float32),
             *(cupy.ascontiguousarray(v, cupy.int32) for v in (rows, rot, slot)),
             np.int32(m), np.int32(p), np.int32(data_grid.shape[1]),
             np.int32(data_grid.shape[2]), np.float32(r_max**2)))


def insert_accumulated_2d(data_grid, weight_grid, acc, acc_weight, coords, r_max: float):
    """Scatter-add a whole (class, angle) slice accumulator into the class grids (in place).

    The E-step's accumulator has one row per (class, angle), class-major (row ``k * R +
    a``); this inserts the rows that hold anything, in (angle, class) order: slices inserted
    one after another then go to different classes' grids (the GPU's atomic adds to one
    class's low frequencies collide less than with a class's angles in a row).

    Parameters
    ----------
    data_grid : complex128 array of shape (K, Py, Px)
        As :func:`insert_slices_2d`.
    weight_grid : float64 array of shape (K, Py, Px)
    acc : float64 array of shape (K R, 2 p)
        Accumulated values, real parts then imaginary parts.
    acc_weight : float64 array of shape (K R, p)
    coords : float32 array of shape (R, p, 2)
        (x, y) grid coordinates of the pixels at each angle (padding included).
    r_max : float
        Values beyond this radius (grid units) are skipped.

    Notes
    -----
    CPU: the rows with a non-zero weight, in that order (:func:`insert_rows_2d`). GPU: every
    row in that order, the kernel skipping values that are zero (they add nothing): the same
    sums without reading back which rows are empty, which made the device wait for the host
    at the end of every E-step.
    """
    xp = array_module(data_grid)
    K, R = data_grid.shape[0], coords.shape[0]
    if acc_weight.shape[0] != K * R:
        raise ValueError("acc_weight must have K * R rows (class-major): "
                         f"{acc_weight.shape[0]} != {K} * {R}")
    if xp is np:
        rows = np.flatnonzero(acc_weight.any(axis=1))
        rows = rows[np.argsort((rows % R) * K + rows // R)]
    else:
        rows = (xp.arange(K)[None, :] * R + xp.arange(R)[:, None]).reshape(-1)
    if rows.size:
        insert_rows_2d(data_grid, weight_grid, acc, acc_weight, coords, rows, rows % R,
                       rows // R, r_max)
