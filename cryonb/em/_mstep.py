"""The M-step of 2D classification and the initial model (host, NumPy, float64)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..backend import fft_threads, usable_cores
from ..fourier import fft2_centered, radial_index_2d
from ._estep import coarse_image_size, mask_diameter, soft_circular_mask
from ._model import (
    MINRES_MAP,
    Class2DModel,
    Class2DSums,
    pack_arrays,
    ssnr_max_shell,
    unpack_arrays,
)

__all__ = ["InitSums", "initial_model", "initial_pass_sums", "maximization", "shell_pixel_counts"]



def shell_pixel_counts(n: int) -> np.ndarray:
    """Half-plane Fourier pixels per shell (``round(|k|)``) of an ``n`` box, shape (n//2+1,)."""
    sh = radial_index_2d(n, np).ravel()
    return np.bincount(sh[sh <= n // 2], minlength=n // 2 + 1).astype(np.float64)


def _shell_mean(power2d, n, *, of_power: bool = False):
    """Mean of a half-plane quantity of an ``n`` box per shell -> (..., n//2+1).

    With ``of_power``, ``power2d`` is a complex transform and the mean is of its power
    ``|F|^2`` in float64, computed for the pixels within the shells only (the same values
    as ``_shell_mean((F.real**2 + F.imag**2).astype(np.float64), n)``, without making the
    full-size power and its float64 copy).
    """
    sh = radial_index_2d(n, np).ravel()
    keep = sh <= n // 2
    flat = power2d.reshape((*power2d.shape[:-2], -1))[..., keep]
    if of_power:
        flat = (flat.real**2 + flat.imag**2).astype(np.float64)
    onehot = (sh[keep][:, None] == np.arange(n // 2 + 1)[None]).astype(np.float64)
    return flat @ onehot / np.maximum(onehot.sum(axis=0), 1)


@dataclass
class InitSums:
    """Sums of the initial pass over all particles (RELION's initial references and noise).

    Attributes
    ----------
    image_sum : (N, N)
        Sum of the (masked with ``--zero_mask``) particle images.
    power_sum : (G, N//2+1)
        Sum of per-shell mean power of those images' transforms, per optics group.
    count : (G,)
        Particles per optics group.
    data, weight : (K, pad*N, pad*N//2+1) complex128 / float64
        Random-subset class sums: every particle is inserted, CTF-weighted, into a random
        class at a random in-plane angle (RELION's initial references without ``--ref``).
    """

    image_sum: np.ndarray
    power_sum: np.ndarray
    count: np.ndarray
    data: np.ndarray
    weight: np.ndarray

    _FIELDS = ("image_sum", "power_sum", "count", "data", "weight")

    @classmethod
    def zeros(cls, K: int, N: int, pad: int, n_optics: int) -> InitSums:
        """Empty sums."""
        P = pad * N
        return cls(np.zeros((N, N)), np.zeros((n_optics, N // 2 + 1)), np.zeros(n_optics),
                   np.zeros((K, P, P // 2 + 1), np.complex128), np.zeros((K, P, P // 2 + 1)))

    def to_vector(self):
        """Pack into one float64 vector."""
        return pack_arrays(getattr(self, k) for k in self._FIELDS)

    def shapes(self):
        """Shapes for :meth:`from_vector`."""
        return [(k, getattr(self, k).shape, bool(np.iscomplexobj(getattr(self, k))))
                for k in self._FIELDS]

    @classmethod
    def from_vector(cls, vec, shapes):
        """Unpack :meth:`to_vector`."""
        return cls(**unpack_arrays(vec, shapes))

    def add_(self, other: InitSums) -> InitSums:
        """In-place sum."""
        for k in self._FIELDS:
            getattr(self, k)[...] += getattr(other, k)
        return self


def initial_pass_sums(images, meta: dict, config, pixel_size: float, n_optics: int,
                      mask) -> InitSums:
    """Worker side of the initial pass for one pool (host arrays).

    Parameters
    ----------
    images : (B, N, N) float32
    meta : dict
        ``optics`` (B,), ``ctf`` (dict of (B,) arrays), ``init_class`` (B,), ``init_psi`` (B,).
    config : Class2DConfig
    pixel_size : float
    n_optics : int
    mask : (N, N)
        Particle mask (applied with ``--zero_mask``, background set to its mean).
    """
    from ..ctf import CTFParams, ctf_at
    from ..data.conventions import rotated_indices
    from ..kernels import insert_slices_2d
    from ._estep import _pixels

    imgs = np.asarray(images, np.float32)
    B, N = imgs.shape[0], imgs.shape[-1]
    if config.zero_mask:
        outside = 1 - mask
        bg = (imgs * outside).sum(axis=(1, 2)) / outside.sum()
        imgs = imgs * mask + bg[:, None, None] * outside
    F = fft2_centered(imgs)
    ps = _shell_mean(F, N, of_power=True)
    out = InitSums.zeros(config.K, N, config.pad, n_optics)
    np.add.at(out.power_sum, meta["optics"], ps)
    np.add.at(out.count, meta["optics"], 1)
    out.image_sum += imgs.sum(axis=0, dtype=np.float64)
    # RELION's seeds: the transform is windowed to n0 = round(0.07 N) pixels and inserted up
    # to radius n0 // 2 (ml_optimiser.cpp, calculateSumOfPowerSpectraAndAverageImage: the
    # shell index n0 is used as the window size), so the seeds hold shells 0..n0 // 2 only
    h = seed_radius(N)
    flat, kx, ky, _ = _pixels(N, 2 * h + 1, include_dc=True)
    X = F.reshape(B, -1)[:, flat]
    if config.ctf:
        c = ctf_at(CTFParams.from_dict(meta["ctf"]), kx, ky, N, pixel_size,
                   intact_first_peak=config.ctf_intact_first_peak).reshape(B, -1)
    else:
        c = np.ones((B, len(flat)), np.float32)
    coords = rotated_indices(kx, ky, meta["init_psi"]) * config.pad
    insert_slices_2d(out.data, out.weight, (X * c).astype(np.complex128), (c * c).astype(
        np.float64), coords.astype(np.float32), np.asarray(meta["init_class"], np.int64),
        config.pad * h)
    return out


def seed_radius(N: int) -> int:
    """Fourier radius (pixels) of the iteration-0 seeds: ``round(0.07 N) // 2``, as RELION."""
    return max(1, round(0.07 * N) // 2)


def initial_size(N: int, incr_size: int) -> int:
    """RELION's first image size without ``--ini_high``: ``2 * (round(0.07 N) + incr_size)``."""
    return int(min(N, 2 * (round(0.07 * N) + incr_size)))


def _current_size(dvp, N, incr_size, strict_highres_px=None):
    """RELION's next image size from the SSNR (``updateCurrentResolution``).

    Per class the last shell before the SSNR drops below 1; the maximum over classes (at
    least shell 5); then ``2 * (maxres + incr_size)``, even, at most ``N``.
    """
    size = min(N, 2 * (ssnr_max_shell(dvp) + incr_size))
    if strict_highres_px:
        size = min(size, 2 * strict_highres_px)
    return int(size - size % 2)


def _strict_px(config, N, apix):
    if config.strict_highres_exp and config.strict_highres_exp > 0:
        return int(np.ceil(N * apix / config.strict_highres_exp))
    return None


def initial_model(sums: InitSums, config, pixel_size: float, n_groups: int,
                  optics_names=None, group_names=None, group_counts=None) -> Class2DModel:
    """The iteration-0 model from the initial pass, as RELION 3.1 makes it for 2D.

    Classes are CTF-weighted averages of random subsets at random in-plane angles, low-pass
    filtered at the first image size; the noise spectrum per optics group is half the mean
    particle power spectrum minus half the power spectrum of the average particle; the offset
    prior has RELION's default width (10 A).
    """
    N = sums.image_sum.shape[-1]
    K, pad = config.K, config.pad
    n = sums.count.sum()
    diameter = mask_diameter(config.particle_diameter, N, pixel_size)
    mask = soft_circular_mask(N, diameter / (2 * pixel_size), 5.0).astype(np.float64)
    avg = sums.image_sum / max(n, 1)
    F = fft2_centered(avg)
    ps_avg = _shell_mean((F.real**2 + F.imag**2), N)
    sigma2 = sums.power_sum / (2 * np.maximum(sums.count, 1)[:, None]) - 0.5 * ps_avg[None]
    for g in range(sigma2.shape[0]):  # RELION: non-positive values take a neighbour's value
        row = sigma2[g]
        good = np.flatnonzero(row > 0)
        if good.size:
            row[row <= 0] = row[good[np.minimum(np.searchsorted(good, np.flatnonzero(
                row <= 0)), good.size - 1)]]
        else:
            row[:] = 1.0
    cur = initial_size(N, config.incr_size)
    strict = _strict_px(config, N, pixel_size)
    if strict:
        cur = min(cur, 2 * strict)
    ini_shell = round(0.07 * N)
    classes = np.empty((K, N, N), np.float32)
    imgs, _, _ = reconstruct_classes(sums.data, sums.weight, None, 1.0, pad, N, pad * cur / 2)
    for k in range(K):
        classes[k] = _lowpass(imgs[k], ini_shell) * (mask if config.flatten_solvent else 1)
    F = fft2_centered(classes.astype(np.float64))
    tau2 = _shell_mean(F.real**2 + F.imag**2, N) / 2
    inv_sig = (sums.count[:, None] / np.maximum(sigma2, 1e-30)).sum(axis=0) / max(n, 1)
    dvp = (n / K) * inv_sig[None] * tau2 * config.tau2_fudge
    sigma_offset_px = 10.0 / pixel_size  # RELION's --offset default: 10 A
    return Class2DModel(
        iteration=0, pixel_size=float(pixel_size), classes=classes, pdf_class=np.full(K, 1 / K),
        prior_offset=np.zeros((K, 2)), sigma2_noise=sigma2, sigma2_offset=sigma_offset_px**2,
        scale=np.ones(n_groups), avg_norm=1.0, current_size=cur,
        coarse_size=coarse_image_size(config.psi_step, diameter, N, pixel_size, cur),
        tau2=tau2, sigma2_class=tau2 * 2, data_vs_prior=dvp,
        fourier_coverage=np.zeros_like(tau2), acc_rot=np.zeros(K), acc_trans=np.zeros(K),
        optics_names=list(optics_names or [f"opticsGroup{g + 1}" for g in range(len(sums.count))]),
        group_names=list(group_names or [f"group_{g + 1}" for g in range(n_groups)]),
        group_counts=np.asarray(group_counts if group_counts is not None else np.zeros(n_groups)),
    )


def _lowpass(img, shell: float, width: float = 2.0):
    """Raised-cosine low-pass at ``shell`` (Fourier pixels), RELION's initial filter."""
    N = img.shape[-1]
    F = fft2_centered(img.astype(np.float64))
    ky = np.fft.fftfreq(N, 1.0 / N)
    kx = np.arange(N // 2 + 1)
    r = np.sqrt(kx[None, :] ** 2 + ky[:, None] ** 2)
    lo = shell - width / 2
    filt = np.where(r < lo, 1.0, np.where(r > lo + width, 0.0,
                                         0.5 + 0.5 * np.cos(np.pi * (r - lo) / width)))
    from ..fourier import ifft2_centered

    return ifft2_centered(F * filt, N)


def reconstruct_classes(data, weight, tau2, tau2_fudge, pad, N, r_max, which=None):
    """Regularised ratio on the oversampled grid -> real-space class images.

    ``A = data / (weight + 1 / (pad^2 * T * tau2))`` (no regularisation below shell
    ``MINRES_MAP``, nothing beyond ``r_max``), inverse transform, crop, gridding correction.
    Also the per-shell mean weight (1x units) for the SSNR and the Fourier coverage. The
    classes share the grid's geometry and are done one per task on the host's cores (each
    class's values are those of a class done alone, bit for bit).

    Parameters
    ----------
    data : ndarray of shape (K, pad N, pad N // 2 + 1), complex128
        Summed CTF-weighted images (half plane, ``ky`` centred: row ``pad N // 2`` is 0).
    weight : ndarray of shape (K, pad N, pad N // 2 + 1), float64
        Summed squared CTFs over the noise power, on the same grid.
    tau2 : ndarray of shape (K, N//2+1) or None
        Signal power prior per 1x shell; None: plain weighted average (no MAP).
    tau2_fudge : float
        T.
    pad : int
    N : int
        Box size (pixels).
    r_max : float
        Fourier radius (oversampled pixels) beyond which the classes are zero.
    which : ndarray of int, optional
        The classes (first axis of ``data``, ``weight`` and ``tau2``) to reconstruct, L of
        them (default: all K).

    Returns
    -------
    images : ndarray of shape (L, N, N), float64
    mean_weight : ndarray of shape (L, N//2+1)
        Mean weight per 1x shell, in 1x units.
    coverage : ndarray of shape (L, N//2+1)
        Fraction of each shell's grid points with a non-zero weight.
    """
    which = np.arange(data.shape[0]) if which is None else np.asarray(which)
    L = len(which)
    P = pad * N
    ky = np.fft.fftshift(np.fft.fftfreq(P, 1.0 / P))
    kx = np.arange(P // 2 + 1)
    r = np.sqrt(kx[None, :] ** 2 + ky[:, None] ** 2)
    ires = np.rint(r / pad).astype(np.int64)
    nsh = N // 2 + 1
    inside = r <= r_max
    sel = inside & (ires < nsh)
    shell_sel, shell_at = ires[sel], np.minimum(ires, nsh - 1)
    counts = np.bincount(shell_sel, minlength=nsh).astype(np.float64)
    regularised = ires >= MINRES_MAP
    ax = np.arange(N) - N // 2
    gridding = np.sinc(np.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2) / P) ** 2
    lo = P // 2 - N // 2
    images = np.empty((L, N, N))
    mean_w, coverage = np.empty((L, nsh)), np.empty((L, nsh))

    def one(i: int) -> None:
        k = which[i]
        w = weight[k]
        wsum = np.bincount(shell_sel, weights=w[sel], minlength=nsh)
        if tau2 is None:
            # plain weighted average (RELION's reconstruct without MAP, --skip_gridding guard)
            radavg = wsum / np.maximum(counts, 1)
            denom = np.maximum(w, radavg[shell_at] / 1000.0)
        else:
            t2 = tau2[k][shell_at]
            with np.errstate(divide="ignore", invalid="ignore"):
                invtau2 = np.where(t2 > 0, 1.0 / (pad**2 * tau2_fudge * t2),
                                   1.0 / np.maximum(1e-3 * w, 1e-30))
            denom = w + np.where(regularised, invtau2, 0.0)
        A = np.where(inside & (denom > 1e-20) & np.isfinite(denom),
                     data[k] / np.where(denom > 1e-20, denom, 1), 0)
        # mean weight per 1x shell, in 1x units (pad^2 more grid points share each sample)
        covered = np.bincount(shell_sel, weights=(w[sel] > 0).astype(float), minlength=nsh)
        mean_w[i] = pad**2 * wsum / np.maximum(counts, 1)
        coverage[i] = covered / np.maximum(counts, 1)
        img_pad = np.fft.fftshift(np.fft.irfft2(np.fft.ifftshift(A, axes=0), s=(P, P))
                                  * (N * N))
        images[i] = img_pad[lo : lo + N, lo : lo + N] / gridding

    # one class per task: NumPy's element-wise work and FFTs release the GIL (at most 8
    # threads: each holds about ten (pad N, pad N // 2 + 1) temporaries)
    workers = min(L, usable_cores(), 8)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(one, range(L)))
    else:
        for i in range(L):
            one(i)
    return images, mean_w, coverage


def maximization(model: Class2DModel, sums: Class2DSums, config) -> Class2DModel:
    """The M-step: new classes, priors, noise, offsets, scales and the next image size.

    Parameters
    ----------
    model : Class2DModel
        The model the E-step used.
    sums : Class2DSums
        Summed over all ranks (host arrays).
    config : Class2DConfig

    Returns
    -------
    Class2DModel
        With ``iteration`` incremented.
    """
    N, K, pad = model.ori_size, model.K, config.pad
    apix = model.pixel_size
    new = model.copy()
    new.iteration = model.iteration + 1
    n = float(sums.n)
    wk = sums.pdf_class
    new.pdf_class = wk / max(wk.sum(), 1e-30)
    # RELION 3.1 divides the class's offset sum by the TOTAL weight, which keeps the class
    # priors near the centre (classes do not drift); cryonb does the same
    new.prior_offset = np.where(wk[:, None] > 0, sums.prior_offset / max(wk.sum(), 1e-30), 0.0)
    new.sigma2_offset = float(sums.sigma2_offset / (2.0 * max(n, 1e-30)))
    npix = shell_pixel_counts(N)
    s2 = sums.sigma2_noise / (2.0 * np.maximum(sums.sumw_optics, 1e-30)[:, None]
                              * np.maximum(npix, 1)[None])
    keep_old = (sums.sumw_optics[:, None] <= 0) | (s2 < 1e-14)
    new.sigma2_noise = np.where(keep_old, model.sigma2_noise, s2)
    if config.norm and n > 0:
        new.avg_norm = float(sums.norm_sum / n)
    if config.scale and len(model.scale) > 1:
        # RELION: per-group XA/AA over shells with SSNR > 3, clamped to [median/5, 5 median],
        # normalised to a particle-weighted mean of 1; off with a single group
        good = (model.data_vs_prior * model.pdf_class[:, None]).sum(axis=0) > 3
        good[0] = False
        xa = (sums.scale_xa[:, good]).sum(axis=1)
        aa = (sums.scale_aa[:, good]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sc = np.where(aa > 0, xa / aa * model.scale, model.scale)
        med = np.median(sc)
        sc = np.clip(sc, med / 5, med * 5)
        counts = np.maximum(np.asarray(model.group_counts, float), 0)
        if counts.sum() > 0:
            sc = sc / (np.sum(counts * sc) / counts.sum())
        new.scale = sc
    diameter = mask_diameter(config.particle_diameter, N, apix)
    mask = soft_circular_mask(N, diameter / (2 * apix), 5.0).astype(np.float64)
    r_max = pad * model.current_size / 2.0
    classes = np.empty_like(model.classes)
    dvp = np.zeros_like(model.data_vs_prior)
    cov = np.zeros_like(model.fourier_coverage)
    live = np.array([wk[k] > 0 and sums.weight[k].sum() > 0 for k in range(K)], bool)
    for k in np.flatnonzero(~live):
        classes[k] = 0 if wk[k] <= 0 else model.classes[k]  # RELION zeroes empty classes
    if live.any():
        imgs, mean_w, cov[live] = reconstruct_classes(
            sums.data, sums.weight, model.tau2, config.tau2_fudge, pad, N, r_max,
            which=np.flatnonzero(live))
        dvp[live] = model.tau2[live] * config.tau2_fudge * mean_w
        if config.flatten_solvent:
            imgs = imgs * mask
        classes[live] = imgs.astype(np.float32)
    new.classes = classes
    # the classes' power spectra: one batch of K transforms on the host's cores (the same
    # values with any number of threads; 0.17 s single-threaded at 256 px, K=200)
    with fft_threads(min(usable_cores(), 8)):
        F = fft2_centered(classes.astype(np.float64))
    ps = _shell_mean(F.real**2 + F.imag**2, N)
    new.sigma2_class = ps
    # RELION: tau2 = half the power spectrum of the reference (per real/imaginary part)
    new.tau2 = np.where(wk[:, None] > 0, ps / 2, model.tau2)
    new.data_vs_prior = np.where(wk[:, None] > 0, dvp, model.data_vs_prior)
    new.fourier_coverage = cov
    new.current_size = _current_size(new.data_vs_prior, N, config.incr_size,
                                     _strict_px(config, N, apix))
    new.coarse_size = coarse_image_size(config.psi_step, diameter, N, apix, new.current_size)
    new.log_likelihood = float(sums.loglik)
    new.avg_pmax = float(sums.pmax / max(n, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        new.acc_rot = np.where(wk > 0, sums.acc_rot / wk, 0.0)
        new.acc_trans = np.where(wk > 0, sums.acc_trans / wk * apix, 0.0)
    d = np.sqrt(np.maximum(np.diag(sums.class_overlap), 1e-30))
    new.class_overlap = sums.class_overlap / d[:, None] / d[None, :]
    new.class_margin = sums.class_margin / np.maximum(sums.margin_n, 1)[:, None]
    new.reseeded = []
    return new
