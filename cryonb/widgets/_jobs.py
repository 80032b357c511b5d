"""What a panel needs to know about each kind of job: how to run, continue and size it.

A :class:`JobKind` per configuration class: :class:`Class2DKind` runs
:func:`cryonb.parallel.run_class2d` (``run_class2d_async`` on an event loop) and continues from
the last ``_optimiser.star``; :class:`AutopickKind` runs :func:`cryonb.pick.run_autopick` with
the runtime's event schema and continues with ``--only_do_unfinished``; :class:`JobKind`
itself serves any other configuration (options and command lines, no Run).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import threading
from glob import escape as glob_escape
from glob import glob, iglob
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, CryonbError
from ._checks import Line, class2d_io_lines, micrograph_info, particle_info

__all__ = ["AutopickKind", "Class2DKind", "JobKind", "kind_for", "latest_optimiser"]

#: fields that the run takes from the panel when continuing (the algorithm comes from the file)
PARALLEL_FIELDS = ("ranks", "j", "pool", "gpu", "cpu", "io_mode", "scratch_dir",
                   "keep_free_scratch", "combine", "engines", "cluster_id", "profile", "timeout")


class JobKind:
    """A job without a runner: the panel shows options and command lines only.

    Attributes
    ----------
    title : str
    device_job : {"refine", "autopick"}
        How ``--gpu`` is resolved (leader/worker or all ranks).
    unit : str
        What a phase counts.
    main : tuple of str
        Fields shown first (the others go under "more options"); empty: the ``io`` and
        ``algorithm`` groups.
    hidden : tuple of str
        Fields not shown.
    views : tuple of str
        Views of the panel, among ``classes``, ``convergence``, ``load``, ``devices``.
    can_run, can_stop : bool
    """

    title = ""
    device_job: Literal["refine", "autopick"] = "refine"
    unit = "particles"
    main: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    views: tuple[str, ...] = ("devices",)
    can_run = False
    can_stop = False

    def __init__(self, config_cls):
        self.config_cls = config_cls
        self.title = self.title or f"{config_cls.PROGRAM} ({config_cls.__name__})"

    def run(self, config, *, progress=None, stop_event=None, client=None):
        """Run ``config`` (blocking), calling ``progress(event)``; returns the result."""
        raise ConfigError(f"{self.config_cls.__name__} has no runner in the notebook panel: "
                          f"run it with `{self.config_cls.PROGRAM}`")

    async def run_async(self, config, *, progress=None, stop_event=None, client=None):
        """:meth:`run` in a worker thread, its events delivered on the running loop."""
        loop = asyncio.get_running_loop()

        def relay(event):
            if progress is not None:
                loop.call_soon_threadsafe(progress, event)

        return await loop.run_in_executor(None, functools.partial(
            self.run, config, progress=relay, stop_event=stop_event, client=client))

    def resource_lines(self, cfg, *, gpu: bool) -> list[Line]:
        """What the options need (memory, disc), as ``(level, text)`` lines."""
        return []

    def can_continue(self, cfg) -> bool:
        """Whether :meth:`continue_config` has something to continue."""
        return False

    def continue_config(self, cfg, more: int):
        """The configuration that continues the run of ``cfg`` (``more`` iterations when it
        had finished).

        Raises
        ------
        ConfigError
            Nothing to continue.
        """
        raise ConfigError(f"{self.config_cls.__name__} runs cannot be continued")

    def continue_note(self, cfg, new) -> str | None:
        """A warning when continuing (``new``, from :meth:`continue_config`) drops options
        the form had set (``cfg``); None when nothing is dropped."""
        return None


# ------------------------------------------------------------------------------ class2d
_ITER = re.compile(r"_it(\d{3,})_optimiser\.star$")


def latest_optimiser(root: str) -> tuple[str, int] | None:
    """The last ``<root>_it###_optimiser.star`` on disc and its iteration, or ``None``."""
    if not root:
        return None
    found = []
    for path in glob(f"{glob_escape(root)}_it*_optimiser.star"):
        m = _ITER.search(path)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        return None
    it, path = max(found)
    return path, it


class Class2DKind(JobKind):
    """2D classification through :func:`cryonb.parallel.run_class2d`."""

    title = "2D classification · cryonb class2d"
    main = ("i", "o", "continue_from", "K", "iter", "tau2_fudge", "particle_diameter", "ctf",
            "psi_step", "offset_range", "offset_step")
    views = ("classes", "convergence", "load", "devices")
    can_run = can_stop = True

    def run(self, config, *, progress=None, stop_event=None, client=None):
        from ..parallel import run_class2d

        return run_class2d(config, progress=progress, stop_event=stop_event, client=client)

    async def run_async(self, config, *, progress=None, stop_event=None, client=None):
        from ..parallel import run_class2d_async

        return await run_class2d_async(config, progress=progress, stop_event=stop_event,
                                       client=client)

    def resource_lines(self, cfg, *, gpu: bool) -> list[Line]:
        if cfg.continue_from and not cfg.i:
            return [("info", f"continuing from {cfg.continue_from}")]
        if not cfg.i:
            return [("warning", "--i: give the particles STAR file")]
        try:
            n, box, apix = particle_info(cfg.i)
        except CryonbError as exc:
            return [("error", str(exc))]
        return class2d_io_lines(cfg, n, box, gpu=gpu, pixel_size=apix)

    def can_continue(self, cfg) -> bool:
        return latest_optimiser(cfg.o) is not None or bool(cfg.continue_from)

    def continue_config(self, cfg, more: int):
        from ..em.class2d import Class2DJob

        found = latest_optimiser(cfg.o)
        if found is None and cfg.continue_from:
            m = _ITER.search(cfg.continue_from)
            found = (cfg.continue_from, int(m.group(1)) if m else 0)
        if found is None:
            raise ConfigError(f"nothing to continue: no {cfg.o or '<o>'}_it###_optimiser.star "
                              "on disc (run first, or give --continue)")
        path, last = found
        target = cfg.iter if cfg.iter > last else last + max(1, int(more))
        parallel = {f: getattr(cfg, f) for f in PARALLEL_FIELDS}
        job = Class2DJob.from_optimiser(path, iter=target, o=cfg.o or None,
                                        continue_from=path, **parallel)
        return job.config

    def continue_note(self, cfg, new) -> str | None:
        from ..parallel._leader import ignored_on_continue

        return ignored_on_continue(cfg, new)


