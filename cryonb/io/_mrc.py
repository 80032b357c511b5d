"""MRC maps and image stacks.

The header layout, mode table and byte-order rules come from :mod:`mrcfile` (its
``HEADER_DTYPE`` and ``mrcfile.utils``), and files are written with ``mrcfile.new``. Reading
parses the 1024-byte header here and maps the data block with NumPy (as ``mrcfile.mmap`` does)
so that every problem is reported once, with the file, the header field and what to do, before
any large allocation; nothing touches the global warning filters (thread-safe).

Conventions
-----------
Arrays are returned in standard axis order: ``(z, y, x)`` for volumes (the header's
MAPC/MAPR/MAPS permutation applied), ``(n, y, x)`` for image stacks, ``(y, x)`` for a single
image. Voxel sizes are in Angstrom.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from mrcfile.constants import MAP_ID, MAP_ID_OFFSET_BYTES
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.utils import (
    byte_order_from_machine_stamp,
    data_shape_from_header,
    dtype_from_mode,
    spacegroup_is_volume_stack,
)

from ..errors import ConfigError, InputError
from ._atomic import atomic_path
from ._files import check_input_file, human_bytes, looks_like_text, text_preview

__all__ = [
    "MrcVolume",
    "read_map",
    "read_mrc",
    "read_mrc_header",
    "read_stack",
    "write_mrc",
]

_HEADER_BYTES = HEADER_DTYPE.itemsize  # 1024
_MODES = {0: "int8", 1: "int16", 2: "float32", 4: "complex64", 6: "uint16", 12: "float16"}
_OPENERS: dict[str, Callable[..., Any]] = {"gzip": gzip.open, "bzip2": bz2.open}
_DV_ID = -16224  # DeltaVision files carry 0xC0A0 at byte 96
_RECOPY = "re-copy or re-make the file (in Python, permissive=True reads what can be read)"


@dataclasses.dataclass(frozen=True, eq=False)
class MrcVolume:
    """An MRC file's data and the header facts cryonb uses.

    Attributes
    ----------
    data : numpy.ndarray or None
        ``(z, y, x)`` for a volume (axis permutation of the header applied), ``(n, y, x)`` for
        an image stack, ``(y, x)`` for a single image, ``(n, z, y, x)`` for a volume stack.
        float32 unless another ``dtype`` was asked for. ``None`` for a header-only read, or when
        a permissive read could not read the data block.
    voxel_size : float or None
        Angstrom per voxel along x; ``None`` when the header gives 0 or a negative value.
    is_stack : bool
        True for image stacks (``.mrcs`` suffix, or space group 0 with more than one
        section) and volume stacks.
    header_info : dict
        Raw header facts: ``mode``, ``dtype``, ``nx``/``ny``/``nz``, ``mx``/``my``/``mz``,
        ``cella``, ``cellb``, ``mapc``/``mapr``/``maps``, ``ispg``,
        ``nxstart``/``nystart``/``nzstart``, ``origin``, ``dmin``/``dmax``/``dmean``/``rms``,
        ``exttyp``, ``extended_header_size``, ``nversion``, ``labels``, ``byte_order``,
        ``compression``, ``file_size``, ``voxel_size_xyz`` and ``shape`` (of ``data`` as
        returned).
    path : pathlib.Path
        The file read.
    """

    data: np.ndarray | None
    voxel_size: float | None
    is_stack: bool
    header_info: dict[str, Any]
    path: Path

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`data` as returned (known even for a header-only read)."""
        return self.header_info["shape"]


