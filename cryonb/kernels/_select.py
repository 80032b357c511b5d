"""Significant samples: RELION's adaptive selection of the coarse pass's samples.

Per particle, the samples whose weights together hold ``fraction`` of the total weight, taking
the largest first (capped at ``maxsig`` samples), are significant: every sample whose weight is
at least the threshold, the weight of the last one taken. The plain way is a sort of every
particle's weights and a cumulative sum (:func:`significant_samples_reference`); at large K and
fine psi sampling (10^5-10^6 samples per particle) that sort was the largest part of the E-step.

Both paths use a radix select instead, one particle (segment) at a time: three passes over the
weights build histograms of the float bit pattern (11, 11 and 10 bits; positive floats order as
their bit patterns), with the count and the weight sum of each bin (weights as 2^-40 fixed
point in 64-bit integers: exact, order-independent sums), and walk them from the top until the
fraction (or ``maxsig``) is reached; after the third pass the threshold's 32 bits are known. No
sort, no temporaries, deterministic. Weights below 2^-40 add nothing to the sums and are
skipped (the walk never reaches their bins). GPU: one CUDA block per particle; the walk over a
histogram's 2048 bins is a block-wide prefix sum (one thread walking them alone held each
block for three serial loops of 2048 steps, which took longer than reading the weights at
10^4-10^5 samples per particle), and the third pass reads the samples of the first pass's
threshold bin from shared memory, where the second pass put them (up to 4096). CPU: a Numba
loop per segment (the weights from NumPy's ``exp``, as the reference's), whose last two
passes read only the first pass's threshold bin. The select and the sort differ only where
rounding decides between two equal-looking cumulative sums (below 2^-40 of the total).

:func:`significant_samples` returns the selection as a mask; :func:`significant_indices` as
each row's count and columns (on the GPU the select counts, a compaction kernel writes the
columns in order), which is what the E-step uses: 10^2-10^3 of 10^5-10^6 samples.

GPU, late iterations: the first pass also keeps (in shared memory, up to 4096) the positions of
the samples of weight 2^-24 and above, a few per particle once the classes are sharp. Where the
first pass's threshold bin lies above 2^-24 and they fitted, the two later passes read those
instead of the row, and where at most 64 samples are significant the select writes their
columns itself, so that the compaction copies them instead of reading the row once more: one
pass over the coarse pass's scores instead of three.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function
from ._host import to_host
from ._segments import segment_argmax, segment_starts

__all__ = ["significant_in_segments", "significant_indices", "significant_samples",
           "significant_samples_reference"]


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
#define NT 1024  // threads per block (the launch's)
#define CAND 4096  // candidates the third pass reads from shared memory
#define INFINITY_F __int_as_float(0x7f800000)
// weights below 2^-40 (bit pattern 87 << 23) add 0 to the fixed-point sums: the walk never
// reaches their bins (the sum reaches the target at a bin above), so they are skipped
#define TINY_KEY 0x2B800000u
// the first pass keeps the samples of weight 2^-24 and above (bit pattern 103 << 23) among
// its candidates: in a late iteration they are a few per particle, and where the threshold
// lies among them the other two passes read them instead of all the samples
#define SPEC_KEY 0x33800000u
// at most this many selected samples per row are passed from the select to the compaction
#define PRE_MAX 64

// Inclusive prefix sums over the block's threads (in thread order) of two 64-bit values;
// returns the block's totals in *tot_a, *tot_b (every thread). Uses warp_a/warp_b[NT / 32].
__device__ void block_scan2(unsigned long long* a, unsigned long long* b,
                            unsigned long long* tot_a, unsigned long long* tot_b,
                            unsigned long long* warp_a, unsigned long long* warp_b)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long x = *a, y = *b;
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long xo = __shfl_up_sync(0xffffffffu, x, o);
        const unsigned long long yo = __shfl_up_sync(0xffffffffu, y, o);
        if (lane >= o) { x += xo; y += yo; }
    }
    if (lane == 31) { warp_a[warp] = x; warp_b[warp] = y; }
    __syncthreads();
    if (warp == 0) {
        unsigned long long u = warp_a[lane], v = warp_b[lane];  // NT / 32 == 32 warps
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long uo = __shfl_up_sync(0xffffffffu, u, o);
            const unsigned long long vo = __shfl_up_sync(0xffffffffu, v, o);
            if (lane >= o) { u += uo; v += vo; }
        }
        warp_a[lane] = u;
        warp_b[lane] = v;
    }
    __syncthreads();
    if (warp > 0) { x += warp_a[warp - 1]; y += warp_b[warp - 1]; }
    *a = x;
    *b = y;
    *tot_a = warp_a[31];
    *tot_b = warp_b[31];
}

extern "C" __global__
void significant_select(const float* lw, const float* rowmax, const long long* starts,
                        double fraction, long long maxsig, bool* out, int write_mask,
                        unsigned int* thr_out, long long* count_out, int write_pre,
                        long long* pre, int* done)
{
    __shared__ unsigned int cnt[2048];
    __shared__ unsigned long long wsum[2048];
    __shared__ unsigned long long warp_w[NT / 32], warp_c[NT / 32];
    __shared__ unsigned int s_prefix, s_mask;
    __shared__ int s_bin;
    __shared__ unsigned long long s_above_w, s_above_c, s_count;
    // the second pass keeps the samples of the first pass's threshold bin (their positions in
    // the row) for the third, which then reads them instead of all samples again (when they
    // fit); their weights are read again from the row (a few, in the cache)
    __shared__ unsigned int cand[CAND];
    __shared__ int s_ncand;
    const long long first = starts[blockIdx.x];
    const long long N = starts[blockIdx.x + 1] - first;
    const float* x = lw + first;
    const float m = rowmax[blockIdx.x];
    if (N <= 0) return;
    const float scale = 1099511627776.0f;  // 2^40
    if (threadIdx.x == 0) { s_prefix = 0u; s_mask = 0u; s_above_w = 0ull; s_above_c = 0ull; }
    unsigned long long target = 0ull;
    // s_spec: whether the candidates hold every sample of the threshold bins still to be
    // read (then the passes after the first read them from shared memory)
    __shared__ int s_spec;
    for (int p = 0; p < 3; ++p) {
        const int shift = p == 0 ? 21 : (p == 1 ? 10 : 0);
        const int nb = p == 2 ? 1024 : 2048;
        for (int i = threadIdx.x; i < nb; i += NT) { cnt[i] = 0u; wsum[i] = 0ull; }
        if (threadIdx.x == 0) s_bin = 0;
        if (threadIdx.x == 0 && p == 0) { s_ncand = 0; s_spec = 0; }
        if (threadIdx.x == 0 && p == 1 && !s_spec) s_ncand = 0;
        __syncthreads();
        const unsigned int prefix = s_prefix, mask = s_mask;
        const int n_cand = s_ncand;
        if (p > 0 && (s_spec || (p == 2 && n_cand <= CAND))) {
            for (int j = threadIdx.x; j < n_cand; j += NT) {
                const unsigned int key = __float_as_uint(expf(x[cand[j]] - m));
                if ((key & mask) != prefix) continue;
                const unsigned int d = (key >> shift) & (unsigned int)(nb - 1);
                atomicAdd(&cnt[d], 1u);
                atomicAdd(&wsum[d], (unsigned long long)(__uint_as_float(key) * scale));
            }
        } else
        // UNROLL independent loads per thread in flight (memory-level parallelism); every
        // lane of a warp takes the same steps (the ballots below need the whole warp)
        for (long long i0 = 0; i0 < N; i0 += (long long)UNROLL * NT) {
            float v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long i = i0 + threadIdx.x + (long long)u * NT;
                v[u] = i < N ? x[i] : -INFINITY_F;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const float w = expf(v[u] - m);
                const unsigned int key = __float_as_uint(w);
                const bool in = key >= TINY_KEY && (key & mask) == prefix;
                if (in) {
                    const unsigned int d = (key >> shift) & (unsigned int)(nb - 1);
                    atomicAdd(&cnt[d], 1u);
                    atomicAdd(&wsum[d], (unsigned long long)(w * scale));
                }
                // the first pass keeps the samples above SPEC_KEY, the second those of the
                // first pass's threshold bin (one shared add per warp)
                const bool keep = i0 + threadIdx.x + (long long)u * NT < N
                                  && (p == 0 ? key >= SPEC_KEY : (p == 1 && in));
                const unsigned int ballot = __ballot_sync(0xffffffffu, keep);
                if (ballot) {
                    const int lane = threadIdx.x & 31;
                    int base = 0;
                    if (lane == 0) base = atomicAdd(&s_ncand, __popc(ballot));
                    base = __shfl_sync(0xffffffffu, base, 0);
                    const int c = base + __popc(ballot & ((1u << lane) - 1u));
                    if (keep && c < CAND)
                        cand[c] = (unsigned int)(i0 + threadIdx.x + (long long)u * NT);
                }
            }
        }
        __syncthreads();
        // The walk from the top bin down to the first bin d where the weight above it plus
        // its own reaches the target (or the count reaches maxsig); bin 0 if none. In
        // parallel: thread t holds the bins nb-1-t*per .. nb-per-t*per (top first), a block
        // scan gives the sums above each thread's bins, and the topmost bin found wins.
        const int per = nb / NT;
        unsigned long long tw = 0ull, tc = 0ull;
        for (int j = 0; j < per; ++j) {
            const int d = nb - 1 - (threadIdx.x * per + j);
            tw += wsum[d];
            tc += cnt[d];
        }
        unsigned long long iw = tw, ic = tc, tot_w, tot_c;
        block_scan2(&iw, &ic, &tot_w, &tot_c, warp_w, warp_c);
        if (p == 0) target = (unsigned long long)ceil(fraction * (double)tot_w);
        unsigned long long aw = s_above_w + (iw - tw), ac = s_above_c + (ic - tc);
        int found = -1;
        for (int j = 0; j < per; ++j) {
            const int d = nb - 1 - (threadIdx.x * per + j);
            if (d == 0 || aw + wsum[d] >= target
                || (maxsig > 0 && ac + cnt[d] >= (unsigned long long)maxsig)) {
                found = d;
                break;
            }
            aw += wsum[d];
            ac += cnt[d];
        }
        if (found > 0) atomicMax(&s_bin, found);
        __syncthreads();
        if (found >= 0 && found == s_bin) {  // one thread: the winning bin's
            s_prefix = prefix | ((unsigned int)found << shift);
            s_mask = mask | ((unsigned int)(nb - 1) << shift);
            s_above_w = aw;
            s_above_c = ac;
            s_count = ac + cnt[found];  // after the last pass: the samples >= the threshold
            // the first pass's candidates hold the threshold bin when it lies above
            // SPEC_KEY and they all fitted
            if (p == 0) s_spec = s_ncand <= CAND && ((unsigned int)found << shift) >= SPEC_KEY;
        }
        __syncthreads();
    }
    const unsigned int thr = s_prefix;
    if (threadIdx.x == 0) {
        thr_out[blockIdx.x] = thr;
        count_out[blockIdx.x] = (long long)s_count;
    }
    if (write_pre) {
        // where the candidates hold every selected sample and they are few, their positions
        // in ascending order (each one's rank among them) for significant_compact, which
        // then copies them instead of reading the row again
        __shared__ unsigned int sel[PRE_MAX];
        __shared__ int s_nsel;
        const bool fits = s_spec && s_count <= PRE_MAX;
        if (threadIdx.x == 0) s_nsel = 0;
        __syncthreads();
        if (fits) {
            const int n_cand = s_ncand;
            for (int j = threadIdx.x; j < n_cand; j += NT) {
                if (__float_as_uint(expf(x[cand[j]] - m)) < thr) continue;
                const int c = atomicAdd(&s_nsel, 1);
                if (c < PRE_MAX) sel[c] = cand[j];
            }
        }
        __syncthreads();
        const int n_sel = s_nsel;
        const bool ok = fits && (long long)n_sel == (long long)s_count;
        if (ok && threadIdx.x < n_sel) {
            const unsigned int me = sel[threadIdx.x];
            int rank = 0;
            for (int j = 0; j < n_sel; ++j) rank += sel[j] < me;
            pre[blockIdx.x * (long long)PRE_MAX + rank] = (long long)me;
        }
        if (threadIdx.x == 0) done[blockIdx.x] = ok;
    }
    if (!write_mask) return;
    bool* o = out + first;
    for (long long i0 = threadIdx.x; i0 < N; i0 += (long long)UNROLL * NT) {
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long i = i0 + (long long)u * NT;
            v[u] = i < N ? x[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long i = i0 + (long long)u * NT;
            if (i < N) o[i] = __float_as_uint(expf(v[u] - m)) >= thr;
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT, 2)
significant_compact(const float* lw, const float* rowmax, const long long* starts,
                         const unsigned int* thr, const long long* offsets, long long* idx,
                         const long long* pre, const int* done)
{
    // the indices (within the row) of the samples at or above the row's threshold, in
    // order: tiles of NT samples, a warp ballot and the warps' counts give each selected
    // sample its place; tiles with none (most of them) cost one barrier
    __shared__ int warp_n[NT / 32];
    const long long first = starts[blockIdx.x];
    const long long N = starts[blockIdx.x + 1] - first;
    const float* x = lw + first;
    const float m = rowmax[blockIdx.x];
    const unsigned int t = thr[blockIdx.x];
    long long* o = idx + offsets[blockIdx.x];
    if (done[blockIdx.x]) {  // the select found the row's samples among its candidates
        const long long n_sel = offsets[blockIdx.x + 1] - offsets[blockIdx.x];
        for (long long j = threadIdx.x; j < n_sel; j += NT)
            o[j] = pre[blockIdx.x * (long long)PRE_MAX + j];
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long base = 0;
    for (long long i0 = 0; i0 < N; i0 += NT) {
        const long long i = i0 + threadIdx.x;
        const bool f = i < N && __float_as_uint(expf(x[i] - m)) >= t;
        if (!__syncthreads_or(f)) continue;
        const unsigned int ballot = __ballot_sync(0xffffffffu, f);
        if (lane == 0) warp_n[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < NT / 32; ++w) {
            const int c = warp_n[w];
            before += w < warp ? c : 0;
            total += c;
        }
        if (f) o[base + before + __popc(ballot & ((1u << lane) - 1u))] = i;
        base += total;
        __syncthreads();  // warp_n is rewritten by the next tile
    }
}
"""


