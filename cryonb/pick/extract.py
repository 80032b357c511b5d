"""Particle extraction at picked coordinates, as ``relion_preprocess --extract`` (RELION 3.1).

For every micrograph of a micrographs STAR file with a coordinate file
(``<coord_dir><micrograph root><coord_suffix>``, see :func:`cryonb.pick.coordinate_path`, or
the list ``--coord_list`` written by autopicking):

1. Each coordinate is truncated to whole pixels (``int(rlnCoordinateX)``, as RELION) and the
   box of ``extract_size`` pixels around it is cut: rows ``y - B/2 .. y + B/2 - 1`` and columns
   likewise, so the coordinate lands on pixel ``(B/2, B/2)``. Pixels beyond the edge repeat
   the nearest edge pixel; a box entirely outside the micrograph is an error (RELION stops
   the whole job).
2. ``--scale S``: Fourier cropping/padding to ``S`` pixels (pixel size ``angpix * B / S``).
3. ``--norm``: with background = pixels farther than ``--bg_radius`` (pixels of the final box)
   from the centre, a least-squares plane fitted to the background is subtracted (unless
   ``--no_ramp``), then the image becomes ``(v - mean) / std`` over the background (population
   std).
4. ``--invert_contrast``: times -1 (after the normalisation).

Outputs: ``<part_dir><micrograph root>.mrcs`` (float32 stack, header pixel size the output
pixel size) and ``--part_star`` (RELION 3.1: ``data_optics`` from the micrographs with
``rlnImagePixelSize``, ``rlnImageSize``, ``rlnImageDimensionality``; ``data_particles`` with the
coordinate file's columns, ``rlnImageName`` ``000001@stack.mrcs``, ``rlnMicrographName``,
``rlnOpticsGroup`` and the micrograph's CTF), readable by :func:`cryonb.io.read_particles` and
by RELION.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from ..config import JobConfig, option
from ..errors import ConfigError, InputError
from ._config import as_config
from ._io import MicrographSet, coordinate_path, micrograph_root, read_coordinates
from ._templates import resize_images_fourier
from .autopick import RankWork, divide_equally

__all__ = [
    "ExtractConfig",
    "ExtractResult",
    "extract_boxes",
    "extract_micrographs",
    "extract_result",
    "normalise_particles",
    "open_extract_rank",
    "run_extract",
    "write_particle_star",
]

#: Micrograph columns copied to every particle (when present), as RELION 3.1 does.
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor",
               "rlnCtfScalefactor", "rlnPhaseShift", "rlnCtfMaxResolution",
               "rlnCtfFigureOfMerit")
_CTF_DEFAULTS = {"rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0, "rlnPhaseShift": 0.0}


@dataclass
class ExtractConfig(JobConfig):
    """All options of a particle extraction run (``relion_preprocess --extract`` flag names).

    Ranks split the micrographs as autopicking does (:func:`divide_equally`); each rank extracts
    its micrographs with ``j`` threads, and the leader joins the particle tables.
    """

    #: micrographs are split over the ranks whole, read by the rank that works on them
    CLI_UNUSED: ClassVar[tuple[str, ...]] = ("pool", "io_mode", "scratch_dir",
                                             "keep_free_scratch", "combine")

    PROGRAM: ClassVar[str] = "cryonb extract"
    RELION_PROGRAM: ClassVar[str] = "relion_preprocess"

    i: str = option("", "--i", "micrographs STAR file", group="io")
    coord_dir: str = option("", "--coord_dir", "folder of the coordinate files", group="io")
    coord_suffix: str = option("_autopick.star", "--coord_suffix", "coordinate files are "
                               "<coord_dir><micrograph root><suffix>", group="io")
    coord_list: str = option("", "--coord_list", "STAR file listing the coordinate file of "
                             "each micrograph (autopicking's autopick.star)", group="io")
    part_dir: str = option("Extract/", "--part_dir", "output folder of the particle stacks",
                           group="io")
    part_star: str = option("", "--part_star", "output particles STAR file (default "
                            "<part_dir>particles.star)", group="io")
    extract_size: int = option(0, "--extract_size", "box size (pixels, even)")
    scale: int = option(-1, "--scale", "rescale the boxes to this size (pixels, even); -1 = "
                        "no rescaling", relion_default=-1)
    norm: bool = option(False, "--norm", "normalise: background mean 0 and std 1")
    bg_radius: int = option(-1, "--bg_radius", "background radius (pixels of the final box) "
                            "for --norm", relion_default=-1)
    no_ramp: bool = option(False, "--no_ramp", "do not subtract a fitted plane before "
                           "normalising")
    invert_contrast: bool = option(False, "--invert_contrast", "multiply by -1 (after "
                                   "normalising)")
    minimum_pick_fom: float = option(-999.0, "--minimum_pick_fom", "skip picks with a lower "
                                     "rlnAutopickFigureOfMerit", relion=False)

    def validate(self) -> ExtractConfig:
        """Check options (see :meth:`JobConfig.validate`) and the job's own ranges."""
        super().validate()
        size = self.scale if self.scale > 0 else self.extract_size
        checks = [
            (self.extract_size >= 2 and self.extract_size % 2 == 0,
             f"--extract_size {self.extract_size}: give an even box size in pixels"),
            (self.scale == -1 or (self.scale >= 2 and self.scale % 2 == 0),
             f"--scale {self.scale}: give an even size in pixels, or -1"),
            (not self.norm or self.bg_radius > 0,
             "--norm needs --bg_radius (pixels of the final box)"),
            (not self.norm or 2 * self.bg_radius <= size,
             f"--bg_radius {self.bg_radius}: twice it exceeds the {size}-pixel box"),
            (not (self.coord_dir and self.coord_list),
             "give --coord_dir (with --coord_suffix) or --coord_list, not both"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    @property
    def output_size(self) -> int:
        """Box size of the extracted particles (pixels)."""
        return self.scale if self.scale > 0 else self.extract_size

    @property
    def particles_star(self) -> Path:
        """The particles STAR file written."""
        return Path(self.part_star) if self.part_star else Path(self.part_dir) / "particles.star"

    def _relion_extra_args(self) -> list[str]:
        return ["--extract"]


def extract_boxes(image: np.ndarray, x, y, box: int) -> np.ndarray:
    """Cut boxes centred on coordinates, repeating edge pixels beyond the micrograph.

    Parameters
    ----------
    image : numpy.ndarray of shape (ny, nx)
    x, y : array of shape (n,)
        ``rlnCoordinateX/Y`` (pixels); truncated to integers towards zero, as RELION.
    box : int
        Even box size ``B``: the coordinate lands on pixel ``(B/2, B/2)``.

    Returns
    -------
    numpy.ndarray of shape (n, B, B), float32

    Raises
    ------
    InputError
        A box that lies entirely outside the micrograph (naming the coordinate).
    """
    ny, nx = image.shape
    xi = np.trunc(np.asarray(x, dtype=np.float64)).astype(np.int64)
    yi = np.trunc(np.asarray(y, dtype=np.float64)).astype(np.int64)
    h = box // 2
    outside = (xi + h - 1 < 0) | (xi - h > nx - 1) | (yi + h - 1 < 0) | (yi - h > ny - 1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise InputError(f"particle {k + 1} at ({float(np.ravel(x)[k]):g}, "
                         f"{float(np.ravel(y)[k]):g}): its {box}-pixel box lies completely "
                         f"outside the {nx} x {ny} micrograph")
    off = np.arange(box) - h
    rows = np.clip(yi[:, None] + off[None, :], 0, ny - 1)
    cols = np.clip(xi[:, None] + off[None, :], 0, nx - 1)
    return np.asarray(image, dtype=np.float32)[rows[:, :, None], cols[:, None, :]]


def normalise_particles(images: np.ndarray, bg_radius: float, ramp: bool = True) -> np.ndarray:
    """RELION's ``normalise``: background plane removed, background mean 0 and std 1.

    Parameters
    ----------
    images : numpy.ndarray of shape (n, B, B)
    bg_radius : float
        Background = pixels with ``x^2 + y^2 > bg_radius^2`` (from the centre ``B // 2``).
    ramp : bool
        Subtract the least-squares plane ``a x + b y + c`` of the background first.

    Returns
    -------
    numpy.ndarray of shape (n, B, B), float32
        Images with a zero background std are left as they are (with a warning).
    """
    imgs = np.asarray(images, dtype=np.float64)
    b = imgs.shape[-1]
    ax = np.arange(b, dtype=np.float64) - b // 2
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    bg = (xx**2 + yy**2 > bg_radius * bg_radius).ravel()
    if not bg.any():
        raise ConfigError(f"--bg_radius {bg_radius} leaves no background in a {b}-pixel box")
    flat = imgs.reshape(len(imgs), -1)
    if ramp:
        design = np.stack([xx.ravel(), yy.ravel(), np.ones(b * b)], axis=1)
        coef, *_ = np.linalg.lstsq(design[bg], flat[:, bg].T, rcond=None)  # (3, n)
        flat = flat - (design @ coef).T
    mean = flat[:, bg].mean(axis=1, keepdims=True)
    std = flat[:, bg].std(axis=1, keepdims=True)
    flat_std = std[:, 0] < 1e-10
    if flat_std.any():
        warnings.warn(f"{int(flat_std.sum())} image(s) have a constant background: left "
                      "unnormalised", UserWarning, stacklevel=2)
    out = np.where(std < 1e-10, flat, (flat - mean) / np.where(std < 1e-10, 1.0, std))
    return out.reshape(imgs.shape).astype(np.float32)


@dataclass
class ExtractResult:
    """A finished extraction.

    Attributes
    ----------
    particles_star : pathlib.Path
    n_particles : int
    stacks : list of pathlib.Path
    skipped : list of str
        Micrographs without a coordinate file (or without picks).
    seconds : float
    """

    particles_star: Path
    n_particles: int
    stacks: list
    skipped: list
    seconds: float


def _coordinate_files(config: ExtractConfig, mics: MicrographSet) -> list[Path | None]:
    if config.coord_list:
        from ..io import read_star

        listing = None
        for df in read_star(config.coord_list).values():
            if {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(df.columns):
                listing = df
                break
        if listing is None:
            raise InputError("no block has rlnMicrographName and rlnMicrographCoordinates",
                             config.coord_list)
        where = dict(zip(listing["rlnMicrographName"].astype(str),
                         listing["rlnMicrographCoordinates"].astype(str)))
        return [Path(where[n]) if n in where else None for n in mics.names]
    if not config.coord_dir:
        raise ConfigError("give --coord_dir (and --coord_suffix) or --coord_list")
    return [coordinate_path(config.coord_dir, n, suffix=config.coord_suffix)
            for n in mics.names]


def _particle_rows(config: ExtractConfig, mics: MicrographSet, i: int, coords: pd.DataFrame,
                   stack: Path) -> pd.DataFrame:
    rows = coords.reset_index(drop=True).copy()
    rows["rlnImageName"] = [f"{k + 1:06d}@{stack}" for k in range(len(rows))]
    rows["rlnMicrographName"] = mics.names[i]
    if mics.table is not None:
        mic = mics.table.iloc[i]
        rows["rlnOpticsGroup"] = int(mic.get("rlnOpticsGroup", 1))
        for c in CTF_COLUMNS:
            if c in mics.table.columns:
                rows[c] = mic[c]
            elif c in _CTF_DEFAULTS:
                rows[c] = _CTF_DEFAULTS[c]
    else:
        rows["rlnOpticsGroup"] = 1
    return rows


def _why_no_particles(config: ExtractConfig, mics: MicrographSet) -> str:
    """The message of a run that extracted nothing: no coordinate file found (where it
    looked), or files whose picks were all empty or below ``--minimum_pick_fom``."""
    files = _coordinate_files(config, mics)
    found = [f for f in files if f is not None and f.is_file()]
    if not found:
        first = next((f for f in files if f is not None), None)
        if first is None:
            return (f"no particles to extract: {config.coord_list} names no coordinate file "
                    "for these micrographs")
        return ("no particles to extract: no coordinate file was found (the first "
                f"micrograph's would be {first}); check --coord_dir and --coord_suffix (or "
                "--coord_list) against the micrograph names")
    picks = sum(len(read_coordinates(f)) for f in found)
    if picks and config.minimum_pick_fom > -999:
        return (f"no particles to extract: the {len(found)} coordinate files found hold {picks} "
                f"picks, none with rlnAutopickFigureOfMerit >= {config.minimum_pick_fom:g} "
                "(--minimum_pick_fom)")
    return f"no particles to extract: the {len(found)} coordinate files found hold no picks"


def _extract_one(config: ExtractConfig, mics: MicrographSet, i: int,
                 coord_file: Path | None) -> tuple[pd.DataFrame | None, Path | None]:
    from ..io import write_mrc

    if coord_file is None or not coord_file.is_file():
        return None, None
    coords = read_coordinates(coord_file)
    if config.minimum_pick_fom > -999 and "rlnAutopickFigureOfMerit" in coords.columns:
        coords = coords[coords["rlnAutopickFigureOfMerit"] >= config.minimum_pick_fom]
    if not len(coords):
        return None, None
    image = mics.image(i)
    try:
        boxes = extract_boxes(image, coords["rlnCoordinateX"], coords["rlnCoordinateY"],
                              config.extract_size)
    except InputError as exc:
        raise InputError(f"{exc} (coordinates {coord_file})", mics.paths[i]) from None
    if config.scale > 0 and config.scale != config.extract_size:
        boxes = resize_images_fourier(boxes, config.scale)
    if config.norm:
        boxes = normalise_particles(boxes, config.bg_radius, ramp=not config.no_ramp)
    if config.invert_contrast:
        boxes = -boxes
    stack = Path(config.part_dir) / (micrograph_root(mics.names[i]) + ".mrcs")
    stack.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(stack, boxes, mics.pixel_size * config.extract_size / config.output_size,
              stack=True)
    return _particle_rows(config, mics, i, coords, stack), stack


def open_extract_rank(config, rank: int = 0, size: int = 1) -> RankWork:
    """Set up one rank of an extraction (micrographs and coordinate files) without cutting.

    Parameters are those of :func:`extract_micrographs`.

    Returns
    -------
    RankWork
        ``process(i)`` extracts micrograph ``i`` and returns ``(i, rows, stack)`` (see
        :func:`extract_micrographs`).
    """
    config = as_config(config, ExtractConfig)
    mics = MicrographSet.read(config.i)
    files = _coordinate_files(config, mics)
    first, stop = divide_equally(len(mics), size, rank)

    def one(i: int) -> tuple:
        rows, stack = _extract_one(config, mics, i, files[i])
        return i, rows, None if stack is None else str(stack)

    return RankWork(range(first, stop), len(mics), one, name=f"extract-r{rank}")


def extract_micrographs(config, rank: int = 0, size: int = 1, *,
                        on_micrograph: Callable[[tuple], None] | None = None,
                        stop: threading.Event | None = None) -> list[tuple]:
    """One rank's share of an extraction: stacks written, particle rows returned.

    Parameters
    ----------
    config : ExtractConfig or dict
    rank, size : int
        Micrographs ``divide_equally(n, size, rank)``, ``config.j`` at a time.
    on_micrograph : callable, optional
        Called with each micrograph's ``(index, rows, stack)`` as soon as it is done.
    stop : threading.Event, optional
        Once set, micrographs not yet started are left out.

    Returns
    -------
    list of (int, pandas.DataFrame or None, str or None)
        Per micrograph: its index, its particle rows (None when it has no coordinates) and
        its stack. Join them with :func:`write_particle_star`.
    """
    config = as_config(config, ExtractConfig)
    return open_extract_rank(config, rank, size).run(config.j, on_item=on_micrograph,
                                                     stop=stop)


def write_particle_star(config, parts: Sequence[tuple]) -> tuple[Path, int]:
    """Join every rank's particle rows into the particles STAR file (the leader's step).

    Parameters
    ----------
    config : ExtractConfig or dict
    parts : sequence of (int, DataFrame or None, str or None)
        From :func:`extract_micrographs` of all ranks.

    Returns
    -------
    path : pathlib.Path
    n_particles : int

    Raises
    ------
    InputError
        No particles at all (no coordinate file found or all empty).
    """
    from ..io import write_particles

    config = as_config(config, ExtractConfig)
    mics = MicrographSet.read(config.i)
    tables = [rows for _, rows, _ in sorted(parts, key=lambda p: p[0]) if rows is not None]
    if not tables:
        raise InputError(_why_no_particles(config, mics))
    particles = pd.concat(tables, ignore_index=True)
    optics = (mics.optics.copy() if mics.optics is not None
              else pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"]}))
    optics = optics.drop(columns=[c for c in ("rlnMicrographPixelSize",
                                              "rlnMicrographOriginalPixelSize")
                                  if c in optics.columns])
    optics["rlnImagePixelSize"] = mics.pixel_size * config.extract_size / config.output_size
    optics["rlnImageSize"] = config.output_size
    optics["rlnImageDimensionality"] = 2
    optics["rlnCtfDataAreCtfPremultiplied"] = 0
    path = config.particles_star
    path.parent.mkdir(parents=True, exist_ok=True)
    write_particles(path, particles, optics)
    return path, len(particles)


def run_extract(config) -> ExtractResult:
    """Extract particles in this process: ``config.ranks`` ranks as threads, then the STAR file.

    Parameters
    ----------
    config : ExtractConfig

    Returns
    -------
    ExtractResult
    """
    import concurrent.futures as cf

    config = as_config(config, ExtractConfig)
    t0 = time.perf_counter()
    size = config.ranks
    if size == 1:
        parts = extract_micrographs(config)
    else:
        with cf.ThreadPoolExecutor(max_workers=size) as pool:
            futures = [pool.submit(extract_micrographs, config, r, size) for r in range(size)]
            parts = [p for f in futures for p in f.result()]
    return extract_result(config, parts, t0)


def extract_result(config, parts: Sequence[tuple], t0: float) -> ExtractResult:
    """Write the particles STAR file from every rank's parts; the :class:`ExtractResult`.

    Parameters
    ----------
    config : ExtractConfig or dict
    parts : sequence of (int, DataFrame or None, str or None)
        From :func:`extract_micrographs` of all ranks.
    t0 : float
        ``time.perf_counter()`` when the job started.
    """
    config = as_config(config, ExtractConfig)
    path, n = write_particle_star(config, parts)
    mics = MicrographSet.read(config.i)
    skipped = [mics.names[i] for i, rows, _ in parts if rows is None]
    stacks = [Path(s) for _, _, s in sorted(parts, key=lambda p: p[0]) if s is not None]
    return ExtractResult(path, n, stacks, skipped, time.perf_counter() - t0)