@dataclasses.dataclass
class _Header:
    """What the 1024-byte header says and what is wrong with it."""

    path: Path
    h: Any  # numpy record with attribute access, in the file's byte order
    compression: str | None
    file_size: int
    is_stack: bool
    deltavision: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)  # fatal unless permissive
    fix: str = _RECOPY
    notes: list[str] = dataclasses.field(default_factory=list)  # accepted, with a warning

    @property
    def offset(self) -> int:
        return _HEADER_BYTES + int(self.h.nsymbt)

    @property
    def dtype(self) -> np.dtype | None:
        mode = int(self.h.mode)
        if mode not in _MODES:
            return None
        return dtype_from_mode(mode).newbyteorder(self.h.mode.dtype.byteorder)

    @property
    def raw_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in data_shape_from_header(self.h))

    @property
    def data_bytes(self) -> int:
        dt = self.dtype
        return math.prod(self.raw_shape) * (dt.itemsize if dt is not None else 0)

    @property
    def axes(self) -> tuple[int, int, int]:
        return int(self.h.mapc), int(self.h.mapr), int(self.h.maps)

    def axis_order(self) -> tuple[int, int, int] | None:
        """Transpose order taking raw (sections, rows, columns) to (z, y, x); None if none."""
        mapc, mapr, maps = self.axes
        if self.is_stack or sorted((mapc, mapr, maps)) != [1, 2, 3] or len(self.raw_shape) != 3:
            return None
        labels = [maps, mapr, mapc]  # cell axis held by raw axes 0, 1, 2
        order = (labels.index(3), labels.index(2), labels.index(1))
        return None if order == (0, 1, 2) else order

    def describe_data(self) -> str:
        nx, ny, nz = int(self.h.nx), int(self.h.ny), int(self.h.nz)
        mode = int(self.h.mode)
        return (
            f"{nx} x {ny} x {nz} {_MODES.get(mode, '?')} (mode {mode}) = "
            f"{human_bytes(self.data_bytes)} of data"
        )


def _record(head: bytes, order: str):
    buf = bytearray(head[:_HEADER_BYTES])  # writable copy
    return np.frombuffer(buf, dtype=HEADER_DTYPE.newbyteorder(order)).view(np.recarray)[0]


