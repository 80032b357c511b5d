"""Where workers get particle images from: RELION's four I/O modes.

``parallel`` (RELION's default parallel disc I/O)
    Every worker reads its own pools from the particle stacks, memory-mapped
    (:class:`TableSource`).
``leader`` (``--no_parallel_disc_io``)
    The leader reads and sends the images with each pool (through MPI when the engines run
    under MPI, else through the client); workers read nothing.
``preread`` (``--preread_images``)
    Every worker reads the whole data set into RAM once, at the start
    (:class:`PrereadSource`): ``n * box**2 * 4`` bytes per worker, checked against the free
    memory of each host up front (:func:`check_preread_memory`). Work is handed out on demand,
    so any worker may get any particle: each holds them all, as in RELION.
``scratch`` (``--scratch_dir``)
    The first worker of each host copies the particles into one file on a local disc
    (:func:`copy_to_scratch`), as many as fit while keeping ``--keep_free_scratch`` GB free;
    every worker then reads the copied particles from there and the others, particle by
    particle, from the original stacks (:class:`ScratchSource`).

Every source returns float32 images of shape ``(B, N, N)`` in the order of the rows asked for,
and is safe to use from several threads.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ResourceError

__all__ = [
    "SCRATCH_CAPACITY_ENV",
    "ImageSource",
    "PrereadSource",
    "ScratchCopy",
    "ScratchSource",
    "TableSource",
    "available_memory",
    "check_preread_memory",
    "copy_to_scratch",
    "format_bytes",
    "image_bytes",
    "remove_scratch",
    "scratch_room",
]

#: Environment variable (bytes) that caps the scratch room, to test a full scratch disc
#: without one. Read by the process that starts the run and passed to the copying ranks.
SCRATCH_CAPACITY_ENV = "CRYONB_SCRATCH_CAPACITY"

_CHUNK = 1024  # particles per read when copying / prereading


def format_bytes(n: float) -> str:
    """``1.5 GB``-style (powers of 1000, as disc and RAM sizes are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def image_bytes(n: int, box: int) -> int:
    """Bytes of ``n`` float32 images of ``box x box`` pixels: ``n * box**2 * 4``."""
    return int(n) * int(box) * int(box) * 4


def available_memory() -> int:
    """Host memory available to a new allocation (bytes; ``psutil``'s ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_preread_memory(n: int, box: int, holders: dict[str, int],
                         available: dict[str, int], *, headroom: float = 0.9) -> int:
    """Refuse ``--preread_images`` up front when the images cannot fit in RAM.

    Parameters
    ----------
    n, box : int
        Particles and box size.
    holders : dict of str to int
        Host name -> ranks on it that hold the whole data set.
    available : dict of str to int
        Host name -> available memory (bytes).
    headroom : float
        Fraction of the available memory the images may take.

    Returns
    -------
    int
        Bytes needed per holder.

    Raises
    ------
    ResourceError
        Naming the host, the numbers and what to do instead.
    """
    per = image_bytes(n, box)
    for host, k in sorted(holders.items()):
        need = per * k
        have = available.get(host)
        if have is None:
            continue
        if need > headroom * have:
            who = "1 rank holds" if k == 1 else f"{k} ranks on it each hold"
            raise ResourceError(
                f"--preread_images needs {format_bytes(need)} of RAM on host {host} "
                f"({who} {n} particles x {box}^2 px x 4 B = {format_bytes(per)}), but only "
                f"{format_bytes(have)} is available: read from disc instead (drop "
                f"--preread_images), put fewer ranks on the host, or copy the particles to a "
                f"local disc with --scratch_dir")
    return per


# ------------------------------------------------------------------------------ sources
class ImageSource:
    """Particle images by row of the particle table (base class).

    Attributes
    ----------
    fallback : int
        Particles read from the original stacks although a faster copy was meant to hold
        them (scratch disc full); counted since :meth:`reset_counts`.
    """

    kind = "base"

    def __init__(self):
        self.fallback = 0
        self._count_lock = threading.Lock()

    def images(self, rows, out=None) -> np.ndarray:
        """Images of the table rows ``rows``, shape ``(len(rows), N, N)``, float32; into
        ``out`` (an array of that shape and type) if given."""
        raise NotImplementedError

    def reset_counts(self) -> int:
        """Return :attr:`fallback` and set it to 0."""
        with self._count_lock:
            n, self.fallback = self.fallback, 0
        return n

    def close(self) -> None:
        """Release memory and files."""


class TableSource(ImageSource):
    """Read from the particle stacks themselves (memory-mapped; RELION's parallel disc I/O).

    Parameters
    ----------
    table : cryonb.io.ParticleTable
    """

    kind = "parallel"

    def __init__(self, table):
        super().__init__()
        self.table = table

    def images(self, rows, out=None) -> np.ndarray:
        """See :meth:`ImageSource.images`."""
        return self.table.images(np.asarray(rows, np.int64), out=out)


class PrereadSource(ImageSource):
    """All particles read into RAM once (``--preread_images``).

    Parameters
    ----------
    table : cryonb.io.ParticleTable
    check_memory : bool
        Refuse (:class:`~cryonb.errors.ResourceError`) if the images do not fit in the
        memory available to this process now.
    """

    kind = "preread"

    def __init__(self, table, check_memory: bool = True):
        super().__init__()
        n, box = table.n, table.box
        if check_memory:
            import socket

            host = socket.gethostname()
            check_preread_memory(n, box, {host: 1}, {host: available_memory()})
        self.data = np.empty((n, box, box), np.float32)
        for s in range(0, n, _CHUNK):
            self.data[s : s + _CHUNK] = table.images(slice(s, min(n, s + _CHUNK)))

    def images(self, rows, out=None) -> np.ndarray:
        """See :meth:`ImageSource.images`."""
        rows = np.asarray(rows, np.int64)
        if out is None:
            return self.data[rows]
        return np.take(self.data, rows, axis=0, out=out)

    def close(self) -> None:
        """Drop the images."""
        self.data = np.empty((0, 0, 0), np.float32)


@dataclass
class ScratchCopy:
    """What :func:`copy_to_scratch` left on one host's scratch disc.

    Attributes
    ----------
    folder : str
        The run's own folder inside ``--scratch_dir`` (removed by :func:`remove_scratch`).
    path : str
        The copy: a ``.npy`` array of shape ``(n_copied, N, N)`` float32 holding table rows
        ``0 .. n_copied - 1``.
    n_copied, n, box : int
    room : int
        Bytes that could be used (free space minus ``--keep_free_scratch``).
    """

    folder: str
    path: str
    n_copied: int
    n: int
    box: int
    room: int

    @property
    def complete(self) -> bool:
        """Whether every particle was copied."""
        return self.n_copied >= self.n

    def describe(self) -> str:
        """One line for the run's log."""
        if self.complete:
            size = format_bytes(image_bytes(self.n, self.box))
            return f"scratch: all {self.n} particles ({size}) copied to {self.folder}"
        return (f"scratch: room for {self.n_copied} of {self.n} particles in {self.folder} "
                f"({format_bytes(self.room)} after --keep_free_scratch); the other "
                f"{self.n - self.n_copied} are read from their original stacks")


def scratch_room(scratch_dir, keep_free_gb: float, capacity: int | None = None) -> int:
    """Bytes that may be written to ``scratch_dir``: free space minus ``keep_free_gb`` GB.

    Parameters
    ----------
    scratch_dir : path-like
        Created if missing.
    keep_free_gb : float
        RELION's ``--keep_free_scratch`` (GB = 1e9 bytes).
    capacity : int, optional
        An upper bound (bytes), e.g. from :data:`SCRATCH_CAPACITY_ENV`.

    Raises
    ------
    ConfigError
        If the folder cannot be created.
    """
    d = Path(scratch_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--scratch_dir {scratch_dir}: cannot create it ({exc})") from None
    room = shutil.disk_usage(d).free - int(keep_free_gb * 1e9)
    if capacity is not None:
        room = min(room, int(capacity))
    return max(0, int(room))


def copy_to_scratch(table, scratch_dir, tag: str, keep_free_gb: float,
                    capacity: int | None = None) -> ScratchCopy:
    """Copy as many particles as fit into one file in ``scratch_dir/cryonb_<tag>``.

    Rows are copied in table order until the room (:func:`scratch_room`) is used up; the
    file appears under its final name only when complete, so that other ranks of the host
    never see a partial copy.

    Parameters
    ----------
    table : cryonb.io.ParticleTable
    scratch_dir : path-like
    tag : str
        Names the run's folder (one per run and host).
    keep_free_gb : float
    capacity : int, optional
        Upper bound of the room in bytes (test hook; see :data:`SCRATCH_CAPACITY_ENV`).

    Returns
    -------
    ScratchCopy
    """
    n, box = table.n, table.box
    folder = Path(scratch_dir) / f"cryonb_{tag}"
    room = scratch_room(scratch_dir, keep_free_gb, capacity)
    header = 4096  # .npy header, generously
    n_fit = int(min(n, max(0, room - header) // image_bytes(1, box)))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "particles.npy"
    if n_fit > 0:
        part = folder / "particles.npy.part"
        try:
            out = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32,
                                            shape=(n_fit, box, box))
            for s in range(0, n_fit, _CHUNK):
                out[s : s + _CHUNK] = table.images(slice(s, min(n_fit, s + _CHUNK)))
            out.flush()
            del out
            os.replace(part, path)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ResourceError(f"copying particles to --scratch_dir {scratch_dir} failed: {exc}"
                                ) from None
    return ScratchCopy(str(folder), str(path), n_fit, n, box, room)


def remove_scratch(copy: ScratchCopy) -> None:
    """Remove a run's scratch folder."""
    shutil.rmtree(copy.folder, ignore_errors=True)


class ScratchSource(ImageSource):
    """Particles from a scratch copy, the rest (per particle) from the original stacks.

    Parameters
    ----------
    table : cryonb.io.ParticleTable
    copy : ScratchCopy
    """

    kind = "scratch"

    def __init__(self, table, copy: ScratchCopy):
        super().__init__()
        self.table = table
        self.copy = copy
        self._data = (np.load(copy.path, mmap_mode="r") if copy.n_copied > 0
                      else np.empty((0, table.box, table.box), np.float32))
        if self._data.shape[0] != copy.n_copied:
            raise ResourceError(f"the scratch copy {copy.path} holds {self._data.shape[0]} "
                                f"particles, expected {copy.n_copied}")

    def images(self, rows, out=None) -> np.ndarray:
        """See :meth:`ImageSource.images`; rows not copied come from the original stacks."""
        rows = np.asarray(rows, np.int64)
        local = rows < self.copy.n_copied
        if local.all() and out is None:
            return np.asarray(self._data[rows], np.float32)
        if out is None:
            out = np.empty((len(rows), self.copy.box, self.copy.box), np.float32)
        out[local] = self._data[rows[local]]
        out[~local] = self.table.images(rows[~local])
        with self._count_lock:
            self.fallback += int((~local).sum())
        return out

    def close(self) -> None:
        """Close the memory map (the folder stays until :func:`remove_scratch`)."""
        self._data = np.empty((0, 0, 0), np.float32)
