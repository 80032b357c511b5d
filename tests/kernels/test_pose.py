"""The pose refinement's neighbour terms: the definition, on both backends."""

import numpy as np


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
