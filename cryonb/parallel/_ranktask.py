"""The working side of a rank of an all-ranks job: its micrographs, done in the background.

A :class:`RankTask` lives in the rank's process (an engine, or the calling process for a run
of one rank). It opens the rank's share of the job (:func:`cryonb.pick.open_autopick_rank`
or :func:`cryonb.pick.open_extract_rank`: contiguous micrographs, RELION's
``divide_equally``) and processes it with ``--j`` threads in a thread of its own, so that the
driver can poll it (:meth:`RankTask.exchange`): finished micrographs as plain data, and a
heartbeat with what the rank is doing and its CPU, memory and GPU load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from typing import Any

from ..errors import ConfigError
from ._worker import error_record
from .hardware import device_memory, gpu_utilisation

__all__ = ["JOBS", "RankTask"]


def _open_autopick(config, rank: int, size: int, device):
    from ..pick.autopick import open_autopick_rank

    def plain(m) -> tuple[dict, int]:
        return dataclasses.asdict(m), m.n_picks

    return open_autopick_rank(config, rank, size, device), plain


def _open_extract(config, rank: int, size: int, device):
    from ..pick.extract import open_extract_rank

    def plain(part) -> tuple[tuple, int]:
        return part, 0 if part[1] is None else len(part[1])

    return open_extract_rank(config, rank, size), plain


#: job name -> ``open(config, rank, size, device) -> (RankWork, plain)``; ``plain(result)``
#: gives what goes back to the driver and how many things (picks, particles) it found.
JOBS = {"autopick": _open_autopick, "extract": _open_extract}


class RankTask:
    """One rank's micrographs, processed in the background.

    Parameters
    ----------
    job : {"autopick", "extract"}
    rank, size : int
    config : JobConfig or dict
        The job's configuration (:class:`~cryonb.pick.AutopickConfig`,
        :class:`~cryonb.pick.ExtractConfig`).
    device : int or None
        CUDA device of the rank (this process's numbering), ``None`` on the CPU.
    threads : int
        ``--j``.
    uuids : sequence of str
        The device's UUID (for its utilisation in the heartbeat).
    """

    def __init__(self, job: str, rank: int, size: int, config, *, device: int | None = None,
                 threads: int = 1, uuids=()):
        if job not in JOBS:
            raise ConfigError(f"unknown all-ranks job {job!r}: choose one of {', '.join(JOBS)}")
        import psutil

        self.job = job
        self.rank = int(rank)
        self.device = device
        self.threads = int(threads)
        self.uuids = list(uuids)
        self.work, self._plain = JOBS[job](config, rank, size, device)
        self._stop = threading.Event()
        self._items: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._numbers: dict[int, int] = {}  # thread ident -> thread number
        self._busy: dict[int, tuple[int, float]] = {}  # thread number -> (index, start)
        self._started = 0
        self._done = 0
        self._compute_s = 0.0
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._error: dict | None = None
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # starts the interval of the first heartbeat
        self._runner = threading.Thread(target=self._run, daemon=True,
                                        name=f"cryonb-{job}-r{rank}")
        self._runner.start()

    # ------------------------------------------------------------------ the driver's calls
    def info(self) -> dict:
        """``first``, ``stop`` (this rank's micrographs ``first <= i < stop``), ``total``."""
        return {"rank": self.rank, "first": self.work.indices.start,
                "stop": self.work.indices.stop, "total": self.work.total}

    def exchange(self, wait_s: float) -> dict:
        """Wait up to ``wait_s`` for micrographs done; return them and the heartbeat.

        Returns
        -------
        dict
            ``items``: list of dicts ``index``, ``thread``, ``found`` (picks, particles),
            ``seconds``, ``data`` (:class:`~cryonb.pick.MicrographPicks` fields, or
            ``(index, rows, stack)``); ``finished`` (bool: every micrograph is in ``items``
            now or was before); ``error`` (:func:`~cryonb.parallel._worker.error_record` or
            ``None``); ``heartbeat`` (:meth:`heartbeat`); when finished, ``times``
            (:meth:`times`).
        """
        finished = not self._runner.is_alive()
        out = []
        with contextlib.suppress(queue.Empty):
            if not finished:
                out.append(self._items.get(timeout=max(0.0, wait_s)))
            while True:
                out.append(self._items.get_nowait())
        reply = {"items": out, "finished": finished,
                 "error": self._error if finished else None, "heartbeat": self.heartbeat()}
        if finished:
            reply["times"] = self.times()
        return reply

    def heartbeat(self) -> dict:
        """What the rank does now, and its load.

        Returns
        -------
        dict
            ``busy`` (list of ``(thread, micrograph, seconds busy)``), ``queued``
            (micrographs not started), ``memory`` (``rss`` bytes, ``devices``: CuPy's pool
            per device), ``cpu_percent`` (this process since the last heartbeat, % of one
            core), ``gpu_util`` (% of its GPU, ``None`` on the CPU or without NVML).
        """
        now = time.monotonic()
        with self._lock:
            busy = [(t, i, round(now - t0, 3)) for t, (i, t0) in sorted(self._busy.items())]
            queued = len(self.work.indices) - self._started
        util = gpu_utilisation(self.uuids) if self.uuids else {}
        return {"rank": self.rank, "time": time.time(), "busy": busy,
                "queued": 0 if self._stop.is_set() else queued, "memory": self.memory(),
                "cpu_percent": self._proc.cpu_percent(None),
                "gpu_util": sum(util.values()) / len(util) if util else None}

    def memory(self) -> dict:
        """``rss`` (bytes) of this process and CuPy's pool on the rank's device."""
        out: dict[str, Any] = {"rss": int(self._proc.memory_info().rss)}
        if self.device is not None:
            out["devices"] = device_memory([self.device])
        return out

    def times(self) -> dict:
        """The rank's times, as :class:`~cryonb.parallel.stats.RankTimes` fields (counts are
        micrographs; nothing is read ahead or combined, so ``read_s`` and ``finish_s`` are 0).
        """
        with self._lock:
            first, last = self._t_first, self._t_last
            wall = last - first if first is not None and last is not None else 0.0
            return {"particles": self._done, "pools": self._done, "read_s": 0.0,
                    "compute_s": self._compute_s, "wall_s": wall, "finish_s": 0.0,
                    "fallback": 0, "memory": self.memory()}

    def stop(self) -> None:
        """Start no more micrographs (those being processed finish)."""
        self._stop.set()

    def close(self) -> None:
        """Stop and wait a little for the micrographs being processed."""
        self._stop.set()
        self._runner.join(timeout=5.0)

    # ------------------------------------------------------------------ the rank's threads
    def _number(self) -> int:
        ident = threading.get_ident()
        with self._lock:
            return self._numbers.setdefault(ident, len(self._numbers))

    def _on_start(self, index: int) -> None:
        t = self._number()
        now = time.monotonic()
        with self._lock:
            self._busy[t] = (index, now)
            self._started += 1
            if self._t_first is None:
                self._t_first = now

    def _on_item(self, result) -> None:
        t = self._number()
        data, found = self._plain(result)
        now = time.monotonic()
        with self._lock:
            index, t0 = self._busy.pop(t)
            self._done += 1
            self._compute_s += now - t0
            self._t_last = now
        self._items.put({"index": index, "thread": t, "found": found, "seconds": now - t0,
                         "data": data})

    def _run(self) -> None:
        try:
            self.work.run(self.threads, on_item=self._on_item, on_start=self._on_start,
                          stop=self._stop)
        except BaseException as exc:
            with self._lock:
                busy = sorted(self._busy.items())
            where = {"thread": busy[0][0]} if busy else {}
            stage = self.job if not busy else f"{self.job}, micrograph {busy[0][1][0] + 1}"
            self._error = error_record(exc, rank=self.rank, stage=stage, **where)
