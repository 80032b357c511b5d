"""Functions the runtime calls on ipyparallel engines (by reference: engines import them).

Each engine keeps the objects of the runs it takes part in, by run id, in :data:`RUNS`: its
communicator (engines under MPI), its :class:`~cryonb.parallel._leader.LeaderCore` (rank 0) or
:class:`~cryonb.parallel._worker.WorkerService` (other ranks) of a 2D classification, or its
:class:`~cryonb.parallel._ranktask.RankTask` (``task``) of an all-ranks job. :func:`call`
reaches a method of one of them; everything else sets a rank up or tears it down.
"""

from __future__ import annotations

import os

__all__ = ["RUNS", "call", "close_run", "mpi_group", "open_leader", "open_task", "open_worker",
           "probe", "scratch_copy", "scratch_remove"]

#: run id -> {"comm": ..., "leader": LeaderCore, "worker": WorkerService, "task": RankTask,
#: "blas": ...}
RUNS: dict[str, dict] = {}


def probe() -> dict:
    """This engine's identity and resources (:func:`cryonb.parallel.hardware.describe_process`)."""
    from .hardware import describe_process

    return describe_process()


def _enter(run_id: str, cwd: str | None) -> dict:
    if cwd:
        if not os.path.isdir(cwd):
            import socket

            from ..errors import ConfigError

            raise ConfigError(f"the folder {cwd} the run was started in does not exist on host "
                              f"{socket.gethostname()}: ranks must share the project folder")
        os.chdir(cwd)
    return RUNS.setdefault(run_id, {})


def mpi_group(run_id: str, world_ranks: list[int], cwd: str | None = None) -> int:
    """Make the run's communicator over ``world_ranks`` (all of them call this together).

    Returns this engine's rank in it. Requires ``MPI_THREAD_MULTIPLE`` (threads receive while
    the main thread serves the client).
    """
    from mpi4py import MPI

    from ..errors import ResourceError

    state = _enter(run_id, cwd)
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise ResourceError("the MPI library gives no MPI_THREAD_MULTIPLE support, which the "
                            "runtime needs; use engines without MPI (--engines local)")
    world = MPI.COMM_WORLD
    comm = world.Create_group(world.group.Incl(list(world_ranks)), tag=17)
    state["comm"] = comm
    return comm.rank


def open_leader(run_id: str, config, *, cwd: str | None = None, timeout: float = 600.0,
                blas_threads: int | None = None) -> dict:
    """Create rank 0's :class:`LeaderCore` (reads the STAR file); returns its ``info()``."""
    from ._leader import LeaderCore
    from .hardware import limit_blas_threads, pin_devices

    state = _enter(run_id, cwd)
    pin_devices([], leader=True)
    if blas_threads:
        state["blas"] = limit_blas_threads(blas_threads)
    state["leader"] = LeaderCore(config, comm=state.get("comm"), timeout=timeout)
    return state["leader"].info()


def open_worker(run_id: str, rank: int, config, setup: dict, *, threads: int, devices,
                source: dict, cwd: str | None = None, timeout: float = 600.0,
                blas_threads: int | None = None) -> dict:
    """Create a working rank: pin its devices, open its image source, start its threads.

    Parameters
    ----------
    devices : list of int
        Device of each thread as the host numbers them (empty: CPU).
    source : dict
        ``kind`` (``parallel``, ``preread``, ``scratch``, ``leader``) and, for ``scratch``,
        ``copy`` (:class:`~cryonb.parallel.images.ScratchCopy`).

    Returns
    -------
    dict
        ``devices`` (CUDA numbering after pinning), ``gpu`` (whether CuPy answers) and
        ``uuids`` (each thread's device as CUDA names it: which physical GPU it drives).
    """
    from ._worker import WorkerService

    state = _enter(run_id, cwd)
    local, uuids = _pin(rank, devices, state, blas_threads)
    src = make_source(source, config)
    state["worker"] = WorkerService(rank=rank, config=config, setup=setup, threads=threads,
                                    devices=local or None, source=src, comm=state.get("comm"),
                                    timeout=timeout, fft_threads=blas_threads or 1)
    return {"devices": local, "gpu": bool(local), "uuids": uuids}


