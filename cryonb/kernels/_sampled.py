"""Sampled products: dot products and scatter-adds of selected row pairs.

The E-step's second pass evaluates only the (particle x translation, rotation) samples that the
first pass found significant: a sparse subset of a matrix product ("sampled dense-dense matrix
multiplication"), and it accumulates weighted rows into the back-projection sums. Neither is
an array expression without large temporaries, so each is a Numba kernel (CPU, parallel over
samples or output rows, no write conflicts) and, on the GPU, a CuPy ``RawKernel`` (a warp per
sample) for the products and, for the scatter-adds, a block per chunk of samples with the
same target row where rows get many samples, double-precision atomic adds where they get few
(one per run of consecutive samples with the same target row; cuSPARSE products remain as
the benchmarks' alternative), with a plain NumPy reference for the tests. The second pass's
samples come in blocks, a coarse sample's sub-translations against its sub-rotations: its
products (:func:`sampled_dot_blocks`, a warp reading each row once for all the block's
products) and the noise model's per-particle residual terms (:func:`residual_sums_blocks`,
one pass over each particle's blocks: a thread per particle on the CPU, a CUDA block per
particle on the GPU, the same bits on both).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function
from ._prepare import shifted_images_ri
from ._segments import segment_starts

__all__ = [
    "ShiftedBlocks",
    "block_order",
    "block_samples",
    "residual_sums_blocks",
    "residual_sums_reference",
    "sampled_dot",
    "sampled_dot_blocks",
    "sampled_dot_reference",
    "scatter_blocks",
    "scatter_blocks_residual",
    "scatter_products",
    "scatter_products_reference",
    "scatter_shifted_residual",
    "shifted_blocks",
    "shifted_dot_blocks",
]


# ----------------------------------------------------------------------------- references
def sampled_dot_reference(U, V, iu, iv):
    """``out[s] = sum_d U[iu[s], d] * V[iv[s], d]`` (NumPy, for tests)."""
    return np.einsum("sd,sd->s", np.asarray(U, np.float64)[iu], np.asarray(V, np.float64)[iv])


def scatter_products_reference(acc, U, V, iu, iv, iacc, w):
    """``acc[iacc[s]] += w[s] * U[iu[s]] * (V[iv[s]] if V is not None else 1)`` (NumPy)."""
    rows = np.asarray(U, np.float64)[iu] * np.asarray(w, np.float64)[:, None]
    if V is not None:
        rows = rows * np.asarray(V, np.float64)[iv]
    np.add.at(acc, iacc, rows)


def residual_sums_reference(X, A, ix, ia, starts, w):
    """Per-segment residual sums of single samples (NumPy, float64, for tests): ``X[ix]``
    and ``A[ia]`` per sample, segment ``g`` the samples ``starts[g]:starts[g + 1]``; returns
    as :func:`residual_sums_blocks`."""
    P = X.shape[1] // 2
    X, A, w = np.asarray(X, np.float64), np.asarray(A, np.float64), np.asarray(w, np.float64)
    x, a = X[ix], A[ia]
    cross = w[:, None] * (x[:, :P] * a[:, :P] + x[:, P:] * a[:, P:])
    power = w[:, None] * (a[:, :P] ** 2 + a[:, P:] ** 2)
    seg = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    q = np.zeros((len(starts) - 1, P))
    a2 = np.zeros((len(starts) - 1, P))
    np.add.at(q, seg, cross)
    np.add.at(a2, seg, power)
    return q, a2


# ----------------------------------------------------------------------------- CPU (Numba)
_numba = {}


def _numba_kernels():
    if not _numba:
        import numba

        @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
        def dot(U, V, iu, iv, out):
            D = U.shape[1]
            for s in numba.prange(iu.shape[0]):
                a = U[iu[s]]
                b = V[iv[s]]
                acc = np.float32(0.0)
                for d in range(D):
                    acc += a[d] * b[d]
                out[s] = acc

        @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
        def scatter(acc, U, V, iu, iv, rows, starts, order, w, use_v):
            # samples grouped by target row, one thread per row: no write conflicts, and
            # each row summed in sample order (deterministic)
            D = U.shape[1]
            for g in numba.prange(rows.shape[0]):
                tgt = acc[rows[g]]
                for j in range(starts[g], starts[g + 1]):
                    s = order[j]
                    ws = np.float64(w[s])
                    a = U[iu[s]]
                    if use_v:
                        b = V[iv[s]]
                        for d in range(D):
                            tgt[d] += ws * (a[d] * b[d])
                    else:
                        for d in range(D):
                            tgt[d] += ws * a[d]

        @numba.njit(parallel=True, cache=True, nogil=True)
        def residual_blocks(X, A, iu, iv, ts, ps, starts, w, q, a2):
            # the CUDA kernel residual_sums_blocks: one thread per segment; per pixel the same
            # float32 and float64 operations in the same order, without fused multiply-adds
            # (no fastmath). The loops over pixels are innermost (each pixel has its own
            # sums, so they vectorise without reordering any pixel's operations); terms of
            # weight 0 are skipped (adding them changes no bit: a sum is never -0)
            P = q.shape[1]
            for g in numba.prange(starts.shape[0] - 1):
                qg = q[g]
                ag = a2[g]
                qg[:] = 0.0
                ag[:] = 0.0
                bq = np.empty(P, np.float32)
                ba = np.empty(P, np.float32)
                for c in range(starts[g], starts[g + 1]):
                    bq[:] = 0.0
                    ba[:] = 0.0
                    for k in range(ps):
                        a = A[iv[c] * ps + k]
                        wk = np.float32(0.0)
                        for t in range(ts):
                            ws = w[c, k, t]
                            wk = wk + ws
                            if ws != 0:
                                x = X[iu[c] * ts + t]
                                for p in range(P):
                                    bq[p] = bq[p] + ws * (x[p] * a[p] + x[P + p] * a[P + p])
                        for p in range(P):
                            ba[p] = ba[p] + wk * (a[p] * a[p] + a[P + p] * a[P + p])
                    for p in range(P):
                        qg[p] += np.float64(bq[p])
                        ag[p] += np.float64(ba[p])

        _numba["residual_blocks"] = residual_blocks
        _numba["dot"] = dot
        _numba["scatter"] = scatter
    return _numba


# ----------------------------------------------------------------------------- GPU (CuPy)
#: GPU: consecutive samples per block of the atomic adds (``scatter_products``), whose runs
#: with the same target row are summed before their atomic add (a run is cut where a block
#: ends); at most the block's 128 threads (each loads one sample's indices)
SP_CHUNK = 32

_CUDA_SRC = r"""
#define RS_UNROLL 8
#define SP_CHUNK @SP_CHUNK@  // samples per block of scatter_products
extern "C" __global__
void sampled_dot(const float* U, const float* V, const long long* iu, const long long* iv,
                 float* out, long long n, int D)
{
    long long s = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x & 31;
    if (s >= n) return;
    const float* a = U + iu[s] * (long long)D;
    const float* b = V + iv[s] * (long long)D;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += a[d] * b[d];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffff, acc, o);
    if (lane == 0) out[s] = acc;
}

extern "C" __global__
void scatter_products(double* acc, const float* U, const float* V, const long long* iu,
                      const long long* iv, const long long* iacc, const float* w,
                      long long n, int D, int use_v)
{
    // one block per chunk of SP_CHUNK consecutive samples. A run of consecutive samples with
    // the same target row is summed in registers (float64, in sample order) and added to the
    // row with one atomic add per value. The E-step's second pass orders its samples so
    // that one sub-rotation's sub-translations are consecutive: runs of up to 4 (2.6 samples
    // on average at 128 px, K=50, so 2.6x fewer atomic adds)
    __shared__ long long s_row[SP_CHUNK], s_u[SP_CHUNK], s_v[SP_CHUNK];
    __shared__ float s_w[SP_CHUNK];
    const long long c0 = blockIdx.x * (long long)SP_CHUNK;
    const int cnt = (int)((n - c0 < SP_CHUNK) ? (n - c0) : SP_CHUNK);
    if (threadIdx.x < cnt) {
        const long long s = c0 + threadIdx.x;
        s_row[threadIdx.x] = iacc[s];
        s_u[threadIdx.x] = iu[s];
        s_v[threadIdx.x] = use_v ? iv[s] : 0;
        s_w[threadIdx.x] = w[s];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        double sum = 0.0;
        long long cur = s_row[0];
        for (int j0 = 0; j0 < cnt; j0 += RS_UNROLL) {
            const int m = (cnt - j0 < RS_UNROLL) ? cnt - j0 : RS_UNROLL;
            float v[RS_UNROLL];
#pragma unroll
            for (int u = 0; u < RS_UNROLL; ++u) {  // the group's loads first, then the adds
                if (u < m) {
                    v[u] = U[s_u[j0 + u] * (long long)D + d];
                    if (use_v) v[u] *= V[s_v[j0 + u] * (long long)D + d];
                }
            }
#pragma unroll
            for (int u = 0; u < RS_UNROLL; ++u) {
                if (u < m) {
                    const long long r = s_row[j0 + u];
                    if (r != cur) {  // the same for every thread of the block
                        atomicAdd(acc + cur * (long long)D + d, sum);
                        sum = 0.0;
                        cur = r;
                    }
                    sum += (double)s_w[j0 + u] * (double)v[u];
                }
            }
        }
        atomicAdd(acc + cur * (long long)D + d, sum);
    }
}

