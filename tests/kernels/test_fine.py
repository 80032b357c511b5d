"""The second pass's samples and log-posteriors (cryonb.kernels.fine_sample_terms)."""

import numpy as np
import pytest

from cryonb.kernels import fine_sample_terms, fine_sample_terms_reference


def _case(seed=0, m=40, ts=4, ps=2, R=6, K=3, B=7, T=5):
    rng = np.random.default_rng(seed)
    cb = np.sort(rng.integers(0, B, m))
    ct = rng.integers(0, T, m)
    cr = rng.integers(0, K * R // ps, m)  # rows of the coarse grid: R / ps rotations
    n = m * ps * ts
    f32 = np.float32
    return dict(
        cb=cb, ct=ct, cr=cr, ts=ts, ps=ps, R=R,
        cross=rng.normal(size=n).astype(f32) * 50,
        a2=rng.uniform(10, 90, (m, ps, 1)).astype(f32),
        offset=rng.uniform(-5, 5, (B, 2)).astype(f32),
        trans=rng.uniform(-3, 3, (T * ts, 2)).astype(f32),
        prior=rng.uniform(-1, 1, (K, 2)).astype(f32),
        log_pdf=np.log(rng.dirichlet(np.ones(K))).astype(f32),
        inv2=f32(1 / (2 * 3.7)))


def test_samples_follow_the_definition():
    """Sample (c, q, t) of coarse sample c: particle cb[c], translation ct[c] ts + t, row
    cr[c] ps + q, and the log-posterior of that pose, one sample at a time."""
    a = _case()
    got = fine_sample_terms(**a)
    ts, ps, R = a["ts"], a["ps"], a["R"]
    i = 0
    for c in range(len(a["cb"])):
        for q in range(ps):
            for t in range(ts):
                b, tf, rf = a["cb"][c], a["ct"][c] * ts + t, a["cr"][c] * ps + q
                k = rf // R
                off = a["offset"][b] + a["trans"][tf]
                d2 = float(((off - a["prior"][k]) ** 2).sum())
                lw = (a["cross"][i] - 0.5 * a["a2"][c, q, 0] + a["log_pdf"][k]
                      - d2 * a["inv2"])
                assert (got.b[i], got.tf[i], got.rf[i], got.k[i]) == (b, tf, rf, k)
                np.testing.assert_allclose(got.offs[i], off, rtol=1e-6)
                np.testing.assert_allclose(got.d2[i], d2, rtol=1e-5)
                np.testing.assert_allclose(got.lw[i], lw, rtol=1e-5, atol=1e-4)
                i += 1
    assert i == got.lw.shape[0] and got.lw.dtype == np.float32 and got.offs.shape == (i, 2)


@pytest.mark.gpu
def test_cupy_is_the_reference_bit_for_bit():
    """The GPU kernel rounds each operation as the array expressions do: equal values."""
    import cupy

    a = _case(1, m=3000)
    want = fine_sample_terms_reference(**a)
    got = fine_sample_terms(**{k: cupy.asarray(v) if isinstance(v, np.ndarray) else v
                               for k, v in a.items()})
    for name, w, g in zip(want._fields, want, got):
        np.testing.assert_array_equal(g.get(), w, err_msg=name)
    empty = fine_sample_terms(**{**{k: cupy.asarray(v) if isinstance(v, np.ndarray) else v
                                    for k, v in a.items()},
                                 "cb": cupy.zeros(0, np.int64), "ct": cupy.zeros(0, np.int64),
                                 "cr": cupy.zeros(0, np.int64)})
    assert empty.lw.shape == (0,)


def _weights_case(seed=0, B=9, R=36):
    rng = np.random.default_rng(seed)
    b = np.sort(rng.integers(0, B, 400))
    b[:B] = np.arange(B)  # every particle has samples
    b = np.sort(b)
    n = b.size
    wk = (rng.random(n) * (rng.random(n) > 0.3)).astype(np.float32)
    total = np.bincount(b, wk.astype(np.float64), minlength=B) + 1e-3
    rf = rng.integers(0, 3 * R, n)
    best_rf = rng.integers(0, 3 * R, B)
    offs = rng.uniform(-6, 6, (n, 2)).astype(np.float32)
    best_off = rng.uniform(-6, 6, (B, 2)).astype(np.float32)
    psi = np.arange(R) * (360.0 / R)
    return wk, total, b, rf, best_rf, offs, best_off, psi


def test_weights_and_spread_terms_follow_the_definition():
    """w = wk / total of its particle; the angle's distance to the best one's wraps into
    (-180, 180]; the offset's squared distance to the best one's; both times w."""
    from cryonb.kernels import fine_weights

    wk, total, b, rf, best_rf, offs, best_off, psi = _weights_case()
    w, wr, wt = fine_weights(wk, total, b, rf, best_rf, offs, best_off, psi)
    R = psi.size
    for i in range(wk.size):
        p = b[i]
        wi = np.float32(wk[i] / total[p])
        dpsi = (psi[rf[i] % R] - psi[best_rf[p] % R] + 180) % 360 - 180
        assert -180 <= dpsi < 180
        assert w[i] == wi
        np.testing.assert_allclose(wr[i], float(wi) * dpsi**2, rtol=1e-12)
        np.testing.assert_allclose(wt[i], wi * ((offs[i] - best_off[p]) ** 2).sum(), rtol=1e-6)
    assert (w.dtype, wr.dtype, wt.dtype) == (np.float32, np.float64, np.float32)


@pytest.mark.gpu
def test_cupy_weights_are_the_reference_bit_for_bit():
    import cupy

    from cryonb.kernels import fine_weights, fine_weights_reference

    case = _weights_case(1, B=300)
    want = fine_weights_reference(*case)
    got = fine_weights(*(cupy.asarray(a) for a in case))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g.get(), w)
