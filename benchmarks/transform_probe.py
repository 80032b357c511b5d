"""The E-step's image transforms on the GPU: the fused kernels of masked_transforms against
the separate steps (masking, FFT, window with sub-pixel shifts, shell powers), each step
timed apart, on one pool of random images.

    python benchmarks/transform_probe.py --n 16000 --box 256 --size 110 [--json F]

``--size``: the current image size (the fine window's diameter in pixels). ``--min_blocks``:
the fused kernels also compiled with their registers fitted to that many resident blocks.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--size", type=int, default=110)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--min_blocks", type=int, nargs="*", default=[3, 4],
                    help="also time the fused kernels with registers fitted to this many "
                         "resident blocks (cryonb.kernels._transform.MIN_BLOCKS)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import cupy as cp

    from cryonb.backend import fft_module
    from cryonb.em._estep import _pixels, soft_circular_mask
    from cryonb.kernels import (
        mask_images_2d,
        masked_transforms,
        shell_power,
        transform_tables,
        window_shift,
    )

    n, B = a.box, a.n
    rng = np.random.default_rng(0)
    imgs = cp.asarray(rng.normal(size=(B, n, n)).astype(np.float32))
    scale = cp.asarray(rng.uniform(0.8, 1.2, B).astype(np.float32))
    shift = cp.asarray(rng.integers(-5, 5, (B, 2)).astype(np.int32))
    frac = rng.uniform(-0.5, 0.5, (B, 2)).astype(np.float32)
    mask = cp.asarray(np.fft.ifftshift(soft_circular_mask(n, 0.4 * n, 5.0)).astype(np.float32))
    flat, kx, ky, _ = _pixels(n, a.size)
    h = n // 2 + 1
    KY, KX = np.meshgrid(np.fft.fftfreq(n, 1 / n), np.arange(h), indexing="ij")
    bins = np.rint(np.hypot(KX, KY)).astype(int).ravel()
    outside = fft_module(cp).rfft2(1 - mask).astype(cp.complex64).ravel()
    tables = transform_tables(n, flat, kx, ky, np.where(bins < h, bins, -1), h, outside, cp)
    separate = tables._replace(packed=None)
    out_sum = float((1 - mask).sum())

    def timed(fn):
        fn()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(a.repeat):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1))
        return float(np.median(ts))

    res = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "n": B,
           "box": n, "size": a.size, "P": int(flat.size)}
    from cryonb.kernels import _transform

    def fused():
        return masked_transforms(imgs, scale, shift, mask, frac, tables, outside=out_sum)

    res["fused_ms"] = timed(fused)
    print("fused", res["fused_ms"], flush=True)
    # the kernels' registers fitted to more resident blocks (fewer registers, more warps)
    for k in a.min_blocks:
        _transform.MIN_BLOCKS = k
        res[f"fused_min_blocks_{k}_ms"] = timed(fused)
        print(f"fused, {k} blocks", res[f"fused_min_blocks_{k}_ms"], flush=True)
    _transform.MIN_BLOCKS = 0
    # the column kernel's tables read again for each image (fewer registers)
    _transform.HOLD_TABLES = False
    res["fused_tables_reread_ms"] = timed(fused)
    print("fused, tables read again", res["fused_tables_reread_ms"], flush=True)
    _transform.HOLD_TABLES = True
    res["separate_ms"] = timed(lambda: masked_transforms(imgs, scale, shift, mask, frac,
                                                         separate, outside=out_sum))
    bg = cp.empty(B, cp.float32)
    res["mask_ms"] = timed(lambda: mask_images_2d(imgs, scale, shift, mask, outside=out_sum,
                                                  background=bg))
    masked = mask_images_2d(imgs, scale, shift, mask, outside=out_sum, background=bg)
    res["fft_ms"] = timed(lambda: fft_module(cp).rfft2(masked, axes=(-2, -1)))
    F = fft_module(cp).rfft2(masked, axes=(-2, -1)).reshape(B, -1)
    masked = None
    term = (bg, outside)
    res["window_ms"] = timed(lambda: window_shift(F, tables.flat, tables.kx, tables.ky, frac, n,
                                                  term))
    res["shell_power_ms"] = timed(lambda: shell_power(F, tables.shells, term))
    # the two ways agree (the fused kernels' FFT against cuFFT)
    x1, p1 = masked_transforms(imgs[:64], scale[:64], shift[:64], mask, frac[:64], tables,
                               outside=out_sum)
    x2, p2 = masked_transforms(imgs[:64], scale[:64], shift[:64], mask, frac[:64], separate,
                               outside=out_sum)
    res["max_rel_diff_xf"] = float(cp.abs(x1 - x2).max() / cp.abs(x2).max())
    res["max_rel_diff_power"] = float((cp.abs(p1 - p2) / cp.maximum(p2, 1e-30)).max())
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
