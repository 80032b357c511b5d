"""The coarse pass's log-posteriors from its matrix product, in one pass over the samples.

The coarse pass's product gives, per particle ``b``, translation ``t`` and (class, rotation)
``m = k R + r``, the cross term ``Re <X_bt, CTF A_m> / sigma2``. The log-posterior adds the
image and reference powers, the offset prior of the translation in class ``k``, the class
prior, and excludes every class but a particle's seed class where one is set (re-seeding).
As array expressions that is four passes over the (B, T, M) samples and a fifth for the
maximum over translations, and the offset prior another few over (B, T, K, 2); here it is one
CUDA thread per (particle, m) that walks the translations, computes the offset prior, writes
the log-posteriors in place and keeps their maximum. On the CPU, the same in one Numba pass
(row by row, the same float32 operations in the same order as the array expressions, so the
same values bit for bit).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["PRECISIONS", "coarse_log_posterior", "coarse_log_posterior_reference",
           "cross_products", "split_tf32", "split_tf32_reference", "tf32_enabled"]

#: the coarse product's precisions on a GPU (the CPU's is always float32, BLAS)
PRECISIONS = ("tf32", "3xtf32", "float32")

#: cuBLAS's enums (cublas_api.h, library_types.h) for the TF32 product
_CUDA_R_32F = 0
_CUBLAS_COMPUTE_32F_FAST_TF32 = 77
_CUBLAS_GEMM_DEFAULT = -1


def tf32_enabled() -> bool:
    """Whether the GPU's coarse product may use TF32 tensor cores: yes unless the environment
    variable ``CRYONB_TF32`` is ``0`` (or ``false``, ``no``, ``off``), which keeps it on the
    FP32 pipes in every iteration."""
    return os.environ.get("CRYONB_TF32", "1").strip().lower() not in ("0", "false", "no", "off")


def split_tf32_reference(a):
    """:func:`split_tf32` as array expressions (NumPy or CuPy)."""
    xp = array_module(a)
    u = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    hi = ((u + xp.uint32(0x1000)) & xp.uint32(0xFFFFE000)).view(xp.float32)
    return hi, (xp.asarray(a, dtype=xp.float32) - hi)


_SPLIT_SRC = r"""
extern "C" __global__
void split_tf32(const float* a, float* hi, float* lo, long long n)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = a[i];
    const float h = __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xFFFFE000u);
    hi[i] = h;
    lo[i] = v - h;
}
"""


def split_tf32(a):
    """Split float32 values into a TF32 part and the rest: ``a == hi + lo`` exactly.

    ``hi`` is ``a`` rounded to TF32's 10-bit mantissa (to nearest, halves away from zero), so
    a TF32 tensor core reads it without rounding; ``lo = a - hi`` (exact in float32) is at most
    2**-11 of ``|a|``, and the tensor core's own rounding of it errs by 2**-22 of ``|a|``:
    ``hi x hi + hi x lo + lo x hi`` on TF32 tensor cores is as accurate as a float32 product
    (the "3 x TF32" scheme of CUTLASS).

    Parameters
    ----------
    a : float32 array of any shape
        Finite values below float32's largest less 2**-12 of it (larger ones round to
        infinity, as any conversion to TF32 does).

    Returns
    -------
    hi, lo : float32 arrays of ``a``'s shape (C-contiguous)
    """
    xp = array_module(a)
    if xp is np:
        return split_tf32_reference(a)
    a = xp.ascontiguousarray(a, dtype=xp.float32)
    hi, lo = xp.empty_like(a), xp.empty_like(a)
    if a.size:
        threads = 256
        cuda_function(_SPLIT_SRC, "split_tf32")(((a.size + threads - 1) // threads,),
                                                (threads,), (a, hi, lo, np.int64(a.size)))
    return hi, lo


def cross_products(x, y, *, precision: str | None = None):
    """The coarse pass's matrix product ``x @ y.T``.

    Parameters
    ----------
    x : float32 array of shape (m, k)
        One row per (particle, translation) or per particle: ``[Re | Im]`` of the CTF- and
        noise-weighted image.
    y : float32 array of shape (n, k), or the pair ``split_tf32(y)``
        One row per (class, rotation) reference (or per (translation, reference)),
        ``[Re | Im]``. A caller that multiplies by the same ``y`` many times in
        ``"3xtf32"`` splits it once and passes the pair.
    precision : {"tf32", "3xtf32", "float32"}, optional
        GPU only (the CPU always multiplies in float32, BLAS):

        - ``"tf32"``: TF32 tensor cores (inputs rounded to 10-bit mantissas, float32 sums);
        - ``"3xtf32"``: three TF32 products of the inputs' :func:`split_tf32` parts, about
          float32's accuracy at three times the TF32 product's time (still faster than the
          FP32 pipes: 363 against 50 TFLOP/s on an H100);
        - ``"float32"``: the FP32 pipes.

        Default: ``"tf32"``, or ``"float32"`` where :func:`tf32_enabled` is false.

    Returns
    -------
    float32 array of shape (m, n)

    Notes
    -----
    TF32 is used here only: the coarse pass's products rank the samples, to choose the
    significant ones for the second pass, which scores them again in float32 (and sums them
    in float64). TF32's error, about 5e-4 of each term, gives log-posterior errors of a few
    hundredths where a particle's samples differ by units. That is harmless once the classes
    have formed, but while they form it moves a per cent of the ambiguous particles of a
    noisy set (pixel SNR 0.05) into other classes, which the run does not undo, and it can
    tip a decision to re-seed a class: the E-step asks for ``"3xtf32"`` until no class can
    be re-seeded (``Class2DConfig.tf32_from``; ``benchmarks/RESULTS.md``). The setting is
    per call (cuBLAS ``gemmEx`` with ``CUBLAS_COMPUTE_32F_FAST_TF32``), not CuPy's
    process-wide compute type, so no other product of the run changes precision.
    """
    xp = array_module(x)
    pair = isinstance(y, tuple)
    if precision is None:
        precision = "tf32" if tf32_enabled() else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if xp is np or precision == "float32":
        return x @ (y[0] + y[1] if pair else y).T
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    if precision == "3xtf32" and not pair:
        y = split_tf32(y)
    elif precision == "tf32" and pair:
        y = y[0] + y[1]
    y0 = y[0] if isinstance(y, tuple) else y
    (m, k), n = x.shape, y0.shape[0]
    if y0.shape[1] != k:
        raise ValueError(f"x has rows of {k} values, y of {y0.shape[1]}")
    out = xp.empty((m, n), xp.float32)
    if m == 0 or n == 0 or k == 0:
        out[...] = 0
        return out
    if precision == "tf32":
        _gemm_tf32(xp.ascontiguousarray(y, dtype=xp.float32), x, out, 0.0)
        return out
    xh, xl = split_tf32(x)
    yh, yl = (xp.ascontiguousarray(v, dtype=xp.float32) for v in y)
    if yl.shape != yh.shape:
        raise ValueError(f"y's two parts differ in shape: {yh.shape} and {yl.shape}")
    # the small terms first, the large one last (float32 sums of the three)
    _gemm_tf32(yh, xl, out, 0.0)
    _gemm_tf32(yl, xh, out, 1.0)
    _gemm_tf32(yh, xh, out, 1.0)
    return out


def _gemm_tf32(y, x, out, beta: float) -> None:
    """``out = x @ y.T + beta out`` on TF32 tensor cores (C-contiguous float32 CuPy arrays:
    ``x`` (m, k), ``y`` (n, k), ``out`` (m, n)), on the current stream."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    (m, k), n = x.shape, y.shape[0]
    one, b = np.ones(1, np.float32), np.full(1, beta, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        # row-major out (m, n) is column-major out^T (n, m) = y (n, k) x^T (k, m)
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, k,
                      one.ctypes.data, y.data.ptr, _CUDA_R_32F, k, x.data.ptr, _CUDA_R_32F, k,
                      b.ctypes.data, out.data.ptr, _CUDA_R_32F, n,
                      _CUBLAS_COMPUTE_32F_FAST_TF32, _CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)


