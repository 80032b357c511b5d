"""All-ranks jobs on ranks: template autopicking and particle extraction.

:func:`run_autopick` (RELION's ``mpirun -n N relion_autopick_mpi``) and :func:`run_extract`
(``relion_preprocess_mpi --extract``) are the entry points of the CLI, the notebook panels and
the sweeps; both return an :class:`AllRanksResult`.

Roles
    Every rank works (no leader): rank ``r`` of ``N`` takes the contiguous block of
    micrographs ``divide_equally(n, N, r)`` (RELION's: the first ``n % N`` ranks get one
    more), fixed at the start, and processes it with ``--j`` threads. Ranks do not talk to
    each other. This process collects each micrograph's result as it is done and, once every
    rank has finished, writes the job's lists (``<odir><pickname>.star`` and
    ``<odir>summary.star``; the particles STAR file) exactly once.
Ranks
    ``--ranks 1`` runs in this process. More ranks run on ipyparallel engines: started here
    (``--engines local``, or ``mpi`` for engines under ``mpiexec``, ordered by MPI rank), or
    those of a running cluster (``--engines attach``, or ``client=``), as for
    :func:`cryonb.parallel.run_class2d` (:class:`~cryonb.parallel._session.RankSession`).
Devices
    Autopicking: ONE device per rank, the first of its ``--gpu`` group, groups reused
    cyclically when there are fewer than ranks (:func:`autopick_device_map`; RELION reads
    past the last group); each engine is pinned to its device (``CUDA_VISIBLE_DEVICES`` by
    UUID-checked index) before its first CUDA call, and its ``--j`` threads share it, each with
    its own CUDA stream. Without a GPU, or with ``--cpu``, the same ranks and threads run on
    the CPU; there, only the automatic ``--gpu`` (empty) is valid. Extraction runs on the CPU.
Waiting
    Ranks answer at least every second with a heartbeat (busy threads, micrographs left, CPU,
    memory and GPU load). A rank whose process is gone, that does not answer, or that finishes
    no micrograph for ``--timeout`` seconds stops the run with a
    :class:`~cryonb.parallel.RankError` naming its rank, engine, pid and host.
Stopping
    ``stop_event.set()``: ranks start no more micrographs; those being processed finish (their
    files are on disc, so ``--only_do_unfinished`` continues the job); the lists are not
    written.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from . import _engine, hardware
from ._errors import from_record
from ._ranktask import RankTask
from ._session import TICK, LocalRank, Rank, RankSession
from .devices import DeviceMap, resolve_device_map
from .stats import IterationStats, RankInfo, RankTimes, RunStats, emit

__all__ = ["AllRanksResult", "autopick_device_map", "run_autopick", "run_extract"]

_STAGE = {"autopick": "pick", "extract": "extract"}
_FOUND = {"autopick": "picks", "extract": "particles"}


@dataclass
class AllRanksResult:
    """What an all-ranks job did, and the job's own result.

    Attributes
    ----------
    job : {"autopick", "extract"}
    result : AutopickResult, ExtractResult or None
        :class:`cryonb.pick.AutopickResult` (micrographs, coordinate list, summary) or
        :class:`cryonb.pick.ExtractResult` (particles STAR file, stacks); ``None`` when
        stopped.
    stopped : bool
        Ended by ``stop_event``: the micrographs done have their files, the lists were not
        written.
    stats : RunStats
        One phase (iteration 1) with stages ``pick``/``extract`` and ``write``, and per rank
        the micrographs done, their compute time and the rank's wall time; ``unit`` is
        ``"micrographs"``.
    ranks : list of RankInfo
        Every rank (all ``"worker"``), with its device (one, or none on the CPU).
    split : dict of int to (int, int)
        The micrographs ``first <= i < stop`` of each rank.
    device_table : str
        The resolved ``--gpu`` map (with device UUIDs when known) and its warnings (empty
        for extraction).
    device_map : dict
        ``{"<rank>": [device]}`` (``[]`` on the CPU).
    gpu : bool
    engines : str
        ``inprocess``, ``local``, ``mpi``, ``attach`` or ``attach (mpi)``.
    warnings : list of str
    seconds : float
        The whole run, starting the engines included.
    """

    job: str
    result: Any
    stopped: bool
    stats: RunStats
    ranks: list
    split: dict
    device_table: str
    device_map: dict
    gpu: bool
    engines: str
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines: what was found and where, how long each rank took."""
        r = self.result
        if r is None:
            head = f"{self.job} stopped after {self.seconds:.1f} s"
        elif self.job == "autopick":
            head = (f"{r.n_picks} particles picked on {len(r.micrographs)} micrographs in "
                    f"{self.seconds:.1f} s: {r.coordinate_list}")
        else:
            head = (f"{r.n_particles} particles from {len(r.stacks)} micrographs in "
                    f"{self.seconds:.1f} s: {r.particles_star}")
        return "\n".join([head, self.stats.table()])


