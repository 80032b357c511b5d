"""RELION particle and micrograph tables: optics groups, ``index@stack`` names, images, CTF.

RELION 3.1 and later keep per-group optics (voltage, Cs, pixel size, box...) in ``data_optics``
and per-particle values in ``data_particles``; RELION 3.0 keeps everything per particle in one
block, with the pixel size given as ``rlnDetectorPixelSize`` (micrometres) over
``rlnMagnification``. Both are read into one merged table with the optics columns per particle.
Where a column appears in both blocks the per-particle value wins, as in RELION.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError
from ._mrc import _read_mrc, _read_stack
from ._star import TOKENS_ATTR, read_star, write_star

__all__ = [
    "OPTICS_LABELS",
    "MicrographTable",
    "ParticleTable",
    "parse_image_name",
    "read_micrographs",
    "read_particles",
    "resolve_stack_path",
    "split_optics",
    "write_particles",
]

#: Labels that belong to an optics group (``data_optics``) in RELION 3.1+.
OPTICS_LABELS = (
    "rlnOpticsGroupName",
    "rlnMtfFileName",
    "rlnMicrographOriginalPixelSize",
    "rlnMicrographPixelSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnCtfDataArePhaseFlipped",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
    "rlnTomoTiltSeriesPixelSize",
    "rlnTomoSubtomogramBinning",
)

_GROUP = "rlnOpticsGroup"
_IMAGE = "rlnImageName"
_MICROGRAPH = "rlnMicrographName"
_LOOP_ATTR = "star_loop"
_CTF_REQUIRED = {
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage",
    "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
}
_CTF_OPTIONAL = {
    "phase_shift": ("rlnPhaseShift", 0.0),
    "bfactor": ("rlnCtfBfactor", 0.0),
    "ctf_scalefactor": ("rlnCtfScalefactor", 1.0),
}
_MAX_OPEN_STACKS = 32
_NEEDS_IMAGES = (
    "cryonb needs particle images; pass a STAR file of extracted particles (RELION Extract, "
    "Class2D/3D or Refine3D output), whose rlnImageName column reads 'index@stack.mrcs'"
)


# ---------------------------------------------------------------- image names and stack paths


def parse_image_name(
    name: str, *, row: int | None = None, path: str | os.PathLike | None = None
) -> tuple[int, str]:
    """Split a RELION image name ``"000012@Extract/job012/x.mrcs"`` into index and stack.

    Parameters
    ----------
    name : str
        ``index@stack`` with a 1-based index (leading zeros allowed), or a bare file name
        (the whole file is the image, as RELION reads it).
    row : int, optional
        Row of the table the name comes from (0-based), for the error message.
    path : str or os.PathLike, optional
        STAR file the name comes from, for the error message.

    Returns
    -------
    index0 : int
        0-based index of the image in the stack (0 for a bare file name).
    stack : str
        The stack file, as written (relative paths are resolved by
        :func:`resolve_stack_path`).

    Raises
    ------
    InputError
        E.g. ``"rlnImageName row 12: '0@stack.mrcs': RELION indices start at 1"``.
    """
    where = f"rlnImageName row {row}: " if row is not None else "rlnImageName "
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}{name!r} is empty: every particle needs an image", path)
    if "@" not in name:
        return 0, name
    index, _, stack = name.partition("@")
    if not (index.isascii() and index.isdigit()):
        raise InputError(
            f"{where}{name!r}: {index!r} before '@' is not a whole number "
            "(expected 'index@stack', e.g. '000012@Extract/job012/particles.mrcs')",
            path,
        )
    if int(index) < 1:
        raise InputError(f"{where}{name!r}: RELION indices start at 1", path)
    if not stack.strip():
        raise InputError(f"{where}{name!r}: no stack file after '@'", path)
    return int(index) - 1, stack


def _check_image_names(names: pd.Series, path: Path) -> None:
    """Vectorised check of a whole rlnImageName column; the first bad row raises."""
    text = names.astype("string")
    bad = text.isna() | (text.str.strip() == "")
    bad |= text.str.contains("@", regex=False) & ~text.str.fullmatch(r"[0-9]*[1-9][0-9]*@.*\S.*")
    bad = bad.fillna(True).to_numpy(dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        parse_image_name(names.iloc[row], row=row, path=path)
        raise InputError(f"rlnImageName row {row}: {names.iloc[row]!r} is not 'index@stack'", path)


def project_name(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A file's name as RELION's programs run from the project folder ``base`` find it.

    Parameters
    ----------
    path : str or os.PathLike
        The file (absolute, or relative to the current directory).
    base : str or os.PathLike, optional
        The project folder; default the current directory.

    Returns
    -------
    str
        ``path`` relative to ``base`` (``/`` separators) when it lies under it, else absolute.

    Examples
    --------
    >>> project_name("/data/p/Extract/a.mrcs", "/data/p")
    'Extract/a.mrcs'
    >>> project_name("/elsewhere/a.mrcs", "/data/p")
    '/elsewhere/a.mrcs'
    """
    base = Path.cwd() if base is None else Path(base).absolute()
    found = Path(path).absolute()
    return found.relative_to(base).as_posix() if found.is_relative_to(base) else str(found)


