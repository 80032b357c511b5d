"""The coarse pass's log-posteriors: NumPy and CuPy against a loop over the definition."""

import numpy as np
import pytest

from cryonb.kernels import (
    PRECISIONS,
    coarse_log_posterior,
    coarse_log_posterior_reference,
    cross_products,
    split_tf32,
    split_tf32_reference,
    tf32_enabled,
)


def _inputs(seed=0, B=5, T=7, K=4, R=9):
    """Arguments of coarse_log_posterior (cross, x2, a2, offsets, centres, log_pdf, inv2,
    seed classes, R)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    cross = rng.normal(size=(B, T, K * R)).astype(f32) * 50
    x2 = rng.uniform(100, 200, B).astype(f32)
    a2 = rng.uniform(10, 50, (B, K * R)).astype(f32)
    offsets = rng.uniform(-6, 6, (B, T, 2)).astype(f32)
    centres = rng.uniform(-1, 1, (K, 2)).astype(f32)
    log_pdf = np.log(rng.dirichlet(np.ones(K))).astype(f32)
    log_pdf[2] = -np.inf  # a class without prior weight
    seed_cls = np.array([-1, 1, -1, 3, 0][:B])
    return cross, x2, a2, offsets, centres, log_pdf, f32(0.37), seed_cls, R


def _host(a):
    return a.get() if hasattr(a, "get") else a


def _by_definition(cross, x2, a2, offsets, centres, log_pdf, inv2, seed_cls, R):
    B, T, M = cross.shape
    lw = np.empty_like(cross)
    for b in range(B):
        for t in range(T):
            for m in range(M):
                k = m // R
                if seed_cls[b] >= 0 and k != seed_cls[b]:
                    lw[b, t, m] = -np.inf
                else:
                    d2 = ((offsets[b, t] - centres[k]) ** 2).sum()
                    prior = log_pdf[k] - d2 * inv2
                    lw[b, t, m] = cross[b, t, m] - 0.5 * (x2[b] + a2[b, m]) + prior
    return lw, lw.max(axis=1)


def test_log_posterior_follows_the_definition(xp):
    args = _inputs()
    want_lw, want_best = _by_definition(*args)
    R = args[-1]
    lw, best = (_host(a) for a in coarse_log_posterior(
        *(xp.asarray(a) for a in args[:6]), args[6], xp.asarray(args[7]), R))
    assert lw.shape == want_lw.shape and lw.dtype == np.float32
    fin = np.isfinite(want_lw)
    assert np.array_equal(fin, np.isfinite(lw))
    np.testing.assert_allclose(lw[fin], want_lw[fin], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(best, want_best, rtol=1e-6, atol=1e-4)
    assert np.all(np.isneginf(lw[1][:, np.arange(lw.shape[2]) // R != 1]))


def test_cpu_kernel_is_the_array_expressions_bit_for_bit():
    """The Numba pass does the reference's float32 operations in its order; it works in
    place on a contiguous float32 product (the coarse pass's), on a copy otherwise."""
    cross, *rest = _inputs(2, B=4, T=21, K=6, R=36)
    want_lw, want_best = coarse_log_posterior_reference(cross, *rest)
    lw, best = coarse_log_posterior(cross.astype(np.float64), *rest)
    assert np.array_equal(lw, want_lw) and np.array_equal(best, want_best)
    lw, best = coarse_log_posterior(cross, *rest)
    assert lw is cross and np.array_equal(lw, want_lw) and np.array_equal(best, want_best)
    x2, a2, offsets, centres, log_pdf, inv2, seed_cls, R = rest
    lw, best = coarse_log_posterior(cross[:0], x2[:0], a2[:0], offsets[:0], centres, log_pdf,
                                    inv2, seed_cls[:0], R)
    assert lw.shape == (0, 21, 216) and best.shape == (0, 216)


@pytest.mark.gpu
def test_gpu_log_posterior_large_rows_and_empty():
    """More (class, rotation) columns than one block has threads; an empty pool."""
    import cupy

    args = _inputs(1, B=3, T=21, K=50, R=36)
    want_lw, want_best = _by_definition(*args)
    got_lw, got_best = coarse_log_posterior(*[cupy.asarray(a) for a in args[:6]], args[6],
                                            cupy.asarray(args[7]), args[8])
    # the CPU twin's bits (the same float32 operations, no fused multiply-adds)
    cpu_lw, cpu_best = coarse_log_posterior(*args)
    assert np.array_equal(got_lw.get(), cpu_lw) and np.array_equal(got_best.get(), cpu_best)
    fin = np.isfinite(want_lw)
    np.testing.assert_allclose(got_lw.get()[fin], want_lw[fin], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got_best.get(), want_best, rtol=1e-6, atol=1e-4)
    e = [cupy.zeros((0, 4, 6), cupy.float32), cupy.zeros(0, cupy.float32),
         cupy.zeros((0, 6), cupy.float32), cupy.zeros((0, 4, 2), cupy.float32),
         cupy.zeros((2, 2), cupy.float32), cupy.zeros(2, cupy.float32), 0.5,
         cupy.zeros(0, cupy.int64)]
    lw, best = coarse_log_posterior(*e, 3)
    assert lw.shape == (0, 4, 6) and best.shape == (0, 6)


def _product_inputs(m=300, n=200, k=1024, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((n, k)).astype(np.float32))


def test_cross_products_cpu_is_blas(monkeypatch):
    """The CPU multiplies in float32 whatever precision is asked for (a GPU setting)."""
    x, y = _product_inputs(7, 5, 64)
    assert np.array_equal(cross_products(x, y), x @ y.T)
    for precision in PRECISIONS:
        assert np.array_equal(cross_products(x, y, precision=precision), x @ y.T)
    assert np.array_equal(cross_products(x, split_tf32(y), precision="3xtf32"), x @ y.T)
    with pytest.raises(ValueError, match="precision 'fp16': expected one of tf32, 3xtf32"):
        cross_products(x, y, precision="fp16")
    monkeypatch.setenv("CRYONB_TF32", "0")
    assert not tf32_enabled()
    monkeypatch.setenv("CRYONB_TF32", "off")
    assert not tf32_enabled()
    monkeypatch.setenv("CRYONB_TF32", "1")
    assert tf32_enabled()


def test_split_tf32_is_exact_and_tf32_representable():
    """hi + lo == a bit for bit; hi has 10 mantissa bits (rounded to nearest); |lo| is at
    most half of hi's last place."""
    rng = np.random.default_rng(5)
    a = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-20, 20, 4000),
                        [0.0, -0.0, 1.0, -3.0, 1e-40, 2**-126, 1 + 2**-11, 1 + 3 * 2**-12]]
                       ).astype(np.float32).reshape(8, -1)
    hi, lo = split_tf32(a)
    assert hi.shape == lo.shape == a.shape and hi.dtype == lo.dtype == np.float32
    np.testing.assert_array_equal(hi + lo, a)
    assert not (hi.view(np.uint32) & 0x1FFF).any()  # the 13 dropped bits are zero
    normal = np.abs(a) >= 2**-126
    assert (np.abs(lo[normal]) <= np.abs(a[normal]) * 2.0**-11).all()
    assert hi.ravel()[-2] == np.float32(1 + 2**-10)  # a half rounds away from zero
    assert hi.ravel()[-1] == np.float32(1 + 2**-10)  # above a half rounds up


