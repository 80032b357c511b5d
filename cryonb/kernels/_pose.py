"""Log-posteriors of a best sample's neighbours, for the pose refinement of the second pass.

:func:`pose_neighbours`: for each particle, the data terms of its best class at the best
sample's two in-plane neighbours (and the sample itself), and at four translation steps
around the best offset. As array expressions that is a loop over chunks of particles with
five gathers of whole reference rows and a dozen passes each; on the GPU it is one CUDA
block per particle that reads its image, CTF and three reference rows once and reduces ten
sums in double precision. The blocks take the particles in the order of their best
reference row, so that the particles in flight at one time share rows: the rows are read
from memory about once, not once per particle. On the CPU, the array expressions (the reference).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["pose_neighbours", "pose_neighbours_reference", "refine_pose",
           "refine_pose_reference"]

#: particles per step of the reference (bounds its (particles x pixels) temporaries)
POSE_CHUNK = 1024


def pose_neighbours_reference(X, phases, shift, ctf, inv, refs, refs_ri, refs_a2, rows,
                              stencil):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`pose_neighbours`.
    """
    xp = array_module(X)
    B = X.shape[0]
    l_psi = xp.empty((B, 3))
    l_t = xp.empty((B, 4))
    f64 = xp.float64
    for a in range(0, B, POSE_CHUNK):
        c = slice(a, a + POSE_CHUNK)
        Y = X[c] * phases[shift[c]] * (ctf[c] * inv[c])  # X shifted, CTF / sigma2
        Yri = xp.concatenate([Y.real, Y.imag], axis=-1).astype(xp.float32, copy=False)
        Ari = refs_ri[rows[c]]  # (b, 3, 2P): Re <Y, A> = [Re Y | Im Y] . [Re A | Im A]
        a2 = ((ctf[c] * ctf[c] * inv[c])[:, None, :] * refs_a2[rows[c]]).sum(axis=2, dtype=f64)
        l_psi[c] = (Yri[:, None, :] * Ari).sum(axis=2, dtype=f64) - 0.5 * a2
        # Re <Y e^{i ph_s}, A> = [Re Z | Im Z] . [cos | -sin], Z = Y conj(A)
        Z = Y * xp.conj(refs[rows[c, 1]])
        Zri = xp.concatenate([Z.real, Z.imag], axis=-1).astype(xp.float32, copy=False)
        l_t[c] = (Zri @ stencil).astype(f64) - 0.5 * a2[:, 1:2]
    return l_psi, l_t


_CUDA_SRC = r"""
#define NT 256
extern "C" __global__
void pose_neighbours(const float2* X, const float2* ph, const long long* shift,
                     const float* ctf, const float* inv, const float2* refs,
                     const float* refs_a2, const long long* rows, const float* st, int P,
                     double* l_psi, double* l_t, const long long* order)
{
    // one block per particle, the particles taken in the order of their best reference row
    // (order): the blocks that run at one time share reference rows, which stay in L2
    __shared__ double s[10][NT];
    const long long b = order[blockIdx.x];
    const float2* x = X + b * P;
    const float2* e = ph + shift[b] * P;
    const float* c = ctf + b * P;
    const float* iv = inv + b * P;
    const long long r0 = rows[3 * b], r1 = rows[3 * b + 1], r2 = rows[3 * b + 2];
    double acc[10];
    for (int j = 0; j < 10; ++j) acc[j] = 0.0;
    for (int p = threadIdx.x; p < P; p += NT) {
        const float2 xv = x[p], ev = e[p];
        const float ci = c[p] * iv[p];
        const float c2 = c[p] * c[p] * iv[p];
        const float yr = (xv.x * ev.x - xv.y * ev.y) * ci;
        const float yi = (xv.x * ev.y + xv.y * ev.x) * ci;
        const float2 a0 = refs[r0 * P + p], a1 = refs[r1 * P + p], a2 = refs[r2 * P + p];
        acc[0] += (double)(yr * a0.x + yi * a0.y);
        acc[1] += (double)(yr * a1.x + yi * a1.y);
        acc[2] += (double)(yr * a2.x + yi * a2.y);
        acc[3] += (double)(c2 * refs_a2[r0 * P + p]);
        acc[4] += (double)(c2 * refs_a2[r1 * P + p]);
        acc[5] += (double)(c2 * refs_a2[r2 * P + p]);
        // Z = Y conj(A1); Re(Z e^{i ph_s}) = Re Z cos_s - Im Z sin_s, st = [cos | -sin] rows
        const float zr = yr * a1.x + yi * a1.y;
        const float zi = yi * a1.x - yr * a1.y;
        for (int q = 0; q < 4; ++q)
            acc[6 + q] += (double)(zr * st[p * 4 + q] + zi * st[((long long)P + p) * 4 + q]);
    }
    for (int j = 0; j < 10; ++j) s[j][threadIdx.x] = acc[j];
    __syncthreads();
    for (int h = NT / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h)
            for (int j = 0; j < 10; ++j) s[j][threadIdx.x] += s[j][threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        for (int j = 0; j < 3; ++j) l_psi[3 * b + j] = s[j][0] - 0.5 * s[3 + j][0];
        for (int q = 0; q < 4; ++q) l_t[4 * b + q] = s[6 + q][0] - 0.5 * s[4][0];
    }
}

// the particles grouped by their best reference row (rows[3 b + 1]), a counting sort
// (the order within a row is whichever the atomic adds give: each particle's sums are
// its own, in any order): counts of each row, then each particle's place
extern "C" __global__
void row_counts(const long long* rows, long long B, int* counts)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b < B) atomicAdd(counts + rows[3 * b + 1] + 1, 1);
}

extern "C" __global__
void row_order(const long long* rows, long long B, int* next, long long* order)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b < B) order[atomicAdd(next + rows[3 * b + 1], 1)] = b;
}
"""