# ------------------------------------------------------------------------------ autopick
class _Stopped(Exception):
    """Raised from the per-micrograph callback to end an autopicking run early."""


class AutopickKind(JobKind):
    """Template autopicking through :func:`cryonb.pick.run_autopick` (ranks as threads).

    Events follow :mod:`cryonb.parallel.stats`: ``setup``, one ``pool`` per micrograph (with
    ``picks``), ``iteration`` 1 at the end, ``done``. Stop ends the run after the micrographs
    being picked (with ``--j 1``; with more threads a rank finishes the micrographs already
    handed to its threads); Continue picks the rest (``--only_do_unfinished``).
    """

    title = "Template autopicking · cryonb autopick"
    device_job: Literal["refine", "autopick"] = "autopick"
    unit = "micrographs"
    main = ("i", "ref", "odir", "pickname", "particle_diameter", "threshold", "min_distance",
            "lowpass", "ctf", "invert", "only_do_unfinished")
    hidden = ("io_mode", "scratch_dir", "keep_free_scratch", "combine", "engines", "cluster_id",
              "profile", "timeout")
    views = ("load", "devices")
    can_run = can_stop = True

    def run(self, config, *, progress=None, stop_event=None, client=None):
        from ..commands.autopick import rank_devices
        from ..parallel.stats import emit
        from ..pick import run_autopick

        stop = stop_event if stop_event is not None else threading.Event()
        n, _, _ = micrograph_info(config.i, config.angpix)
        devices, table = rank_devices(config)
        host, pid = socket.gethostname(), os.getpid()
        ranks = [{"rank": r, "role": "worker", "host": host, "pid": pid, "threads": config.j,
                  "devices": [] if d is None else [d]} for r, d in enumerate(devices)]
        emit(progress, "setup", ranks=ranks, device_table=table, pool=1, pool_memory=0,
             io_mode="parallel", combine="network", engines="inprocess",
             gpu=any(d is not None for d in devices), n_particles=n, iterations=1,
             first_iteration=0, warnings=[])
        emit(progress, "stage", iteration=1, stage="pick", state="start")
        lock = threading.Lock()
        count = [0, 0]  # micrographs, picks

        def on_micrograph(m) -> None:
            with lock:
                count[0] += 1
                count[1] += m.n_picks
                done = count[0]
            emit(progress, "pool", iteration=1, rank=m.rank, thread=0, n=1, done=done, total=n,
                 picks=m.n_picks, read_s=0.0, compute_s=m.seconds)
            if stop.is_set():
                raise _Stopped

        try:
            result = run_autopick(config, devices, ranks_as="threads",
                                  on_micrograph=on_micrograph)
        except _Stopped:
            result = None
        emit(progress, "stage", iteration=1, stage="pick", state="end")
        if result is not None:
            emit(progress, "iteration", iteration=1, stats={"wall_s": result.seconds},
                 summary={"n_picks": result.n_picks}, history={"iteration": 1},
                 files={"coordinates": str(result.coordinate_list),
                        "summary": str(result.summary)})
        emit(progress, "done", iteration=1 if result is not None else 0,
             stopped=result is None, classes="")
        return result

    def resource_lines(self, cfg, *, gpu: bool) -> list[Line]:
        if not cfg.i:
            return [("warning", "--i: give the micrographs STAR file (or a glob of MRC files)")]
        try:
            n, (ny, nx), apix = micrograph_info(cfg.i, cfg.angpix)
        except CryonbError as exc:
            return [("error", str(exc))]
        lines = [("info", f"{n} micrographs of {nx} x {ny} px at {apix:g} Å/px; "
                          f"{cfg.ranks} rank{'s' * (cfg.ranks != 1)} of {cfg.j} "
                          f"thread{'s' * (cfg.j != 1)}: micrographs split in blocks, the first "
                          f"{n % cfg.ranks} rank(s) get one more")]
        if not cfg.ref:
            lines.append(("warning", "--ref: give the 2D references (an MRC stack or STAR file)"))
        elif not Path(cfg.ref).exists():
            lines.append(("error", f"--ref {cfg.ref}: no such file"))
        return lines

    def can_continue(self, cfg) -> bool:
        pattern = os.path.join(glob_escape(cfg.odir), "**", f"*_{glob_escape(cfg.pickname)}.star")
        return bool(cfg.odir) and any(True for _ in iglob(pattern, recursive=True))

    def continue_config(self, cfg, more: int):
        if not self.can_continue(cfg):
            raise ConfigError(f"nothing to continue: no coordinate files in {cfg.odir}")
        return cfg.replace(only_do_unfinished=True)


def kind_for(config_cls) -> JobKind:
    """The :class:`JobKind` of a configuration class (by its class hierarchy)."""
    from ..em._config import Class2DConfig
    from ..pick import AutopickConfig

    for base, kind in ((Class2DConfig, Class2DKind), (AutopickConfig, AutopickKind)):
        if issubclass(config_cls, base):
            return kind(config_cls)
    return JobKind(config_cls)
