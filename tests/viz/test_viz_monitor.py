"""LoadMonitor (no GPU here; fake NVML for several) and the load dashboard."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from cryonb.viz import SAMPLE_COLUMNS, LoadDashboard, LoadMonitor, load_dashboard


def _no_monitor_threads() -> bool:
    return not any(t.name.startswith("cryonb-load") for t in threading.enumerate())


def test_samples_cpu_at_two_hertz_and_stops_cleanly():
    monitor = LoadMonitor()  # default rate; on a machine without GPU: CPU figures only
    assert monitor.devices == [] or monitor.gpu_error is None
    t0 = time.monotonic()
    with monitor:
        assert monitor.running
        monitor.report(rank=1, stage="E-step", particles_per_s=120.0, device=0)
        time.sleep(1.5)
        monitor.report(rank=1, particles_per_s=150.0, done=30)
    elapsed = time.monotonic() - t0
    assert not monitor.running and _no_monitor_threads()
    df = monitor.samples()
    assert list(df.columns[: len(SAMPLE_COLUMNS)]) == list(SAMPLE_COLUMNS)
    assert "done" in df.columns  # figures under new names become columns
    host = monitor.samples("host")
    assert len(host) / elapsed >= 2.0 - 1e-9 and len(host) >= 3
    assert host["cpu_percent"].notna().all() and (host["mem_total_mib"] > 0).all()
    me = df[(df["kind"] == "process") & (df["pid"] == os.getpid())]
    assert len(me) == len(host) and (me["rss_mib"] > 0).all()
    ranks = monitor.samples("rank")
    assert ranks["particles_per_s"].tolist() == [120.0, 150.0]
    latest = monitor.latest().set_index("name")
    assert latest.loc["rank 1", "stage"] == "E-step"  # reports merge: the stage stays
    assert latest.loc["rank 1", "particles_per_s"] == 150.0
    n = len(monitor.samples())
    time.sleep(0.6)
    assert len(monitor.samples()) == n  # nothing sampled after stop


def test_several_fake_gpus(fake_nvml):
    monitor = LoadMonitor(processes="self")
    assert [d["uuid"] for d in monitor.devices] == ["GPU-fake-0", "GPU-fake-1"]
    assert monitor.gpu_error is None
    monitor.sample()
    monitor.sample()
    gpu = monitor.samples("gpu")
    assert gpu["name"].tolist() == ["GPU 0", "GPU 1"] * 2
    assert gpu["gpu_util"].tolist() == [10.0, 20.0] * 2
    assert gpu["mem_used_mib"].tolist() == [1024.0, 2048.0] * 2
    me = monitor.samples("process").iloc[-1]
    assert me["uuid"] == "GPU-fake-1" and me["gpu_mem_mib"] == 100.0
    only = LoadMonitor(gpus=["GPU-fake-1"], processes=None)
    assert [d["index"] for d in only.devices] == [1]
    monitor.stop()
    only.stop()
    assert fake_nvml.shutdowns == fake_nvml.inits


def test_add_process_and_rows_since():
    monitor = LoadMonitor(processes=None)
    monitor.add_process(os.getpid(), rank=2)
    monitor.sample()
    rows, cursor = monitor.rows_since(0)
    assert rows["name"].tolist() == ["host", f"rank 2 (pid {os.getpid()})"]
    assert monitor.rows_since(cursor)[0].empty
    with pytest.raises(ValueError, match="interval"):
        LoadMonitor(interval=0)


def _wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_dashboard_updates_a_rendered_view(render):
    # "self": children left by other tests of the session would add rows
    monitor = LoadMonitor(gpus=False, processes="self")
    board = LoadDashboard(monitor)
    layout = board.view()
    assert len(layout) == 5  # CPU, RSS, particles/s now; CPU and particles/s over time
    render(layout)  # before any sample: the refresh below updates this bokeh model
    monitor.sample()
    monitor.report(rank=1, stage="E-step", particles_per_s=10.0)
    assert board.refresh() == 3 and board.refresh() == 0
    assert len(board.timeline.data) == 3
    ranks = list(layout)[2][()]
    assert ranks.Bars.I.dimension_values("stage").tolist() == ["E-step"]


def test_dashboard_thread_ends_with_the_monitor():
    monitor = LoadMonitor(interval=0.1, gpus=False)
    board = LoadDashboard(monitor, every=0.1)
    board.start(mode="thread")
    time.sleep(0.2)
    assert board.pumping  # waits for the monitor to start
    assert len(board.timeline.data) == 0
    monitor.start()
    monitor.report(rank=1, stage="E-step", particles_per_s=10.0)
    assert _wait_for(lambda: len(board.timeline.data) > 0)
    first = len(board.timeline.data)
    monitor.report(rank=1, stage="M-step", particles_per_s=12.0)
    assert _wait_for(lambda: len(board.timeline.data) > first)
    monitor.stop()
    assert _wait_for(lambda: not board.pumping)
    assert not board.errors, board.errors
    assert _no_monitor_threads(), [t.name for t in threading.enumerate()]
    assert len(board.timeline.data) == len(monitor.samples())
    assert board.now.data.set_index("name").loc["rank 1", "stage"] == "M-step"
    with pytest.raises(ValueError, match="mode"):
        board.start(mode="process")
    never = LoadMonitor(gpus=False)
    idle = LoadDashboard(never, every=0.05).start(mode="thread")
    never.stop()  # stopped without having started: the refresh thread ends too
    assert _wait_for(lambda: not idle.pumping)


def test_dashboard_with_gpus_and_asyncio(fake_nvml, render):
    import asyncio

    monitor = LoadMonitor(interval=0.1, processes="self")
    monitor.sample()
    layout = load_dashboard(monitor, live=False)
    assert len(layout) == 8
    render(layout)
    util = next(iter(layout))[()]
    assert np.array_equal(util.dimension_values(1), [10.0, 20.0])

    async def run():
        board = LoadDashboard(monitor, every=0.1).start()
        assert isinstance(board._pump, asyncio.Task)
        monitor.start()
        await asyncio.sleep(0.35)
        monitor.stop()
        await asyncio.wait_for(board._pump, 2)
        return board

    board = asyncio.run(run())
    assert len(board.timeline.data) == len(monitor.samples()) > 2