def _sniff(path: Path) -> tuple[bytes, str | None]:
    """The first 1024 header bytes (decompressed if needed) and the compression used."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    compression = None
    if head[MAP_ID_OFFSET_BYTES : MAP_ID_OFFSET_BYTES + 4] != MAP_ID:  # same rule as mrcfile
        if head[:2] == b"\x1f\x8b":
            compression = "gzip"
        elif head[:2] == b"BZ":
            compression = "bzip2"
    if compression is not None:
        try:
            with _OPENERS[compression](path, "rb") as f:
                head = f.read(_HEADER_BYTES)
        except (OSError, EOFError, ValueError) as exc:
            raise InputError(
                f"is not a readable {compression} file ({exc}): re-copy it", path
            ) from exc
    return head, compression


def _inspect(path: str | os.PathLike) -> _Header:
    """Parse and check the header; raise only for files that are not MRC at all."""
    p, st = check_input_file(path)
    head, compression = _sniff(p)
    map_ok = head[MAP_ID_OFFSET_BYTES : MAP_ID_OFFSET_BYTES + 3] == MAP_ID[:3]
    if head.startswith(b"\x93NUMPY"):
        raise InputError("is a NumPy array file (.npy, cryoSPARC .cs), not an MRC file", p)
    if not map_ok and looks_like_text(head):
        raise InputError(
            f"is a text file, not an MRC file (it starts with {text_preview(head)})", p
        )
    if len(head) < _HEADER_BYTES:
        what = "decompressed file" if compression else "file"
        raise InputError(
            f"the {what} has only {len(head)} bytes but an MRC header needs {_HEADER_BYTES}: "
            "not an MRC file, or truncated; re-copy it",
            p,
        )
    try:
        order = byte_order_from_machine_stamp(bytearray(head[212:216]))
        stamp_ok = True
    except ValueError:
        order, stamp_ok = "<", False
    h = _record(head, order)
    other = _record(head, ">" if order == "<" else "<")
    swapped = int(h.mode) not in _MODES and int(other.mode) in _MODES
    if swapped:
        h = other
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    nz, ispg = int(h.nz), int(h.ispg)
    is_stack = (
        (bool(suffixes) and suffixes[-1] == ".mrcs")
        or (ispg == 0 and nz > 1)
        or spacegroup_is_volume_stack(ispg)
    )
    hdr = _Header(p, h, compression, st.st_size, is_stack)
    hdr.deltavision = not map_ok and _DV_ID in (
        int.from_bytes(head[96:98], "little", signed=True),
        int.from_bytes(head[96:98], "big", signed=True),
    )
    if hdr.deltavision:
        hdr.problems.append(
            "no 'MAP ' id at byte 208: this is a DeltaVision file (DV id 0xC0A0 at byte 96), "
            "not MRC"
        )
        hdr.fix = (
            "convert it to MRC (e.g. with IMOD or Fiji; in Python, permissive=True reads its "
            "pixels, the DV pixel size in micrometres converted to Angstrom)"
        )
    if swapped:
        (hdr.problems if stamp_ok else hdr.notes).append(
            f"machine stamp {bytes(head[212:216])!r} does not match the byte order of the "
            "header fields (MODE only makes sense byte-swapped)"
        )
    elif not stamp_ok and map_ok:
        hdr.notes.append(
            f"unrecognised machine stamp {bytes(head[212:216])!r}: read as little-endian"
        )
    _check_fields(hdr)
    if not map_ok and not hdr.deltavision:
        _check_missing_map_id(hdr, stamp_ok)
    return hdr


def _check_fields(hdr: _Header) -> None:
    h = hdr.h
    mode = int(h.mode)
    if mode not in _MODES:
        hdr.problems.append(
            f"header field MODE is {mode}, not an MRC mode cryonb reads (0, 1, 2, 4, 6, 12)"
        )
        hdr.fix = "this is not an MRC file, or it is corrupt: check where it came from"
        return
    dims = {"NX": int(h.nx), "NY": int(h.ny), "NZ": int(h.nz)}
    if min(dims.values()) < 1:
        hdr.problems.append(
            "header fields NX, NY, NZ are "
            + ", ".join(f"{k}={v}" for k, v in dims.items())
            + ": each must be at least 1"
        )
        return
    if int(h.nsymbt) < 0:
        hdr.problems.append(f"header field NSYMBT (extended header size) is {int(h.nsymbt)} < 0")
        return
    if spacegroup_is_volume_stack(int(h.ispg)) and (int(h.mz) < 1 or int(h.nz) % int(h.mz)):
        hdr.problems.append(
            f"volume stack (ISPG {int(h.ispg)}) but NZ={int(h.nz)} is not a multiple of "
            f"MZ={int(h.mz)}"
        )
        return
    axes = hdr.axes
    if sorted(axes) != [1, 2, 3]:
        if axes == (0, 0, 0):
            hdr.notes.append("header fields MAPC/MAPR/MAPS are 0: standard order 1, 2, 3 assumed")
            hdr.h.mapc, hdr.h.mapr, hdr.h.maps = 1, 2, 3
        else:
            hdr.problems.append(
                f"header fields MAPC/MAPR/MAPS are {axes}: not a permutation of 1, 2, 3"
            )
    elif hdr.is_stack and axes != (1, 2, 3):
        hdr.notes.append(
            f"MAPC/MAPR/MAPS = {axes} ignored for an image stack: images are returned as stored"
        )
    if hdr.compression is None:
        _check_size(hdr)


def _check_size(hdr: _Header) -> None:
    """Compare what the header promises with the bytes the file holds (uncompressed files)."""
    after = hdr.file_size - _HEADER_BYTES
    nsymbt = int(hdr.h.nsymbt)
    if after < nsymbt:
        hdr.problems.append(
            f"header field NSYMBT says {nsymbt} bytes of extended header but the file ends "
            f"{after} bytes after the header: the file is truncated"
        )
        return
    have, need = hdr.file_size - hdr.offset, hdr.data_bytes
    ext = f" + {nsymbt} bytes extended header" if nsymbt else ""
    if have < need:
        hdr.problems.append(
            f"header says {hdr.describe_data()} but the file has {have} bytes after the header "
            f"({_HEADER_BYTES} bytes{ext}): the file is truncated"
        )
    elif have > need:
        hdr.notes.append(
            f"the file has {have - need} bytes more than the header's {hdr.describe_data()}; "
            "the extra bytes at the end are ignored"
        )


def _check_missing_map_id(hdr: _Header, stamp_ok: bool) -> None:
    """No 'MAP ' id: accept with a warning if the sizes prove the header right."""
    what = "no 'MAP ' id at byte 208" + ("" if stamp_ok else " and no machine stamp")
    if hdr.problems:
        hdr.problems.insert(0, f"{what}: not an MRC file, or corrupt")
        hdr.fix = ("check the file type (in Python, permissive=True tries to read it "
                   "anyway)")
        return
    if hdr.compression is None and hdr.file_size - hdr.offset != hdr.data_bytes:
        hdr.problems.append(
            f"{what}, and the header's {hdr.describe_data()} does not match the file size "
            f"({hdr.file_size} bytes): not an MRC file, or corrupt"
        )
        hdr.fix = ("check the file type (in Python, permissive=True tries to read it "
                   "anyway)")
        hdr.notes = [n for n in hdr.notes if "bytes more than" not in n]
        return
    hdr.notes.append(
        f"{what} (not a standard MRC2014 header); NX, NY, NZ and MODE match the file size, so "
        "it is read as MRC"
    )


def _report(hdr: _Header, permissive: bool) -> None:
    if hdr.problems:
        what = "; ".join(hdr.problems)
        if not permissive:
            raise InputError(f"{what}. To fix: {hdr.fix}", hdr.path)
        warnings.warn(
            f"{hdr.path}: {what}; read anyway because permissive=True", UserWarning, stacklevel=4
        )
    for note in hdr.notes:
        warnings.warn(f"{hdr.path}: {note}", UserWarning, stacklevel=4)


def _voxel_sizes(hdr: _Header) -> tuple[float, float, float]:
    h = hdr.h
    cella = (float(h.cella.x), float(h.cella.y), float(h.cella.z))
    grid = (int(h.mx), int(h.my), int(h.mz))
    scale = 1e4 if hdr.deltavision else 1.0  # DeltaVision stores micrometres
    return tuple(  # type: ignore[return-value]
        float(str(np.float32(c / m * scale))) if m > 0 and math.isfinite(c) else 0.0
        for c, m in zip(cella, grid)
    )


def _voxel_size(hdr: _Header, warn: bool) -> float | None:
    sizes = _voxel_sizes(hdr)
    vx = sizes[0]
    h = hdr.h
    if vx <= 0:
        if warn:
            warnings.warn(
                f"{hdr.path}: the header voxel size is {vx:g} A (cella/voxel_size: CELLA.X = "
                f"{float(h.cella.x):g} over MX = {int(h.mx)}); voxel_size is None, give the "
                "pixel size yourself",
                UserWarning,
                stacklevel=4,
            )
        return None
    used = sizes[:2] if hdr.is_stack or int(h.nz) == 1 else sizes
    if warn and any(not math.isclose(v, vx, rel_tol=1e-4) for v in used):
        axes = "xyz"[: len(used)]
        warnings.warn(
            f"{hdr.path}: anisotropic voxel size (cella/voxel_size: "
            + ", ".join(f"{a}={v:g}" for a, v in zip(axes, used))
            + f" A); keeping x = {vx:g} A",
            UserWarning,
            stacklevel=4,
        )
    return vx


def _standard_shape(hdr: _Header) -> tuple[int, ...]:
    shape = hdr.raw_shape
    if hdr.is_stack and len(shape) == 2:
        return (1, *shape)
    order = hdr.axis_order()
    return shape if order is None else tuple(shape[i] for i in order)


def _shape_known(hdr: _Header) -> bool:
    h = hdr.h
    return (
        hdr.dtype is not None
        and min(int(h.nx), int(h.ny), int(h.nz)) >= 1
        and not (spacegroup_is_volume_stack(int(h.ispg)) and int(h.mz) < 1)
    )


def _header_info(hdr: _Header) -> dict[str, Any]:
    h = hdr.h
    dt = hdr.dtype
    return {
        "mode": int(h.mode),
        "dtype": None if dt is None else dt.str,
        **{k: int(h[k]) for k in ("nx", "ny", "nz", "mx", "my", "mz")},
        "cella": tuple(float(v) for v in h.cella.item()),
        "cellb": tuple(float(v) for v in h.cellb.item()),
        **{k: int(h[k]) for k in ("mapc", "mapr", "maps", "ispg")},
        **{k: int(h[k]) for k in ("nxstart", "nystart", "nzstart")},
        "origin": tuple(float(v) for v in h.origin.item()),
        **{k: float(h[k]) for k in ("dmin", "dmax", "dmean", "rms")},
        "exttyp": bytes(h.exttyp).decode("ascii", "replace").strip("\x00 "),
        "extended_header_size": int(h.nsymbt),
        "nversion": int(h.nversion),
        "labels": [
            bytes(lab).decode("ascii", "replace").strip()
            for lab in h.label[: max(0, min(int(h.nlabl), 10))]
        ],
        "byte_order": h.mode.dtype.byteorder if h.mode.dtype.byteorder != "=" else "<",
        "compression": hdr.compression,
        "file_size": hdr.file_size,
        "voxel_size_xyz": _voxel_sizes(hdr),
        "shape": _standard_shape(hdr) if _shape_known(hdr) else None,
    }


def _read_raw(hdr: _Header, mmap: bool) -> np.ndarray | None:
    """The data block in file order and dtype, or None if it cannot be read in full."""
    if not _shape_known(hdr):
        return None
    dtype = hdr.dtype
    assert dtype is not None
    shape = hdr.raw_shape
    count = math.prod(shape)
    try:
        if hdr.compression is None:
            if hdr.file_size - hdr.offset < hdr.data_bytes:
                return None
            if mmap:
                return np.memmap(hdr.path, dtype=dtype, mode="r", offset=hdr.offset, shape=shape)
            return np.fromfile(hdr.path, dtype=dtype, count=count, offset=hdr.offset).reshape(shape)
        out = np.empty(count, dtype=dtype)
        buf = out.data.cast("B")
        with _OPENERS[hdr.compression](hdr.path, "rb") as f:
            f.seek(hdr.offset)
            filled = 0
            while filled < len(buf):
                n = f.readinto(buf[filled:])
                if not n:
                    return None
                filled += n
        return out.reshape(shape)
    except MemoryError as exc:
        raise InputError(
            f"not enough memory to read {hdr.describe_data()}: use mmap=True, or a machine "
            "with more memory",
            hdr.path,
        ) from exc
    except (OSError, EOFError, ValueError) as exc:
        raise InputError(f"cannot read the data block ({exc}): {_RECOPY}", hdr.path) from exc


def _to_standard(raw: np.ndarray, hdr: _Header, dtype, mmap: bool) -> np.ndarray:
    arr = raw
    if hdr.is_stack and arr.ndim == 2:
        arr = arr[np.newaxis]
    order = hdr.axis_order()
    if order is not None:
        arr = np.transpose(arr, order)
    if dtype is None:
        return arr
    target = np.dtype(dtype)
    if arr.dtype.kind == "c" and target.kind != "c":
        raise InputError(
            f"MODE {int(hdr.h.mode)} holds complex values, which cannot become {target} "
            "without losing the imaginary part: pass dtype=None to keep them",
            hdr.path,
        )
    if mmap and arr.dtype == target:
        return arr  # the memory map itself (possibly a transposed view)
    return np.ascontiguousarray(arr, dtype=target)


def _read_mrc(
    path: str | os.PathLike,
    *,
    mmap: bool = False,
    permissive: bool = False,
    dtype=np.float32,
    header_only: bool = False,
    warn_voxel: bool = True,
) -> MrcVolume:
    hdr = _inspect(path)
    _report(hdr, permissive)
    voxel = _voxel_size(hdr, warn_voxel)
    data = None
    if not header_only:
        raw = _read_raw(hdr, mmap)
        if raw is None and not hdr.problems:  # only a compressed file can get here
            msg = (
                f"header says {hdr.describe_data()} but the decompressed file ends before: the "
                "file is truncated"
            )
            if not permissive:
                raise InputError(f"{msg}. To fix: {_RECOPY}", hdr.path)
            warnings.warn(f"{hdr.path}: {msg}", UserWarning, stacklevel=3)
        if raw is not None:
            data = _to_standard(raw, hdr, dtype, mmap)
    info = _header_info(hdr)
    if data is not None:
        info["shape"] = data.shape
        info["dtype"] = data.dtype.str if dtype is None else info["dtype"]
    return MrcVolume(data, voxel, hdr.is_stack, info, hdr.path)


def read_mrc(
    path: str | os.PathLike, *, mmap: bool = False, permissive: bool = False, dtype=np.float32
) -> MrcVolume:
    """Read an MRC/CCP4 map, image or stack (plain, ``.gz`` or ``.bz2``).

    Parameters
    ----------
    path : str or os.PathLike
        The file. Compression is detected from the content, as mrcfile does.
    mmap : bool
        Memory-map the data block instead of reading it. The map is returned as is (read-only,
        lazily paged in) when the file is uncompressed and already holds ``dtype``; otherwise
        the data are converted in memory. Compressed files are always read fully.
    permissive : bool
        Read invalid files as far as possible, with a ``UserWarning`` naming the file and what
        is wrong, instead of raising. ``data`` is ``None`` when the data block cannot be read
        (e.g. a truncated file).
    dtype : numpy dtype or None
        Type of the returned data (default float32: modes 0, 1, 2, 6 and 12 are converted).
        ``None`` keeps the file's own dtype and byte order.

    Returns
    -------
    MrcVolume
        ``data`` in standard axis order: ``(z, y, x)`` for a volume (the header's
        MAPC/MAPR/MAPS permutation applied), ``(n, y, x)`` for an image stack (``.mrcs``, or
        space group 0 with more than one section), ``(y, x)`` for a single image, and
        ``voxel_size`` in Angstrom (x spacing; ``None`` with a warning when the header gives 0
        or a negative value; anisotropic spacings warn and keep x).

    Raises
    ------
    InputError
        Naming the file, the header field at fault and what to do: missing file, folder,
        empty/short/text file, DeltaVision file, invalid MODE/NX/NY/NZ/MAPC..., truncated data
        block, complex data asked as real. Files without the ``'MAP '`` id or machine stamp
        are read with a warning when NX, NY, NZ and MODE match the file size exactly.

    Warns
    -----
    UserWarning
        Voxel size unknown or anisotropic, non-standard headers accepted, permissive reads.
    """
    return _read_mrc(path, mmap=mmap, permissive=permissive, dtype=dtype)


def read_mrc_header(path: str | os.PathLike, *, permissive: bool = False) -> MrcVolume:
    """Read only the header of an MRC file (fast; for ``cryonb info``).

    Same checks as :func:`read_mrc` (for compressed files the data size cannot be checked
    without decompressing, so truncation shows only when the data are read).

    Parameters
    ----------
    path : str or os.PathLike
        The MRC file.
    permissive : bool
        Warn instead of raising for an invalid header (e.g. describe a truncated file).

    Returns
    -------
    MrcVolume
        With ``data=None``; ``shape`` and ``header_info`` describe what :func:`read_mrc` would
        return.
    """
    return _read_mrc(path, permissive=permissive, header_only=True)


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Read a 3D map as float32 ``(z, y, x)`` and its voxel size.

    A single 2D image gives ``(1, y, x)``. Files whose header says image stack are read the
    same way (their sections become z).

    Parameters
    ----------
    path : str or os.PathLike
        The MRC/CCP4 map (plain, ``.gz`` or ``.bz2``).

    Returns
    -------
    data : numpy.ndarray, shape (z, y, x), float32
        In memory, C-contiguous, with the header's axis permutation applied.
    voxel_size : float or None
        Angstrom, ``None`` if the header gives none.

    Raises
    ------
    InputError
        As :func:`read_mrc`, and for a volume stack (4D).
    """
    vol = read_mrc(path)
    return _three_d(vol, f"holds a stack of {{n}} volumes (ISPG {vol.header_info['ispg']}), "
                    "not a single map: use read_mrc")


