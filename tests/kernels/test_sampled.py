"""Sampled dot products and weighted scatter-adds: Numba / CuPy against NumPy references."""

import numpy as np
import pytest

from cryonb.kernels import (
    sampled_dot,
    sampled_dot_reference,
    scatter_products,
    scatter_products_reference,
)


def _data(seed=0, nu=30, nv=20, D=70, n=500, M=12):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(nu, D)).astype(np.float32)
    V = rng.normal(size=(nv, D)).astype(np.float32)
    iu, iv = rng.integers(0, nu, n), rng.integers(0, nv, n)
    iacc, w = rng.integers(0, M, n), rng.random(n).astype(np.float32)
    return U, V, iu, iv, iacc, w, M


def test_sampled_dot_cpu():
    U, V, iu, iv, *_ = _data()
    np.testing.assert_allclose(sampled_dot(U, V, iu, iv), sampled_dot_reference(U, V, iu, iv),
                               rtol=1e-4, atol=1e-4)
    assert sampled_dot(U, V, iu[:0], iv[:0]).shape == (0,)


@pytest.mark.parametrize("with_v", [True, False])
def test_scatter_products_cpu(with_v):
    U, V, iu, iv, iacc, w, M = _data(1)
    a = np.zeros((M, U.shape[1]))
    b = np.zeros((M, U.shape[1]))
    scatter_products(a, U, V if with_v else None, iu, iv, iacc, w)
    scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_scatter_is_deterministic():
    U, V, iu, iv, iacc, w, M = _data(2, n=5000)
    a = np.zeros((M, U.shape[1]))
    b = np.zeros((M, U.shape[1]))
    scatter_products(a, U, V, iu, iv, iacc, w)
    scatter_products(b, U, V, iu, iv, iacc, w)
    assert np.array_equal(a, b)


@pytest.mark.gpu
# sparse products where they apply; atomics; the default choice (by samples per row)
@pytest.mark.parametrize("sparse", [True, False, None])
def test_gpu_kernels_match_reference(sparse):
    import cupy

    U, V, iu, iv, iacc, w, M = _data(3)
    d = sampled_dot(cupy.asarray(U), cupy.asarray(V), cupy.asarray(iu), cupy.asarray(iv))
    np.testing.assert_allclose(d.get(), sampled_dot_reference(U, V, iu, iv), rtol=1e-4,
                               atol=1e-4)
    for with_v in (True, False):
        a = cupy.zeros((M, U.shape[1]))
        scatter_products(a, cupy.asarray(U), cupy.asarray(V) if with_v else None,
                         cupy.asarray(iu), cupy.asarray(iv), cupy.asarray(iacc), cupy.asarray(w),
                         sparse)
        b = np.zeros((M, U.shape[1]))
        scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
        np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-5)
    # as the E-step uses it: each row of U belongs to one target row (sparse products)
    owner = np.random.default_rng(4).integers(0, M, U.shape[0])
    for with_v in (True, False):
        a = cupy.zeros((M, U.shape[1]))
        scatter_products(a, cupy.asarray(U), cupy.asarray(V) if with_v else None,
                         cupy.asarray(iu), cupy.asarray(iv), cupy.asarray(owner[iu]),
                         cupy.asarray(w), sparse)
        b = np.zeros((M, U.shape[1]))
        scatter_products_reference(b, U, V if with_v else None, iu, iv, owner[iu], w)
        tol = 1e-9 if sparse is True else 1e-5  # float64 products / float32 products
        np.testing.assert_allclose(a.get(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("with_v", [True, False])
def test_scatter_products_by_runs(xp, with_v):
    """Sorted targets with their runs given (the residual's per-particle sums): the same
    sums, one row per run, empty runs left alone; on the GPU deterministic."""
    from cryonb.kernels import segment_starts

    U, V, iu, iv, iacc, w, M = _data(5, n=3000, M=40)
    iacc = np.sort(iacc)
    iacc[iacc == 7] = 8  # an empty run
    args = [xp.asarray(a) for a in (U, V if with_v else None, iu, iv, iacc, w)
            if a is not None]
    if not with_v:
        args.insert(1, None)
    runs = segment_starts(xp.asarray(iacc), M)
    a = xp.ones((M, U.shape[1]))
    scatter_products(a, *args, starts=runs)
    b = np.ones((M, U.shape[1]))
    scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
    got = a.get() if hasattr(a, "get") else a
    np.testing.assert_allclose(got, b, rtol=1e-5, atol=1e-5)
    assert np.all(got[7] == 1.0)
    again = xp.ones((M, U.shape[1]))
    scatter_products(again, *args, starts=runs)
    assert bool((again == a).all())


def test_scatter_products_runs_must_match_rows():
    """Runs for another number of rows are refused (the GPU would read past them)."""
    U, V, iu, iv, iacc, w, M = _data(6, n=50, M=10)
    with pytest.raises(ValueError, match=r"runs of an accumulator with 10 rows need \(11,\)"):
        scatter_products(np.zeros((M, U.shape[1])), U, V, iu, iv, np.sort(iacc), w,
                         starts=np.arange(M, dtype=np.int64))
