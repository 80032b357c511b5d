"""Combining sums (cryonb.parallel.combine): fixed order, disc files, errors by rank."""

from __future__ import annotations

import numpy as np
import pytest

from cryonb.errors import ResourceError
from cryonb.parallel.combine import (
    ordered_sum,
    rank_sum_path,
    read_rank_sums,
    write_rank_sum,
)


def _vectors(n=4, m=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=m) * 10.0 ** rng.integers(-8, 8, m) for _ in range(n)]


def test_ordered_sum_is_left_to_right():
    vs = _vectors()
    want = ((vs[0] + vs[1]) + vs[2]) + vs[3]
    got = ordered_sum([vs[0], None, vs[1], vs[2], vs[3]])
    np.testing.assert_array_equal(got, want)  # bit for bit
    assert got is not vs[0]
    np.testing.assert_array_equal(ordered_sum([None], size=3), np.zeros(3))
    with pytest.raises(ValueError):
        ordered_sum([np.ones(2), np.ones(3)])


def test_ordered_sum_may_take_the_callers_vectors():
    """``own``: the first vector is the result (no copy of a run's sums), unless read-only
    (arrays that came through ipyparallel); the same bits either way."""
    vs = _vectors()
    want = ordered_sum(vs)
    first = vs[0].copy()
    got = ordered_sum([first, *vs[1:]], own=True)
    assert got is first
    np.testing.assert_array_equal(got, want)
    ro = vs[0].copy()
    ro.flags.writeable = False
    got = ordered_sum([ro, *vs[1:]], own=True)
    assert got is not ro
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ro, vs[0])


@pytest.mark.parametrize("gpu", [False, pytest.param(True, marks=pytest.mark.gpu)],
                         ids=["cpu", "gpu"])
def test_sums_pack_into_one_vector_from_either_side(gpu):
    """``pack_arrays`` writes each array (complex as float pairs, other float types widened)
    straight into its part of the vector, from the device too; ``unpack_arrays`` inverts it."""
    from cryonb.backend import gpu_available
    from cryonb.em._model import pack_arrays, unpack_arrays

    if gpu and not gpu_available():
        pytest.skip("no usable GPU (CuPy)")
    rng = np.random.default_rng(1)
    arrays = {"c": rng.normal(size=(3, 4, 5)) + 1j * rng.normal(size=(3, 4, 5)),
              "f": rng.normal(size=(2, 7)), "s": rng.normal(size=(6,)).astype(np.float32),
              "t": np.asfortranarray(rng.normal(size=(4, 3)))}
    given = arrays
    if gpu:
        import cupy

        given = {k: cupy.asarray(v) for k, v in arrays.items()}
        given["t"] = cupy.asfortranarray(given["t"])  # not C-contiguous: copied on the host
    vec = pack_arrays(given.values())
    assert vec.dtype == np.float64 and vec.size == 2 * 60 + 14 + 6 + 12
    shapes = [(k, v.shape, v.dtype.kind == "c") for k, v in arrays.items()]
    back = unpack_arrays(vec, shapes)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


def test_disc_and_network_orders_give_identical_bits(tmp_path):
    vs = _vectors(3)
    root = str(tmp_path / "run")
    for r, v in zip((1, 2, 3), vs):
        write_rank_sum(root, "estep", 4, r, v)
    assert rank_sum_path(root, "estep", 4, 2).name == "run_it004_rank2.tmp"
    got = read_rank_sums(root, "estep", 4, [3, 1, 2], vs[0].size)
    np.testing.assert_array_equal(got, ordered_sum(vs))
    assert not list(tmp_path.glob("*.tmp"))  # removed after use


def test_disc_errors_name_the_rank(tmp_path):
    root = str(tmp_path / "run")
    write_rank_sum(root, "init", 0, 1, np.ones(5))
    assert rank_sum_path(root, "init", 0, 1).name == "run_it000_init_rank1.tmp"
    with pytest.raises(ResourceError, match="rank 2's sums"):
        read_rank_sums(root, "init", 0, [1, 2], 5)
    write_rank_sum(root, "init", 0, 2, np.ones(4))
    with pytest.raises(ResourceError, match=r"rank 2's sums .* hold 4 values, expected 5"):
        read_rank_sums(root, "init", 0, [1, 2], 5)
