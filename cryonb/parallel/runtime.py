"""Running a 2D classification on ranks: in this process, or on ipyparallel engines.

:func:`run_class2d` is the one entry point (the CLI, the notebook panels and the sweeps call
it); :func:`run_class2d_async` is its twin for an event loop (a notebook), with progress events
delivered on the loop.

Roles (RELION's)
    Rank 0 leads: it holds the :class:`~cryonb.em.class2d.Class2DJob` (the particle table, the
    per-particle state, the model), makes the initial model, runs the M-step and writes the
    files. Ranks 1..N-1 work, ``--j`` threads each. With ``--ranks 1`` the calling process leads
    and works (its threads do the E-step), without any engine.
Scheduling
    Every phase (the initial pass, then one E-step per iteration) is a list of pools of
    ``--pool`` particles, shuffled per iteration with the run's seed. This process hands them
    out on demand: each working rank holds at most ``2 x --j`` pools (``--j`` computing,
    ``--j`` being read ahead; in a phase of fewer pools than that per rank, an equal share,
    so that every rank starts with one) and gets the next ones as soon as results come back,
    so ranks that are faster or less loaded take more pools (no static split). With the automatic
    pool (``--pool 0``) on GPUs a rank's share is at least two pools while it reads images,
    one from the E-step after one in which every rank found all its images on its devices
    (:meth:`_Run._phase_pool`).
Data flow
    The model goes to the workers at the start of each iteration (MPI broadcast under MPI,
    else through this process); per-particle results come back with each pool; the threads'
    sums are added in thread order on each rank, and the ranks' sums in rank order on the
    leader (:mod:`cryonb.parallel.combine`); images come from :mod:`cryonb.parallel.images`.
Waiting
    Every wait is bounded: working ranks answer at least every second with a heartbeat; a rank
    whose process is gone, that does not answer, or whose pools make no progress for
    ``--timeout`` seconds stops the run with a :class:`RankError` naming its rank, engine, pid
    and host.
Stopping
    ``stop_event.set()`` ends the run after the pools being computed: the unfinished iteration
    is dropped, and the files of the last complete iteration are on disc.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .._asyncio import run_blocking
from ..errors import ConfigError
from . import _engine, hardware
from ._errors import from_record
from ._session import TICK, LocalRank, Rank, RankSession, quietly
from .combine import ordered_sum
from .devices import resolve_device_map
from .images import (
    SCRATCH_CAPACITY_ENV,
    PrereadSource,
    ScratchSource,
    TableSource,
    check_preread_memory,
    copy_to_scratch,
    image_bytes,
    remove_scratch,
)
from .pools import auto_pool, pool_memory
from .stats import IterationStats, RankInfo, RankTimes, RunStats, emit

__all__ = ["RunResult", "run_class2d", "run_class2d_async"]


@dataclass
class RunResult:
    """What a run did and where its files are.

    Attributes
    ----------
    output_root : str
        ``--o``.
    iteration : int
        The last complete iteration (0 = initial model only, -1 = none).
    first_iteration : int
        The iteration the run started from (0, or the one continued from).
    stopped : bool
        Ended by ``stop_event`` before ``--iter``.
    files : dict of str to str
        The last written iteration's files (``classes``, ``model``, ``data``, ``optimiser``...).
    classes : str
        The class averages (``<o>_it###_classes.mrcs``).
    history : list of dict
        Per iteration: the leader's summary (log-likelihood, pmax, resolution, ...).
    stats : RunStats
        Per iteration, per stage and per rank times.
    ranks : list of RankInfo
    device_table : str
        The resolved ``--gpu`` map (with device UUIDs when known) and its warnings.
    device_map : dict
        ``{"<rank>": [device per thread]}``.
    pool : int
        Particles per thread per task.
    gpu : bool
    io_mode, combine, engines : str
        As used (``engines``: ``inprocess``, ``local``, ``mpi`` or ``attach``).
    warnings : list of str
    scratch : list of str
        One line per host that copied particles to scratch.
    sums : ndarray or None
        The last phase's combined sum vector (``return_sums=True``).
    """

    output_root: str
    iteration: int
    first_iteration: int
    stopped: bool
    files: dict
    classes: str
    history: list
    stats: RunStats
    ranks: list
    device_table: str
    device_map: dict
    pool: int
    gpu: bool
    io_mode: str
    combine: str
    engines: str
    warnings: list = field(default_factory=list)
    scratch: list = field(default_factory=list)
    sums: np.ndarray | None = None

    def summary(self) -> str:
        """A few lines: where the classes are, how long each stage took."""
        state = "stopped" if self.stopped else "finished"
        lines = [f"{state} after iteration {self.iteration}: class averages in {self.classes}",
                 self.stats.table()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the run
class _Run(RankSession):
    """One run of :func:`run_class2d` (the driver: this process)."""

    def __init__(self, config, progress, stop_event, client, return_sums: bool):
        from ..em._config import Class2DConfig

        if not isinstance(config, Class2DConfig):
            raise ConfigError(f"run_class2d needs a Class2DConfig, not {type(config).__name__}")
        super().__init__(config.validate(), progress, stop_event, client)
        self.return_sums = return_sums
        self.stats = RunStats()
        self.leader: Rank | None = None
        self.workers: list[Rank] = []
        self.pool = 0
        self.pool_bytes = 0
        #: the automatic pool once every rank's images are stored on its devices (GPU)
        self.pool_stored = 0
        self.scratch: list[tuple] = []  # (rank handle or None, ScratchCopy)
        self.info: dict = {}
        self._next_id = 0
        self._local_blas = None
        self._last_sums = None
        self._history: list[dict] = []

    # -------------------------------------------------------------- set-up
    def _setup(self) -> None:
        if self.cfg.ranks == 1:
            self._setup_inprocess()
        else:
            self._setup_engines()
        if self.gpu:
            self.warnings += shared_gpu_advice([(r.rank, r.info.devices) for r in self.ranks])
        emit(self.progress, "setup", ranks=[r.info.to_dict() for r in self.ranks],
             device_table=self.device_table, pool=self.pool, pool_memory=self.pool_bytes,
             io_mode=self.cfg.io_mode, combine=self.cfg.combine, engines=self.engines,
             gpu=self.gpu, n_particles=self.info["n"], iterations=self.cfg.iter,
             first_iteration=self.info["iteration"], warnings=list(self.warnings),
             scratch=[c.describe() for _, c in self.scratch])

    def _job_config(self):
        return self.info["config"]

    def _setup_inprocess(self) -> None:
        from ._leader import LeaderCore
        from ._worker import WorkerService

        cfg = self.cfg
        self._inprocess_note()
        leader = LeaderCore(cfg, timeout=self.timeout)
        self.info = info = leader.info()
        self._continue_note()
        jcfg = self._job_config()
        dmap = resolve_device_map(cfg.gpu, 1, cfg.j, n_devices=self._local_devices())
        devices = list(dmap.devices_of(0))
        # the leader drives the rank's (first) GPU: its M-step's re-seeding runs there too
        leader.job.reseed_device = devices[0] if devices else None
        proc = hardware.describe_process()
        rinfo = RankInfo(0, "leader+worker", proc["host"], proc["pid"], threads=cfg.j,
                         devices=devices)
        self._device_names(rinfo, proc["devices"])
        table = leader.job.table
        src = self._local_source(table, info, proc)
        self._local_blas = self._local_blas_limit(cfg.j, proc)
        free = self._free_per_thread([rinfo], {0: proc})
        self._choose_pool(free, [rinfo])
        worker = WorkerService(rank=0, config=jcfg, setup=_setup_of(info), threads=cfg.j,
                               devices=devices or None, source=src, timeout=self.timeout,
                               fft_threads=max(1, proc["cores"] // cfg.j))
        rank = LocalRank(rinfo, {"leader": leader, "worker": worker})
        self.ranks = [rank]
        self.leader = rank
        self.workers = [rank]
        self._device_report(dmap)

    def _local_source(self, table, info, proc):
        cfg = self.cfg
        mode = cfg.io_mode
        host = proc["host"]
        if mode in ("parallel", "leader"):
            return TableSource(table)
        if mode == "preread":
            check_preread_memory(info["n"], info["N"], {host: 1}, {host: proc["mem_available"]})
            emit(self.progress, "stage", iteration=0, stage="preread", state="start")
            t0 = time.monotonic()
            src = PrereadSource(table, check_memory=False)
            emit(self.progress, "stage", iteration=0, stage="preread", state="end",
                 seconds=time.monotonic() - t0)
            return src
        copy = self._timed("scratch", copy_to_scratch, table, cfg.scratch_dir, self.run_id,
                           cfg.keep_free_scratch, _scratch_capacity())
        self.scratch.append((None, copy))
        self._scratch_warning(copy, host)
        return ScratchSource(table, copy)

    def _timed(self, stage, fn, *args):
        emit(self.progress, "stage", iteration=0, stage=stage, state="start")
        t0 = time.monotonic()
        out = fn(*args)
        emit(self.progress, "stage", iteration=0, stage=stage, state="end",
             seconds=time.monotonic() - t0)
        return out

    def _continue_note(self) -> None:
        """Warn about options that ``--continue`` ignores (the leader's ``continue_note``)."""
        note = self.info.get("continue_note")
        if note:
            self.warnings.append(note)

    def _scratch_warning(self, copy, host) -> None:
        if not copy.complete:
            self.warnings.append(f"host {host}: {copy.describe()}")

    def _setup_engines(self) -> None:
        cfg = self.cfg
        chosen = self._start_engines()
        self.ranks = [self._engine_rank(r, e, p, "leader" if r == 0 else "worker",
                                        0 if r == 0 else cfg.j)
                      for r, (e, p) in enumerate(chosen)]
        probes = dict(chosen)
        self.leader, self.workers = self.ranks[0], self.ranks[1:]
        cwd = os.getcwd()
        if self.mpi:
            world = [p["mpi"][0] for _, p in chosen]
            self._wait_all([(r, r.run_async(_engine.mpi_group, self.run_id, world, cwd))
                            for r in self.ranks], "creating the MPI communicator", 120.0)
        self.info = info = self._wait(self.leader, self.leader.run_async(
            _engine.open_leader, self.run_id, cfg, cwd=cwd, timeout=self.timeout),
            "reading the particles")
        self._continue_note()
        jcfg = self._job_config()
        wprobes = {w.rank: probes[w.info.engine] for w in self.workers}
        n_dev = self._engine_devices(wprobes)
        hosts = {r.rank: r.info.host for r in self.ranks}
        dmap = resolve_device_map(cfg.gpu, cfg.ranks, cfg.j, n_devices=n_dev, hosts=hosts)
        for w in self.workers:
            w.info.devices = list(dmap.devices_of(w.rank))
            self._device_names(w.info, wprobes[w.rank]["devices"])
        self._device_report(dmap)
        by_host: dict[str, list[Rank]] = {}
        for w in self.workers:
            by_host.setdefault(w.info.host, []).append(w)
        sources = self._engine_sources(jcfg, info, by_host, wprobes, cwd)
        infos = [w.info for w in self.workers]
        self._choose_pool(self._free_per_thread(infos, wprobes), infos)
        setup = _setup_of(info)
        if cfg.io_mode == "preread":
            emit(self.progress, "stage", iteration=0, stage="preread", state="start")
        t0 = time.monotonic()
        calls = []
        shares = _resident_shares(self.workers)
        for w in self.workers:
            cores = wprobes[w.rank]["cores"]
            blas = max(1, cores // (len(by_host[w.info.host]) * cfg.j))
            wsetup = {**setup, "resident_share": shares.get(w.rank, 1.0)}
            calls.append((w, w.run_async(
                _engine.open_worker, self.run_id, w.rank, jcfg, wsetup, threads=cfg.j,
                devices=w.info.devices, source=sources[w.rank], cwd=cwd, timeout=self.timeout,
                blas_threads=blas)))
        opened = self._wait_all(calls, "starting the workers",
                                self._io_timeout() if cfg.io_mode == "preread" else None)
        for w, out in zip(self.workers, opened):
            self._confirm_devices(w.info, out["uuids"])
        if self.gpu:  # the table again, with the devices CUDA itself reported
            self._device_report(dmap)
        if cfg.io_mode == "preread":
            emit(self.progress, "stage", iteration=0, stage="preread", state="end",
                 seconds=time.monotonic() - t0)

    def _engine_sources(self, jcfg, info, by_host, wprobes, cwd) -> dict[int, dict]:
        cfg = self.cfg
        mode = cfg.io_mode
        if mode == "preread":
            check_preread_memory(info["n"], info["N"], {h: len(ws) for h, ws in by_host.items()},
                                 {h: min(wprobes[w.rank]["mem_available"] for w in ws)
                                  for h, ws in by_host.items()})
        if mode != "scratch":
            return {w.rank: {"kind": mode} for w in self.workers}
        emit(self.progress, "stage", iteration=0, stage="scratch", state="start")
        t0 = time.monotonic()
        copiers = [ws[0] for ws in by_host.values()]  # the first worker of each host copies
        copies = self._wait_all(
            [(c, c.run_async(_engine.scratch_copy, self.run_id, jcfg, f"{self.run_id}_{c.rank}",
                             _scratch_capacity(), cwd)) for c in copiers],
            "copying particles to --scratch_dir", self._io_timeout())
        emit(self.progress, "stage", iteration=0, stage="scratch", state="end",
             seconds=time.monotonic() - t0)
        out = {}
        for c, copy in zip(copiers, copies):
            self.scratch.append((c, copy))
            self._scratch_warning(copy, c.info.host)
            for w in by_host[c.info.host]:
                out[w.rank] = {"kind": "scratch", "copy": copy}
        return out

    def _io_timeout(self) -> float:
        """``--timeout`` plus the time to read the whole data set at 20 MB/s (a slow disc):
        the bound of silent waits that read everything (prereading, copying to scratch)."""
        return self.timeout + image_bytes(self.info["n"], self.info["N"]) / 20e6

    def _free_per_thread(self, infos: list[RankInfo], probes: dict) -> float | None:
        """Free device memory per thread, the device's threads over all ranks sharing it."""
        if not self.gpu:
            return None
        users: dict[str, int] = {}
        free: dict[str, int] = {}
        for info in infos:
            vis = probes[info.rank]["devices"]
            for d, u in zip(info.devices, info.uuids):
                users[u] = users.get(u, 0) + 1
                if d < len(vis):
                    free[u] = vis[d]["free"]
        per = [free[u] / users[u] for u in users if u in free]
        return min(per) if per else None

    def _choose_pool(self, free_per_thread, infos: list[RankInfo]) -> None:
        """:attr:`pool` and :attr:`pool_stored` for the working ranks ``infos``."""
        cfg, info = self.cfg, self.info
        ranks = len(infos)
        apix = info.get("pixel_size")
        args = (self._job_config(), info["n"], info["N"], cfg.j * ranks)
        kw = dict(gpu=self.gpu, free_bytes=free_per_thread, pixel_size=apix)
        self.pool = cfg.pool or auto_pool(*args, **kw, ranks=ranks)
        # images stored: a pool per device of each rank (a rank's threads on one device take
        # turns; on several devices, each needs a pool of its own)
        self.pool_stored = cfg.pool or (auto_pool(*args, **kw, ranks=_device_slots(infos),
                                                  per_rank=1) if self.gpu else self.pool)
        self.pool_bytes = self.pool * pool_memory(self._job_config(), info["N"], gpu=self.gpu,
                                                  pixel_size=apix)

    def _phase_pool(self, kind: str) -> int:
        """The pool size of a phase: :attr:`pool`, or on GPUs with an automatic pool
        :attr:`pool_stored` (one pool per rank where memory allows) once every working
        rank's last E-step found all its particles' images stored on its devices (nothing
        left to read while a pool computes; :mod:`cryonb.parallel.resident`)."""
        last = next((s for s in reversed(self.stats.iterations) if "estep" in s.stages), None)
        if kind != "estep" or last is None or self.pool_stored == self.pool:
            return self.pool
        stored = [t.particles > 0 and t.stored == t.particles for t in last.ranks.values()]
        return self.pool_stored if stored and all(stored) else self.pool

    # -------------------------------------------------------------- phases
    def _iterate(self) -> tuple[int, bool, dict]:
        cfg = self.cfg
        first = self.info["iteration"]
        last = first if self.info["has_model"] else -1
        files: dict = {}
        written = last
        phases = [] if self.info["has_model"] else [("init", 0)]
        phases += [("estep", it) for it in range(first + 1, cfg.iter + 1)]
        for kind, it in phases:
            if self.stop_event.is_set():
                break
            reply = self._phase(kind, it, final=(it == cfg.iter))
            if reply is None:
                break
            last = it
            if reply["files"]:
                files, written = reply["files"], it
        stopped = last < cfg.iter
        if stopped and last >= 0 and written != last:
            files = self._wait(self.leader, self.leader.call_async("leader", "write"),
                               "writing the last complete iteration")
        return last, stopped, files

    def _task(self, index, meta) -> dict:
        self._next_id += 1
        return {"id": self._next_id, "index": index, "meta": meta}

    def _phase(self, kind: str, it: int, final: bool) -> dict | None:
        t0 = time.monotonic()
        stage = "init" if kind == "init" else "estep"
        emit(self.progress, "stage", iteration=it, stage=stage, state="start")
        lead = self.leader
        pool = self._phase_pool(kind)
        tasks = [self._task(i, m) for i, m in self._wait(
            lead, lead.call_async("leader", "tasks", kind, pool, it), "making the tasks")]
        self._begin(kind, it)
        t1 = time.monotonic()
        results = self._schedule(kind, it, tasks)
        t2 = time.monotonic()
        if results is None:
            return None
        emit(self.progress, "stage", iteration=it, stage=stage, state="end", seconds=t2 - t1)
        emit(self.progress, "stage", iteration=it, stage="combine", state="start")
        if kind == "estep":
            self._wait(lead, lead.call_async("leader", "store", results), "storing the results")
        reply, times = self._combine(kind, it, final)
        t3 = time.monotonic()
        combine_s = (t3 - t2) - reply["mstep_s"] - reply["write_s"]
        for name, secs in (("combine", combine_s), ("mstep", reply["mstep_s"]),
                           ("write", reply["write_s"])):
            if name != "combine":
                emit(self.progress, "stage", iteration=it, stage=name, state="start")
            emit(self.progress, "stage", iteration=it, stage=name, state="end", seconds=secs)
        st = IterationStats(it, {"setup": t1 - t0, stage: t2 - t1, "combine": combine_s,
                                 "mstep": reply["mstep_s"], "write": reply["write_s"]},
                            {r: RankTimes(r, **t) for r, t in times.items()}, t3 - t0,
                            sum(len(t["index"]) for t in tasks))
        self.stats.iterations.append(st)
        self._last_sums = reply.get("sums")
        scalars = {k: v for k, v in reply["summary"].items() if np.isscalar(v)}
        self._history.append({**scalars, **reply["history"], "iteration": it})
        emit(self.progress, "iteration", iteration=it, stats=st.to_dict(),
             summary=reply["summary"], history=self._history[-1], files=reply["files"])
        return reply

    def _begin(self, kind: str, it: int) -> None:
        """Start the phase on every worker, with the model for an E-step."""
        lead = self.leader
        if kind == "init":
            calls = [(w, w.call_async("worker", "begin", "init", None, it)) for w in self.workers]
        elif self.mpi:
            calls = [(lead, lead.call_async("leader", "bcast_model"))]
            calls += [(w, w.call_async("worker", "begin_bcast", kind, it)) for w in self.workers]
        else:
            model = self._wait(lead, lead.call_async("leader", "model"), "sending the model")
            calls = [(w, w.call_async("worker", "begin", kind, model, it)) for w in self.workers]
        self._wait_all(calls, "broadcasting the model")

    def _combine(self, kind: str, it: int, final: bool) -> tuple[dict, dict]:
        """Finish the workers' sums and hand them to the leader's M-step."""
        lead = self.leader
        ranks = [w.rank for w in self.workers]
        kw = {"iteration": it, "ranks": ranks, "final": final, "keep_sums": self.return_sums}
        what = "combining the sums"
        if self.cfg.ranks == 1 or (self.cfg.combine == "network" and not self.mpi):
            outs = self._wait_all([(w, w.call_async("worker", "finish", "return"))
                                   for w in self.workers], what)
            total = ordered_sum([v for v, _ in outs], own=True)  # the workers' own vectors
            reply = self._wait(lead, lead.call_async("leader", "apply", kind, total, **kw),
                               "the M-step")
        elif self.cfg.combine == "disc":
            root = self.info["root"]
            outs = self._wait_all([(w, w.call_async("worker", "finish", "disc", root=root))
                                   for w in self.workers], what)
            reply = self._wait(lead, lead.call_async("leader", "apply", kind, None,
                                                     source="disc", **kw), "the M-step")
        else:  # network, through MPI: the leader receives in rank order
            calls = [(lead, lead.call_async("leader", "apply", kind, None, source="mpi", **kw))]
            calls += [(w, w.call_async("worker", "finish", "mpi")) for w in self.workers]
            got = self._wait_all(calls, what)
            reply, outs = got[0], got[1:]
        return reply, {w.rank: t for w, (_, t) in zip(self.workers, outs)}

    # -------------------------------------------------------------- scheduling
    def _schedule(self, kind: str, it: int, tasks: list[dict]) -> list | None:
        """Hand out the pools on demand; collect per-particle results (``None``: stopped)."""
        cfg = self.cfg
        lead = self.leader
        # a rank holds at most 2 x --j pools (--j computing, --j read ahead), and in a phase
        # of fewer pools no more than an equal share, so that every rank starts with one
        # (one pool per rank: one each; the rest go to the ranks that finish first)
        cap = max(1, min(2 * cfg.j, len(tasks) // max(1, len(self.workers))))
        total = sum(len(t["index"]) for t in tasks)
        leader_reads = cfg.io_mode == "leader" and cfg.ranks > 1 and not self.mpi
        leader_sends = cfg.io_mode == "leader" and cfg.ranks > 1 and self.mpi
        order = deque(tasks)
        prepared: deque = deque()  # (task, future of the leader's read or None)
        ahead = cap * len(self.workers)

        def top_up():
            while order and len(prepared) < ahead:
                t = order.popleft()
                fut = (lead.call_async("leader", "read_images", t["index"]) if leader_reads
                       else None)
                prepared.append((t, fut))

        def take(n: int) -> list[dict]:
            out = []
            while prepared and len(out) < n:
                t, fut = prepared[0]
                if fut is not None and not fut.done():
                    break
                prepared.popleft()
                if fut is not None:
                    t = {**t, "images": self._get(lead, fut, "reading images for the workers")}
                out.append(t)
            top_up()
            return out

        top_up()
        pending: dict[Rank, object] = {}
        sent_at: dict[Rank, float] = {}
        outstanding = dict.fromkeys(self.workers, 0)
        last_progress = dict.fromkeys(self.workers, time.monotonic())
        busy_info: dict[Rank, list] = {w: [] for w in self.workers}
        sizes: dict[int, int] = {}
        results: list = []
        done = 0
        stopping = False
        while True:
            for w in self.workers:
                if w in pending:
                    continue
                new = [] if stopping else take(cap - outstanding[w])
                if not new and outstanding[w] == 0:
                    continue
                if new and outstanding[w] == 0:
                    last_progress[w] = time.monotonic()
                if leader_sends and new:
                    for t in new:
                        t["mpi_tag"] = 1 + t["id"] % 30000
                        t["mpi_source"] = 0
                    items = [(w.rank, t["mpi_tag"], t["index"]) for t in new]
                    self._wait(lead, lead.call_async("leader", "send_images", items),
                               "queueing images")
                for t in new:
                    sizes[t["id"]] = len(t["index"])
                outstanding[w] += len(new)
                pending[w] = w.call_async("worker", "exchange", new, self.wait_s)
                sent_at[w] = time.monotonic()
            if not pending:
                if stopping or not (order or prepared):
                    break
            waitset = list(pending.values())
            waitset += [f for _, f in list(prepared)[:1] if f is not None]
            cf.wait(waitset, timeout=TICK, return_when=cf.FIRST_COMPLETED)
            now = time.monotonic()
            for w, fut in list(pending.items()):
                if not fut.done():
                    continue
                del pending[w]
                reply = self._get(w, fut, "the E-step")
                for rec in reply["results"]:
                    if "error" in rec:
                        raise from_record(rec["error"], w.info.label(), w.rank, w.info.host)
                    outstanding[w] -= 1
                    last_progress[w] = now
                    done += rec["n"]
                    if rec["res"] is not None:
                        results.append((_index_of(tasks, rec["id"]), rec["res"]))
                    emit(self.progress, "pool", iteration=it, rank=w.rank, thread=rec["thread"],
                         n=rec["n"], done=done, total=total, read_s=rec["read_s"],
                         compute_s=rec["compute_s"])
                busy_info[w] = reply["heartbeat"]["busy"]
                self._heartbeat(w, reply["heartbeat"])
            if self.stop_event.is_set() and not stopping:
                stopping = True
                emit(self.progress, "stage", iteration=it, stage="stop", state="start")
            for w in pending:
                self._check_answering(w, sent_at[w], f"the E-step of iteration {it}")
            for w in self.workers:
                if outstanding[w] > 0:
                    self._check_progress(w, last_progress[w], "pool", [
                        f"thread {t}: {n} particles for {s:.0f} s" for t, n, s in busy_info[w]])
        if stopping:
            self._wait_all([(w, w.call_async("worker", "abort")) for w in self.workers],
                           "stopping")
            return None
        return results

    # -------------------------------------------------------------- the whole run
    def run(self) -> RunResult:
        t0 = time.monotonic()
        try:
            self._setup()
            self.stats.setup_s = time.monotonic() - t0
            last, stopped, files = self._iterate()
        finally:
            self._close()
        emit(self.progress, "done", iteration=last, stopped=stopped,
             classes=files.get("classes", ""))
        return RunResult(
            output_root=self.info["root"], iteration=last, first_iteration=self.info["iteration"],
            stopped=stopped, files=files, classes=files.get("classes", ""),
            history=self._history, stats=self.stats, ranks=[r.info for r in self.ranks],
            device_table=self.device_table, device_map=self.device_map, pool=self.pool,
            gpu=self.gpu, io_mode=self.cfg.io_mode, combine=self.cfg.combine,
            engines=self.engines, warnings=self.warnings,
            scratch=[c.describe() for _, c in self.scratch], sums=self._last_sums)

    def _close(self) -> None:
        """Stop the ranks' threads, remove scratch copies, stop engines started here."""
        self._close_ranks()
        for rank, copy in self.scratch:
            if rank is None:
                remove_scratch(copy)
            elif rank.alive():
                quietly(lambda r=rank, c=copy: self._wait(
                    r, r.run_async(_engine.scratch_remove, c), "removing scratch", 60.0))
        if self._local_blas is not None:
            self._local_blas.restore_original_limits()
        self._stop_cluster()


def shared_gpu_advice(rank_devices) -> list[str]:
    """Advice for ranks whose threads share a GPU (``--j 2 --gpu 0``, RELION's habit).

    Parameters
    ----------
    rank_devices : iterable of (int, sequence of int)
        Each rank and its threads' devices (empty for the leader or the CPU).

    Returns
    -------
    list of str
        One line per rank and device used by several of its threads. On one GPU they slow
        each other: a pool's E-step is launched and waited for by Python code under the
        interpreter's lock (H100, 2-4 threads: 0.86-0.91x of one thread's throughput in a
        run, 0.42-0.69x in the E-step alone; ``benchmarks/RESULTS.md``, 2026-12-06, fifteenth
        session).
    """
    out = []
    for rank, devices in rank_devices:
        devices = list(devices or ())
        for d in sorted(set(devices)):
            n = devices.count(d)
            if n > 1:
                out.append(f"rank {rank}: {n} threads share GPU {d}, and threads on one GPU "
                           f"slow each other (0.86-0.91x of one thread's throughput): use "
                           f"--j 1 for each GPU")
    return out


def _index_of(tasks: list[dict], task_id: int):
    """The particle indices of the task ``task_id`` (ids are consecutive within a phase)."""
    first = tasks[0]["id"]
    return tasks[task_id - first]["index"]


def _setup_of(info: dict) -> dict:
    return {k: info[k] for k in ("N", "pixel_size", "n_optics", "n_groups", "mask_radius_px",
                                 "n")}


def _device_slots(infos) -> int:
    """The working ranks' (rank, device) pairs: how many pools can run at once on GPUs
    (a rank's threads on one device take turns)."""
    return sum(max(1, len(set(i.devices))) for i in infos) or 1


def _resident_shares(workers) -> dict:
    """Each working rank's part of its (first) GPU for stored images: 1 / the working ranks
    on the same host that use that device (:mod:`cryonb.parallel.resident`)."""
    users: dict = {}
    for w in workers:
        if w.info.devices:
            key = (w.info.host, w.info.devices[0])
            users[key] = users.get(key, 0) + 1
    return {w.rank: 1.0 / users[(w.info.host, w.info.devices[0])]
            for w in workers if w.info.devices}


def _scratch_capacity() -> int | None:
    v = os.environ.get(SCRATCH_CAPACITY_ENV)
    return int(float(v)) if v else None


# ------------------------------------------------------------------------------ public API
def run_class2d(config, *, progress=None, stop_event: threading.Event | None = None,
                client=None, return_sums: bool = False) -> RunResult:
    """Run a 2D classification with the ranks, threads, devices and I/O of ``config``.

    Parameters
    ----------
    config : Class2DConfig
        ``ranks``, ``j``, ``pool``, ``gpu``/``cpu``, ``io_mode``, ``combine``, ``engines``,
        ``timeout`` and the algorithm's options. ``ranks=1`` runs in this process; more ranks
        run on ipyparallel engines (started here, or those of ``client``).
    progress : callable, optional
        Called with one dict per event (see :mod:`cryonb.parallel.stats`).
    stop_event : threading.Event, optional
        Set it to end the run after the pools being computed; the last complete iteration's
        files stay on disc.
    client : ipyparallel.Client, ipyparallel.Cluster or ClusterHandle, optional
        Engines to use (left running); by default a local cluster of ``ranks`` engines is
        started (under MPI with ``engines="mpi"``) and stopped at the end.
    return_sums : bool
        Return the last phase's combined sums in :attr:`RunResult.sums` (tests).

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError, InputError, ResourceError
        Bad options or input, not enough memory, disc, devices or engines (a clear message).
    RankError
        A rank died, stopped answering, or failed (naming its rank, engine, pid and host).
    """
    return _Run(config, progress, stop_event, client, return_sums).run()


async def run_class2d_async(config, *, progress=None, stop_event=None, client=None,
                            return_sums: bool = False) -> RunResult:
    """:func:`run_class2d` for an event loop (a notebook): the run goes on in a thread.

    Progress events are delivered on the calling loop. Cancelling the awaiting task sets the
    stop event and waits for the run to end cleanly.
    """
    return await run_blocking(
        functools.partial(run_class2d, config, client=client, return_sums=return_sums),
        progress, stop_event)

