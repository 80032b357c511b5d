"""Per-rank, per-stage timing of a parallel run, and the progress events streamed while it runs.

A run is a sequence of *phases*: the initial pass (iteration 0) and one E-step phase per
iteration. In every phase each working rank reads its pools (``read``) and processes them
(``estep``; ``init`` for the initial pass), its threads' partial sums are combined (``combine``),
and the leader runs the M-step (``mstep``) and writes the files (``write``).

Progress events
---------------
The runtime calls ``progress(event)`` with one ``dict`` per event; ``event["event"]`` says which:

``"setup"``
    ``ranks`` (list of :meth:`RankInfo.to_dict`), ``device_table`` (str), ``pool`` (particles
    per thread per task), ``pool_memory`` (estimated bytes per pool per thread), ``io_mode``,
    ``combine``, ``engines``, ``gpu`` (bool), ``n_particles``, ``iterations``, ``first_iteration``,
    ``warnings`` (list of str).
``"stage"``
    ``iteration``, ``stage`` (``preread``, ``scratch``, ``init``, ``estep``, ``combine``,
    ``mstep``, ``write``), ``state`` (``"start"`` or ``"end"``) and, at the end, ``seconds``.
``"pool"``
    One pool done: ``iteration``, ``rank``, ``thread``, ``n`` (particles in the pool), ``done``
    and ``total`` (particles of this iteration), ``read_s``, ``compute_s``.
``"heartbeat"``
    ``rank``, ``host``, ``busy`` (list of ``(thread, particles, seconds busy)``), ``queued``,
    ``memory`` (see :class:`RankTimes`), ``time``.
``"iteration"``
    ``iteration``, ``stats`` (:meth:`IterationStats.to_dict`), ``summary`` (the leader's
    :meth:`cryonb.em.class2d.Class2DJob.summary`, class images included), ``files``.
``"done"``
    ``iteration`` (the last complete one), ``stopped`` (bool), ``classes`` (path).

All-ranks jobs (autopicking, extraction; :mod:`cryonb.parallel.autopick`) have one phase
(iteration 1) over micrographs and send the same kinds of event:

``"setup"``
    ``job`` (``"autopick"`` or ``"extract"``), ``ranks``, ``device_table``, ``engines``,
    ``gpu``, ``warnings``, ``n_micrographs``, ``split`` (``{rank: [first, stop]}``: the
    micrographs of each rank) and, as above, ``n_particles`` (= micrographs, the unit of
    progress), ``iterations`` (1), ``first_iteration`` (0), ``pool`` (1), ``pool_memory`` (0),
    ``io_mode`` (``"parallel"``), ``combine`` (``"none"``).
``"stage"``
    ``pick`` or ``extract`` (the ranks at work), ``write`` (the lists written once every rank
    has finished), ``stop``.
``"pool"``
    One micrograph done: ``iteration`` (1), ``rank``, ``thread``, ``n`` (1), ``done``,
    ``total``, ``index`` (row in the STAR file), ``picks`` (autopicking) or ``particles``
    (extraction), ``read_s`` (0), ``compute_s``.
``"heartbeat"``
    ``rank``, ``host``, ``busy`` (list of ``(thread, micrograph, seconds busy)``), ``queued``
    (micrographs not started), ``memory``, ``cpu_percent`` (the rank's process, % of one
    core), ``gpu_util`` (% of its GPU, ``None`` on the CPU): :func:`load_figures` turns it
    into figures for :meth:`cryonb.viz.LoadMonitor.report`.
``"iteration"``
    ``iteration`` (1), ``stats``, ``summary`` (``n_picks`` or ``n_particles``), ``files``.
``"done"``
    ``iteration`` (1, or 0 when stopped), ``stopped``, ``classes`` (``""``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["STAGES", "IterationStats", "RankInfo", "RankTimes", "RunStats", "emit",
           "load_figures"]

#: stage names, in the order they happen in one iteration
STAGES = ("read", "estep", "combine", "mstep", "write")
#: columns of :meth:`RunStats.table`, in this order (those of no phase are left out)
_TABLE_STAGES = ("setup", "init", "estep", "pick", "extract", "combine", "mstep", "write")
#: the stage whose time gives the throughput of a phase, first found
_WORK_STAGES = ("estep", "init", "pick", "extract")


@dataclass
class RankInfo:
    """Who a rank is: where it runs and on what.

    Attributes
    ----------
    rank : int
        0 = leader (in a run of one rank: leader and worker).
    role : str
        ``"leader"``, ``"worker"`` or ``"leader+worker"``.
    host : str
    pid : int
    engine : int or None
        ipyparallel engine id (``None`` in-process).
    mpi_rank : int or None
        Rank in ``MPI.COMM_WORLD`` when the engines run under MPI.
    threads : int
    devices : list of int
        Device index (as the host numbers them) of every thread; empty on the CPU.
    uuids : list of str
        Device UUID of every thread (empty on the CPU); sharing is detected with these.
    names : list of str
        Device names.
    """

    rank: int
    role: str
    host: str
    pid: int
    engine: int | None = None
    mpi_rank: int | None = None
    threads: int = 1
    devices: list[int] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def label(self) -> str:
        """``rank 2 (engine 2, pid 1234 on host node7)``: how errors name a rank."""
        eng = f"engine {self.engine}, " if self.engine is not None else ""
        return f"rank {self.rank} ({eng}pid {self.pid} on host {self.host})"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return asdict(self)


@dataclass
class RankTimes:
    """One rank's times in one phase.

    Attributes
    ----------
    rank : int
    particles : int
        Particles this rank processed (micrographs in all-ranks jobs: autopicking,
        extraction; see :attr:`RunStats.unit`).
    pools : int
    read_s : float
        Time its reader spent getting images (overlapped with computing).
    compute_s : float
        Time its threads spent computing, summed over threads.
    wall_s : float
        From its first pool started to its last pool finished.
    finish_s : float
        Finishing the threads' sums and summing them (part of ``combine``).
    fallback : int
        Particles read from the original path although a scratch copy was asked for.
    memory : dict
        ``rss`` (bytes, host memory of the rank's process), ``devices`` (``{device:
        bytes}`` held by CuPy's memory pool; empty on the CPU) and ``resident`` (bytes of
        images stored on the devices, GPU workers).
    stored : int
        Particles whose images were on the device already (not read, not copied; see
        :mod:`cryonb.parallel.resident`).
    """

    rank: int
    particles: int = 0
    pools: int = 0
    read_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    finish_s: float = 0.0
    fallback: int = 0
    memory: dict = field(default_factory=dict)
    stored: int = 0

    @property
    def particles_per_s(self) -> float:
        """Particles per second of wall time (0 when nothing was done)."""
        return self.particles / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data, with ``particles_per_s``."""
        return {**asdict(self), "particles_per_s": self.particles_per_s}


