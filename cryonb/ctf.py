"""Contrast transfer function exactly as RELION computes it (``src/ctf.h``, ``CTF::getCTF``).

Conventions: defocus U/V in Angstrom (positive = underfocus), astigmatism angle in degrees from
the x axis, Cs in mm, voltage in kV, amplitude contrast as a fraction, phase shift in degrees,
B-factor in A^2. Spatial frequencies in 1/A: ``k / (n * pixel_size)`` for Fourier index ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fourier import frequency_grid_2d
from .kernels import ctf_values

__all__ = ["CTFParams", "ctf_2d", "ctf_at", "ctf_features", "electron_wavelength"]


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom (RELION's formula).

    Parameters
    ----------
    voltage_kv : float or array
        Acceleration voltage in kV.
    """
    v = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass
class CTFParams:
    """Per-particle CTF parameters (arrays of shape (m,), or scalars).

    Attributes mirror RELION's columns: ``defocus_u``/``defocus_v`` (rlnDefocusU/V, A),
    ``defocus_angle`` (rlnDefocusAngle, deg), ``voltage`` (rlnVoltage, kV), ``cs``
    (rlnSphericalAberration, mm), ``amplitude_contrast`` (rlnAmplitudeContrast), ``phase_shift``
    (rlnPhaseShift, deg), ``bfactor`` (rlnCtfBfactor, A^2), ``scale`` (rlnCtfScalefactor).
    """

    defocus_u: object
    defocus_v: object
    defocus_angle: object = 0.0
    voltage: object = 300.0
    cs: object = 2.7
    amplitude_contrast: object = 0.1
    phase_shift: object = 0.0
    bfactor: object = 0.0
    scale: object = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> CTFParams:
        """Build from a mapping with the attribute names (extra keys are ignored)."""
        names = cls.__dataclass_fields__.keys() - {"extra"}
        return cls(**{k: d[k] for k in names if k in d})

    def subset(self, idx) -> CTFParams:
        """Parameters of the particles ``idx`` (scalars are kept)."""
        vals = {}
        for k in self.__dataclass_fields__:
            if k == "extra":
                continue
            v = getattr(self, k)
            vals[k] = np.asarray(v)[idx] if np.ndim(v) else v
        return CTFParams(**vals)


def ctf_2d(params: CTFParams, n: int, pixel_size, xp=np, *, intact_first_peak: bool = False,
           dtype="float32"):
    """CTF images on the half-plane Fourier grid of an ``n x n`` box.

    Parameters
    ----------
    params : CTFParams
        Scalars or arrays of shape (m,).
    n : int
        Box size (pixels).
    pixel_size : float or array of shape (m,)
        Angstrom per pixel.
    xp : module
        ``numpy`` or ``cupy`` (where the result lives).
    intact_first_peak : bool
        See :func:`ctf_at`.

    Returns
    -------
    array of shape (m, n, n // 2 + 1) (or (n, n // 2 + 1) for scalar parameters)
    """
    kx, ky = frequency_grid_2d(n, xp, dtype="float64")
    return ctf_at(params, kx, ky, n, pixel_size, xp, intact_first_peak=intact_first_peak,
                  dtype=dtype)


def ctf_features(kx, ky, xp=np):
    """The per-pixel factors of the CTF's argument (:func:`ctf_at`), for reuse over calls.

    Parameters
    ----------
    kx, ky : arrays of shape S
        Fourier indices.
    xp : module

    Returns
    -------
    float64 array of shape (*S, 5)
        ``k^2, k^2 cos(2 phi), k^2 sin(2 phi), k^4, 1`` with ``k = |(kx, ky)|`` and ``phi`` its
        direction.
    """
    kx = xp.asarray(kx, dtype=xp.float64)
    ky = xp.asarray(ky, dtype=xp.float64)
    k2pix = kx * kx + ky * ky
    with np.errstate(invalid="ignore", divide="ignore"):
        r = xp.where(k2pix > 0, k2pix, 1.0)
    cos2 = (kx * kx - ky * ky) / r  # cos(2 phi)
    sin2 = 2 * kx * ky / r  # sin(2 phi)
    return xp.stack([k2pix, k2pix * cos2, k2pix * sin2, k2pix * k2pix, xp.ones_like(k2pix)],
                    axis=-1)