def _three_d(vol, error: str) -> tuple[np.ndarray, float | None]:
    """``vol``'s data as 3D (a 2D image gets a leading axis of 1), or ``InputError(error)``
    for 4D data (``{n}`` and ``{shape}``: the number and shape of its volumes)."""
    data = vol.data
    assert data is not None
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise InputError(error.format(n=data.shape[0], shape=data.shape[1:]), vol.path)
    return data, vol.voxel_size


def _read_stack(
    path, *, mmap: bool, warn_voxel: bool, dtype=np.float32
) -> tuple[np.ndarray, float | None]:
    vol = _read_mrc(path, mmap=mmap, warn_voxel=warn_voxel, dtype=dtype)
    return _three_d(vol, "holds {n} volumes of {shape} (a volume stack), not 2D images")


def read_stack(path: str | os.PathLike, *, mmap: bool = True) -> tuple[np.ndarray, float | None]:
    """Read an image stack as ``(n, y, x)`` float32 and its pixel size.

    Parameters
    ----------
    path : str or os.PathLike
        ``.mrcs`` stack, or any MRC file (a single image gives ``n = 1``; a volume's sections
        are taken as images).
    mmap : bool
        Default True: when the file is uncompressed float32 (mode 2), the returned array *is*
        a read-only :class:`numpy.memmap` and images are read from disc only when indexed.
        Other modes (int8, int16, uint16, float16) and compressed files are converted to an
        in-memory float32 array.

    Returns
    -------
    data : numpy.ndarray, shape (n, y, x), float32
    pixel_size : float or None
        Angstrom, ``None`` if the header gives none (common for particle stacks: the STAR file
        holds the pixel size).
    """
    return _read_stack(path, mmap=mmap, warn_voxel=True)


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size: float | None,
    *,
    stack: bool | None = None,
) -> None:
    """Write a float32 (mode 2) MRC file atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target; a ``.gz`` or ``.bz2`` suffix writes a compressed file.
    data : numpy.ndarray, shape (z, y, x), (n, y, x) or (y, x)
        Converted to float32. NumPy only: move GPU arrays to the host first.
    voxel_size : float or None
        Angstrom per voxel (``None`` writes 0, meaning unknown).
    stack : bool or None
        Write an image stack header (space group 0, MZ = 1). ``None``: a stack when the name
        ends in ``.mrcs``.

    Notes
    -----
    The header statistics (DMIN, DMAX, DMEAN, RMS) are computed from the data. The file
    appears complete or not at all (see :func:`atomic_write`).

    Raises
    ------
    ConfigError
        Bad ``data`` (not 2D/3D, not a NumPy array) or ``voxel_size``.
    """
    if type(data).__module__.split(".")[0] == "cupy":
        raise ConfigError(
            "write_mrc takes NumPy arrays: move the data to the host first "
            "(cryonb.backend.to_numpy)"
        )
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise ConfigError(f"write_mrc needs a non-empty 2D or 3D array, got shape {arr.shape}")
    if voxel_size is not None and not (math.isfinite(voxel_size) and voxel_size > 0):
        raise ConfigError(f"voxel_size must be a positive number of Angstrom, not {voxel_size}")
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    compression = {".gz": "gzip", ".bz2": "bzip2"}.get(suffixes[-1] if suffixes else "")
    if compression:
        suffixes = suffixes[:-1]
    if stack is None:
        stack = bool(suffixes) and suffixes[-1] == ".mrcs"
    if stack and arr.ndim == 2:
        arr = arr[np.newaxis]
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True, compression=compression) as m:
        m.set_data(arr)
        if stack:
            m.set_image_stack()
        m.voxel_size = 0.0 if voxel_size is None else float(voxel_size)
        m.add_label("written by cryonb")
