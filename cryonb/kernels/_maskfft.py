"""The E-step's masked images, transformed: :func:`mask_images_2d`, then the batched real FFT.

On the CPU and by default the two steps as written: the masking writes the masked images,
the transform reads them. On a GPU whose cuFFT takes JIT (LTO) load callbacks, the transform
reads each masked value straight from the images as it needs it (:data:`_CB_SRC`): the
masked images are never written to the device's memory and read back (at 256 px, 16,000
images: 8 GB of the masking's 10 GB of traffic). Only each image's background mean, with
``--zero_mask``, is made before, by :func:`mask_images_2d`'s own sum (a pass over the pixels
outside the mask). The values the transform reads are those :func:`mask_images_2d` writes, up
to how the compiler contracts ``v f m + bg (1 - m)``; the two ways agree to float32 rounding.

The callback's arguments are a struct of the arrays' addresses in device memory: one struct
per thread and device, rewritten by a one-thread kernel before each transform (stream
ordered), so that one cuFFT plan per batch size serves every call. Where the callback cannot
be compiled or linked (no nvJitLink, a cuFFT without LTO callbacks), or
``CRYONB_FFT_CALLBACK=0`` is set, the two steps run as written; :func:`callback_state` says
which way is taken and why.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ..backend import array_module, fft_module
from ._cuda import cuda_function
from ._prepare import _CUDA_SRC as _MASK_SRC
from ._prepare import mask_images_2d, mask_outside

__all__ = ["callback_state", "masked_rfft2"]

#: the load callback's arguments (the same layout in the callback and in ``mask_cb_info``)
_INFO_STRUCT = r"""
struct CryonbMaskInfo {
    const float* imgs;       // the images (or a device store's rows)
    const long long* rows;   // image b is imgs[rows[b]] where has_rows
    const int* shift;        // (B, 2) circular shift (x, y)
    const float* scale;      // (B,) factor per image
    const float* mask;       // (N, N)
    const float* fill;       // (B,) background means, or (B, N, N) noise where use_noise
    long long n;             // N
    int has_rows;
    int use_noise;
};
"""

#: value ``offset`` of the transform's (B, N, N) input: :func:`mask_images_2d`'s formula
_CB_SRC = "#include <cufftXt.h>\n" + _INFO_STRUCT + r"""
__device__ cufftReal cryonb_mask_load(void* dataIn, unsigned long long offset,
                                      void* callerInfo, void* sharedPtr)
{
    const CryonbMaskInfo* p = (const CryonbMaskInfo*)callerInfo;
    const long long N = p->n, NN = N * N;
    const long long b = (long long)offset / NN;
    const int r = (int)((long long)offset - b * NN);
    const int y = r / (int)N, x = r - y * (int)N;
    int rx = p->shift[2 * b] % (int)N, ry = p->shift[2 * b + 1] % (int)N;
    if (rx < 0) rx += (int)N;
    if (ry < 0) ry += (int)N;
    int sy = y - ry, sx = x - rx;
    if (sy < 0) sy += (int)N;
    if (sx < 0) sx += (int)N;
    const long long row = p->has_rows ? p->rows[b] : b;
    const float m = p->mask[r];
    const float v = p->imgs[row * NN + (long long)sy * N + sx];
    const float o = p->use_noise ? p->fill[offset] : p->fill[b];
    return v * p->scale[b] * m + o * (1.0f - m);
}
"""

_INFO_SRC = _INFO_STRUCT + r"""
extern "C" __global__
void mask_cb_info(CryonbMaskInfo* p, const float* imgs, const long long* rows, int has_rows,
                  const int* shift, const float* scale, const float* mask, const float* fill,
                  int use_noise, long long n)
{
    p->imgs = imgs; p->rows = rows; p->shift = shift; p->scale = scale; p->mask = mask;
    p->fill = fill; p->n = n; p->has_rows = has_rows; p->use_noise = use_noise;
}
"""

_state = {"enabled": None, "why": ""}
_local = threading.local()


def callback_state() -> dict:
    """Whether the GPU transforms take the masking as a cuFFT load callback.

    Returns
    -------
    dict
        ``enabled``: True (in use), False (not: ``why`` says why), None (not tried yet in
        this process).
    """
    return dict(_state)


def _info_buffer(cp):
    """This thread's callback struct on the current device (64 bytes, kept for the plans)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    dev = cp.cuda.Device().id
    if dev not in bufs:
        bufs[dev] = cp.zeros(64, cp.uint8)
    return bufs[dev]