def resolve_stack_path(
    stack: str | os.PathLike,
    star_path: str | os.PathLike | None = None,
    project_dir: str | os.PathLike | None = None,
    what: str = "stack",
) -> Path:
    """Find the file a STAR file's image or micrograph name refers to.

    RELION writes paths relative to the project folder (``Extract/job012/Movies/x.mrcs``)
    while the STAR file itself may live deeper (``Class2D/job020/run_it025_data.star``).
    Tried in order: the path itself if absolute; relative to ``project_dir``; relative to the
    STAR file's folder and then each of its parent folders up to the file-system root;
    relative to the current directory.

    Parameters
    ----------
    stack : str or os.PathLike
        The file name as the STAR file gives it (the part after ``@`` of ``rlnImageName``).
    star_path : str or os.PathLike, optional
        The STAR file that names it.
    project_dir : str or os.PathLike, optional
        The RELION project folder.
    what : str
        What the file is, for the message ("stack", "micrograph").

    Returns
    -------
    pathlib.Path
        The first candidate that is a file.

    Raises
    ------
    InputError
        Listing every place tried.
    """
    rel = Path(stack)
    if rel.is_absolute():
        candidates = [rel]
    else:
        candidates = []
        if project_dir is not None:
            candidates.append(Path(project_dir) / rel)
        if star_path is not None:
            folder = Path(star_path).absolute().parent
            candidates += [d / rel for d in (folder, *folder.parents)]
        candidates.append(Path.cwd() / rel)
    tried: list[Path] = []
    for c in candidates:
        if c not in tried:
            tried.append(c)
            if c.is_file():
                return c
    hint = ("; run from the RELION project folder that the names are relative to (in Python: "
            "project_dir=)")
    if project_dir is not None or rel.is_absolute():
        hint = ""
    raise InputError(
        f"{what} {str(stack)!r} not found; tried: {', '.join(map(str, tried))}{hint}", star_path
    )


# ---------------------------------------------------------------- optics groups


def _values_equal(a: pd.Series, b: pd.Series) -> bool:
    """Same values, NaN equal to NaN (numbers compared as floats)."""
    av, bv = a.to_numpy(), b.to_numpy()
    try:
        return bool(np.array_equal(av.astype(float), bv.astype(float), equal_nan=True))
    except (TypeError, ValueError):
        return bool(np.array_equal(av.astype(str), bv.astype(str)))


def _group_codes(df: pd.DataFrame, optics: pd.DataFrame, path, block: str) -> np.ndarray:
    """Row of ``optics`` for each row of ``df``; raise for unknown or duplicate groups."""
    if _GROUP not in optics.columns:
        raise InputError("data_optics has no rlnOpticsGroup column", path)
    dup = optics[_GROUP].duplicated()
    if dup.any():
        raise InputError(
            f"data_optics lists optics group {optics[_GROUP][dup].iloc[0]} twice", path
        )
    codes = pd.Index(optics[_GROUP]).get_indexer(df[_GROUP])
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise InputError(
            f"data_{block} row {row}: rlnOpticsGroup {df[_GROUP].iloc[row]} is not in "
            f"data_optics (groups {', '.join(map(str, optics[_GROUP]))})",
            path,
        )
    return codes


def _with_group(df: pd.DataFrame, optics: pd.DataFrame, path, block: str) -> pd.DataFrame:
    if _GROUP in df.columns:
        return df
    if len(optics) != 1:
        raise InputError(
            f"data_{block} has no rlnOpticsGroup column but data_optics has {len(optics)} "
            "groups: say which group each row belongs to",
            path,
        )
    return df.assign(**{_GROUP: optics[_GROUP].iloc[0]})


