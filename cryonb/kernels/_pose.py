"""Log-posteriors of a best sample's neighbours, for the pose refinement of the second pass.

:func:`pose_neighbours`: for each particle, the data terms of its best class at the best
sample's two in-plane neighbours (and the sample itself), and at four translation steps
around the best offset. As array expressions that is a loop over chunks of particles with
five gathers of whole reference rows and a dozen passes each; on the GPU it is one CUDA
block per particle that reads its image, CTF and three reference rows once and reduces ten
sums in double precision. On the CPU, the array expressions (the reference).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["pose_neighbours", "pose_neighbours_reference"]

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
                     double* l_psi, double* l_t)
{
    __shared__ double s[10][NT];
    const long long b = blockIdx.x;
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
    cuda_function(_CUDA_SRC, "pose_neighbours")(
        (B,), (256,),
        (xp.ascontiguousarray(X, dtype=c64), xp.ascontiguousarray(phases, dtype=c64),
         xp.ascontiguousarray(shift, dtype=i64), xp.ascontiguousarray(ctf, dtype=f32),
         xp.ascontiguousarray(inv, dtype=f32), xp.ascontiguousarray(refs, dtype=c64),
         xp.ascontiguousarray(refs_a2, dtype=f32), xp.ascontiguousarray(rows, dtype=i64),
         xp.ascontiguousarray(stencil, dtype=f32), np.int32(P), l_psi, l_t))
    return l_psi, l_t
