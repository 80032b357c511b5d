"""The pose refinement's neighbour terms: the definition, on both backends."""

import numpy as np
import pytest


def test_pose_neighbours_follow_the_definition(xp):
    from cryonb.kernels import pose_neighbours

    rng = np.random.default_rng(2)
    B, T, M, P = 7, 5, 12, 333

    def cplx(*shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)

    X, ph, refs = cplx(B, P), np.exp(1j * rng.uniform(0, 6.3, (T, P))).astype(np.complex64), \
        cplx(M, P)
    ctf = rng.uniform(-1, 1, (B, P)).astype(np.float32)
    inv = rng.uniform(0.1, 2, (B, P)).astype(np.float32)
    shift = rng.integers(0, T, B)
    rows = rng.integers(0, M, (B, 3))
    steps = np.exp(1j * rng.uniform(0, 6.3, (4, P)))  # the four translation steps' phases
    stencil = np.concatenate([steps.real, -steps.imag], axis=1).T.astype(np.float32)
    refs_ri = np.concatenate([refs.real, refs.imag], axis=1)
    args = (X, ph, shift, ctf, inv, refs, refs_ri, np.abs(refs) ** 2, rows, stencil)
    l_psi, l_t = pose_neighbours(*(xp.asarray(a) for a in args))
    l_psi, l_t = (a.get() if hasattr(a, "get") else a for a in (l_psi, l_t))
    assert l_psi.shape == (B, 3) and l_t.shape == (B, 4) and l_psi.dtype == np.float64
    # the definition in complex128
    Y = X.astype(complex) * ph[shift] * (ctf * inv)
    for b in range(B):
        a2 = [(ctf[b] ** 2 * inv[b] * np.abs(refs[r].astype(complex)) ** 2).sum() for r in rows[b]]
        want = [np.real(np.vdot(refs[r], Y[b])) - 0.5 * a for r, a in zip(rows[b], a2)]
        np.testing.assert_allclose(l_psi[b], want, rtol=1e-4, atol=1e-3)
        want_t = [np.real(np.vdot(refs[rows[b, 1]], Y[b] * steps[q])) - 0.5 * a2[1]
                  for q in range(4)]
        np.testing.assert_allclose(l_t[b], want_t, rtol=1e-4, atol=1e-3)


def _refine_case(seed=0, B=200):
    rng = np.random.default_rng(seed)
    l_psi = rng.normal(size=(B, 3)) * 3
    l_psi[:, 1] += 4  # mostly concave: the best sample above its neighbours
    l_t = rng.normal(size=(B, 4)) * 3 + l_psi[:, 1:2] - 2
    psi = rng.uniform(0, 360, B)
    psi[:3] = [0.0, 359.9, 0.1]  # the vertex may cross 0 / 360
    off = rng.uniform(-4, 4, (B, 2))
    prior = rng.uniform(-1, 1, (B, 2))
    d = 0.5
    steps = np.array([[-d, 0], [d, 0], [0, -d], [0, d]])
    return l_psi, l_t, psi, off, prior, steps, 0.07, 5.0, d


def _vertex_of(lm, l0, lp):
    den = lm - 2 * l0 + lp
    return float(np.clip(0.5 * (lm - lp) / den, -0.5, 0.5)) if den < 0 else 0.0


def test_refined_pose_is_the_vertex_of_each_axis():
    """Per particle: psi moved by dpsi times the vertex of (l_psi[0], l_psi[1], l_psi[2]),
    modulo 360; x and y by d times the vertices of the translation neighbours with the
    offset prior added (the best sample's term with its own prior in the middle)."""
    from cryonb.kernels import refine_pose

    l_psi, l_t, psi, off, prior, steps, inv2, dpsi, d = _refine_case()
    got_psi, got_off = refine_pose(l_psi, l_t, psi, off, prior, steps, inv2, dpsi, d)
    for b in range(len(psi)):
        dd = off[b] - prior[b]
        lt = [l_t[b, j] - ((dd + steps[j]) ** 2).sum() * inv2 for j in range(4)]
        l0 = l_psi[b, 1] - (dd * dd).sum() * inv2
        want_psi = (psi[b] + dpsi * _vertex_of(*l_psi[b])) % 360
        want_off = off[b] + d * np.array([_vertex_of(lt[0], l0, lt[1]),
                                          _vertex_of(lt[2], l0, lt[3])])
        np.testing.assert_allclose(got_psi[b], want_psi, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got_off[b], want_off, rtol=1e-12, atol=1e-12)
    assert ((got_psi >= 0) & (got_psi < 360)).all()
    _, same_off = refine_pose(l_psi, l_t, psi, off, prior, steps, inv2, dpsi, 0.0)
    np.testing.assert_array_equal(same_off, off)  # d = 0: offsets not refined


@pytest.mark.gpu
def test_cupy_refined_pose_matches_the_reference():
    import cupy

    from cryonb.kernels import refine_pose, refine_pose_reference

    case = _refine_case(1, B=5000)
    dev = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in case]
    for d in (case[-1], 0.0):
        want = refine_pose_reference(*case[:-1], d)
        got = refine_pose(*dev[:-1], d)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.get(), w, rtol=1e-12, atol=1e-9)