#: the CUDA source's PRE_MAX
_PRE_MAX = 64


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
    B, N = lw.shape
    out = xp.empty((B, N), dtype=xp.bool_)
    if B == 0 or N == 0:
        return out
    lw = xp.ascontiguousarray(lw, dtype=xp.float32)
    starts = xp.arange(B + 1, dtype=xp.int64) * N
    rowmax = lw.max(axis=1) if rowmax is None else rowmax
    if xp is np:
        w = np.exp(lw - np.asarray(rowmax, np.float32)[:, None])
        _select_cpu()(w.reshape(-1), starts, float(fraction), int(maxsig), out.reshape(-1))
        return out
    _select_gpu(lw, rowmax, starts, fraction, maxsig, out)
    return out


def significant_indices(lw, fraction: float, maxsig: int = -1, rowmax=None,
                        host_counts: bool = False, before_wait=None):
    """:func:`significant_samples` as indices: each row's significant columns, in order.

    At large K and fine psi sampling a particle has 10^5-10^6 coarse samples of which
    10^2-10^3 are significant; the E-step needs their positions, not a mask. On the GPU the
    select kernel counts each row's significant samples and a second kernel writes their
    columns (no mask and no scan over the whole mask).

    Parameters
    ----------
    lw, fraction, maxsig, rowmax
        As :func:`significant_samples`.
    host_counts : bool
        Also return the counts as a NumPy array (on the GPU the one copy to the host that
        sizes ``idx``: the caller needs no second one).
    before_wait : callable, optional
        Called (without arguments) after the selection is queued and before the host waits
        for its counts: on the GPU the device runs what it queues while the host waits, and
        the host finds that work still queued when it goes on (instead of an idle device
        waiting for the host's next launches). Called once on either backend.

    Returns
    -------
    counts : int64 array of shape (B,)
        Significant samples per row (at least 1 in a row with samples).
    idx : int64 array of shape (counts.sum(),)
        Their columns, row after row, ascending within a row: the columns of
        ``significant_samples(lw, ...)`` row by row (``nonzero`` of the mask).
    counts_host : int64 ndarray of shape (B,)
        With ``host_counts``: ``counts`` on the host.
    """
    xp = array_module(lw)
    B, N = lw.shape
    if B == 0 or N == 0:
        if before_wait is not None:
            before_wait()
        out = xp.zeros(B, xp.int64), xp.zeros(0, xp.int64)
        return (*out, np.zeros(B, np.int64)) if host_counts else out
    if xp is np:
        rows, idx = np.nonzero(significant_samples(lw, fraction, maxsig, rowmax))
        counts = np.bincount(rows, minlength=B).astype(np.int64)
        if before_wait is not None:
            before_wait()
        return (counts, idx.astype(np.int64), counts) if host_counts else (
            counts, idx.astype(np.int64))
    lw = xp.ascontiguousarray(lw, dtype=xp.float32)
    starts = xp.arange(B + 1, dtype=xp.int64) * N
    rowmax = xp.ascontiguousarray(lw.max(axis=1) if rowmax is None else rowmax,
                                  dtype=xp.float32)
    pre = xp.empty((B, _PRE_MAX), xp.int64)
    done = xp.zeros(B, xp.int32)
    thr, counts = _select_gpu(lw, rowmax, starts, fraction, maxsig, pre=(pre, done))
    offsets = xp.zeros(B + 1, xp.int64)
    xp.cumsum(counts, out=offsets[1:])
    on_host = to_host(counts, before_wait)
    idx = xp.empty(int(on_host.sum()), xp.int64)
    cuda_function(_CUDA_SRC, "significant_compact")(
        (B,), (1024,), (lw, rowmax, starts, thr, offsets, idx, pre, done))
    return (counts, idx, on_host) if host_counts else (counts, idx)


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
    if xp is np:
        w = np.exp(np.asarray(lw, np.float32) - np.asarray(seg_max, np.float32)[seg])
        out = np.zeros(n, dtype=bool)
        _select_cpu()(w, np.ascontiguousarray(starts, np.int64), float(fraction), int(maxsig),
                      out)
        return out
    lw = xp.ascontiguousarray(lw, dtype=xp.float32)
    out = xp.zeros(n, dtype=xp.bool_)
    _select_gpu(lw, seg_max, starts, fraction, maxsig, out)
    return out


