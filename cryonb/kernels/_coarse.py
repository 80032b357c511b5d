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

__all__ = ["coarse_log_posterior", "coarse_log_posterior_reference", "coarse_significance"]


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
                          const long long* seed, int T, int M, int R, float* best_t,
                          int write)
{
    // write == 0: only the maxima (the significance kernels compute the values again where
    // they read the cross terms, so the (B, T, M) log-posteriors are never written)
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
            if (write) row[(long long)t * M] = v;
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
    B, _, M = cross.shape
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
    _coarse_gpu(lw, x2, a2, prior, seed, R, best_t, True)
    return lw, best_t


def _coarse_gpu(cross, x2, a2, prior, seed, R: int, best_t, write: bool) -> None:
    """Launch the CUDA kernel: ``best_t`` (B, M) filled, ``cross`` (B, T, M) float32
    overwritten with the log-posteriors if ``write``."""
    import cupy as xp

    B, T, M = cross.shape
    f32 = xp.float32
    nt = 256
    cuda_function(_CUDA_SRC, "coarse_log_posterior")(
        (B * ((M + nt - 1) // nt),), (nt,),
        (cross, xp.ascontiguousarray(x2, dtype=f32), xp.ascontiguousarray(a2, dtype=f32),
         xp.ascontiguousarray(prior, dtype=f32), xp.ascontiguousarray(seed, dtype=xp.int64),
         np.int32(T), np.int32(M), np.int32(R), best_t, np.int32(write)))


def coarse_significance(cross, x2, a2, prior, seed, R: int, fraction: float, maxsig: int = -1):
    """The coarse pass's significant samples and best log-posteriors, from its cross terms.

    :func:`coarse_log_posterior` followed by :func:`cryonb.kernels.significant_indices` with
    its maxima. On the GPU the log-posteriors are not written: the first kernel keeps only
    their maxima over the translations, and the significance kernels compute each value again
    where they read its cross term (the same operations, so the same values and the same
    selection; at 128 px, K=200, psi 10 the log-posteriors are 2.4 GB per pool of 4000,
    written once and read three times).

    Parameters
    ----------
    cross, x2, a2, prior, seed, R
        As :func:`coarse_log_posterior` (``cross`` (B, T, M) may be overwritten).
    fraction, maxsig
        As :func:`cryonb.kernels.significant_samples`.

    Returns
    -------
    counts : int64 array of shape (B,)
        Significant samples per particle.
    idx : int64 array of shape (counts.sum(),)
        Their columns ``t M + m``, particle after particle, ascending within a particle.
    best_t : float32 array of shape (B, M)
        The log-posteriors' maxima over the translations.
    """
    from ._select import significant_indices

    xp = array_module(cross)
    B, _, M = cross.shape
    if xp is np or B == 0 or M == 0:
        lw, best_t = coarse_log_posterior(cross, x2, a2, prior, seed, R)
        counts, idx = significant_indices(lw.reshape(B, -1), fraction, maxsig,
                                          rowmax=best_t.max(axis=1) if B and M else None)
        return counts, idx, best_t
    cross = xp.ascontiguousarray(cross, dtype=xp.float32)
    best_t = xp.empty((B, M), xp.float32)
    _coarse_gpu(cross, x2, a2, prior, seed, R, best_t, False)
    counts, idx = significant_indices(cross.reshape(B, -1), fraction, maxsig,
                                      rowmax=best_t.max(axis=1),
                                      terms=(x2, a2, prior, seed, R))
    return counts, idx, best_t


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