def _relative_error(got, x, y):
    want = x.astype(np.float64) @ y.astype(np.float64).T
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.gpu
def test_cross_products_gpu_tf32_is_tensor_cores(monkeypatch):
    """TF32 (the default) errs as 10-bit mantissas do, well above float32's rounding and
    well below what would change a ranking; tf32=False and CRYONB_TF32=0 give float32's."""
    import cupy

    x, y = _product_inputs()
    xd, yd = cupy.asarray(x), cupy.asarray(y)
    tf = cross_products(xd, yd)
    assert tf.shape == (300, 200) and tf.dtype == cupy.float32
    err_tf32 = _relative_error(tf.get(), x, y)
    err_fp32 = _relative_error(cross_products(xd, yd, precision="float32").get(), x, y)
    assert 2e-5 < err_tf32 < 3e-3, err_tf32
    assert err_fp32 < 2e-6, err_fp32
    # three TF32 products of the split parts: float32's accuracy, y split once or per call
    err_3x = _relative_error(cross_products(xd, yd, precision="3xtf32").get(), x, y)
    assert err_3x < 2e-6, err_3x
    pair = split_tf32(yd)
    np.testing.assert_array_equal(cross_products(xd, pair, precision="3xtf32").get(),
                                  cross_products(xd, yd, precision="3xtf32").get())
    np.testing.assert_array_equal(cross_products(xd, pair, precision="tf32").get(), tf.get())
    monkeypatch.setenv("CRYONB_TF32", "0")
    assert _relative_error(cross_products(xd, yd).get(), x, y) < 2e-6
    # CuPy's own float32 products keep their precision (the setting is per call)
    assert _relative_error((xd @ yd.T).get(), x, y) < 2e-6


@pytest.mark.gpu
def test_cross_products_gpu_streams_views_and_empty():
    import cupy

    x, y = _product_inputs(64, 48, 96, seed=4)
    want = x @ y.T
    s = cupy.cuda.Stream(non_blocking=True)
    with s:  # the product runs on the caller's stream
        xd = cupy.asarray(np.asfortranarray(x))  # not C-contiguous: copied
        got = cross_products(xd, cupy.asarray(y)[:, :])
        s.synchronize()
    np.testing.assert_allclose(got.get(), want, rtol=0, atol=3e-3 * np.abs(want).max())
    assert cross_products(cupy.zeros((0, 8), cupy.float32),
                          cupy.zeros((5, 8), cupy.float32)).shape == (0, 5)
    z = cross_products(cupy.ones((3, 0), cupy.float32), cupy.ones((4, 0), cupy.float32))
    assert z.shape == (3, 4) and not z.any().get()
    with pytest.raises(ValueError, match="rows of 8 values, y of 9"):
        cross_products(cupy.zeros((2, 8), cupy.float32), cupy.zeros((2, 9), cupy.float32))
    for precision, tol in (("tf32", 3e-3), ("3xtf32", 2e-6)):
        with s:
            got = cross_products(xd, cupy.asarray(y)[:, :], precision=precision)
            s.synchronize()
        assert _relative_error(got.get(), x, y) < tol, precision
        z = cross_products(cupy.ones((3, 0), cupy.float32), cupy.ones((4, 0), cupy.float32),
                           precision=precision)
        assert z.shape == (3, 4) and not z.any().get()


@pytest.mark.gpu
def test_split_tf32_gpu_is_the_reference():
    import cupy

    rng = np.random.default_rng(6)
    a = (rng.standard_normal((300, 77)) * 10.0 ** rng.integers(-8, 8, (300, 77))
         ).astype(np.float32)
    view = cupy.asarray(a)[:, 1:]
    assert not view.flags.c_contiguous  # copied before the kernel
    hi, lo = split_tf32(view)
    want = split_tf32_reference(a[:, 1:])
    np.testing.assert_array_equal(hi.get(), want[0])
    np.testing.assert_array_equal(lo.get(), want[1])
    e = split_tf32(cupy.zeros((0, 3), cupy.float32))
    assert e[0].shape == e[1].shape == (0, 3)