def ctf_at(params: CTFParams, kx, ky, n: int, pixel_size, xp=np, *,
           intact_first_peak: bool = False, dtype="float32", aligned: bool = False,
           features=None):
    """CTF values at given Fourier indices (RELION's ``CTF::getCTF``).

    Parameters
    ----------
    params : CTFParams
        Scalars or arrays of shape (m,).
    kx, ky : arrays of shape S
        Fourier indices (pixels of an ``n``-box); frequency = ``k / (n * pixel_size)``.
    n : int
        Box size the indices refer to.
    pixel_size : float or array of shape (m,)
    xp : module
    intact_first_peak : bool
        Set the CTF to 1 where ``|argument| < pi/2`` (RELION's ``--ctf_intact_first_peak``):
        low frequencies up to the first peak are left uncorrected.
    aligned : bool
        ``kx``/``ky`` have shape (m, ...): particle ``i``'s own coordinates in row ``i``.
    features : array of shape (*S, 5), optional
        :func:`ctf_features` of ``kx``, ``ky`` (computed once by callers that evaluate many
        particles at the same pixels; ``kx``, ``ky`` are then only used for their shape).

    Returns
    -------
    array of shape (m, *S) (or S for scalar parameters; S without its first axis when
    ``aligned``)
        ``-sin(K1 df u^2 + K2 u^4 - K5 - K3) * exp(K4 u^2) * scale`` with RELION's constants
        ``K1 = pi lambda``, ``K2 = pi/2 Cs lambda^3``, ``K3 = atan(Q/sqrt(1-Q^2))``,
        ``K4 = -B/4``, ``K5 = phase shift``, ``df`` the astigmatic defocus (negative for
        underfocus) along the direction of ``(kx, ky)``.
    """
    names = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
             "phase_shift", "bfactor", "scale")
    vals = {k: np.atleast_1d(np.asarray(_host(getattr(params, k)), dtype=np.float64))
            for k in names}
    vals["pixel_size"] = np.atleast_1d(np.asarray(_host(pixel_size), dtype=np.float64))
    m = max(v.shape[0] for v in vals.values())
    scalar = all(np.ndim(getattr(params, k)) == 0 for k in names) and np.ndim(pixel_size) == 0
    v = {k: np.broadcast_to(a, (m,)) for k, a in vals.items()}
    # per particle: arg = a k^2 + b k^2 cos(2 phi) + c k^2 sin(2 phi) + d k^4 + e, with k the
    # Fourier index, phi its direction (RELION's formula rewritten so that the trigonometry of
    # the astigmatism is done once per particle instead of once per pixel)
    lam = electron_wavelength(v["voltage"])
    q = v["amplitude_contrast"]
    s2 = 1.0 / (n * v["pixel_size"]) ** 2  # k^2 -> |frequency|^2
    k1 = np.pi * lam
    k2 = np.pi / 2 * v["cs"] * 1e7 * lam**3
    df_avg = -(v["defocus_u"] + v["defocus_v"]) * 0.5
    df_dev = -(v["defocus_u"] - v["defocus_v"]) * 0.5
    th = np.deg2rad(v["defocus_angle"])
    coef = np.stack([k1 * df_avg * s2, k1 * df_dev * np.cos(2 * th) * s2,
                     k1 * df_dev * np.sin(2 * th) * s2, k2 * s2 * s2,
                     -np.deg2rad(v["phase_shift"]) - np.arctan(q / np.sqrt(1 - q * q))], axis=1)
    feat = ctf_features(kx, ky, xp) if features is None else features
    b4 = -v["bfactor"] / 4.0 * s2 if np.any(v["bfactor"] != 0) else None
    scale = v["scale"] if np.any(v["scale"] != 1) else None
    ctf = ctf_values(coef, feat, intact_first_peak=intact_first_peak, b4=b4, scale=scale,
                     dtype=dtype, aligned=aligned)
    return ctf[0] if scalar else ctf


def _host(a):
    return a.get() if hasattr(a, "get") else a
