"""Progress from the runtime's events: bars, per-rank stages, rates and the estimate."""

from __future__ import annotations

import time

from cryonb.widgets import ProgressView, RunProgress

T = time.time()  # event times (s since the epoch)


def _setup(n=100, iterations=4, ranks=3, first=0):
    roles = ["leader"] + ["worker"] * (ranks - 1) if ranks > 1 else ["leader+worker"]
    return {"event": "setup", "time": T, "n_particles": n, "iterations": iterations,
            "first_iteration": first, "warnings": ["w1"],
            "ranks": [{"rank": r, "role": role, "host": "h", "pid": 1, "devices": [r]}
                      for r, role in enumerate(roles)]}


def _stage(stage, it, t, state="start"):
    return {"event": "stage", "stage": stage, "iteration": it, "state": state, "time": t}


def _pool(it, rank, n, done, t, total=100):
    return {"event": "pool", "iteration": it, "rank": rank, "thread": 0, "n": n, "done": done,
            "total": total, "time": t}


def test_phases_ranks_and_rates():
    p = RunProgress()
    p.reset()
    p.t0 = T  # the run started when the events say
    for ev in [_setup(), _stage("init", 0, T + 1), _pool(0, 1, 30, 30, T + 2),
               _pool(0, 2, 20, 50, T + 3)]:
        p.handle(ev)
    assert (p.status, p.iteration, p.completed, p.done, p.total) == ("running", 0, -1, 50, 100)
    assert p.ranks[1]["done"] == 30 and p.ranks[2]["done"] == 20
    assert p.ranks[1]["rate"] == 30.0  # by the events' own times, not when handled
    assert p.ranks[2]["rate"] == 10.0
    assert p.ranks[0]["stage"] == "handing out pools" and p.ranks[1]["stage"] == "initial pass"
    assert p.rate == 20.0
    p.handle(_stage("mstep", 0, T + 4))
    assert p.ranks[0]["stage"] == "M-step" and p.ranks[1]["stage"] == "waiting"
    p.handle({"event": "iteration", "iteration": 0, "stats": {"wall_s": 3.0}, "time": T + 4})
    p.handle(_stage("estep", 1, T + 5))
    assert p.completed == 0 and p.done == 0 and p.ranks[1]["done"] == 0
    p.handle(_pool(1, 1, 50, 50, T + 6))
    p.handle({"event": "iteration", "iteration": 1, "stats": {"wall_s": 2.0}, "time": T + 7})
    p.handle(_stage("estep", 2, T + 7))
    p.handle(_pool(2, 2, 50, 50, T + 8))
    assert p.wall == [2.0]
    assert abs(p.eta - (2.0 * 0.5 + 2.0 * 2)) < 1e-9  # half of it 2, then its 3 and 4
    p.handle({"event": "heartbeat", "rank": 2, "busy": [(0, 10, 1.0)], "memory": {}})
    assert p.ranks[2]["busy"] == 1
    p.handle(_stage("stop", 2, T + 9))
    assert p.status == "stopping" and p.ranks[1]["stage"] == "stopping"
    p.handle({"event": "done", "iteration": 1, "stopped": True, "time": T + 10})
    assert p.status == "stopped" and p.completed == 1 and p.eta is None
    assert abs(p.elapsed - 10.0) < 1.0
    assert p.summary() == "stopped · iteration 1/4 done · elapsed 10 s"


def test_continued_run_starts_from_its_iteration():
    p = RunProgress()
    p.handle(_setup(first=5, iterations=8))
    assert p.completed == 5 and "iteration 5/8 done" in p.summary()


def test_view_shows_bars_and_data_attributes():
    v = ProgressView("particles")
    v.start()
    v.handle(_setup())
    v.handle(_stage("estep", 1, T + 1))
    v.handle(_pool(1, 1, 40, 40, T + 2))
    v.render()
    assert len(v.rank_box.children) == 3
    bar, label = v._rank_rows[1]
    assert bar.value == 40 and bar.max == 100 and "E-step · 40 particles" in label.value
    assert v._rank_rows[0][0].layout.visibility == "hidden"  # the leader computes nothing
    assert v.phase_bar.value == 40 and v.iter_bar.max == 4
    assert 'data-status="running"' in v.text.value and 'data-done="40"' in v.text.value
    assert "warning: w1" in v.text.value
    v.fail("RankError: rank 2 died")
    assert 'data-status="failed"' in v.text.value and "rank 2 died" in v.text.value
    assert "cryonb-error" in v.text.value
