"""The coarse pass's log-posteriors from its matrix product, in one pass over the samples.

The coarse pass's product gives, per particle ``b``, translation ``t`` and (class, rotation)
``m = k R + r``, the cross term ``Re <X_bt, CTF A_m> / sigma2``. The log-posterior adds the
image and reference powers, the offset prior of the translation in class ``k``, the class
prior, and excludes every class but a particle's seed class where one is set (re-seeding).
As array expressions that is four passes over the (B, T, M) samples and a fifth for the
maximum over translations; here it is one CUDA thread per (particle, m) that walks the
translations, writes the log-posteriors in place and keeps their maximum. On the CPU, the same
in one Numba pass (row by row, the same float32 operations in the same order as the array
expressions, so the same values bit for bit).
"""

from __future__ import annotations

import functools

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["coarse_log_posterior", "coarse_log_posterior_reference"]


def coarse_log_posterior_reference(cross, x2, a2, prior, seed, R: int):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`coarse_log_posterior` (``cross`` is not modified).
    """
    xp = array_module(cross)
    B, T, M = cross.shape
    K = M // R
    lw = cross - 0.5 * (x2[:, None, None] + a2[:, None, :])
    lw = lw.reshape(B, T, K, R) + prior[..., None]
    restrict = (seed[:, None] >= 0) & (xp.arange(K)[None] != seed[:, None])
    lw = xp.where(restrict[:, None, :, None], -xp.inf, lw).reshape(B, T, M)
    return lw, lw.max(axis=1)


_CUDA_SRC = r"""
extern "C" __global__
void coarse_log_posterior(float* lw, const float* x2, const float* a2, const float* prior,
                          const long long* seed, int T, int M, int R, float* best_t)
{
    const int chunks = (M + blockDim.x - 1) / blockDim.x;
    const long long b = blockIdx.x / chunks;
    const int m = (blockIdx.x % chunks) * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const int K = M / R;
    const int k = m / R;
    const long long s = seed[b];
    const bool excluded = s >= 0 && s != k;
    const float base = x2[b] + a2[b * M + m];
    float* row = lw + b * (long long)T * M + m;
    const float* pr = prior + b * (long long)T * K + k;
    const float neg_inf = __int_as_float(0xff800000);  // NVRTC has no INFINITY
    float mx = neg_inf;
    // 8 translations' loads in flight before their in-place stores (memory-level
    // parallelism; the loads cannot move past stores to the same array by themselves)
    for (int t0 = 0; t0 < T; t0 += 8) {
        float c[8];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            c[u] = t0 + u < T ? row[(long long)(t0 + u) * M] : 0.0f;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int t = t0 + u;
            if (t >= T) break;
            const float v = excluded ? neg_inf : (c[u] - 0.5f * base) + pr[t * K];
            row[(long long)t * M] = v;
            mx = fmaxf(mx, v);
        }
    }
    best_t[b * M + m] = mx;
}
"""


def coarse_log_posterior(cross, x2, a2, prior, seed, R: int):
    """Log-posteriors of the coarse samples and their maxima over the translations.

    Parameters
    ----------
    cross : float32 array of shape (B, T, M)
        ``Re <X_bt, CTF A_m> / sigma2`` per particle, translation and (class, rotation)
        ``m = k R + r``. Overwritten with the result where it is a C-contiguous float32
        array (no copy).
    x2 : float32 array of shape (B,)
        ``sum |X|^2 / sigma2`` per particle.
    a2 : float32 array of shape (B, M)
        ``sum CTF^2 |A_m|^2 / sigma2`` per particle and (class, rotation).
    prior : float32 array of shape (B, T, K)
        Log prior of each translation in each class (offset prior plus log class prior);
        ``-inf`` where a class has no prior weight.
    seed : int array of shape (B,)
        A class each particle is restricted to, or -1 for none.
    R : int
        Rotations per class (``M = K R``).

    Returns
    -------
    lw : float32 array of shape (B, T, M)
        ``cross - (x2 + a2) / 2 + prior``, ``-inf`` in classes other than the seed.
    best_t : float32 array of shape (B, M)
        ``lw.max(axis=1)``.
    """
    xp = array_module(cross)
    B, T, M = cross.shape
    lw = xp.ascontiguousarray(cross, dtype=xp.float32)
    best_t = xp.empty((B, M), xp.float32)
    if B == 0 or M == 0:
        return lw, best_t
    f32 = xp.float32
    if xp is np:
        _coarse_cpu()(lw, np.ascontiguousarray(x2, dtype=f32), np.ascontiguousarray(a2, dtype=f32),
                      np.ascontiguousarray(prior, dtype=f32),
                      np.ascontiguousarray(seed, dtype=np.int64), R, best_t)
        return lw, best_t
    nt = 256
    cuda_function(_CUDA_SRC, "coarse_log_posterior")(
        (B * ((M + nt - 1) // nt),), (nt,),
        (lw, xp.ascontiguousarray(x2, dtype=f32), xp.ascontiguousarray(a2, dtype=f32),
         xp.ascontiguousarray(prior, dtype=f32), xp.ascontiguousarray(seed, dtype=xp.int64),
         np.int32(T), np.int32(M), np.int32(R), best_t))
    return lw, best_t


@functools.cache
def _coarse_cpu():
    """The CUDA kernel ``coarse_log_posterior`` as a Numba loop:
    ``kern(lw, x2, a2, prior, seed, R, best_t)`` overwrites ``lw`` (B, T, M) and fills
    ``best_t`` (B, M)."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def kern(lw, x2, a2, prior, seed, R, best_t):
        B, T, M = lw.shape
        half = np.float32(0.5)
        for b in range(B):
            s = seed[b]
            mx = best_t[b]
            mx[:] = -np.inf
            base = half * (x2[b] + a2[b])  # (M,), as the reference: 0.5 * (x2 + a2)
            for t in range(T):
                row = lw[b, t]
                pr = prior[b, t]
                for m in range(M):
                    k = m // R
                    if s >= 0 and s != k:
                        v = np.float32(-np.inf)
                    else:
                        v = (row[m] - base[m]) + pr[k]
                    row[m] = v
                    if v > mx[m]:
                        mx[m] = v

    return kern
