"""Particle images for the E-step's products: masked before the transform, shifted after it.

:func:`mask_images_2d`: norm correction, integer centring, soft mask.

Each image is scaled by its norm correction, shifted circularly by its rounded offset and
masked with RELION's soft circular mask; outside the mask it gets either its own background
mean (``--zero_mask``, RELION's ``softMaskOutsideMap``) or the given noise. As array
expressions that is six to eight passes over the pool's images (two gathers for the shift);
on the GPU it is one CUDA block per image that reads the shifted image twice (the background
sum, over the pixels outside the mask only, then the result) and writes it once, a warp per
row; on the CPU the
same as a Numba loop (2000 x 64^2 images: 0.23 s -> 0.034 s).

:func:`shifted_images_ri`: the second pass's shifted images ``X_b e^{i phi_t}`` as
``[Re | Im]`` rows, weighted (``CTF / sigma2``), in one pass instead of six: one
CUDA thread per output pixel on the GPU, a Numba loop on the CPU (13x the array expressions'
speed at 60,000 rows of 1,100 pixels, which spent most of their time in temporaries). The
complex products round as each compiler contracts them (NumPy's and CUDA's with fused
multiply-adds): the three agree to an ulp, not bit for bit.

:func:`window_shift`: a pass's pixels of the pool's transforms, each particle shifted by its
sub-pixel offset: one gather and a phase ramp, a dozen array operations over the pool's
pixels (cosines, sines, complex temporaries), in one CUDA thread per output pixel on the GPU.
"""

from __future__ import annotations

import functools

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function

__all__ = ["mask_images_2d", "mask_images_2d_reference", "shifted_images_ri",
           "shifted_images_ri_reference", "window_shift", "window_shift_reference"]


