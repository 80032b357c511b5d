"""The leading side of a run (rank 0): the job, its task lists, the M-step and the files.

A :class:`LeaderCore` wraps :class:`cryonb.em.class2d.Class2DJob` with what the runtime needs
from the leader, in calls that are cheap to make from another process: the tasks of a phase
(particle indices and their small metadata), the model to broadcast, storing results,
combining the sums (given, from the ranks' files, or through MPI) followed by the M-step and
the writing of the iteration's files; in the ``leader`` I/O mode it also reads the images and
sends them (through the client, or through MPI from a sender thread).
"""

from __future__ import annotations

import os
import queue
import threading
import time

from ..errors import ConfigError, ResourceError
from .combine import mpi_receive_sum, read_rank_sums

__all__ = ["LeaderCore"]


def _make_job(config):
    from ..em.class2d import Class2DJob

    if not config.continue_from:
        return Class2DJob(config)
    if not hasattr(Class2DJob, "from_optimiser"):
        raise ConfigError("--continue is not available in this version of cryonb.em: "
                          "Class2DJob.from_optimiser is missing")
    # parallel options and the iteration count come from this run, the algorithm from the file
    parallel = {f: getattr(config, f) for f in
                ("ranks", "j", "pool", "gpu", "cpu", "io_mode", "scratch_dir",
                 "keep_free_scratch", "combine", "engines", "cluster_id", "profile", "timeout")}
    return Class2DJob.from_optimiser(config.continue_from, iter=config.iter,
                                     o=config.o or None, **parallel)


def ignored_on_continue(given, kept) -> str | None:
    """The algorithm options given with ``--continue`` that the continued run does not take.

    ``--continue`` keeps the algorithm of the run it continues (so that it gives the same
    result as an uninterrupted run); an option set to something else than both its default
    and the run's value would otherwise be dropped without a word.

    Parameters
    ----------
    given, kept : Class2DConfig
        The configuration asked for, and the one the continued job runs with.

    Returns
    -------
    str or None
        A warning naming each dropped flag with both values; None when nothing is dropped.
    """
    default = type(given)()
    dropped = []
    for f in type(given).option_fields():
        # the particles (--i, --angpix) are the run's too: its state is per particle
        if (f.metadata.get("group") not in ("algorithm", "sampling") or f.name == "iter") \
                and f.name not in ("i", "angpix"):
            continue
        mine, theirs = getattr(given, f.name), getattr(kept, f.name)
        if f.name == "i" and mine and theirs:
            same = os.path.abspath(mine) == os.path.abspath(theirs)
        else:
            same = mine == theirs
        if mine != getattr(default, f.name) and not same:
            dropped.append(f"{given.flag(f.name)} {mine} (the run's {theirs} is kept)")
    if not dropped:
        return None
    return ("--continue keeps the continued run's algorithm options; ignored: "
            + "; ".join(dropped) + ". Start a new run to change them.")


