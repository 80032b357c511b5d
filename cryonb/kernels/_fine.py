"""The second pass's samples and their log-posteriors, from its blocks of coarse samples.

Every significant coarse sample (particle ``cb``, translation ``ct``, class and rotation row
``cr``) expands into ``ps x ts`` samples of the oversampled grid. Each one's particle,
translation and reference row, its offset (the particle's previous offset plus the
translation), that offset's squared distance to its class's prior and its log-posterior
(the cross term less half the reference power, the class's log prior and the offset prior)
are a chain of about twenty array operations over the samples. On the GPU those are short
kernels whose launches took the host longer than the device took to run them (the device
waited for the host); :func:`fine_sample_terms` makes them in one kernel. The CPU keeps the
array expressions (:func:`fine_sample_terms_reference`), and the kernel rounds every
operation as they do (no contraction into fused multiply-adds): the same values, bit for
bit. :func:`fine_weights` does the same for the normalised weights and the terms of the
posterior's angular and translational spreads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["FineSamples", "fine_sample_terms", "fine_sample_terms_reference", "fine_weights",
           "fine_weights_reference"]


class FineSamples(NamedTuple):
    """The second pass's samples, ``n = len(cb) * ps * ts`` of them in (coarse sample,
    sub-rotation, sub-translation) order (:func:`fine_sample_terms`)."""

    b: object  #: int64 (n,): particle
    tf: object  #: int64 (n,): translation (row of the fine translations)
    rf: object  #: int64 (n,): reference row ``class * R + rotation``
    k: object  #: int64 (n,): class
    offs: object  #: float32 (n, 2): offset (x, y), pixels
    d2: object  #: float32 (n,): squared distance of the offset to the class's prior
    lw: object  #: float32 (n,): log-posterior, less the image norm's half


def fine_sample_terms_reference(cb, ct, cr, ts: int, ps: int, R: int, cross, a2, offset,
                                trans, prior, log_pdf, inv2) -> FineSamples:
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`fine_sample_terms`.
    """
    xp = array_module(cb, cross)
    shape = (cb.shape[0], ps, ts)
    qt = xp.arange(ts)[None, None, :]
    qr = xp.arange(ps)[None, :, None]
    b = xp.broadcast_to(cb[:, None, None], shape).reshape(-1)
    tf = xp.broadcast_to(ct[:, None, None] * ts + qt, shape).reshape(-1)
    rf = xp.broadcast_to(cr[:, None, None] * ps + qr, shape).reshape(-1)
    a2 = xp.broadcast_to(a2.reshape(-1, ps, 1), shape).reshape(-1)
    k = rf // R
    offs = offset[b] + trans[tf]  # (n, 2)
    d = offs - prior[k]
    d2 = (d * d).sum(axis=1)
    lw = cross - 0.5 * a2 + log_pdf[k] - d2 * inv2
    return FineSamples(b, tf, rf, k, offs, d2, lw)


_CUDA_SRC = r"""
extern "C" __global__
void fine_sample_terms(const long long* cb, const long long* ct, const long long* cr,
                       long long n, int ts, int ps, int R, const float* cross,
                       const float* a2, const float* offset, const float* trans,
                       const float* prior, const float* log_pdf, float inv2,
                       long long* b_out, long long* tf_out, long long* rf_out,
                       long long* k_out, float* offs_out, float* d2_out, float* lw_out)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int per = ps * ts;
    const long long c = i / per;
    const int q = (int)(i - c * per);
    const int qr = q / ts, qt = q - qr * ts;
    const long long b = cb[c];
    const long long tf = ct[c] * ts + qt;
    const long long rf = cr[c] * ps + qr;
    const long long k = rf / R;
    // each operation rounded on its own, as the array expressions round them
    const float ox = __fadd_rn(offset[2 * b], trans[2 * tf]);
    const float oy = __fadd_rn(offset[2 * b + 1], trans[2 * tf + 1]);
    const float dx = __fsub_rn(ox, prior[2 * k]), dy = __fsub_rn(oy, prior[2 * k + 1]);
    const float d2 = __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy));
    float lw = __fsub_rn(cross[i], __fmul_rn(0.5f, a2[c * ps + qr]));
    lw = __fadd_rn(lw, log_pdf[k]);
    lw = __fsub_rn(lw, __fmul_rn(d2, inv2));
    b_out[i] = b;
    tf_out[i] = tf;
    rf_out[i] = rf;
    k_out[i] = k;
    offs_out[2 * i] = ox;
    offs_out[2 * i + 1] = oy;
    d2_out[i] = d2;
    lw_out[i] = lw;
}
"""


