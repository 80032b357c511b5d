"""Significant samples: RELION's adaptive selection of the coarse pass's samples.

Per particle, the samples whose weights together hold ``fraction`` of the total weight, taking
the largest first (capped at ``maxsig`` samples), are significant: every sample whose weight is
at least the threshold, the weight of the last one taken. The plain way is a sort of every
particle's weights and a cumulative sum; at large K and fine psi sampling (10^5-10^6 samples
per particle) that sort was the largest part of the GPU E-step.

CPU: the sort (NumPy), cumulative sums in float64. GPU: a radix select, one CUDA block per
particle: three passes over the weights build histograms of the float bit pattern (11, 11 and
10 bits; positive floats order as their bit patterns), with the count and the weight sum of
each bin (weights as 2^-40 fixed point in 64-bit integers: exact, order-independent sums), and
walk them from the top until the fraction (or ``maxsig``) is reached; after the third pass the
threshold's 32 bits are known. No sort, no temporaries, deterministic. The two differ only
where rounding decides between two equal-looking cumulative sums (below 2^-40 of the total).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function
from ._segments import segment_argmax, segment_starts

__all__ = ["significant_in_segments", "significant_samples", "significant_samples_reference"]


def significant_samples_reference(lw, fraction: float, maxsig: int = -1):
    """Sort-based selection (the CPU path and the tests' reference; NumPy or CuPy arrays).

    Parameters and returns as :func:`significant_samples`.
    """
    xp = array_module(lw)
    w = xp.exp(lw - lw.max(axis=1, keepdims=True))
    srt = -xp.sort(-w, axis=1)
    cs = xp.cumsum(srt, axis=1, dtype=xp.float64)
    nsig = (cs < fraction * cs[:, -1:]).sum(axis=1) + 1
    if maxsig > 0:
        nsig = xp.minimum(nsig, maxsig)
    nsig = xp.minimum(nsig, srt.shape[1])
    thr = xp.take_along_axis(srt, (nsig - 1)[:, None], axis=1)
    return w >= thr


_CUDA_SRC = r"""
#define UNROLL 4
#define INFINITY_F __int_as_float(0x7f800000)
extern "C" __global__
void significant_select(const float* lw, const float* rowmax, const long long* starts,
                        double fraction, long long maxsig, bool* out)
{
    __shared__ unsigned int cnt[2048];
    __shared__ unsigned long long wsum[2048];
    __shared__ unsigned int s_prefix, s_mask;
    __shared__ unsigned long long s_above_w, s_above_c, s_target;
    const long long first = starts[blockIdx.x];
    const long long N = starts[blockIdx.x + 1] - first;
    const float* x = lw + first;
    const float m = rowmax[blockIdx.x];
    if (N <= 0) return;
    const float scale = 1099511627776.0f;  // 2^40
    if (threadIdx.x == 0) { s_prefix = 0u; s_mask = 0u; s_above_w = 0ull; s_above_c = 0ull; }
    for (int p = 0; p < 3; ++p) {
        const int shift = p == 0 ? 21 : (p == 1 ? 10 : 0);
        const int nb = p == 2 ? 1024 : 2048;
        for (int i = threadIdx.x; i < nb; i += blockDim.x) { cnt[i] = 0u; wsum[i] = 0ull; }
        __syncthreads();
        const unsigned int prefix = s_prefix, mask = s_mask;
        // UNROLL independent loads per thread in flight (memory-level parallelism)
        for (long long i0 = threadIdx.x; i0 < N; i0 += (long long)UNROLL * blockDim.x) {
            float v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long i = i0 + (long long)u * blockDim.x;
                v[u] = i < N ? x[i] : -INFINITY_F;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const float w = expf(v[u] - m);
                const unsigned int key = __float_as_uint(w);
                // weights that underflow to zero (most of them) add nothing to any bin that
                // the walk reads (it stops at bin 0): skip them instead of contending for it
                if (key == 0u || (key & mask) != prefix) continue;
                const unsigned int d = (key >> shift) & (unsigned int)(nb - 1);
                atomicAdd(&cnt[d], 1u);
                atomicAdd(&wsum[d], (unsigned long long)(w * scale));
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            if (p == 0) {
                unsigned long long tot = 0ull;
                for (int d = 0; d < nb; ++d) tot += wsum[d];
                s_target = (unsigned long long)ceil(fraction * (double)tot);
            }
            unsigned long long aw = s_above_w, ac = s_above_c;
            const unsigned long long target = s_target;
            int d = nb - 1;
            for (; d > 0; --d) {
                if (aw + wsum[d] >= target) break;
                if (maxsig > 0 && ac + cnt[d] >= (unsigned long long)maxsig) break;
                aw += wsum[d];
                ac += cnt[d];
            }
            s_prefix = prefix | ((unsigned int)d << shift);
            s_mask = mask | ((unsigned int)(nb - 1) << shift);
            s_above_w = aw;
            s_above_c = ac;
        }
        __syncthreads();
    }
    const unsigned int thr = s_prefix;
    bool* o = out + first;
    for (long long i0 = threadIdx.x; i0 < N; i0 += (long long)UNROLL * blockDim.x) {
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long i = i0 + (long long)u * blockDim.x;
            v[u] = i < N ? x[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long i = i0 + (long long)u * blockDim.x;
            if (i < N) o[i] = __float_as_uint(expf(v[u] - m)) >= thr;
        }
    }
}
"""


def significant_samples(lw, fraction: float, maxsig: int = -1, rowmax=None):
    """RELION's significant samples: the fewest largest weights holding ``fraction``.

    Parameters
    ----------
    lw : float array of shape (B, N)
        Log-weights of every sample of each particle (``-inf`` for excluded samples; each row
        needs a finite maximum).
    fraction : float
        ``adaptive_fraction``, in (0, 1].
    maxsig : int
        At most this many samples (ties at the threshold included); ``<= 0``: no cap.
    rowmax : float array of shape (B,), optional
        ``lw.max(axis=1)``, where the caller has it already (saves a pass over ``lw``).

    Returns
    -------
    bool array of shape (B, N)
        ``w >= threshold`` with ``w = exp(lw - max(lw))`` per row; the threshold is the weight
        of the sample at which the cumulative sum of the sorted weights (largest first) reaches
        ``fraction`` of the row's total (or the ``maxsig``-th largest weight, if smaller).
    """
    xp = array_module(lw)
    if xp is np:
        return significant_samples_reference(lw, fraction, maxsig)
    B, N = lw.shape
    out = xp.empty((B, N), dtype=xp.bool_)
    if B == 0 or N == 0:
        return out
    lw = xp.ascontiguousarray(lw, dtype=xp.float32)
    starts = xp.arange(B + 1, dtype=xp.int64) * N
    _select_gpu(lw, lw.max(axis=1) if rowmax is None else rowmax, starts, fraction, maxsig,
                out)
    return out


def significant_in_segments(lw, seg, n_seg: int, fraction: float, maxsig: int = -1,
                            seg_max=None, starts=None):
    """:func:`significant_samples` over variable-length segments (the second pass's samples).

    Parameters
    ----------
    lw : float array of shape (n,)
        Log-weights of the samples, grouped by particle: ``seg`` non-decreasing.
    seg : int array of shape (n,)
        The particle (segment id, ``0..n_seg-1``) of each sample.
    n_seg : int
    fraction, maxsig
        As :func:`significant_samples`.
    seg_max : array of shape (n_seg,), optional
        The maxima of ``lw`` per segment, where the caller has them already.
    starts : int64 array of shape (n_seg + 1,), optional
        The segments' boundaries (:func:`cryonb.kernels.segment_starts`), likewise.

    Returns
    -------
    bool array of shape (n,)
        Within each segment, ``w >= threshold`` as :func:`significant_samples` defines it.
    """
    xp = array_module(lw)
    n = int(lw.shape[0])
    if n == 0:
        return xp.zeros(0, dtype=bool)
    if starts is None:
        starts = segment_starts(seg, n_seg)
    if seg_max is None:
        seg_max = segment_argmax(lw, starts)[0]
    if xp is np:  # one sort for all segments: by segment, then by decreasing weight
        w = np.exp(lw - seg_max[seg])
        order = np.lexsort((-w, seg))
        ws, ss = w[order], seg[order]
        # weight sorted before each sample, counted from its own segment's start
        before = np.cumsum(ws, dtype=np.float64) - ws
        counts = np.diff(starts)
        before -= before[starts[:-1][counts > 0]].repeat(counts[counts > 0])
        tot = np.bincount(seg, weights=w.astype(np.float64), minlength=n_seg)
        take = before < fraction * tot[ss]
        if maxsig > 0:
            take &= (np.arange(n) - starts[ss]) < maxsig
        thr = np.full(n_seg, np.inf, w.dtype)
        np.minimum.at(thr, ss[take], ws[take])
        return w >= thr[seg]
    lw = xp.ascontiguousarray(lw, dtype=xp.float32)
    out = xp.zeros(n, dtype=xp.bool_)
    _select_gpu(lw, seg_max, starts, fraction, maxsig, out)
    return out


def _select_gpu(lw, rowmax, starts, fraction, maxsig, out) -> None:
    """Launch the radix select: one block per segment ``starts[i]:starts[i + 1]``."""
    import cupy

    n_seg = int(starts.shape[0]) - 1
    cuda_function(_CUDA_SRC, "significant_select")(
        (n_seg,), (1024,), (lw, cupy.ascontiguousarray(rowmax, dtype=cupy.float32),
                            cupy.ascontiguousarray(starts, dtype=cupy.int64),
                            np.float64(fraction), np.int64(maxsig), out))
