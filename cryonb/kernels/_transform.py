"""The E-step's image transforms: masked images to a pass's shifted Fourier pixels and the
images' power per shell, without the whole transforms written in between.

:func:`masked_transforms` does what :func:`cryonb.kernels.mask_images_2d`, a real-to-complex
FFT, :func:`cryonb.kernels.window_shift` and :func:`cryonb.kernels.shell_power` do one after
the other (the CPU path, and the GPU path for boxes that are not a power of two). On the GPU,
for boxes of 64 to 512 pixels (powers of two), it is two kernels, with only the rows' transform
written out between them:

- ``rows_fft``: one block per image. A warp masks two rows (norm correction, integer centring,
  soft mask, the background's sum) and transforms them as one complex row
  (``z = row_a + i row_b``, untangled with ``Z[N - k]``); the block writes the half spectrum's
  rows transposed, each column's values contiguous.
- ``cols_fft``: a warp per column of a few images. It transforms the column, adds the
  background's term (``--zero_mask``: ``bg * FT(1 - mask)``), sums the power per shell and
  writes the pixels of the pass, shifted by each image's sub-pixel offset.

The images then cross the device's memory twice (read, and the rows' transform written and
read) where the separate steps crossed it about six times (the masking's read and write, the
FFT's two passes, the window's and the shell powers' reads). The masked images are never
held: the pool's peak memory for its transforms falls by a third (cuFFT's workspace aside).
Measured on an H100 (``benchmarks/transform_probe.py``, 4,096 images of 256 px, current size
110): 3.19 ms against 3.50 ms for the separate steps. The kernels move about 1 TB/s, a third
of the card's bandwidth, so something other than the memory bounds them (not yet profiled;
the in-warp transforms' shuffles and the block synchronisations are the suspects).

The in-warp FFT of ``N = 32 E`` points: lane ``l`` holds ``z[l + 32 m]`` (``m < E``); an
``E``-point transform in registers, twiddles ``w^(l k1)``, then a 32-point transform across
the lanes (shuffles). Lane ``l``'s register ``j`` then holds ``Z[rev(j) + E rev5(l)]``
(indices bit-reversed). Twiddles come from a table computed in double precision.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module
from ._cuda import cuda_function
from ._prepare import BLOCK_SUM_SRC, mask_images_2d, mask_outside, window_shift
from ._shells import ShellTable, shell_power, shell_table

__all__ = ["TransformTables", "masked_transforms", "transform_tables"]

#: boxes the GPU kernels transform (the others go through the separate steps)
FUSED_BOXES = (64, 128, 256, 512)
#: images per block of ``cols_fft`` (the column's tables are read once for them)
_COL_IMAGES = 4
_PIX_BITS = 18  # packed table: pixel + 1 in the low bits, shell + 1 above
#: resident blocks per multiprocessor the kernels' registers are fitted to
#: (``__launch_bounds__``'s second argument; 0: the compiler's choice, 80 registers a thread
#: at 256 px, i.e. three blocks); ``benchmarks/transform_probe.py`` times the choices
MIN_BLOCKS = 0
#: ``cols_fft`` holds a column's table entries in registers for its images (80 registers a
#: thread at 256 px); False: reads them again for each image (63 registers, four blocks)
HOLD_TABLES = True


class TransformTables(NamedTuple):
    """What :func:`masked_transforms` needs of a pass and a box (:func:`transform_tables`)."""

    n: int  #: box size
    flat: Any  #: int64 (P,): the pass's pixels, indices into the (n, n // 2 + 1) half spectrum
    kx: Any  #: float32 (P,)
    ky: Any  #: float32 (P,)
    shells: ShellTable  #: the half spectrum's pixels by shell (for the shell powers)
    outside: Any  #: complex64 (n * (n // 2 + 1),) or None: the transform of 1 - mask
    packed: Any  #: GPU: int32 (n // 2 + 1, n), each column's pixel and shell, FFT order
    outside_t: Any  #: GPU: complex64 (n // 2 + 1, n), ``outside`` in the same order
    twiddles: Any  #: GPU: complex64 (n,), exp(-2 pi i j / n)

    @property
    def fused(self) -> bool:
        """Whether the GPU kernels do the transforms (a CUDA box size)."""
        return self.packed is not None


def _fft_order(n: int) -> np.ndarray:
    """The frequency each (register, lane) of the in-warp FFT holds: (n,) with entry
    ``j * 32 + lane`` = ``rev(j) + E * rev5(lane)``."""
    E = n // 32
    bits = E.bit_length() - 1
    rev = np.array([int(format(j, f"0{bits}b")[::-1], 2) for j in range(E)], np.int64)
    rev5 = np.array([int(format(l, "05b")[::-1], 2) for l in range(32)], np.int64)
    return (rev[:, None] + E * rev5[None, :]).ravel()


def transform_tables(n: int, flat, kx, ky, bins, n_bins: int, outside=None,
                     xp=np) -> TransformTables:
    """The tables of :func:`masked_transforms` for one pass's pixels.

    Parameters
    ----------
    n : int
        Box size.
    flat : int array of shape (P,)
        The pass's pixels: distinct indices into the flattened (n, n // 2 + 1) half
        spectrum (``ky`` rows, ``kx`` columns).
    kx, ky : float arrays of shape (P,)
        Their frequencies (pixels; ``kx`` the column, ``ky`` the row as ``fftfreq``).
    bins : int array of shape (n * (n // 2 + 1),)
        Each half-spectrum pixel's shell; pixels outside ``0..n_bins-1`` are left out of the
        powers.
    n_bins : int
    outside : complex array of shape (n * (n // 2 + 1),), optional
        The transform of ``1 - mask`` (``--zero_mask``: the images' backgrounds are added in
        Fourier space).
    xp : module
        Where the tables are used.
    """
    flat_h = np.asarray(flat.get() if hasattr(flat, "get") else flat).astype(np.int64)
    bins_h = np.asarray(bins.get() if hasattr(bins, "get") else bins).astype(np.int64)
    h = n // 2 + 1
    if bins_h.shape != (n * h,):
        raise ValueError(f"bins: one per half-spectrum pixel ({n * h}), got {bins_h.shape}")
    f32 = xp.float32
    out_c = (None if outside is None
             else xp.ascontiguousarray(xp.asarray(outside).reshape(-1), dtype=xp.complex64))
    packed = outside_t = tw = None
    if xp is not np and n in FUSED_BOXES and n_bins <= h:
        pix = np.zeros(n * h, np.int64)
        pix[flat_h] = np.arange(1, flat_h.size + 1)
        shell = np.where((bins_h >= 0) & (bins_h < n_bins), bins_h + 1, 0)
        code = (pix | (shell << _PIX_BITS)).reshape(n, h)  # (ky, kx)
        order = _fft_order(n)
        packed = xp.asarray(np.ascontiguousarray(code[order].T), dtype=xp.int32)  # (h, n)
        if out_c is not None:
            outside_t = xp.ascontiguousarray(out_c.reshape(n, h)[xp.asarray(order)].T)
        tw = xp.asarray(np.exp(-2j * np.pi * np.arange(n) / n).astype(np.complex64))
    return TransformTables(n, xp.asarray(flat_h), xp.asarray(kx, dtype=f32),
                           xp.asarray(ky, dtype=f32),
                           shell_table(np.where(bins_h < n_bins, bins_h, -1), n_bins, xp),
                           out_c, packed, outside_t, tw)


_CUDA_SRC = r"""
// NN: the box (a power of two, 64..512), defined before this source
#define E (NN / 32)
#define HALF (NN / 2 + 1)
#define WARPS (NN >= 512 ? 4 : 8)
#define NT (32 * WARPS)
#define FULL 0xffffffffu
#define PIX_BITS 18

#define LOGE (E == 2 ? 1 : E == 4 ? 2 : E == 8 ? 3 : 4)

__device__ __forceinline__ float2 cmul(float2 a, float2 b)
{
    return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

__device__ constexpr int rev_bits(int x, int bits)
{
    int r = 0;
    for (int i = 0; i < bits; ++i) r = (r << 1) | ((x >> i) & 1);
    return r;
}

__device__ __forceinline__ int rev5(int l) { return (int)(__brev((unsigned)l) >> 27); }

// where warp_fft's Z[k] is in a warp's [j][lane] array (rows padded to 33)
__device__ __forceinline__ int at(int k)
{
    return (int)(__brev((unsigned)(k & (E - 1))) >> (32 - LOGE)) * 33 + rev5(k >> LOGE);
}

// In-warp forward FFT of NN points (exp(-2 pi i n k / NN)): lane l holds v[m] = z[l + 32 m];
// on return v[j] holds Z[rev_bits(j, LOGE) + E * rev5(l)].
__device__ __forceinline__ void warp_fft(float2 (&v)[E], const float2* __restrict__ w,
                                         int lane)
{
    // E-point transforms over the registers (decimation in frequency)
#pragma unroll
    for (int s = 0; s < LOGE; ++s) {
        const int h = (E / 2) >> s;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            if ((j & h) == 0) {
                const float2 a = v[j], b = v[j + h];
                v[j] = make_float2(a.x + b.x, a.y + b.y);
                v[j + h] = cmul(make_float2(a.x - b.x, a.y - b.y),
                                w[(j & (h - 1)) * (NN / (2 * h))]);
            }
        }
    }
    // twiddles between the two factors: w^(l k1), k1 = rev(j)
#pragma unroll
    for (int j = 1; j < E; ++j) v[j] = cmul(v[j], w[lane * rev_bits(j, LOGE)]);
    // 32-point transforms across the lanes
#pragma unroll
    for (int s = 0; s < 5; ++s) {
        const int h = 16 >> s;
        const bool up = (lane & h) != 0;
        const float2 t = w[(lane & (h - 1)) * (NN / (2 * h))];
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const float ox = __shfl_xor_sync(FULL, v[j].x, h);
            const float oy = __shfl_xor_sync(FULL, v[j].y, h);
            v[j] = up ? cmul(make_float2(ox - v[j].x, oy - v[j].y), t)
                      : make_float2(v[j].x + ox, v[j].y + oy);
        }
    }
}

"""

_KERNELS_SRC = r"""
extern "C" __global__ void __launch_bounds__(BOUNDS)
rows_fft(const float* __restrict__ imgs, const long long* __restrict__ rows, int has_rows,
         const float* __restrict__ scale, const int* __restrict__ shift,
         const float* __restrict__ mask, const float* __restrict__ noise, int use_noise,
         float inv_out, const float2* __restrict__ w, float2* __restrict__ R,
         float* __restrict__ bg_out)
{
    // R[b][kx][y]: the rows' half spectra, transposed. Without noise the image is masked
    // without its background, whose mean goes to bg_out (added in Fourier space).
    __shared__ float2 zs[WARPS][E * 33];        // a warp's transform, [j][lane] (padded)
    __shared__ float2 tile[HALF][2 * WARPS + 1];  // a round's rows by column (padded)
    __shared__ double red[NT];
    const long long b = blockIdx.x;
    const long long NN2 = (long long)NN * NN;
    const float* x = imgs + (has_rows ? rows[b] : b) * NN2;
    const float* nz = noise + (use_noise ? b * NN2 : 0);
    const int rx = ((shift[2 * b] % NN) + NN) % NN, ry = ((shift[2 * b + 1] % NN) + NN) % NN;
    const float f = scale[b];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float2* out = R + b * (long long)HALF * NN;
    float2* z = zs[warp];
    double acc = 0.0;
    for (int y0 = 0; y0 < NN; y0 += 2 * WARPS) {
        const int ya = y0 + 2 * warp;  // this warp's rows ya and ya + 1
        float2 v[E];
#pragma unroll
        for (int m = 0; m < E; ++m) {
            const int xx = lane + 32 * m;
            int sx = xx - rx;
            if (sx < 0) sx += NN;
            float val[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int y = ya + r;
                int sy = y - ry;
                if (sy < 0) sy += NN;
                const float p = x[(long long)sy * NN + sx] * f;
                const float mk = mask[y * NN + xx];
                const float om = 1.0f - mk;
                if (use_noise) {
                    val[r] = p * mk + nz[(long long)y * NN + xx] * om;
                } else {
                    val[r] = p * mk;
                    if (om != 0.0f) acc += (double)p * (double)om;
                }
            }
            v[m] = make_float2(val[0], val[1]);
        }
        warp_fft(v, w, lane);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < E; ++j) z[j * 33 + lane] = v[j];
        __syncwarp();
        // untangle: A[k] = (Z[k] + conj Z[-k]) / 2, B[k] = (Z[k] - conj Z[-k]) / (2i)
        for (int k = lane; k < HALF; k += 32) {
            const int kn = (NN - k) & (NN - 1);
            const float2 p = z[at(k)], q = z[at(kn)];
            tile[k][2 * warp] = make_float2(0.5f * (p.x + q.x), 0.5f * (p.y - q.y));
            tile[k][2 * warp + 1] = make_float2(0.5f * (p.y + q.y), -0.5f * (p.x - q.x));
        }
        __syncthreads();
        for (int i = threadIdx.x; i < HALF * 2 * WARPS; i += NT) {
            const int k = i / (2 * WARPS), r = i % (2 * WARPS);
            out[(long long)k * NN + y0 + r] = tile[k][r];
        }
        __syncthreads();
    }
    if (!use_noise) {
        const double total = block_sum(acc, red);
        if (threadIdx.x == 0) bg_out[b] = (float)(total * (double)inv_out);
    }
}

extern "C" __global__ void __launch_bounds__(BOUNDS)
cols_fft(const float2* __restrict__ R, long long B, const float2* __restrict__ w,
         const int* __restrict__ packed, const float* __restrict__ bg,
         const float2* __restrict__ C, int has_bg, const float* __restrict__ frac, float c,
         long long P, float2* __restrict__ Xf, int n_bins, double* __restrict__ power)
{
    // IMGS images per block; warp u takes columns u, u + WARPS, ... of each of them
    __shared__ float acc[IMGS][WARPS][HALF];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long b0 = (long long)blockIdx.x * IMGS;
    for (int i = threadIdx.x; i < IMGS * WARPS * HALF; i += NT) (&acc[0][0][0])[i] = 0.0f;
    __syncthreads();
    for (int col = warp; col < HALF; col += WARPS) {
#if HOLD_TABLES  // the column's table entries held in registers for its IMGS images
        int code[E];
        float2 cw[E];
#pragma unroll
        for (int j = 0; j < E; ++j) {
            code[j] = packed[col * NN + j * 32 + lane];
            cw[j] = has_bg ? C[col * NN + j * 32 + lane] : make_float2(0.0f, 0.0f);
        }
#endif
        const float kxv = (float)col;
        for (int i = 0; i < IMGS; ++i) {
            const long long b = b0 + i;
            if (b >= B) break;
            const float2* in = R + (b * HALF + col) * (long long)NN;
            float2 v[E];
#pragma unroll
            for (int m = 0; m < E; ++m) v[m] = in[lane + 32 * m];
            warp_fft(v, w, lane);
            const float g = has_bg ? bg[b] : 0.0f;
            const float fx = frac[2 * b], fy = frac[2 * b + 1];
#pragma unroll
            for (int j = 0; j < E; ++j) {
#if HOLD_TABLES
                const int cj = code[j];
                const float2 e = cw[j];
#else  // read again for each image (L1 hits): fewer registers, more resident warps
                const int cj = packed[col * NN + j * 32 + lane];
                const float2 e = has_bg ? C[col * NN + j * 32 + lane] : make_float2(0.0f, 0.0f);
#endif
                float2 X = v[j];
                if (has_bg) {
                    X = make_float2(__fadd_rn(X.x, __fmul_rn(g, e.x)),
                                    __fadd_rn(X.y, __fmul_rn(g, e.y)));
                }
                const int s = cj >> PIX_BITS;
                if (s) atomicAdd(&acc[i][warp][s - 1], X.x * X.x + X.y * X.y);
                const int p = cj & ((1 << PIX_BITS) - 1);
                if (p) {
                    const int k = rev_bits(j, LOGE) + E * rev5(lane);
                    const float kyv = (float)(k < NN / 2 ? k : k - NN);
                    const float ph = c * (fx * kxv + fy * kyv);
                    float sn, cs;
                    sincosf(ph, &sn, &cs);
                    Xf[b * P + p - 1] = make_float2(X.x * cs - X.y * sn, X.x * sn + X.y * cs);
                }
            }
        }
    }
    __syncthreads();
    for (int i = 0; i < IMGS; ++i) {
        const long long b = b0 + i;
        if (b >= B) break;
        for (int s = threadIdx.x; s < n_bins; s += NT) {
            double t = 0.0;
            for (int u = 0; u < WARPS; ++u) t += (double)acc[i][u][s];
            power[b * n_bins + s] = t;
        }
    }
}
"""


def _source(n: int, hold_tables: bool | None = None, min_blocks: int | None = None) -> str:
    """The kernels' source for box ``n`` (defaults: :data:`HOLD_TABLES`, :data:`MIN_BLOCKS`)."""
    hold = HOLD_TABLES if hold_tables is None else hold_tables
    blocks = MIN_BLOCKS if min_blocks is None else min_blocks
    bounds = f"NT, {blocks}" if blocks else "NT"
    return (f"#define NN {n}\n#define IMGS {_COL_IMAGES}\n#define BOUNDS {bounds}\n"
            f"#define HOLD_TABLES {int(hold)}\n" + _CUDA_SRC + BLOCK_SUM_SRC + _KERNELS_SRC)


def masked_transforms(imgs, scale, shift, mask, frac, tables: TransformTables, noise=None,
                      outside=None, rows=None):
    """Masked images' pixels of a pass, shifted, and their power per shell.

    Parameters
    ----------
    imgs : float32 array of shape (B, N, N), or (S, N, N) with ``rows``
        The images (real space, origin at the centre).
    scale, shift, mask, noise, outside, rows
        As :func:`cryonb.kernels.mask_images_2d` (the mask with its origin at ``[0, 0]``;
        without ``noise`` the background is left out of the masked image and its term is
        added from ``tables.outside``, which must then be given).
    frac : float32 array of shape (B, 2)
        Each image's sub-pixel shift, as :func:`cryonb.kernels.window_shift`'s.
    tables : TransformTables
        From :func:`transform_tables` (for the same array module).

    Returns
    -------
    Xf : complex64 array of shape (B, P)
        ``window_shift(rfft2(masked), tables.flat, ..., frac)``.
    power : float64 array of shape (B, tables.shells.n_bins)
        ``shell_power`` of the whole half spectrum (squares in float32; on the GPU summed
        per warp in float32, then in float64).
    """
    xp = array_module(imgs)
    n = tables.n
    B = int(len(rows) if rows is not None else imgs.shape[0])
    f32 = xp.float32
    if noise is None and tables.outside is None:
        raise ValueError("masked_transforms: without noise, tables.outside (the transform "
                         "of 1 - mask) is needed")
    # (the kernels index with the tables' box: other shapes would read out of bounds)
    shapes = {"images": (tuple(imgs.shape[-2:]), (n, n)), "mask": (tuple(mask.shape), (n, n)),
              "frac": (tuple(np.shape(frac)), (B, 2)), "shift": (tuple(np.shape(shift)), (B, 2))}
    if noise is not None:
        shapes["noise"] = (tuple(noise.shape), (B, n, n))
    if scale is not None:
        shapes["scale"] = (tuple(np.shape(scale)), (B,))
    bad = [f"{k} {got} (expected {want})" for k, (got, want) in shapes.items() if got != want]
    if bad:
        raise ValueError(f"masked_transforms: the tables are for {B} images of {n} px; got "
                         + ", ".join(bad))
    if not tables.fused or B == 0:
        from ..backend import fft_module

        bg = xp.empty(B, f32) if noise is None else None
        masked = mask_images_2d(imgs, scale, shift, mask, noise, outside=outside, rows=rows,
                                background=bg)
        F = fft_module(xp).rfft2(masked, axes=(-2, -1)).astype(xp.complex64, copy=False)
        F = F.reshape(B, -1)
        term = None if bg is None else (bg, tables.outside)
        return (window_shift(F, tables.flat, tables.kx, tables.ky, frac, n, term),
                shell_power(F, tables.shells, term))
    inv_out = np.float32(1.0 / (mask_outside(mask) if outside is None else float(outside)))
    half = n // 2 + 1
    R = xp.empty((B, half, n), xp.complex64)
    bg = xp.empty(B, f32)
    src = _source(n)
    warps = 4 if n >= 512 else 8
    cuda_function(src, "rows_fft")(
        (B,), (32 * warps,),
        (xp.ascontiguousarray(imgs, dtype=f32),
         xp.zeros(1, xp.int64) if rows is None
         else xp.ascontiguousarray(xp.asarray(rows), dtype=xp.int64), np.int32(rows is not None),
         xp.ones(B, f32) if scale is None else xp.ascontiguousarray(xp.asarray(scale), dtype=f32),
         xp.ascontiguousarray(xp.asarray(shift), dtype=xp.int32),
         xp.ascontiguousarray(mask, dtype=f32),
         bg if noise is None else xp.ascontiguousarray(noise, dtype=f32),
         np.int32(noise is not None), inv_out, tables.twiddles, R, bg))
    P = int(tables.flat.shape[0])
    n_bins = tables.shells.n_bins
    Xf = xp.empty((B, P), xp.complex64)
    power = xp.empty((B, n_bins), xp.float64)
    has_bg = noise is None
    cuda_function(src, "cols_fft")(
        ((B + _COL_IMAGES - 1) // _COL_IMAGES,), (32 * warps,),
        (R, np.int64(B), tables.twiddles, tables.packed, bg,
         tables.outside_t if has_bg else tables.twiddles, np.int32(has_bg),
         xp.ascontiguousarray(xp.asarray(frac), dtype=f32), np.float32(-2 * np.pi / n),
         np.int64(P), Xf, np.int32(n_bins), power))
    return Xf, power
