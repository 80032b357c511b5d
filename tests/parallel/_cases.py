"""The invariance grid run on engines, shared by the non-MPI and the MPI test modules.

Each case: (ranks, threads, pool, I/O mode, combine mode). Every case must give the serial
reference's classes and sums (see ``conftest.assert_same_as_reference``).
"""

from __future__ import annotations

from conftest import assert_same_as_reference, tiny_config

from cryonb.parallel import run_class2d

CASES = [
    (3, 1, 64, "parallel", "network"),
    (3, 2, 20, "preread", "disc"),
    (3, 2, 33, "scratch", "network"),
    (3, 1, 50, "leader", "network"),
    (2, 2, 25, "leader", "disc"),
    (3, 3, 7, "parallel", "disc"),
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
    assert not list(tmp_path.glob("*.tmp"))  # disc sums removed
    if io_mode == "scratch":
        assert not list((tmp_path / "scratch").iterdir())
    return result
