"""Autopicking and extraction as all-ranks jobs on the parallel runtime.

Seven simulated micrographs of 192 px (a phantom, 4 views, 4 particles each, SNR 0.5) picked
with 12 in-plane angles: about 0.1 s a micrograph. The reference is :func:`cryonb.pick.
run_autopick` with one rank and one thread; every rank count (in this process, on local
engines, on MPI engines), thread count and ``--gpu`` string must give the same picks, and the
micrographs must be split as RELION's ``divide_equally``. One local cluster serves the module;
the last test kills one of its engines.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import warnings

import pandas as pd
import pytest

from cryonb.errors import ConfigError
from cryonb.parallel import (
    RankError,
    autopick_device_map,
    load_figures,
    run_autopick,
    run_extract,
    start_cluster,
)
from cryonb.parallel.devices import GpuSpecError
from cryonb.pick import AutopickConfig, ExtractConfig, divide_equally, simulate_pick_set
from cryonb.pick import run_autopick as pick_in_process
from cryonb.pick import run_extract as extract_in_process
from cryonb.testing.tools import require_module, require_tool

N_MICROGRAPHS = 7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The simulated micrographs (a :class:`cryonb.pick.PickSet`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return simulate_pick_set(tmp_path_factory.mktemp("allranks"),
                                 n_micrographs=N_MICROGRAPHS, size=192, per_micrograph=4,
                                 snr=0.5, n_views=4, seed=1)


def _config(data, odir, **changes) -> AutopickConfig:
    values = {"i": str(data.micrographs_star), "ref": str(data.references),
              "odir": f"{odir}/", "particle_diameter": data.particle_diameter,
              "lowpass": 20.0, "ctf": True, "invert": True, "threshold": 0.1,
              "psi_step": 30.0, "shrink": 0.0, "timeout": 60.0, "cpu": True}
    values.update(changes)
    return AutopickConfig(**values).validate()


def _extract_config(data, coords, odir, **changes) -> ExtractConfig:
    values = {"i": str(data.micrographs_star), "coord_list": str(coords),
              "part_dir": f"{odir}/", "extract_size": 48, "norm": True, "bg_radius": 18,
              "invert_contrast": True, "timeout": 60.0}
    values.update(changes)
    return ExtractConfig(**values).validate()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One rank, one thread, without the runtime: the picks and the extracted particles."""
    result = pick_in_process(_config(data, tmp_path_factory.mktemp("reference")))
    assert result.n_picks >= 20  # the set is easy: most of the 28 particles are found
    extracted = extract_in_process(_extract_config(
        data, result.coordinate_list, tmp_path_factory.mktemp("reference_extract")))
    return {"picks": result.picks(), "coordinate_list": result.coordinate_list,
            "particles": _particles(extracted.particles_star)}


@pytest.fixture(scope="module")
def engines():
    with start_cluster(3, "local") as handle:
        yield handle


