"""Autopicking files: micrograph inputs, coordinate files and their lists, as RELION writes them.

RELION names a micrograph's coordinate file after the part of the micrograph's path that
follows its ``jobNNN/`` folder (``MotionCorr/job002/Movies/m1.mrc`` -> ``Movies/m1``):
``<odir><that, without extension>_<pickname>.star``. ``relion_preprocess`` finds coordinates
the same way (``--coord_dir`` + that + ``--coord_suffix``).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..ctf import CTFParams
from ..errors import ConfigError, InputError

__all__ = [
    "MicrographSet",
    "coordinate_path",
    "micrograph_root",
    "read_coordinates",
    "write_coordinate_list",
    "write_coordinates",
]

_JOB = re.compile(r"/job\d{3}/")
_CTF_COLUMNS = {
    "defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage", "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
}
_CTF_OPTIONAL = {"phase_shift": "rlnPhaseShift", "bfactor": "rlnCtfBfactor",
                 "scale": "rlnCtfScalefactor"}


def micrograph_root(name: str) -> str:
    """The part of a micrograph name RELION keeps for output names (RELION's
    ``decomposePipelineFileName``): what follows the first ``/jobNNN/``, without extension.

    The root is relative, so that the outputs named from it stay in the output folder: a
    leading ``/`` (a micrograph named by its absolute path) and ``.``/``..`` parts are
    dropped. RELION joins the two as strings (``AutoPick/job006//data/raw/m1``, the same
    folder for an absolute name) and lets ``..`` climb out; a join of paths would have put
    the coordinate files and particle stacks next to the micrographs.

    Examples
    --------
    >>> micrograph_root("MotionCorr/job002/Movies/m1.mrc")
    'Movies/m1'
    >>> micrograph_root("Micrographs/mic001.mrc")
    'Micrographs/mic001'
    >>> micrograph_root("/data/raw/m1.mrc")
    'data/raw/m1'
    >>> micrograph_root("../other/./m1.mrc")
    'other/m1'
    """
    m = _JOB.search(name)
    post = name[m.end():] if m else name
    root, _ = os.path.splitext(post)
    parts = [p for p in root.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts)


def coordinate_path(odir, micrograph_name: str, pickname: str = "autopick",
                    suffix: str | None = None) -> Path:
    """Where the coordinate file of a micrograph goes: ``<odir><root>_<pickname>.star``.

    Parameters
    ----------
    odir : str or os.PathLike
        Output (or ``--coord_dir``) folder.
    micrograph_name : str
        ``rlnMicrographName``.
    pickname : str
        RELION's ``--pickname``.
    suffix : str, optional
        The whole suffix instead (``relion_preprocess --coord_suffix``, e.g. ``_autopick.star``).
    """
    tail = suffix if suffix is not None else f"_{pickname}.star"
    return Path(str(odir)) / (micrograph_root(micrograph_name) + tail)


def write_coordinates(path, picks: pd.DataFrame) -> None:
    """Write one micrograph's picks as a RELION coordinate STAR file (atomic).

    One unnamed ``data_`` block with the columns of ``picks`` (``rlnCoordinateX/Y`` first).
    A micrograph without picks gets the header and no rows (RELION 3.1 writes an empty file;
    both read back as no particles in RELION and in :func:`read_coordinates`).
    """
    from ..io import write_star

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_star(path, {"": picks.reset_index(drop=True)})


def read_coordinates(path) -> pd.DataFrame:
    """Read a coordinate file: RELION STAR (``rlnCoordinateX/Y``), ``.box`` or plain text.

    Parameters
    ----------
    path : str or os.PathLike
        ``.star`` (any columns, ``rlnCoordinateX`` and ``rlnCoordinateY`` required; an empty,
        0-byte file as RELION writes for a micrograph without picks reads as no rows);
        ``.box`` (EMAN: ``x y w h``, the centre is ``x + w/2, y + h/2``); anything else: text
        with ``x y`` per line.

    Returns
    -------
    pandas.DataFrame
        ``rlnCoordinateX``, ``rlnCoordinateY`` (pixels) and any other columns of a STAR file.

    Raises
    ------
    InputError
        A missing file or one without coordinates.
    """
    from ..io import read_star

    p = Path(path)
    if not p.is_file():
        raise InputError("coordinate file not found", p)
    if p.stat().st_size == 0:
        return pd.DataFrame({"rlnCoordinateX": pd.Series(dtype=float),
                             "rlnCoordinateY": pd.Series(dtype=float)})
    if p.suffix.lower() == ".star":
        for df in read_star(p).values():
            if {"rlnCoordinateX", "rlnCoordinateY"} <= set(df.columns):
                return df.reset_index(drop=True)
        raise InputError("no block has rlnCoordinateX and rlnCoordinateY", p)
    try:
        values = np.loadtxt(p, ndmin=2)
    except ValueError as exc:
        raise InputError(f"cannot read coordinates ({exc}): expected numbers 'x y' per line",
                         p) from exc
    if values.shape[1] < (4 if p.suffix.lower() == ".box" else 2):
        raise InputError(f"expected {'x y w h' if p.suffix.lower() == '.box' else 'x y'} per "
                         f"line, found {values.shape[1]} columns", p)
    if p.suffix.lower() == ".box":
        x, y = values[:, 0] + values[:, 2] / 2, values[:, 1] + values[:, 3] / 2
    else:
        x, y = values[:, 0], values[:, 1]
    return pd.DataFrame({"rlnCoordinateX": x, "rlnCoordinateY": y})


def write_coordinate_list(path, micrograph_names, coordinate_files) -> None:
    """Write the list of coordinate files (RELION 4+'s ``autopick.star``, block
    ``coordinate_files``: ``rlnMicrographName``, ``rlnMicrographCoordinates``)."""
    from ..io import write_star

    df = pd.DataFrame({"rlnMicrographName": [str(n) for n in micrograph_names],
                       "rlnMicrographCoordinates": [str(f) for f in coordinate_files]})
    write_star(path, {"coordinate_files": df})


@dataclass
class MicrographSet:
    """The micrographs of a run: names, files, pixel size, CTFs.

    Attributes
    ----------
    names : list of str
        ``rlnMicrographName`` as written in the STAR file (or the file names of a glob).
    paths : list of pathlib.Path
        Where they are on disc.
    pixel_size : float
        Angstrom per pixel (``rlnMicrographPixelSize``, else ``--angpix``).
    table : pandas.DataFrame or None
        The micrographs STAR rows (optics merged), when read from a STAR file.
    optics : pandas.DataFrame or None
    """

    names: list
    paths: list
    pixel_size: float
    table: pd.DataFrame | None = None
    optics: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def read(cls, spec: str, angpix: float = -1.0, *, need_ctf: bool = False) -> MicrographSet:
        """Read a micrographs STAR file, or list the MRC files of a glob pattern.

        Parameters
        ----------
        spec : str
            ``micrographs.star`` (RELION 3.0 or 3.1+) or a pattern such as
            ``"Micrographs/*.mrc"``.
        angpix : float
            Pixel size (A) when the STAR file gives none, or for a glob; with a STAR file that
            has ``rlnMicrographPixelSize`` it is ignored, as RELION does.
        need_ctf : bool
            Fail unless every micrograph has CTF parameters (``--ctf``).

        Raises
        ------
        InputError
            No micrographs, several pixel sizes, missing CTF columns.
        ConfigError
            No pixel size anywhere; ``--ctf`` with a glob.
        """
        from ..io import read_micrographs, read_mrc_header

        if not spec:
            raise ConfigError("--i is required: a micrographs STAR file or a glob of MRC files")
        if str(spec).lower().endswith(".star"):
            mt = read_micrographs(spec)
            if not mt.n:
                raise InputError("lists no micrographs", spec)
            apix = mt.pixel_size
            if apix is None:
                if angpix <= 0:
                    raise ConfigError(f"{spec} gives no pixel size (rlnMicrographPixelSize): "
                                      "give --angpix")
                apix = angpix
            names = [str(n) for n in mt.micrographs["rlnMicrographName"]]
            paths = [mt.micrograph_path(i) for i in range(mt.n)]
            out = cls(names, paths, float(apix), mt.micrographs, mt.optics)
            if need_ctf:
                missing = [c for c in _CTF_COLUMNS.values() if c not in mt.micrographs.columns]
                if missing:
                    raise InputError(f"--ctf needs the CTF of every micrograph; missing "
                                     f"{', '.join(missing)} (run CTF estimation first)", spec)
            return out
        if need_ctf:
            raise ConfigError("--ctf needs a micrographs STAR file with the CTF parameters, "
                              "not a list of files")
        files = sorted(glob.glob(str(spec)))
        if not files:
            raise InputError(f"no file matches {spec!r}")
        apix = angpix
        if apix <= 0:
            apix = read_mrc_header(files[0]).voxel_size or -1.0
        if apix <= 0:
            raise ConfigError(f"{files[0]} gives no pixel size: give --angpix")
        return cls(files, [Path(f) for f in files], float(apix))

    def ctf(self, i: int) -> CTFParams | None:
        """CTF parameters of micrograph ``i`` (scalars), or None without a STAR table.

        Raises
        ------
        InputError
            A missing or non-finite value.
        """
        if self.table is None or any(c not in self.table.columns
                                     for c in _CTF_COLUMNS.values()):
            return None
        row = self.table.iloc[i]
        values = {k: row[c] for k, c in _CTF_COLUMNS.items()}
        values.update({k: row[c] for k, c in _CTF_OPTIONAL.items() if c in self.table.columns})
        bad = [k for k, v in values.items() if not np.isfinite(float(v))]
        if bad:
            raise InputError(f"micrograph {self.names[i]} has no valid "
                             f"{', '.join((_CTF_COLUMNS | _CTF_OPTIONAL)[k] for k in bad)}")
        return CTFParams.from_dict({k: float(v) for k, v in values.items()})

    def image(self, i: int) -> np.ndarray:
        """Micrograph ``i`` as a float32 ``(y, x)`` array.

        Raises
        ------
        InputError
            Unreadable, or not one 2D image.
        """
        from ..io import read_mrc

        vol = read_mrc(self.paths[i])
        data = vol.data
        assert data is not None
        if data.ndim == 3 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 2:
            raise InputError(f"holds data of shape {data.shape}, not one 2D micrograph",
                             self.paths[i])
        return data

    def shape(self) -> tuple[int, int]:
        """``(ysize, xsize)`` of the first micrograph (all must share it)."""
        from ..io import read_mrc_header

        shape = read_mrc_header(self.paths[0]).shape
        if shape is None or len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
            raise InputError(f"holds data of shape {shape}, not one 2D micrograph",
                             self.paths[0])
        return int(shape[-2]), int(shape[-1])
