"""I/O modes (cryonb.parallel.images): every source gives the table's own images."""

from __future__ import annotations

import contextlib
import queue

import numpy as np
import pytest

from cryonb.backend import fft_threads as backend_fft_threads
from cryonb.errors import ResourceError
from cryonb.io import read_particles
from cryonb.parallel import images
from cryonb.parallel.images import (
    PrereadSource,
    ScratchSource,
    TableSource,
    check_preread_memory,
    copy_to_scratch,
    image_bytes,
    remove_scratch,
)


@pytest.fixture(scope="module")
def table(tiny_set):
    return read_particles(tiny_set)


ROWS = np.array([149, 0, 51, 37, 120, 49, 50, 3])  # across the 3 stacks, out of order


def _into_buffer(source, rows, box):
    """``source.images(rows, out=buf)`` into a buffer holding other values first; the buffer
    itself comes back."""
    buf = np.full((len(rows), box, box), np.nan, np.float32)
    got = source.images(rows, out=buf)
    assert got is buf
    return got


def test_sources_agree(table):
    want = table.images(ROWS)
    np.testing.assert_array_equal(TableSource(table).images(ROWS), want)
    np.testing.assert_array_equal(_into_buffer(TableSource(table), ROWS, table.box), want)
    pre = PrereadSource(table)
    assert pre.data.shape == (table.n, table.box, table.box)
    np.testing.assert_array_equal(pre.images(ROWS), want)
    np.testing.assert_array_equal(_into_buffer(pre, ROWS, table.box), want)
    with pytest.raises(ValueError, match="the images need float32"):
        table.images(ROWS, out=np.empty((len(ROWS), table.box, table.box + 1), np.float32))


@pytest.mark.parametrize("fit", [0, 40, 150])
def test_scratch_copy_and_per_particle_fallback(table, tmp_path, fit):
    cap = image_bytes(fit, table.box) + 4096  # room for `fit` particles and the header
    copy = copy_to_scratch(table, tmp_path / "scratch", "t", keep_free_gb=0.0, capacity=cap)
    assert copy.n_copied == fit and copy.complete == (fit == table.n)
    src = ScratchSource(table, copy)
    np.testing.assert_array_equal(src.images(ROWS), table.images(ROWS))
    assert src.reset_counts() == int((ROWS >= fit).sum())
    np.testing.assert_array_equal(_into_buffer(src, ROWS, table.box), table.images(ROWS))
    assert src.reset_counts() == int((ROWS >= fit).sum())
    if not copy.complete:
        assert f"room for {fit} of 150 particles" in copy.describe()
    src.close()
    remove_scratch(copy)
    assert not (tmp_path / "scratch" / "cryonb_t").exists()


def test_scratch_keeps_free_space(table, tmp_path):
    # asking to keep more free space than the disc has leaves no room: nothing is copied
    copy = copy_to_scratch(table, tmp_path, "k", keep_free_gb=1e9)
    assert copy.n_copied == 0 and copy.room == 0


def test_preread_memory_check_names_the_numbers():
    with pytest.raises(ResourceError) as e:
        check_preread_memory(1000, 256, {"node7": 3}, {"node7": 500_000_000})
    msg = str(e.value)
    assert "node7" in msg and "786.4 MB" in msg and "262.1 MB" in msg and "500.0 MB" in msg
    assert "--scratch_dir" in msg
    assert check_preread_memory(10, 32, {"a": 2}, {"a": 10**9}) == image_bytes(10, 32)


def test_preread_source_refuses_when_memory_is_short(table, monkeypatch):
    monkeypatch.setattr(images, "available_memory", lambda: 1000)
    with pytest.raises(ResourceError, match="--preread_images needs"):
        PrereadSource(table)


@pytest.mark.parametrize("gpu", [False, pytest.param(True, marks=pytest.mark.gpu)],
                         ids=["cpu", "gpu"])
def test_gpu_worker_stages_pools_in_pinned_memory(table, gpu):
    """A GPU worker's reader puts pools in page-locked memory (fast, asynchronous uploads);
    a CPU worker's gets the source's array as it is. Same images either way."""
    from cryonb.backend import gpu_available, upload
    from cryonb.em import Class2DConfig
    from cryonb.parallel._worker import WorkerService

    if gpu and not gpu_available():
        pytest.skip("no usable GPU (CuPy)")
    w = WorkerService(rank=1, config=Class2DConfig(i="x", o="y"), setup={"N": table.box},
                      threads=1, devices=[0] if gpu else None, source=TableSource(table))
    try:
        got = w._images({"index": ROWS})
    finally:
        w.close()
    want = table.images(ROWS)
    np.testing.assert_array_equal(got, want)
    if not gpu:
        assert w._host_buffer(want.shape) is None
        np.testing.assert_array_equal(upload(got, np), want)
        return
    import cupy

    attrs = cupy.cuda.runtime.pointerGetAttributes(got.ctypes.data)
    assert attrs.type == getattr(cupy.cuda.runtime, "memoryTypeHost", 1)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        dev = upload(got, cupy)
        back = dev.get()
    np.testing.assert_array_equal(back, want)
    # past the budget: no pinned copy
    w.threads = 10**6
    assert w._host_buffer(want.shape) is None


