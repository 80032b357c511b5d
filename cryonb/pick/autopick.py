"""Running template autopicking: per rank, in-process over ranks, and its output files.

An all-ranks job (RELION's ``relion_autopick_mpi``): every rank reads all references, takes a
contiguous block of micrographs (:func:`divide_equally`: the first ``N % size`` ranks get one
more) and picks them on ONE device, with ``config.j`` threads; ranks do not talk while
picking. When all have finished, one process writes the lists (:func:`write_summary`).
Micrograph ``i`` of the STAR file always uses the seed ``random_seed + i``, so the picks do
not depend on the number of ranks, threads or devices.

Entry points
------------
:func:`pick_micrographs`
    One rank's work (:func:`open_autopick_rank` then :meth:`RankWork.run`). The parallel
    runtime (:func:`cryonb.parallel.run_autopick`) opens one :class:`RankWork` per engine,
    runs it while reporting each micrograph, and then calls :func:`write_summary` with all
    results; :func:`autopick_engine` is the same with plain data in and out.
:func:`run_autopick`
    The whole job in this process: ranks as threads or as processes, then the summary.
:func:`open_picker`
    The set-up one rank does (references, geometry), for interactive picking of single
    micrographs (:meth:`TemplatePicker.maps` / :meth:`TemplatePicker.peaks`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..backend import gpu_available, use_device
from ..errors import ConfigError, InputError, ResourceError
from ._config import AutopickConfig, as_config
from ._fom import COORDINATE_COLUMNS, PickGeometry, TemplatePicker, UnusableMicrograph
from ._io import (
    MicrographSet,
    coordinate_path,
    read_coordinates,
    write_coordinate_list,
    write_coordinates,
)
from ._templates import PickTemplates, read_references

__all__ = [
    "AutopickResult",
    "MicrographPicks",
    "RankWork",
    "autopick_engine",
    "autopick_result",
    "divide_equally",
    "open_autopick_rank",
    "open_picker",
    "pick_micrographs",
    "run_autopick",
    "write_summary",
]


def divide_equally(n: int, size: int, rank: int) -> tuple[int, int]:
    """RELION's ``divide_equally``: the contiguous block of ``n`` items of ``rank`` of ``size``.

    Returns
    -------
    first, stop : int
        Items ``first <= i < stop``; the first ``n % size`` ranks get one item more.
    """
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank {rank} of {size}: need 0 <= rank < size")
    base, extra = divmod(n, size)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


@dataclass
class RankWork:
    """One rank's share of an all-ranks job over micrographs, ready to run.

    Attributes
    ----------
    indices : range
        The micrographs of this rank (:func:`divide_equally`), rows of the STAR file.
    total : int
        Micrographs of the whole job.
    process : callable
        ``process(i)`` does micrograph ``i`` and returns what the job reports for it
        (:class:`MicrographPicks` for autopicking).
    name : str
        Prefix of the names of the rank's threads.
    """

    indices: range
    total: int
    process: Callable[[int], Any]
    name: str = "rank"

    def run(self, threads: int = 1, *, on_item: Callable[[Any], None] | None = None,
            on_start: Callable[[int], None] | None = None,
            stop: threading.Event | None = None) -> list:
        """Process the micrographs with ``threads`` threads, in micrograph order.

        Parameters
        ----------
        threads : int
            ``--j``: micrographs processed at the same time.
        on_item : callable, optional
            Called (in the working thread) with each result as soon as it is done.
        on_start : callable, optional
            Called (in the working thread) with each index before it is processed.
        stop : threading.Event, optional
            Once set, micrographs not yet started are skipped.

        Returns
        -------
        list
            The results of the micrographs processed, in micrograph order. An error (also
            one raised by ``on_item``) skips the micrographs not yet started and is raised.
        """
        halt = threading.Event()

        def one(i: int):
            if halt.is_set() or (stop is not None and stop.is_set()):
                return None
            try:
                if on_start is not None:
                    on_start(i)
                result = self.process(i)
                if on_item is not None:
                    on_item(result)
            except BaseException:
                halt.set()
                raise
            return result

        if threads == 1 or len(self.indices) <= 1:
            out = [one(i) for i in self.indices]
        else:
            with cf.ThreadPoolExecutor(max_workers=threads,
                                       thread_name_prefix=self.name) as pool:
                out = list(pool.map(one, self.indices))
        return [r for r in out if r is not None]


@dataclass
class MicrographPicks:
    """What a rank reports for one micrograph (plain data, sent back to the leader).

    Attributes
    ----------
    index : int
        Row in the micrographs STAR file.
    micrograph : str
        ``rlnMicrographName``.
    coordinates : str
        Path of the coordinate file written.
    n_picks : int
    mean_fom : float
        Mean ``rlnAutopickFigureOfMerit`` (0 without picks, as RELION's summary).
    seconds : float
        Wall time spent on it.
    rank : int
    device : int or None
        CUDA device (None: CPU).
    skipped : bool
        True when ``--only_do_unfinished`` found its coordinate file already there (its
        picks are counted from that file).
    problem : str
        Why nothing was picked on an unusable micrograph (constant, not finite, of another
        size); its coordinate file is written empty, as RELION does. Empty otherwise.
    """

    index: int
    micrograph: str
    coordinates: str
    n_picks: int
    mean_fom: float
    seconds: float
    rank: int
    device: int | None
    skipped: bool = False
    problem: str = ""


@dataclass
class AutopickResult:
    """A finished autopicking job.

    Attributes
    ----------
    micrographs : list of MicrographPicks
        In micrograph order.
    coordinate_list : pathlib.Path
        ``<odir><pickname>.star`` (RELION 4+'s list of coordinate files).
    summary : pathlib.Path
        ``<odir>summary.star`` (RELION 3.1's per-micrograph summary).
    seconds : float
        Wall time of the whole job.
    """

    micrographs: list
    coordinate_list: Path
    summary: Path
    seconds: float

    @property
    def n_picks(self) -> int:
        """Total number of picks."""
        return int(sum(m.n_picks for m in self.micrographs))

    def picks(self) -> pd.DataFrame:
        """All picks, with ``rlnMicrographName`` first (read back from the coordinate files)."""
        from ._io import read_coordinates

        parts = []
        for m in self.micrographs:
            df = read_coordinates(m.coordinates)
            parts.append(df.assign(rlnMicrographName=m.micrograph))
        if not parts:
            return pd.DataFrame(columns=["rlnMicrographName"])
        out = pd.concat(parts, ignore_index=True)
        return out[["rlnMicrographName", *[c for c in out.columns if c != "rlnMicrographName"]]]


def open_picker(config: AutopickConfig, device: int | None = None):
    """Read the inputs and set up picking as every rank does.

    Parameters
    ----------
    config : AutopickConfig
    device : int or None
        CUDA device for the arrays (None: NumPy on the CPU).

    Returns
    -------
    picker : TemplatePicker
    micrographs : MicrographSet

    Raises
    ------
    ConfigError, InputError
        Bad options or inputs (see :class:`MicrographSet`, :func:`read_references`).
    ResourceError
        A device was asked for but no GPU is usable.
    """
    config = as_config(config, AutopickConfig)
    if not config.ref:
        raise ConfigError("--ref is required: 2D references (an MRC stack or a STAR file)")
    mics = MicrographSet.read(config.i, config.angpix, need_ctf=config.ctf)
    if config.angpix > 0 and config.i.lower().endswith(".star") and mics.table is not None \
            and "rlnMicrographPixelSize" in mics.table.columns \
            and abs(config.angpix - mics.pixel_size) > 1e-3:
        warnings.warn(f"--angpix {config.angpix:g} is ignored: {config.i} gives "
                      f"{mics.pixel_size:g} A/px (as RELION does)", UserWarning, stacklevel=2)
    refs, header_apix = read_references(config.ref)
    ref_apix = config.angpix_ref if config.angpix_ref > 0 else mics.pixel_size
    if header_apix and abs(header_apix - ref_apix) > 1e-3 * ref_apix:
        how = ("as --angpix_ref gives" if config.angpix_ref > 0 else
               "the micrographs' (give --angpix_ref to change it)")
        warnings.warn(f"{config.ref}: the header says {header_apix:g} A/px but {ref_apix:g} A/px "
                      f"is used for the references, {how}", UserWarning, stacklevel=2)
    templates = PickTemplates.from_references(
        refs, mics.pixel_size, ref_pixel_size=ref_apix,
        particle_diameter=config.particle_diameter if config.particle_diameter > 0 else None,
        invert=config.invert, shrink_particle_mask=config.shrink_particle_mask)
    ysize, xsize = mics.shape()
    if templates.box > min(xsize, ysize):
        raise InputError(f"the micrographs are {xsize} x {ysize} px, smaller than the "
                         f"references ({templates.box} px at {mics.pixel_size:g} A/px): check "
                         "that --i holds micrographs and --angpix / --angpix_ref", config.i)
    if 2 * templates.box > min(xsize, ysize):
        warnings.warn(f"{config.ref}: the references ({templates.box} px) are more than half "
                      f"the micrographs' size ({xsize} x {ysize} px): is --ref a micrograph?",
                      UserWarning, stacklevel=2)
    geometry = PickGeometry.for_micrographs(xsize, ysize, mics.pixel_size,
                                            lowpass=config.lowpass, shrink=config.shrink,
                                            optimise_scale=not config.skip_optimise_scale)
    if device is not None and not gpu_available():
        raise ResourceError(f"device {device} was asked for (--gpu) but no GPU is usable here: "
                            "drop --gpu to pick on the CPU")
    if device is None:
        return TemplatePicker(templates, geometry, config, np), mics
    import cupy

    return TemplatePicker(templates, geometry, config, cupy), mics


def _pick_one(picker: TemplatePicker, mics: MicrographSet, i: int, config: AutopickConfig,
              rank: int, device: int | None) -> MicrographPicks:
    t0 = time.perf_counter()
    out = coordinate_path(config.odir, mics.names[i], config.pickname)
    if config.only_do_unfinished and out.exists():
        done = read_coordinates(out)  # the summary counts what the earlier run picked
        fom = done.get("rlnAutopickFigureOfMerit", pd.Series(dtype=float))
        return MicrographPicks(i, mics.names[i], str(out), len(done),
                               float(fom.mean()) if len(fom) else 0.0, 0.0, rank, device, True)
    problem = ""
    try:
        with use_device(device), _stream(device):
            picks = picker.pick(mics.image(i), mics.ctf(i), index=i)
    except UnusableMicrograph as exc:
        picks, problem = pd.DataFrame(columns=list(COORDINATE_COLUMNS)), str(exc)
    write_coordinates(out, picks)
    fom = picks["rlnAutopickFigureOfMerit"]
    return MicrographPicks(i, mics.names[i], str(out), len(picks),
                           float(fom.mean()) if len(fom) else 0.0,
                           time.perf_counter() - t0, rank, device, problem=problem)


def _stream(device: int | None):
    """A fresh non-blocking CUDA stream for this thread's work on ``device`` (or nothing)."""
    import contextlib

    if device is None:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Stream(non_blocking=True)


def open_autopick_rank(config, rank: int = 0, size: int = 1,
                       device: int | None = None) -> RankWork:
    """Set up one rank of an autopicking job (:func:`open_picker`) without picking yet.

    Parameters are those of :func:`pick_micrographs`.

    Returns
    -------
    RankWork
        ``process(i)`` picks micrograph ``i``, writes its coordinate file and returns its
        :class:`MicrographPicks`.
    """
    config = as_config(config, AutopickConfig)
    picker, mics = open_picker(config, device)
    first, stop = divide_equally(len(mics), size, rank)
    return RankWork(range(first, stop), len(mics),
                    lambda i: _pick_one(picker, mics, i, config, rank, device),
                    name=f"autopick-r{rank}")


def pick_micrographs(config, rank: int = 0, size: int = 1, device: int | None = None, *,
                     on_micrograph: Callable[[MicrographPicks], None] | None = None,
                     stop: threading.Event | None = None) -> list[MicrographPicks]:
    """One rank's share of an autopicking job: pick, write coordinate files, report.

    Parameters
    ----------
    config : AutopickConfig or dict
        The job (a dict from :meth:`AutopickConfig.to_dict` is accepted, for engines).
    rank, size : int
        This rank and the number of ranks: micrographs
        ``divide_equally(n, size, rank)`` are picked.
    device : int or None
        The rank's CUDA device (the first of its ``--gpu`` group, see
        :func:`cryonb.parallel.devices.resolve_device_map` with ``job="autopick"``); None
        picks on the CPU. All ``config.j`` threads of the rank use it, each with its own
        CUDA stream.
    on_micrograph : callable, optional
        Called with each :class:`MicrographPicks` as soon as it is done (progress, load views).
    stop : threading.Event, optional
        Once set, micrographs not yet started are left out.

    Returns
    -------
    list of MicrographPicks
        In micrograph order.
    """
    config = as_config(config, AutopickConfig)
    return open_autopick_rank(config, rank, size, device).run(config.j, on_item=on_micrograph,
                                                              stop=stop)


def autopick_engine(config: dict, rank: int, size: int, device: int | None = None) -> list[dict]:
    """:func:`pick_micrographs` with plain data in and out, for one ipyparallel engine.

    Parameters
    ----------
    config : dict
        :meth:`AutopickConfig.to_dict`.
    rank, size : int
    device : int or None

    Returns
    -------
    list of dict
        :class:`MicrographPicks` fields; pass them all to :func:`write_summary`.
    """
    return [dataclasses.asdict(r) for r in pick_micrographs(config, rank, size, device)]


def _sorted_picks(results: Sequence) -> list[MicrographPicks]:
    """``results`` (MicrographPicks or their dicts) as MicrographPicks in micrograph order."""
    return sorted((r if isinstance(r, MicrographPicks) else MicrographPicks(**r)
                   for r in results), key=lambda r: r.index)


def write_summary(config, results: Sequence) -> tuple[Path, Path]:
    """Write the job's lists once every rank has finished (the leader's last step).

    Parameters
    ----------
    config : AutopickConfig or dict
    results : sequence of MicrographPicks or dict
        Every rank's results, in any order.

    Returns
    -------
    coordinate_list, summary : pathlib.Path
        ``<odir><pickname>.star`` (block ``coordinate_files``: ``rlnMicrographName``,
        ``rlnMicrographCoordinates``; RELION 4+) and ``<odir>summary.star``
        (``rlnMicrographName``, ``rlnAutopickFigureOfMerit`` (mean), ``rlnGroupNrParticles``;
        RELION 3.1).
    """
    from ..io import write_star

    config = as_config(config, AutopickConfig)
    rows = _sorted_picks(results)
    odir = Path(config.odir)
    odir.mkdir(parents=True, exist_ok=True)
    listing = odir / f"{config.pickname}.star"
    write_coordinate_list(listing, [r.micrograph for r in rows], [r.coordinates for r in rows])
    summary = odir / "summary.star"
    write_star(summary, {"": pd.DataFrame({
        "rlnMicrographName": [r.micrograph for r in rows],
        "rlnAutopickFigureOfMerit": [float(r.mean_fom) for r in rows],
        "rlnGroupNrParticles": [int(r.n_picks) for r in rows]})})
    return listing, summary


def _rank_in_process(config: dict, rank: int, size: int, device: int | None) -> list[dict]:
    return autopick_engine(config, rank, size, device)


def run_autopick(config, devices: Sequence[int | None] | None = None, *,
                 ranks_as: str = "threads",
                 on_micrograph: Callable[[MicrographPicks], None] | None = None,
                 ) -> AutopickResult:
    """Run a whole autopicking job in this process (no cluster): every rank, then the lists.

    Parameters
    ----------
    config : AutopickConfig
        ``config.ranks`` ranks of ``config.j`` threads.
    devices : sequence of int or None, optional
        The device of each rank (``len == config.ranks``); default all on the CPU. Resolve
        ``--gpu`` with :func:`cryonb.parallel.devices.resolve_device_map` (``job="autopick"``).
    ranks_as : {"threads", "processes"}
        Ranks as threads of this process, or as separate processes (spawned; no shared state,
        as MPI ranks).
    on_micrograph : callable, optional
        Progress callback: per micrograph as it is done (ranks as threads), or per rank's
        micrographs when that rank ends (ranks as processes).

    Returns
    -------
    AutopickResult
    """
    config = as_config(config, AutopickConfig)
    size = config.ranks
    devices = list(devices) if devices is not None else [None] * size
    if len(devices) != size:
        raise ConfigError(f"{len(devices)} devices for {size} ranks: give one per rank")
    if ranks_as not in ("threads", "processes"):
        raise ConfigError(f"ranks_as must be 'threads' or 'processes', not {ranks_as!r}")
    t0 = time.perf_counter()
    results: list[MicrographPicks] = []
    if size == 1:
        results = pick_micrographs(config, 0, 1, devices[0], on_micrograph=on_micrograph)
    elif ranks_as == "threads":
        with cf.ThreadPoolExecutor(max_workers=size, thread_name_prefix="autopick") as pool:
            futures = [pool.submit(pick_micrographs, config, r, size, devices[r],
                                   on_micrograph=on_micrograph) for r in range(size)]
            results = [m for f in futures for m in f.result()]
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=size, mp_context=ctx) as pool:
            remote = [pool.submit(_rank_in_process, config.to_dict(), r, size, devices[r])
                      for r in range(size)]
            for f in cf.as_completed(remote):
                done = [MicrographPicks(**m) for m in f.result()]
                results += done
                if on_micrograph is not None:
                    for m in done:
                        on_micrograph(m)
    return autopick_result(config, results, t0)


def autopick_result(config, results: Sequence, t0: float) -> AutopickResult:
    """Write the lists (:func:`write_summary`) from every rank's results; the
    :class:`AutopickResult`.

    Parameters
    ----------
    config : AutopickConfig or dict
    results : sequence of MicrographPicks or dict
        Every rank's results, in any order.
    t0 : float
        ``time.perf_counter()`` when the job started.
    """
    rows = _sorted_picks(results)
    listing, summary = write_summary(config, rows)
    for r in rows:
        if r.problem:
            warnings.warn(f"{r.micrograph}: {r.problem}; nothing picked there (its coordinate "
                          "file is written empty)", UserWarning, stacklevel=2)
    return AutopickResult(rows, listing, summary, time.perf_counter() - t0)
