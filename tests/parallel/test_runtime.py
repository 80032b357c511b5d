"""The runtime in this process (``--ranks 1``): threads, pools, I/O modes, stop, progress."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from parallel_cases import assert_same_as_reference, tiny_config

from cryonb.errors import ResourceError
from cryonb.parallel import RankInfo, RunStats, auto_pool, images, run_class2d, run_class2d_async
from cryonb.parallel.images import SCRATCH_CAPACITY_ENV, image_bytes
from cryonb.parallel.pools import gpu_pool_max, pool_memory


@pytest.mark.parametrize(("j", "pool", "io_mode"), [
    (1, 150, "parallel"),
    (3, 17, "preread"),
    (2, 40, "scratch"),
    (2, 33, "leader"),
])
def test_one_rank_matches_the_serial_run(tiny_set, reference, tmp_path, j, pool, io_mode):
    cfg = tiny_config(tiny_set, tmp_path, j=j, pool=pool, io_mode=io_mode,
                      scratch_dir=str(tmp_path / "scratch") if io_mode == "scratch" else "")
    result = run_class2d(cfg, return_sums=True)
    assert_same_as_reference(result, reference)
    assert result.engines == "inprocess" and result.pool == pool and not result.gpu
    assert [r.role for r in result.ranks] == ["leader+worker"]
    if io_mode == "scratch":
        assert not list((tmp_path / "scratch").iterdir())  # the copy is removed at the end


def test_scratch_too_small_reads_the_rest_from_origin(tiny_set, reference, tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv(SCRATCH_CAPACITY_ENV, str(image_bytes(60, 32) + 4096))
    cfg = tiny_config(tiny_set, tmp_path, j=2, pool=25, scratch_dir=str(tmp_path / "s"))
    assert cfg.io_mode == "parallel"  # the CLI turns --scratch_dir into scratch; here: explicit
    result = run_class2d(cfg.replace(io_mode="scratch"), return_sums=True)
    assert_same_as_reference(result, reference)
    assert any("room for 60 of 150 particles" in w for w in result.warnings)
    # every iteration reads the 90 particles that did not fit from the original stacks
    fallback = [it.ranks[0].fallback for it in result.stats.iterations]
    assert fallback == [90, 90, 90]


def test_preread_refuses_when_it_cannot_fit(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "available_memory", lambda: 100_000)
    cfg = tiny_config(tiny_set, tmp_path, io_mode="preread")
    with pytest.raises(ResourceError) as e:
        run_class2d(cfg)
    msg = str(e.value)
    assert "--preread_images needs 614.4 kB" in msg and "100.0 kB is available" in msg
    assert not list(tmp_path.glob("run_it*"))  # refused before anything ran


def test_progress_events_and_stats(tiny_set, tmp_path):
    events = []
    cfg = tiny_config(tiny_set, tmp_path, j=2, pool=30)
    result = run_class2d(cfg, progress=events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "setup" and kinds[-1] == "done"
    setup = events[0]
    assert setup["pool"] == 30 and setup["n_particles"] == 150 and "leader+worker" in \
        setup["device_table"]
    pools = [e for e in events if e["event"] == "pool" and e["iteration"] == 1]
    assert sum(e["n"] for e in pools) == 150 and pools[-1]["done"] == 150
    assert {e["thread"] for e in pools} <= {0, 1}
    its = [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in its] == [0, 1, 2]
    assert its[-1]["summary"]["classes"].shape == (3, 32, 32)
    assert "log_likelihood" in its[-1]["history"]
    stages = {(e["stage"], e["state"]) for e in events if e["event"] == "stage"}
    assert {("estep", "end"), ("combine", "end"), ("mstep", "end"), ("write", "end"),
            ("init", "end")} <= stages
    st = result.stats.iterations[-1]
    assert set(st.stages) >= {"estep", "combine", "mstep", "write"}
    assert st.ranks[0].particles == 150 and st.ranks[0].pools == 5
    assert st.ranks[0].particles_per_s > 0 and st.ranks[0].memory["rss"] > 0
    assert "particles/s" in result.stats.table()
    assert len(result.history) == 3 and result.history[-1]["iteration"] == 2


def test_stop_event_keeps_the_last_complete_iteration(tiny_set, tmp_path):
    stop = threading.Event()

    def progress(ev):
        if ev["event"] == "pool" and ev["iteration"] == 2:
            stop.set()

    cfg = tiny_config(tiny_set, tmp_path, j=1, pool=10, iter=3)
    result = run_class2d(cfg, progress=progress, stop_event=stop)
    assert result.stopped and result.iteration == 1
    assert Path(result.classes).name == "run_it001_classes.mrcs"
    assert Path(result.files["optimiser"]).exists()
    assert not list(tmp_path.glob("run_it002*"))


def test_stop_before_writing_writes_the_last_complete_iteration(tiny_set, tmp_path):
    stop = threading.Event()

    def progress(ev):
        if ev["event"] == "pool" and ev["iteration"] == 3:
            stop.set()

    cfg = tiny_config(tiny_set, tmp_path, pool=50, iter=4, write_every=4)
    result = run_class2d(cfg, progress=progress, stop_event=stop)
    assert result.stopped and result.iteration == 2
    assert Path(result.classes).name == "run_it002_classes.mrcs"  # written at the stop


def test_continue_gives_the_uninterrupted_sums(tiny_set, reference, tmp_path):
    first = run_class2d(tiny_config(tiny_set, tmp_path / "a", iter=1, pool=40))
    assert first.iteration == 1
    cfg = tiny_config(tiny_set, tmp_path / "b", iter=2, j=2, pool=40,
                      continue_from=first.files["optimiser"])
    result = run_class2d(cfg, return_sums=True)
    assert result.first_iteration == 1 and [it.iteration for it in result.stats.iterations] == [2]
    assert_same_as_reference(result, reference)


def test_continue_warns_about_the_algorithm_options_it_ignores(tiny_set, tmp_path):
    first = run_class2d(tiny_config(tiny_set, tmp_path / "a", iter=1, pool=40))
    quiet = run_class2d(tiny_config(tiny_set, tmp_path / "b", iter=2, pool=40,
                                    continue_from=first.files["optimiser"]))
    assert not any("--continue" in w for w in quiet.warnings)
    cfg = tiny_config(tiny_set, tmp_path / "c", iter=2, pool=40, perturb=0.0, psi_step=7.5,
                      continue_from=first.files["optimiser"])
    result = run_class2d(cfg)
    (note,) = [w for w in result.warnings if "--continue" in w]
    assert "--perturb 0.0 (the run's 0.5 is kept)" in note, note
    assert "--psi_step 7.5 (the run's 20.0 is kept)" in note, note


def test_gpu_flag_without_a_gpu_runs_on_the_cpu(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYONB_BACKEND", "cpu")
    result = run_class2d(tiny_config(tiny_set, tmp_path, iter=1, gpu="", cpu=False))
    assert not result.gpu and any("no GPU is usable" in w for w in result.warnings)


def test_async_twin_delivers_events_on_the_loop(tiny_set, tmp_path):
    import asyncio

    async def main():
        loop_thread = threading.get_ident()
        seen = []
        result = await run_class2d_async(
            tiny_config(tiny_set, tmp_path, iter=1, pool=50),
            progress=lambda ev: seen.append((ev["event"], threading.get_ident())))
        return result, seen, loop_thread

    result, seen, loop_thread = asyncio.run(main())
    assert result.iteration == 1
    assert {t for _, t in seen} == {loop_thread}
    assert seen[0][0] == "setup"


def test_cancelling_the_async_twin_stops_the_run(tiny_set, tmp_path):
    import asyncio

    async def main():
        started = asyncio.Event()
        task = asyncio.ensure_future(run_class2d_async(
            tiny_config(tiny_set, tmp_path, iter=5, pool=10),
            progress=lambda ev: ev["event"] == "pool" and started.set()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not list(tmp_path.glob("run_it005*"))  # stopped long before the end


def test_automatic_pool():
    cfg = tiny_config("p.star", Path("o"))
    assert auto_pool(cfg, 100_000, 64, 4, gpu=False) == 256
    assert auto_pool(cfg, 150, 32, 3, gpu=False) == 25  # every thread gets >= 2 pools
    assert auto_pool(cfg, 10**6, 128, 4, gpu=True) == 16384
    # on a GPU the threads of a rank take turns: pools are split per rank, not per thread
    assert auto_pool(cfg, 8000, 64, 4, gpu=True, ranks=1) == 4000
    assert auto_pool(cfg, 8000, 64, 8, gpu=True, ranks=2) == 2000
    assert auto_pool(cfg, 8000, 64, 4, gpu=False) == 256
    small = auto_pool(cfg, 10**6, 128, 4, gpu=True, free_bytes=4e9)
    assert 64 <= small < 4096  # bounded by the free device memory
    # images stored on the devices: one pool per rank, within the same bounds
    assert auto_pool(cfg, 8000, 64, 4, gpu=True, ranks=2, per_rank=1) == 4000
    assert auto_pool(cfg, 10**6, 128, 4, gpu=True, per_rank=1) == 16384
    assert auto_pool(cfg, 10**6, 128, 4, gpu=True, free_bytes=4e9, per_rank=1) == small


def test_one_pool_per_rank_means_one_per_device_of_each_rank():
    """Threads of a rank on one device take turns (one pool for them); a rank with a
    thread on each of two devices needs two pools to keep both busy."""
    from cryonb.parallel.runtime import _device_slots

    def info(rank, devices):
        return RankInfo(rank, "worker", "h", 1, threads=len(devices) or 1, devices=devices)

    assert _device_slots([info(0, [0, 0])]) == 1  # --gpu 0 --j 2
    assert _device_slots([info(0, [0, 1])]) == 2  # --gpu 0,1 --j 2
    assert _device_slots([info(1, [0]), info(2, [1, 1])]) == 2  # --gpu 0:1,1
    assert _device_slots([info(0, [])]) == 1  # no devices (the CPU)


def test_gpu_pools_grow_once_every_rank_stores_its_images():
    """An automatic GPU pool becomes one pool per rank from the E-step after one in which
    every working rank took all its particles' images from its devices; not before, not
    where a rank read some, not for the initial pass, and never with ``--pool`` given."""
    from cryonb.parallel import IterationStats, RankTimes
    from cryonb.parallel.runtime import _Run

    run = _Run.__new__(_Run)
    run.stats = RunStats()
    run.pool, run.pool_stored = 4000, 8000

    def iteration(it, *stored):
        run.stats.iterations.append(IterationStats(it, {"estep": 1.0}, {
            r: RankTimes(r, particles=4000, stored=s) for r, s in enumerate(stored, 1)}))

    assert run._phase_pool("estep") == 4000  # nothing measured yet
    iteration(1, 0, 0)  # read and stored
    assert run._phase_pool("estep") == 4000
    iteration(2, 4000, 3999)  # one rank read a particle
    assert run._phase_pool("estep") == 4000
    iteration(3, 4000, 4000)
    assert run._phase_pool("estep") == 8000
    assert run._phase_pool("init") == 4000
    run.pool_stored = run.pool  # --pool given, or the CPU
    assert run._phase_pool("estep") == 4000


def test_automatic_gpu_pool_holds_a_gib_of_images():
    """A GPU pool may hold 1 GiB of float32 images (late in a run a pool's cost is mostly
    fixed, RESULTS.md): 16,384 of 128 px, 4,096 of 256 px, never fewer than 4,096."""
    cfg = tiny_config("p.star", Path("o"))
    assert gpu_pool_max(128) == 16384
    assert gpu_pool_max(256) == gpu_pool_max(512) == 4096
    assert gpu_pool_max(64) == 65536
    assert auto_pool(cfg, 10**6, 128, 1, gpu=True) == 16384
    assert auto_pool(cfg, 20000, 64, 1, gpu=True, ranks=1) == 10000  # two pools per rank
    assert auto_pool(cfg, 10**6, 256, 1, gpu=True) == 4096
    for box in (32, 48, 64, 100, 128, 200, 256):
        assert auto_pool(cfg, 10**8, box, 1, gpu=True) * box * box * 4 <= max(
            2**30, 4096 * box * box * 4)
    # the free device memory still bounds it
    assert auto_pool(cfg, 10**6, 64, 1, gpu=True, free_bytes=4e9) < 16384


def test_stored_gpu_pools_are_not_bound_by_the_reading_buffers():
    """Once the images are stored on the device (``per_rank=1``) the 1 GiB bound of the
    reading's pinned buffers does not apply: 16,384 particles at any box, still within the
    free device memory; pools that read keep it."""
    cfg = tiny_config("p.star", Path("o"))
    assert gpu_pool_max(256, stored=True) == gpu_pool_max(512, stored=True) == 16384
    assert gpu_pool_max(128, stored=True) == 16384 and gpu_pool_max(256) == 4096
    assert gpu_pool_max(64, stored=True) == 65536
    assert auto_pool(cfg, 16000, 256, 1, gpu=True, ranks=1, per_rank=1) == 16000
    assert auto_pool(cfg, 10**6, 256, 1, gpu=True, per_rank=1) == 16384
    assert auto_pool(cfg, 10**6, 256, 1, gpu=True) == 4096
    from cryonb.em._estep import FINE_BUDGET

    # its half holds 8,000 (the images read in place: no copy of them counted)
    free = 2 * (FINE_BUDGET + 8000.5 * pool_memory(cfg, 256, stored=True))
    assert auto_pool(cfg, 10**6, 256, 1, gpu=True, per_rank=1, free_bytes=free) == 8000
    assert auto_pool(cfg, 10**6, 256, 1, gpu=True, free_bytes=free) == 4096


def test_pool_memory_counts_the_coarse_window():
    """With the pixel size known, the coarse pass's memory is counted over RELION's coarse
    window (set by --psi_step and the particle), not the whole box: at 128 px and psi 10 an
    80 GB card's half holds the 16,384-particle pool it could not with the box's count."""
    from dataclasses import replace

    from cryonb.em._estep import coarse_image_size, mask_diameter

    cfg = replace(tiny_config("p.star", Path("o")), K=50, psi_step=10.0, offset_range=5,
                  offset_step=2, particle_diameter=0.8 * 128 * 2.0)
    box_bound = pool_memory(cfg, 128)
    windowed = pool_memory(cfg, 128, pixel_size=2.0)
    size = coarse_image_size(10.0, mask_diameter(cfg.particle_diameter, 128, 2.0), 128, 2.0, 128)
    assert 30 <= size <= 50
    assert windowed < box_bound / 3
    # the window never exceeds the box: a psi step fine enough for the whole box
    assert pool_memory(replace(cfg, psi_step=0.5), 128, pixel_size=2.0) == pool_memory(
        replace(cfg, psi_step=0.5), 128)
    free = 75e9
    assert auto_pool(cfg, 10**6, 128, 1, gpu=True, free_bytes=free, pixel_size=2.0) == 16384
    assert auto_pool(cfg, 10**6, 128, 1, gpu=True, free_bytes=free) < 8000


def test_pool_memory_is_the_larger_of_its_two_phases():
    """The images' phase (masking, transforms) and the coarse pass's scores come one after
    the other: a 256 px pool counts the larger, not their sum, and images read in place from
    the device store count no copy. An 80 GB card's half then holds one pool of 16,000
    particles at K=50 and K=100 (psi 10), as measured fastest (RESULTS.md)."""
    from dataclasses import replace

    from cryonb.em._estep import estep_bytes_per_particle

    cfg = replace(tiny_config("p.star", Path("o")), psi_step=10.0, offset_range=5,
                  offset_step=2, particle_diameter=0.8 * 256 * 1.5)
    c = replace(cfg, K=50)
    assert pool_memory(c, 256, pixel_size=1.5) == 4 * 8 * 256 * 256
    assert pool_memory(c, 256, pixel_size=1.5, stored=True) == 4 * 7 * 256 * 256
    for K in (50, 100):
        c = replace(cfg, K=K)
        assert pool_memory(c, 256, pixel_size=1.5, stored=True) < 2.3e6
        assert auto_pool(c, 16000, 256, 1, gpu=True, free_bytes=79e9, ranks=1, per_rank=1,
                         pixel_size=1.5) == 16000
    # where the scores are larger they count, with the current size's pixels beside them
    assert estep_bytes_per_particle(21, 7200, 700, 64, False) == 4 * (
        3 * 21 * 7200 + 4 * 21 * 700 + 3 * 64 * 64)


@pytest.mark.gpu
def test_gpu_threads_match_the_cpu(tiny_set, reference, tmp_path):
    """Two threads on the GPU: the class2d CPU/GPU tolerance (same classes, correlation)."""
    from cryonb.io import read_mrc, read_particles

    result = run_class2d(tiny_config(tiny_set, tmp_path, j=2, pool=40, gpu="", cpu=False),
                         return_sums=True)
    assert result.gpu and result.ranks[0].uuids
    shared = len(set(result.ranks[0].devices)) == 1  # both threads on one GPU: advised
    assert shared == any("threads share GPU" in w for w in result.warnings), result.warnings
    cls = read_particles(result.files["data"]).particles["rlnClassNumber"].to_numpy() - 1
    assert np.mean(cls == reference["cls"]) >= 0.99
    got = read_mrc(result.classes).data
    for a, b in zip(got, reference["classes"]):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99
    # the run gave CuPy's cached device memory back (the next run on the device sees it free)
    import cupy

    assert cupy.get_default_memory_pool().total_bytes() < 64 << 20


def test_threads_sharing_a_gpu_are_advised_against():
    """``--j 3 --gpu 0,0,1``: rank 1's two threads on GPU 0 get one line of advice; a thread
    alone on its GPU, the leader and CPU ranks get none."""
    from cryonb.parallel.runtime import shared_gpu_advice

    lines = shared_gpu_advice([(0, []), (1, [0, 0, 1]), (2, [2, 3]), (3, None)])
    assert lines == ["rank 1: 2 threads share GPU 0, and threads on one GPU slow each other "
                     "(0.86-0.91x of one thread's throughput): use --j 1 for each GPU"]


def test_cores_are_those_the_process_may_run_on(monkeypatch):
    """A Slurm allocation or taskset leaves a process fewer cores than the machine has: the
    runtime's BLAS limit and the M-step's split-test threads count those."""
    import os

    from cryonb.backend import usable_cores
    from cryonb.parallel import hardware

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    assert usable_cores() == 2 and hardware.cpu_count() == 2
