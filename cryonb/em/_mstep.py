"""The M-step of 2D classification and the initial model (host, NumPy, float64)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..fourier import fft2_centered, radial_index_2d
from ._estep import coarse_image_size, soft_circular_mask
from ._model import Class2DModel, Class2DSums

__all__ = ["InitSums", "initial_model", "maximization", "shell_pixel_counts"]

MINRES_MAP = 5  # RELION: no regularisation below this shell


def shell_pixel_counts(n: int) -> np.ndarray:
    """Half-plane Fourier pixels per shell (``round(|k|)``) of an ``n`` box, shape (n//2+1,)."""
    sh = radial_index_2d(n, np).ravel()
    return np.bincount(sh[sh <= n // 2], minlength=n // 2 + 1).astype(np.float64)


def _shell_mean(power2d, n):
    """Mean of a half-plane quantity of an ``n`` box per shell -> (..., n//2+1)."""
    sh = radial_index_2d(n, np).ravel()
    keep = sh <= n // 2
    flat = power2d.reshape(power2d.shape[:-2] + (-1,))[..., keep]
    onehot = (sh[keep][:, None] == np.arange(n // 2 + 1)[None]).astype(np.float64)
    return flat @ onehot / np.maximum(onehot.sum(axis=0), 1)


@dataclass
class InitSums:
    """Sums of the initial pass over all particles.

    Attributes
    ----------
    image_sum : (N, N)
        Sum of masked particle images.
    power_sum : (G, N//2+1)
        Sum of per-shell mean power of the masked images' transforms, per optics group.
    ctf2_sum : (N//2+1,)
        Sum of per-shell mean CTF^2 (to estimate the first SSNR).
    count : (G,)
        Particles per optics group.
    """

    image_sum: np.ndarray
    power_sum: np.ndarray
    ctf2_sum: np.ndarray
    count: np.ndarray

    def to_vector(self):
        """Pack into one float64 vector."""
        return np.concatenate([np.asarray(getattr(self, k), np.float64).ravel()
                               for k in ("image_sum", "power_sum", "ctf2_sum", "count")])

    def shapes(self):
        """Shapes for :meth:`from_vector`."""
        return [(k, getattr(self, k).shape, False)
                for k in ("image_sum", "power_sum", "ctf2_sum", "count")]

    @classmethod
    def from_vector(cls, vec, shapes):
        """Unpack :meth:`to_vector`."""
        out, o = {}, 0
        for name, shape, _ in shapes:
            size = int(np.prod(shape))
            out[name] = vec[o : o + size].reshape(shape).copy()
            o += size
        return cls(**out)

    @classmethod
    def accumulate(cls, images, optics, ctf2_shell, n_optics: int, mask):
        """Sums of one pool.

        Parameters
        ----------
        images : (B, N, N) float32 (host)
        optics : (B,) int
        ctf2_shell : (B, N//2+1)
            Per-shell mean CTF^2 of each particle (ones without CTF).
        n_optics : int
        mask : (N, N)
        """
        N = images.shape[-1]
        masked = images * mask
        F = fft2_centered(masked)
        ps = _shell_mean((F.real**2 + F.imag**2).astype(np.float64), N)
        power = np.zeros((n_optics, N // 2 + 1))
        count = np.zeros(n_optics)
        np.add.at(power, optics, ps)
        np.add.at(count, optics, 1)
        return cls(masked.sum(axis=0, dtype=np.float64), power, ctf2_shell.sum(axis=0), count)


def _current_size(dvp, pdf, N, incr_size, strict_highres_px=None):
    """RELION's next image size: 2 * (first shell with SSNR < 1 + incr_size), even, <= N."""
    maxres = 1
    for k in range(dvp.shape[0]):
        if pdf[k] <= 0:
            continue
        below = np.flatnonzero(dvp[k, 1:] < 1.0)
        ires = (below[0] + 1) if below.size else dvp.shape[1] - 1
        maxres = max(maxres, int(ires))
    size = min(N, 2 * (maxres + incr_size))
    if strict_highres_px:
        size = min(size, 2 * strict_highres_px)
    return int(size - size % 2)


def _strict_px(config, N, apix):
    if config.strict_highres_exp and config.strict_highres_exp > 0:
        return int(np.ceil(N * apix / config.strict_highres_exp))
    return None


def initial_model(sums: InitSums, config, pixel_size: float, n_groups: int,
                  optics_names=None, group_names=None, group_counts=None) -> Class2DModel:
    """The iteration-0 model from the initial pass (RELION's initialisation for 2D).

    Every class starts as the (masked) average of all particles; the noise spectrum per optics
    group is half the difference between the mean particle power spectrum and the power
    spectrum of the average; ``tau2`` is the power spectrum of the average.
    """
    N = sums.image_sum.shape[-1]
    K = config.K
    n = sums.count.sum()
    diameter = config.particle_diameter or 0.9 * N * pixel_size
    mask = soft_circular_mask(N, diameter / (2 * pixel_size), 5.0).astype(np.float64)
    avg = sums.image_sum / max(n, 1)
    F = fft2_centered(avg)
    ps_avg = _shell_mean((F.real**2 + F.imag**2), N)
    sigma2 = 0.5 * (sums.power_sum / np.maximum(sums.count, 1)[:, None] - ps_avg[None])
    sigma2 = np.maximum(sigma2, 1e-12 * max(float(sigma2.max()), 1e-30))
    tau2 = np.repeat(ps_avg[None], K, axis=0)
    ctf2 = sums.ctf2_sum / max(n, 1)
    mean_inv_sig = (sums.count[:, None] / np.maximum(sigma2, 1e-30)).sum(axis=0) / max(n, 1)
    dvp = tau2 * (n / K) * ctf2[None] * mean_inv_sig[None]
    pdf = np.full(K, 1.0 / K)
    cur = _current_size(dvp, pdf, N, config.incr_size, _strict_px(config, N, pixel_size))
    classes = np.repeat((avg * mask)[None].astype(np.float32), K, axis=0)
    sigma_offset_px = max(config.offset_range, config.offset_step) / 3.0 * 2
    return Class2DModel(
        iteration=0, pixel_size=float(pixel_size), classes=classes, pdf_class=pdf,
        prior_offset=np.zeros((K, 2)), sigma2_noise=sigma2, sigma2_offset=sigma_offset_px**2,
        scale=np.ones(n_groups), avg_norm=1.0, current_size=cur,
        coarse_size=coarse_image_size(config.psi_step, diameter, N, pixel_size, cur),
        tau2=tau2, sigma2_class=tau2.copy(), data_vs_prior=dvp,
        fourier_coverage=np.zeros_like(tau2), acc_rot=np.zeros(K), acc_trans=np.zeros(K),
        optics_names=list(optics_names or [f"opticsGroup{g + 1}" for g in range(len(sums.count))]),
        group_names=list(group_names or [f"group_{g + 1}" for g in range(n_groups)]),
        group_counts=np.asarray(group_counts if group_counts is not None else np.zeros(n_groups)),
    )


def _reconstruct(data, weight, tau2, tau2_fudge, pad, N, r_max):
    """Regularised ratio on the oversampled grid -> real-space class image (N, N).

    ``A = data / (weight + 1 / (pad^2 * T * tau2))`` (no regularisation below shell 5, nothing
    beyond ``r_max``), inverse transform, crop, gridding correction. Also returns the per-shell
    mean weight (1x units) for the SSNR and the Fourier coverage.
    """
    P = pad * N
    ky = np.fft.fftshift(np.fft.fftfreq(P, 1.0 / P))
    kx = np.arange(P // 2 + 1)
    r = np.sqrt(kx[None, :] ** 2 + ky[:, None] ** 2)
    ires = np.rint(r / pad).astype(np.int64)
    nsh = N // 2 + 1
    inside = r <= r_max
    t2 = tau2[np.minimum(ires, nsh - 1)]
    with np.errstate(divide="ignore"):
        invtau2 = np.where((ires >= MINRES_MAP) & (t2 > 0), 1.0 / (pad**2 * tau2_fudge * t2), 0.0)
    invtau2 = np.where((ires >= MINRES_MAP) & (t2 <= 0), np.inf, invtau2)
    denom = weight + invtau2
    A = np.where(inside & (denom > 1e-20) & np.isfinite(denom),
                 data / np.where(denom > 1e-20, denom, 1), 0)
    # mean weight per 1x shell, in 1x units (pad^2 more grid points share each sample)
    sel = inside & (ires < nsh)
    counts = np.bincount(ires[sel], minlength=nsh).astype(np.float64)
    wsum = np.bincount(ires[sel], weights=weight[sel], minlength=nsh)
    covered = np.bincount(ires[sel], weights=(weight[sel] > 0).astype(float), minlength=nsh)
    mean_w = pad**2 * wsum / np.maximum(counts, 1)
    coverage = covered / np.maximum(counts, 1)
    img_pad = np.fft.irfft2(np.fft.ifftshift(A, axes=0), s=(P, P)) * (N * N)
    img_pad = np.fft.fftshift(img_pad)
    lo = P // 2 - N // 2
    img = img_pad[lo : lo + N, lo : lo + N]
    ax = np.arange(N) - N // 2
    rr = np.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2) / P
    img = img / np.sinc(rr) ** 2
    return img, mean_w, coverage


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
    with np.errstate(invalid="ignore", divide="ignore"):
        po = np.where(wk[:, None] > 0, sums.prior_offset / wk[:, None], 0.0)
    new.prior_offset = po
    new.sigma2_offset = float(sums.sigma2_offset / (2.0 * max(n, 1e-30)))
    npix = shell_pixel_counts(N)
    s2 = sums.sigma2_noise / (2.0 * np.maximum(sums.sumw_optics, 1e-30)[:, None]
                              * np.maximum(npix, 1)[None])
    keep_old = sums.sumw_optics <= 0
    s2[keep_old] = model.sigma2_noise[keep_old]
    new.sigma2_noise = np.maximum(s2, 1e-30)
    if config.norm and n > 0:
        new.avg_norm = float(sums.norm_sum / n)
    if config.scale:
        cur_shells = slice(1, model.current_size // 2)
        xa = sums.scale_xa[:, cur_shells].sum(axis=1)
        aa = sums.scale_aa[:, cur_shells].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sc = np.where(aa > 0, xa / aa * model.scale, model.scale)
        active = aa > 0
        if active.any():
            sc = sc / np.mean(sc[active])
        new.scale = np.where(active, sc, model.scale)
    diameter = config.particle_diameter or 0.9 * N * apix
    mask = soft_circular_mask(N, diameter / (2 * apix), 5.0).astype(np.float64)
    r_max = pad * model.current_size / 2.0
    classes = np.empty_like(model.classes)
    dvp = np.zeros_like(model.data_vs_prior)
    cov = np.zeros_like(model.fourier_coverage)
    for k in range(K):
        if wk[k] <= 0:
            classes[k] = model.classes[k]
            dvp[k] = 0
            continue
        img, mean_w, cov[k] = _reconstruct(sums.data[k], sums.weight[k], model.tau2[k],
                                           config.tau2_fudge, pad, N, r_max)
        dvp[k] = model.tau2[k] * config.tau2_fudge * mean_w
        if config.flatten_solvent:
            img = img * mask
        classes[k] = img.astype(np.float32)
    new.classes = classes
    F = fft2_centered(classes.astype(np.float64))
    ps = _shell_mean(F.real**2 + F.imag**2, N)
    new.sigma2_class = ps
    new.tau2 = np.where(wk[:, None] > 0, ps, model.tau2)
    new.data_vs_prior = dvp
    new.fourier_coverage = cov
    new.current_size = _current_size(dvp, new.pdf_class, N, config.incr_size,
                                     _strict_px(config, N, apix))
    new.coarse_size = coarse_image_size(config.psi_step, diameter, N, apix, new.current_size)
    new.log_likelihood = float(sums.loglik)
    new.avg_pmax = float(sums.pmax / max(n, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        new.acc_rot = np.where(wk > 0, sums.acc_rot / wk, 0.0)
        new.acc_trans = np.where(wk > 0, sums.acc_trans / wk * apix, 0.0)
    new.reseeded = []
    return new
