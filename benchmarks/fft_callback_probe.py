"""Whether cuFFT load callbacks (JIT LTO, through CuPy) can take the E-step's masking into the
transform, and what they cost there. Run on the GPU machine (through the device tool).

At 256 px the E-step's preparation is two passes at the memory's speed: the masking kernel
(``cryonb.kernels.mask_images_2d``: each image from the device store, shifted by its rounded
offset, scaled by its norm correction, masked, the background outside the mask, written out)
and the batched real transform of what it wrote. A cuFFT load callback could hand the
transform each masked value as it reads it, so the masked images are never written and read
back. This script measures, on one card and the same images:

1. the masking kernel, then ``rfft2`` of its output (the E-step's way);
2. ``rfft2`` alone (the transform's own time: the ceiling of the callback's way);
3. ``rfft2`` with a JIT load callback that masks from the store rows (the background values
   given, as the masking kernel's first pass would make them), and whether its transforms
   equal those of 1. to float32 rounding.

A callback that costs little over 2. would take most of the masking kernel's time out of the
E-step (its background pass reads only the pixels outside the mask). CuPy's JIT callbacks
need cuFFT with LTO callbacks and nvJitLink; where they are missing the script says so.

Measured on an H200 (2026-12-07, 16,000 images of 256 px, cuFFT 12.0 through CuPy 14.2): the
callback works (its transforms equal 1.'s to 2.5e-7) but costs 17.5 ms against 10.0 ms for
1. (masking 4.9 ms, ``rfft2`` 5.1 ms): with a callback cuFFT runs one LTO kernel
(``body_lto_fft``, 16.4 ms in the E-step's profile) instead of its two-kernel plan. The
E-step keeps the masking kernel and the plain transform.

    python benchmarks/fft_callback_probe.py [--n 16000] [--box 256] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: the load callback: value ``offset`` of the transform's (B, N, N) input, from the store's
#: row ``rows[b]`` shifted by ``shift[b]`` (x, y; in [0, N)), scaled, masked, the background
#: outside the mask (the masking kernel's formula)
_CALLBACK = r"""
#include <cufftXt.h>

struct MaskInfo {
    const float* store;
    const long long* rows;
    const int* shift;
    const float* scale;
    const float* mask;
    const float* bg;
    long long n;
};

__device__ cufftReal cryonb_mask_load(void* dataIn, unsigned long long offset,
                                      void* callerInfo, void* sharedPtr)
{
    const MaskInfo* p = (const MaskInfo*)callerInfo;
    const long long N = p->n, NN = N * N;
    const long long b = (long long)offset / NN;
    const int r = (int)((long long)offset - b * NN);
    const int y = r / (int)N, x = r - y * (int)N;
    int sy = y - p->shift[2 * b + 1];
    if (sy < 0) sy += (int)N;
    int sx = x - p->shift[2 * b];
    if (sx < 0) sx += (int)N;
    const float m = p->mask[r];
    const float v = p->store[p->rows[b] * NN + (long long)sy * N + sx];
    return v * p->scale[b] * m + p->bg[b] * (1.0f - m);
}
"""


def _caller_info(cp, *arrays, n: int):
    """The callback's ``MaskInfo`` on the device: the arrays' pointers, then ``n``."""
    words = np.array([a.data.ptr for a in arrays] + [n], dtype=np.uint64)
    return cp.asarray(words.view(np.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16000, help="images (default 16000)")
    ap.add_argument("--box", type=int, default=256, help="box size, px (default 256)")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    import cupy as cp
    from cupyx.profiler import benchmark

    from cryonb.em._estep import mask_radius, soft_circular_mask
    from cryonb.kernels import mask_images_2d, mask_outside

    n, N = a.n, a.box
    rng = np.random.default_rng(0)
    store = cp.asarray(rng.standard_normal((n, N, N), dtype=np.float32))
    rows = cp.asarray(rng.permutation(n))
    shift = rng.integers(-8, 9, (n, 2))
    scale = cp.asarray(rng.uniform(0.8, 1.2, n).astype(np.float32))
    mask = soft_circular_mask(N, mask_radius(0.8 * N * 1.0, N, 1.0), xp=cp)
    outside = mask_outside(mask)
    out = {"card": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "n": n, "box": N,
           "cupy": cp.__version__, "cufft": cp.cuda.cufft.getVersion()}

    def ms(fn):
        r = benchmark(fn, n_repeat=10, n_warmup=2)
        return round(float(np.median(r.gpu_times)) * 1e3, 3)

    def note(key, value):
        """Record a result at once (a crash later, in the callback, keeps what came before)."""
        out[key] = value
        print(json.dumps({key: value}), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))

    masked = mask_images_2d(store, scale, shift, mask, outside=outside, rows=rows)
    want = cp.fft.rfft2(masked)
    # the background per image as the masking kernel makes it: its value at the box's
    # corner, outside the mask (m = 0 there)
    bg_img = masked[:, 0, 0].copy() if float(mask[0, 0]) == 0 else None
    note("mask_ms", ms(lambda: mask_images_2d(store, scale, shift, mask, outside=outside,
                                               rows=rows)))
    note("rfft2_ms", ms(lambda x=masked: cp.fft.rfft2(x)))
    # the masking kernel with larger blocks: fewer images in flight, so that the second
    # pass may find the first pass's pixels (outside the mask) in L2 instead of memory
    from cryonb.kernels import _prepare
    from cryonb.kernels._cuda import cuda_function

    for nt in (512, 1024):
        src = _prepare._CUDA_SRC.replace("#define NT 256", f"#define NT {nt}")
        fn = cuda_function(src, "mask_images")
        o2 = cp.empty_like(masked)
        args = (store, scale, cp.asarray(shift.astype(np.int32)),
                cp.ascontiguousarray(mask, dtype=cp.float32), o2, np.int32(0),
                np.float32(1.0 / outside), np.int32(N), o2, rows.astype(cp.int64), np.int32(1))

        def run(fn=fn, nt=nt, args=args):
            fn((n,), (nt,), args)

        run()
        note(f"mask_nt{nt}_max_abs_diff", float(cp.abs(o2 - masked).max()))
        note(f"mask_nt{nt}_ms", ms(run))
        del o2
    del masked
    if bg_img is None:
        out["callback"] = "the mask reaches the box's corner: no background value to read back"
    else:
        # the arrays the callback reads, held here for as long as it may run: the struct
        # keeps only their addresses (temporaries freed after the first call left the next
        # calls reading reused memory, the cause of the illegal address in the first run)
        held = (store, rows, cp.asarray(np.mod(shift, N).astype(np.int32).ravel()), scale,
                cp.ascontiguousarray(mask, dtype=cp.float32), bg_img.astype(cp.float32))
        info = _caller_info(cp, *held, n=N)
        nominal = store[:n]  # the transform's input buffer: read only through the callback

        def with_callback():
            with cp.fft.config.set_cufft_callbacks(
                    cb_load=_CALLBACK, cb_load_name="cryonb_mask_load", cb_ver="jit",
                    cb_load_data=info.data):
                return cp.fft.rfft2(nominal)

        try:
            got = with_callback()
        except Exception as exc:  # a missing cuFFT LTO / nvJitLink is the answer, not a crash
            out["callback"] = f"failed: {exc!r}"
        else:
            err = float(cp.abs(got - want).max() / cp.abs(want).max())
            note("callback_max_rel_error", err)
            note("callback", "ok" if err < 1e-5 else "values differ")
            note("callback_ms", ms(with_callback))
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
