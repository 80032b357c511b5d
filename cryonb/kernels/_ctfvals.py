"""CTF values of many particles at shared Fourier pixels, in one pass over the output.

:func:`cryonb.ctf.ctf_at` writes each particle's CTF as ``-sin`` of a linear form in five
per-pixel factors (``k^2``, ``k^2 cos 2phi``, ``k^2 sin 2phi``, ``k^4``, ``1``; see
:func:`cryonb.ctf.ctf_features`) with five per-particle coefficients, optionally the first
peak left intact, a B-factor envelope ``exp(b4 k^2)`` and a scale. As array expressions on a
GPU that is a float64 matrix product, then ``sin``, a negation, the envelope, the scale and a
cast, each a pass over ``m x P`` float64 values: at 256 px, 16,000 particles and the current
size's ~7,000 pixels, about 6 GB of memory traffic per E-step. Here one CUDA thread per
value evaluates the same float64 expression and writes the result once (in ``float32`` or
``float64``); the CPU path is the array expression (:func:`ctf_values_reference`).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["ctf_values", "ctf_values_reference", "ctf_weights", "ctf_weights_reference"]


def ctf_values_reference(coef, feat, *, intact_first_peak: bool = False, b4=None, scale=None,
                         dtype="float32", aligned: bool = False):
    """Array-expression version (the CPU path, per-particle pixels and the tests' reference).

    Parameters and returns as :func:`ctf_values`.
    """
    xp = array_module(feat)
    C = xp.asarray(coef, dtype=xp.float64)
    if aligned:
        arg = xp.einsum("m...f,mf->m...", feat, C)
        k2 = feat[..., 0]
    else:
        arg = xp.tensordot(C, feat, axes=([1], [feat.ndim - 1]))
        k2 = feat[..., 0][None]
    ctf = -xp.sin(arg)
    if intact_first_peak:
        ctf = xp.where(xp.abs(arg) < np.pi / 2, 1.0, ctf)
    shape = (-1, *(1,) * (arg.ndim - 1))
    if b4 is not None:
        ctf = ctf * xp.exp(xp.asarray(b4, dtype=xp.float64).reshape(shape) * k2)
    if scale is not None:
        ctf = ctf * xp.asarray(scale, dtype=xp.float64).reshape(shape)
    return ctf.astype(dtype, copy=False)


_SRC = r"""
extern "C" __global__
void ctf_values(const double* coef, const double* feat, const double* b4, const double* scale,
                int has_b4, int has_scale, long long m, long long P, int intact, OUT_T* out)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= m * P) return;
    const long long i = idx / P, p = idx - i * P;
    const double* c = coef + 5 * i;
    const double* f = feat + 5 * p;
    const double arg = c[0] * f[0] + c[1] * f[1] + c[2] * f[2] + c[3] * f[3] + c[4] * f[4];
    double v = -sin(arg);
    if (intact && fabs(arg) < 1.5707963267948966) v = 1.0;
    if (has_b4) v = v * exp(b4[i] * f[0]);
    if (has_scale) v = v * scale[i];
    out[idx] = (OUT_T)v;
}
"""


def ctf_values(coef, feat, *, intact_first_peak: bool = False, b4=None, scale=None,
               dtype="float32", aligned: bool = False):
    """Each particle's CTF at shared pixels: ``-sin(coef . feat)``, envelope and scale.

    Parameters
    ----------
    coef : float64 array of shape (m, 5)
        Per particle, the coefficients of the CTF's argument (host or device).
    feat : float64 array of shape (*S, 5), or (m, *S, 5) with ``aligned``
        Per pixel, :func:`cryonb.ctf.ctf_features` (on the device of the result); with
        ``aligned``, each particle's own pixels (the array expression computes those).
    intact_first_peak : bool
        1 where ``|argument| < pi / 2`` (RELION's ``--ctf_intact_first_peak``).
    b4 : float array of shape (m,), optional
        Envelope ``exp(b4 k^2)`` per particle (``-B / 4`` in the units of ``feat``'s ``k^2``).
    scale : float array of shape (m,), optional
        Factor per particle.
    dtype : str
        ``float32`` or ``float64``: the result's type (computed in float64, rounded once).

    Returns
    -------
    array of shape (m, *S)
    """
    xp = array_module(feat)
    dtype = np.dtype(dtype)
    if xp is np or aligned or dtype not in (np.float32, np.float64):
        return ctf_values_reference(coef, feat, intact_first_peak=intact_first_peak, b4=b4,
                                    scale=scale, dtype=dtype, aligned=aligned)
    f64 = xp.float64
    C = xp.ascontiguousarray(xp.asarray(coef, dtype=f64))
    m, S = C.shape[0], feat.shape[:-1]
    P = int(np.prod(S))
    out = xp.empty((m, *S), dtype)
    if m == 0 or P == 0:
        return out
    # per-particle factors (a one-value placeholder where there are none)
    per = [xp.zeros(1, f64) if v is None else xp.ascontiguousarray(xp.broadcast_to(
        xp.asarray(v, dtype=f64).reshape(-1), (m,))) for v in (b4, scale)]
    src = _SRC.replace("OUT_T", "float" if dtype == np.float32 else "double")
    nt = 256
    cuda_function(src, "ctf_values")(
        ((m * P + nt - 1) // nt,), (nt,),
        (C, xp.ascontiguousarray(feat, dtype=f64), per[0], per[1], np.int32(b4 is not None),
         np.int32(scale is not None), np.int64(m), np.int64(P),
         np.int32(bool(intact_first_peak)), out))
    return out


def ctf_weights_reference(ctf, scale, invsig, optics):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`ctf_weights`.
    """
    xp = array_module(ctf)
    if scale is not None:
        ctf = ctf * xp.asarray(scale, dtype=xp.float32)[:, None]
    inv = invsig[xp.asarray(optics)]
    cinv = ctf * inv
    return ctf, inv, cinv, ctf * cinv


_WEIGHTS_SRC = r"""
extern "C" __global__
void ctf_weights(const float* ctf, const float* scale, int has_scale, const float* invsig,
                 const long long* optics, long long m, long long P, float* cs, float* inv,
                 float* cinv, float* c2)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= m * P) return;
    const long long i = idx / P, p = idx - i * P;
    const float c = has_scale ? __fmul_rn(ctf[idx], scale[i]) : ctf[idx];
    const float s = invsig[optics[i] * P + p];
    const float ci = __fmul_rn(c, s);
    cs[idx] = c;
    inv[idx] = s;
    cinv[idx] = ci;
    c2[idx] = __fmul_rn(c, ci);
}
"""


def ctf_weights(ctf, scale, invsig, optics):
    """A pool's CTF and noise weights per pixel, the products the E-step's passes use.

    Parameters
    ----------
    ctf : float32 array of shape (m, P)
        Each particle's CTF at the pass's pixels.
    scale : float32 array of shape (m,), or None
        Factor per particle (the model's scale correction); None for none.
    invsig : float32 array of shape (G, P)
        ``1 / sigma2`` of each optics group at the pixels.
    optics : int array of shape (m,)
        Each particle's optics group (a row of ``invsig``).

    Returns
    -------
    ctf, inv, cinv, c2 : float32 arrays of shape (m, P)
        ``ctf * scale``, ``invsig[optics]``, ``ctf * inv`` and ``ctf * cinv`` (each product
        rounded once, as the array expressions: the same bits on both backends). On the GPU
        one pass over the pixels instead of five.
    """
    xp = array_module(ctf)
    if xp is np:
        return ctf_weights_reference(ctf, scale, invsig, optics)
    f32 = xp.float32
    ctf = xp.ascontiguousarray(ctf, dtype=f32)
    m, P = ctf.shape
    out = [xp.empty((m, P), f32) for _ in range(4)]
    if m and P:
        nt = 256
        cuda_function(_WEIGHTS_SRC, "ctf_weights")(
            ((m * P + nt - 1) // nt,), (nt,),
            (ctf, xp.zeros(1, f32) if scale is None else xp.ascontiguousarray(scale, dtype=f32),
             np.int32(scale is not None), xp.ascontiguousarray(invsig, dtype=f32),
             xp.ascontiguousarray(xp.asarray(optics), dtype=xp.int64), np.int64(m),
             np.int64(P), *out))
    return tuple(out)
