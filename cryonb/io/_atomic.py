"""Atomic file writing: a temporary file in the target's folder, fsync, then ``os.replace``."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, ResourceError

__all__ = ["atomic_path", "atomic_write", "output_folder"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync a folder; the file is what matters
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Reserve a temporary path beside ``path``; move it onto ``path`` when the block succeeds.

    The building block of :func:`atomic_write` for writers that need a file *name* (such as
    ``mrcfile.new``) rather than an open file. The temporary file exists (empty) when the
    block starts; whatever the block writes to it is fsynced and then renamed onto ``path``
    with :func:`os.replace`, so readers see either the old file or the complete new one.
    If the block raises, the temporary file is removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.

    Yields
    ------
    pathlib.Path
        The temporary file, ``.{name}.tmp-{pid}-{random}`` in the same folder.

    Raises
    ------
    ConfigError
        If the folder does not exist or is not writable.
    ResourceError
        If the disc is full.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist") from exc
    except PermissionError as exc:
        raise ConfigError(f"cannot write {path}: no permission to write in {path.parent}") from exc
    try:
        yield tmp
        _fsync(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # keep an existing file's mode
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise ResourceError(f"cannot write {path}: the disc is full ({exc})") from exc
        raise
    with contextlib.suppress(OSError):
        _fsync(path.parent, directory=True)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a file for writing so that it appears complete or not at all.

    Writes go to a temporary file ``.{name}.tmp-{pid}-{random}`` in the same folder, which is
    flushed, fsynced and renamed onto ``path`` (:func:`os.replace`) when the block ends
    normally. If the block raises, the temporary file is removed and an existing ``path`` is
    left untouched: no reader ever sees a partial file. An existing file's permission bits are
    kept.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.
    mode : {"wb", "w"}
        Binary (default) or text mode. Text is written with ``"\\n"`` line endings.
    encoding : str
        Encoding in text mode.

    Yields
    ------
    file object
        Open for writing; do not close it inside the block.

    Raises
    ------
    ConfigError
        If ``mode`` is not a write mode, or the folder does not exist or is not writable.
    ResourceError
        If the disc is full.

    Examples
    --------
    >>> with atomic_write("out.txt", "w") as f:  # doctest: +SKIP
    ...     f.write("hello\\n")
    """
    if mode not in ("w", "wt", "wb"):
        raise ConfigError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        f: IO[Any]
        if "b" in mode:
            f = open(tmp, "wb")
        else:
            f = open(tmp, "w", encoding=encoding, newline="\n")
        with f:
            yield f


def output_folder(folder: str | os.PathLike, flag: str) -> Path:
    """Make an output folder and check that files can be made in it, before any work.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder (made with its parents when missing).
    flag : str
        The option that named it, for the message (``"--odir AutoPick/"``).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ConfigError
        The folder cannot be made, or nothing can be written in it, saying why.
    """
    path = Path(folder)
    probe = _temp_name(path / "write-test")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in the folder {path} "
                          f"({exc.strerror or exc}); choose a folder you can write to") from exc
    return path