def fine_sample_terms(cb, ct, cr, ts: int, ps: int, R: int, cross, a2, offset, trans, prior,
                      log_pdf, inv2) -> FineSamples:
    """The second pass's samples and their log-posteriors (see the module's notes).

    Parameters
    ----------
    cb, ct, cr : int64 arrays of shape (m,)
        Each coarse sample's particle, coarse translation and (class, rotation) row.
    ts, ps : int
        Translations and rotations per coarse translation and rotation.
    R : int
        Rotations of the fine grid (a reference row is ``class * R + rotation``).
    cross : float32 array of shape (m * ps * ts,)
        Each sample's cross term ``Re <X(t), CTF A> / sigma2``.
    a2 : float32 array of shape (m, ps, 1) (or m * ps values)
        ``||CTF A||^2 / sigma2`` per coarse sample and sub-rotation.
    offset : float32 array of shape (B, 2)
        Each particle's previous offset (x, y), pixels.
    trans : float32 array of shape (Tf, 2)
        The fine translations.
    prior : float32 array of shape (K, 2)
        Each class's offset prior.
    log_pdf : float32 array of shape (K,)
        Each class's log prior.
    inv2 : float32
        ``1 / (2 sigma2_offset)``.

    Returns
    -------
    FineSamples
        ``lw = cross - a2 / 2 + log_pdf[k] - d2 * inv2`` and the terms it is made of.
    """
    xp = array_module(cb, cross)
    if xp is np:
        return fine_sample_terms_reference(cb, ct, cr, ts, ps, R, cross, a2, offset, trans,
                                           prior, log_pdf, inv2)
    n = int(cb.shape[0]) * ps * ts
    out = FineSamples(*(xp.empty(n, xp.int64) for _ in range(4)), xp.empty((n, 2), xp.float32),
                      xp.empty(n, xp.float32), xp.empty(n, xp.float32))
    if n:
        i64, f32 = xp.int64, xp.float32
        nt = 256
        cuda_function(_CUDA_SRC, "fine_sample_terms")(
            ((n + nt - 1) // nt,), (nt,),
            (*(xp.ascontiguousarray(v, dtype=i64) for v in (cb, ct, cr)), np.int64(n),
             np.int32(ts), np.int32(ps), np.int32(R),
             *(xp.ascontiguousarray(v, dtype=f32) for v in (cross, a2, offset, trans, prior,
                                                            log_pdf)),
             np.float32(inv2), *out))
    return out


def fine_weights_reference(wk, total, b, rf, best_rf, offs, best_off, psi):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`fine_weights`.
    """
    R = psi.shape[0]
    w = (wk / total[b]).astype(np.float32)
    dpsi = (psi[rf % R] - psi[best_rf[b] % R] + 180) % 360 - 180
    dt = offs - best_off[b]
    return w, w * dpsi**2, w * (dt * dt).sum(axis=1)


_WEIGHTS_SRC = r"""
extern "C" __global__
void fine_weights(const float* wk, const double* total, const long long* b,
                  const long long* rf, const long long* best_rf, const float* offs,
                  const float* best_off, const double* psi, int R, long long n, float* w_out,
                  double* wr_out, float* wt_out)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long p = b[i];
    const float w = (float)__ddiv_rn((double)wk[i], total[p]);
    // (x + 180) % 360 - 180 with the divisor's sign (Python's and NumPy's remainder)
    double x = __dadd_rn(__dsub_rn(psi[rf[i] % R], psi[best_rf[p] % R]), 180.0);
    double m = fmod(x, 360.0);
    if (m != 0.0 && m < 0.0) m += 360.0;
    const double dpsi = __dsub_rn(m, 180.0);
    const float dx = __fsub_rn(offs[2 * i], best_off[2 * p]);
    const float dy = __fsub_rn(offs[2 * i + 1], best_off[2 * p + 1]);
    w_out[i] = w;
    wr_out[i] = __dmul_rn((double)w, __dmul_rn(dpsi, dpsi));
    wt_out[i] = __fmul_rn(w, __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy)));
}
"""


def fine_weights(wk, total, b, rf, best_rf, offs, best_off, psi):
    """The second pass's normalised weights and the terms of its posterior's spreads.

    Parameters
    ----------
    wk : float32 array of shape (n,)
        Each sample's weight (0 where dropped), grouped by particle.
    total : float64 array of shape (B,)
        Their sums per particle.
    b, rf : int64 arrays of shape (n,)
        Each sample's particle and reference row (``class * R + rotation``).
    best_rf : int64 array of shape (B,)
        Each particle's best sample's reference row.
    offs : float32 array of shape (n, 2)
        Each sample's offset (x, y), pixels.
    best_off : float32 array of shape (B, 2)
        Each particle's best sample's offset.
    psi : float64 array of shape (R,)
        The rotations' angles (deg).

    Returns
    -------
    w : float32 array of shape (n,)
        ``wk / total[b]``.
    wr : float64 array of shape (n,)
        ``w dpsi^2``: the angle's distance to the best sample's, in (-180, 180] deg.
    wt : float32 array of shape (n,)
        ``w |offs - best_off[b]|^2``.
    """
    xp = array_module(wk)
    if xp is np:
        return fine_weights_reference(wk, total, b, rf, best_rf, offs, best_off, psi)
    n = int(wk.shape[0])
    out = xp.empty(n, xp.float32), xp.empty(n, xp.float64), xp.empty(n, xp.float32)
    if n:
        nt = 256
        f32, f64, i64 = xp.float32, xp.float64, xp.int64
        cuda_function(_WEIGHTS_SRC, "fine_weights")(
            ((n + nt - 1) // nt,), (nt,),
            (xp.ascontiguousarray(wk, dtype=f32), xp.ascontiguousarray(total, dtype=f64),
             *(xp.ascontiguousarray(v, dtype=i64) for v in (b, rf, best_rf)),
             xp.ascontiguousarray(offs, dtype=f32), xp.ascontiguousarray(best_off, dtype=f32),
             xp.ascontiguousarray(psi, dtype=f64), np.int32(psi.shape[0]), np.int64(n), *out))
    return out