def pose_neighbours(X, phases, shift, ctf, inv, refs, refs_ri, refs_a2, rows, stencil):
    """Data terms of each particle's best sample and its neighbours.

    With ``Y = X e^{i phi_shift} CTF / sigma2`` (the image shifted by its best translation)
    and ``a2_j = sum CTF^2 |A_j|^2 / sigma2`` for the three reference rows ``A_j`` (the best
    class at the best angle and its two neighbours), the terms are
    ``l_psi[j] = Re <Y, A_j> - a2_j / 2`` and, for the four translation steps ``s`` of
    ``stencil``, ``l_t[s] = Re <Y e^{i phi_s}, A_1> - a2_1 / 2`` (sums over pixels, in
    double precision).

    Parameters
    ----------
    X : complex64 array of shape (B, P)
        Images at the pass's pixels (centred on the previous offset).
    phases : complex64 array of shape (T, P)
        Phase ramp of each translation of the pass's grid.
    shift : int array of shape (B,)
        Each particle's best translation (row of ``phases``).
    ctf, inv : float32 arrays of shape (B, P)
        CTF and 1 / sigma2 per pixel.
    refs : complex64 array of shape (M, P)
        Reference rows (class x angle).
    refs_ri : float32 array of shape (M, 2P)
        The same as ``[Re | Im]`` (used by the reference).
    refs_a2 : float32 array of shape (M, P)
        ``|refs|^2``.
    rows : int array of shape (B, 3)
        Reference rows of the angle's neighbours: previous angle, best, next angle.
    stencil : float32 array of shape (2P, 4)
        The four translation steps' phases as ``[cos | -sin]`` columns.

    Returns
    -------
    l_psi : float64 array of shape (B, 3)
    l_t : float64 array of shape (B, 4)
    """
    xp = array_module(X)
    if xp is np:
        return pose_neighbours_reference(X, phases, shift, ctf, inv, refs, refs_ri, refs_a2,
                                         rows, stencil)
    B, P = X.shape
    l_psi = xp.empty((B, 3), xp.float64)
    l_t = xp.empty((B, 4), xp.float64)
    if B == 0:
        return l_psi, l_t
    f32, c64, i64 = xp.float32, xp.complex64, xp.int64
    rows = xp.ascontiguousarray(rows, dtype=i64)
    # the particles grouped by best row (a counting sort: argsort held the host ~1 ms)
    nt, grid = 256, ((B + 255) // 256,)
    counts = xp.zeros(refs.shape[0] + 1, xp.int32)
    cuda_function(_CUDA_SRC, "row_counts")(grid, (nt,), (rows, np.int64(B), counts))
    order = xp.empty(B, i64)
    cuda_function(_CUDA_SRC, "row_order")(
        grid, (nt,), (rows, np.int64(B), xp.cumsum(counts, dtype=xp.int32), order))
    cuda_function(_CUDA_SRC, "pose_neighbours")(
        (B,), (256,),
        (xp.ascontiguousarray(X, dtype=c64), xp.ascontiguousarray(phases, dtype=c64),
         xp.ascontiguousarray(shift, dtype=i64), xp.ascontiguousarray(ctf, dtype=f32),
         xp.ascontiguousarray(inv, dtype=f32), xp.ascontiguousarray(refs, dtype=c64),
         xp.ascontiguousarray(refs_a2, dtype=f32), rows,
         xp.ascontiguousarray(stencil, dtype=f32), np.int32(P), l_psi, l_t, order))
    return l_psi, l_t


def _vertex(lm, l0, lp):
    """Vertex of the parabola through (-1, lm), (0, l0), (1, lp), in [-0.5, 0.5]; 0 where
    the three values are not concave (arrays of one shape)."""
    xp = array_module(l0)
    den = lm - 2 * l0 + lp
    safe = xp.where(den < 0, den, -1.0)
    return xp.where(den < 0, xp.clip(0.5 * (lm - lp) / safe, -0.5, 0.5), 0.0)


def refine_pose_reference(l_psi, l_t, psi, off, prior, steps, inv2: float, dpsi: float,
                          d: float):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`refine_pose`.
    """
    xp = array_module(l_psi)
    dd = off - prior
    l_t = l_t - ((dd[:, None, :] + steps[None]) ** 2).sum(axis=2) * inv2
    l0 = l_psi[:, 1] - (dd * dd).sum(axis=1) * inv2
    psi = (psi + dpsi * _vertex(l_psi[:, 0], l_psi[:, 1], l_psi[:, 2])) % 360
    if d > 0:
        off = off + d * xp.stack([_vertex(l_t[:, 0], l0, l_t[:, 1]),
                                  _vertex(l_t[:, 2], l0, l_t[:, 3])], axis=1)
    return psi, off


_REFINE_SRC = r"""
__device__ __forceinline__ double vertex(double lm, double l0, double lp)
{
    const double den = lm - 2.0 * l0 + lp;
    if (!(den < 0.0)) return 0.0;
    return fmin(fmax(0.5 * (lm - lp) / den, -0.5), 0.5);
}

extern "C" __global__
void refine_pose(const double* l_psi, const double* l_t, const double* psi, const double* off,
                 const double* prior, const double* steps, double inv2, double dpsi,
                 double d, long long B, double* psi_out, double* off_out)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const double ddx = off[2 * b] - prior[2 * b], ddy = off[2 * b + 1] - prior[2 * b + 1];
    const double* lp = l_psi + 3 * b;
    double p = fmod(psi[b] + dpsi * vertex(lp[0], lp[1], lp[2]), 360.0);
    if (p < 0.0) p += 360.0;
    psi_out[b] = p;
    double ox = off[2 * b], oy = off[2 * b + 1];
    if (d > 0.0) {
        double lt[4];
        for (int j = 0; j < 4; ++j) {
            const double sx = ddx + steps[2 * j], sy = ddy + steps[2 * j + 1];
            lt[j] = l_t[4 * b + j] - (sx * sx + sy * sy) * inv2;
        }
        const double l0 = lp[1] - (ddx * ddx + ddy * ddy) * inv2;
        ox += d * vertex(lt[0], l0, lt[1]);
        oy += d * vertex(lt[2], l0, lt[3]);
    }
    off_out[2 * b] = ox;
    off_out[2 * b + 1] = oy;
}
"""


def refine_pose(l_psi, l_t, psi, off, prior, steps, inv2: float, dpsi: float, d: float):
    """Each particle's pose moved to the vertex of the parabolas through its neighbours.

    The log-posterior of the best class along each axis (psi; x; y) is fitted by a parabola
    through the best sample and its two neighbours, and the pose moves to its vertex (at
    most half a step; not at all where the three values are not concave). The offset
    prior of the best class is added to the translation neighbours' data terms here.

    Parameters
    ----------
    l_psi, l_t : float64 arrays of shape (B, 3) and (B, 4)
        :func:`pose_neighbours`' data terms (the best sample is ``l_psi[:, 1]``).
    psi : float64 array of shape (B,)
        The best sample's angle (deg).
    off : float64 array of shape (B, 2)
        The best sample's offset (x, y), pixels.
    prior : float64 array of shape (B, 2)
        The offset prior of each particle's best class.
    steps : float64 array of shape (4, 2)
        The translation neighbours' steps (x, y): -x, +x, -y, +y.
    inv2 : float
        ``1 / (2 sigma2_offset)``.
    dpsi, d : float
        The angular (deg) and translational (px) steps; ``d = 0``: offsets not refined.

    Returns
    -------
    psi : float64 array of shape (B,)
        In [0, 360).
    off : float64 array of shape (B, 2)
    """
    xp = array_module(l_psi)
    if xp is np:
        return refine_pose_reference(l_psi, l_t, psi, off, prior, steps, inv2, dpsi, d)
    B = int(psi.shape[0])
    psi_out, off_out = xp.empty(B, xp.float64), xp.empty((B, 2), xp.float64)
    if B:
        f64 = xp.float64
        nt = 256
        cuda_function(_REFINE_SRC, "refine_pose")(
            ((B + nt - 1) // nt,), (nt,),
            (*(xp.ascontiguousarray(v, dtype=f64) for v in (l_psi, l_t, psi, off, prior,
                                                            steps)),
             np.float64(inv2), np.float64(dpsi), np.float64(d), np.int64(B), psi_out,
             off_out))
    return psi_out, off_out