def _with_callback(cp, imgs, rows, shift, scale, mask, fill, use_noise, B, N):
    """The transform of the masked images through the load callback (``rows``: int64 on the
    device, or None)."""
    info = _info_buffer(cp)
    cuda_function(_INFO_SRC, "mask_cb_info")(
        (1,), (1,), (info, imgs, cp.zeros(1, cp.int64) if rows is None else rows,
                     np.int32(rows is not None), shift, scale, mask, fill,
                     np.int32(use_noise), np.int64(N)))
    # the transform's nominal input, never read (the callback reads the images): a buffer
    # of its own, not the images' memory, in case cuFFT used its input as work space
    nominal = cp.empty((B, N, N), cp.float32)
    with cp.fft.config.set_cufft_callbacks(cb_load=_CB_SRC, cb_load_name="cryonb_mask_load",
                                           cb_ver="jit", cb_load_data=info.data):
        return cp.fft.rfft2(nominal, axes=(-2, -1))


def masked_rfft2(imgs, scale, shift, mask, noise=None, outside=None, rows=None):
    """``rfft2`` (unnormalised, NumPy's convention) of :func:`mask_images_2d`'s images.

    Parameters
    ----------
    imgs, scale, shift, mask, noise, outside, rows
        As :func:`mask_images_2d`.

    Returns
    -------
    complex64 array of shape (B, N, N // 2 + 1)
        The transforms, on the images' device.
    """
    xp = array_module(imgs)
    B, N = (len(imgs) if rows is None else len(rows)), imgs.shape[-1]
    use = (xp is not np and B > 0 and _state["enabled"] is not False
           and os.environ.get("CRYONB_FFT_CALLBACK", "1") != "0")
    if use:
        cp = xp
        f32 = cp.float32
        scale_d = cp.ones(B, f32) if scale is None else cp.asarray(scale, dtype=f32)
        mask_d = cp.ascontiguousarray(mask, dtype=f32)
        shift_d = cp.asarray(np.ascontiguousarray(shift, dtype=np.int32))
        imgs_d = cp.ascontiguousarray(imgs, dtype=f32)
        rows_d = (None if rows is None
                  else cp.ascontiguousarray(cp.asarray(rows), dtype=cp.int64))
        if noise is None:
            inv_out = np.float32(1.0 / (mask_outside(mask_d) if outside is None
                                        else float(outside)))
            fill = cp.empty(B, f32)
            cuda_function(_MASK_SRC, "mask_background")(
                (B,), (256,), (imgs_d, scale_d, shift_d, mask_d, inv_out, np.int32(N), fill,
                               cp.zeros(1, cp.int64) if rows_d is None else rows_d,
                               np.int32(rows_d is not None)))
        else:
            fill = cp.ascontiguousarray(noise, dtype=f32)
        try:
            F = _with_callback(cp, imgs_d, rows_d, shift_d, scale_d, mask_d, fill,
                               noise is not None, B, N)
        except Exception as exc:  # no LTO callbacks here: the two steps as written
            if _state["enabled"]:
                raise
            _state.update(enabled=False, why=f"{type(exc).__name__}: {exc}"[:500])
        else:
            _state.update(enabled=True, why="")
            return F.astype(cp.complex64, copy=False)
    masked = mask_images_2d(imgs, scale, shift, mask, noise, outside=outside, rows=rows)
    return fft_module(xp).rfft2(masked, axes=(-2, -1)).astype(xp.complex64, copy=False)
