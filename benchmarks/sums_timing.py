"""GPU timings of E-step parts at sizes taken from the class2d_gpu.py grid (issue 3).

Times, each with ``cupyx.profiler.benchmark`` (GPU time, median of repeats):

- ``ctf_at`` for one pool (2048 particles, the pixels of a 64-pixel current size at 128 px);
- the second pass's data sums at 64 px, K=200 (one pool's samples): the sparse products of
  :func:`cryonb.kernels.scatter_products` as cuSPARSE products (split into building the CSR
  matrix and the product itself) and with the samples grouped by row;
- :func:`cryonb.kernels.residual_sums_blocks` on as many samples in blocks of 4 x 2 (a coarse
  sample's sub-translations and sub-rotations).

Run on the GPU machine: ``python benchmarks/sums_timing.py``.
"""

from __future__ import annotations

import json

import numpy as np


def main() -> dict:
    import cupy
    import cupyx.scipy.sparse as sp
    from cupyx.profiler import benchmark

    from cryonb.ctf import CTFParams, ctf_at
    from cryonb.kernels import residual_sums_blocks, scatter_products, segment_starts

    def t(fn, n=5):
        return float(np.median(benchmark(fn, n_repeat=n, n_warmup=1).gpu_times[0]))

    out = {}
    rng = np.random.default_rng(0)
    B = 2048
    k = np.arange(-32, 33)
    kx, ky = np.meshgrid(np.arange(0, 33), k)
    keep = kx**2 + ky**2 < 32**2
    kxd, kyd = cupy.asarray(kx[keep], cupy.float64), cupy.asarray(ky[keep], cupy.float64)
    params = CTFParams(defocus_u=rng.uniform(1e4, 3e4, B), defocus_v=rng.uniform(1e4, 3e4, B),
                       defocus_angle=rng.uniform(0, 180, B))
    out["ctf_at_s"] = t(lambda: ctf_at(params, kxd, kyd, 128, 1.5, cupy))
    out["ctf_pixels"] = int(keep.sum())

    # second-pass sums at 64 px, K=200, psi 6: 2048 particles x 84 shifted images, 24,000
    # accumulator rows of 2P = 1,800 values; ~40,000 samples per particle, sorted by
    # (shifted image, row) within each particle
    P, rows, T, per = 900, 24000, 84, 40000
    n = B * per
    b = np.repeat(np.arange(B), per)
    t_of = np.sort(rng.integers(0, T, (B, per)), axis=1).reshape(-1)
    btn = cupy.asarray(b * T + t_of)
    rn = cupy.asarray(rng.integers(0, rows, n))
    o = cupy.argsort(btn * rows + rn)
    btn, rn = btn[o], rn[o]
    w = cupy.asarray(rng.random(n), cupy.float32)
    Y = cupy.asarray(rng.standard_normal((B * T, 2 * P)), cupy.float32)
    A = cupy.asarray(rng.standard_normal((rows, 2 * P)), cupy.float32)
    acc = cupy.zeros((rows, 2 * P), cupy.float64)
    out["samples"] = n
    out["sort_s"] = t(lambda: cupy.argsort(btn * rows + rn), 3)
    for how in ("sparse", "rows"):
        out[f"scatter_{how}_s"] = t(
            lambda how=how: scatter_products(acc, Y, None, btn, btn, rn, w, how), 3)

    def build():
        return sp.coo_matrix((w.astype(cupy.float64), (rn.astype(cupy.int32),
                                                       btn.astype(cupy.int32))),
                             shape=(rows, Y.shape[0])).tocsr()
    S = build()
    out["coo_to_csr_s"] = t(build, 3)
    Y64 = Y.astype(cupy.float64)
    out["spmm_f64_s"] = t(lambda: S @ Y64, 3)
    S32 = S.astype(cupy.float32)
    out["spmm_f32_s"] = t(lambda: S32 @ Y, 3)
    # the transposed matrix straight from the sorted samples (no sort): CSR of S^T
    indptr = cupy.concatenate([cupy.zeros(1, cupy.int64),
                               cupy.cumsum(cupy.bincount(btn, minlength=B * T))]).astype(
        cupy.int32)
    ST = sp.csr_matrix((w.astype(cupy.float64), rn.astype(cupy.int32), indptr),
                       shape=(B * T, rows))
    out["spmm_transposed_f64_s"] = t(lambda: ST.T @ Y64, 3)
    # the same number of samples as blocks of 4 sub-translations x 2 sub-rotations
    nb = n // 8
    bb = cupy.asarray(np.repeat(np.arange(B), per // 8))
    iu = bb * (T // 4) + cupy.asarray(rng.integers(0, T // 4, nb))
    iv = cupy.asarray(rng.integers(0, rows // 2, nb))
    wb = cupy.asarray(rng.random((nb, 2, 4)), cupy.float32)
    starts = segment_starts(bb, B)
    out["residual_sums_blocks_s"] = t(
        lambda: residual_sums_blocks(Y, A, iu, iv, 4, 2, starts, wb), 3)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