def offset_log_prior_reference(offsets, centres, log_pdf, inv2):
    """Log prior of each translation in each class, (B, T, K) float32 (array expressions):
    ``-|offset - centre_k|^2 inv2 + log_pdf[k]``; arguments as :func:`coarse_log_posterior`."""
    d = offsets[:, :, None, :] - centres  # (B, T, K, 2)
    return -(d * d).sum(axis=-1) * np.float32(inv2) + log_pdf


def coarse_log_posterior_reference(cross, x2, a2, offsets, centres, log_pdf, inv2, seed,
                                   R: int):
    """Array-expression version (the tests' reference).

    Parameters and returns as :func:`coarse_log_posterior` (``cross`` is not modified).
    """
    xp = array_module(cross)
    B, T, M = cross.shape
    K = M // R
    prior = offset_log_prior_reference(offsets, centres, log_pdf, inv2)
    lw = cross - 0.5 * (x2[:, None, None] + a2[:, None, :])
    lw = lw.reshape(B, T, K, R) + prior[..., None]
    restrict = (seed[:, None] >= 0) & (xp.arange(K)[None] != seed[:, None])
    lw = xp.where(restrict[:, None, :, None], -xp.inf, lw).reshape(B, T, M)
    return lw, lw.max(axis=1)


_CUDA_SRC = r"""
extern "C" __global__
void coarse_log_posterior(float* lw, const float* x2, const float* a2, const float* offs,
                          const float* centres, const float* log_pdf, float inv2,
                          const long long* seed, int T, int M, int R, float* best_t)
{
    const int chunks = (M + blockDim.x - 1) / blockDim.x;
    const long long b = blockIdx.x / chunks;
    const int m = (blockIdx.x % chunks) * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const int k = m / R;
    const long long s = seed[b];
    const bool excluded = s >= 0 && s != k;
    const float base = x2[b] + a2[b * M + m];
    float* row = lw + b * (long long)T * M + m;
    const float* off = offs + b * (long long)T * 2;
    const float cx = centres[2 * k], cy = centres[2 * k + 1], lp = log_pdf[k];
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
            // the offset prior as the array expressions compute it (__f*_rn: no fused
            // multiply-adds): -((dx dx) + (dy dy)) inv2 + log_pdf
            const float dx = off[2 * t] - cx, dy = off[2 * t + 1] - cy;
            const float d2 = __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy));
            const float pr = __fadd_rn(__fmul_rn(-d2, inv2), lp);
            const float v = excluded ? neg_inf : (c[u] - 0.5f * base) + pr;
            row[(long long)t * M] = v;
            mx = fmaxf(mx, v);
        }
    }
    best_t[b * M + m] = mx;
}
"""