def _merge_optics(df: pd.DataFrame, optics: pd.DataFrame, path, block: str) -> pd.DataFrame:
    df = _with_group(df, optics, path, block)
    codes = _group_codes(df, optics, path, block)
    new = {}
    for col in optics.columns:
        if col == _GROUP:
            continue
        values = optics[col].take(codes).set_axis(df.index)
        if col in df.columns:
            if not _values_equal(df[col], values):
                warnings.warn(
                    f"{path}: {col} is both in data_{block} and data_optics with different "
                    "values; the per-particle values are used, as RELION does",
                    UserWarning,
                    stacklevel=3,
                )
            continue
        new[col] = values
    return pd.concat([df, pd.DataFrame(new, index=df.index)], axis=1) if new else df.copy()


def _synthesize_optics(
    df: pd.DataFrame, pixel_label: str, path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0: optics groups from per-row columns (one per distinct combination)."""
    df = df.copy()
    if pixel_label not in df.columns and {"rlnMagnification", "rlnDetectorPixelSize"} <= set(
        df.columns
    ):
        mag = df["rlnMagnification"].to_numpy(dtype=float)
        det = df["rlnDetectorPixelSize"].to_numpy(dtype=float)
        bad = ~(np.isfinite(mag) & np.isfinite(det) & (mag > 0) & (det > 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"row {row}: rlnMagnification {mag[row]} / rlnDetectorPixelSize {det[row]} "
                "give no pixel size (both must be > 0)",
                path,
            )
        df[pixel_label] = det * 1e4 / mag  # detector pixel in micrometres -> Angstrom
    cols = [
        c
        for c in (
            pixel_label,
            "rlnVoltage",
            "rlnSphericalAberration",
            "rlnAmplitudeContrast",
            "rlnImageSize",
        )
        if c in df.columns
    ]
    if _GROUP not in df.columns:
        if cols:
            ids = df.groupby(cols, sort=False, dropna=False).ngroup().to_numpy() + 1
        else:
            ids = np.ones(len(df), dtype=np.int64)
        df[_GROUP] = ids.astype(np.int64)
    optics = df.groupby(_GROUP, sort=True)[cols].first().reset_index()
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics[_GROUP]])
    return _merge_optics(df, optics, path, "particles"), optics


def split_optics(
    df: pd.DataFrame, optics: pd.DataFrame | None = None, *, keep: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a merged table back into per-row columns and ``data_optics``.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows with optics columns merged in (as :func:`read_particles` gives them).
    optics : pandas.DataFrame, optional
        The optics groups. If omitted they are derived from the columns of ``df`` listed in
        :data:`OPTICS_LABELS`, grouped by ``rlnOpticsGroup`` (one group if absent).
    keep : sequence of str
        Optics columns to keep per row anyway (:attr:`ParticleTable.overrides`).

    Returns
    -------
    rows : pandas.DataFrame
        ``df`` without the optics columns whose values (and dtype) equal their group's on
        every row; columns that differ stay per row, which RELION reads as overrides.
    optics : pandas.DataFrame
        One row per optics group.

    Raises
    ------
    InputError
        A row's group is not in ``optics``; a derived optics column varies within a group.
    """
    if optics is None:
        labels = [c for c in df.columns if c in OPTICS_LABELS]
        if _GROUP not in df.columns:
            df = df.assign(**{_GROUP: np.int64(1)})
        if labels:
            varying = df.groupby(_GROUP, sort=True)[labels].nunique(dropna=False) > 1
            if varying.to_numpy().any():
                group, label = varying.stack()[varying.stack()].index[0]
                raise InputError(
                    f"{label} varies within optics group {group}: give each value its own "
                    "rlnOpticsGroup, or pass optics="
                )
        optics = df.groupby(_GROUP, sort=True)[labels].first().reset_index()
        if "rlnOpticsGroupName" not in optics.columns:
            optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics[_GROUP]])
    optics = optics.reset_index(drop=True)
    df = _with_group(df, optics, None, "particles")
    codes = _group_codes(df, optics, None, "particles")
    drop = [
        c
        for c in optics.columns
        if c != _GROUP
        and c in df.columns
        and c not in keep
        and df[c].dtype == optics[c].dtype
        and _values_equal(df[c], optics[c].take(codes))
    ]
    return df.drop(columns=drop), optics


# ---------------------------------------------------------------- tables


def _pick_block(
    blocks: dict[str, pd.DataFrame], preferred: str, label: str, path: Path, avoid: str | None
) -> str | None:
    """The block holding the table: ``preferred``, else the one block with ``label``."""
    if preferred in blocks:
        return preferred
    found = [
        k for k, v in blocks.items() if label in v.columns and (avoid is None or avoid not in v)
    ]
    if len(found) == 1:
        return found[0]
    for alternate in ("images", ""):  # RELION 3.0 names
        if alternate in (found or blocks):
            return alternate
    if found:
        names = ", ".join(f"data_{k}" for k in found)
        raise InputError(f"several blocks have a {label} column ({names}): which one?", path)
    for k, v in blocks.items():
        if avoid is not None and avoid in v.columns:
            raise InputError(
                f"data_{k} has a {avoid} column: it is a particle table, not {preferred} "
                "(give the micrographs STAR file of a CTF estimation or motion correction job; "
                "in Python, read_particles reads particles)",
                path,
            )
    return None


