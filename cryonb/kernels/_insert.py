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

__all__ = ["insert_slices_2d", "insert_slices_2d_reference"]


def _check(data_grid, weight_grid, values, weights, coords, slot):
    if data_grid.ndim != 3 or weight_grid.shape != data_grid.shape:
        raise ValueError("data_grid and weight_grid must both have shape (K, Py, Px)")
    if data_grid.dtype != np.complex128 or weight_grid.dtype != np.float64:
        raise ValueError("grids must be complex128 / float64 (sums are kept in double)")
    if not (data_grid.flags.c_contiguous and weight_grid.flags.c_contiguous):
        raise ValueError("grids must be C-contiguous")
    m, p = values.shape
    if weights.shape != (m, p) or coords.shape != (m, p, 2) or slot.shape != (m,):
        raise ValueError("values/weights (m, p), coords (m, p, 2) and slot (m,) disagree")


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
        def kern(dg, wg, vre, vim, w, coords, slot, r_max2):
            py, px = wg.shape[1], wg.shape[2]
            half = py // 2
            for i in range(vre.shape[0]):
                k = slot[i]
                for j in range(vre.shape[1]):
                    x = coords[i, j, 0]
                    y = coords[i, j, 1]
                    if x * x + y * y > r_max2:
                        continue
                    re = vre[i, j]
                    im = vim[i, j]
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
                                wg[k, yi, xi] += b * w[i, j]

        _numba_kernel = kern
    return _numba_kernel


_CUDA_SRC = r"""
extern "C" __global__
void insert2d(double* dg, double* wg, const double* vre, const double* vim,
              const double* w, const float* coords, const int* slot, int m, int p,
              int py, int px, float r_max2)
{
    long long t = blockDim.x * (long long)blockIdx.x + threadIdx.x;
    if (t >= (long long)m * p) return;
    int i = t / p;
    float x = coords[2 * t], y = coords[2 * t + 1];
    if (x * x + y * y > r_max2) return;
    double re = vre[t], im = vim[t], ww = w[t];
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
    adds; both agree with :func:`insert_slices_2d_reference` to rounding.
    """
    _check(data_grid, weight_grid, values, weights, coords, slot)
    xp = array_module(data_grid)
    if xp is np:
        kern = _get_numba_kernel()
        kern(data_grid, weight_grid, np.ascontiguousarray(values.real, np.float64),
             np.ascontiguousarray(values.imag, np.float64),
             np.ascontiguousarray(weights, np.float64), np.ascontiguousarray(coords, np.float32),
             np.ascontiguousarray(slot, np.int64), float(r_max) ** 2)
        return
    import cupy

    m, p = values.shape
    n = m * p
    if n:
        _get_cuda_kernel()(
            ((n + 255) // 256,), (256,),
            (data_grid, weight_grid, cupy.ascontiguousarray(values.real, cupy.float64),
             cupy.ascontiguousarray(values.imag, cupy.float64),
             cupy.ascontiguousarray(weights, cupy.float64),
             cupy.ascontiguousarray(coords, cupy.float32),
             cupy.ascontiguousarray(slot, cupy.int32), np.int32(m), np.int32(p),
             np.int32(data_grid.shape[1]), np.int32(data_grid.shape[2]), np.float32(r_max**2)))