extern "C" __global__
void scatter_rows(double* acc, const float* U, const float* V, const long long* iu,
                  const long long* iv, const float* w, const long long* chunk_start,
                  const long long* chunk_row, int D, int use_v, int whole)
{
    // one block per chunk of samples with the same target row (sorted by row, in sample
    // order within a row): summed in registers in that order, then added to the row once.
    // whole: every row is one chunk (a plain add: deterministic); else rows split into
    // several chunks add theirs atomically (order-independent to ~1e-16 relative)
    const long long c = blockIdx.x;
    const long long c0 = chunk_start[c], c1 = chunk_start[c + 1];
    double* t = acc + chunk_row[c] * (long long)D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        double sum = 0.0;
        for (long long j = c0; j < c1; j += RS_UNROLL) {
            const int n = (c1 - j < RS_UNROLL) ? (int)(c1 - j) : RS_UNROLL;
            float v[RS_UNROLL], ws[RS_UNROLL];
#pragma unroll
            for (int u = 0; u < RS_UNROLL; ++u) {
                if (u < n) {
                    v[u] = U[iu[j + u] * (long long)D + d];
                    if (use_v) v[u] *= V[iv[j + u] * (long long)D + d];
                    ws[u] = w[j + u];
                }
            }
#pragma unroll
            for (int u = 0; u < RS_UNROLL; ++u)
                if (u < n) sum = __dadd_rn(sum, __dmul_rn((double)ws[u], (double)v[u]));
        }
        if (whole) t[d] += sum;
        else atomicAdd(t + d, sum);
    }
}

extern "C" __global__
void block_samples(const long long* cum, const long long* flat, long long n, long long B,
                   long long T, long long M, long long* ob, long long* ot, long long* orow)
{
    // sample i: its particle b (the first with cum[b] > i), its translation and row, and its
    // place: b's first plus the number of b's samples with a smaller (row, translation)
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long lo = 0, hi = B - 1;
    while (lo < hi) {
        const long long mid = (lo + hi) / 2;
        if (cum[mid] > i) hi = mid;
        else lo = mid + 1;
    }
    const long long s = lo ? cum[lo - 1] : 0, e = cum[lo];
    const long long t = flat[i] / M, r = flat[i] - t * M, key = r * T + t;
    long long rank = 0;
    for (long long j = s; j < e; ++j) {
        const long long tj = flat[j] / M;
        rank += (flat[j] - tj * M) * T + tj < key;
    }
    ob[s + rank] = lo;
    ot[s + rank] = t;
    orow[s + rank] = r;
}
""".replace("@SP_CHUNK@", str(SP_CHUNK))


_BLOCKS_SRC = r"""
__device__ __forceinline__ void store_block_sums(float (&acc)[PS][TS], long long c, int lane,
                                                 float* out)
{
    // a warp's partial sums of block c's PS x TS products, summed over the warp (the same
    // order for every product), to out[(c * PS + q) * TS + t]
#pragma unroll
    for (int q = 0; q < PS; ++q)
#pragma unroll
        for (int t = 0; t < TS; ++t) {
            float v = acc[q][t];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
            if (lane == 0) out[(c * PS + q) * TS + t] = v;
        }
}

extern "C" __global__
void sampled_dot_blocks(const float* U, const float* V, const long long* iu,
                        const long long* iv, float* out, long long n, int D)
{
    // a warp per block of samples: rows iu[c] * TS + t of U against rows iv[c] * PS + q of
    // V, for the TS x PS pairs (t, q). Each loaded value serves PS (or TS) products; every
    // product is summed as sampled_dot sums it (the same operations in the same order:
    // the same bits), out[(c * PS + q) * TS + t]
    const long long c = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (c >= n) return;
    const float* a = U + iu[c] * (long long)TS * D;
    const float* b = V + iv[c] * (long long)PS * D;
    float acc[PS][TS];
#pragma unroll
    for (int q = 0; q < PS; ++q)
#pragma unroll
        for (int t = 0; t < TS; ++t) acc[q][t] = 0.f;
    for (int d = lane; d < D; d += 32) {
        float av[TS], bv[PS];
#pragma unroll
        for (int t = 0; t < TS; ++t) av[t] = a[t * (long long)D + d];
#pragma unroll
        for (int q = 0; q < PS; ++q) bv[q] = b[q * (long long)D + d];
#pragma unroll
        for (int q = 0; q < PS; ++q)
#pragma unroll
            for (int t = 0; t < TS; ++t) acc[q][t] += av[t] * bv[q];
    }
    store_block_sums(acc, c, lane, out);
}

extern "C" __global__
void residual_sums_blocks(const float* X, const float* A, const long long* iu,
                          const long long* iv, const long long* starts, const float* w, int P,
                          double* q, double* a2)
{
    // block c pairs rows iu[c] * TS + t of X with rows iv[c] * PS + k of A, weights
    // w[(c * PS + k) * TS + t]. One CUDA block per segment (particle: blocks starts[g] to
    // starts[g + 1]), a thread per pixel; a block's TS + PS rows are read once for its
    // TS x PS samples (the next block's requested before this one is summed). Each block's
    // terms are summed in float32 in (k, t) order, its sum then added in float64. Rounded
    // operations (__f*_rn, __d*_rn: no fused multiply-adds) and a fixed order: the CPU twin
    // gives the same bits.
    const long long g = blockIdx.x;
    const long long c0 = starts[g], c1 = starts[g + 1];
    const long long D = 2LL * P;
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        double sq = 0.0, sa = 0.0;
        float xr[TS], xi[TS], ar[PS], ai[PS];
        float nxr[TS], nxi[TS], nar[PS], nai[PS];
        if (c0 < c1) {
            const float* x = X + iu[c0] * TS * D;
            const float* a = A + iv[c0] * PS * D;
#pragma unroll
            for (int t = 0; t < TS; ++t) { xr[t] = x[t * D + p]; xi[t] = x[t * D + P + p]; }
#pragma unroll
            for (int k = 0; k < PS; ++k) { ar[k] = a[k * D + p]; ai[k] = a[k * D + P + p]; }
        }
        for (long long c = c0; c < c1; ++c) {
            if (c + 1 < c1) {  // the next block's rows, in flight while this one is summed
                const float* x = X + iu[c + 1] * TS * D;
                const float* a = A + iv[c + 1] * PS * D;
#pragma unroll
                for (int t = 0; t < TS; ++t) { nxr[t] = x[t * D + p]; nxi[t] = x[t * D + P + p]; }
#pragma unroll
                for (int k = 0; k < PS; ++k) { nar[k] = a[k * D + p]; nai[k] = a[k * D + P + p]; }
            }
            const float* wc = w + c * (PS * TS);  // the same for every thread of the block
            float bq = 0.f, ba = 0.f;
#pragma unroll
            for (int k = 0; k < PS; ++k) {
                float wk = 0.f;
#pragma unroll
                for (int t = 0; t < TS; ++t) {
                    const float ws = wc[k * TS + t];
                    bq = __fadd_rn(bq, __fmul_rn(ws, __fadd_rn(__fmul_rn(xr[t], ar[k]),
                                                               __fmul_rn(xi[t], ai[k]))));
                    wk = __fadd_rn(wk, ws);
                }
                ba = __fadd_rn(ba, __fmul_rn(wk, __fadd_rn(__fmul_rn(ar[k], ar[k]),
                                                           __fmul_rn(ai[k], ai[k]))));
            }
            sq = __dadd_rn(sq, (double)bq);
            sa = __dadd_rn(sa, (double)ba);
#pragma unroll
            for (int t = 0; t < TS; ++t) { xr[t] = nxr[t]; xi[t] = nxi[t]; }
#pragma unroll
            for (int k = 0; k < PS; ++k) { ar[k] = nar[k]; ai[k] = nai[k]; }
        }
        q[g * (long long)P + p] = sq;
        a2[g * (long long)P + p] = sa;
    }
}

