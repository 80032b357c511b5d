"""Human summaries of STAR and MRC files (``cryonb info``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._files import check_input_file, human_bytes, looks_like_text
from ._mrc import MrcVolume, read_mrc, read_mrc_header
from ._particles import (
    MicrographTable,
    ParticleTable,
    _micrographs_from_blocks,
    _particles_from_blocks,
)
from ._star import read_star

__all__ = ["describe"]

_MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".ccp4", ".st", ".rec", ".ali", ".dv")
_STATS_LIMIT = 64 * 2**20  # compute min/max/mean from the data below this size


def _kind(path: Path) -> str:
    name = path.name.lower()
    for ext in (".gz", ".bz2"):
        name = name.removesuffix(ext)
    if name.endswith(".star"):
        return "star"
    if name.endswith(_MRC_SUFFIXES):
        return "mrc"
    if name.endswith((".cs", ".npy")):
        raise InputError(
            "is a cryoSPARC .cs / NumPy file, which cryonb does not read: export it to a "
            "RELION STAR file (e.g. with pyem's csparc2star.py)",
            path,
        )
    with open(path, "rb") as f:
        head = f.read(1024)
    if head[208:211] == b"MAP":
        return "mrc"
    if looks_like_text(head) and "data_" in head.decode("utf-8", "replace"):
        return "star"
    raise InputError("is neither a STAR nor an MRC file (unknown type)", path)


def _describe_star(path: Path) -> list[str]:
    blocks = read_star(path)
    lines = [f"STAR file {path} ({len(blocks)} block{'s' * (len(blocks) != 1)})"]
    for name, df in blocks.items():
        what = "loop" if df.attrs.get("star_loop", True) else "key-value"
        rows = f"{len(df)} row{'s' * (len(df) != 1)}"
        lines.append(f"  data_{name}: {what}, {rows} x {len(df.columns)} columns")
    readers: dict[str, Callable[..., ParticleTable | MicrographTable]] = {
        "particles": _particles_from_blocks,
        "micrographs": _micrographs_from_blocks,
    }
    for what, reader in readers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = reader(blocks, path)
        except InputError:
            continue
        groups = len(table.optics)
        lines.append(
            f"RELION {table.version} {what}: {table.n} {what}, {groups} optics "
            f"group{'s' * (groups != 1)}"
        )
        if table.pixel_sizes is not None:
            sizes = np.unique(table.pixel_sizes[np.isfinite(table.pixel_sizes)])
            lines.append("  pixel size: " + ", ".join(f"{v:.4g}" for v in sizes[:8]) + " A")
        if isinstance(table, ParticleTable):
            lines.append(f"  stacks: {len(table.stacks)}; CTF parameters: {table.has_ctf}")
            if "rlnImageSize" in table.particles.columns:
                sizes = table.particles["rlnImageSize"].dropna().unique()
                boxes = sorted(int(b) for b in sizes)
                lines.append("  box: " + ", ".join(map(str, boxes)) + " px")
        break
    return lines


def _describe_mrc(path: Path) -> list[str]:
    problem = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vol = read_mrc_header(path)
        except InputError as exc:
            problem = str(exc)
    if problem:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = read_mrc_header(path, permissive=True)
    info = vol.header_info
    kind = "image stack" if vol.is_stack else "image" if len(vol.shape or ()) == 2 else "volume"
    axes = "(n, y, x)" if vol.is_stack else "(z, y, x)" if kind == "volume" else "(y, x)"
    shape = " x ".join(map(str, vol.shape)) if vol.shape else "unknown"
    dtype = np.dtype(info["dtype"]).name if info["dtype"] else "unknown"
    voxel = "unknown" if vol.voxel_size is None else f"{vol.voxel_size:.4g} A"
    lines = [
        f"MRC file {path} ({human_bytes(info['file_size'])}"
        + (f", {info['compression']}" if info["compression"] else "")
        + ")",
        f"  {kind} {shape} {axes}, mode {info['mode']} ({dtype}), voxel size {voxel}",
    ]
    if (info["mapc"], info["mapr"], info["maps"]) != (1, 2, 3):
        lines.append(f"  axis order MAPC/MAPR/MAPS {info['mapc']}, {info['mapr']}, {info['maps']}")
    if info["extended_header_size"]:
        lines.append(
            f"  extended header: {info['extended_header_size']} bytes, type "
            f"{info['exttyp'] or 'unknown'}"
        )
    if problem:
        lines.append(f"  INVALID: {problem}")
    else:
        lines.append("  " + _stats(vol))
    lines += [f"  warning: {w.message}" for w in caught]
    return lines


def _stats(vol: MrcVolume) -> str:
    info = vol.header_info
    nbytes = int(np.prod(vol.shape)) * np.dtype(info["dtype"]).itemsize
    if nbytes <= _STATS_LIMIT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = read_mrc(vol.path, mmap=True).data
        assert data is not None
        return (
            f"min {float(data.min()):.6g}, max {float(data.max()):.6g}, "
            f"mean {float(data.mean(dtype=np.float64)):.6g}, "
            f"std {float(data.std(dtype=np.float64)):.6g}"
        )
    return (
        f"header statistics: min {info['dmin']:.6g}, max {info['dmax']:.6g}, "
        f"mean {info['dmean']:.6g}, rms {info['rms']:.6g}"
    )


def describe(path: str | os.PathLike) -> str:
    """A human summary of what a STAR or MRC file holds (used by ``cryonb info``).

    STAR: each block with its rows and columns; for particle or micrograph files the RELION
    version, number of particles/micrographs, optics groups, pixel sizes, stacks and box.
    MRC: kind (volume, image, stack), shape and axis order, mode, voxel size, extended header,
    and min/max/mean/std computed from the data when it is under 64 MiB (else the header's
    statistics). An invalid MRC file is described from its header with the reason it is
    invalid.

    Parameters
    ----------
    path : str or os.PathLike
        A STAR file (``.star``) or an MRC file (``.mrc``, ``.mrcs``, ``.map``, ``.ccp4``...,
        optionally ``.gz``/``.bz2``); other names are recognised from their content.

    Returns
    -------
    str
        Several lines, no trailing newline.

    Raises
    ------
    InputError
        The file is missing, of an unknown type, or an unreadable STAR file.
    """
    p, _ = check_input_file(path)
    kind = _kind(p)
    return "\n".join(_describe_star(p) if kind == "star" else _describe_mrc(p))
