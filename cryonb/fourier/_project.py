"""Fourier-space projection (central slices), rotations and shifts.

All functions work on NumPy or CuPy arrays (module chosen per call from the data). Fourier
transforms follow :func:`cryonb.fourier.fft2_centered`: half-plane (``kx >= 0``), RELION's
normalisation, origin at the box centre ``n // 2``.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module
from ._transforms import frequency_grid_2d

__all__ = [
    "Projector",
    "gridding_correct",
    "pad_centered",
    "rotate_2d",
    "shift_2d",
    "shift_phases_2d",
    "window_2d",
]


def pad_centered(data, size: int, ndim: int | None = None):
    """Zero-pad (or crop) a 2D/3D array to ``size`` per axis, keeping the centre at ``size//2``.

    Parameters
    ----------
    data : array of shape (..., n, n) or (n, n, n)
    size : int
    ndim : int, optional
        Number of trailing axes to pad (default: all axes of ``data``, at most 3); pass 2 for a
        stack of images.

    Returns
    -------
    array of shape (..., size, size[, size])
    """
    xp = array_module(data)
    n = data.shape[-1]
    nd = min(data.ndim, 3) if ndim is None else int(ndim)
    out = xp.zeros(data.shape[:-nd] + (size,) * nd, dtype=data.dtype)
    lo_in = max(0, n // 2 - size // 2)
    lo_out = max(0, size // 2 - n // 2)
    m = min(n, size)
    src = (Ellipsis,) + (slice(lo_in, lo_in + m),) * nd
    dst = (Ellipsis,) + (slice(lo_out, lo_out + m),) * nd
    out[dst] = data[src]
    return out


def gridding_correct(data, padding: float, ndim: int | None = None):
    """Divide by the Fourier transform of the linear-interpolation kernel (sinc^2).

    RELION's ``griddingCorrect`` for linear interpolation: ``data / sinc(r / (padding * n))**2``
    with ``r`` the distance (pixels) from the centre ``n // 2``. Applied in real space before
    padding, so that interpolated projections have the right amplitudes at high frequency.

    Parameters
    ----------
    data : array of shape (..., n, n) or (n, n, n), real
    padding : float
        Oversampling of the Fourier grid the data will be interpolated from.
    ndim : int, optional
        Number of trailing axes the correction spans (default: all axes of ``data``); pass
        2 for a stack of images.
    """
    xp = array_module(data)
    n = data.shape[-1]
    nd = data.ndim if ndim is None else int(ndim)
    axes = [xp.arange(s, dtype=xp.float64) - s // 2 for s in data.shape[-nd:]]
    grids = xp.meshgrid(*axes, indexing="ij")
    r = xp.sqrt(sum(g**2 for g in grids)) / (padding * n)
    s = xp.sinc(r)  # numpy/cupy sinc is sin(pi r)/(pi r)
    return (data / (s * s)).astype(data.dtype, copy=False)


class Projector:
    """Oversampled Fourier transform of a 2D or 3D reference for interpolated central slices.

    Parameters
    ----------
    data : array of shape (n, n) (2D class image) or (n, n, n) (map, axes z, y, x), real
        Origin at ``n // 2``.
    padding : int, default 2
        Oversampling factor of the Fourier grid (RELION's ``--pad``, default 2).
    r_max : float, optional
        Frequencies beyond this radius (pixels of the original box) read as zero; default
        ``n // 2``.
    gridding : bool, default True
        Apply :func:`gridding_correct` (as RELION does for linear interpolation).
    stack : bool, default False
        ``data`` of shape (K, n, n) is a stack of K 2D references (e.g. 2D classes), sampled
        together: :meth:`sample` then returns (K, ...) from one set of interpolation weights,
        element by element the same values as K separate projectors give.

    Notes
    -----
    The oversampled transform is stored as a half-space (``kx >= 0``) array with the other
    axes centred (``fftshift``); points with ``kx < 0`` are read through Friedel symmetry,
    ``F(-k) = conj(F(k))``. Interpolation is (bi/tri)linear, as RELION's ``TRILINEAR``.
    """

    def __init__(self, data, padding: int = 2, r_max: float | None = None, gridding: bool = True,
                 *, stack: bool = False):
        xp = array_module(data)
        self.xp = xp
        self.n = int(data.shape[-1])
        if stack and data.ndim != 3:
            raise ValueError(f"a stack of 2D references has shape (K, n, n), not {data.shape}")
        self.stack = bool(stack)
        self.ndim = 2 if stack else data.ndim
        self.padding = int(padding)
        self.r_max = float(self.n // 2 if r_max is None else r_max)
        work = data.astype(xp.float64 if data.dtype == xp.float64 else xp.float32)
        if gridding:
            work = gridding_correct(work, self.padding, self.ndim)
        p = self.padding * self.n
        padded = pad_centered(work, p, self.ndim)
        axes = tuple(range(-self.ndim, 0))
        f = fft_module(xp).rfftn(xp.fft.ifftshift(padded, axes=axes), axes=axes)
        f *= 1.0 / self.n**self.ndim
        self.grid = xp.fft.fftshift(f, axes=axes[:-1]).astype(
            xp.complex64 if work.dtype == xp.float32 else xp.complex128)
        self.size = p

    def sample(self, coords):
        """Interpolate the reference's transform at frequency coordinates.

        Parameters
        ----------
        coords : array of shape (..., d), d = 2 (x, y) or 3 (x, y, z)
            Fourier indices in units of the ORIGINAL box (``k = n * pixel_size * freq``).

        Returns
        -------
        array of shape (...), or (K, ...) for a stack of K references, complex
            Zero beyond ``r_max``.
        """
        xp = self.xp
        d = coords.shape[-1]
        c = coords.astype(xp.float32 if self.grid.dtype == xp.complex64 else xp.float64)
        r2 = (c * c).sum(axis=-1)
        inside = r2 <= self.r_max**2
        c = c * self.padding
        neg = c[..., 0] < 0
        c = xp.where(neg[..., None], -c, c)
        base = xp.floor(c)
        frac = c - base
        base = base.astype(xp.int64)
        half = self.size // 2
        shape = self.grid.shape[-self.ndim:]  # (z, y, x) or (y, x)
        lead = self.grid.shape[:1] if self.stack else ()
        out = xp.zeros(lead + c.shape[:-1], dtype=self.grid.dtype)
        flat = self.grid.reshape((*lead, -1))
        for corner in range(2**d):
            offs = [(corner >> a) & 1 for a in range(d)]
            w = xp.ones(c.shape[:-1], dtype=c.dtype)
            idx = xp.zeros(c.shape[:-1], dtype=xp.int64)
            stride = 1
            ok = inside
            for a in range(d):  # a = 0 is x (last array axis)
                ia = base[..., a] + offs[a]
                fa = frac[..., a]
                w = w * (fa if offs[a] else (1 - fa))
                if a > 0:
                    ia = ia + half
                axis_len = shape[self.ndim - 1 - a]
                ok = ok & (ia >= 0) & (ia < axis_len)
                idx = idx + xp.clip(ia, 0, axis_len - 1) * stride
                stride *= axis_len
            out += xp.where(ok, w, 0) * flat[..., idx]
        return xp.where(neg, xp.conj(out), out)

    def project(self, rotations, n: int | None = None):
        """Central slices (3D) or rotated copies (2D) as half-plane Fourier transforms.

        Parameters
        ----------
        rotations : array of shape (m, 3, 3) / (3, 3) for a 3D reference (RELION ``A`` from
            :func:`cryonb.data.euler_to_matrix`) or (m, 2, 2) / (2, 2) for a 2D reference
            (:func:`cryonb.data.inplane_matrix`).
        n : int, optional
            Output box (default: the reference's box). Only frequencies up to ``n // 2`` are
            filled.

        Returns
        -------
        array of shape (m, n, n // 2 + 1) or (n, n // 2 + 1), complex
            (with a leading axis K for a stack of references). Pixel ``k = (kx, ky)`` holds
            the reference at ``A.T @ (kx, ky[, 0])``; for a 3D map this is the Fourier
            transform of its projection along the rotated z axis (``relion_project``'s
            convention and normalisation).
        """
        xp = self.xp
        n = self.n if n is None else int(n)
        rot = xp.asarray(rotations, dtype=xp.float64)
        single = rot.ndim == 2
        rot = rot[None] if single else rot
        kx, ky = frequency_grid_2d(n, xp, dtype="float64")
        k = xp.stack([kx, ky], axis=-1)  # (n, n//2+1, 2)
        # coordinates = A.T @ (kx, ky, 0) -> (m, n, n//2+1, d): x' = sum_i A[i, :] * k_i
        coords = xp.einsum("...i,mij->m...j", k, rot[:, :2, :])
        out = self.sample(coords)
        if self.ndim == 3:
            out = out * self.n  # projection sums n voxels along z (2D vs 3D normalisation)
        if single:
            out = out[:, 0] if self.stack else out[0]
        return out


def shift_phases_2d(n: int, shifts, xp=None, *, dtype="complex64"):
    """Phase ramps that shift images by ``shifts`` pixels (content moves by ``+shift``).

    Parameters
    ----------
    n : int
        Box size.
    shifts : array of shape (m, 2) or (2,)
        (x, y) shifts in pixels.

    Returns
    -------
    array of shape (m, n, n // 2 + 1) or (n, n // 2 + 1), complex
        ``exp(-2 pi i (kx sx + ky sy) / n)`` (RELION's ``shiftImageInFourierTransform``).
    """
    xp = array_module(shifts) if xp is None else xp
    s = xp.asarray(shifts, dtype=xp.float64)
    single = s.ndim == 1
    s = s[None] if single else s
    kx, ky = frequency_grid_2d(n, xp, dtype="float64")
    ph = -2 * np.pi / n * (kx[None] * s[:, 0, None, None] + ky[None] * s[:, 1, None, None])
    out = (xp.cos(ph) + 1j * xp.sin(ph)).astype(dtype)
    return out[0] if single else out


def shift_2d(f, shifts):
    """Shift half-plane Fourier transforms by ``shifts`` pixels.

    Parameters
    ----------
    f : array of shape (m, n, n // 2 + 1) or (n, n // 2 + 1), complex
    shifts : array of shape (m, 2) or (2,), (x, y) in pixels

    Returns
    -------
    array like ``f``
    """
    xp = array_module(f)
    return f * shift_phases_2d(f.shape[-2], xp.asarray(shifts), xp, dtype=f.dtype)


def rotate_2d(images, psi, padding: int = 2):
    """Rotate real images in-plane by interpolation in oversampled Fourier space.

    Parameters
    ----------
    images : array of shape (m, n, n) or (n, n), real, origin at ``n // 2``
    psi : float or array of shape (m,)
        Angles (degrees). The result is what a 2D reference ``images`` looks like at in-plane
        angle ``psi`` in RELION's convention (see :mod:`cryonb.data.conventions`).

    Returns
    -------
    array like ``images``
    """
    from ..data.conventions import inplane_matrix
    from ._transforms import ifft2_centered

    xp = array_module(images)
    single = images.ndim == 2
    imgs = images[None] if single else images
    psi = xp.broadcast_to(xp.asarray(psi, dtype=xp.float64), (imgs.shape[0],))
    rots = inplane_matrix(psi)
    out = xp.empty_like(imgs)
    for i in range(imgs.shape[0]):
        out[i] = ifft2_centered(Projector(imgs[i], padding).project(rots[i]), imgs.shape[-1])
    return out[0] if single else out


def window_2d(f, n_out: int):
    """Crop half-plane transforms of box ``n`` to box ``n_out`` (keep ``|k| < n_out/2``).

    Parameters
    ----------
    f : array of shape (..., n, n // 2 + 1)
    n_out : int, even, <= n

    Returns
    -------
    array of shape (..., n_out, n_out // 2 + 1)
        The same frequencies, as the transform of a smaller (downsampled) image, without
        renormalisation (values per frequency unchanged, as RELION's ``windowFourierTransform``).
    """
    xp = array_module(f)
    n = f.shape[-2]
    if n_out == n:
        return f
    rows = xp.asarray(np.r_[0 : n_out // 2 + (n_out % 2), n - n_out // 2 : n])
    return f[..., rows, : n_out // 2 + 1]
