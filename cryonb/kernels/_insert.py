"""Bilinear insertion of rotated 2D Fourier slices into oversampled half-plane grids.

The adjoint of :meth:`cryonb.fourier.Projector.sample` for 2D references: every value is
scattered with bilinear weights to the four grid points around its (padded) coordinate, with
Friedel symmetry for ``x < 0`` (the value is conjugated and its coordinate negated), exactly
as RELION's ``BackProjector::backrotate2D``. This is a scatter with colliding writes, so it
cannot be an array expression: a Numba kernel (CPU), a CuPy ``RawKernel`` with atomic adds
(GPU) and a plain NumPy reference (tests) implement the same function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["InsertPlan", "insert_accumulated_2d", "insert_plan_2d", "insert_planned_2d",
           "insert_rows_2d", "insert_slices_2d", "insert_slices_2d_reference"]


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


def insert_accumulated_2d(data_grid, weight_grid, acc, acc_weight, coords, r_max: float,
                          plan: InsertPlan | None = None):
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
    plan : InsertPlan, optional
        GPU: :func:`insert_plan_2d` of ``coords``, ``r_max`` and the grids' shape, made
        beforehand: the sums per grid point (:func:`insert_planned_2d`) instead of the
        atomic adds.

    Notes
    -----
    CPU: the rows with a non-zero weight, in that order (:func:`insert_rows_2d`). GPU: every
    row in that order, the kernel skipping values that are zero (they add nothing): the same
    sums without reading back which rows are empty, which made the device wait for the host
    at the end of every E-step; or, with a plan, every grid point's terms.
    """
    xp = array_module(data_grid)
    K, R = data_grid.shape[0], coords.shape[0]
    if acc_weight.shape[0] != K * R:
        raise ValueError("acc_weight must have K * R rows (class-major): "
                         f"{acc_weight.shape[0]} != {K} * {R}")
    if plan is not None and xp is not np:
        if plan.r_max != float(r_max):
            raise ValueError(f"the insertion plan is for r_max {plan.r_max}, not {r_max}")
        insert_planned_2d(data_grid, weight_grid, acc, acc_weight, plan)
        return
    if xp is np:
        rows = np.flatnonzero(acc_weight.any(axis=1))
        rows = rows[np.argsort((rows % R) * K + rows // R)]
    else:
        rows = (xp.arange(K)[None, :] * R + xp.arange(R)[:, None]).reshape(-1)
    if rows.size:
        insert_rows_2d(data_grid, weight_grid, acc, acc_weight, coords, rows, rows % R,
                       rows // R, r_max)


class InsertPlan(NamedTuple):
    """The insertion of an accumulator's angles as sums per grid point (:func:`insert_plan_2d`):
    each target grid point's terms (its CSR row), the same for every class.

    ``nnz`` terms, ``n_t`` target points; the terms of target ``i`` are ``starts[i]`` to
    ``starts[i + 1] - 1``, in the order of the accumulator's (angle, pixel, corner)."""

    targets: Any  #: int64 (n_t,): each target's flat index ``y * Px + x`` in a class's grid
    starts: Any  #: int32 (n_t + 1,)
    src: Any  #: int32 (nnz,): each term's value ``r * 2p + j`` in a class's rows of ``acc``
    wsrc: Any  #: int32 (nnz,): its weight ``r * p + j`` (``~(r * p + j)``: conjugated)
    b: Any  #: float64 (nnz,): its bilinear weight
    R: int  #: angles
    p: int  #: pixels per angle
    shape: tuple  #: (Py, Px) of a class's grid
    r_max: float  #: the radius it was made for


def insert_plan_2d(coords, r_max: float, shape) -> InsertPlan | None:
    """The GPU's insertion of a (class, angle) accumulator as a sum per grid point.

    :func:`insert_accumulated_2d` scatters every value to four grid points with atomic adds
    (2.4 ms for K=50, 36 angles of 4,800 pixels on an H100, 130 million double atomics).
    With this plan each grid point of each class sums its own terms instead: no atomic adds,
    a fixed order, and a class's rows of the accumulator (a few MB) stay in the L2 cache
    while its points are summed. The plan depends on the angles' coordinates only (made
    once per grid, for every class).

    Parameters
    ----------
    coords : float32 array of shape (R, p, 2)
        As :func:`insert_accumulated_2d` (the device's array).
    r_max : float
        Values beyond this radius (grid units) are skipped.
    shape : (Py, Px)
        A class's grid.

    Returns
    -------
    InsertPlan, or None for NumPy coordinates (the CPU's insertion is a loop without
    atomic adds: it takes no plan).
    """
    if array_module(coords) is np:
        return None
    return _plan(coords, r_max, shape)


def _plan(coords, r_max: float, shape) -> InsertPlan:
    """:func:`insert_plan_2d` for either array module (NumPy: the tests' check of the plan)."""
    xp = array_module(coords)
    R, p = coords.shape[:2]
    py, px = int(shape[0]), int(shape[1])
    f32, f64, i64 = xp.float32, xp.float64, xp.int64
    x = xp.ascontiguousarray(coords[..., 0], dtype=f32).reshape(-1)
    y = xp.ascontiguousarray(coords[..., 1], dtype=f32).reshape(-1)
    src = xp.arange(R * p, dtype=i64)
    r, j = src // p, src % p
    keep = ~(x * x + y * y > np.float32(r_max**2))
    flip = x < 0  # Friedel: the conjugate value at (-x, -y)
    x, y = xp.where(flip, -x, x), xp.where(flip, -y, y)
    # the fractions in float64, as the CPU's loop (the scatter kernel's float32 rounds them)
    x0, y0 = xp.floor(x), xp.floor(y)
    fx, fy = x.astype(f64) - x0, y.astype(f64) - y0
    x0, y0 = x0.astype(i64), y0.astype(i64) + py // 2
    terms = []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            ok = keep & (xi >= 0) & (xi < px) & (yi >= 0) & (yi < py)
            b = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
            terms.append((xp.where(ok, yi * px + xi, -1), b))
    tgt = xp.stack([t for t, _ in terms], axis=1).reshape(-1)  # (R p 4,), term-major
    b = xp.stack([v for _, v in terms], axis=1).reshape(-1)
    n = tgt.shape[0]
    order = xp.argsort(tgt * n + xp.arange(n, dtype=i64))  # by target, then term (distinct)
    order = order[tgt[order] >= 0]
    term = order // 4
    t_sorted = tgt[order]
    first = xp.ones(t_sorted.shape[0], bool)
    first[1:] = t_sorted[1:] != t_sorted[:-1]
    heads = xp.flatnonzero(first)
    starts = xp.concatenate([heads, xp.asarray([t_sorted.shape[0]], dtype=heads.dtype)])
    w = (r * p + j)[term]
    return InsertPlan(targets=t_sorted[heads], starts=starts.astype(xp.int32),
                      src=(r * 2 * p + j)[term].astype(xp.int32),
                      wsrc=xp.where(flip[term], ~w, w).astype(xp.int32),
                      b=b[order], R=int(R), p=int(p), shape=(py, px), r_max=float(r_max))


_PLAN_SRC = r"""
extern "C" __global__
void insert_planned(double* dg, double* wg, const double* acc, const double* accw,
                    const long long* targets, const int* starts, const int* src,
                    const int* wsrc, const double* b, int n_t, int R, int p, long long G)
{
    // thread: one target point of class blockIdx.y; the blocks of one class run together,
    // so that its rows of the accumulator stay in the L2 cache
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_t) return;
    const long long k = blockIdx.y;
    const double* a = acc + k * R * 2 * (long long)p;
    const double* aw = accw + k * R * (long long)p;
    double re = 0.0, im = 0.0, ww = 0.0;
    for (int e = starts[t]; e < starts[t + 1]; ++e) {
        const int q = wsrc[e];
        const bool conj = q < 0;
        const int iw = conj ? ~q : q, ia = src[e];
        const double be = b[e];
        const double vi = be * a[ia + p];
        re += be * a[ia];
        im += conj ? -vi : vi;
        ww += be * aw[iw];
    }
    const long long o = k * G + targets[t];
    dg[2 * o] += re;
    dg[2 * o + 1] += im;
    wg[o] += ww;
}
"""


def insert_planned_2d(data_grid, weight_grid, acc, acc_weight, plan: InsertPlan) -> None:
    """:func:`insert_accumulated_2d` by an :func:`insert_plan_2d` (CuPy arrays; in place):
    each grid point of each class adds its own terms, in the plan's order.

    Parameters
    ----------
    data_grid, weight_grid, acc, acc_weight
        As :func:`insert_accumulated_2d` (``acc`` (K R, 2 p), class-major).
    plan : InsertPlan
        Made for these grids' (Py, Px) and the accumulator's R angles of p pixels.
    """
    _check_grids(data_grid, weight_grid)
    K, py, px = data_grid.shape
    M, p = acc_weight.shape
    if (py, px) != plan.shape or p != plan.p or M != K * plan.R or acc.shape != (M, 2 * p):
        raise ValueError(f"the insertion plan is for grids {plan.shape} and {plan.R} angles "
                         f"of {plan.p} pixels: grids {(py, px)}, accumulator {acc.shape}")
    import cupy

    n_t = int(plan.targets.shape[0])
    if n_t == 0 or K == 0:
        return
    nt = 128
    cuda_function(_PLAN_SRC, "insert_planned")(
        ((n_t + nt - 1) // nt, K), (nt,),
        (data_grid, weight_grid, cupy.ascontiguousarray(acc, cupy.float64),
         cupy.ascontiguousarray(acc_weight, cupy.float64), plan.targets, plan.starts,
         plan.src, plan.wsrc, plan.b, np.int32(n_t), np.int32(plan.R), np.int32(p),
         np.int64(py * px)))
