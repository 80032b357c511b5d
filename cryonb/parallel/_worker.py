"""The working side of a rank: ``--j`` threads, each with its own E-step context and device.

A :class:`WorkerService` lives in the rank's process (an engine, or the calling process for a
run of one rank) for the whole run. Pools arrive through :meth:`WorkerService.exchange`; a
reader thread gets each pool's images (from the rank's :class:`~cryonb.parallel.images.
ImageSource`, with the task itself, or from the leader through MPI) up to ``--j`` pools ahead
of the computing threads, so that reading overlaps computing; each computing thread keeps its
own :class:`cryonb.em._estep.EStepContext` (on its own device and CUDA stream on a GPU) for the
iteration and accumulates the sums of the pools it processed. :meth:`WorkerService.finish`
adds the threads' sums in thread order. A GPU worker keeps the images it has seen on its
devices (:mod:`cryonb.parallel.resident`); its reader then reads only the others.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
import warnings

import numpy as np

from ..backend import fft_threads, pinned_empty
from ..errors import CryonbError, ResourceError
from .combine import mpi_send_sum, ordered_sum, write_rank_sum
from .hardware import device_memory
from .resident import PoolRows, ResidentImages, resident_capacity, resident_enabled

__all__ = ["WorkerService", "error_record"]

_STOP = object()
#: a GPU worker's reader puts each pool's images in pinned host memory, whose transfer to
#: the device is ~10x faster (H200: 524 MB in 0.010 s instead of 0.092 s), unless the pools
#: in flight (up to 3 --j + 1: queued, computed, prefetched, being read) would take more
PINNED_BUDGET_BYTES = 4 * 2**30


def error_record(exc: BaseException, **where) -> dict:
    """An exception as plain data (type, message, traceback, whether it is a user error)."""
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
            "cryonb": isinstance(exc, CryonbError), **where}


class WorkerService:
    """A rank's threads, queues and E-step contexts.

    Parameters
    ----------
    rank : int
    config : Class2DConfig
    setup : dict
        From the leader: ``N``, ``pixel_size``, ``n_optics``, ``n_groups``, ``mask_radius_px``.
    threads : int
        ``--j``.
    devices : sequence of int, optional
        CUDA device (this process's numbering) of each thread; ``None`` for the CPU path.
    source : ImageSource, optional
        Where the reader gets images when a task brings none.
    comm : mpi4py communicator, optional
        For images sent by the leader (``leader`` I/O mode under MPI) and MPI sums.
    timeout : float
        Seconds to wait for the leader's images before giving up.
    fft_threads : int
        Threads of each compute thread's host FFTs (``scipy.fft``): its share of the cores,
        the same as its BLAS threads.
    """

    def __init__(self, *, rank: int, config, setup: dict, threads: int, devices=None,
                 source=None, comm=None, timeout: float = 600.0, fft_threads: int = 1):
        self.rank = rank
        #: host FFT threads of each compute thread (its share of the cores, as for BLAS)
        self.fft_threads = max(1, int(fft_threads))
        self.config = config
        self.setup = dict(setup)
        #: GPU: each device's store of images (None: none could be made), made after the
        #: device's first pool (setup's ``n``: the run's particles; ``resident_share``: this
        #: rank's part of the card)
        self._resident: dict = {}
        self._resident_lock = threading.Lock()
        self._pinned_failed = False  # the host refused page-locked memory once: no more tries
        self.threads = int(threads)
        self.devices = list(devices) if devices else None
        self._use_resident = bool(self.devices and self.setup.get("n") and resident_enabled())
        self.source = source
        self.comm = comm
        self.timeout = float(timeout)
        self._tasks: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue(maxsize=self.threads)
        self._results: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._gen = 0
        self._phase: tuple | None = None
        self._ctx: list = [None] * self.threads
        self._streams: list = [None] * self.threads
        self._busy: list = [None] * self.threads
        self._inflight = 0
        self._stats = self._new_stats()
        self._mask = None
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name=f"cryonb-r{rank}-reader",
                                        daemon=True)
        self._workers = [threading.Thread(target=self._compute_loop, args=(t,), daemon=True,
                                          name=f"cryonb-r{rank}-t{t}")
                         for t in range(self.threads)]
        self._reader.start()
        for w in self._workers:
            w.start()

    # ------------------------------------------------------------------ phases
    @staticmethod
    def _new_stats() -> dict:
        return {"particles": 0, "pools": 0, "stored": 0, "read_s": 0.0, "compute_s": 0.0,
                "t_first": None, "t_last": None}

    def begin(self, kind: str, model=None, iteration: int = 0) -> None:
        """Start a phase: ``"init"`` (initial pass) or ``"estep"`` with the broadcast model."""
        if kind not in ("init", "estep"):
            raise ValueError(f"unknown phase {kind!r}")
        self.abort()
        with self._lock:
            self._gen += 1
            self._phase = (kind, model, int(iteration))
            self._ctx = [None] * self.threads
            self._stats = self._new_stats()
        if self.source is not None:
            self.source.reset_counts()

    def begin_bcast(self, kind: str, iteration: int) -> None:
        """:meth:`begin` with the model broadcast by the leader through MPI."""
        model = self.comm.bcast(None, root=0)
        self.begin(kind, model, iteration)

    def exchange(self, tasks: list[dict], wait_s: float) -> dict:
        """Queue ``tasks``; wait up to ``wait_s`` for finished pools; return them.

        Returns
        -------
        dict
            ``results``: list of dicts ``id``, ``thread``, ``n``, ``res`` (``(B, 10)`` float64
            per-particle results, ``None`` in the initial pass), ``read_s``, ``compute_s``; or
            ``id``, ``error`` (:func:`error_record`). ``heartbeat``: :meth:`heartbeat`.
        """
        with self._lock:
            gen = self._gen
            self._inflight += len(tasks)
        for t in tasks:
            self._tasks.put((gen, t))
        out = []
        with contextlib.suppress(queue.Empty):
            if self._inflight > 0:
                out.append(self._results.get(timeout=max(0.0, wait_s)))
            while True:
                out.append(self._results.get_nowait())
        out = [r for r in out if r.pop("gen") == gen]
        return {"results": out, "heartbeat": self.heartbeat()}

    def heartbeat(self) -> dict:
        """What the rank is doing now: busy threads, queued pools, memory."""
        now = time.monotonic()
        busy = [(t, b[1], round(now - b[2], 3)) for t, b in enumerate(list(self._busy)) if b]
        return {"rank": self.rank, "time": time.time(), "busy": busy,
                "queued": self._tasks.qsize() + self._ready.qsize(), "inflight": self._inflight,
                "memory": self.memory()}

    def memory(self) -> dict:
        """``rss`` (bytes) of this process, CuPy's pool on each device and, of that, the
        images stored on the devices (``resident``)."""
        import psutil

        out = {"rss": int(psutil.Process().memory_info().rss)}
        if self.devices:
            out["devices"] = device_memory(self.devices)
            out["resident"] = sum(st.nbytes for st in list(self._resident.values()) if st)
        return out

    def finish(self, target: str = "return", root: str = "", leader: int = 0):
        """End the phase: add the threads' sums in thread order and deliver them.

        Parameters
        ----------
        target : {"return", "disc", "mpi"}
            Return the vector, write it to ``<root>_it###_rank<r>.tmp``, or send it to rank
            ``leader`` through MPI.

        Returns
        -------
        (vector or None, dict)
            The summed vector (``None`` unless ``target="return"``) and this rank's times:
            ``particles``, ``pools``, ``stored`` (particles whose images were on the device
            already), ``read_s``, ``compute_s``, ``wall_s``, ``finish_s``, ``fallback``,
            ``memory``.
        """
        t0 = time.monotonic()
        self._wait_idle()
        kind, _, iteration = self._phase
        vectors = []
        for t in range(self.threads):
            ctx = self._ctx[t]
            if ctx is None:
                continue
            if kind == "estep":
                with self._device_scope(t, reuse=True):
                    vectors.append(ctx.finish().to_vector())  # one copy, device to host
            else:
                vectors.append(ctx.to_vector())
        total = ordered_sum(vectors, size=self._template_size(), own=True)
        self._ctx = [None] * self.threads
        s = self._stats
        if target == "disc":
            write_rank_sum(root, kind, iteration, self.rank, total)
        elif target == "mpi":
            mpi_send_sum(self.comm, total, root=leader)
        finish_s = time.monotonic() - t0
        times = {"particles": s["particles"], "pools": s["pools"], "stored": s["stored"],
                 "read_s": s["read_s"],
                 "compute_s": s["compute_s"],
                 "wall_s": (s["t_last"] - s["t_first"]) if s["t_first"] is not None else 0.0,
                 "finish_s": finish_s,
                 "fallback": self.source.reset_counts() if self.source is not None else 0,
                 "memory": self.memory()}
        return (total if target == "return" else None), times

    def abort(self, timeout: float | None = None) -> None:
        """Drop queued pools, wait for the pools being computed, forget the phase's sums."""
        with self._lock:
            self._gen += 1
        for q in (self._tasks, self._ready):
            with contextlib.suppress(queue.Empty):
                while True:
                    item = q.get_nowait()
                    if item is _STOP:  # pragma: no cover  (close() in progress)
                        q.put(item)
                        break
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while any(self._busy) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(queue.Empty):
            while True:
                self._results.get_nowait()
        with self._lock:
            self._inflight = 0
            self._ctx = [None] * self.threads

    def close(self) -> None:
        """Stop the threads and close the image source."""
        if self._closed:
            return
        self._closed = True
        self.abort(timeout=5.0)
        self._tasks.put((self._gen, _STOP))
        self._reader.join(timeout=5.0)
        for w in self._workers:
            w.join(timeout=5.0)
        if self.source is not None:
            self.source.close()
        for st in self._resident.values():
            if st is not None:
                st.release()
        self._resident.clear()
        if self.devices:
            from ..backend import release_device_memory

            release_device_memory(self.devices)

    # ------------------------------------------------------------------ internals
    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self._inflight > 0:
            if time.monotonic() > deadline:
                raise ResourceError(f"rank {self.rank}: {self._inflight} pools still unfinished "
                                    f"after {self.timeout:.0f} s")
            time.sleep(0.005)

    def _template_size(self) -> int:
        from ..em._model import Class2DSums
        from ..em._mstep import InitSums

        s, cfg = self.setup, self.config
        if self._phase[0] == "init":
            z = InitSums.zeros(cfg.K, s["N"], cfg.pad, s["n_optics"])
        else:
            z = Class2DSums.zeros(cfg.K, s["N"], cfg.pad, s["n_optics"], s["n_groups"])
        return z.to_vector().size

    @contextlib.contextmanager
    def _device_scope(self, t: int, reuse: bool = False):
        """Thread ``t``'s device and CUDA stream (nothing on the CPU)."""
        if not self.devices:
            yield
            return
        import cupy

        with cupy.cuda.Device(self.devices[t]):
            if reuse:
                stream = self._streams[t]
            else:
                stream = self._streams[t] = cupy.cuda.Stream(non_blocking=True)
            with stream:
                yield
                stream.synchronize()

    def _read_loop(self) -> None:
        while True:
            gen, task = self._tasks.get()
            if task is _STOP:
                for _ in range(self.threads):
                    self._ready.put((gen, _STOP, None, 0.0))
                return
            if gen != self._gen:
                continue
            t0 = time.monotonic()
            try:
                images = self._images(task)
            except BaseException as exc:
                self._done(gen, {"id": task["id"], "error": error_record(
                    exc, rank=self.rank, stage="read")}, None)
                continue
            self._ready.put((gen, task, images, time.monotonic() - t0))

    def _images(self, task: dict) -> np.ndarray:
        if task.get("images") is not None:
            images = task["images"]
        elif task.get("mpi_tag") is not None:
            return self._receive_images(task)
        elif self.source is None:
            raise ResourceError(f"rank {self.rank} has no way to read images")
        else:
            N = self.setup["N"]
            index = np.asarray(task["index"], np.int64)
            missing = self._missing(index)
            if missing is not None and not missing.all():  # only those not on the device
                host = None
                if missing.any():
                    buf = self._host_buffer((int(missing.sum()), N, N))
                    host = self.source.images(index[missing], out=buf)
                return PoolRows(index, missing, host)
            # straight into the pinned buffer where there is one (no intermediate copy)
            buf = self._host_buffer((len(index), N, N))
            return self.source.images(index, out=buf)
        buf = self._host_buffer(images.shape)
        if buf is None:
            return images
        np.copyto(buf, images, casting="same_kind")
        return buf

    def _missing(self, index: np.ndarray) -> np.ndarray | None:
        """Which particles of ``index`` some device of the rank does not store (bool, shape
        (B,)); None where nothing is stored (the CPU, the initial pass, no store yet)."""
        if not self._use_resident or self._phase is None or self._phase[0] != "estep":
            return None
        stores = [self._resident.get(d, False) for d in set(self.devices)]
        if not all(stores):  # a device without a store (yet): read every image
            return None
        missing = np.zeros(len(index), bool)
        for st in stores:
            missing |= st.missing(index)
        return missing

    def _keep_resident(self, t: int, index, images) -> None:
        """Store the pool's device images ``images`` on thread ``t``'s device, making the
        device's store after its first pool (then the E-step's memory is taken)."""
        if not self._use_resident:
            return
        import cupy

        d = self.devices[t]
        with self._resident_lock:
            if d not in self._resident:
                free, total = cupy.cuda.runtime.memGetInfo()
                n, N = int(self.setup["n"]), int(self.setup["N"])
                cap = resident_capacity(n, N, free, total, self.setup.get("resident_share", 1.0))
                self._resident[d] = ResidentImages(n, N, cap, cupy) if cap > 0 else None
            st = self._resident[d]
        if st is not None:
            st.add(index, images)

    def _host_buffer(self, shape):
        """Pinned host memory for one pool's images on a GPU worker, within
        :data:`PINNED_BUDGET_BYTES`; ``None`` on the CPU or past the budget."""
        nbytes = 4 * int(np.prod(shape))
        if (not self.devices or self._pinned_failed
                or nbytes * (3 * self.threads + 1) > PINNED_BUDGET_BYTES):
            return None
        try:
            return pinned_empty(shape, np.float32, device=self.devices[0])
        except Exception as exc:  # the host could not lock the memory: ordinary memory
            self._pinned_failed = True  # (copies then go through CUDA's staging buffer)
            warnings.warn(f"rank {self.rank}: no page-locked host memory for a pool's images "
                          f"({nbytes / 2**20:.0f} MiB: {exc}); reading into ordinary memory, "
                          "whose copies to the GPU are slower", ResourceWarning, stacklevel=2)
            return None

    def _receive_images(self, task: dict) -> np.ndarray:
        """The leader's images for one pool, through MPI, with a deadline."""
        N = self.setup["N"]
        shape = (len(task["index"]), N, N)
        buf = self._host_buffer(shape)
        buf = np.empty(shape, np.float32) if buf is None else buf
        req = self.comm.Irecv(buf, source=task.get("mpi_source", 0), tag=task["mpi_tag"])
        deadline = time.monotonic() + self.timeout
        pause = 1e-4
        while not req.Test():
            if self._closed or time.monotonic() > deadline:
                req.Cancel()
                req.Wait()
                raise ResourceError(f"rank {self.rank}: the leader sent no images for a pool "
                                    f"of {len(buf)} particles within {self.timeout:.0f} s")
            time.sleep(pause)
            pause = min(0.005, pause * 2)
        return buf

    def _compute_loop(self, t: int) -> None:
        with self._device_scope(t):
            nxt = None
            while True:
                gen, task, images, read_s = nxt or self._ready.get()
                nxt = None
                if task is _STOP:
                    return
                if gen != self._gen:
                    continue
                nxt = self._prefetch_next(t, gen)
                n = len(task["index"])
                t0 = time.monotonic()
                self._busy[t] = (task["id"], n, t0)
                try:
                    with fft_threads(self.fft_threads):
                        res = self._process(t, task, images)
                    rec = {"id": task["id"], "thread": t, "n": n, "res": res, "read_s": read_s,
                           "compute_s": time.monotonic() - t0}
                except BaseException as exc:
                    rec = {"id": task["id"], "error": error_record(
                        exc, rank=self.rank, thread=t, stage="compute")}
                self._busy[t] = None
                self._done(gen, rec, (t0, read_s, n))

    def _prefetch_next(self, t: int, gen: int):
        """GPU E-step: take the next ready pool, if there is one, and start copying its
        images to the device while this thread computes the current one (the copy then
        overlaps the work instead of preceding it). Returns that queue item (or None)."""
        ctx = self._ctx[t]
        if not self.devices or self._phase[0] != "estep" or ctx is None:
            return None
        try:
            item = self._ready.get_nowait()
        except queue.Empty:
            return None
        if item[1] is not _STOP and item[0] == gen and not isinstance(item[2], PoolRows):
            ctx.prefetch(item[2])
        return item

    def _done(self, gen: int, rec: dict, timing) -> None:
        with self._lock:
            if gen != self._gen:
                return
            if timing is not None and "error" not in rec:
                t0, read_s, n = timing
                s = self._stats
                now = time.monotonic()
                s["particles"] += n
                s["pools"] += 1
                s["read_s"] += read_s
                s["compute_s"] += rec["compute_s"]
                s["t_first"] = t0 if s["t_first"] is None else min(s["t_first"], t0)
                s["t_last"] = now if s["t_last"] is None else max(s["t_last"], now)
            self._inflight -= 1
        rec["gen"] = gen
        self._results.put(rec)

    def _process(self, t: int, task: dict, images: np.ndarray):
        kind, model, _ = self._phase
        if kind == "init":
            from ..em._mstep import initial_pass_sums

            s = self.setup
            sums = initial_pass_sums(images, task["meta"], self.config, s["pixel_size"],
                                     s["n_optics"], self._particle_mask())
            if self._ctx[t] is None:
                self._ctx[t] = sums
            else:
                self._ctx[t].add_(sums)
            return None
        from ..em._model import ParticleBatch

        if self._ctx[t] is None:
            self._ctx[t] = self._estep_context(model)
        assembled = isinstance(images, PoolRows)
        if assembled:  # (assemble() stores the images it copied)
            stored = int((~images.missing).sum())
            images = self._resident[self.devices[t]].assemble(images)
            with self._lock:
                self._stats["stored"] += stored
        batch = ParticleBatch(images=images, **task["meta"])
        res = self._ctx[t].expectation(batch)
        if (self._use_resident and not assembled and task.get("images") is None
                and task.get("mpi_tag") is None):
            # (images the leader sends come every iteration: storing them would gain nothing)
            self._keep_resident(t, task["index"], self._ctx[t].device_images)
        return res

    def _estep_context(self, model):
        from ..em._estep import EStepContext

        if self.devices:
            import cupy as xp
        else:
            xp = np
        s = self.setup
        return EStepContext(model, self.config, xp, n_optics=s["n_optics"],
                            n_groups=s["n_groups"])

    def _particle_mask(self):
        if self._mask is None:
            from ..em._estep import soft_circular_mask

            self._mask = soft_circular_mask(self.setup["N"], self.setup["mask_radius_px"], 5.0)
        return self._mask