def mask_images_2d_reference(imgs, scale, shift, mask, noise=None):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`mask_images_2d`.
    """
    xp = array_module(imgs)
    N = imgs.shape[1]
    if scale is not None:
        imgs = imgs * xp.asarray(scale, dtype=xp.float32)[:, None, None]
    r = np.asarray(shift, dtype=np.int64)
    ar = np.arange(N)
    rows = xp.asarray((ar[None, :] - r[:, 1:2]) % N)
    cols = xp.asarray((ar[None, :] - r[:, 0:1]) % N)
    imgs = xp.take_along_axis(imgs, rows[:, :, None], axis=1)
    imgs = xp.take_along_axis(imgs, cols[:, None, :], axis=2)
    outside = 1 - mask
    if noise is None:
        bg = (imgs * outside).sum(axis=(1, 2)) / outside.sum()
        return imgs * mask + bg[:, None, None] * outside
    return imgs * mask + noise * outside


#: CUDA: the sum over a block of NT threads (NT defined before) of one value per thread; every
#: thread of the block calls it and gets the sum
BLOCK_SUM_SRC = r"""
__device__ __forceinline__ double block_sum(double v, double* s)
{
    s[threadIdx.x] = v;
    __syncthreads();
    for (int h = NT / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
        __syncthreads();
    }
    return s[0];
}
"""

_CUDA_SRC = "#define NT 256\n" + BLOCK_SUM_SRC + r"""
extern "C" __global__
void mask_images(const float* imgs, const float* scale, const int* shift, const float* mask,
                 const float* noise, int use_noise, float inv_out, int N, float* out,
                 const long long* rows, int has_rows, float* bg_out, int defer)
{
    // one block per image; each warp takes rows, its lanes a row's pixels (a row of the
    // shifted image is one run of the input row, wrapped once: coalesced reads, and no
    // division per pixel)
    __shared__ double s[NT];
    const long long b = blockIdx.x;
    const long long NN = (long long)N * N;
    const float* x = imgs + (has_rows ? rows[b] : b) * NN;
    float* o = out + b * NN;
    const int rx = ((shift[2 * b] % N) + N) % N, ry = ((shift[2 * b + 1] % N) + N) % N;
    const float f = scale[b];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = NT / 32;
    float bg = 0.0f;
    if (!use_noise && !defer) {
        // the background's sum first (the filled result needs it in the pass that writes)
        double acc = 0.0;
        for (int y = warp; y < N; y += nw) {
            int sy = y - ry;
            if (sy < 0) sy += N;
            const float* row = x + (long long)sy * N;
            const float* m = mask + (long long)y * N;
            for (int xx = lane; xx < N; xx += 32) {
                // inside the mask (1 - m = 0) the term is zero: not read (about 60% of
                // the pixels at RELION's default mask, whose sectors are then not loaded)
                const float om = 1.0f - m[xx];
                if (om == 0.0f) continue;
                int sx = xx - rx;
                if (sx < 0) sx += N;
                acc += (double)(row[sx] * f) * (double)om;
            }
        }
        bg = (float)(block_sum(acc, s) * (double)inv_out);
    }
    // defer: the background left out (added after the transform); this pass writes the
    // masked image and sums the background's terms (the same terms in the same order)
    const float* nz = noise + (use_noise ? b * NN : 0);
    double acc = 0.0;
    for (int y = warp; y < N; y += nw) {
        int sy = y - ry;
        if (sy < 0) sy += N;
        const float* row = x + (long long)sy * N;
        const long long r0 = (long long)y * N;
        for (int xx = lane; xx < N; xx += 32) {
            int sx = xx - rx;
            if (sx < 0) sx += N;
            const float v = row[sx] * f;
            const float m = mask[r0 + xx];
            const float om = 1.0f - m;
            if (defer) {
                o[r0 + xx] = v * m;
                if (om != 0.0f) acc += (double)v * (double)om;
            } else {
                o[r0 + xx] = v * m + (use_noise ? nz[r0 + xx] : bg) * om;
            }
        }
    }
    if (defer) {
        const double total = block_sum(acc, s);
        if (threadIdx.x == 0) bg_out[b] = (float)(total * (double)inv_out);
    }
}
"""


def mask_images_2d(imgs, scale, shift, mask, noise=None, outside=None, rows=None,
                   background=None):
    """Norm-corrected, centred, masked images.

    Parameters
    ----------
    imgs : float32 array of shape (B, N, N), or (S, N, N) with ``rows``
        The images, (row y, column x).
    scale : float array of shape (B,) or None
        Factor per image (the norm correction); None for none.
    shift : int array of shape (B, 2)
        Circular shift (x, y) per image in pixels (on the host or the images' device): the
        content moves by ``+shift``, ``out[y, x] = in[y - shift_y, x - shift_x]`` (indices
        modulo N).
    mask : float32 array of shape (N, N)
        The soft mask (1 inside, 0 outside).
    noise : float32 array of shape (B, N, N), optional
        What goes outside the mask; None: each image's own weighted background mean,
        ``sum(img (1 - mask)) / sum(1 - mask)`` (RELION's ``--zero_mask``).
    outside : float, optional
        ``sum(1 - mask)``, if known (see :func:`mask_outside`); otherwise computed here,
        which on the GPU reads a sum back from the device (a synchronisation per call).
    rows : int array of shape (B,), optional
        Image ``b`` is ``imgs[rows[b]]`` (default ``b``): a pool's images read in place from
        a device store (:class:`cryonb.parallel.resident.StoredRows`).
    background : float32 array of shape (B,), optional
        Without ``noise``: each image's background mean is written here and left out of the
        result, ``img * mask``; the caller adds ``background * (1 - mask)`` later (e.g.
        after a linear transform: :func:`window_shift`'s and
        :func:`cryonb.kernels.shell_power`'s ``outside``). One pass over the images where
        the filled result takes two (the background's sum first).

    Returns
    -------
    float32 array of shape (B, N, N)
        ``img * mask + background * (1 - mask)`` (``img * mask`` with ``background``), a
        new array.
    """
    xp = array_module(imgs)
    if rows is not None and xp is np:  # (the CPU loop reads the images it is given)
        imgs, rows = imgs[np.asarray(rows)], None
    B, N = (len(imgs) if rows is None else len(rows)), imgs.shape[-1]
    out = xp.empty((B, N, N), xp.float32)
    if B == 0:
        return out
    f32 = xp.float32
    scale = xp.ones(B, f32) if scale is None else xp.asarray(scale, dtype=f32)
    mask = xp.ascontiguousarray(mask, dtype=f32)
    inv_out = np.float32(1.0 / (mask_outside(mask) if outside is None else float(outside)))
    defer = background is not None
    if defer and (noise is not None or background.shape != (B,) or background.dtype != f32
                  or not background.flags.c_contiguous):
        raise ValueError("background: a contiguous float32 array of one value per image, "
                         "and no noise (the background is the images' own)")
    if xp is np:
        _mask_cpu()(np.ascontiguousarray(imgs, dtype=f32), scale,
                    np.ascontiguousarray(shift, dtype=np.int64), mask,
                    out if noise is None else np.ascontiguousarray(noise, dtype=f32),
                    noise is not None, inv_out, out, defer,
                    background if defer else np.empty(0, f32))
        return out
    cuda_function(_CUDA_SRC, "mask_images")(
        (B,), (256,),
        (xp.ascontiguousarray(imgs, dtype=f32), xp.ascontiguousarray(scale),
         xp.ascontiguousarray(xp.asarray(shift), dtype=xp.int32), mask,
         out if noise is None else xp.ascontiguousarray(noise, dtype=f32),
         np.int32(noise is not None), inv_out, np.int32(N), out,
         xp.zeros(1, xp.int64) if rows is None
         else xp.ascontiguousarray(xp.asarray(rows), dtype=xp.int64), np.int32(rows is not None),
         background if defer else xp.empty(1, f32), np.int32(defer)))
    return out


def mask_outside(mask) -> float:
    """``sum(1 - mask)`` of a float32 mask (N, N) as :func:`mask_images_2d` computes it."""
    xp = array_module(mask)
    return float((1 - xp.ascontiguousarray(mask, dtype=xp.float32)).sum())


def shifted_images_ri_reference(X, phases, weight, rows, shifts):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`shifted_images_ri`.
    """
    xp = array_module(X)
    Xc = X[rows] * phases[shifts]
    Xt = xp.concatenate([Xc.real, Xc.imag], axis=1)
    del Xc
    w = weight[rows]
    return Xt * xp.concatenate([w, w], axis=1)


_SHIFT_SRC = r"""
extern "C" __global__
void shifted_ri(const float2* X, const float2* ph, const float* w, const long long* rows,
                const long long* shifts, long long n, int P, float* Y)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * P) return;
    const long long i = idx / P;
    const int p = (int)(idx % P);
    const long long b = rows[i];
    const float2 x = X[b * P + p];
    const float2 e = ph[shifts[i] * P + p];
    const float re = x.x * e.x - x.y * e.y;
    const float im = x.x * e.y + x.y * e.x;
    const float c = w[b * P + p];
    const long long o = i * 2 * P + p;
    Y[o] = re * c;
    Y[o + P] = im * c;
}
"""


def shifted_images_ri(X, phases, weight, rows, shifts):
    """Weighted shifted images as ``[Re | Im]`` rows.

    Parameters
    ----------
    X : complex64 array of shape (B, P)
        Images at the pass's pixels.
    phases : complex64 array of shape (T, P)
        Phase ramp of each translation.
    weight : float32 array of shape (B, P)
        Per-image pixel weights (``CTF / sigma2``).
    rows, shifts : int arrays of shape (n,)
        Image and translation of each output row.

    Returns
    -------
    Y : float32 array of shape (n, 2P)
        ``[Re | Im](X[rows] * phases[shifts]) * [weight[rows] | weight[rows]]`` (the second
        pass reads only these rows: the plain shifted images are not written, which halved
        the kernel's writes).
    """
    xp = array_module(X)
    n, P = int(rows.shape[0]), int(X.shape[1])
    Y = xp.empty((n, 2 * P), xp.float32)
    if n == 0 or P == 0:
        return Y
    if xp is np:
        _shifted_cpu()(np.ascontiguousarray(X, dtype=np.complex64),
                       np.ascontiguousarray(phases, dtype=np.complex64),
                       np.ascontiguousarray(weight, dtype=np.float32),
                       np.asarray(rows, np.int64), np.asarray(shifts, np.int64), Y)
        return Y
    nt = 256
    cuda_function(_SHIFT_SRC, "shifted_ri")(
        ((n * P + nt - 1) // nt,), (nt,),
        (xp.ascontiguousarray(X, dtype=xp.complex64),
         xp.ascontiguousarray(phases, dtype=xp.complex64),
         xp.ascontiguousarray(weight, dtype=xp.float32), xp.ascontiguousarray(rows, dtype=xp.int64),
         xp.ascontiguousarray(shifts, dtype=xp.int64), np.int64(n), np.int32(P), Y))
    return Y


def window_shift_reference(F, flat, kx, ky, frac, n: int, outside=None):
    """Array-expression version (the CPU path and the tests' reference).

    Parameters and returns as :func:`window_shift`.
    """
    xp = array_module(F)
    fr = xp.asarray(frac, dtype=xp.float32)
    kx, ky = (xp.asarray(k, dtype=xp.float32) for k in (kx, ky))
    ph = np.float32(-2 * np.pi / n) * (fr[:, 0:1] * kx[None] + fr[:, 1:2] * ky[None])
    flat = xp.asarray(flat)
    X = F[:, flat]
    if outside is not None:
        bg, C = outside
        X = X + xp.asarray(bg, dtype=xp.float32)[:, None] * C[flat]
    return X * (xp.cos(ph) + 1j * xp.sin(ph)).astype(xp.complex64)


_WINDOW_SRC = r"""
extern "C" __global__
void window_shift(const float2* F, long long npix, const long long* flat, const float* kx,
                  const float* ky, const float* frac, long long n, int P, float c, float2* out,
                  const float* bg, const float2* C, int has_bg)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * P) return;
    const long long b = idx / P;
    const int p = (int)(idx % P);
    const float ph = c * (frac[2 * b] * kx[p] + frac[2 * b + 1] * ky[p]);
    float s, co;
    sincosf(ph, &s, &co);
    float2 x = F[b * npix + flat[p]];
    if (has_bg) {  // the background left out of the masked image, transformed
        const float2 e = C[flat[p]];
        x = make_float2(__fadd_rn(x.x, __fmul_rn(bg[b], e.x)),
                        __fadd_rn(x.y, __fmul_rn(bg[b], e.y)));
    }
    out[idx] = make_float2(x.x * co - x.y * s, x.x * s + x.y * co);
}
"""


def window_shift(F, flat, kx, ky, frac, n: int, outside=None):
    """A pass's Fourier pixels of each image, shifted by the image's sub-pixel offset.

    Parameters
    ----------
    F : complex64 array of shape (B, npix)
        Whole half-plane transforms (:func:`cryonb.fourier.fft2_centered`'s layout, flat).
    flat : int array of shape (P,)
        The pass's pixels (indices into a transform's ``npix``).
    kx, ky : float32 arrays of shape (P,)
        Their frequencies (pixels of the ``n`` box).
    frac : float array of shape (B, 2)
        Each image's shift (x, y) in pixels (the content moves by ``+frac``).
    n : int
        Box size.
    outside : (bg, C), optional
        A term left out of ``F``, added first: ``F + bg[:, None] * C`` with ``bg`` float32
        (B,) and ``C`` complex64 (npix,) (the background of :func:`mask_images_2d`'s
        ``background`` and the transform of ``1 - mask``).

    Returns
    -------
    complex64 array of shape (B, P)
        ``F[:, flat] * exp(-2 pi i (frac_x kx + frac_y ky) / n)`` (the phase in float32).
    """
    xp = array_module(F)
    if xp is np:
        return window_shift_reference(F, flat, kx, ky, frac, n, outside)
    B, P = int(F.shape[0]), int(flat.shape[0])
    out = xp.empty((B, P), xp.complex64)
    if B == 0 or P == 0:
        return out
    nt = 256
    cuda_function(_WINDOW_SRC, "window_shift")(
        ((B * P + nt - 1) // nt,), (nt,),
        (xp.ascontiguousarray(F, dtype=xp.complex64), np.int64(F.shape[1]),
         xp.ascontiguousarray(flat, dtype=xp.int64), xp.ascontiguousarray(kx, dtype=xp.float32),
         xp.ascontiguousarray(ky, dtype=xp.float32),
         xp.ascontiguousarray(xp.asarray(frac), dtype=xp.float32), np.int64(B), np.int32(P),
         np.float32(-2 * np.pi / n), out, *_outside_args(xp, outside, B, F.shape[1])))
    return out


def _outside_args(xp, outside, B: int, npix: int):
    """The kernels' ``bg``, ``C`` and ``has_bg`` arguments for an ``outside`` term (unused
    one-value arrays for none)."""
    if outside is None:
        return xp.empty(1, xp.float32), xp.empty(1, xp.complex64), np.int32(0)
    bg, C = outside
    if bg.shape != (B,) or C.shape != (npix,):
        raise ValueError(f"outside: {B} backgrounds and a transform of {npix} pixels expected, "
                         f"got {bg.shape} and {C.shape}")
    return (xp.ascontiguousarray(bg, dtype=xp.float32),
            xp.ascontiguousarray(C, dtype=xp.complex64), np.int32(1))


@functools.cache
def _mask_cpu():
    """The CUDA kernel ``mask_images`` as a Numba loop over the images (the background sum in
    float64, as there)."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def kern(imgs, scale, shift, mask, noise, use_noise, inv_out, out, defer, bg_out):
        B, N, _ = imgs.shape
        one = np.float32(1.0)
        for b in range(B):
            rx, ry = shift[b, 0], shift[b, 1]
            f = scale[b]
            bg = np.float32(0.0)
            if defer:  # one pass: the masked image, and the background's sum apart
                acc = 0.0
                for y in range(N):
                    sy = (y - ry) % N
                    for x in range(N):
                        v = imgs[b, sy, (x - rx) % N] * f
                        m = mask[y, x]
                        out[b, y, x] = v * m
                        om = one - m
                        if om != 0:
                            acc += np.float64(v) * om
                bg_out[b] = np.float32(acc * inv_out)
                continue
            if not use_noise:
                acc = 0.0
                for y in range(N):
                    sy = (y - ry) % N
                    for x in range(N):
                        om = one - mask[y, x]
                        if om != 0:  # zero terms skipped, as on the GPU (the same sum)
                            acc += np.float64(imgs[b, sy, (x - rx) % N] * f) * om
                bg = np.float32(acc * inv_out)
            for y in range(N):
                sy = (y - ry) % N
                for x in range(N):
                    m = mask[y, x]
                    outside = noise[b, y, x] if use_noise else bg
                    out[b, y, x] = imgs[b, sy, (x - rx) % N] * f * m + outside * (one - m)

    return kern


@functools.cache
def _shifted_cpu():
    """The CUDA kernel ``shifted_ri`` as a Numba loop over the output rows (in parallel: each
    row is written by one thread, the same operations as on one)."""
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def kern(X, ph, w, rows, shifts, Y):
        P = X.shape[1]
        for i in numba.prange(rows.shape[0]):
            b, t = rows[i], shifts[i]
            for p in range(P):
                x, e, c = X[b, p], ph[t, p], w[b, p]
                re = x.real * e.real - x.imag * e.imag
                im = x.real * e.imag + x.imag * e.real
                Y[i, p] = re * c
                Y[i, P + p] = im * c

    return kern
