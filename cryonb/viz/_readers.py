"""What the views show, read from RELION-style files (NumPy and pandas only, no plotting).

Class2D output of iteration ``i`` is ``<root>_it###_classes.mrcs``, ``_model.star`` and
``_data.star`` (``<root>_ct#_it###_...`` after a ``--continue``), as ``relion_refine`` and
:mod:`cryonb.em` write them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import read_stack, read_star

__all__ = [
    "ClassOutput",
    "class_changes",
    "find_class2d_roots",
    "fsc_table",
    "iteration_files",
    "parse_iteration_path",
    "read_class_output",
    "read_convergence",
    "read_particle_angles",
    "ssnr_table",
    "star_summary",
]

_ITERATION_FILE = re.compile(
    r"^(?P<root>.+?)(?:_ct\d+)?_it(?P<it>\d{3,})_(?P<kind>classes|model|data|optimiser|sampling)"
    r"\.(?:mrcs|star)$"
)
_CLASS_BLOCK = re.compile(r"^model_class_(\d+)$")
_FSC_LABEL = re.compile(r"(?i)fsc|fouriershellcorrelation|frc")

#: Columns of :func:`read_convergence` and of :class:`cryonb.viz.LiveConvergence`.
CONVERGENCE_COLUMNS = (
    "iteration",
    "log_likelihood",
    "avg_pmax",
    "changes_classes",
    "changes_psi",
    "current_resolution",
    "current_size",
    "n_empty",
)


@dataclasses.dataclass
class ClassOutput:
    """Class averages of one iteration and what is known about each class.

    Attributes
    ----------
    classes : numpy.ndarray, shape (K, N, N), float32
        The class averages (row 0 of each image is y = 0).
    pdf : numpy.ndarray, shape (K,), or None
        Fraction of the particles in each class (``rlnClassDistribution``).
    resolution : numpy.ndarray, shape (K,), or None
        Estimated resolution of each class in Angstrom (``rlnEstimatedResolution``).
    iteration : int or None
        The iteration, when known.
    particles : pandas.DataFrame or None
        One row per particle with ``rlnClassNumber`` (1-based) and ``rlnAnglePsi`` (degrees).
    pixel_size : float or None
        Angstrom per pixel.
    source : pathlib.Path or None
        The file the class averages came from.
    """

    classes: np.ndarray
    pdf: np.ndarray | None = None
    resolution: np.ndarray | None = None
    iteration: int | None = None
    particles: pd.DataFrame | None = None
    pixel_size: float | None = None
    source: Path | None = None


def parse_iteration_path(path: str | os.PathLike) -> tuple[str, int, str] | None:
    """Split ``<root>[_ct#]_it###_<kind>.<ext>`` into ``(root, iteration, kind)``.

    Parameters
    ----------
    path : str or os.PathLike
        Any path.

    Returns
    -------
    tuple of (str, int, str) or None
        ``root`` keeps its folder; ``kind`` is ``classes``, ``model``, ``data``,
        ``optimiser`` or ``sampling``. ``None`` when the name does not follow the pattern.
    """
    p = Path(path)
    m = _ITERATION_FILE.match(p.name)
    if m is None:
        return None
    return str(p.parent / m["root"]), int(m["it"]), m["kind"]


def iteration_files(root: str | os.PathLike) -> dict[int, dict[str, Path]]:
    """The iteration files of an output root, by iteration.

    Parameters
    ----------
    root : str or os.PathLike
        The ``--o`` root, e.g. ``Class2D/job007/run``.

    Returns
    -------
    dict of int to dict of str to pathlib.Path
        ``{iteration: {kind: path}}`` in iteration order; when a ``--continue`` rewrote an
        iteration, the newest file of each kind wins.
    """
    r = Path(root)
    out: dict[int, dict[str, Path]] = {}
    if not r.parent.is_dir():
        return out
    for p in r.parent.glob(f"{glob.escape(r.name)}*_it*_*"):
        parsed = parse_iteration_path(p)
        if parsed is None or Path(parsed[0]) != r:
            continue
        _, it, kind = parsed
        files = out.setdefault(it, {})
        if kind not in files or p.stat().st_mtime > files[kind].stat().st_mtime:
            files[kind] = p
    return dict(sorted(out.items()))


def find_class2d_roots(path: str | os.PathLike) -> list[str]:
    """Output roots with ``_it###_model.star`` files at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        A folder (every root in it), or a root itself.

    Returns
    -------
    list of str
        Sorted; empty when there is none.
    """
    p = Path(path)
    if p.is_dir():
        roots = {parse_iteration_path(f) for f in p.glob("*_it*_model.star")}
        return sorted({r[0] for r in roots if r is not None})
    return [str(p)] if any("model" in f for f in iteration_files(p).values()) else []


@functools.lru_cache(maxsize=128)
def _read_star_cached(path: str, mtime_ns: int, size: int) -> dict[str, pd.DataFrame]:
    return read_star(path)


def _read_star(path: Path) -> dict[str, pd.DataFrame]:
    """:func:`read_star`, cached by path, modification time and size (files are rewritten
    atomically, so a changed file has a new time). Callers must not modify the tables."""
    st = Path(path).stat()
    return _read_star_cached(str(path), st.st_mtime_ns, st.st_size)


def _one_row(blocks: Mapping[str, pd.DataFrame], name: str) -> pd.Series | None:
    df = blocks.get(name)
    return None if df is None or len(df) == 0 else df.iloc[0]


def _particle_block(blocks: Mapping[str, pd.DataFrame]) -> pd.DataFrame | None:
    for name in ("particles", "", "images"):
        df = blocks.get(name)
        if df is not None and "rlnClassNumber" in df.columns:
            return df
    return None


def read_particle_angles(path: str | os.PathLike, *, required: bool = False
                         ) -> pd.DataFrame | None:
    """``rlnClassNumber`` and ``rlnAnglePsi`` (and ``rlnImageName``) of a ``_data.star``.

    Parameters
    ----------
    path : str or os.PathLike
        A particle STAR file with ``rlnClassNumber`` (RELION 3.0 or 3.1 layout).
    required : bool, default False
        Raise instead of returning ``None`` when the file has no such table.

    Returns
    -------
    pandas.DataFrame or None
        Cached by path, modification time and size; do not modify it.

    Raises
    ------
    InputError
        When the file cannot be read, or (with ``required``) has no particle table with
        ``rlnClassNumber``.
    """
    st = Path(path).stat()
    out = _particle_angles_cached(str(path), st.st_mtime_ns, st.st_size)
    if out is None and required:
        raise InputError("has no particle table with rlnClassNumber", path)
    return out


@functools.lru_cache(maxsize=64)
def _particle_angles_cached(path: str, mtime_ns: int, size: int) -> pd.DataFrame | None:
    df = _particle_block(read_star(path))
    if df is None:
        return None
    keep = [c for c in ("rlnImageName", "rlnClassNumber", "rlnAnglePsi") if c in df.columns]
    return df[keep].copy()


def _model_facts(blocks: Mapping[str, pd.DataFrame], path: Path):
    classes = blocks.get("model_classes")
    if classes is None or "rlnClassDistribution" not in classes.columns:
        raise InputError("has no data_model_classes block with rlnClassDistribution", path)
    pdf = classes["rlnClassDistribution"].to_numpy(np.float64)
    res = (classes["rlnEstimatedResolution"].to_numpy(np.float64)
           if "rlnEstimatedResolution" in classes.columns else None)
    general = _one_row(blocks, "model_general")
    apix = None
    if general is not None and "rlnPixelSize" in general.index:
        apix = float(general["rlnPixelSize"]) or None
    return pdf, res, apix


def read_class_output(
    source: str | os.PathLike,
    iteration: int | None = None,
    *,
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
) -> ClassOutput:
    """Read class averages with their distribution, resolution and particles' angles.

    Parameters
    ----------
    source : str or os.PathLike
        A ``<root>_it###_classes.mrcs`` (its ``_model.star`` and ``_data.star`` are read when
        they exist), a ``_model.star``, an output root (the last iteration, or
        ``iteration``), or any other image stack (then only the images).
    iteration : int, optional
        With a root: which iteration (default the last one with class averages).
    model, data : str or os.PathLike, optional
        The ``_model.star`` / ``_data.star`` to use instead of the matching ones.

    Returns
    -------
    ClassOutput

    Raises
    ------
    InputError
        When the files cannot be read, the root has no class averages, or the model gives a
        different number of classes than the stack holds.
    """
    p = Path(source)
    files: dict[str, Path] = {}
    it: int | None = None
    parsed = parse_iteration_path(p)
    if parsed is not None:
        root, it, _ = parsed
        files = iteration_files(root).get(it, {})
        files.setdefault(parsed[2], p)
    elif not p.exists():
        its = {i: f for i, f in iteration_files(p).items() if "classes" in f}
        if not its:
            raise InputError("is no file, and no output root with _it###_classes.mrcs files", p)
        it = iteration if iteration is not None else max(its)
        if it not in its:
            raise InputError(f"has no class averages of iteration {it} (has {sorted(its)})", p)
        files = its[it]
    else:
        files = {"classes": p}
    if model is not None:
        files["model"] = Path(model)
    if data is not None:
        files["data"] = Path(data)
    pdf = res = apix = None
    if "model" in files:
        blocks = _read_star(files["model"])
        pdf, res, apix = _model_facts(blocks, files["model"])
        if "classes" not in files:
            ref = blocks["model_classes"].get("rlnReferenceImage")
            if ref is None or not len(ref):
                raise InputError("names no class averages (rlnReferenceImage)", files["model"])
            files["classes"] = files["model"].parent / str(ref.iloc[0]).split("@", 1)[-1]
    if "classes" not in files:
        raise InputError(f"iteration {it} has no _classes.mrcs file", p)
    stack, stack_apix = read_stack(files["classes"], mmap=False)
    if pdf is not None and len(pdf) != len(stack):
        raise InputError(
            f"{files['model'].name} describes {len(pdf)} classes but "
            f"{files['classes'].name} holds {len(stack)} images: files of different runs?",
            files["model"],
        )
    particles = read_particle_angles(files["data"]) if files.get("data") else None
    return ClassOutput(np.asarray(stack, np.float32), pdf, res, it, particles,
                       apix or stack_apix, files["classes"])


def class_changes(before: pd.DataFrame | None, after: pd.DataFrame | None) -> tuple[float, float]:
    """How many particles changed class, and by how much their in-plane angle moved.

    Parameters
    ----------
    before, after : pandas.DataFrame or None
        Particle tables of two iterations with ``rlnClassNumber`` and ``rlnAnglePsi``,
        matched by ``rlnImageName`` when both have unique names, else row by row.

    Returns
    -------
    changes_classes : float
        Fraction of the particles whose class changed (NaN when unknown).
    changes_psi : float
        Mean absolute change of ``rlnAnglePsi``, in degrees, wrapped to [0, 180].
    """
    nan = (float("nan"), float("nan"))
    if before is None or after is None or "rlnClassNumber" not in before.columns:
        return nan
    if (
        "rlnImageName" in before.columns and "rlnImageName" in after.columns
        and before["rlnImageName"].is_unique and after["rlnImageName"].is_unique
    ):
        joined = after.merge(before, on="rlnImageName", suffixes=("", "_before"))
    elif len(before) == len(after):
        joined = after.reset_index(drop=True).join(
            before.reset_index(drop=True), rsuffix="_before")
    else:
        return nan
    if len(joined) == 0:
        return nan
    changed = float(np.mean(joined["rlnClassNumber"] != joined["rlnClassNumber_before"]))
    dpsi = float("nan")
    if "rlnAnglePsi" in joined.columns and "rlnAnglePsi_before" in joined.columns:
        d = np.abs(joined["rlnAnglePsi"].to_numpy() - joined["rlnAnglePsi_before"].to_numpy())
        d = np.mod(d, 360.0)
        dpsi = float(np.mean(np.minimum(d, 360.0 - d)))
    return changed, dpsi


def read_convergence(root: str | os.PathLike, *, changes: bool = True) -> pd.DataFrame:
    """Per-iteration figures of a run, from its ``_it###_model.star`` (and ``_data.star``).

    Parameters
    ----------
    root : str or os.PathLike
        The output root, or one of its iteration files.
    changes : bool, default True
        Also compare the ``_data.star`` of successive iterations (class and in-plane angle
        changes); reads every data file, so slower for large particle sets.

    Returns
    -------
    pandas.DataFrame
        One row per iteration from 1 on (iteration 0 is the initial state), with the
        columns ``iteration, log_likelihood, avg_pmax, changes_classes`` (fraction),
        ``changes_psi`` (degrees), ``current_resolution`` (Angstrom), ``current_size``
        (pixels), ``n_empty`` (classes holding no particle). Unknown values are NaN.

    Raises
    ------
    InputError
        When there is no ``_model.star`` for the root.
    """
    parsed = parse_iteration_path(root)
    root_str = parsed[0] if parsed else str(root)
    its = iteration_files(root_str)
    if not any("model" in f for f in its.values()):
        raise InputError("no <root>_it###_model.star files for this output root", root_str)
    rows = []
    previous = None
    for it, files in its.items():
        current = read_particle_angles(files["data"]) if changes and "data" in files else None
        if it > 0 and "model" in files:
            blocks = _read_star(files["model"])
            g = _one_row(blocks, "model_general")
            if g is None:
                raise InputError("has no data_model_general block", files["model"])
            pdf = blocks.get("model_classes", pd.DataFrame()).get("rlnClassDistribution")
            moved = class_changes(previous, current)
            rows.append({
                "iteration": it,
                "log_likelihood": g.get("rlnLogLikelihood", np.nan),
                "avg_pmax": g.get("rlnAveragePmax", np.nan),
                "changes_classes": moved[0],
                "changes_psi": moved[1],
                "current_resolution": g.get("rlnCurrentResolution", np.nan),
                "current_size": g.get("rlnCurrentImageSize", np.nan),
                "n_empty": np.nan if pdf is None else int((pdf <= 0).sum()),
            })
        previous = current
    return pd.DataFrame(rows, columns=list(CONVERGENCE_COLUMNS)).astype(float).astype(
        {"iteration": int})


def ssnr_table(blocks: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The SSNR of every class of a ``_model.star``, as one long table.

    Parameters
    ----------
    blocks : mapping of str to pandas.DataFrame
        The blocks of a model STAR file (:func:`cryonb.io.read_star`).

    Returns
    -------
    pandas.DataFrame
        Columns ``class`` (1-based), ``resolution`` (1/Angstrom), ``angstrom``, ``ssnr``
        (``rlnSsnrMap``), ``estimated_resolution`` (Angstrom, from ``data_model_classes``,
        NaN if not given); empty when no ``data_model_class_N`` block has ``rlnSsnrMap``.
    """
    classes = blocks.get("model_classes")
    est = None
    if classes is not None and "rlnEstimatedResolution" in classes.columns:
        est = classes["rlnEstimatedResolution"].to_numpy(np.float64)
    parts = []
    for name, df in blocks.items():
        m = _CLASS_BLOCK.match(name)
        if m is None or "rlnSsnrMap" not in df.columns or "rlnResolution" not in df.columns:
            continue
        k = int(m[1])
        inv = df["rlnResolution"].to_numpy(np.float64)
        with np.errstate(divide="ignore"):
            ang = (df["rlnAngstromResolution"].to_numpy(np.float64)
                   if "rlnAngstromResolution" in df.columns else np.where(inv > 0, 1 / inv, np.inf))
        parts.append(pd.DataFrame({
            "class": k, "resolution": inv, "angstrom": ang,
            "ssnr": df["rlnSsnrMap"].to_numpy(np.float64),
            "estimated_resolution": est[k - 1] if est is not None and k <= len(est) else np.nan,
        }))
    if not parts:
        return pd.DataFrame(columns=["class", "resolution", "angstrom", "ssnr",
                                     "estimated_resolution"])
    return pd.concat(parts, ignore_index=True)