def autopick_device_map(config, n_devices: int, hosts: dict | None = None) -> DeviceMap:
    """The device of every rank of an autopicking job, as :func:`run_autopick` resolves it.

    Parameters
    ----------
    config : AutopickConfig
        ``gpu`` (``None``/``""``: automatic, rank ``r`` on device ``r % n_devices``), ``ranks``,
        ``j``.
    n_devices : int
        Devices visible to every rank (0: CPU; then only the automatic string is valid).
    hosts : dict of int to str, optional
        Host of each rank (device indices are per host).

    Returns
    -------
    DeviceMap
        ``job="autopick"``: each rank's one device (the first of its group, groups reused
        cyclically), and the warnings (devices shared by several ranks, unused groups).

    Raises
    ------
    GpuSpecError
        A malformed string, or a device id >= ``n_devices``.
    """
    return resolve_device_map(config.gpu, config.ranks, config.j, n_devices=n_devices,
                              job="autopick", hosts=hosts)


class _AllRanksRun(RankSession):
    """One run of :func:`run_autopick` or :func:`run_extract` (the driver: this process)."""

    device_job = "autopick"

    def __init__(self, job: str, config, progress, stop_event, client):
        from ..pick import AutopickConfig, ExtractConfig

        cls = AutopickConfig if job == "autopick" else ExtractConfig
        if not isinstance(config, cls):
            raise ConfigError(f"run_{job} needs a {cls.__name__}, not {type(config).__name__}")
        config = config.validate()
        if not config.i:
            raise ConfigError("--i (micrographs STAR file) is required")
        if job == "autopick" and not config.ref:
            raise ConfigError("--ref is required: 2D references (an MRC stack or a STAR file)")
        super().__init__(config, progress, stop_event, client)
        self.job = job
        self.stage = _STAGE[job]
        self.stats = RunStats(unit="micrographs")
        self.split: dict[int, tuple[int, int]] = {}
        self.total = 0
        self._local_blas = None

    # -------------------------------------------------------------- set-up
    def _n_devices(self, probes: dict | None) -> int:
        """Devices for the ranks (0: CPU); ``probes`` by rank, ``None`` in-process."""
        if self.job == "extract":
            if self.cfg.gpu:
                self.warnings.append(f"--gpu {self.cfg.gpu} is ignored: extraction runs on "
                                     "the CPU")
            return 0
        return self._local_devices() if probes is None else self._engine_devices(probes)

    def _device_map(self, n_devices: int, infos: list[RankInfo]) -> DeviceMap:
        """Resolve ``--gpu`` (extraction: no device) and give each rank its device."""
        hosts = {i.rank: i.host for i in infos}
        if self.job == "extract":
            return resolve_device_map(None, self.cfg.ranks, self.cfg.j, n_devices=0,
                                      job="autopick", hosts=hosts)
        dmap = autopick_device_map(self.cfg, n_devices, hosts)
        for i in infos:
            i.devices = list(dmap.devices_of(i.rank))
        return dmap

    def _device_report(self, dmap) -> None:
        super()._device_report(dmap)
        if self.job == "extract":  # no devices: the table would only say "cpu"
            self.device_table = ""

    def _setup(self) -> None:
        if self.cfg.ranks == 1:
            self._setup_inprocess()
        else:
            self._setup_engines()
        emit(self.progress, "setup", job=self.job, ranks=[r.info.to_dict() for r in self.ranks],
             device_table=self.device_table, engines=self.engines, gpu=self.gpu,
             warnings=list(self.warnings), n_micrographs=self.total,
             split={r: list(v) for r, v in self.split.items()}, n_particles=self.total,
             iterations=1, first_iteration=0, pool=1, pool_memory=0, io_mode="parallel",
             combine="none")

    def _setup_inprocess(self) -> None:
        cfg = self.cfg
        self._inprocess_note()
        proc = hardware.describe_process()
        info = RankInfo(0, "worker", proc["host"], proc["pid"], threads=cfg.j)
        dmap = self._device_map(self._n_devices(None), [info])
        self._device_names(info, proc["devices"])
        self._local_blas = self._local_blas_limit(cfg.j, proc)
        task = RankTask(self.job, 0, 1, cfg, device=info.devices[0] if info.devices else None,
                        threads=cfg.j, uuids=info.uuids)
        self.ranks = [LocalRank(info, {"task": task})]
        self._device_report(dmap)
        self._opened([task.info()])

    def _setup_engines(self) -> None:
        cfg = self.cfg
        chosen = self._start_engines()
        ranks = [self._engine_rank(r, e, p, "worker", cfg.j) for r, (e, p) in enumerate(chosen)]
        self.ranks = list(ranks)
        probes = {r: p for r, (_, p) in enumerate(chosen)}
        dmap = self._device_map(self._n_devices(probes), [r.info for r in ranks])
        for r in ranks:
            self._device_names(r.info, probes[r.rank]["devices"])
        self._device_report(dmap)
        per_host = Counter(r.info.host for r in ranks)
        cwd = os.getcwd()
        opened = self._wait_all([(r, r.run_async(
            _engine.open_task, self.run_id, self.job, r.rank, cfg.ranks, cfg,
            devices=r.info.devices, threads=cfg.j, cwd=cwd,
            blas_threads=max(1, probes[r.rank]["cores"] // (per_host[r.info.host] * cfg.j))))
            for r in ranks], "starting the ranks")
        for r, out in zip(ranks, opened):
            self._confirm_devices(r.info, out["uuids"])
        if self.gpu:  # the table again, with the devices CUDA itself reported
            self._device_report(dmap)
        self._opened(opened)

    def _opened(self, infos: list[dict]) -> None:
        totals = {i["total"] for i in infos}
        if len(totals) != 1:
            raise InputError(f"the ranks see different numbers of micrographs "
                             f"({sorted(totals)}): do all hosts see the same files?", self.cfg.i)
        self.total = totals.pop()
        self.split = {i["rank"]: (i["first"], i["stop"]) for i in infos}

    # -------------------------------------------------------------- the work
    def _output_folders(self) -> None:
        """Make the output folders and check them, before any micrograph is worked on (and
        after the options and devices were checked, so that a refused run leaves none)."""
        from ..io import output_folder

        cfg = self.cfg
        if self.job == "autopick":
            output_folder(cfg.odir or ".", f"--odir {cfg.odir}")
            return
        output_folder(cfg.part_dir or ".", f"--part_dir {cfg.part_dir}")
        if cfg.part_star:
            output_folder(Path(cfg.part_star).parent, f"--part_star {cfg.part_star}")

    def _collect(self) -> tuple[list, dict, bool]:
        """Poll the ranks until all have finished: the items, each rank's times, stopped."""
        what = "picking" if self.job == "autopick" else "extracting"
        found = _FOUND[self.job]
        pending: dict[Rank, cf.Future] = {}
        sent_at: dict[Rank, float] = {}
        times: dict[int, dict] = {}
        last_progress = dict.fromkeys(self.ranks, time.monotonic())
        busy: dict[Rank, list] = {r: [] for r in self.ranks}
        items: list = []
        stopping = False
        while len(times) < len(self.ranks):
            for r in self.ranks:
                if r.rank not in times and r not in pending:
                    pending[r] = r.call_async("task", "exchange", self.wait_s)
                    sent_at[r] = time.monotonic()
            cf.wait(list(pending.values()), timeout=TICK, return_when=cf.FIRST_COMPLETED)
            for r, fut in list(pending.items()):
                if not fut.done():
                    continue
                del pending[r]
                reply = self._get(r, fut, what)
                for it in reply["items"]:
                    items.append(it["data"])
                    last_progress[r] = time.monotonic()
                    emit(self.progress, "pool", iteration=1, rank=r.rank, thread=it["thread"],
                         n=1, done=len(items), total=self.total, index=it["index"],
                         read_s=0.0, compute_s=it["seconds"], **{found: it["found"]})
                busy[r] = reply["heartbeat"]["busy"]
                self._heartbeat(r, reply["heartbeat"])
                if reply["error"] is not None:
                    raise from_record(reply["error"], r.info.label(), r.rank, r.info.host)
                if reply["finished"]:
                    times[r.rank] = reply["times"]
            if self.stop_event.is_set() and not stopping:
                stopping = True
                emit(self.progress, "stage", iteration=1, stage="stop", state="start")
                self._wait_all([(r, r.call_async("task", "stop")) for r in self.ranks
                                if r.rank not in times], "stopping")
            for r in pending:
                self._check_answering(r, sent_at[r], what)
            for r in self.ranks:
                if r.rank not in times:
                    self._check_progress(r, last_progress[r], "micrograph", [
                        f"thread {t}: micrograph {i + 1} for {s:.0f} s" for t, i, s in busy[r]])
        return items, times, stopping

    def _finish(self, items: list, t0: float):
        if self.job == "autopick":
            from ..pick.autopick import autopick_result

            return autopick_result(self.cfg, items, t0)
        from ..pick.extract import extract_result

        return extract_result(self.cfg, items, t0)

    @staticmethod
    def _files(job: str, result) -> dict:
        if job == "autopick":
            return {"coordinates": str(result.coordinate_list), "summary": str(result.summary)}
        return {"particles": str(result.particles_star)}

    # -------------------------------------------------------------- the whole run
    def run(self) -> AllRanksResult:
        t_start = time.perf_counter()
        t0 = time.monotonic()
        try:
            self._setup()
            self._output_folders()
            t1 = time.monotonic()
            self.stats.setup_s = t1 - t0
            emit(self.progress, "stage", iteration=1, stage=self.stage, state="start")
            items, times, stopped = self._collect()
            t2 = time.monotonic()
            emit(self.progress, "stage", iteration=1, stage=self.stage, state="end",
                 seconds=t2 - t1)
            result = None
            if not stopped:
                emit(self.progress, "stage", iteration=1, stage="write", state="start")
                result = self._finish(items, t_start)
            t3 = time.monotonic()
            if not stopped:
                emit(self.progress, "stage", iteration=1, stage="write", state="end",
                     seconds=t3 - t2)
        finally:
            self._close_ranks()
            if self._local_blas is not None:
                self._local_blas.restore_original_limits()
            self._stop_cluster()
        st = IterationStats(1, {self.stage: t2 - t1, "write": t3 - t2},
                            {r: RankTimes(r, **t) for r, t in sorted(times.items())}, t3 - t1,
                            len(items))
        self.stats.iterations.append(st)
        if result is not None:
            n = result.n_picks if self.job == "autopick" else result.n_particles
            emit(self.progress, "iteration", iteration=1, stats=st.to_dict(),
                 summary={f"n_{_FOUND[self.job]}": n}, history={"iteration": 1},
                 files=self._files(self.job, result))
        emit(self.progress, "done", iteration=0 if stopped else 1, stopped=stopped, classes="")
        return AllRanksResult(
            job=self.job, result=result, stopped=stopped, stats=self.stats,
            ranks=[r.info for r in self.ranks], split=dict(self.split),
            device_table=self.device_table, device_map=self.device_map, gpu=self.gpu,
            engines=self.engines, warnings=self.warnings,
            seconds=time.perf_counter() - t_start)


# ------------------------------------------------------------------------------ public API
def run_autopick(config, *, progress=None, stop_event: threading.Event | None = None,
                 client=None) -> AllRanksResult:
    """Pick particles on every rank: micrographs split statically, one device per rank.

    Parameters
    ----------
    config : AutopickConfig
        ``ranks`` (1: this process; more: ipyparallel engines), ``j`` (threads per rank),
        ``gpu``/``cpu``, ``engines``, ``cluster_id``/``profile``, ``timeout`` and the picking
        options.
    progress : callable, optional
        Called with one dict per event (:mod:`cryonb.parallel.stats`): ``setup``, ``stage``,
        ``pool`` (one per micrograph), ``heartbeat``, ``iteration``, ``done``.
    stop_event : threading.Event, optional
        Set it to start no more micrographs; those being picked finish.
    client : ipyparallel.Client, ipyparallel.Cluster or ClusterHandle, optional
        Engines to use (left running); by default a local cluster of ``ranks`` engines is
        started (under MPI with ``engines="mpi"``) and stopped at the end.

    Returns
    -------
    AllRanksResult
        ``result`` is the :class:`cryonb.pick.AutopickResult` (``None`` when stopped): one
        coordinate file per micrograph, written by the rank that picked it, and
        ``<odir><pickname>.star`` and ``<odir>summary.star``, written here once all ranks have
        finished. The picks do not depend on ranks, threads or devices (micrograph ``i`` is
        seeded with ``random_seed + i``).

    Raises
    ------
    ConfigError, GpuSpecError, InputError, ResourceError
        Bad options (a non-empty ``--gpu`` without GPUs) or input, no engines or devices.
    RankError
        A rank died, stopped answering, or failed (naming its rank, engine, pid and host).
    """
    return _AllRanksRun("autopick", config, progress, stop_event, client).run()


def run_extract(config, *, progress=None, stop_event: threading.Event | None = None,
                client=None) -> AllRanksResult:
    """Extract particles on every rank: micrographs split statically, on the CPU.

    Parameters are those of :func:`run_autopick`, with an
    :class:`~cryonb.pick.ExtractConfig`.

    Returns
    -------
    AllRanksResult
        ``result`` is the :class:`cryonb.pick.ExtractResult` (``None`` when stopped): each
        rank writes the stacks of its micrographs; the particles STAR file is written here,
        in micrograph order, once all ranks have finished.
    """
    return _AllRanksRun("extract", config, progress, stop_event, client).run()