@dataclass
class IterationStats:
    """Times of one phase (iteration 0 = initial pass).

    Attributes
    ----------
    iteration : int
    stages : dict of str to float
        Wall seconds of each stage of the whole run: ``estep`` (first pool handed out to last
        result in; ``init`` in iteration 0), ``combine``, ``mstep``, ``write``, and ``setup``
        (task lists and the model broadcast).
    ranks : dict of int to RankTimes
        The working ranks' own times.
    wall_s : float
        The whole phase.
    particles : int
    """

    iteration: int
    stages: dict[str, float] = field(default_factory=dict)
    ranks: dict[int, RankTimes] = field(default_factory=dict)
    wall_s: float = 0.0
    particles: int = 0

    @property
    def particles_per_s(self) -> float:
        """Particles (micrographs in all-ranks jobs) per second over the working stage
        (``estep``, ``init``, ``pick`` or ``extract``; 0 when unknown)."""
        t = next((self.stages[s] for s in _WORK_STAGES if s in self.stages), 0.0)
        return self.particles / t if t > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {"iteration": self.iteration, "stages": dict(self.stages),
                "ranks": {str(r): t.to_dict() for r, t in self.ranks.items()},
                "wall_s": self.wall_s, "particles": self.particles,
                "particles_per_s": self.particles_per_s}