class LeaderCore:
    """Rank 0's state and operations.

    Parameters
    ----------
    config : Class2DConfig
    comm : mpi4py communicator, optional
        The run's communicator (engines under MPI).
    timeout : float
        Seconds an MPI send of images may wait for its receiver.
    """

    def __init__(self, config, comm=None, timeout: float = 600.0):
        self.job = _make_job(config)
        self.continue_note = (ignored_on_continue(config, self.job.config)
                              if config.continue_from else None)
        self.comm = comm
        self.timeout = float(timeout)
        self._shapes: dict[str, list] = {}
        self._send_q: queue.Queue | None = None
        self._send_errors: list[str] = []

    # ------------------------------------------------------------------ queries
    def info(self) -> dict:
        """What the runtime and the workers need to know about the job."""
        job = self.job
        return {"n": job.n, "N": job.N, "pixel_size": job.pixel_size,
                "n_optics": len(job.optics_names), "n_groups": len(job.group_names),
                "mask_radius_px": job.mask_radius_px, "iteration": job.iteration,
                "has_model": job.model is not None, "config": job.config,
                "root": job.output_root(), "stacks": len(job.table.stacks),
                "continue_note": self.continue_note}

    def _template(self, kind: str):
        if kind not in self._shapes:
            t = self.job.init_sums_template() if kind == "init" else self.job.sums_template()
            self._shapes[kind] = t.shapes()
        shapes = self._shapes[kind]
        size = sum(int(_prod(s)) * (2 if c else 1) for _, s, c in shapes)
        return shapes, size

    def sums_size(self, kind: str) -> int:
        """Length of the packed sum vector of a phase."""
        return self._template(kind)[1]

    def tasks(self, kind: str, pool: int, iteration: int) -> list[tuple]:
        """The phase's pools, shuffled (seeded per iteration): ``[(index, meta), ...]``."""
        job = self.job
        meta = job.init_meta if kind == "init" else job.batch_meta
        return [(p, meta(p)) for p in job.pools(pool, iteration)]

    def model(self):
        """The current model (what every worker needs for the E-step)."""
        return self.job.model

    def bcast_model(self) -> None:
        """Broadcast the model through MPI (every worker calls ``begin_bcast`` meanwhile)."""
        self.comm.bcast(self.job.model, root=0)

    def write(self) -> dict:
        """Write the current iteration's files (a run stopped before its next M-step)."""
        files = self.job.write_iteration(final=True) or {}
        return {k: str(v) for k, v in files.items()}

    # ------------------------------------------------------------------ updates
    def store(self, items: list[tuple]) -> int:
        """Keep per-particle results ``[(index, res), ...]``; returns the particles stored."""
        n = 0
        for index, res in items:
            self.job.store_results(index, res)
            n += len(index)
        return n

    def apply(self, kind: str, vector=None, *, source: str = "vector", iteration: int = 0,
              ranks=(), final: bool = False, keep_sums: bool = False) -> dict:
        """Combine the phase's sums, run the initial model or the M-step, write the files.

        Parameters
        ----------
        kind : {"init", "estep"}
        vector : float64 array, optional
            The summed vector (``source="vector"``).
        source : {"vector", "disc", "mpi"}
            Where the ranks' sums are: given, in ``<o>_it###_rank<r>.tmp`` files, or to be
            received through MPI (added in rank order in both cases).
        iteration : int
            The phase's iteration (names the files of ``disc``).
        ranks : sequence of int
            Ranks whose sums are read / received.
        final : bool
            The last iteration (always written).
        keep_sums : bool
            Return the summed vector too (``sums``; for tests and diagnostics).

        Returns
        -------
        dict
            ``combine_s``, ``mstep_s``, ``write_s``, ``files`` (str paths), ``summary``,
            ``iteration``, ``history`` (the job's entry for this iteration, if any), ``sums``
            (the vector with ``keep_sums``, else ``None``).
        """
        from ..em._model import Class2DSums
        from ..em._mstep import InitSums

        self.check_sender()
        shapes, size = self._template(kind)
        t0 = time.monotonic()
        if source == "disc":
            vector = read_rank_sums(self.job.output_root(), kind, iteration, ranks, size)
        elif source == "mpi":
            vector = mpi_receive_sum(self.comm, size, ranks)
        if vector is None or vector.size != size:
            raise ResourceError(f"the sums have {getattr(vector, 'size', 0)} values, "
                                f"expected {size}")
        t1 = time.monotonic()
        if kind == "init":
            self.job.start(InitSums.from_vector(vector, shapes))
        else:
            self.job.maximize(Class2DSums.from_vector(vector, shapes))
        t2 = time.monotonic()
        files = self.job.write_iteration(final=final) or {}
        t3 = time.monotonic()
        job = self.job
        history = job.history[-1] if kind == "estep" and job.history else {}
        return {"combine_s": t1 - t0, "mstep_s": t2 - t1, "write_s": t3 - t2,
                "files": {k: str(v) for k, v in files.items()}, "summary": job.summary(),
                "iteration": job.iteration, "history": history,
                "sums": vector if keep_sums else None}

    # ------------------------------------------------------------------ leader I/O mode
    def read_images(self, index):
        """The images of one pool (the ``leader`` I/O mode without MPI)."""
        return self.job.table.images(index)

    def send_images(self, items: list[tuple]) -> int:
        """Queue ``[(dest rank, tag, index), ...]`` for the MPI sender thread; returns at once."""
        if self._send_q is None:
            self._send_q = queue.Queue()
            threading.Thread(target=self._send_loop, name="cryonb-leader-sender",
                             daemon=True).start()
        for item in items:
            self._send_q.put(item)
        return len(items)

    def check_sender(self) -> None:
        """Raise the first error of the MPI sender thread, if any."""
        if self._send_errors:
            raise ResourceError(self._send_errors[0])

    def _send_loop(self) -> None:
        while True:
            item = self._send_q.get()
            if item is None:
                return
            dest, tag, index = item
            try:
                images = self.job.table.images(index)
                req = self.comm.Isend(images, dest=dest, tag=tag)
                deadline = time.monotonic() + self.timeout
                pause = 1e-4
                while not req.Test():
                    if time.monotonic() > deadline:
                        req.Cancel()
                        raise ResourceError(f"rank {dest} did not take the images of a pool "
                                            f"within {self.timeout:.0f} s")
                    time.sleep(pause)
                    pause = min(0.005, pause * 2)
            except Exception as exc:
                self._send_errors.append(f"leader: sending images to rank {dest} failed: {exc}")

    def close(self) -> None:
        """Stop the sender thread."""
        if self._send_q is not None:
            self._send_q.put(None)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
