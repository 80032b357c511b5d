"""Masked images to a pass's shifted Fourier pixels and shell powers (masked_transforms):
NumPy and CuPy (the fused kernels for boxes of 64..512, the separate steps otherwise)
against the formulas: np.roll, the mask, np.fft.rfft2 in double precision, a gather and a
phase ramp, bincount."""

import numpy as np
import pytest

from cryonb.em._estep import _pixels, soft_circular_mask
from cryonb.kernels import masked_transforms, transform_tables
from cryonb.kernels._transform import FUSED_BOXES


def _host(a):
    return a.get() if hasattr(a, "get") else a


def _masked(imgs, scale, shift, mask, noise):
    out = []
    for b, im in enumerate(imgs.astype(np.float64)):
        im = np.roll(im * scale[b], (shift[b, 1], shift[b, 0]), axis=(0, 1))
        if noise is None:
            bg = (im * (1 - mask)).sum() / (1 - mask).sum()
            out.append(im * mask + bg * (1 - mask))
        else:
            out.append(im * mask + noise[b] * (1 - mask))
    return np.array(out)


@pytest.mark.parametrize("with_noise", [False, True], ids=["zero mask", "noise"])
@pytest.mark.parametrize("N", [48, 64, 256, 512])
def test_masked_transforms_follow_the_definition(xp, with_noise, N):
    rng = np.random.default_rng(N + with_noise)
    B = 6 if N < 512 else 3  # not a multiple of the column kernel's images per block
    imgs = (rng.normal(size=(B, N, N)) + 3).astype(np.float32)
    scale = rng.uniform(0.5, 2, B).astype(np.float32)
    shift = rng.integers(-N, N, (B, 2))
    frac = rng.uniform(-0.5, 0.5, (B, 2)).astype(np.float32)
    mask = np.fft.ifftshift(soft_circular_mask(N, N / 3, 5.0)).astype(np.float32)
    noise = rng.normal(size=(B, N, N)).astype(np.float32) if with_noise else None
    flat, kx, ky, _ = _pixels(N, 0.7 * N)
    h = N // 2 + 1
    KY, KX = np.meshgrid(np.fft.fftfreq(N, 1 / N), np.arange(h), indexing="ij")
    bins = np.rint(np.hypot(KX, KY)).astype(int).ravel()
    nsh = h
    outside = None if with_noise else np.fft.rfft2(1 - mask).astype(np.complex64).ravel()
    tables = transform_tables(N, flat, kx, ky, np.where(bins < nsh, bins, -1), nsh, outside, xp)
    assert tables.fused == (xp is not np and N in FUSED_BOXES)

    F = np.fft.rfft2(_masked(imgs, scale, shift, mask, noise)).reshape(B, -1)
    want_x = F[:, flat] * np.exp(-2j * np.pi / N * (frac[:, :1] * kx + frac[:, 1:] * ky))
    keep = bins < nsh
    want_p = np.stack([np.bincount(bins[keep], np.abs(row[keep]) ** 2, minlength=nsh)
                       for row in F])

    def dev(a):
        return None if a is None else xp.asarray(a)

    got_x, got_p = masked_transforms(dev(imgs), scale, shift, dev(mask), frac, tables,
                                     dev(noise))
    assert got_x.shape == (B, flat.size) and got_x.dtype == np.complex64
    assert got_p.shape == (B, nsh) and got_p.dtype == np.float64
    scale_x = np.abs(want_x).max()
    np.testing.assert_allclose(_host(got_x), want_x, rtol=0,
                               atol=1e-5 * scale_x * max(N, 128) / 256)
    np.testing.assert_allclose(_host(got_p), want_p, rtol=2e-5, atol=1e-6 * want_p.max())
    # the images read in place from a larger array (a device store's rows): the same
    store = np.concatenate([rng.normal(size=(2, N, N)).astype(np.float32), imgs[::-1]])
    rows = np.arange(B + 1, 1, -1)  # imgs[b] is store[B + 1 - b]
    again = masked_transforms(dev(store), scale, shift, dev(mask), frac, tables, dev(noise),
                              rows=dev(rows))
    np.testing.assert_array_equal(_host(again[0]), _host(got_x))
    np.testing.assert_array_equal(_host(again[1]), _host(got_p))


def test_masked_transforms_need_the_outside_transform_without_noise():
    N = 32
    flat, kx, ky, _ = _pixels(N, 20)
    tables = transform_tables(N, flat, kx, ky, np.zeros(N * (N // 2 + 1), int), 1)
    with pytest.raises(ValueError, match="1 - mask"):
        masked_transforms(np.zeros((1, N, N), np.float32), None, np.zeros((1, 2), int),
                          np.ones((N, N), np.float32), np.zeros((1, 2)), tables)


def test_masked_transforms_check_the_shapes_against_the_tables():
    N = 32
    flat, kx, ky, _ = _pixels(N, 20)
    tables = transform_tables(N, flat, kx, ky, np.zeros(N * (N // 2 + 1), int), 1,
                              np.zeros(N * (N // 2 + 1), np.complex64))
    imgs, mask = np.zeros((2, N, N), np.float32), np.ones((N, N), np.float32)
    with pytest.raises(ValueError, match=r"images \(40, 40\) \(expected \(32, 32\)\)"):
        masked_transforms(np.zeros((2, 40, 40), np.float32), None, np.zeros((2, 2), int), mask,
                          np.zeros((2, 2)), tables)
    with pytest.raises(ValueError, match=r"frac \(3, 2\)"):
        masked_transforms(imgs, None, np.zeros((2, 2), int), mask, np.zeros((3, 2)), tables)