@functools.cache
def _select_cpu():
    """The radix select of the CUDA kernel above as a Numba loop over the segments:
    ``kern(w, starts, fraction, maxsig, out)`` with the weights ``w`` (n,) float32 (each
    segment's maximum is 1), ``starts`` (n_seg + 1,) int64, ``out`` (n,) bool."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def kern(w, starts, fraction, maxsig, out):
        bits = w.view(np.uint32)
        cnt = np.zeros(2048, np.int64)
        wsum = np.zeros(2048, np.int64)  # 2^-40 fixed point: < 2^63 below 2^23 samples
        scale = 1099511627776.0  # 2^40
        tiny = np.int64(0x2B800000)  # the bit pattern of 2^-40
        longest = 0
        for s in range(starts.shape[0] - 1):
            longest = max(longest, starts[s + 1] - starts[s])
        # the first pass's threshold bin, copied: the next two passes read only these
        cand = np.empty(longest, np.uint32)
        cand_w = cand.view(np.float32)
        for s in range(starts.shape[0] - 1):
            a, b = starts[s], starts[s + 1]
            if b <= a:
                continue
            prefix, mask = 0, 0  # of the threshold's bit pattern, as found so far
            above_w, above_c, target = 0, 0, 0
            n_cand = 0
            for p in range(3):
                shift = 21 if p == 0 else (10 if p == 1 else 0)
                nb = 1024 if p == 2 else 2048
                cnt[:nb] = 0
                wsum[:nb] = 0
                if p == 0:
                    for i in range(a, b):
                        key = np.int64(bits[i])
                        # weights below 2^-40 add 0 to the sums: the walk never reaches
                        # their bins (the CUDA kernel's TINY_KEY)
                        if key < tiny:
                            continue
                        d = key >> shift
                        cnt[d] += 1
                        wsum[d] += np.int64(w[i] * scale)
                    target = np.int64(math.ceil(fraction * float(wsum[:nb].sum())))
                else:
                    for j in range(n_cand):
                        key = np.int64(cand[j])
                        if (key & mask) != prefix:
                            continue
                        d = (key >> shift) & (nb - 1)
                        cnt[d] += 1
                        wsum[d] += np.int64(cand_w[j] * scale)
                d = nb - 1
                while d > 0:
                    if above_w + wsum[d] >= target:
                        break
                    if maxsig > 0 and above_c + cnt[d] >= maxsig:
                        break
                    above_w += wsum[d]
                    above_c += cnt[d]
                    d -= 1
                prefix |= d << shift
                mask |= (nb - 1) << shift
                if p == 0:
                    for i in range(a, b):
                        key = np.int64(bits[i])
                        if key >= tiny and (key >> shift) == d:
                            cand[n_cand] = bits[i]
                            n_cand += 1
            for i in range(a, b):
                out[i] = np.int64(bits[i]) >= prefix

    return kern


def _select_gpu(lw, rowmax, starts, fraction, maxsig, out=None, pre=None):
    """Launch the radix select: one block per segment ``starts[i]:starts[i + 1]``.

    Fills the mask ``out`` (bool, like ``lw``) unless it is None; returns each segment's
    threshold (the bit pattern of its smallest significant weight) and count. With ``pre``,
    a pair of arrays (int64 (n_seg, _PRE_MAX), int32 (n_seg,)): for the segments whose
    significant samples the select found among its first pass's candidates (at most
    ``_PRE_MAX``), their positions in ascending order and a flag."""
    import cupy

    n_seg = int(starts.shape[0]) - 1
    thr = cupy.empty(n_seg, cupy.uint32)
    count = cupy.empty(n_seg, cupy.int64)
    pre_idx, done = pre if pre is not None else (cupy.empty(1, cupy.int64),
                                                 cupy.empty(1, cupy.int32))
    cuda_function(_CUDA_SRC, "significant_select")(
        (n_seg,), (1024,), (lw, cupy.ascontiguousarray(rowmax, dtype=cupy.float32),
                            cupy.ascontiguousarray(starts, dtype=cupy.int64),
                            np.float64(fraction), np.int64(maxsig),
                            cupy.empty(1, cupy.bool_) if out is None else out,
                            np.int32(out is not None), thr, count, np.int32(pre is not None),
                            pre_idx, done))
    return thr, count