__device__ __forceinline__ int load_chunk(long long n, const float* w, const long long* i0,
                                           const long long* i1, const long long* i2,
                                           long long* s0, long long* s1, long long* s2,
                                           float* s_w, float* s_ws, int* s_nz)
{
    // the scatter kernels' prologue: this CUDA block's SB_CHUNK blocks of samples (fewer at
    // the end) into shared memory, their weights, three index arrays (i2 may be null: zeros)
    // and per (block, k) whether any of its TS weights is non-zero and their float32 sum;
    // returns the number of blocks
    const long long c0 = blockIdx.x * (long long)SB_CHUNK;
    const int cnt = (int)((n - c0 < SB_CHUNK) ? (n - c0) : SB_CHUNK);
    for (int i = threadIdx.x; i < cnt * PS * TS; i += blockDim.x)
        s_w[i] = w[c0 * PS * TS + i];
    if (threadIdx.x < cnt) {
        s0[threadIdx.x] = i0[c0 + threadIdx.x];
        s1[threadIdx.x] = i1[c0 + threadIdx.x];
        s2[threadIdx.x] = i2 ? i2[c0 + threadIdx.x] : 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < cnt * PS; i += blockDim.x) {
        int nz = 0;
        float ws = 0.f;
#pragma unroll
        for (int t = 0; t < TS; ++t) {
            nz |= (s_w[i * TS + t] != 0.f);
            ws = __fadd_rn(ws, s_w[i * TS + t]);
        }
        s_nz[i] = nz;
        s_ws[i] = ws;
    }
    __syncthreads();
    return cnt;
}

extern "C" __global__
void scatter_blocks(double* acc, const float* U, const long long* iu, const long long* iv,
                    const float* w, long long n, int D, int urows,
                    int resid, const float* A, const long long* ib, double* qd, double* rd,
                    double* accw, const float* C)
{
    // acc[iv[c] * PS + k] += sum_t w[(c * PS + k) * TS + t] * U[row t of block c], rows
    // iu[c] * TS + t (urows = TS) or iu[c] for every t (urows = 1). A CUDA block takes
    // SB_CHUNK consecutive blocks, a thread per value: each block's rows are read once for
    // its TS x PS samples. A block's TS terms of one k are summed in float32 (in t order),
    // and a run of consecutive blocks with the same target rows (iv) sums these in float64
    // registers before one atomic add per value and k (the E-step orders its blocks by
    // target row on the GPU: see block_order). A (block, k) whose weights are all zero adds
    // nothing.
    // With resid: also the residual's terms per segment ib[c] (non-decreasing) and pixel
    // (d mod D / 2): qd[ib * (D / 2) + d mod (D / 2)] += sum w U[d] A[d] and likewise
    // rd += sum w A[d]^2, A's rows
    // iv[c] * PS + k: each run's sums times its reference rows, read once per run; and the
    // weights' sums accw[(iv[c] * PS + k) * (D / 2) + d] += sum w C[ib * (D / 2) + d] for
    // d < D / 2 (a segment's one row C).
    __shared__ long long s_u[SB_CHUNK], s_v[SB_CHUNK], s_b[SB_CHUNK];
    __shared__ float s_w[SB_CHUNK * PS * TS];
    __shared__ float s_ws[SB_CHUNK * PS];
    __shared__ int s_nz[SB_CHUNK * PS];
    const int cnt = load_chunk(n, w, iu, iv, resid ? ib : nullptr, s_u, s_v, s_b, s_w, s_ws,
                               s_nz);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        double sum[PS], wsum[PS];
        bool any[PS];
        double q = 0.0, r = 0.0;
#pragma unroll
        for (int k = 0; k < PS; ++k) { sum[k] = 0.0; wsum[k] = 0.0; any[k] = false; }
        for (int j = 0; j < cnt; ++j) {
            float u[TS];
            const float* a = U + s_u[j] * (long long)urows * D + d;
#pragma unroll
            for (int t = 0; t < TS; ++t) u[t] = (urows == 1) ? ((t == 0) ? a[0] : u[0])
                                                              : a[t * (long long)D];
            const float* wj = s_w + j * PS * TS;
#pragma unroll
            for (int k = 0; k < PS; ++k) {
                if (s_nz[j * PS + k]) {  // the same for every thread
                    float part = 0.f;
#pragma unroll
                    for (int t = 0; t < TS; ++t)
                        part = __fadd_rn(part, __fmul_rn(wj[k * TS + t], u[t]));
                    sum[k] += (double)part;
                    wsum[k] += (double)s_ws[j * PS + k];
                    any[k] = true;
                }
            }
            if (j + 1 == cnt || s_v[j + 1] != s_v[j] || s_b[j + 1] != s_b[j]) {
                // the run ends: add its sums (and its residual terms to its segment's)
#pragma unroll
                for (int k = 0; k < PS; ++k) {
                    if (any[k]) {
                        const long long row = s_v[j] * PS + k;
                        atomicAdd(acc + row * (long long)D + d, sum[k]);
                        if (resid) {
                            const double av = (double)A[row * (long long)D + d];
                            q += sum[k] * av;
                            r += wsum[k] * av * av;
                            if (d < D / 2)
                                atomicAdd(accw + row * (long long)(D / 2) + d,
                                          wsum[k] * (double)C[s_b[j] * (long long)(D / 2) + d]);
                        }
                    }
                    sum[k] = 0.0;
                    wsum[k] = 0.0;
                    any[k] = false;
                }
                if (resid && (j + 1 == cnt || s_b[j + 1] != s_b[j])) {
                    // a pixel's real and imaginary columns add into one value
                    const long long at = s_b[j] * (long long)(D / 2) + (d < D / 2 ? d : d - D / 2);
                    atomicAdd(qd + at, q);
                    atomicAdd(rd + at, r);
                    q = 0.0;
                    r = 0.0;
                }
            }
        }
    }
}

extern "C" __global__
void sampled_dot_shifted(const float2* X, const float2* ph, const float* W,
                         const long long* ib, const long long* it, const float* V,
                         const long long* iv, float* out, long long n, int P)
{
    // sampled_dot_blocks with the image rows made on the fly: block c's row t is
    // [Re | Im](X[ib[c]] ph[it[c] * TS + t]) W[ib[c]] (as shifted_ri writes it), against rows
    // iv[c] * PS + q of V ([Re | Im], 2P values). A warp per block, a lane per Fourier pixel:
    // the image's pixel and weight are read once for the TS translations, whose phases (a
    // table of a few MB) stay in the L2 cache. out[(c * PS + q) * TS + t]
    const long long c = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (c >= n) return;
    const float2* x = X + ib[c] * (long long)P;
    const float* wr = W + ib[c] * (long long)P;
    const float2* e = ph + it[c] * (long long)TS * P;
    const float* b = V + iv[c] * (long long)PS * 2 * P;
    float acc[PS][TS];
#pragma unroll
    for (int q = 0; q < PS; ++q)
#pragma unroll
        for (int t = 0; t < TS; ++t) acc[q][t] = 0.f;
    for (int p = lane; p < P; p += 32) {
        const float2 xv = x[p];
        const float wv = wr[p];
        float br[PS], bi[PS];
#pragma unroll
        for (int q = 0; q < PS; ++q) {
            br[q] = b[q * 2LL * P + p];
            bi[q] = b[q * 2LL * P + P + p];
        }
#pragma unroll
        for (int t = 0; t < TS; ++t) {
            const float2 ev = e[t * (long long)P + p];
            const float yr = (xv.x * ev.x - xv.y * ev.y) * wv;
            const float yi = (xv.x * ev.y + xv.y * ev.x) * wv;
#pragma unroll
            for (int q = 0; q < PS; ++q) acc[q][t] += yr * br[q] + yi * bi[q];
        }
    }
    store_block_sums(acc, c, lane, out);
}

