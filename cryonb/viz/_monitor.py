"""Load of every device and process, sampled in a background thread (no plotting here).

GPU figures come from NVML (:mod:`pynvml`, package ``nvidia-ml-py``), host and process
figures from :mod:`psutil`; the parallel runtime adds per-rank figures with
:meth:`LoadMonitor.report`. Without a GPU (NVML library missing, no driver, no device) the
monitor records the CPU figures only.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import psutil

__all__ = ["SAMPLE_COLUMNS", "LoadMonitor"]

_MIB = 2.0**20

#: Columns of :meth:`LoadMonitor.samples`, in order (figures passed to
#: :meth:`LoadMonitor.report` under other names are added after them).
SAMPLE_COLUMNS = (
    "time",            # seconds since the epoch
    "elapsed",         # seconds since the monitor started
    "kind",            # "gpu", "host", "process" or "rank"
    "name",            # "GPU 0", "host", "pid 1234", "rank 2"
    "rank",            # rank of a process or a report (NaN when unknown)
    "stage",           # what a rank is doing (reports only)
    "device",          # NVML index of a GPU; the device a rank reports (int, or its UUID)
    "uuid",            # GPU UUID (kind "gpu", and processes on a GPU)
    "gpu_util",        # % of time a kernel ran on the GPU (kind "gpu")
    "mem_used_mib",    # GPU memory (kind "gpu") or host memory (kind "host") in use
    "mem_total_mib",   # ... and its total
    "cpu_percent",     # host: % of all cores; process or rank: % of one core (can pass 100)
    "rss_mib",         # resident memory of a process or rank
    "gpu_mem_mib",     # GPU memory held by a process (NVML's per-process figure)
    "pid",             # process id (kind "process")
    "particles_per_s", # throughput a rank reports
)
_REPORTED = {"stage", "device", "uuid", "gpu_util", "mem_used_mib", "mem_total_mib",
             "cpu_percent", "rss_mib", "gpu_mem_mib", "pid", "particles_per_s"}


class _Nvml:
    """NVML handles of the watched GPUs; every failure leaves it without devices."""

    def __init__(self, which: bool | Iterable[int | str]):
        self.which = which
        self.devices: list[dict[str, Any]] = []  # index, uuid, name, mem_total_mib
        self.error: str | None = None
        self._nvml = None
        self._handles: list[Any] = []

    def open(self) -> None:
        if self._nvml is not None or self.which is False:
            if self.which is False:
                self.error = "GPU monitoring switched off"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            self.error = "nvidia-ml-py (module pynvml) is not installed"
            return
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            self.error = f"NVML: {exc}"
            return
        self._nvml = pynvml
        wanted = None if self.which is True else {str(w) for w in self.which}  # type: ignore[union-attr]
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(pynvml.nvmlDeviceGetUUID(h))
                if wanted is not None and str(i) not in wanted and uuid not in wanted:
                    continue
                self._handles.append(h)
                self.devices.append({
                    "index": i, "uuid": uuid, "name": _text(pynvml.nvmlDeviceGetName(h)),
                    "mem_total_mib": pynvml.nvmlDeviceGetMemoryInfo(h).total / _MIB,
                })
        except pynvml.NVMLError as exc:
            self.error = f"NVML: {exc}"
            self.close()
            return
        if not self.devices:
            self.error = "no GPU visible to NVML"

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already shut down, driver gone: nothing to release
                pass
        self._nvml = None
        self._handles = []
        self.devices = []

    def sample(self) -> tuple[list[dict[str, Any]], dict[int, tuple[int, str, float]]]:
        """GPU rows, and ``{pid: (device index, uuid, MiB)}`` of the processes on them."""
        rows: list[dict[str, Any]] = []
        procs: dict[int, tuple[int, str, float]] = {}
        nv = self._nvml
        if nv is None:
            return rows, procs
        for dev, h in zip(self.devices, self._handles):
            row = {"kind": "gpu", "name": f"GPU {dev['index']}", "device": dev["index"],
                   "uuid": dev["uuid"], "mem_total_mib": dev["mem_total_mib"]}
            try:
                row["gpu_util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                row["mem_used_mib"], row["mem_total_mib"] = mem.used / _MIB, mem.total / _MIB
            except nv.NVMLError:  # a device that stops answering keeps a row of NaN
                pass
            rows.append(row)
            try:
                running = nv.nvmlDeviceGetComputeRunningProcesses(h)
            except nv.NVMLError:
                running = []
            for p in running:
                used = getattr(p, "usedGpuMemory", None)
                mib = used / _MIB if isinstance(used, int) else math.nan
                old = procs.get(p.pid)
                procs[p.pid] = (old[0], old[1], old[2] + mib) if old else (
                    dev["index"], dev["uuid"], mib)
        return rows, procs


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LoadMonitor:
    """Sample every GPU, the host and the job's processes at a fixed rate, in a thread.

    Parameters
    ----------
    interval : float, default 0.25
        Seconds between samples (4 per second; must be > 0). A sample of 8 GPUs and a
        dozen processes takes a few milliseconds.
    gpus : bool or iterable of int or str, default True
        Watch every GPU NVML sees, none (``False``), or those with these NVML indices or
        UUIDs.
    processes : {"children", "self"}, iterable of int, or None, default "children"
        Processes to sample: this process and all its descendants, found anew at every
        sample (engines started from the notebook are children of its kernel); this
        process only; these pids; or none. :meth:`add_process` adds more.
    max_rows : int, default 500000
        Rows kept; the oldest are dropped first.

    Attributes
    ----------
    devices : list of dict
        The GPUs watched: ``index`` (NVML's, which ignores ``CUDA_VISIBLE_DEVICES``),
        ``uuid``, ``name``, ``mem_total_mib``. Empty without a GPU.
    gpu_error : str or None
        Why there are no GPU figures (e.g. ``"NVML: NVML Shared Library Not Found"``).
    started_at, stopped_at : float or None
        When :meth:`start` and :meth:`stop` were last called (seconds since the epoch);
        ``None`` before.
    errors : list of str
        What failed in the sampling thread (each also warned once).

    Notes
    -----
    Works without a GPU (CPU figures only). The sampling thread is a daemon; :meth:`stop`
    ends it and releases NVML. Use as a context manager to stop it on exit. Every method is
    thread-safe; :meth:`report` may be called from any thread, e.g. a callback receiving
    the engines' progress.

    Examples
    --------
    >>> with LoadMonitor() as monitor:               # doctest: +SKIP
    ...     monitor.report(rank=1, stage="E-step", particles_per_s=850.0, device=0)
    ...     time.sleep(2)
    >>> monitor.samples()                            # doctest: +SKIP
    """

    def __init__(
        self,
        interval: float = 0.25,
        *,
        gpus: bool | Iterable[int | str] = True,
        processes: str | Iterable[int] | None = "children",
        max_rows: int = 500_000,
    ):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
        if isinstance(processes, str) and processes not in ("children", "self"):
            raise ValueError(f"processes must be 'children', 'self', pids or None, not "
                             f"{processes!r}")
        self.interval = float(interval)
        self._which_processes = processes if processes is None or isinstance(processes, str) \
            else [int(p) for p in processes]
        self._nvml = _Nvml(gpus if isinstance(gpus, bool) else list(gpus))
        self._nvml.open()
        self._lock = threading.Lock()
        self._rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_rows)
        self._count = 0  # rows ever stored (the index of the next one)
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._added: dict[int, int | None] = {}  # pid -> rank, from add_process
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.time()
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.errors: list[str] = []  # what went wrong in the sampling thread

    # ------------------------------------------------------------------ control
    @property
    def devices(self) -> list[dict[str, Any]]:
        return [dict(d) for d in self._nvml.devices]

    @property
    def gpu_error(self) -> str | None:
        return self._nvml.error

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LoadMonitor:
        """Start sampling (no-op when running); returns the monitor."""
        if self.running:
            return self
        self._nvml.open()
        self._stop.clear()
        if self._count == 0:
            self._t0 = time.time()
        psutil.cpu_percent(None)  # the first call only starts psutil's interval
        self._thread = threading.Thread(target=self._run, name="cryonb-load-monitor",
                                        daemon=True)
        self._thread.start()
        # only now: a dashboard reads "started and not running" as "stopped"
        self.started_at, self.stopped_at = time.time(), None
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling, wait for the thread (at most ``timeout`` s) and release NVML."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None
        self._nvml.close()
        self.stopped_at = time.time()

    def __enter__(self) -> LoadMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        gpus = f"{len(self._nvml.devices)} GPU(s)" if self._nvml.devices else \
            f"no GPU ({self.gpu_error})"
        state = "running" if self.running else "stopped"
        return f"<LoadMonitor {state}, every {self.interval:g} s, {gpus}, {self._count} rows>"

    # ------------------------------------------------------------------ input
    def add_process(self, pid: int, rank: int | None = None) -> None:
        """Also sample process ``pid`` (e.g. an engine), labelled with its ``rank``."""
        with self._lock:
            self._added[int(pid)] = None if rank is None else int(rank)

    def report(self, rank: int, stage: str | None = None, particles_per_s: float | None = None,
               device: int | str | None = None, **figures: Any) -> dict[str, Any]:
        """Record figures of one rank, as the runtime learns them.

        Parameters
        ----------
        rank : int
            The rank reporting.
        stage : str, optional
            What it does now ("E-step", "reading", "waiting", ...).
        particles_per_s : float, optional
            Its throughput.
        device : int or str, optional
            The GPU it runs on: index, or UUID (unambiguous across hosts and
            ``CUDA_VISIBLE_DEVICES``).
        **figures
            Any other figures (``cpu_percent``, ``rss_mib``, ``gpu_util``, ... or new
            names, which become new columns).

        Returns
        -------
        dict
            The row stored.
        """
        row: dict[str, Any] = {"kind": "rank", "name": f"rank {int(rank)}", "rank": int(rank)}
        given = {"stage": stage, "particles_per_s": particles_per_s, "device": device, **figures}
        row.update({k: v for k, v in given.items() if v is not None})
        self._store([row])
        return row

    # ------------------------------------------------------------------ output
    def samples(self, kind: str | None = None) -> pd.DataFrame:
        """Everything collected, one row per source and sample.

        Parameters
        ----------
        kind : {"gpu", "host", "process", "rank"}, optional
            Only rows of this kind.

        Returns
        -------
        pandas.DataFrame
            Columns :data:`SAMPLE_COLUMNS` (then any other reported figures); NaN where a
            figure does not apply.
        """
        with self._lock:
            rows = list(self._rows)
        df = _frame(rows)
        return df if kind is None else df[df["kind"] == kind].reset_index(drop=True)

    def rows_since(self, cursor: int) -> tuple[pd.DataFrame, int]:
        """The rows stored since ``cursor`` (0 at first), and the cursor for the next call.

        For views that poll the monitor; rows dropped by ``max_rows`` are skipped.
        """
        with self._lock:
            first = self._count - len(self._rows)
            new = list(itertools.islice(self._rows, max(0, cursor - first), None))
            count = self._count
        return _frame(new), count

    def latest(self) -> pd.DataFrame:
        """The last figures of every source (for a rank, its reports merged, newest first)."""
        with self._lock:
            rows = [dict(r) for r in self._latest.values()]
        return _frame(rows)

    # ------------------------------------------------------------------ sampling
    def _store(self, rows: list[dict[str, Any]]) -> None:
        now = time.time()
        with self._lock:
            for row in rows:
                row.setdefault("time", now)
                row["elapsed"] = row["time"] - self._t0
                self._rows.append(row)
                key = (row["kind"], row["name"])
                if row["kind"] == "rank":
                    self._latest[key] = {**self._latest.get(key, {}), **row}
                else:
                    self._latest[key] = row
            self._count += len(rows)

    def _watched(self) -> list[psutil.Process]:
        which = self._which_processes
        pids = set() if which is None else {os.getpid()} if isinstance(which, str) else set(which)
        if which == "children":
            me = psutil.Process()
            try:
                pids.update(p.pid for p in me.children(recursive=True))
            except psutil.Error:
                pass
        with self._lock:
            pids.update(self._added)
        out = []
        for pid in sorted(pids):
            proc = self._procs.get(pid)
            if proc is None:
                try:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # starts its interval: 0 the first time
                except psutil.Error:
                    continue
                self._procs[pid] = proc
            out.append(proc)
        for pid in set(self._procs) - pids:
            del self._procs[pid]
        return out

    def sample(self) -> list[dict[str, Any]]:
        """Take one sample now (the thread does this every :attr:`interval` seconds)."""
        rows, on_gpu = self._nvml.sample()
        vm = psutil.virtual_memory()
        rows.append({"kind": "host", "name": "host", "cpu_percent": psutil.cpu_percent(None),
                     "mem_used_mib": (vm.total - vm.available) / _MIB,
                     "mem_total_mib": vm.total / _MIB})
        me = os.getpid()
        for proc in self._watched():
            try:
                with proc.oneshot():
                    cpu, rss = proc.cpu_percent(None), proc.memory_info().rss / _MIB
            except psutil.Error:
                self._procs.pop(proc.pid, None)
                continue
            rank = self._added.get(proc.pid)
            if rank is not None:
                name = f"rank {rank} (pid {proc.pid})"
            else:
                name = "this process" if proc.pid == me else f"pid {proc.pid}"
            row = {"kind": "process", "name": name, "pid": proc.pid,
                   "rank": math.nan if rank is None else rank, "cpu_percent": cpu,
                   "rss_mib": rss}
            if proc.pid in on_gpu:
                row["device"], row["uuid"], row["gpu_mem_mib"] = on_gpu[proc.pid]
            rows.append(row)
        self._store(rows)
        return rows

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # keep sampling; say what failed once per kind
                msg = f"{type(exc).__name__}: {exc}"
                if msg not in self.errors:
                    self.errors.append(msg)
                    warnings.warn(f"LoadMonitor: a sample failed ({msg})", RuntimeWarning,
                                  stacklevel=1)
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow sample): skip the missed ticks
                next_at += math.ceil(-delay / self.interval) * self.interval
                delay = next_at - time.monotonic()
            self._stop.wait(max(0.0, delay))


def _frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in SAMPLE_COLUMNS]
    return df.reindex(columns=[*SAMPLE_COLUMNS, *extra])
