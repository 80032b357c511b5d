"""Helpers of the parallel runtime's tests: the tiny set's options, the check against the
serial reference, and the invariance grid run on engines (shared by the non-MPI and the MPI
test modules).

Each grid case: (ranks, threads, pool, I/O mode, combine mode). Every case must give the serial
reference's classes and sums (see :func:`assert_same_as_reference`).
"""

from __future__ import annotations

import numpy as np

from cryonb.em._config import Class2DConfig
from cryonb.parallel import run_class2d

N_PARTICLES, BOX, PER_STACK = 150, 32, 50
SUM_RTOL = 1e-6


def tiny_config(star, out, **kw) -> Class2DConfig:
    """The tests' 2D classification options (fast, CPU path), with ``kw`` changed."""
    base = {"i": str(star), "o": str(out / "run"), "K": 3, "iter": 2, "psi_step": 20.0,
            "offset_range": 2.0, "random_seed": 0, "timeout": 120.0, "cpu": True}
    base.update(kw)
    return Class2DConfig(**base).validate()


def assert_same_as_reference(result, reference) -> None:
    """Same classes per particle, sums equal to :data:`SUM_RTOL` of the largest sum."""
    from cryonb.io import read_mrc, read_particles

    assert result.iteration == 2 and not result.stopped
    assert result.sums is not None
    ref = reference["sums"]
    err = np.max(np.abs(result.sums - ref)) / np.max(np.abs(ref))
    assert err < SUM_RTOL, f"sums differ by {err:.2e} of the largest"
    cls = read_particles(result.files["data"]).particles["rlnClassNumber"].to_numpy() - 1
    np.testing.assert_array_equal(cls, reference["cls"])
    classes = read_mrc(result.classes).data
    assert classes.shape == reference["classes"].shape


CASES = [
    (3, 1, 64, "parallel", "network"),
    (3, 2, 20, "preread", "disc"),
    (3, 2, 33, "scratch", "network"),
    (3, 1, 50, "leader", "network"),
    (2, 2, 25, "leader", "disc"),
    (3, 3, 7, "parallel", "disc"),
    (3, 2, 75, "parallel", "network"),  # one pool per worker (each must get one)
]
IDS = [f"r{r}-j{j}-p{p}-{io}-{c}" for r, j, p, io, c in CASES]


def run_case(client, tiny_set, reference, tmp_path, case, mpi: bool):
    """Run one case on ``client``'s engines and check it against the reference."""
    ranks, j, pool, io_mode, combine = case
    cfg = tiny_config(tiny_set, tmp_path, ranks=ranks, j=j, pool=pool, io_mode=io_mode,
                      combine=combine,
                      scratch_dir=str(tmp_path / "scratch") if io_mode == "scratch" else "")
    result = run_class2d(cfg, client=client, return_sums=True)
    assert_same_as_reference(result, reference)
    assert result.engines == ("attach (mpi)" if mpi else "attach")
    assert [r.role for r in result.ranks] == ["leader"] + ["worker"] * (ranks - 1)
    assert len({r.pid for r in result.ranks}) == ranks
    if mpi:
        assert [r.mpi_rank for r in result.ranks] == list(range(ranks))
    workers = result.stats.iterations[-1].ranks
    assert sorted(workers) == list(range(1, ranks)) and 0 not in workers
    assert sum(t.particles for t in workers.values()) == 150
    if -(-150 // pool) >= ranks - 1:  # as many pools as workers at least: each got one
        assert all(t.pools >= 1 for t in workers.values()), workers
    assert not list(tmp_path.glob("*.tmp"))  # disc sums removed
    if io_mode == "scratch":
        assert not list((tmp_path / "scratch").iterdir())
    return result