extern "C" __global__
void scatter_shifted(double* acc, const float2* X, const float2* ph, const float* W,
                     const long long* ib, const long long* it, const long long* iv,
                     const float* w, long long n, int P, const float* A, double* qd,
                     double* rd, double* accw, const float* C)
{
    // scatter_blocks with the residual's terms (resid) and the image rows made on the fly as
    // in sampled_dot_shifted: a CUDA block takes SB_CHUNK consecutive blocks, a thread per
    // Fourier pixel (its real and imaginary columns together). A run of blocks with one
    // particle reads that particle's pixel and weight once; a run with one target row (iv)
    // and particle sums its data and weights in float64 registers before one atomic add
    // per value. acc, A: rows of 2P ([Re | Im]); accw: rows of P; C: a row of P per
    // particle; qd, rd: a row of P per particle, written (not added to) where all of the
    // particle's blocks are in this chunk (scatter_rows_init zeroed the others' rows).
    __shared__ long long s_b[SB_CHUNK], s_t[SB_CHUNK], s_v[SB_CHUNK];
    __shared__ float s_w[SB_CHUNK * PS * TS];
    __shared__ float s_ws[SB_CHUNK * PS];
    __shared__ int s_nz[SB_CHUNK * PS];
    const int cnt = load_chunk(n, w, ib, it, iv, s_b, s_t, s_v, s_w, s_ws, s_nz);
    const long long D = 2LL * P;
    // the chunk's first and last particles may have blocks in the chunks beside it
    const long long c0 = blockIdx.x * (long long)SB_CHUNK;
    const bool head_shared = c0 > 0 && ib[c0 - 1] == s_b[0];
    const bool tail_shared = c0 + cnt < n && ib[c0 + cnt] == s_b[cnt - 1];
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        double sr[PS], si[PS], wsum[PS];
        bool any[PS];
        double q = 0.0, r = 0.0;
        long long cur_b = -1;
        float2 xv = make_float2(0.f, 0.f);
        float wv = 0.f;
#pragma unroll
        for (int k = 0; k < PS; ++k) { sr[k] = 0.0; si[k] = 0.0; wsum[k] = 0.0; any[k] = false; }
        for (int j = 0; j < cnt; ++j) {
            if (s_b[j] != cur_b) {  // the same for every thread
                cur_b = s_b[j];
                xv = X[cur_b * P + p];
                wv = W[cur_b * P + p];
            }
            float ur[TS], ui[TS];
            const float2* e = ph + s_t[j] * (long long)TS * P + p;
#pragma unroll
            for (int t = 0; t < TS; ++t) {
                const float2 ev = e[t * (long long)P];
                ur[t] = (xv.x * ev.x - xv.y * ev.y) * wv;
                ui[t] = (xv.x * ev.y + xv.y * ev.x) * wv;
            }
            const float* wj = s_w + j * PS * TS;
#pragma unroll
            for (int k = 0; k < PS; ++k) {
                if (s_nz[j * PS + k]) {
                    float pr = 0.f, pi = 0.f;
#pragma unroll
                    for (int t = 0; t < TS; ++t) {
                        pr = __fadd_rn(pr, __fmul_rn(wj[k * TS + t], ur[t]));
                        pi = __fadd_rn(pi, __fmul_rn(wj[k * TS + t], ui[t]));
                    }
                    sr[k] += (double)pr;
                    si[k] += (double)pi;
                    wsum[k] += (double)s_ws[j * PS + k];
                    any[k] = true;
                }
            }
            if (j + 1 == cnt || s_v[j + 1] != s_v[j] || s_b[j + 1] != s_b[j]) {
#pragma unroll
                for (int k = 0; k < PS; ++k) {
                    if (any[k]) {
                        const long long row = s_v[j] * PS + k;
                        atomicAdd(acc + row * D + p, sr[k]);
                        atomicAdd(acc + row * D + P + p, si[k]);
                        const double ar = (double)A[row * D + p];
                        const double ai = (double)A[row * D + P + p];
                        q += sr[k] * ar + si[k] * ai;
                        r += wsum[k] * (ar * ar + ai * ai);
                        atomicAdd(accw + row * (long long)P + p,
                                  wsum[k] * (double)C[cur_b * P + p]);
                    }
                    sr[k] = 0.0;
                    si[k] = 0.0;
                    wsum[k] = 0.0;
                    any[k] = false;
                }
                if (j + 1 == cnt || s_b[j + 1] != s_b[j]) {
                    if ((cur_b == s_b[0] && head_shared)
                        || (cur_b == s_b[cnt - 1] && tail_shared)) {
                        atomicAdd(qd + cur_b * P + p, q);
                        atomicAdd(rd + cur_b * P + p, r);
                    } else {  // the particle's only chunk
                        qd[cur_b * P + p] = q;
                        rd[cur_b * P + p] = r;
                    }
                    q = 0.0;
                    r = 0.0;
                }
            }
        }
    }
}

extern "C" __global__
void scatter_rows_init(double* qd, double* rd, const long long* starts, int P)
{
    // scatter_shifted's rows of particle blockIdx.x set to zero where that kernel adds to
    // them (the particle's blocks in two or more chunks) or never writes them (none)
    const long long b = blockIdx.x, s0 = starts[b], s1 = starts[b + 1];
    if (s0 != s1 && s0 / SB_CHUNK == (s1 - 1) / SB_CHUNK) return;
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        qd[b * P + p] = 0.0;
        rd[b * P + p] = 0.0;
    }
}
"""

#: GPU: blocks of samples per CUDA block of :func:`scatter_blocks`
SB_CHUNK = 32

#: the largest ``ts * ps`` of :func:`sampled_dot_blocks` on the GPU (registers per thread)
BLOCK_MAX = 16


def _blocks_kernel(ts: int, ps: int, name: str = "sampled_dot_blocks"):
    return cuda_function(f"#define TS {ts}\n#define PS {ps}\n#define SB_CHUNK {SB_CHUNK}\n"
                         + _BLOCKS_SRC, name)


def _cuda_kernel(name):
    return cuda_function(_CUDA_SRC, name)


def _scatter_sparse(acc, U, V, iu, iv, iacc, w) -> bool:
    """GPU: the scatter-add as sparse x dense matrix products (cuSPARSE, float64).

    ``V is None``: ``acc += S @ U`` with ``S[iacc[s], iu[s]] = w[s]``. With ``V``, when every
    sample of a row of ``U`` goes to the same target row (``iacc = g[iu]``, as in the
    E-step: a shifted image belongs to one particle): ``Z = S' @ V`` with ``S'[iu[s], iv[s]]
    = w[s]`` over the rows of ``U`` in use, then ``acc[g[u]] += U[u] * Z[u]``, again as a
    sparse product. Returns False (nothing done) when ``iacc`` is not a function of ``iu``.
    """
    import cupy
    import cupyx.scipy.sparse as sp

    i32 = cupy.int32
    w64 = cupy.asarray(w, cupy.float64)
    iu, iacc = cupy.asarray(iu), cupy.asarray(iacc)
    if V is None:
        S = sp.coo_matrix((w64, (iacc.astype(i32), iu.astype(i32))),
                          shape=(acc.shape[0], U.shape[0])).tocsr()
        acc += S @ U.astype(cupy.float64)
        return True
    used, row = cupy.unique(iu, return_inverse=True)  # rows of U in use, sample -> row
    g = cupy.empty(used.shape[0], iacc.dtype)
    g[row] = iacc
    if not bool((g[row] == iacc).all()):
        return False
    S = sp.coo_matrix((w64, (row.astype(i32), cupy.asarray(iv).astype(i32))),
                      shape=(used.shape[0], V.shape[0])).tocsr()
    rows = (S @ V.astype(cupy.float64)) * U[used].astype(cupy.float64)
    G = sp.coo_matrix((cupy.ones(used.shape[0], cupy.float64),
                       (g.astype(i32), cupy.arange(used.shape[0], dtype=i32))),
                      shape=(acc.shape[0], used.shape[0])).tocsr()
    acc += G @ rows
    return True


#: GPU scatter-adds: None (default) chooses per call (``ROWS_FROM``); "rows", "sparse" or
#: "atomic" force one method (benchmarks/class2d_gpu.py times the E-step each way)
SUMS_METHOD: str | None = None
#: GPU: samples per block of :func:`_scatter_rows` (a row with more is split into chunks that
#: add their sums atomically)
ROW_CHUNK = 4096
#: GPU: samples grouped by row when a call has at least this many samples per accumulator
#: row, atomic adds below. Measured on an H100 (benchmarks/RESULTS.md): at 64 px (390-6,300
#: samples per row) grouping was 2.6x faster than cuSPARSE's products, which the atomic adds
#: were slower than; at 128 px (2-78 per row) sorting the samples made it 1.5-3.5x slower
#: than the atomic adds
ROWS_FROM = 200
_METHODS = ("rows", "sparse", "atomic")


def _scatter_method(n: int, rows: int, method: str | None = None) -> str:
    """The GPU scatter-add's method for ``n`` samples into ``rows`` rows."""
    method = SUMS_METHOD or method
    if method is None:
        return "rows" if n >= ROWS_FROM * rows else "atomic"
    if method not in _METHODS:
        raise ValueError(f"unknown scatter-add method {method!r}; use one of {_METHODS}")
    return method


