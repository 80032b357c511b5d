"""Run, Stop and Continue through the buttons on a tiny simulated set (CPU path)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from widget_cases import tiny

from cryonb.em import Class2DConfig
from cryonb.io import read_mrc
from cryonb.widgets import Class2DPanel


def _wait_for(test, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)


def test_run_stop_continue_with_the_buttons(particles, tmp_path):
    panel = Class2DPanel(devices=0, views=True, **tiny(particles, tmp_path, iter=30))
    assert panel.continue_button.disabled and panel.stop_button.disabled
    seen = []
    real = panel._on_event

    def spy(ev):
        real(ev)
        s = panel.progress.state
        seen.append((s.completed, s.iteration, s.done))

    panel._on_event = spy
    panel.run_button.click()
    handle = panel.handle
    assert handle.mode == "thread" and panel.running
    assert panel.run_button.disabled and not panel.stop_button.disabled
    _wait_for(lambda: panel.progress.state.completed >= 2, what="two iterations")
    panel.stop_button.click()
    result = panel.wait(60)
    assert result.stopped and 2 <= result.iteration < 30
    assert panel.progress.state.status == "stopped"
    assert seen == sorted(seen) and seen[-1][0] == result.iteration  # progress only advances
    assert len({d for _, _, d in seen}) > 3
    assert panel.progress.iter_bar.value == result.iteration
    assert not panel.run_button.disabled and not panel.continue_button.disabled
    # the views followed the run
    assert panel.grid.data.iteration == result.iteration and panel.grid.data.k == 2
    assert list(panel.convergence.data["iteration"]) == list(range(1, result.iteration + 1))
    ranks = panel.monitor.samples(kind="rank")
    assert len(ranks) and (ranks["rank"] == 0).all() and ranks["particles_per_s"].max() > 0
    assert not panel.monitor.running

    stopped_at = result.iteration
    panel.form["iter"].value = stopped_at + 2
    panel.continue_button.click()
    cfg = panel.handle.config
    assert cfg.continue_from.endswith(f"run_it{stopped_at:03d}_optimiser.star")
    assert cfg.iter == stopped_at + 2 and panel.config == cfg
    assert "--continue" in panel.command.value
    result = panel.wait(60)
    assert not result.stopped and result.iteration == stopped_at + 2
    assert result.first_iteration == stopped_at
    assert panel.progress.state.status == "finished"
    assert read_mrc(result.classes).data.shape == (2, 24, 24)
    assert not panel.notice and "warning" not in panel.status.value
    # a finished run continues for "more" iterations; an algorithm option changed in the form
    # is not taken by the continued run, and the panel says so
    panel.more.value = 1
    panel.form["tau2_fudge"].value = 4.0
    panel.continue_button.click()
    assert panel.handle.config.tau2_fudge == cfg.tau2_fudge != 4.0
    assert panel.form["tau2_fudge"].value == cfg.tau2_fudge
    assert "--tau2_fudge 4.0" in panel.notice and "cryonb-notice" in panel.status.value
    assert panel.wait(60).iteration == stopped_at + 3
    panel.run_button.click()  # a new run: no notice
    assert not panel.notice and "cryonb-notice" not in panel.status.value
    panel.wait(60)


def test_run_on_the_event_loop(particles, tmp_path):
    panel = Class2DPanel(devices=0, **tiny(particles, tmp_path, iter=2))
    threads = set()
    real = panel._on_event

    def spy(ev):
        threads.add(threading.get_ident())
        real(ev)

    panel._on_event = spy

    async def main():
        panel.run_button.click()
        assert panel.handle.mode == "asyncio"
        with pytest.raises(RuntimeError, match=r"await handle\.task"):
            panel.wait(1)  # blocking the loop the run needs would hang the kernel
        ticks = 0
        while not panel.handle.done:  # the loop stays free while the run goes on
            await asyncio.sleep(0.01)
            ticks += 1
        await panel.handle.task
        return ticks

    ticks = asyncio.run(main())
    assert ticks > 10
    assert threads == {threading.get_ident()}  # every event was handled on the loop
    assert panel.result.iteration == 2 and panel.progress.state.status == "finished"


def test_errors_of_a_run_are_shown_not_raised(particles, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(particles.parent, folder)
    panel = Class2DPanel(devices=0, **tiny(folder / particles.name, tmp_path))
    (folder / "particles.mrcs").write_bytes(b"not an MRC file")
    panel.run_button.click()
    _wait_for(lambda: panel.handle.done, what="the failed run to end")
    assert panel.error is not None and panel.result is None
    text = panel.progress.text.value
    assert 'data-status="failed"' in text and "cryonb-error" in text
    assert "particles.mrcs" in text and "Traceback" not in text
    assert not panel.run_button.disabled


def test_button_errors_are_shown_in_the_panel(tmp_path):
    panel = Class2DPanel(devices=0, i="p.star", o=str(tmp_path / "run"))
    panel.continue_button.click()  # nothing to continue: the message, no exception
    assert "nothing to continue" in panel.status.value
    assert isinstance(panel.config, Class2DConfig)
