"""Centred FFTs with RELION's normalisation, frequency grids, radial shells."""

from __future__ import annotations

from ..backend import array_module, fft_module

__all__ = [
    "fft2_centered",
    "fft3_centered",
    "frequency_grid_2d",
    "ifft2_centered",
    "ifft3_centered",
    "radial_index_2d",
    "shell_average",
    "shell_sum",
]


def fft2_centered(images):
    """Half-plane Fourier transform of real images whose origin is at the box centre.

    Parameters
    ----------
    images : array of shape (..., n, n), real
        Image origin at index ``n // 2`` on both axes (RELION's convention).

    Returns
    -------
    array of shape (..., n, n // 2 + 1), complex64 (complex128 for float64 input)
        ``rfft2(ifftshift(images)) / n**2``: RELION's forward normalisation (FFTW divided by the
        number of pixels), origin of frequencies at ``[0, 0]``, ``ky`` wrapping as ``fftfreq``.
    """
    xp = array_module(images)
    n = images.shape[-1]
    f = fft_module(xp).rfft2(xp.fft.ifftshift(images, axes=(-2, -1)), axes=(-2, -1))
    f /= n * images.shape[-2]
    return f.astype(xp.complex128 if images.dtype == xp.float64 else xp.complex64, copy=False)


def ifft2_centered(f, n: int):
    """Inverse of :func:`fft2_centered`.

    Parameters
    ----------
    f : array of shape (..., n, n // 2 + 1), complex
    n : int
        Real-space box size.

    Returns
    -------
    array of shape (..., n, n), float32 (float64 for complex128 input), origin at ``n // 2``.
    """
    xp = array_module(f)
    img = fft_module(xp).irfft2(f, s=(n, n), axes=(-2, -1)) * (n * n)
    img = xp.fft.fftshift(img, axes=(-2, -1))
    return img.astype(xp.float64 if f.dtype == xp.complex128 else xp.float32, copy=False)


def fft3_centered(volume):
    """Half-space Fourier transform of a real volume with origin at the box centre.

    Parameters
    ----------
    volume : array of shape (nz, ny, nx), real

    Returns
    -------
    array of shape (nz, ny, nx // 2 + 1), complex
        ``rfftn(ifftshift(volume)) / volume.size`` (RELION's normalisation).
    """
    xp = array_module(volume)
    f = fft_module(xp).rfftn(xp.fft.ifftshift(volume))
    f /= volume.size
    return f.astype(xp.complex128 if volume.dtype == xp.float64 else xp.complex64, copy=False)


def ifft3_centered(f, n: int):
    """Inverse of :func:`fft3_centered` for a cubic box of size ``n``."""
    xp = array_module(f)
    vol = fft_module(xp).irfftn(f, s=(n, n, n)) * (n**3)
    return xp.fft.fftshift(vol).astype(xp.float32, copy=False)


def frequency_grid_2d(n: int, xp, *, dtype="float32"):
    """Integer Fourier indices of the half-plane transform of an ``n x n`` image.

    Parameters
    ----------
    n : int
        Box size.
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    kx, ky : arrays of shape (n, n // 2 + 1)
        ``kx`` in ``0 .. n//2``, ``ky`` in ``-(n//2) .. (n-1)//2`` laid out as ``fftfreq * n``.
        Frequencies in 1/A are ``k / (n * pixel_size)``.
    """
    ky = xp.fft.fftfreq(n, d=1.0 / n).astype(dtype)
    kx = xp.arange(n // 2 + 1, dtype=dtype)
    shape = (n, n // 2 + 1)
    return xp.broadcast_to(kx[None, :], shape), xp.broadcast_to(ky[:, None], shape)


def radial_index_2d(n: int, xp):
    """Shell index of every half-plane Fourier pixel: ``round(sqrt(kx^2 + ky^2))``.

    Returns
    -------
    array of shape (n, n // 2 + 1), int32
        RELION's ``ires``; shell ``n // 2`` is Nyquist, larger values lie in the corners.
    """
    kx, ky = frequency_grid_2d(n, xp, dtype="float64")
    return xp.rint(xp.sqrt(kx**2 + ky**2)).astype(xp.int32)


def shell_sum(values, shells, n_shells: int):
    """Sum ``values`` over pixels of each shell (pixels with shell >= n_shells are dropped).

    Parameters
    ----------
    values : array of shape (..., *S)
        Real values per Fourier pixel (leading axes are batched).
    shells : int array of shape S
    n_shells : int

    Returns
    -------
    array of shape (..., n_shells)
    """
    xp = array_module(values)
    flat = values.reshape((*values.shape[: values.ndim - shells.ndim], -1))
    sh = shells.reshape(-1)
    keep = sh < n_shells
    onehot = (sh[keep][:, None] == xp.arange(n_shells)[None, :]).astype(flat.dtype)
    return flat[..., keep] @ onehot


def shell_average(values, shells, n_shells: int):
    """Mean of ``values`` per shell (0 for empty shells); same shapes as :func:`shell_sum`."""
    xp = array_module(values)
    counts = shell_sum(xp.ones(shells.shape, dtype=values.dtype), shells, n_shells)
    return shell_sum(values, shells, n_shells) / xp.maximum(counts, 1)