def _pin(rank: int, devices, state: dict, blas_threads: int | None) -> tuple[list, list]:
    """Pin the rank to ``devices`` before any CUDA call; limit its BLAS threads.

    Returns the devices in CUDA's numbering after pinning and the UUIDs CUDA gives them.
    """
    from .hardware import cuda_uuids, limit_blas_threads, pin_devices

    local = pin_devices(list(devices)) if devices else []
    uuids: list[str] = []
    if local:
        from ..backend import gpu_available
        from ..errors import ResourceError

        if not gpu_available():
            raise ResourceError(f"rank {rank} was given GPUs {list(devices)} but CuPy cannot "
                                "use them here")
        uuids = cuda_uuids(local)
    if blas_threads:
        state["blas"] = limit_blas_threads(blas_threads)
    return local, uuids


def open_task(run_id: str, job: str, rank: int, size: int, config, *, devices, threads: int,
              cwd: str | None = None, blas_threads: int | None = None) -> dict:
    """Start this engine's share of an all-ranks job (autopicking, extraction).

    Parameters
    ----------
    job : {"autopick", "extract"}
    rank, size : int
        The micrographs ``divide_equally(n, size, rank)`` are this engine's.
    config : AutopickConfig or ExtractConfig
    devices : list of int
        The rank's device (one, as the host numbers them; empty: CPU), pinned here before
        any CUDA call.
    threads : int
        ``--j``.

    Returns
    -------
    dict
        :meth:`RankTask.info` plus ``devices`` (CUDA numbering after pinning) and ``uuids``.
    """
    from ._ranktask import RankTask

    state = _enter(run_id, cwd)
    local, uuids = _pin(rank, devices, state, blas_threads)
    state["task"] = RankTask(job, rank, size, config, device=local[0] if local else None,
                             threads=threads, uuids=uuids)
    return {**state["task"].info(), "devices": local, "uuids": uuids}


def make_source(source: dict, config, table=None):
    """An :class:`~cryonb.parallel.images.ImageSource` from its description (``None`` for
    ``leader``: the images come with the tasks)."""
    from .images import PrereadSource, ScratchSource, TableSource

    kind = source["kind"]
    if kind == "leader":
        return None
    if table is None:
        from ..io import read_particles

        table = read_particles(config.i)
    if kind == "parallel":
        return TableSource(table)
    if kind == "preread":
        return PrereadSource(table, check_memory=False)
    if kind == "scratch":
        return ScratchSource(table, source["copy"])
    raise ValueError(f"unknown image source {kind!r}")


def scratch_copy(run_id: str, config, tag: str, capacity: int | None,
                 cwd: str | None = None):
    """Copy this host's particles to ``--scratch_dir`` (one engine per host calls this)."""
    from ..io import read_particles
    from .images import copy_to_scratch

    _enter(run_id, cwd)
    return copy_to_scratch(read_particles(config.i), config.scratch_dir, tag,
                           config.keep_free_scratch, capacity)


def scratch_remove(copy) -> None:
    """Remove a scratch copy (:func:`cryonb.parallel.images.remove_scratch`)."""
    from .images import remove_scratch

    remove_scratch(copy)


def call(run_id: str, role: str, method: str, *args, **kwargs):
    """``RUNS[run_id][role].method(*args, **kwargs)``."""
    try:
        obj = RUNS[run_id][role]
    except KeyError:
        from ..errors import ResourceError

        raise ResourceError(f"this engine has no {role} of run {run_id} (was it restarted?)"
                            ) from None
    return getattr(obj, method)(*args, **kwargs)


def close_run(run_id: str) -> None:
    """Stop the run's threads, free its communicator, undo its BLAS limit."""
    state = RUNS.pop(run_id, None)
    if not state:
        return
    for role in ("task", "worker", "leader"):
        obj = state.get(role)
        if obj is not None:
            obj.close()
    blas = state.get("blas")
    if blas is not None:
        blas.restore_original_limits()
    comm = state.get("comm")
    if comm is not None:
        try:
            comm.Free()
        except Exception:
            pass
