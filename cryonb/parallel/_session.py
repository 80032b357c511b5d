"""What every job on ranks does from the driving process: rank handles, bounded waits, the
cluster, the device report, closing.

Both kinds of job build on :class:`RankSession`: the leader/worker 2D classification
(:mod:`cryonb.parallel.runtime`) and the all-ranks jobs, autopicking and extraction
(:mod:`cryonb.parallel.autopick`). A rank is this process (:class:`LocalRank`, a run of one
rank) or an ipyparallel engine (:class:`EngineRank`); every wait on a rank is bounded by
``--timeout`` and names the rank (engine, pid, host) that died, failed or stayed silent.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time
import uuid

from ..errors import ConfigError, ResourceError
from . import _engine, hardware
from ._errors import RankError, from_remote
from .cluster import ClusterHandle, connect_cluster, start_cluster
from .devices import Job, resolve_device_map
from .stats import RankInfo, emit

__all__ = ["HEARTBEAT_EVERY", "TICK", "EngineRank", "LocalRank", "Rank", "RankSession",
           "quietly"]

TICK = 1.0  # seconds between liveness checks; working ranks answer at least this often
HEARTBEAT_EVERY = 2.0  # seconds between heartbeat events of one rank


# ------------------------------------------------------------------------------ rank handles
class Rank:
    """This process's handle on one rank."""

    def __init__(self, info: RankInfo):
        self.info = info

    @property
    def rank(self) -> int:
        return self.info.rank

    def call_async(self, role: str, method: str, *args, **kwargs) -> cf.Future:
        """Call ``method`` of the rank's ``role`` object (see :func:`_engine.call`)."""
        raise NotImplementedError

    def alive(self) -> bool:
        return True


class LocalRank(Rank):
    """The calling process as the only rank of a run (``objects``: role -> object)."""

    def __init__(self, info: RankInfo, objects: dict):
        super().__init__(info)
        self.objects = objects
        self._pool = cf.ThreadPoolExecutor(2, thread_name_prefix="cryonb-rank0")

    def call_async(self, role, method, *args, **kwargs):
        return self._pool.submit(getattr(self.objects[role], method), *args, **kwargs)

    def close(self) -> None:
        """Close the rank's objects and its call threads."""
        for obj in self.objects.values():
            quietly(obj.close)
        self._pool.shutdown(wait=False)


