"""Progress of a run from the runtime's events: bars per iteration and per rank, times, stages.

:class:`RunProgress` is the state (plain Python, tested without widgets); :class:`ProgressView`
shows it. Both take the events of :mod:`cryonb.parallel.stats` (``setup``, ``stage``,
``pool``, ``heartbeat``, ``iteration``, ``done``).
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque

import ipywidgets as w

__all__ = ["ProgressView", "RunProgress", "format_seconds"]

_STAGE_NAMES = {"init": "initial pass", "estep": "E-step", "combine": "combining sums",
                "mstep": "M-step", "write": "writing files", "preread": "prereading images",
                "scratch": "copying to scratch", "stop": "stopping", "pick": "picking"}
_LEADER_STAGES = {"mstep", "write"}
_RENDER_EVERY = 0.2  # seconds between renders of pool events


def _when(ev: dict) -> float:
    """When an event happened (its ``time``, seconds since the epoch; now if it has none).

    Events may be handled in bursts (a busy event loop): rates use when they were sent.
    """
    return float(ev.get("time") or time.time())


def format_seconds(s: float | None) -> str:
    """``'1 h 02 min'``, ``'3 min 05 s'``, ``'12 s'``; ``'-'`` when unknown."""
    if s is None or s != s or s < 0:
        return "-"
    s = round(s)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class RunProgress:
    """The state of one run, updated by its events.

    Attributes
    ----------
    status : str
        ``idle``, ``starting``, ``running``, ``stopping``, ``stopped``, ``finished``,
        ``failed``.
    iterations : int
        ``--iter`` of the run.
    first_iteration : int
        The iteration it started from (0, or the one continued from).
    iteration : int
        The phase under way (0 = initial pass).
    completed : int
        The last complete iteration (``-1``: none yet).
    done, total : int
        Items (particles, micrographs) of the current phase done / to do.
    ranks : dict of int to dict
        Per rank: ``role``, ``host``, ``devices``, ``done`` (items this phase), ``stage``,
        ``rate`` (items/s this phase), ``busy`` (threads busy at the last heartbeat).
    wall : list of float
        Seconds of each complete E-step phase (for the estimate).
    message : str
        What the run said last (warnings, the error).
    """

    def __init__(self, unit: str = "particles"):
        self.unit = unit
        self.lock = threading.RLock()
        self.reset()
        self.status = "idle"

    def reset(self) -> None:
        """Forget the previous run."""
        with self.lock:
            self.status = "starting"
            self.t0 = time.time()
            self.t_end: float | None = None
            self.iterations = 0
            self.first_iteration = 0
            self.iteration = 0
            self.completed = -1
            self.done = 0
            self.total = 0
            self.phase_t0 = self.t0
            self.stage = ""
            self.ranks: dict[int, dict] = {}
            self.wall: list[float] = []
            self.message = ""
            self.warnings: list[str] = []
            self.events = 0
            self._recent: deque = deque(maxlen=64)  # (time, done) of the phase

    # ------------------------------------------------------------------ events
    def handle(self, ev: dict) -> None:
        """Take one progress event."""
        kind = ev.get("event")
        with self.lock:
            self.events += 1
            getattr(self, f"_on_{kind}", lambda _ev: None)(ev)

    def _on_setup(self, ev: dict) -> None:
        self.status = "running"
        self.iterations = int(ev.get("iterations", 0))
        self.first_iteration = int(ev.get("first_iteration", 0))
        self.completed = self.first_iteration if self.first_iteration > 0 else -1
        self.total = int(ev.get("n_particles", 0))
        self.warnings = list(ev.get("warnings", []))
        self.ranks = {int(r["rank"]): {"role": r.get("role", "worker"), "host": r.get("host", ""),
                                       "devices": list(r.get("devices", [])),
                                       "uuids": list(r.get("uuids", [])),
                                       "pid": r.get("pid"), "done": 0, "stage": "set-up",
                                       "rate": 0.0, "busy": 0}
                      for r in ev.get("ranks", [])}

    def _workers(self) -> list[dict]:
        return [r for r in self.ranks.values() if r["role"] != "leader"]

    def _leader(self) -> dict | None:
        return next((r for k, r in self.ranks.items() if k == 0), None)

    def _on_stage(self, ev: dict) -> None:
        stage, state = ev.get("stage", ""), ev.get("state")
        name = _STAGE_NAMES.get(stage, stage)
        if state != "start":
            return
        if stage == "stop":
            self.status = "stopping"
            for r in self.ranks.values():
                r["stage"] = "stopping"
            return
        self.stage = name
        if stage in ("init", "estep", "pick"):
            self.iteration = int(ev.get("iteration", self.iteration))
            self.done = 0
            self.phase_t0 = _when(ev)
            self._recent.clear()
            for r in self.ranks.values():
                r["done"], r["rate"] = 0, 0.0
        for k, r in self.ranks.items():
            if stage in _LEADER_STAGES:
                r["stage"] = name if k == 0 else "waiting"
            elif r["role"] == "leader":
                r["stage"] = "handing out pools" if stage in ("init", "estep") else name
            else:
                r["stage"] = name

    def _on_pool(self, ev: dict) -> None:
        self.done = int(ev.get("done", self.done + ev.get("n", 0)))
        self.total = int(ev.get("total", self.total))
        now = _when(ev)
        self._recent.append((now, self.done))
        r = self.ranks.setdefault(int(ev["rank"]), {"role": "worker", "host": "", "devices": [],
                                                    "uuids": [], "pid": None, "done": 0,
                                                    "stage": "", "rate": 0.0, "busy": 0})
        r["done"] += int(ev.get("n", 0))
        dt = max(1e-6, now - self.phase_t0)
        r["rate"] = r["done"] / dt
        if "picks" in ev:  # autopicking: particles found, besides micrographs done
            r["picks"] = r.get("picks", 0) + int(ev["picks"])
            r["picks_rate"] = r["picks"] / dt

    def _on_heartbeat(self, ev: dict) -> None:
        r = self.ranks.get(int(ev["rank"]))
        if r is not None:
            r["busy"] = len(ev.get("busy", []))
            r["memory"] = ev.get("memory", {})

    def _on_iteration(self, ev: dict) -> None:
        it = int(ev["iteration"])
        self.completed = it
        wall = (ev.get("stats") or {}).get("wall_s")
        if it > 0 and wall:
            self.wall.append(float(wall))

    def _on_done(self, ev: dict) -> None:
        self.completed = int(ev.get("iteration", self.completed))
        self.status = "stopped" if ev.get("stopped") else "finished"
        self.t_end = _when(ev)
        for r in self.ranks.values():
            r["stage"] = self.status

    def fail(self, message: str) -> None:
        """The run ended with an error."""
        with self.lock:
            self.status = "failed"
            self.message = message
            self.t_end = time.time()
            for r in self.ranks.values():
                r["stage"] = "failed"

    # ------------------------------------------------------------------ figures
    @property
    def elapsed(self) -> float:
        """Seconds since the run started (until it ended)."""
        return (self.t_end or time.time()) - self.t0

    @property
    def rate(self) -> float:
        """Items per second in the current phase (over its recent pools)."""
        if len(self._recent) >= 2:
            (t0, d0), (t1, d1) = self._recent[0], self._recent[-1]
            if t1 > t0:
                return (d1 - d0) / (t1 - t0)
        dt = time.time() - self.phase_t0
        return self.done / dt if dt > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Estimated seconds to the end of the run (``None`` when unknown or not running)."""
        if self.status not in ("running", "stopping") or not self.total:
            return None
        frac = self.done / self.total
        if self.wall:
            phase = sum(self.wall[-3:]) / len(self.wall[-3:])
        elif frac > 0:
            phase = (time.time() - self.phase_t0) / frac
        else:
            return None
        left = max(0, self.iterations - max(self.iteration, 1))
        return phase * (1.0 - frac) + phase * left

    def summary(self) -> str:
        """One line: status, iteration, items, elapsed and remaining time."""
        with self.lock:
            parts = [self.status]
            if self.iterations:
                parts.append(f"iteration {max(self.completed, 0)}/{self.iterations} done")
            if self.total and self.status in ("running", "stopping"):
                phase = "initial pass" if self.iteration == 0 else f"iteration {self.iteration}"
                parts.append(f"{phase}: {self.done}/{self.total} {self.unit} "
                             f"({self.rate:.0f}/s)")
            parts.append(f"elapsed {format_seconds(self.elapsed)}")
            if self.eta is not None:
                parts.append(f"about {format_seconds(self.eta)} left")
            return " · ".join(parts)