def _scatter_rows(acc, U, V, iu, iv, iacc, w) -> None:
    """GPU: the scatter-add with the samples grouped by target row.

    The samples are sorted by target row (stable: in sample order within a row) and cut into
    chunks of at most ``ROW_CHUNK``; one block per chunk sums its samples in float64 in that
    order and adds the sum to the row. Each sample reads its row of ``U`` (and ``V``) once and
    no row is written more than once per chunk. Measured on an H200 (64 px, K=200, one pool of
    82 million samples into 24,000 rows of 1,800 values): cuSPARSE's float64 product took
    0.99 s, its float32 product 0.90 s (the random rows of ``U`` each nonzero reads), this
    kernel's kind of loop 0.23 s (the per-sample residual sums of then, the same reads).
    """
    import cupy

    n = int(iu.shape[0])
    iacc = cupy.asarray(iacc, cupy.int64)
    order = cupy.argsort(iacc)  # CuPy's sort is stable
    key = iacc[order]
    brk = cupy.flatnonzero(key[1:] != key[:-1]) + 1
    rs = cupy.concatenate([cupy.zeros(1, brk.dtype), brk])  # each row's first sample
    re = cupy.concatenate([brk, cupy.full(1, n, brk.dtype)])
    nch = (re - rs + ROW_CHUNK - 1) // ROW_CHUNK  # chunks per row
    cid = cupy.cumsum(nch)
    total = int(cid[-1])
    ci = cupy.arange(total)
    roc = cupy.searchsorted(cid, ci, side="right")  # each chunk's row run
    starts = cupy.concatenate([rs[roc] + (ci - (cid - nch)[roc]) * ROW_CHUNK,
                               cupy.full(1, n, brk.dtype)])
    iu_s = cupy.ascontiguousarray(cupy.asarray(iu, cupy.int64)[order])
    iv_s = iu_s if V is None else cupy.ascontiguousarray(cupy.asarray(iv, cupy.int64)[order])
    _cuda_kernel("scatter_rows")(
        (total,), (128,),
        (acc, U, U if V is None else V, iu_s, iv_s,
         cupy.ascontiguousarray(cupy.asarray(w, cupy.float32)[order]), starts,
         cupy.ascontiguousarray(key[rs][roc]), np.int32(U.shape[1]), np.int32(V is not None),
         np.int32(total == rs.shape[0])))


# ----------------------------------------------------------------------------- public
def sampled_dot(U, V, iu, iv):
    """Dot products of selected row pairs.

    Parameters
    ----------
    U : float32 array of shape (n_u, D)
    V : float32 array of shape (n_v, D)
    iu, iv : int arrays of shape (n,)
        Row of ``U`` and row of ``V`` of each sample.

    Returns
    -------
    float32 array of shape (n,)
        ``out[s] = sum_d U[iu[s], d] * V[iv[s], d]``.

    Notes
    -----
    Complex products ``Re(sum a conj(b))`` are real dot products of ``[Re | Im]`` rows.
    """
    xp = array_module(U, V)
    n = int(iu.shape[0])
    out = xp.empty(n, xp.float32)
    if n == 0:
        return out
    U = xp.ascontiguousarray(U, dtype=xp.float32)
    V = xp.ascontiguousarray(V, dtype=xp.float32)
    if xp is np:
        _numba_kernels()["dot"](U, V, np.asarray(iu, np.int64), np.asarray(iv, np.int64), out)
        return out
    D = U.shape[1]
    threads = 256
    blocks = (n * 32 + threads - 1) // threads
    _cuda_kernel("sampled_dot")((blocks,), (threads,),
                                (U, V, xp.asarray(iu, xp.int64), xp.asarray(iv, xp.int64), out,
                                 np.int64(n), np.int32(D)))
    return out


def sampled_dot_blocks(U, V, iu, iv, ts: int, ps: int):
    """Dot products of blocks of consecutive rows: ``ts`` rows of ``U`` against ``ps`` rows
    of ``V`` per block.

    The E-step's second pass scores each significant coarse sample's ``ts`` sub-translations
    (consecutive rows of its shifted images) against its ``ps`` sub-rotations (consecutive
    reference rows). On the GPU a warp computes a block's ``ts x ps`` products from one read
    of its ``ts + ps`` rows, where :func:`sampled_dot` reads two rows per product.

    Parameters
    ----------
    U : float32 array of shape (n_u * ts, D)
    V : float32 array of shape (n_v * ps, D)
    iu, iv : int arrays of shape (n,)
        Each block's rows: ``U[iu * ts + t]`` for ``t < ts`` and ``V[iv * ps + q]`` for
        ``q < ps``.
    ts, ps : int
        Rows of ``U`` and of ``V`` per block.

    Returns
    -------
    float32 array of shape (n, ps, ts)
        ``out[c, q, t] = sum_d U[iu[c] * ts + t, d] * V[iv[c] * ps + q, d]``: the same values,
        bit for bit, as :func:`sampled_dot` of the expanded row indices (on the GPU the same
        summation order; on the CPU it is that function).
    """
    xp = array_module(U, V)
    ts, ps = int(ts), int(ps)
    if ts < 1 or ps < 1:
        raise ValueError(f"blocks need at least one row of each array (ts={ts}, ps={ps})")
    iu = xp.asarray(iu, xp.int64)
    iv = xp.asarray(iv, xp.int64)
    n = int(iu.shape[0])
    if xp is np or ts * ps > BLOCK_MAX:
        rows_u = (iu[:, None, None] * ts + xp.arange(ts)[None, None, :])
        rows_v = (iv[:, None, None] * ps + xp.arange(ps)[None, :, None])
        shape = (n, ps, ts)
        return sampled_dot(U, V, xp.broadcast_to(rows_u, shape).reshape(-1),
                           xp.broadcast_to(rows_v, shape).reshape(-1)).reshape(shape)
    out = xp.empty((n, ps, ts), xp.float32)
    if n == 0:
        return out
    U = xp.ascontiguousarray(U, dtype=xp.float32)
    V = xp.ascontiguousarray(V, dtype=xp.float32)
    threads = 256
    blocks = (n * 32 + threads - 1) // threads
    _blocks_kernel(ts, ps)((blocks,), (threads,),
                           (U, V, iu, iv, out, np.int64(n), np.int32(U.shape[1])))
    return out


def _stable_order(keys, n_keys: int):
    """``np.argsort(keys, kind="stable")`` for integer keys in ``[0, n_keys)``, as radix
    passes over 16-bit digits (NumPy sorts 16-bit integers by radix: 3 million keys in 0.04 s,
    against 0.54 s for the stable sort of int64 keys)."""
    keys = np.asarray(keys, np.int64)
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while (n_keys - 1) >> shift:  # the next digit, stable: ties keep the previous order
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