def _particles(star) -> pd.DataFrame:
    from cryonb.io import read_particles

    t = read_particles(star)
    images = t.images(range(len(t)))
    df = t.particles[["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                      "rlnDefocusU"]].reset_index(drop=True)
    return df.assign(total=images.sum(axis=(1, 2)), first=images[:, 0, 0])


def _check(out, reference, ranks: int) -> None:
    """Same picks as the reference; the micrographs split as divide_equally."""
    assert not out.stopped and out.job == "autopick"
    pd.testing.assert_frame_equal(out.result.picks(), reference["picks"])
    split = {r: divide_equally(N_MICROGRAPHS, ranks, r) for r in range(ranks)}
    assert out.split == split
    for m in out.result.micrographs:
        first, stop = split[m.rank]
        assert first <= m.index < stop
    per_rank = out.stats.iterations[0].ranks
    assert {r: t.particles for r, t in per_rank.items()} == {
        r: stop - first for r, (first, stop) in split.items()}
    assert [r.role for r in out.ranks] == ["worker"] * ranks
    assert out.device_map == {str(r): [] for r in range(ranks)} and not out.gpu


def test_divide_equally_is_relions():
    for n in range(13):
        for size in range(1, 6):
            blocks = [divide_equally(n, size, r) for r in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
            sizes = [stop - first for first, stop in blocks]
            assert sizes == [n // size + (r < n % size) for r in range(size)]


@pytest.mark.parametrize("j", [1, 2])
def test_one_rank_runs_in_this_process(data, reference, tmp_path, j):
    events = []
    out = run_autopick(_config(data, tmp_path, j=j), progress=events.append)
    _check(out, reference, 1)
    assert out.engines == "inprocess" and out.ranks[0].pid == os.getpid()
    assert out.ranks[0].threads == j
    kinds = [e["event"] for e in events]
    assert kinds[0] == "setup" and kinds[-1] == "done" and "heartbeat" in kinds
    setup = events[0]
    assert setup["job"] == "autopick" and setup["n_micrographs"] == N_MICROGRAPHS
    assert setup["split"] == {0: [0, N_MICROGRAPHS]}
    pools = [e for e in events if e["event"] == "pool"]
    assert sorted(e["index"] for e in pools) == list(range(N_MICROGRAPHS))
    assert [e["done"] for e in pools] == list(range(1, N_MICROGRAPHS + 1))
    assert sum(e["picks"] for e in pools) == out.result.n_picks
    assert {e["thread"] for e in pools} <= set(range(j))
    beat = next(e for e in events if e["event"] == "heartbeat")
    assert beat["memory"]["rss"] > 0 and beat["cpu_percent"] >= 0 and beat["gpu_util"] is None
    it = next(e for e in events if e["event"] == "iteration")
    assert it["summary"] == {"n_picks": out.result.n_picks}
    assert it["files"]["summary"] == str(out.result.summary)
    assert "micrographs/s" in out.stats.table() and "pick" in out.stats.table()


@pytest.mark.parametrize(("ranks", "j", "how"), [(2, 1, "client"), (3, 2, "client"),
                                                 (2, 2, "cluster_id")])
def test_engines_give_the_same_picks(data, reference, engines, tmp_path, ranks, j, how):
    if how == "client":
        out = run_autopick(_config(data, tmp_path, ranks=ranks, j=j), client=engines)
    else:
        out = run_autopick(_config(data, tmp_path, ranks=ranks, j=j, engines="attach",
                                   cluster_id=engines.cluster.cluster_id))
    _check(out, reference, ranks)
    assert out.engines == "attach"
    assert len({r.pid for r in out.ranks}) == ranks and os.getpid() not in \
        {r.pid for r in out.ranks}
    assert len(engines.client.ids) == 3  # attached engines are left running


def test_gpu_strings_on_the_cpu(data, reference, engines, tmp_path):
    from cryonb.backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is usable here: see test_ranks_on_gpus_pick_what_the_cpu_picks")
    # automatic: resolved with no device, a warning, the CPU path, the same picks
    out = run_autopick(_config(data, tmp_path / "auto", ranks=3, gpu="", cpu=False),
                       client=engines)
    _check(out, reference, 3)
    assert any("no GPU" in w for w in out.warnings)
    out = run_autopick(_config(data, tmp_path / "cpu", ranks=2, gpu=None, cpu=True),
                       client=engines)
    _check(out, reference, 2)
    # with no device only the automatic string is valid: the error quotes the string
    with pytest.raises(GpuSpecError, match="2:3"):
        run_autopick(_config(data, tmp_path / "bad", ranks=2, gpu="2:3", cpu=False),
                     client=engines)
    with pytest.raises(GpuSpecError, match="'0'"):
        run_autopick(_config(data, tmp_path / "bad1", gpu="0", cpu=False))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad1").exists()


@pytest.mark.parametrize(("spec", "ranks", "j", "devices"), [
    ("", 3, 1, [0, 1, 2]),                # rank % devices
    ("", 5, 2, [0, 1, 2, 3, 0]),
    ("2:3", 2, 1, [2, 3]),
    ("2:3", 3, 4, [2, 3, 2]),             # RELION crashes; cryonb reuses the groups
    ("2:2:1,3", 3, 1, [2, 2, 1]),         # the first id of each group
    ("0,1,1,2:3", 2, 4, [0, 3]),
])
def test_device_map_with_a_fake_device_count(data, tmp_path, spec, ranks, j, devices):
    """GPU_SPEC.md's all-ranks examples with 4 devices: the map the runtime resolves."""
    cfg = _config(data, tmp_path, ranks=ranks, j=j, gpu=spec, cpu=False)
    dmap = autopick_device_map(cfg, 4)
    assert dmap.to_json_dict() == {str(r): [d] for r, d in enumerate(devices)}
    shared = len(set(devices)) < len(devices)
    assert any("shared by" in w for w in dmap.warnings) == shared
    # per host: device 0 of two hosts is not shared
    two_hosts = autopick_device_map(cfg.replace(gpu="0", ranks=2), 4, {0: "a", 1: "b"})
    assert two_hosts.to_json_dict() == {"0": [0], "1": [0]} and not two_hosts.warnings
    cpu = autopick_device_map(cfg.replace(gpu=""), 0)
    assert cpu.to_json_dict() == {str(r): [] for r in range(ranks)}
    if spec:
        with pytest.raises(GpuSpecError):
            autopick_device_map(cfg, 0)


def test_heartbeats_feed_the_load_monitor(data, reference, engines, tmp_path):
    from cryonb.viz import LoadMonitor

    events = []
    out = run_autopick(_config(data, tmp_path, ranks=2), client=engines,
                       progress=events.append)
    _check(out, reference, 2)
    setup = events[0]
    assert [r["pid"] for r in setup["ranks"]] == [r.pid for r in out.ranks]
    beats = [e for e in events if e["event"] == "heartbeat"]
    assert {e["rank"] for e in beats} == {0, 1}
    monitor = LoadMonitor(gpus=False, processes=None)
    for ev in events:
        figures = load_figures(ev)
        if figures is not None:
            monitor.report(**figures)
    latest = monitor.latest().set_index("rank")
    assert sorted(latest.index) == [0, 1]
    assert (latest["rss_mib"] > 10).all() and (latest["cpu_percent"] >= 0).all()
    assert load_figures(setup) is None


def test_extraction_on_engines(data, reference, engines, tmp_path):
    events = []
    cfg = _extract_config(data, reference["coordinate_list"], tmp_path, ranks=3, j=2)
    out = run_extract(cfg, client=engines, progress=events.append)
    assert out.job == "extract" and not out.stopped
    assert out.split == {r: divide_equally(N_MICROGRAPHS, 3, r) for r in range(3)}
    pd.testing.assert_frame_equal(_particles(out.result.particles_star),
                                  reference["particles"])
    assert len(out.result.stacks) == N_MICROGRAPHS
    pools = [e for e in events if e["event"] == "pool"]
    assert sum(e["particles"] for e in pools) == out.result.n_particles


def test_stop_ends_after_the_micrographs_being_picked(data, tmp_path):
    stop = threading.Event()
    events = []

    def progress(ev):
        events.append(ev)
        if ev["event"] == "setup":
            stop.set()

    cfg = _config(data, tmp_path)
    out = run_autopick(cfg, stop_event=stop, progress=progress)
    assert out.stopped and out.result is None
    assert not (tmp_path / "summary.star").exists()
    done = [e for e in events if e["event"] == "pool"]
    assert len(done) < N_MICROGRAPHS
    assert len(list(tmp_path.rglob("*_autopick.star"))) == len(done)
    assert events[-1]["event"] == "done" and events[-1]["stopped"]
    # --only_do_unfinished picks the rest
    rest = run_autopick(cfg.replace(only_do_unfinished=True))
    assert sum(m.skipped for m in rest.result.micrographs) == len(done)


def test_engines_inprocess_with_several_ranks_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="--engines inprocess runs one rank"):
        run_autopick(_config(data, tmp_path, ranks=2, engines="inprocess"))


@pytest.mark.mpi
def test_mpi_engines_give_the_same_picks(data, reference, tmp_path):
    require_tool("mpiexec")
    require_module("mpi4py")
    with start_cluster(2, "mpi") as handle:  # 2 engines: this test is the module's slowest
        out = run_autopick(_config(data, tmp_path, ranks=2, j=2), client=handle)
        _check(out, reference, 2)
        assert out.engines == "attach (mpi)"
        assert [r.mpi_rank for r in out.ranks] == [0, 1]


@pytest.mark.gpu
def test_ranks_on_gpus_pick_what_the_cpu_picks(data, reference, engines, tmp_path):
    """Each engine pinned to its device before CUDA: 3 ranks on the visible GPUs (shared
    cyclically), 2 threads each; the picks of the CPU path (a pixel or a 5th digit apart)."""
    from cryonb.backend import device_count, gpu_available
    from cryonb.pick import match_picks

    if not gpu_available():
        pytest.skip("no usable GPU (CuPy)")
    events = []
    out = run_autopick(_config(data, tmp_path, ranks=3, j=2, gpu="", cpu=False),
                       client=engines, progress=events.append)
    n = device_count()
    assert out.gpu and out.device_map == {str(r): [r % n] for r in range(3)}
    for r in out.ranks:
        # the whole UUID (NVML finds the device by it for the load figures)
        assert len(r.uuids) == 1
        assert re.fullmatch(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", r.uuids[0])
    if n < 3:  # two engines on one physical GPU: found by UUID, shown in the table
        assert len({r.uuids[0] for r in out.ranks}) == n
        assert "shared by" in out.device_table
    beats = [e for e in events if e["event"] == "heartbeat"]
    assert any(e["gpu_util"] is not None for e in beats)
    assert any(e["memory"].get("devices") for e in beats)
    a, b = reference["picks"], out.result.picks()
    assert abs(len(a) - len(b)) <= 1
    xy = ["rlnCoordinateX", "rlnCoordinateY"]
    matched = sum(len(match_picks(p[xy].to_numpy(),
                                  b[b.rlnMicrographName == mic][xy].to_numpy(), 1.5)[0])
                  for mic, p in a.groupby("rlnMicrographName"))
    assert matched >= len(a) - 1


def test_a_dead_engine_is_reported_by_rank(data, engines, tmp_path):
    """Keep last: it kills an engine of the module's cluster."""
    def progress(ev):
        if ev["event"] == "setup":  # before any result is collected
            os.kill(ev["ranks"][2]["pid"], signal.SIGKILL)

    with pytest.raises(RankError) as e:
        run_autopick(_config(data, tmp_path, ranks=3), client=engines, progress=progress)
    msg = str(e.value)
    assert e.value.rank == 2 and msg.startswith("rank 2 (engine") and "died" in msg
    assert f"on host {e.value.host}" in msg
    assert not (tmp_path / "summary.star").exists()
