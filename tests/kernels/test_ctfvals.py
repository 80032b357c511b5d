"""CTF values at shared pixels: the CUDA kernel against the array expression."""

import numpy as np
import pytest

from cryonb.ctf import CTFParams, ctf_at, ctf_features
from cryonb.kernels import ctf_values, ctf_values_reference


def _case(m=7, seed=0):
    rng = np.random.default_rng(seed)
    kx, ky = np.meshgrid(np.arange(0, 17), np.arange(-16, 16))
    feat = ctf_features(kx.ravel(), ky.ravel())
    coef = np.c_[rng.uniform(-0.05, -0.01, m), rng.uniform(-1e-3, 1e-3, (m, 2)),
                 rng.uniform(1e-7, 1e-6, m), rng.uniform(-0.2, 0, m)]
    return coef, feat, rng.uniform(-0.01, 0, m), rng.uniform(0.5, 1.5, m)


def test_cpu_is_the_reference():
    coef, feat, b4, scale = _case()
    np.testing.assert_array_equal(
        ctf_values(coef, feat, intact_first_peak=True, b4=b4, scale=scale),
        ctf_values_reference(coef, feat, intact_first_peak=True, b4=b4, scale=scale))


def test_ctf_at_shared_pixels_matches_per_particle_pixels():
    """The shared-pixel path (ctf_values) and the per-particle path (aligned) of ctf_at
    give the same values."""
    p = CTFParams(defocus_u=np.array([15000.0, 22000.0]), defocus_v=np.array([14000.0, 21000.0]),
                  defocus_angle=np.array([30.0, 100.0]), voltage=300.0, cs=2.7,
                  amplitude_contrast=0.1, bfactor=np.array([0.0, 80.0]))
    kx, ky = np.meshgrid(np.arange(0, 9), np.arange(-8, 8))
    a = ctf_at(p, kx.ravel(), ky.ravel(), 16, 1.5, intact_first_peak=True, dtype="float64")
    b = ctf_at(p, np.tile(kx.ravel(), (2, 1)), np.tile(ky.ravel(), (2, 1)), 16, 1.5,
               intact_first_peak=True, dtype="float64", aligned=True)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [{}, {"intact_first_peak": True},
                                     {"b4": True, "scale": True}])
def test_cupy_matches_reference(dtype, options):
    import cupy

    coef, feat, b4, scale = _case(m=300, seed=1)
    kw = {"intact_first_peak": options.get("intact_first_peak", False),
          "b4": b4 if options.get("b4") else None, "scale": scale if options.get("scale") else None}
    got = ctf_values(coef, cupy.asarray(feat), dtype=dtype, **kw)
    assert got.dtype == np.dtype(dtype) and got.shape == (300, feat.shape[0])
    want = ctf_values_reference(coef, feat, dtype=dtype, **kw)
    tol = 2.5e-7 if dtype == "float32" else 1e-13  # float32: one rounding apart at most
    np.testing.assert_allclose(got.get(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("with_scale", [False, True])
def test_ctf_weights_are_the_array_expressions_bit_for_bit(xp, with_scale):
    """ctf_weights: CTF x scale, 1 / sigma2 of each particle's optics group and their two
    products, each rounded once: the expressions' bits on both backends."""
    from cryonb.kernels import ctf_weights, ctf_weights_reference

    rng = np.random.default_rng(3)
    m, P, G = 37, 301, 3
    ctf = rng.uniform(-1, 1, (m, P)).astype(np.float32)
    scale = rng.uniform(0.5, 2, m).astype(np.float32) if with_scale else None
    invsig = rng.uniform(0.01, 50, (G, P)).astype(np.float32)
    optics = rng.integers(0, G, m)
    cs = ctf * (scale[:, None] if with_scale else np.float32(1))
    inv = invsig[optics]
    want = (cs, inv, cs * inv, cs * (cs * inv))
    for ref in (want, ctf_weights_reference(ctf, scale, invsig, optics)):
        for a, b in zip(ref, want, strict=True):
            np.testing.assert_array_equal(a, b)
    got = ctf_weights(xp.asarray(ctf), None if scale is None else xp.asarray(scale),
                      xp.asarray(invsig), xp.asarray(optics))
    assert len(got) == 4
    for a, b in zip(got, want, strict=True):
        a = a.get() if hasattr(a, "get") else a
        assert a.dtype == np.float32 and a.shape == (m, P)
        np.testing.assert_array_equal(a, b)
    # no particles: four empty arrays
    empty = ctf_weights(xp.asarray(ctf[:0]), None, xp.asarray(invsig), xp.asarray(optics[:0]))
    assert all(a.shape == (0, P) for a in empty)