def fsc_table(blocks: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every FSC/FRC-like curve of a STAR file, as one long table.

    Parameters
    ----------
    blocks : mapping of str to pandas.DataFrame
        Blocks of a STAR file: ``_model.star`` (``rlnGoldStandardFsc`` per class),
        ``postprocess.star`` (``data_fsc``), ...

    Returns
    -------
    pandas.DataFrame
        Columns ``curve`` (``"<block>: <label>"``), ``resolution`` (1/Angstrom), ``value``;
        one curve per column whose label names an FSC or FRC, in a block with
        ``rlnResolution``.
    """
    parts = []
    for name, df in blocks.items():
        if "rlnResolution" not in df.columns or len(df) < 2:
            continue
        for col in df.columns:
            if _FSC_LABEL.search(col) and pd.api.types.is_numeric_dtype(df[col]):
                parts.append(pd.DataFrame({
                    "curve": f"{name}: {col.removeprefix('rln')}",
                    "resolution": df["rlnResolution"].to_numpy(np.float64),
                    "value": df[col].to_numpy(np.float64),
                }))
    if not parts:
        return pd.DataFrame(columns=["curve", "resolution", "value"])
    return pd.concat(parts, ignore_index=True)


def _counts(series: pd.Series, what: str, names: Mapping | None = None) -> pd.DataFrame:
    counts = series.value_counts().sort_index()
    out = pd.DataFrame({what: counts.index, "particles": counts.to_numpy()})
    out["percent"] = 100.0 * out["particles"] / max(1, int(out["particles"].sum()))
    if names:
        out.insert(1, "name", [str(names.get(v, "")) for v in out[what]])
    return out


def star_summary(blocks: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Summary tables of a STAR file.

    Parameters
    ----------
    blocks : mapping of str to pandas.DataFrame
        As :func:`cryonb.io.read_star` gives them.

    Returns
    -------
    dict of str to pandas.DataFrame
        ``"blocks"``: name, kind (loop or key-value), rows, columns and the first column
        names of every block. For the first block of particles (a loop with
        ``rlnImageName``): ``"classes"`` (particles per ``rlnClassNumber``) and
        ``"optics groups"`` (per ``rlnOpticsGroup``, with the group names of
        ``data_optics``), when those columns exist.
    """
    rows = []
    for name, df in blocks.items():
        cols = [str(c) for c in df.columns]
        rows.append({
            "block": f"data_{name}",
            "kind": "loop" if df.attrs.get("star_loop", True) else "key-value",
            "rows": len(df),
            "columns": len(cols),
            "first columns": ", ".join(c.removeprefix("rln") for c in cols[:4])
            + (", ..." if len(cols) > 4 else ""),
        })
    out = {"blocks": pd.DataFrame(rows)}
    particles = next((df for df in blocks.values() if "rlnImageName" in df.columns), None)
    if particles is None:
        return out
    if "rlnClassNumber" in particles.columns:
        out["classes"] = _counts(particles["rlnClassNumber"], "class")
    if "rlnOpticsGroup" in particles.columns:
        optics = blocks.get("optics")
        names = None
        if optics is not None and {"rlnOpticsGroup", "rlnOpticsGroupName"} <= set(optics):
            names = dict(zip(optics["rlnOpticsGroup"], optics["rlnOpticsGroupName"]))
        out["optics groups"] = _counts(particles["rlnOpticsGroup"], "optics group", names)
    return out