def _pixel_sizes(df: pd.DataFrame, label: str) -> np.ndarray | None:
    return df[label].to_numpy(dtype=np.float64) if label in df.columns else None


def _pixel_size(df: pd.DataFrame, label: str, path) -> float | None:
    sizes = _pixel_sizes(df, label)
    if sizes is None or not len(sizes):
        return None
    unique = np.unique(sizes[np.isfinite(sizes)])
    if len(unique) == 0:
        return None
    if len(unique) > 1:
        shown = ", ".join(f"{v:g}" for v in unique[:6]) + (", ..." if len(unique) > 6 else "")
        raise InputError(
            f"the rows have {len(unique)} different pixel sizes ({label} {shown} A): use "
            "pixel_sizes, or select rows of one pixel size",
            path,
        )
    return float(unique[0])


@dataclasses.dataclass(eq=False)
class ParticleTable:
    """A RELION particle STAR file, optics merged per particle.

    Attributes
    ----------
    particles : pandas.DataFrame
        One row per particle: the ``data_particles`` columns followed by the columns of its
        optics group (``rlnImagePixelSize``, ``rlnVoltage``, ``rlnSphericalAberration``,
        ``rlnAmplitudeContrast``, ``rlnImageSize``...). For RELION 3.0 files
        ``rlnImagePixelSize`` is computed as ``rlnDetectorPixelSize * 1e4 / rlnMagnification``
        and ``rlnOpticsGroup`` and ``rlnOpticsGroupName`` are added.
    optics : pandas.DataFrame
        One row per optics group (synthesised for RELION 3.0 files).
    version : {"3.0", "3.1+"}
        "3.1+" when the file has a ``data_optics`` block.
    star_path : pathlib.Path or None
        The STAR file read (image paths are resolved relative to it).
    project_dir : pathlib.Path or None
        RELION project folder, tried first when resolving relative image paths.
    overrides : tuple of str
        Optics columns that the file also gives per particle (RELION uses the per-particle
        values); :func:`write_particles` writes them back per particle.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame
    version: str = "3.1+"
    star_path: Path | None = None
    project_dir: Path | None = None
    overrides: tuple[str, ...] = ()
    _stacks: OrderedDict = dataclasses.field(default_factory=OrderedDict, init=False, repr=False)
    _paths: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, init=False, repr=False
    )

    def __len__(self) -> int:
        return self.n

    @property
    def n(self) -> int:
        """Number of particles."""
        return len(self.particles)

    @property
    def stacks(self) -> list[str]:
        """Distinct stack files named in ``rlnImageName``, in order of first use."""
        names = self.particles[_IMAGE].astype(str)
        return list(pd.unique(names.str.split("@", n=1).str[-1]))

    def stack_path(self, stack: str) -> Path:
        """Where the stack file ``stack`` is on disc (see :func:`resolve_stack_path`)."""
        if stack not in self._paths:
            self._paths[stack] = resolve_stack_path(stack, self.star_path, self.project_dir)
        return self._paths[stack]

    def portable_image_names(self, base: str | os.PathLike | None = None) -> pd.Series:
        """``rlnImageName`` as a STAR file written anywhere under ``base`` should give it.

        RELION resolves image names relative to the project folder, the folder it runs in.
        A name that already resolves from ``base`` to the stack read is kept as it is; any
        other (one found next to the input STAR file, or through ``project_dir``) is
        rewritten relative to ``base`` when the stack lies under it, else as an absolute path.
        So an output STAR file in another folder (``Class2D/run_it025_data.star``) names the
        same images, for cryonb and for RELION's programs run from ``base``.

        Parameters
        ----------
        base : str or os.PathLike, optional
            The project folder; default the current directory.

        Returns
        -------
        pandas.Series of str
            One name per particle, ``index@stack`` where the input has an index.
        """
        base = Path.cwd() if base is None else Path(base).absolute()
        names = self.particles[_IMAGE].astype(str)
        parts = names.str.split("@", n=1)
        prefix = parts.map(lambda p: p[0] + "@" if len(p) == 2 else "")
        stack = parts.str[-1]
        new = {}
        for name in pd.unique(stack):
            found = self.stack_path(name).absolute()
            here = base / name
            if Path(name).is_absolute() or (here.is_file() and here.samefile(found)):
                new[name] = name
            else:
                new[name] = project_name(found, base)
        return prefix + stack.map(new)

    def _open_stack(self, stack: str) -> np.ndarray:
        with self._lock:
            data = self._stacks.pop(stack, None)
            if data is None:
                # the file's own dtype, memory-mapped: only the images asked for are converted
                data, _ = _read_stack(
                    self.stack_path(stack), mmap=True, warn_voxel=False, dtype=None
                )
                if data.dtype.kind == "c":
                    raise InputError(
                        f"{stack} holds complex values (MODE 4), not particle images",
                        self.star_path,
                    )
            self._stacks[stack] = data
            while len(self._stacks) > _MAX_OPEN_STACKS:
                self._stacks.popitem(last=False)
            return data

    @property
    def box(self) -> int:
        """Box size in pixels: ``rlnImageSize``, else the first particle's stack.

        Raises
        ------
        InputError
            If the particles have several box sizes, or the images are not square.
        """
        if "rlnImageSize" in self.particles.columns:
            sizes = self.particles["rlnImageSize"].dropna().unique()
            if len(sizes) == 1:
                return int(sizes[0])
            if len(sizes) > 1:
                raise InputError(
                    f"the particles have several box sizes (rlnImageSize "
                    f"{', '.join(str(int(s)) for s in sorted(sizes))}): select one optics group",
                    self.star_path,
                )
        if not self.n:
            raise InputError("no particles, so no box size", self.star_path)
        _, stack = parse_image_name(self.particles[_IMAGE].iloc[0], row=0, path=self.star_path)
        shape = _read_mrc(self.stack_path(stack), header_only=True, warn_voxel=False).shape
        if shape is None or shape[-1] != shape[-2]:
            raise InputError(
                f"{stack} has {shape} images: particle images must be square", self.star_path
            )
        return int(shape[-1])

    @property
    def pixel_sizes(self) -> np.ndarray | None:
        """Per-particle pixel size in Angstrom, shape ``(n,)``, or None if the file has none."""
        return _pixel_sizes(self.particles, "rlnImagePixelSize")

    @property
    def pixel_size(self) -> float | None:
        """The pixel size in Angstrom when all particles share it; None if unknown.

        Raises
        ------
        InputError
            If the particles have several pixel sizes (use :attr:`pixel_sizes`).
        """
        return _pixel_size(self.particles, "rlnImagePixelSize", self.star_path)

    def set_missing_pixel_size(self, angpix: float) -> None:
        """Give the particles (and their optics groups) that have no pixel size ``angpix``
        Angstrom, in place (``rlnImagePixelSize``); rows that have one keep it.

        Parameters
        ----------
        angpix : float
            Pixel size in Angstrom, > 0.
        """
        if not angpix > 0:
            raise ConfigError(f"the pixel size must be > 0 A, not {angpix}")
        for df in (self.particles, self.optics):
            old = (df["rlnImagePixelSize"].to_numpy(dtype=np.float64, na_value=np.nan)
                   if "rlnImagePixelSize" in df.columns else np.full(len(df), np.nan))
            df["rlnImagePixelSize"] = np.where(np.isfinite(old), old, float(angpix))

    def missing_ctf_columns(self) -> list[str]:
        """The columns :meth:`ctf_params` needs that the table lacks (empty: it has a CTF)."""
        need = [*_CTF_REQUIRED.values(), "rlnImagePixelSize"]
        return [c for c in need if c not in self.particles.columns]

    @property
    def has_ctf(self) -> bool:
        """Whether every column :meth:`ctf_params` needs is present."""
        return not self.missing_ctf_columns()

    def ctf_params(self) -> dict[str, np.ndarray]:
        """Per-particle CTF parameters as RELION defines them.

        Returns
        -------
        dict of str to numpy.ndarray
            Each a float64 array of shape ``(n,)``: ``defocus_u``, ``defocus_v`` (Angstrom,
            underfocus positive), ``defocus_angle`` (degrees), ``voltage`` (kV), ``cs`` (mm),
            ``amplitude_contrast`` (fraction), ``phase_shift`` (degrees, 0 if absent),
            ``bfactor`` (A^2, 0 if absent), ``ctf_scalefactor`` (1 if absent), ``pixel_size``
            (Angstrom).

        Raises
        ------
        InputError
            Naming the first missing column, or a row with a missing value.
        """
        missing = self.missing_ctf_columns()
        if missing:
            extra = (
                " (nor rlnMagnification and rlnDetectorPixelSize to derive it)"
                if missing[0] == "rlnImagePixelSize"
                else ""
            )
            raise InputError(
                f"no {missing[0]} column{extra}: cannot compute the CTF "
                f"(missing: {', '.join(missing)})",
                self.star_path,
            )
        out = {}
        columns = {**_CTF_REQUIRED, **{k: c for k, (c, _) in _CTF_OPTIONAL.items()}}
        columns["pixel_size"] = "rlnImagePixelSize"
        for key, col in columns.items():
            if col not in self.particles.columns:
                out[key] = np.full(self.n, _CTF_OPTIONAL[key][1])
                continue
            values = self.particles[col].to_numpy(dtype=np.float64, na_value=np.nan)
            bad = ~np.isfinite(values)
            if bad.any():
                raise InputError(
                    f"{col} row {int(np.flatnonzero(bad)[0])} has no valid value", self.star_path
                )
            out[key] = values
        return out

    def images(self, rows: int | slice | Sequence[int] | np.ndarray | None = None, *,
               out: np.ndarray | None = None) -> np.ndarray:
        """Load particle images.

        Parameters
        ----------
        rows : int, slice, sequence of int, boolean mask or None
            Positions (0-based, as in ``particles.iloc``); None loads all particles.
        out : float32 array of shape (len(rows), box, box), optional
            Where to put the images (a GPU worker's pinned buffer): each image is copied
            from the file's pages straight into it, with no intermediate array (at 128 px a
            pool of 4096 particles took 0.035 s this way instead of 0.13 s with a copy of
            the result).

        Returns
        -------
        numpy.ndarray, shape (len(rows), box, box), float32
            In row order (``out`` if given). Each stack is opened once (memory-mapped) and
            only the images asked for are read.

        Raises
        ------
        InputError
            Bad ``index@stack`` names, missing stack files (listing the places tried), an
            index beyond the stack, non-square images, a box size that disagrees with
            ``rlnImageSize`` or with other stacks.
        """
        positions = np.arange(self.n)[rows] if rows is not None else np.arange(self.n)
        positions = np.atleast_1d(positions)
        if not len(positions):
            return np.empty((0, self.box, self.box), dtype=np.float32) if out is None else out
        names = self.particles[_IMAGE].to_numpy(dtype=object)[positions]
        sizes = (
            self.particles["rlnImageSize"].to_numpy()[positions]
            if "rlnImageSize" in self.particles.columns
            else None
        )
        groups: dict[str, list[tuple[int, int]]] = {}
        for i, (row, name) in enumerate(zip(positions, names)):
            k, stack = parse_image_name(name, row=int(row), path=self.star_path)
            groups.setdefault(stack, []).append((i, k))
        box, first = 0, ""
        parts = []
        for stack, items in groups.items():
            data = self._open_stack(stack)
            _, ny, nx = data.shape
            where = np.array([i for i, _ in items])  # positions in the output
            index0 = np.array([k for _, k in items])  # images in the stack
            self._check_stack(stack, data.shape, where, index0, positions, names, sizes)
            if first and ny != box:
                raise InputError(
                    f"wrong box size: {stack} has {ny} x {nx} images but {first} has {box} x {box}",
                    self.star_path,
                )
            box, first = ny, first or stack
            order = np.argsort(index0, kind="stable")  # read each stack front to back
            if out is None:
                parts.append((where[order], data[index0[order]]))
                continue
            if out.shape != (len(positions), ny, nx) or out.dtype != np.float32:
                raise ValueError(f"out is {out.dtype} {out.shape}; the images need float32 "
                                 f"{(len(positions), ny, nx)}")
            for w, k in zip(where[order].tolist(), index0[order].tolist()):
                out[w] = data[k]  # converts the file's dtype to float32
        if out is not None:
            return out
        out = np.empty((len(positions), box, box), dtype=np.float32)
        for where, images in parts:
            out[where] = images  # converts the file's dtype to float32
        return out

    def _check_stack(self, stack, shape, pos, index0, positions, names, sizes) -> None:
        n, ny, nx = shape
        if ny != nx:
            raise InputError(
                f"{stack} has {ny} x {nx} (y x x) images: particle images must be square",
                self.star_path,
            )
        for p, k in zip(pos, index0):
            if "@" not in names[p] and n != 1:
                raise InputError(
                    f"rlnImageName row {positions[p]} {names[p]!r} names a whole file of {n} "
                    "images: cryonb reads one 2D image per particle ('index@stack')",
                    self.star_path,
                )
            if k >= n:
                raise InputError(
                    f"rlnImageName row {positions[p]} {names[p]!r}: index {k + 1} but {stack} "
                    f"holds {n} images",
                    self.star_path,
                )
        if sizes is not None:
            wrong = [p for p in pos if sizes[p] != ny]
            if wrong:
                p = wrong[0]
                group = (
                    self.particles[_GROUP].iloc[positions[p]] if _GROUP in self.particles else "?"
                )
                raise InputError(
                    f"wrong box size: {stack} has {ny} x {nx} images but optics group {group} "
                    f"says rlnImageSize {sizes[p]}",
                    self.star_path,
                )


@dataclasses.dataclass(eq=False)
class MicrographTable:
    """A RELION micrographs STAR file, optics merged per micrograph.

    Attributes
    ----------
    micrographs : pandas.DataFrame
        One row per micrograph (``rlnMicrographName`` ...) with its optics group's columns
        (``rlnMicrographPixelSize``, ``rlnVoltage`` ...).
    optics : pandas.DataFrame
        One row per optics group (synthesised for RELION 3.0 files).
    version : {"3.0", "3.1+"}
    star_path : pathlib.Path or None
    project_dir : pathlib.Path or None
    overrides : tuple of str
        Optics columns that the file also gives per micrograph.
    """

    micrographs: pd.DataFrame
    optics: pd.DataFrame
    version: str = "3.1+"
    star_path: Path | None = None
    project_dir: Path | None = None
    overrides: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.n

    @property
    def n(self) -> int:
        """Number of micrographs."""
        return len(self.micrographs)

    @property
    def pixel_sizes(self) -> np.ndarray | None:
        """Per-micrograph pixel size in Angstrom, shape ``(n,)``, or None."""
        return _pixel_sizes(self.micrographs, "rlnMicrographPixelSize")

    @property
    def pixel_size(self) -> float | None:
        """The shared pixel size in Angstrom (None if unknown; InputError if several)."""
        return _pixel_size(self.micrographs, "rlnMicrographPixelSize", self.star_path)

    def micrograph_path(self, row: int) -> Path:
        """Where the micrograph of row ``row`` (0-based) is on disc.

        Raises
        ------
        InputError
            If it is not found (see :func:`resolve_stack_path`).
        """
        name = self.micrographs[_MICROGRAPH].iloc[row]
        return resolve_stack_path(name, self.star_path, self.project_dir, what="micrograph")


def _table_fields(
    blocks: dict[str, pd.DataFrame],
    path: Path,
    project_dir,
    preferred: str,
    label: str,
    pixel_label: str,
    needs: str,
    avoid: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, str, Path, Path | None, tuple[str, ...]]:
    """Pick the table block of a read STAR file, merge or synthesise its optics.

    Returns (rows, optics, version, path, project_dir, overrides): the table's fields.
    """
    name = _pick_block(blocks, preferred, label, path, avoid)
    if name is None or label not in blocks[name].columns:
        where = (
            f"data_{name}"
            if name is not None
            else "this file (blocks " + ", ".join(f"data_{k}" for k in blocks) + ")"
        )
        raise InputError(f"{where} has no {label} column: {needs}", path)
    df = blocks[name].reset_index(drop=True)
    df.attrs = {}
    if "optics" in blocks and name != "optics":
        optics = blocks["optics"].reset_index(drop=True)
        optics.attrs = {}
        merged, version = _merge_optics(df, optics, path, name), "3.1+"
        overrides = tuple(c for c in optics.columns if c != _GROUP and c in df.columns)
    else:
        (merged, optics), version = _synthesize_optics(df, pixel_label, path), "3.0"
        overrides = ()
    pdir = None if project_dir is None else Path(project_dir)
    return merged, optics, version, path, pdir, overrides


def _particles_from_blocks(blocks, path: Path, project_dir=None) -> ParticleTable:
    fields = _table_fields(
        blocks, path, project_dir, "particles", _IMAGE, "rlnImagePixelSize", _NEEDS_IMAGES
    )
    _check_image_names(fields[0][_IMAGE], path)
    return ParticleTable(*fields)


def _micrographs_from_blocks(blocks, path: Path, project_dir=None) -> MicrographTable:
    needs = "not a micrographs STAR file (RELION Import, MotionCorr or CtfFind output)"
    label, pixel = _MICROGRAPH, "rlnMicrographPixelSize"
    fields = _table_fields(blocks, path, project_dir, "micrographs", label, pixel, needs, _IMAGE)
    return MicrographTable(*fields)


def read_particles(
    path: str | os.PathLike, *, project_dir: str | os.PathLike | None = None
) -> ParticleTable:
    """Read a RELION particle STAR file (RELION 3.0, 3.1, 4 or 5).

    Parameters
    ----------
    path : str or os.PathLike
        STAR file with ``data_optics`` + ``data_particles`` (3.1+) or a single particle block
        (3.0: ``data_``, ``data_images``, or any one block with ``rlnImageName``).
    project_dir : str or os.PathLike, optional
        RELION project folder, for resolving relative stack paths (see
        :func:`resolve_stack_path`).

    Returns
    -------
    ParticleTable

    Raises
    ------
    InputError
        Any :func:`read_star` error; no ``rlnImageName`` column ("... has no rlnImageName
        column: cryonb needs particle images; ..."); malformed ``index@stack`` names (first bad
        row); particles in an optics group that ``data_optics`` lacks.
    """
    return _particles_from_blocks(read_star(path), Path(path), project_dir)


def read_micrographs(
    path: str | os.PathLike, *, project_dir: str | os.PathLike | None = None
) -> MicrographTable:
    """Read a RELION micrographs STAR file (``data_optics`` + ``data_micrographs``, or 3.0).

    Optics are merged per micrograph as in :func:`read_particles`; for RELION 3.0 files
    ``rlnMicrographPixelSize`` is computed from ``rlnDetectorPixelSize`` and
    ``rlnMagnification``.

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.
    project_dir : str or os.PathLike, optional
        RELION project folder, for :meth:`MicrographTable.micrograph_path`.

    Returns
    -------
    MicrographTable

    Raises
    ------
    InputError
        Any :func:`read_star` error, or no ``rlnMicrographName`` column; a particle file.
    """
    return _micrographs_from_blocks(read_star(path), Path(path), project_dir)


def write_particles(
    path: str | os.PathLike,
    table_or_df: ParticleTable | pd.DataFrame,
    optics: pd.DataFrame | None = None,
    *,
    version: str = "3.1",
) -> None:
    """Write particles as a RELION STAR file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    table_or_df : ParticleTable or pandas.DataFrame
        Merged particle rows (optics columns per particle, as :func:`read_particles` gives).
    optics : pandas.DataFrame, optional
        Optics groups; default the table's own, or derived with :func:`split_optics`.
    version : {"3.1", "3.0"}
        "3.1" (also right for RELION 4 and 5): ``data_optics`` + ``data_particles``, the
        optics columns moved out of the particle rows. "3.0": one ``data_`` block with the
        optics values per particle (``rlnMagnification = 10000`` and ``rlnDetectorPixelSize``
        = pixel size are added when only ``rlnImagePixelSize`` is known).

    Raises
    ------
    ConfigError
        Unknown ``version`` or input type.
    InputError
        See :func:`split_optics`.
    """
    keep: tuple[str, ...] = ()
    if isinstance(table_or_df, ParticleTable):
        df, keep = table_or_df.particles, table_or_df.overrides
        optics = table_or_df.optics if optics is None else optics
    elif isinstance(table_or_df, pd.DataFrame):
        df = table_or_df
    else:
        raise ConfigError(
            f"write_particles takes a ParticleTable or DataFrame, not {type(table_or_df)}"
        )
    if version in ("3.1", "3.1+", "4", "5"):
        rows, opt = split_optics(df, optics, keep=keep)
        missing = [c for c in ("rlnImageSize", "rlnImageDimensionality") if c not in opt]
        if missing:
            warnings.warn(
                f"{path}: data_optics has no {' or '.join(missing)}, which RELION 3.1+ needs "
                "for particles (e.g. optics['rlnImageSize'] = table.box; "
                "optics['rlnImageDimensionality'] = 2)",
                UserWarning,
                stacklevel=2,
            )
        blocks = {"optics": opt.copy(), "particles": rows.copy()}
    elif version == "3.0":
        out = df.drop(columns=[c for c in (_GROUP, "rlnOpticsGroupName") if c in df.columns])
        if "rlnImagePixelSize" in out.columns and not {
            "rlnMagnification",
            "rlnDetectorPixelSize",
        } <= set(out.columns):
            out = out.assign(rlnDetectorPixelSize=out["rlnImagePixelSize"], rlnMagnification=1e4)
        blocks = {"": out.copy()}
    else:
        raise ConfigError(f"version must be '3.1' or '3.0', not {version!r}")
    for block in blocks.values():
        block.attrs = {_LOOP_ATTR: True}
    # particle columns formatted already (a job's unchanged inputs, see star_tokens)
    if TOKENS_ATTR in df.attrs:
        blocks["particles" if "particles" in blocks else ""].attrs[TOKENS_ATTR] = df.attrs[
            TOKENS_ATTR]
    write_star(path, blocks)
