"""Images before the Fourier transform: NumPy and CuPy against np.roll and the mask formula."""

import numpy as np
import pytest

from cryonb.em._estep import soft_circular_mask
from cryonb.kernels import mask_images_2d, mask_outside


def _by_definition(imgs, scale, shift, mask, noise):
    out = []
    for b, im in enumerate(imgs):
        im = im * (1 if scale is None else scale[b])
        im = np.roll(im, (shift[b, 1], shift[b, 0]), axis=(0, 1))
        if noise is None:
            bg = (im * (1 - mask)).sum() / (1 - mask).sum()
            out.append(im * mask + bg * (1 - mask))
        else:
            out.append(im * mask + noise[b] * (1 - mask))
    return np.array(out, np.float32)


@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("N", [32, 33])
def test_masked_images_follow_the_definition(xp, with_noise, with_scale, N):
    rng = np.random.default_rng(N)
    B = 6
    imgs = (rng.normal(size=(B, N, N)) + 3).astype(np.float32)
    scale = rng.uniform(0.5, 2, B).astype(np.float32) if with_scale else None
    shift = rng.integers(-40, 40, (B, 2))
    shift[0] = 0
    mask = soft_circular_mask(N, N / 3, 5.0)
    noise = rng.normal(size=(B, N, N)).astype(np.float32) if with_noise else None
    want = _by_definition(imgs, scale, shift, mask, noise)
    got = mask_images_2d(xp.asarray(imgs), scale, shift, xp.asarray(mask),
                         None if noise is None else xp.asarray(noise))
    got = got.get() if hasattr(got, "get") else got
    assert got.shape == (B, N, N) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the mask's outside sum given (the E-step computes it once, not per pool): the same
    again = mask_images_2d(xp.asarray(imgs), scale, shift, xp.asarray(mask),
                           None if noise is None else xp.asarray(noise),
                           outside=mask_outside(xp.asarray(mask)))
    again = again.get() if hasattr(again, "get") else again
    np.testing.assert_array_equal(again, got)
    # the images read in place from a larger array (a device store's rows): the same
    store = np.concatenate([rng.normal(size=(3, N, N)).astype(np.float32), imgs[::-1]])
    rows = np.arange(B + 2, 2, -1)  # imgs[b] is store[B + 2 - b]
    inplace = mask_images_2d(xp.asarray(store), scale, shift, xp.asarray(mask),
                             None if noise is None else xp.asarray(noise), rows=xp.asarray(rows))
    inplace = inplace.get() if hasattr(inplace, "get") else inplace
    np.testing.assert_array_equal(inplace, got)
    if noise is None:  # the background left out, its mean returned apart: the same sum
        bg = xp.zeros(B, xp.float32)
        part = mask_images_2d(xp.asarray(imgs), scale, shift, xp.asarray(mask), background=bg)
        part, bg = (a.get() if hasattr(a, "get") else a for a in (part, bg))
        # (equal on the CPU; the GPU's filled kernel may fuse its last multiply-add)
        np.testing.assert_allclose(part + bg[:, None, None] * (1 - mask.astype(np.float32)),
                                   got, rtol=1e-6, atol=1e-6)
        assert np.all(bg > 1)  # the images' mean is about 3
        with pytest.raises(ValueError, match="background"):
            mask_images_2d(xp.asarray(imgs), scale, shift, xp.asarray(mask),
                           background=xp.zeros(B - 1, xp.float32))


def test_a_term_left_out_of_the_transforms_is_added_where_they_are_read(xp):
    """window_shift and shell_power with ``outside=(bg, C)`` read ``F + bg C``."""
    from cryonb.kernels import shell_power, shell_table, window_shift

    rng = np.random.default_rng(5)
    B, n = 4, 16
    npix = n * (n // 2 + 1)
    F = (rng.normal(size=(B, npix)) + 1j * rng.normal(size=(B, npix))).astype(np.complex64)
    C = (rng.normal(size=npix) + 1j * rng.normal(size=npix)).astype(np.complex64)
    bg = rng.uniform(-2, 2, B).astype(np.float32)
    whole = F + bg[:, None] * C
    flat = rng.choice(npix, 30, replace=False)
    kx, ky = rng.uniform(0, 8, 30).astype(np.float32), rng.uniform(-8, 8, 30).astype(np.float32)
    frac = rng.uniform(-0.5, 0.5, (B, 2))
    dev = [xp.asarray(a) for a in (F, flat, kx, ky)]
    outside = (xp.asarray(bg), xp.asarray(C))
    got = window_shift(*dev, frac, n, outside)
    want = window_shift(xp.asarray(whole), *dev[1:], frac, n)
    got, want = (a.get() if hasattr(a, "get") else a for a in (got, want))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    shells = rng.integers(-1, 6, npix)
    table = shell_table(shells, 6, xp)
    got = shell_power(xp.asarray(F), table, outside)
    want = shell_power(xp.asarray(whole), table)
    got, want = (a.get() if hasattr(a, "get") else a for a in (got, want))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if xp is not np:  # (the CPU's array expressions reject other shapes by broadcasting)
        with pytest.raises(ValueError, match="outside"):
            window_shift(*dev, frac, n, (outside[0][:2], outside[1]))


def test_shifted_images_follow_the_definition(xp):
    from cryonb.kernels import shifted_images_ri

    rng = np.random.default_rng(0)
    B, T, P, n = 5, 9, 300, 40
    X = (rng.normal(size=(B, P)) + 1j * rng.normal(size=(B, P))).astype(np.complex64)
    ph = np.exp(1j * rng.uniform(0, 2 * np.pi, (T, P))).astype(np.complex64)
    w = rng.uniform(0, 2, (B, P)).astype(np.float32)
    rows, shifts = np.sort(rng.integers(0, B, n)), rng.integers(0, T, n)
    z = X[rows] * ph[shifts]
    want = np.concatenate([z.real, z.imag], axis=1)
    Y = shifted_images_ri(*(xp.asarray(a) for a in (X, ph, w, rows, shifts)))
    Y = Y.get() if hasattr(Y, "get") else Y
    assert Y.shape == (n, 2 * P) and Y.dtype == np.float32
    np.testing.assert_allclose(Y, want * np.concatenate([w, w], axis=1)[rows], rtol=1e-5,
                               atol=1e-5)
    none = shifted_images_ri(*(xp.asarray(a) for a in (X, ph, w, rows[:0], shifts[:0])))
    assert none.shape == (0, 2 * P)


def test_window_shift_follows_the_definition(xp):
    from cryonb.kernels import window_shift

    rng = np.random.default_rng(1)
    B, npix, P, n = 6, 900, 250, 30
    F = (rng.normal(size=(B, npix)) + 1j * rng.normal(size=(B, npix))).astype(np.complex64)
    flat = np.sort(rng.choice(npix, P, replace=False))
    kx, ky = rng.integers(0, 16, P).astype(np.float32), rng.integers(-15, 15, P).astype(
        np.float32)
    frac = rng.uniform(-0.5, 0.5, (B, 2))
    want = F[:, flat] * np.exp(-2j * np.pi / n * (frac[:, :1] * kx + frac[:, 1:] * ky))
    got = window_shift(*(xp.asarray(a) for a in (F, flat, kx, ky)), frac, n)
    got = got.get() if hasattr(got, "get") else got
    assert got.shape == (B, P) and got.dtype == np.complex64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    empty = window_shift(xp.asarray(F[:0]), xp.asarray(flat), xp.asarray(kx), xp.asarray(ky),
                         frac[:0], n)
    assert empty.shape == (0, P)
