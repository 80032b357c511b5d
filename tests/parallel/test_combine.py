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