def scatter_products(acc, U, V, iu, iv, iacc, w, method: str | None = None) -> None:
    """Add weighted rows (or row products) into an accumulator, in place.

    Parameters
    ----------
    acc : float64 array of shape (M, D)
    U : float32 array of shape (n_u, D)
    V : float32 array of shape (n_v, D), or None
    iu, iv : int arrays of shape (n,)
        Rows of ``U`` / ``V`` (``iv`` ignored without ``V``).
    iacc : int array of shape (n,)
        Target row of each sample.
    w : array of shape (n,)
        Weights.
    method : {None, "rows", "sparse", "atomic"}
        GPU: samples grouped by target row (:func:`_scatter_rows`), sparse x dense products
        where they apply (:func:`_scatter_sparse`; else atomic adds) or atomic adds. Default:
        grouped with at least ``ROWS_FROM`` samples per row of ``acc``, else atomic adds.
        ``SUMS_METHOD`` overrides it when set.

    Notes
    -----
    ``acc[iacc[s]] += w[s] * U[iu[s]] * V[iv[s]]``. CPU: samples are grouped by target row and
    each row is summed by one thread in sample order (deterministic). GPU, with many samples
    per row the same grouping: a block per chunk of at most ``ROW_CHUNK`` samples of one row,
    summed in float64 in sample order (deterministic where no row is split; split rows add
    their chunks atomically, order-independent to ~1e-16 relative); at 64 px, K=200 (a pool's
    82 million samples into 24,000 rows) it replaced cuSPARSE's float64 products, which took
    0.99 s. With few samples per row, double-precision atomic adds (order-independent to
    ~1e-16 relative), faster there than sorting the samples (benchmarks/RESULTS.md); a block
    takes ``SP_CHUNK`` consecutive samples and sums each run of them with the same target row
    before its atomic add, so samples ordered with equal target rows next to each other (as
    the E-step's second pass orders them) need fewer atomic adds.
    """
    xp = array_module(acc)
    n = int(iu.shape[0])
    if n == 0:
        return
    if acc.dtype != xp.float64 or not acc.flags.c_contiguous:
        raise ValueError("acc must be a C-contiguous float64 array")
    U = xp.ascontiguousarray(U, dtype=xp.float32)
    Vc = U if V is None else xp.ascontiguousarray(V, dtype=xp.float32)
    if xp is np:
        iacc = np.asarray(iacc, np.int64)
        order = _stable_order(iacc, acc.shape[0])
        sorted_t = iacc[order]
        starts = np.flatnonzero(np.r_[True, sorted_t[1:] != sorted_t[:-1], True])
        rows = sorted_t[starts[:-1]]
        _numba_kernels()["scatter"](acc, U, Vc, np.asarray(iu, np.int64),
                                    np.asarray(iv if V is not None else iu, np.int64), rows,
                                    starts, order, np.asarray(w, np.float32), V is not None)
        return
    D = U.shape[1]
    how = _scatter_method(n, acc.shape[0], method)
    if how == "rows":
        _scatter_rows(acc, U, None if V is None else Vc, iu, iv, iacc, w)
        return
    if how == "sparse" and _scatter_sparse(acc, U, Vc if V is not None else None, iu, iv,
                                           iacc, w):
        return
    threads = 128
    if SP_CHUNK > threads:
        raise ValueError(f"SP_CHUNK ({SP_CHUNK}) must be at most {threads}")
    _cuda_kernel("scatter_products")(
        ((n + SP_CHUNK - 1) // SP_CHUNK,), (threads,),
        (acc, U, Vc, xp.ascontiguousarray(iu, xp.int64),
         xp.ascontiguousarray(iv if V is not None else iu, xp.int64),
         xp.ascontiguousarray(iacc, xp.int64), xp.ascontiguousarray(w, xp.float32),
         np.int64(n), np.int32(D), np.int32(V is not None)))


def residual_sums_blocks(X, A, iu, iv, ts: int, ps: int, starts, w):
    """Per-particle sums of the residual's sample terms (the noise model's cross term and
    reference power), over blocks of samples as :func:`sampled_dot_blocks` forms them.

    Parameters
    ----------
    X : float32 array of shape (n_x * ts, 2P)
        Shifted images as ``[Re | Im]`` rows.
    A : float32 array of shape (n_a * ps, 2P)
        References as ``[Re | Im]`` rows.
    iu, iv : int arrays of shape (n,)
        Each block's rows: ``X[iu * ts + t]`` for ``t < ts``, ``A[iv * ps + q]`` for ``q < ps``.
    ts, ps : int
        Rows of ``X`` and of ``A`` per block.
    starts : int array of shape (G + 1,)
        Segment ``g`` holds the blocks ``starts[g]:starts[g + 1]``
        (:func:`cryonb.kernels.segment_starts`); empty segments give rows of zeros.
    w : float32 array of shape (n, ps, ts)
        Each sample's weight.

    Returns
    -------
    q : float64 array of shape (G, P)
        ``sum_s w_s Re(X[row_s] conj(A[row_s]))`` per pixel over the segment's samples.
    a2 : float64 array of shape (G, P)
        ``sum_s w_s |A[row_s]|^2`` per pixel.

    Notes
    -----
    A block's ``ts x ps`` terms are summed in float32 in (``q``, ``t``) order (relative error
    ~1e-7 of the block's sum), the blocks' sums in float64 in block order, with rounded
    operations only (no fused multiply-adds): the CPU (Numba, a thread per segment) and the
    GPU (a CUDA block per segment, a thread per pixel, each block's ``ts + ps`` rows read
    once for its ``ts x ps`` samples) give the same bits.
    """
    xp = array_module(X, A)
    ts, ps, iu, iv, w = _block_args(xp, ts, ps, iu, iv, w)
    G = int(starts.shape[0]) - 1
    P = int(X.shape[1]) // 2
    if A.shape[1] != 2 * P:
        raise ValueError(f"X has rows of {X.shape[1]} values and A of {A.shape[1]}; both need "
                         "2P ([Re | Im])")
    q = xp.empty((G, P), xp.float64)
    a2 = xp.empty((G, P), xp.float64)
    if G == 0:
        return q, a2
    X = xp.ascontiguousarray(X, dtype=xp.float32)
    A = xp.ascontiguousarray(A, dtype=xp.float32)
    starts = xp.ascontiguousarray(starts, dtype=xp.int64)
    if xp is np:
        _numba_kernels()["residual_blocks"](X, A, iu, iv, ts, ps, starts, w, q, a2)
        return q, a2
    _blocks_kernel(ts, ps, "residual_sums_blocks")(
        (G,), (_threads_per_pixel_pass(P),), (X, A, iu, iv, starts, w, np.int32(P), q, a2))
    return q, a2


def scatter_blocks_residual(acc, U, A, acc_w, C, iu, iv, ib, ts: int, ps: int, w, G: int):
    """The second pass's sums over blocks of samples in one go: the data and weights' sums
    (:func:`scatter_blocks`) and the residual's per-segment terms with ``U``'s rows as the
    images (:func:`residual_sums_blocks`).

    Parameters
    ----------
    acc : float64 array of shape (M, 2P)
        Data sums, added to in place: ``acc[iv * ps + q] += sum_t w[c, q, t] U[iu * ts + t]``.
    U : float32 array of shape (n_u * ts, 2P)
        Rows as ``[Re | Im]``.
    A : float32 array of shape (M, 2P)
        References as ``[Re | Im]`` rows, in the rows of ``acc``.
    acc_w : float64 array of shape (M, P)
        Weights' sums, added to in place: ``acc_w[iv * ps + q] += sum_t w[c, q, t] C[ib]``.
    C : float32 array of shape (G, P)
        One row per segment.
    iu, iv, ib : int arrays of shape (n,)
        Each block's rows of ``U`` and ``A`` / ``acc`` (as :func:`scatter_blocks`), and its
        segment (non-decreasing, ``< G``).
    ts, ps : int
    w : float32 array of shape (n, ps, ts)
    G : int
        Segments (the pool's particles).

    Returns
    -------
    q, a2 : float64 arrays of shape (G, P)
        ``sum_s w_s Re(U[row_s] conj(A[row_s]))`` and ``sum_s w_s |A[row_s]|^2`` per pixel
        over each segment's samples.

    Notes
    -----
    CPU: the three functions, the same bits. GPU: one kernel. A run of blocks with one target
    row (:func:`block_order`) sums its data and its weights, then multiplies them by its
    reference rows, read once per run, and by its segment's row of ``C``: the images are
    read once for all three sums. The sums agree with the three functions' to float32
    rounding (~1e-7 relative; the weights of a block's ``ts`` samples are summed first).
    """
    xp = array_module(acc, U, A)
    if xp is np or ts * ps > BLOCK_MAX:
        scatter_blocks(acc, U, iu, iv, ts, ps, w)
        scatter_blocks(acc_w, C, ib, iv, ts, ps, w, one_row=True)
        return residual_sums_blocks(U, A, iu, iv, ts, ps, segment_starts(ib, G), w)
    ts, ps, iu, iv, w = _block_args(xp, ts, ps, iu, iv, w)
    D = int(U.shape[1])
    if acc.shape[1] != D or A.shape[1] != D or 2 * acc_w.shape[1] != D or 2 * C.shape[1] != D:
        raise ValueError(f"acc, U and A have rows of {acc.shape[1]}, {D} and {A.shape[1]} "
                         f"values, acc_w and C of {acc_w.shape[1]} and {C.shape[1]}; they "
                         "need 2P ([Re | Im]) and P")
    qd = xp.zeros((G, D // 2), xp.float64)
    rd = xp.zeros((G, D // 2), xp.float64)
    if iu.shape[0]:
        f32 = xp.float32
        _scatter_blocks_gpu(acc, U, iu, iv, ts, ps, w, ts, xp.ascontiguousarray(A, f32),
                            xp.ascontiguousarray(ib, xp.int64), qd, rd, acc_w,
                            xp.ascontiguousarray(C, f32))
    return qd, rd


def _block_args(xp, ts, ps, iu, iv, w):
    """The block kernels' arguments as they take them: ``ts``, ``ps`` (int), ``iu``, ``iv``
    (contiguous int64), ``w`` (contiguous float32 of shape (n, ps, ts))."""
    iu = xp.ascontiguousarray(iu, dtype=xp.int64)
    iv = xp.ascontiguousarray(iv, dtype=xp.int64)
    ts, ps = int(ts), int(ps)
    return ts, ps, iu, iv, xp.ascontiguousarray(w, dtype=xp.float32).reshape(-1, ps, ts)


def _threads_per_pixel_pass(P: int, most: int = 512) -> int:
    """Threads of a CUDA block that loops a thread per pixel over ``P`` pixels: the fewest
    passes of at most ``most`` threads, the pixels shared evenly among them (whole warps).
    With a fixed 256, 622 pixels (64 px) took 3 passes, the last 43% busy."""
    passes = -(-P // most)
    per_pass = -(-P // passes)
    return max(32, -(-per_pass // 32) * 32)


def scatter_blocks(acc, U, iu, iv, ts: int, ps: int, w, *, one_row: bool = False) -> None:
    """Add weighted rows into an accumulator, in place, for blocks of samples as
    :func:`sampled_dot_blocks` forms them.

    Parameters
    ----------
    acc : float64 array of shape (M, D)
    U : float32 array of shape (n_u * ts, D), or (n_u, D) with ``one_row``
    iu, iv : int arrays of shape (n,)
        Each block's rows of ``U`` (``U[iu * ts + t]``, or ``U[iu]`` for every ``t`` with
        ``one_row``) and its target rows ``acc[iv * ps + q]``.
    ts, ps : int
        Samples per block along ``U`` and along ``acc``.
    w : float32 array of shape (n, ps, ts)
        Weights; samples of weight 0 add nothing.
    one_row : bool
        One row of ``U`` per block (the weights' sums of the E-step: a particle's CTF^2/sigma2
        whatever the translation).

    Notes
    -----
    ``acc[iv[c] * ps + q] += sum_t w[c, q, t] * U[row(c, t)]``. The same sums as
    :func:`scatter_products` of the blocks' samples of non-zero weight in (block, ``q``,
    ``t``) order; on the CPU it is that function. On the GPU a CUDA block takes
    ``SB_CHUNK`` blocks and reads each block's rows once for its ``ts x ps`` samples. A
    block's ``ts`` terms of one ``q`` are summed in float32 (~1e-7 of their magnitude, as
    RELION's GPU path sums in float32), then a run of consecutive blocks with the same ``iv``
    in float64 registers, added with one atomic add per value and ``q`` (order-independent to
    ~1e-16 relative). Blocks ordered by ``iv`` (:func:`block_order`) make long runs and few
    atomic adds.
    """
    xp = array_module(acc, U)
    ts, ps, iu, iv, w = _block_args(xp, ts, ps, iu, iv, w)
    n = int(iu.shape[0])
    if n == 0:
        return
    D = int(U.shape[1])
    if acc.shape[1] != D:
        raise ValueError(f"acc has rows of {acc.shape[1]} values and U of {D}")
    if xp is np or ts * ps > BLOCK_MAX:
        keep = xp.flatnonzero(w.reshape(-1) != 0)
        blk, qt = keep // (ps * ts), keep % (ps * ts)
        rows = iu[blk] if one_row else iu[blk] * ts + qt % ts
        scatter_products(acc, U, None, rows, rows, iv[blk] * ps + qt // ts,
                         w.reshape(-1)[keep])
        return
    _scatter_blocks_gpu(acc, U, iu, iv, ts, ps, w, 1 if one_row else ts)


def _scatter_blocks_gpu(acc, U, iu, iv, ts, ps, w, urows, A=None, ib=None, qd=None, rd=None,
                        accw=None, C=None):
    """GPU: the ``scatter_blocks`` kernel (with ``qd``: also the residual's terms and the
    weights' sums)."""
    xp = array_module(acc, U)
    n, D = int(iu.shape[0]), int(U.shape[1])
    U = xp.ascontiguousarray(U, dtype=xp.float32)
    on = qd is not None  # without: unused pointers to arrays of the call
    _blocks_kernel(ts, ps, "scatter_blocks")(
        ((n + SB_CHUNK - 1) // SB_CHUNK,), (128,),
        (acc, U, iu, iv, w, np.int64(n), np.int32(D), np.int32(urows), np.int32(on),
         A if on else U, ib if on else iu, qd if on else acc, rd if on else acc,
         accw if on else acc, C if on else U))


def block_order(cb, ct, cr, T: int, M: int, B: int | None = None):
    """The order in which the E-step's second pass takes its blocks of samples.

    Parameters
    ----------
    cb, ct, cr : int arrays of shape (n,)
        Each coarse sample's particle (non-decreasing), translation and (class, rotation)
        row, in (particle, translation, rotation) order.
    T, M : int
        Coarse translations, and (class, rotation) rows.
    B : int, optional
        Particles (``cb < B``): where ``B M T`` fits in 32 bits the sort's keys do too.

    Returns
    -------
    int array of shape (n,) or None
        GPU: the permutation to (particle, rotation, translation) order, in which a
        particle's blocks with one target row (its translations of one rotation) are
        consecutive, so that :func:`scatter_blocks` adds each run with one atomic add instead
        of one per block. CPU: None (keep the order; its sums sort by target row anyway).
    """
    xp = array_module(cb, ct, cr)
    if xp is np or cb.shape[0] == 0:
        return None
    key = (cb.astype(xp.int64) * M + cr) * T + ct
    # the keys are distinct, so any sort gives this order; with B given, 32-bit keys where
    # they fit (B M T < 2^32) sort in half the radix passes (and kernel launches)
    if B is not None and int(B) * int(M) * int(T) <= 2**32:
        key = key.astype(xp.uint32)
    return xp.argsort(key)


#: the most samples of one particle for which :func:`block_samples` places each sample by
#: its rank among its particle's samples (a thread per sample reads them all) instead of
#: sorting every key
BLOCK_RANK_MAX = 2048


def block_samples(counts, flat, T: int, M: int, longest: int | None = None):
    """The second pass's coarse samples, each as (particle, translation, row), in the order
    the pass takes them (:func:`block_order`).

    Parameters
    ----------
    counts : int array of shape (B,)
        Each particle's significant coarse samples.
    flat : int array of shape (n,)
        Their columns ``t * M + m`` (translation ``t``, (class, rotation) row ``m``), grouped
        by particle (``n = counts.sum()``), each particle's ascending.
    T, M : int
        Coarse translations, and (class, rotation) rows.
    longest : int, optional
        ``counts.max()``, where the host has it: on the GPU, up to :data:`BLOCK_RANK_MAX`,
        one kernel then places each sample by its rank among its particle's samples (a
        dozen array operations and a sort held the host ~0.6 ms a pool of 16,000, the
        device idle).

    Returns
    -------
    cb, ct, cr : int64 arrays of shape (n,)
        Each sample's particle, translation and row: on the GPU in (particle, rotation,
        translation) order, on the CPU in the given order.
    """
    xp = array_module(counts, flat)
    i64 = xp.int64
    n, B = int(flat.shape[0]), int(counts.shape[0])
    cum = xp.cumsum(counts, dtype=i64)
    if xp is not np and n and longest is not None and longest <= BLOCK_RANK_MAX:
        out = tuple(xp.empty(n, i64) for _ in range(3))
        _cuda_kernel("block_samples")(
            ((n + 255) // 256,), (256,),
            (cum, xp.ascontiguousarray(flat, dtype=i64), np.int64(n), np.int64(B),
             np.int64(T), np.int64(M), *out))
        return out
    cb = xp.searchsorted(cum, xp.arange(n, dtype=i64), side="right")
    ct, cr = flat // M, flat % M
    perm = block_order(cb, ct, cr, T, M, B)
    return (cb, ct, cr) if perm is None else (cb[perm], ct[perm], cr[perm])


class ShiftedBlocks(NamedTuple):
    """The second pass's shifted, weighted images, by block of ``ts`` translations
    (:func:`shifted_blocks`).

    Block ``c``'s row ``t`` (``t < ts``) is ``[Re | Im](X[ib[c]] * phases[it[c] * ts + t])
    * [weight[ib[c]] | weight[ib[c]]]``, the row :func:`cryonb.kernels.shifted_images_ri`
    writes. ``Y`` holds the rows where they are written (the CPU, and blocks too large for
    the GPU's block kernels): block ``c``'s rows are ``Y[iy[c] * ts + t]``. On the GPU
    (``Y`` None) the kernels of :func:`shifted_dot_blocks` and
    :func:`scatter_shifted_residual` make each row's values where they use them, from the
    image's pixels, its weights and the phase table.
    """

    X: Any  #: complex64 (B, P): the images at the pass's pixels
    phases: Any  #: complex64 (n_t * ts, P): the translations' phase ramps
    weight: Any  #: float32 (B, P): per-image pixel weights (CTF / sigma2)
    ib: Any  #: int64 (n,): each block's image (non-decreasing where the sums use them)
    it: Any  #: int64 (n,): each block's translation block (rows it * ts + t of phases)
    ts: int
    Y: Any = None  #: float32 (n_rows * ts, 2P) or None
    iy: Any = None  #: int64 (n,) or None

    def take(self, sel) -> ShiftedBlocks:
        """The blocks ``sel`` (an index array), the same rows."""
        return self._replace(ib=self.ib[sel], it=self.it[sel],
                             iy=None if self.iy is None else self.iy[sel])


def shifted_blocks(X, phases, weight, ib, it, ts: int, ps: int) -> ShiftedBlocks:
    """Blocks of shifted, weighted image rows for :func:`shifted_dot_blocks` and
    :func:`scatter_shifted_residual`.

    Parameters
    ----------
    X : complex64 array of shape (B, P)
        Images at the pass's pixels.
    phases : complex64 array of shape (n_t * ts, P)
        Phase ramp of each translation; a block takes ``ts`` consecutive ones.
    weight : float32 array of shape (B, P)
        Per-image pixel weights.
    ib, it : int arrays of shape (n,)
        Each block's image and translation block.
    ts, ps : int
        Translations per block, and the rows of the other side per block (blocks of more
        than ``BLOCK_MAX`` samples are too large for the GPU's block kernels).

    Returns
    -------
    ShiftedBlocks
        On the CPU (and for blocks too large for the GPU kernels) with the rows written once
        per (image, translation) pair in use, in (image, translation) order, through a table
        of the pairs (no sort); on the GPU without them.
    """
    xp = array_module(X)
    ts, ps = int(ts), int(ps)
    ib = xp.asarray(ib, xp.int64)
    it = xp.asarray(it, xp.int64)
    S = ShiftedBlocks(X, phases, weight, ib, it, ts)
    if xp is not np and ts * ps <= BLOCK_MAX:
        return S
    T = int(phases.shape[0]) // ts
    flat = ib * T + it
    used = xp.zeros(int(X.shape[0]) * T, bool)
    used[flat] = True
    key = (xp.flatnonzero(used)[:, None] * ts + xp.arange(ts)[None]).reshape(-1)
    iy = (xp.cumsum(used) - 1)[flat]
    Y = shifted_images_ri(X, phases, weight, key // (T * ts), key % (T * ts))
    return S._replace(Y=Y, iy=iy)


def _shifted_args(xp, S: ShiftedBlocks):
    """The GPU kernels' image arguments: images and phases as contiguous complex64 (read as
    float2), weights as float32, the blocks' indices as int64."""
    c64 = xp.complex64
    return (xp.ascontiguousarray(S.X, dtype=c64), xp.ascontiguousarray(S.phases, dtype=c64),
            xp.ascontiguousarray(S.weight, dtype=xp.float32),
            xp.ascontiguousarray(S.ib, dtype=xp.int64),
            xp.ascontiguousarray(S.it, dtype=xp.int64))


def shifted_dot_blocks(S: ShiftedBlocks, V, iv, ps: int):
    """:func:`sampled_dot_blocks` of shifted image rows: block ``c``'s ``ts`` rows of ``S``
    against ``V[iv[c] * ps + q]``, ``q < ps``.

    Parameters
    ----------
    S : ShiftedBlocks
        ``n`` blocks of ``ts`` rows of ``2P`` values.
    V : float32 array of shape (n_v * ps, 2P)
        ``[Re | Im]`` rows.
    iv : int array of shape (n,)
    ps : int

    Returns
    -------
    float32 array of shape (n, ps, ts)
        ``out[c, q, t]``: the dot product of block ``c``'s row ``t`` and ``V``'s row
        ``iv[c] * ps + q``. From written rows, :func:`sampled_dot_blocks` (bit for bit);
        on the GPU without them, a warp per block reads the image's pixels once for its
        ``ts`` translations (summed over pixels in another order: equal to float32
        rounding).
    """
    n, P = int(S.ib.shape[0]), int(S.X.shape[1])
    if V.shape[1] != 2 * P:
        raise ValueError(f"V has rows of {V.shape[1]} values; the images need 2P = {2 * P}")
    if S.Y is not None:
        return sampled_dot_blocks(S.Y, V, S.iy, iv, S.ts, ps)
    xp = array_module(V)
    ps = int(ps)
    out = xp.empty((n, ps, S.ts), xp.float32)
    if n == 0:
        return out
    threads = 256
    _blocks_kernel(S.ts, ps, "sampled_dot_shifted")(
        ((n * 32 + threads - 1) // threads,), (threads,),
        (*_shifted_args(xp, S), xp.ascontiguousarray(V, dtype=xp.float32),
         xp.ascontiguousarray(iv, dtype=xp.int64), out, np.int64(n), np.int32(P)))
    return out


def scatter_shifted_residual(acc, S: ShiftedBlocks, A, acc_w, C, iv, ps: int, w, G: int):
    """:func:`scatter_blocks_residual` of shifted image rows: the data and weights' sums of
    the blocks of ``S`` and the residual's per-image terms, each block's segment its image
    (``S.ib``, non-decreasing).

    Parameters
    ----------
    acc : float64 array of shape (M, 2P)
        Data sums, added to in place: ``acc[iv[c] * ps + q] += sum_t w[c, q, t] row(c, t)``.
    S : ShiftedBlocks
    A : float32 array of shape (M, 2P)
        References as ``[Re | Im]`` rows, in the rows of ``acc``.
    acc_w : float64 array of shape (M, P)
        Weights' sums, added to in place: ``acc_w[iv[c] * ps + q] += sum_t w[c, q, t]
        C[S.ib[c]]``.
    C : float32 array of shape (G, P)
    iv : int array of shape (n,)
    ps : int
    w : float32 array of shape (n, ps, ts)
    G : int
        Images (segments).

    Returns
    -------
    q, a2 : float64 arrays of shape (G, P)
        As :func:`scatter_blocks_residual`.

    Notes
    -----
    From written rows, :func:`scatter_blocks_residual` (its bits). On the GPU without them,
    one kernel: a thread per Fourier pixel makes a block's ``ts`` rows from the image's
    pixel (read once per run of blocks of one image) and the phase table; the sums agree
    with the written rows' to float32 rounding.
    """
    P = int(S.X.shape[1])
    if acc.shape[1] != 2 * P or A.shape[1] != 2 * P or acc_w.shape[1] != P or C.shape[1] != P:
        raise ValueError(f"acc and A have rows of {acc.shape[1]} and {A.shape[1]} values, "
                         f"acc_w and C of {acc_w.shape[1]} and {C.shape[1]}; the images need "
                         f"2P = {2 * P} and P")
    if S.Y is not None:
        return scatter_blocks_residual(acc, S.Y, A, acc_w, C, S.iy, iv, S.ib, S.ts, ps, w, G)
    xp = array_module(acc, A)
    ts, ps, _, iv, w = _block_args(xp, S.ts, ps, S.ib, iv, w)
    n = int(iv.shape[0])
    if not n:
        return xp.zeros((G, P), xp.float64), xp.zeros((G, P), xp.float64)
    # the rows of a particle whose blocks are all in one chunk are written by the kernel:
    # only the others are set to zero first (a pass over two (G, P) arrays less)
    qd = xp.empty((G, P), xp.float64)
    rd = xp.empty((G, P), xp.float64)
    images = _shifted_args(xp, S)  # (X, phases, weight, ib, it)
    _blocks_kernel(ts, ps, "scatter_rows_init")(
        (G,), (128,), (qd, rd, segment_starts(images[3], G), np.int32(P)))
    _blocks_kernel(ts, ps, "scatter_shifted")(
        ((n + SB_CHUNK - 1) // SB_CHUNK,), (128,),
        (acc, *images, iv, w, np.int64(n), np.int32(P),
         xp.ascontiguousarray(A, dtype=xp.float32), qd, rd, acc_w,
         xp.ascontiguousarray(C, dtype=xp.float32)))
    return qd, rd