def coarse_log_posterior(cross, x2, a2, offsets, centres, log_pdf, inv2, seed, R: int):
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
    offsets : float32 array of shape (B, T, 2)
        Each particle's offset at each translation (pixels, x and y).
    centres : float32 array of shape (K, 2)
        Each class's offset prior's centre.
    log_pdf : float32 array of shape (K,)
        Log class priors (``-inf`` where a class has no prior weight).
    inv2 : float
        ``1 / (2 sigma_offset^2)``: the log prior of a translation in class ``k`` is
        ``-|offset - centre_k|^2 inv2 + log_pdf[k]`` (in float32).
    seed : int array of shape (B,)
        A class each particle is restricted to, or -1 for none.
    R : int
        Rotations per class (``M = K R``).

    Returns
    -------
    lw : float32 array of shape (B, T, M)
        ``cross - (x2 + a2) / 2`` plus the translation's log prior in the class (offset prior
        and ``log_pdf``); ``-inf`` in classes other than the seed.
    best_t : float32 array of shape (B, M)
        ``lw.max(axis=1)``.
    """
    xp = array_module(cross)
    B, T, M = cross.shape
    lw = xp.ascontiguousarray(cross, dtype=xp.float32)
    best_t = xp.empty((B, M), xp.float32)
    if B == 0 or M == 0:
        return lw, best_t
    args = [xp.ascontiguousarray(a, dtype=xp.float32)
            for a in (x2, a2, offsets, centres, log_pdf)]
    args += [np.float32(inv2), xp.ascontiguousarray(seed, dtype=xp.int64)]
    if xp is np:
        _coarse_cpu()(lw, *args, R, best_t)
        return lw, best_t
    nt = 256
    cuda_function(_CUDA_SRC, "coarse_log_posterior")(
        (B * ((M + nt - 1) // nt),), (nt,),
        (lw, *args, np.int32(T), np.int32(M), np.int32(R), best_t))
    return lw, best_t


@functools.cache
def _coarse_cpu():
    """The CUDA kernel ``coarse_log_posterior`` as a Numba loop:
    ``kern(lw, x2, a2, offsets, centres, log_pdf, inv2, seed, R, best_t)`` overwrites ``lw``
    (B, T, M) and fills ``best_t`` (B, M)."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def kern(lw, x2, a2, offsets, centres, log_pdf, inv2, seed, R, best_t):
        B, T, M = lw.shape
        K = M // R
        half = np.float32(0.5)
        pr = np.empty(K, np.float32)
        for b in range(B):
            s = seed[b]
            mx = best_t[b]
            mx[:] = -np.inf
            base = half * (x2[b] + a2[b])  # (M,), as the reference: 0.5 * (x2 + a2)
            for t in range(T):
                for k in range(K):  # as offset_log_prior_reference, in float32
                    dx = offsets[b, t, 0] - centres[k, 0]
                    dy = offsets[b, t, 1] - centres[k, 1]
                    pr[k] = -(dx * dx + dy * dy) * inv2 + log_pdf[k]
                row = lw[b, t]
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
