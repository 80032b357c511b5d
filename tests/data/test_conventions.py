"""RELION's Euler-angle conventions."""

import numpy as np

from cryonb.data import euler_to_matrix, inplane_matrix, matrix_to_euler


def test_euler_matrices_are_rotations_and_roundtrip():
    rng = np.random.default_rng(0)
    r, t, p = rng.uniform(-180, 180, 200), rng.uniform(1, 179, 200), rng.uniform(-180, 180, 200)
    A = euler_to_matrix(r, t, p)
    np.testing.assert_allclose(A @ A.transpose(0, 2, 1), np.broadcast_to(np.eye(3), A.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(A), 1.0, atol=1e-12)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(A)), A, atol=1e-10)


def test_relion_reference_values():
    # RELION Euler_angles2matrix(rot=90, tilt=0, psi=0): [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]
    np.testing.assert_allclose(euler_to_matrix(90.0, 0.0, 0.0),
                               [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt 90: rotation about y, z -> x
    np.testing.assert_allclose(euler_to_matrix(0.0, 90.0, 0.0),
                               [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)


def test_inplane_is_upper_left_block_and_degenerate_tilt():
    psi = np.array([0.0, 30.0, 250.0])
    block = euler_to_matrix(0 * psi, 0 * psi, psi)[:, :2, :2]
    np.testing.assert_allclose(inplane_matrix(psi), block)
    rot, tilt, p = matrix_to_euler(euler_to_matrix(40.0, 0.0, 20.0))
    assert abs(float(rot)) < 1e-9 and abs(float(tilt)) < 1e-9
    assert abs(float(p) - 60.0) < 1e-9