def test_pinned_memory_refused_falls_back_to_ordinary_memory(table, monkeypatch):
    """Where the host refuses page-locked memory (a pool of 1 GiB of images on a small
    workstation), the reader says so once and goes on with ordinary memory."""
    from cryonb.em import Class2DConfig
    from cryonb.parallel import _worker
    from cryonb.parallel._worker import WorkerService

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise MemoryError("cudaErrorMemoryAllocation: out of memory")

    monkeypatch.setattr(_worker, "pinned_empty", refuse)
    w = WorkerService(rank=1, config=Class2DConfig(i="x", o="y"), setup={"N": table.box},
                      threads=1, devices=None, source=TableSource(table))
    try:
        w.devices = [0]  # as a GPU worker's reader (no GPU is touched: the allocation fails)
        with pytest.warns(ResourceWarning, match="page-locked"):
            assert w._host_buffer((4, table.box, table.box)) is None
        assert w._host_buffer((4, table.box, table.box)) is None
        assert len(calls) == 1  # not tried again
    finally:
        w.devices = None
        w.close()


def test_gpu_worker_prefetches_the_next_ready_pool():
    """In a GPU E-step a compute thread takes the next ready pool early and hands its images
    to its context's prefetch (the copy overlaps the current pool); stale pools, the stop
    signal, the initial pass, the CPU path and an empty queue start no copy."""
    from types import SimpleNamespace

    from cryonb.em import Class2DConfig
    from cryonb.parallel._worker import _STOP, WorkerService

    w = WorkerService(rank=1, config=Class2DConfig(i="x", o="y"), setup={"N": 8}, threads=1)
    w.close()  # its threads are gone: the queues are the test's
    copies: list = []
    w._ctx = [SimpleNamespace(prefetch=copies.append)]
    w._phase = ("estep", None, 3)
    assert w._prefetch_next(0, 7) is None  # the CPU path
    w.devices = [0]
    with contextlib.suppress(queue.Empty):
        while True:
            w._ready.get_nowait()
    assert w._prefetch_next(0, 7) is None  # nothing ready
    for item, copied in (((7, {"id": 1}, "pool 1", 0.0), ["pool 1"]),
                         ((6, {"id": 2}, "stale", 0.0), []),
                         ((7, _STOP, None, 0.0), [])):
        copies.clear()
        w._ready.put(item)
        assert w._prefetch_next(0, 7) is item
        assert copies == copied
    w._phase = ("init", None, 0)
    w._ready.put((7, {"id": 3}, "pool 3", 0.0))
    assert w._prefetch_next(0, 7) is None and w._ready.qsize() == 1


def test_worker_threads_run_host_ffts_on_their_share_of_the_cores(table, monkeypatch):
    """Each compute thread's pools run with scipy.fft's workers set to the rank's share of the
    cores (``fft_threads``); outside the pool the thread's default is back."""
    import scipy.fft

    from cryonb.em import Class2DConfig
    from cryonb.parallel._worker import WorkerService

    seen = []

    def process(self, t, task, images):
        seen.append((scipy.fft.get_workers(), images.shape))

    monkeypatch.setattr(WorkerService, "_process", process)
    w = WorkerService(rank=1, config=Class2DConfig(i="x", o="y"), setup={"N": table.box},
                      threads=2, source=TableSource(table), fft_threads=3)
    try:
        w.begin("init")
        got = w.exchange([{"id": 0, "index": ROWS}, {"id": 1, "index": ROWS[:3]}], 10.0)
        results = got["results"]
        while len(results) < 2:
            results += w.exchange([], 10.0)["results"]
    finally:
        w.close()
    assert sorted(seen, key=lambda s: s[1][0]) == [(3, (3, table.box, table.box)),
                                                   (3, (len(ROWS), table.box, table.box))]
    assert all("error" not in r for r in results)
    with backend_fft_threads(2):
        assert scipy.fft.get_workers() == 2
    assert scipy.fft.get_workers() == 1
