"""Per-device load dashboard: bars for now, a timeline, fed live from a LoadMonitor."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings

import holoviews as hv
import numpy as np
import pandas as pd

from .._asyncio import loop_for
from ._base import LiveView, holoviews, plural
from ._monitor import LoadMonitor

__all__ = ["LoadDashboard", "load_dashboard"]

_TIMELINE = ["elapsed", "kind", "name", "gpu_util", "cpu_percent", "particles_per_s"]
_NUMERIC = {"gpu_util", "mem_used_mib", "cpu_percent", "rss_mib", "particles_per_s"}
_BAR = {"frame_width": 220, "frame_height": 180, "framewise": True, "tools": ["hover"],
        "xrotation": 30, "show_grid": True, "xlabel": ""}
_LINE = {"frame_width": 260, "frame_height": 180, "framewise": True, "tools": ["hover"],
         "show_grid": True, "legend_position": "right"}


class LoadDashboard(LiveView):
    """Live views of a :class:`LoadMonitor`: bars of the latest figures and a timeline.

    Parameters
    ----------
    monitor : LoadMonitor
        Started or not (the views fill once it samples).
    window : float, default 300
        Seconds of history the timeline shows.
    every : float, default 1.0
        Seconds between refreshes of the views (the monitor may sample faster; each refresh
        takes all new samples). A refresh that takes long (every panel is re-rendered) makes
        the next one wait at least twice as long, so that the kernel stays responsive.
    length : int, default 100000
        Rows the timeline's buffer keeps.

    Attributes
    ----------
    now : holoviews.streams.Pipe
        The latest figures of every source (:meth:`LoadMonitor.latest`).
    timeline : holoviews.streams.Buffer
        Every sample's ``elapsed, kind, name, gpu_util, cpu_percent, particles_per_s``.

    CPU figures are shown with 100 = one core, the host's too (``"host (all)"``: psutil's
    % of all cores times the number of cores), so that host and processes compare.

    Notes
    -----
    :meth:`refresh` moves what the monitor collected since the last call into the streams.
    :meth:`start` calls it every ``every`` seconds: as an asyncio task when an
    event loop runs in this thread (in a notebook: the kernel's, so the kernel stays free),
    else in a daemon thread. It waits while the monitor has not started, and ends by itself,
    after a last refresh, once the monitor is stopped; :meth:`stop` ends it at once. A
    monitor started again needs :meth:`start` again.
    """

    def __init__(self, monitor: LoadMonitor, *, window: float = 300.0, every: float = 1.0,
                 length: int = 100_000):
        holoviews()
        if not every > 0:
            raise ValueError(f"every must be > 0 seconds, not {every!r}")
        self.monitor = monitor
        self.window = float(window)
        self.every = float(every)
        self.now = hv.streams.Pipe(data=_host_in_cores(monitor.latest()))
        self.timeline = hv.streams.Buffer(_timeline_rows(monitor.samples().iloc[:0]),
                                          length=length, index=False)
        self._cursor = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._pump: asyncio.Task | threading.Thread | None = None
        self._view: hv.Layout | None = None
        self.errors: list[str] = []  # what failed while refreshing (each warned once)

    # ------------------------------------------------------------------ feeding
    def refresh(self) -> int:
        """Push the monitor's new rows into :attr:`timeline` and its latest into :attr:`now`.

        Returns
        -------
        int
            Rows added.
        """
        with self._lock:
            rows, self._cursor = self.monitor.rows_since(self._cursor)
            if len(rows):
                self.timeline.send(_timeline_rows(rows))
                self.now.send(_host_in_cores(self.monitor.latest()))
        return len(rows)

    def start(self, mode: str = "auto") -> LoadDashboard:
        """Refresh every :attr:`every` seconds until the monitor, having run, stops.

        Parameters
        ----------
        mode : {"auto", "asyncio", "thread"}
            ``"auto"``: an asyncio task when an event loop runs in this thread (a notebook
            cell), else a thread.

        Returns
        -------
        LoadDashboard
        """
        if mode not in ("auto", "asyncio", "thread"):
            raise ValueError(f"mode must be 'auto', 'asyncio' or 'thread', not {mode!r}")
        if self.pumping:
            return self
        self._halt.clear()
        loop = loop_for(mode)
        if loop is not None:
            self._pump = loop.create_task(self._pump_async())
        else:
            self._pump = threading.Thread(target=self._pump_thread, daemon=True,
                                          name="cryonb-load-dashboard")
            self._pump.start()
        return self

    def stop(self) -> None:
        """Stop refreshing (after one last refresh)."""
        self._halt.set()
        pump = self._pump
        if isinstance(pump, threading.Thread) and pump is not threading.current_thread():
            pump.join(5.0)
        self._pump = None

    @property
    def pumping(self) -> bool:
        """Whether the views are being refreshed."""
        pump = self._pump
        if isinstance(pump, threading.Thread):
            return pump.is_alive()
        return pump is not None and not pump.done()

    def _done(self) -> bool:
        """Halted, or the monitor has run (or been stopped) and is not running now."""
        m = self.monitor
        ran = m.started_at is not None or m.stopped_at is not None
        return self._halt.is_set() or (ran and not m.running)

    def _safe_refresh(self) -> float:
        """Refresh, keeping the pump alive on errors; returns the seconds to wait."""
        t0 = time.monotonic()
        try:
            self.refresh()
        except Exception as exc:  # a failing view must not end the updates of the others
            msg = f"{type(exc).__name__}: {exc}"
            if msg not in self.errors:
                self.errors.append(msg)
                warnings.warn(f"LoadDashboard: a refresh failed ({msg})", RuntimeWarning,
                              stacklevel=1)
        return max(self.every, 2.0 * (time.monotonic() - t0))

    def _pump_thread(self) -> None:
        while not self._done():
            self._halt.wait(self._safe_refresh())
        self._safe_refresh()

    async def _pump_async(self) -> None:
        while not self._done():
            await asyncio.sleep(self._safe_refresh())
        self._safe_refresh()

    # ------------------------------------------------------------------ views
    def _gpu_util(self, data: pd.DataFrame) -> hv.Bars:
        gpu = _kind(data, "gpu", "gpu")
        return hv.Bars(gpu, ("gpu", "GPU"), [("gpu_util", "utilisation (%)"), "uuid"]).opts(
            title="GPU utilisation now", ylim=(0, 100), color="#2ca02c", **_BAR)

    def _gpu_memory(self, data: pd.DataFrame) -> hv.Bars:
        gpu = _kind(data, "gpu", "gpu_memory")
        gpu = gpu.assign(used=100 * gpu["mem_used_mib"] / gpu["mem_total_mib"])
        return hv.Bars(gpu, ("gpu_memory", "GPU"), [("used", "memory used (%)"),
                                                    "mem_used_mib", "mem_total_mib"]).opts(
            title="GPU memory now", ylim=(0, 100), color="#9467bd", **_BAR)

    def _cpu(self, data: pd.DataFrame) -> hv.Bars:
        rows = pd.concat([_host(data, "cpu_percent"), _kind(data, "process")])
        rows = rows.rename(columns={"name": "cpu"})
        return hv.Bars(rows, ("cpu", "process"), [("cpu_percent", "CPU (100 = one core)"),
                                                  "pid"]).opts(
            title="CPU now", color="#1f77b4", **_BAR)

    def _memory(self, data: pd.DataFrame) -> hv.Bars:
        host = _host(data, "mem_used_mib").assign(rss_mib=lambda d: d["mem_used_mib"])
        rows = pd.concat([host, _kind(data, "process")]).rename(columns={"name": "memory"})
        rows = rows.assign(gib=rows["rss_mib"] / 1024)
        return hv.Bars(rows, ("memory", "process"), [("gib", "memory (GiB)"), "pid"]).opts(
            title="Memory now (resident)", color="#ff7f0e", **_BAR)

    def _ranks(self, data: pd.DataFrame) -> hv.Overlay:
        ranks = _kind(data, "rank", "rank_name")
        ranks = ranks.assign(stage=ranks["stage"].fillna("").astype(str),
                             device=ranks["device"].astype(str).replace("nan", ""))
        title = "Particles/s now" if len(ranks) else "Particles/s (no rank reported)"
        key = ("rank_name", "rank")
        bars = hv.Bars(ranks, key, [("particles_per_s", "particles/s"), "stage", "device"])
        labels = hv.Labels(ranks.assign(y=ranks["particles_per_s"].fillna(0) / 2),
                           [key, "y"], "stage").opts(text_font_size="9pt", text_color="white")
        return (bars.opts(color="#d62728", **_BAR) * labels).opts(title=title)

    def _lines(self, column: str, label: str, kinds: tuple[str, ...], title: str):
        element = hv.Scatter if kinds == ("rank",) else hv.Curve  # reports come irregularly
        style = {"size": 6} if element is hv.Scatter else {}

        def callback(data: pd.DataFrame) -> hv.NdOverlay:
            df = data[data["kind"].isin(kinds) & np.isfinite(data[column])]
            if len(df):
                df = df[df["elapsed"] >= df["elapsed"].max() - self.window]
            lines = {name: element(part, ("elapsed", "time (s)"), (column, label)).opts(**style)
                     for name, part in df.groupby("name", sort=True)}
            if not lines:  # a key of its own: holoviews cannot update from an empty one
                lines = {"no data yet": element([], ("elapsed", "time (s)"), (column, label))}
            return hv.NdOverlay(lines, kdims=["source"]).opts(title=title, **_LINE)

        return callback

    def view(self) -> hv.Layout:
        """Bars of the latest figures (top row) and their timeline (bottom row).

        Returns
        -------
        holoviews.Layout
            With GPUs: utilisation and memory used of each GPU; always: CPU and resident
            memory of the host (all processes) and of each process, particles/s of each
            rank (labelled with its stage; hover gives its device). Timelines: GPU
            utilisation (with GPUs), CPU of host and processes, particles/s of each rank
            (points: ranks report irregularly). The same object on every call.
        """
        if self._view is not None:
            return self._view
        gpus = bool(self.monitor.devices)
        now = [self._cpu, self._memory, self._ranks]
        lines = [("cpu_percent", "CPU (100 = one core)", ("host", "process"), "CPU over time"),
                 ("particles_per_s", "particles/s", ("rank",), "Particles/s over time")]
        if gpus:
            now = [self._gpu_util, self._gpu_memory, *now]
            lines.insert(0, ("gpu_util", "utilisation (%)", ("gpu",), "GPU utilisation"))
        panels = [hv.DynamicMap(f, streams=[self.now]) for f in now]
        panels += [hv.DynamicMap(self._lines(*line), streams=[self.timeline]) for line in lines]
        n = len(self.monitor.devices)
        title = (f"Load of {plural(n, 'GPU')} and the host" if gpus else
                 f"Load of the host (no GPU figures: {self.monitor.gpu_error})")
        self._view = hv.Layout(panels, label=title).cols(len(now))
        return self._view


def _kind(data: pd.DataFrame, kind: str, key: str = "name") -> pd.DataFrame:
    """The rows of one kind sorted by name, the name column called ``key`` (each panel has its
    own, so that their categorical axes are not linked); one row of zeros named "(none yet)"
    when there is none (bokeh's categorical axis cannot start from an empty frame)."""
    rows = data[data["kind"] == kind].sort_values("name").reset_index(drop=True)
    if not len(rows):
        empty = {c: (0.0 if c in _NUMERIC else "") for c in data.columns}
        rows = pd.DataFrame([empty | {"kind": kind, "name": "(none yet)", "mem_total_mib": 1.0}])
    return rows.rename(columns={"name": key})


def _host(data: pd.DataFrame, column: str) -> pd.DataFrame:
    """The host's row named "host (all)", or nothing."""
    return data[(data["kind"] == "host") & data[column].notna()].assign(name="host (all)")


def _cores() -> int:
    return os.cpu_count() or 1


def _timeline_rows(rows: pd.DataFrame) -> pd.DataFrame:
    out = rows.reindex(columns=_TIMELINE).reset_index(drop=True)
    out = out.astype({c: float for c in _TIMELINE if c not in ("kind", "name")}).astype(
        {"kind": object, "name": object})
    return _host_in_cores(out)


def _host_in_cores(rows: pd.DataFrame) -> pd.DataFrame:
    """Host CPU in the processes' unit (100 = one core) instead of % of all cores."""
    host = (rows["kind"] == "host").to_numpy()
    if host.any():
        rows = rows.copy()
        rows.loc[host, "cpu_percent"] = rows.loc[host, "cpu_percent"] * _cores()
        rows.loc[host, "name"] = "host (all)"
    return rows


def load_dashboard(monitor: LoadMonitor, *, live: bool = True, window: float = 300.0,
                   every: float = 1.0) -> hv.Layout:
    """Per-device load: bars of the latest figures and a timeline, refreshed live.

    Parameters
    ----------
    monitor : LoadMonitor
        Started now or later; GPU panels appear when it watches GPUs.
    live : bool, default True
        Start refreshing (:meth:`LoadDashboard.start`): until the monitor, having run,
        stops. ``False``: only what was collected so far.
    window : float, default 300
        Seconds of history in the timeline.
    every : float, default 1.0
        Seconds between refreshes (see :class:`LoadDashboard`).

    Returns
    -------
    holoviews.Layout
        See :meth:`LoadDashboard.view`.
    """
    board = LoadDashboard(monitor, window=window, every=every)
    board.refresh()
    if live:
        board.start()
    return board.view()