class EngineRank(Rank):
    """An ipyparallel engine as a rank."""

    def __init__(self, info: RankInfo, client, run_id: str):
        super().__init__(info)
        self.client = client
        self.view = client[info.engine]
        self.run_id = run_id
        self._local = info.host == socket.gethostname()

    def run_async(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the engine."""
        return self.view.apply_async(fn, *args, **kwargs)

    def call_async(self, role, method, *args, **kwargs):
        return self.view.apply_async(_engine.call, self.run_id, role, method, *args, **kwargs)

    def alive(self) -> bool:
        if self._local:
            import psutil

            if not psutil.pid_exists(self.info.pid):
                return False
        try:
            return self.info.engine in self.client.ids
        except Exception:  # pragma: no cover  (client shutting down)
            return True


def quietly(fn) -> None:
    """``fn()``, ignoring any error (clean-up that must not hide the run's own error)."""
    try:
        fn()
    except Exception:
        pass


# ------------------------------------------------------------------------------ the session
class RankSession:
    """The driving process's side of one run on ranks.

    Parameters
    ----------
    config : JobConfig
        Validated; ``ranks``, ``j``, ``gpu``/``cpu``, ``engines``, ``cluster_id``,
        ``profile`` and ``timeout`` are read here.
    progress : callable or None
        Receives the progress events (:mod:`cryonb.parallel.stats`).
    stop_event : threading.Event or None
    client : ipyparallel.Client, ipyparallel.Cluster or ClusterHandle, optional
        Engines to use (left running).

    Attributes
    ----------
    device_job : {"refine", "autopick"}
        How ``--gpu`` is read (:func:`~cryonb.parallel.devices.resolve_device_map`).
    ranks : list of Rank
        In rank order.
    engines : str
        ``inprocess``, ``local``, ``mpi``, ``attach`` or ``attach (mpi)``.
    """

    device_job: Job = "refine"

    def __init__(self, config, progress, stop_event, client):
        self.cfg = config
        self.progress = progress
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.client_arg = client
        self.run_id = uuid.uuid4().hex[:12]
        self.timeout = float(config.timeout)
        self.wait_s = min(TICK, self.timeout / 10)
        self.warnings: list[str] = []
        self.handle: ClusterHandle | None = None
        self.owned = False
        self.ranks: list[Rank] = []
        self.mpi = False
        self.engines = "inprocess"
        self.gpu = False
        self.device_table = ""
        self.device_map: dict = {}
        self._map_warnings: list[str] = []
        self._beats: dict[int, float] = {}  # rank -> when its last heartbeat was emitted

    # -------------------------------------------------------------- waiting
    def _get(self, rank: Rank, fut, what: str):
        try:
            return fut.result()
        except Exception as exc:
            err = from_remote(exc, rank.info.label(), what, rank.rank, rank.info.host)
            if err is exc:
                raise
            raise err from None

    def _wait_all(self, pairs: list[tuple], what: str, timeout: float | None = None) -> list:
        """Wait for ``[(rank, future), ...]``; a dead rank or the timeout raises."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        futs = [f for _, f in pairs]
        while True:
            done, rest = cf.wait(futs, timeout=TICK, return_when=cf.FIRST_EXCEPTION)
            for rank, f in pairs:  # failures first, named by rank
                if f in done and f.exception() is not None:
                    self._get(rank, f, what)
            if not rest:
                return [self._get(rank, f, what) for rank, f in pairs]
            for rank, f in pairs:
                if f in rest and not rank.alive():
                    raise RankError(f"{rank.info.label()} died during {what}", rank.rank,
                                    rank.info.host)
            if time.monotonic() > deadline:
                late = [rank for rank, f in pairs if f in rest]
                raise RankError(f"{', '.join(r.info.label() for r in late)} did not finish "
                                f"{what} within "
                                f"{self.timeout if timeout is None else timeout:.0f} s "
                                "(--timeout)", late[0].rank, late[0].info.host)

    def _wait(self, rank: Rank, fut, what: str, timeout: float | None = None):
        return self._wait_all([(rank, fut)], what, timeout)[0]

    def _check_answering(self, rank: Rank, sent_at: float, what: str) -> None:
        """Raise if ``rank`` died, or has not answered a call sent at ``sent_at`` in time."""
        if not rank.alive():
            raise RankError(f"{rank.info.label()} died during {what}", rank.rank, rank.info.host)
        waited = time.monotonic() - sent_at
        if waited > self.wait_s + self.timeout:
            raise RankError(f"{rank.info.label()} has not answered for {waited:.0f} s "
                            f"(--timeout {self.timeout:.0f})", rank.rank, rank.info.host)

    def _check_progress(self, rank: Rank, last: float, unit: str, busy: list[str]) -> None:
        """Raise if ``rank``, with work to do, finished no ``unit`` since ``last``.

        ``busy`` describes its busy threads (``"thread 0: ... for 12 s"``).
        """
        idle = time.monotonic() - last
        if idle > self.timeout:
            raise RankError(f"{rank.info.label()} finished no {unit} for {idle:.0f} s "
                            f"(--timeout {self.timeout:.0f}; "
                            f"{', '.join(busy) or 'no thread busy'})", rank.rank, rank.info.host)

    def _heartbeat(self, rank: Rank, beat: dict) -> None:
        """Emit ``rank``'s heartbeat ``beat`` (its own keys), at most every
        :data:`HEARTBEAT_EVERY` seconds per rank."""
        now = time.monotonic()
        last = self._beats.get(rank.rank)
        if last is not None and now - last < HEARTBEAT_EVERY:
            return
        self._beats[rank.rank] = now
        emit(self.progress, "heartbeat", rank=rank.rank, host=rank.info.host,
             **{k: v for k, v in beat.items() if k not in ("rank", "time")})

    def _inprocess_note(self) -> None:
        """A run of one rank uses this process: say so if engines were asked for."""
        if self.cfg.engines not in ("auto", "inprocess"):
            self.warnings.append(f"--engines {self.cfg.engines} with --ranks 1: the run uses "
                                 "this process (no engines)")

    # -------------------------------------------------------------- the cluster
    def _connect(self) -> ClusterHandle:
        """The cluster: given, started here, or attached to."""
        import ipyparallel as ipp

        cfg = self.cfg
        c = self.client_arg
        if c is not None:
            self.engines = "attach"
            if isinstance(c, ClusterHandle):
                return ClusterHandle(c.client)
            if isinstance(c, ipp.Cluster):
                return ClusterHandle(c.connect_client_sync())
            if isinstance(c, ipp.Client):
                return ClusterHandle(c)
            raise ConfigError(f"client must be an ipyparallel Client or Cluster, not "
                              f"{type(c).__name__}")
        if cfg.engines == "inprocess":
            raise ConfigError(f"--engines inprocess runs one rank, but --ranks {cfg.ranks} was "
                              "asked for: use --engines local or mpi, or --ranks 1")
        if cfg.engines == "attach":
            self.engines = "attach"
            return connect_cluster(cfg.cluster_id, cfg.profile, n=cfg.ranks,
                                   timeout=min(self.timeout, 120.0))
        kind = "mpi" if cfg.engines == "mpi" else "local"
        self.engines = kind
        emit(self.progress, "stage", iteration=0, stage="cluster", state="start")
        t0 = time.monotonic()
        handle = start_cluster(cfg.ranks, kind, timeout=max(120.0, min(self.timeout, 600.0)))
        emit(self.progress, "stage", iteration=0, stage="cluster", state="end",
             seconds=time.monotonic() - t0)
        self.owned = True
        return handle

    def _start_engines(self) -> list[tuple[int, dict]]:
        """Connect, ask every engine who it is, choose ``--ranks`` of them.

        Returns
        -------
        list of (int, dict)
            Engine id and :func:`~cryonb.parallel.hardware.describe_process` of each rank, in
            rank order (MPI world order under MPI, else engine ids in order).
        """
        cfg = self.cfg
        self.handle = self._connect()
        client = self.handle.client
        eids = self.handle.engine_ids
        if len(eids) < cfg.ranks:
            raise ResourceError(f"--ranks {cfg.ranks} needs {cfg.ranks} engines but the cluster "
                                f"has {len(eids)}")
        # ask every engine who it is (never assume ids follow launch order)
        tmp = [EngineRank(RankInfo(-1, "?", "?", 0, engine=e), client, self.run_id)
               for e in eids]
        probes = dict(zip(eids, self._wait_all(
            [(t, t.run_async(_engine.probe)) for t in tmp], "start-up", timeout=120.0)))
        worlds = [p["mpi"] for p in probes.values()]
        self.mpi = all(w is not None for w in worlds) and len({w[1] for w in worlds}) == 1
        if cfg.engines == "mpi" and not self.mpi:
            raise ConfigError("--engines mpi: the engines were not started under MPI")
        if self.mpi and self.engines == "attach":
            self.engines = "attach (mpi)"
        order = sorted(eids, key=(lambda e: probes[e]["mpi"][0]) if self.mpi else None)
        return [(e, probes[e]) for e in order[: cfg.ranks]]

    def _engine_rank(self, rank: int, engine: int, probe: dict, role: str,
                     threads: int) -> EngineRank:
        """The handle on engine ``engine`` as ``rank``."""
        info = RankInfo(rank, role, probe["host"], probe["pid"], engine=engine,
                        mpi_rank=probe["mpi"][0] if probe["mpi"] else None, threads=threads)
        assert self.handle is not None, "_start_engines() first"
        return EngineRank(info, self.handle.client, self.run_id)

    # -------------------------------------------------------------- devices
    def _local_devices(self) -> int:
        """Devices this process would use (0: the CPU path), for a run of one rank.

        A non-empty ``--gpu`` without a usable GPU raises (naming the string); an empty one
        is a warning.
        """
        from ..backend import device_count, gpu_available

        cfg = self.cfg
        self.gpu = not cfg.cpu and gpu_available()
        if cfg.gpu is not None and not cfg.cpu and not self.gpu:
            if cfg.gpu:  # raises, naming the string
                resolve_device_map(cfg.gpu, 1, cfg.j, n_devices=0, job=self.device_job)
            self.warnings.append("--gpu was given but no GPU is usable here: running on the CPU")
        return device_count() if self.gpu else 0

    def _engine_devices(self, probes: dict) -> int:
        """Devices visible to every working rank (0: the CPU path); ``probes`` by rank."""
        cfg = self.cfg
        if cfg.cpu:
            return 0
        counts = [len(p["devices"]) for p in probes.values()]
        no_cupy = [r for r, p in probes.items() if p["devices"] and not p["cupy"]]
        if no_cupy:
            msg = (f"GPUs are visible to rank(s) {no_cupy} but CuPy is not installed there "
                   "(pip install 'cryonb[gpu]')")
            if cfg.gpu:
                raise ResourceError(msg)
            self.warnings.append(msg + ": running on the CPU")
            return 0
        n = min(counts) if counts else 0
        if cfg.gpu is not None and n == 0 and not cfg.gpu:
            self.warnings.append("--gpu was given but the workers see no GPU: running on the CPU")
        self.gpu = n > 0
        return n

    @staticmethod
    def _device_names(info: RankInfo, visible: list[dict]) -> None:
        info.uuids = [visible[d]["uuid"] if d < len(visible) else "?" for d in info.devices]
        info.names = [visible[d]["name"] if d < len(visible) else "?" for d in info.devices]

    def _confirm_devices(self, info: RankInfo, uuids: list[str]) -> None:
        """Keep the UUIDs CUDA reported after pinning; say so where NVML meant another GPU."""
        if not uuids:
            return
        for t, (want, got) in enumerate(zip(info.uuids, uuids)):
            if got != "?" and want not in ("?", got):
                self.warnings.append(f"{info.label()} thread {t}: CUDA drives {got}, the "
                                     f"device map meant {want} (check CUDA_DEVICE_ORDER)")
        info.uuids = [g if g != "?" else w for w, g in zip(info.uuids, uuids)]

    def _device_report(self, dmap) -> None:
        uuids, names = {}, {}
        for r in self.ranks:
            for d, u, n in zip(r.info.devices, r.info.uuids, r.info.names):
                uuids[(r.rank, d)] = u
                names[(r.rank, d)] = n
        hosts = {r.rank: r.info.host for r in self.ranks}
        self.device_table = dmap.format_table(uuids=uuids or None, names=names or None,
                                              hosts=hosts)
        self.device_map = dmap.to_json_dict()
        self.warnings = [w for w in self.warnings if w not in self._map_warnings]
        self._map_warnings = [ln[len("warning: "):] for ln in self.device_table.splitlines()
                              if ln.startswith("warning: ")]
        self.warnings += self._map_warnings

    @staticmethod
    def _local_blas_limit(threads: int, proc: dict):
        """Limit this process's BLAS threads to its share of the cores (``--j`` threads)."""
        return hardware.limit_blas_threads(max(1, proc["cores"] // threads))

    # -------------------------------------------------------------- closing
    def _close_ranks(self) -> None:
        """End the run's objects on every rank (engines that still live, this process)."""
        engine_ranks = [r for r in self.ranks if isinstance(r, EngineRank)]
        if engine_ranks:
            calls = [(r, r.run_async(_engine.close_run, self.run_id)) for r in engine_ranks
                     if r.alive()]
            quietly(lambda: self._wait_all(calls, "closing the run", timeout=30.0))
        for r in self.ranks:
            if isinstance(r, LocalRank):
                r.close()

    def _stop_cluster(self) -> None:
        """Stop the engines if they were started for this run."""
        if self.handle is not None and self.owned:
            self.handle.stop()