class ProgressView:
    """Widgets showing a :class:`RunProgress`: iterations, the current phase, every rank.

    Parameters
    ----------
    unit : str
        What the phases count (``particles``, ``micrographs``).

    Attributes
    ----------
    state : RunProgress
    widget : ipywidgets.VBox
        CSS class ``cryonb-progress``. Inside: ``cryonb-progress-text`` (an HTML line with
        ``data-status``, ``data-iteration``, ``data-completed``, ``data-done`` and
        ``data-total`` attributes, for tests), ``cryonb-iter-bar``, ``cryonb-phase-bar`` and
        one ``cryonb-rank-bar`` per rank.
    """

    def __init__(self, unit: str = "particles"):
        self.state = RunProgress(unit)
        self.text = w.HTML()
        self.text.add_class("cryonb-progress-text")
        bar = {"layout": w.Layout(width="420px"), "style": {"description_width": "90px"}}
        self.iter_bar = w.IntProgress(value=0, min=0, max=1, description="iterations", **bar)
        self.iter_bar.add_class("cryonb-iter-bar")
        self.iter_label = w.Label()
        self.phase_bar = w.IntProgress(value=0, min=0, max=1, description=unit, **bar)
        self.phase_bar.add_class("cryonb-phase-bar")
        self.phase_label = w.Label()
        self.rank_box = w.VBox()
        self._rank_rows: dict[int, tuple[w.IntProgress, w.Label]] = {}
        self.widget = w.VBox([self.text, w.HBox([self.iter_bar, self.iter_label]),
                              w.HBox([self.phase_bar, self.phase_label]), self.rank_box])
        self.widget.add_class("cryonb-progress")
        self._last = 0.0
        self.render()

    def start(self) -> None:
        """A run starts."""
        self.state.reset()
        self.render()

    def handle(self, ev: dict) -> None:
        """Take one event; re-render (pool and heartbeat events at most 5 times a second)."""
        self.state.handle(ev)
        if ev.get("event") == "setup":
            self._build_ranks()
        frequent = ev.get("event") in ("pool", "heartbeat")
        if not frequent or time.monotonic() - self._last >= _RENDER_EVERY:
            self.render()

    def fail(self, message: str) -> None:
        """The run ended with an error (shown in red)."""
        self.state.fail(message)
        self.render()

    def _build_ranks(self) -> None:
        rows, self._rank_rows = [], {}
        for rank, r in sorted(self.state.ranks.items()):
            devs = ", ".join(f"GPU {d}" for d in r["devices"]) or (
                "-" if r["role"] == "leader" else "CPU")
            label = w.Label(layout=w.Layout(width="auto"))
            bar = w.IntProgress(value=0, min=0, max=1, description=f"rank {rank}",
                                layout=w.Layout(width="420px",
                                                visibility="hidden" if r["role"] == "leader"
                                                else "visible"),
                                style={"description_width": "90px"},
                                tooltip=f"{r['role']} on {r['host']} ({devs})")
            bar.add_class("cryonb-rank-bar")
            self._rank_rows[rank] = (bar, label)
            rows.append(w.HBox([bar, label]))
        self.rank_box.children = rows

    def render(self) -> None:
        """Show the state now."""
        s = self.state
        with s.lock:
            self._last = time.monotonic()
            color = {"failed": "#b00020", "stopped": "#b35900", "finished": "#1b7f3b"}.get(
                s.status, "#333")
            attrs = (f'data-status="{s.status}" data-iteration="{s.iteration}" '
                     f'data-completed="{s.completed}" data-done="{s.done}" '
                     f'data-total="{s.total}"')
            body = f'<span {attrs} style="color:{color};font-weight:bold">' \
                   f"{html.escape(s.summary())}</span>"
            if s.message:
                body += (f'<pre class="cryonb-error" style="color:#b00020;white-space:pre-wrap;'
                         f'margin:2px 0">{html.escape(s.message)}</pre>')
            for warning in s.warnings:
                body += f'<div style="color:#b35900">warning: {html.escape(warning)}</div>'
            self.text.value = body
            self.iter_bar.max = max(1, s.iterations)
            self.iter_bar.value = min(max(0, s.completed), self.iter_bar.max)
            self.iter_label.value = (f"{max(s.completed, 0)} of {s.iterations} iterations"
                                     if s.iterations else "")
            self.phase_bar.max = max(1, s.total)
            self.phase_bar.value = min(s.done, self.phase_bar.max)
            phase = "initial pass" if s.iteration == 0 else f"iteration {s.iteration}"
            self.phase_label.value = (f"{phase}: {s.done} of {s.total} {s.unit}"
                                      f"{f' · {s.stage}' if s.stage else ''}" if s.total else "")
            for rank, (bar, label) in self._rank_rows.items():
                r = s.ranks.get(rank, {})
                bar.max = max(1, s.total)
                bar.value = min(r.get("done", 0), bar.max)
                if r.get("role") == "leader":
                    label.value = f"rank {rank} (leader): {r.get('stage', '')}"
                else:
                    label.value = (f"{r.get('stage', '')} · {r.get('done', 0)} {s.unit} "
                                   f"· {r.get('rate', 0.0):.0f}/s · {r.get('busy', 0)} busy "
                                   "thread(s)")