@dataclass
class RunStats:
    """All phases of a run.

    Attributes
    ----------
    iterations : list of IterationStats
    setup_s : float
        Starting the ranks (engines, reading, devices).
    unit : str
        What the counts count: ``"particles"``, or ``"micrographs"`` (all-ranks jobs).
    """

    iterations: list[IterationStats] = field(default_factory=list)
    setup_s: float = 0.0
    unit: str = "particles"

    def stage_totals(self) -> dict[str, float]:
        """Seconds per stage summed over the phases."""
        out: dict[str, float] = {}
        for it in self.iterations:
            for k, v in it.stages.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def rank_totals(self) -> dict[int, RankTimes]:
        """Per rank: particles, pools and times summed over the phases (memory: the last)."""
        out: dict[int, RankTimes] = {}
        for it in self.iterations:
            for r, t in it.ranks.items():
                acc = out.setdefault(r, RankTimes(r))
                for name in ("particles", "pools", "read_s", "compute_s", "wall_s", "finish_s",
                             "fallback", "stored"):
                    setattr(acc, name, getattr(acc, name) + getattr(t, name))
                acc.memory = t.memory
        return out

    def table(self) -> str:
        """A plain-text summary: seconds per stage and iteration, then per rank."""
        lines = []
        stages = [s for s in _TABLE_STAGES if any(s in it.stages for it in self.iterations)]
        unit = self.unit
        head = ["iter", *stages, "total", f"{unit}/s"]
        rows = []
        for it in self.iterations:
            rows.append([str(it.iteration)] + [f"{it.stages.get(s, 0.0):.2f}" for s in stages]
                        + [f"{it.wall_s:.2f}", f"{it.particles_per_s:.0f}"])
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        totals = sorted(self.rank_totals().items())
        stored = any(t.stored for _, t in totals)
        head = ["rank", unit, "read_s", "compute_s", "wall_s", "finish_s", f"{unit}/s",
                "from origin", *(["on device"] if stored else [])]
        rows = []
        for r, t in totals:
            rows.append([str(r), str(t.particles), f"{t.read_s:.2f}", f"{t.compute_s:.2f}",
                         f"{t.wall_s:.2f}", f"{t.finish_s:.2f}", f"{t.particles_per_s:.0f}",
                         str(t.fallback), *([str(t.stored)] if stored else [])])
        if rows:
            widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
            lines.append("")
            lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
            lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
            lines.append(f"(read_s: reading images, overlapped with computing; compute_s: "
                         f"the threads' time, summed; finish_s: summing the threads' results; "
                         f"from origin: {unit} read from the original files although a "
                         f"scratch copy was asked for"
                         + (f"; on device: {unit} whose images a GPU kept from an earlier "
                            f"iteration, not read again" if stored else "") + ")")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {"setup_s": self.setup_s, "unit": self.unit,
                "iterations": [i.to_dict() for i in self.iterations]}


def emit(progress, event: str, **data) -> None:
    """Call ``progress({"event": event, "time": ..., **data})`` if a callback was given.

    An exception in the callback is reported once as a warning and does not stop the run.
    """
    if progress is None:
        return
    try:
        progress({"event": event, "time": time.time(), **data})
    except Exception as exc:  # a broken view must not kill a long run
        if not getattr(progress, "_cryonb_warned", False):
            import warnings

            warnings.warn(f"the progress callback raised {type(exc).__name__}: {exc}; "
                          "later errors of it are not reported", RuntimeWarning, stacklevel=2)
            try:
                progress._cryonb_warned = True
            except AttributeError:
                pass


def load_figures(event: dict) -> dict[str, Any] | None:
    """The figures of a ``heartbeat`` event as :meth:`cryonb.viz.LoadMonitor.report` takes them.

    For ranks on other hosts, whose processes the monitor cannot sample itself.

    Parameters
    ----------
    event : dict
        A progress event.

    Returns
    -------
    dict or None
        ``rank``, ``busy_threads``, ``rss_mib``, and where known ``cpu_percent``,
        ``gpu_mem_mib``, ``gpu_util``: ``monitor.report(**load_figures(ev))``. ``None``
        for other events.
    """
    if event.get("event") != "heartbeat":
        return None
    mem = event.get("memory") or {}
    out: dict[str, Any] = {"rank": int(event["rank"]), "busy_threads": len(event.get("busy", []))}
    if mem.get("rss"):
        out["rss_mib"] = mem["rss"] / 2.0**20
    if mem.get("devices"):
        out["gpu_mem_mib"] = sum(mem["devices"].values()) / 2.0**20
    for key in ("cpu_percent", "gpu_util"):
        if event.get(key) is not None:
            out[key] = float(event[key])
    return out
