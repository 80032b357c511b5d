"""The runtime on local ipyparallel engines without MPI (one cluster for the module).

The last test kills an engine: keep it last.
"""

from __future__ import annotations

import os
import signal

import pytest
from parallel_cases import CASES, IDS, run_case, tiny_config

from cryonb.parallel import RankError, run_class2d, start_cluster
from cryonb.parallel.images import SCRATCH_CAPACITY_ENV, image_bytes


@pytest.fixture(scope="module")
def cluster():
    with start_cluster(4, "local") as handle:
        yield handle


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_engines_match_the_serial_run(cluster, tiny_set, reference, tmp_path, case):
    run_case(cluster, tiny_set, reference, tmp_path, case, mpi=False)


def test_scratch_too_small_on_engines(cluster, tiny_set, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_CAPACITY_ENV, str(image_bytes(100, 32) + 4096))
    result = run_case(cluster, tiny_set, reference, tmp_path, (3, 2, 10, "scratch", "disc"),
                      mpi=False)
    # one copy for the host, shared by both workers; 50 particles a phase from the originals
    assert len(result.scratch) == 1 and "room for 100 of 150" in result.scratch[0]
    for it in result.stats.iterations:
        assert sum(t.fallback for t in it.ranks.values()) == 50


def test_attach_by_cluster_id(cluster, tiny_set, tmp_path):
    cfg = tiny_config(tiny_set, tmp_path, ranks=2, j=2, pool=40, engines="attach",
                      cluster_id=cluster.cluster.cluster_id, iter=1)
    result = run_class2d(cfg)
    assert result.iteration == 1 and result.engines == "attach"
    assert len(cluster.client.ids) == 4  # the attached engines are left running


def test_a_silent_engine_is_reported_by_rank(cluster, tiny_set, tmp_path):
    import time

    engines = {}

    def progress(ev):
        if ev["event"] == "setup":
            engines.update({r["rank"]: r["engine"] for r in ev["ranks"]})
        if ev["event"] == "pool" and ev["iteration"] == 1 and engines.get(2) is not None:
            # rank 2's engine gets busy with something else: it stops answering the run
            cluster.client[engines.pop(2)].apply_async(time.sleep, 12)

    cfg = tiny_config(tiny_set, tmp_path, ranks=3, j=1, pool=5, timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(RankError) as e:
        run_class2d(cfg, client=cluster, progress=progress)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert e.value.rank == 2 and msg.startswith("rank 2 (engine")
    assert "--timeout 5" in msg and "host" in msg
    cluster.client.wait(timeout=30)  # let the engine finish sleeping before the next test


def test_a_dead_engine_is_reported_by_rank(cluster, tiny_set, tmp_path):
    ranks = {}

    def progress(ev):
        if ev["event"] == "setup":
            ranks.update({r["rank"]: r for r in ev["ranks"]})
        if ev["event"] == "pool" and ev["iteration"] == 1 and ranks.get(3):
            os.kill(ranks.pop(3)["pid"], signal.SIGKILL)

    cfg = tiny_config(tiny_set, tmp_path, ranks=4, j=1, pool=5, timeout=60.0)
    with pytest.raises(RankError) as e:
        run_class2d(cfg, client=cluster, progress=progress)
    msg = str(e.value)
    assert e.value.rank == 3 and "rank 3 (engine" in msg and "died" in msg
    assert f"on host {e.value.host}" in msg
