"""Checks shared by the readers: does the path name a readable regular file, is it text."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError

__all__ = ["check_input_file", "human_bytes", "looks_like_text", "text_preview"]


def check_input_file(path: str | os.PathLike) -> tuple[Path, os.stat_result]:
    """Fail early, with a clear :class:`InputError`, unless ``path`` is a non-empty regular file.

    Pipes, sockets and devices are refused so that no reader can block on them.

    Returns
    -------
    path : pathlib.Path
    st : os.stat_result
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise InputError("no such file: check the path", p) from exc
    except NotADirectoryError as exc:
        raise InputError("no such file: a part of the path is not a folder", p) from exc
    except PermissionError as exc:
        raise InputError("permission denied: cannot read the file", p) from exc
    except OSError as exc:
        raise InputError(f"cannot open the file ({exc.strerror or exc})", p) from exc
    if stat.S_ISDIR(st.st_mode):
        raise InputError("is a folder, not a file: give the path of a file inside it", p)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            "is not a regular file (a pipe, socket or device): copy the data to a file first", p
        )
    if st.st_size == 0:
        raise InputError("the file is empty (0 bytes): re-copy or re-create it", p)
    if not os.access(p, os.R_OK):
        raise InputError("permission denied: cannot read the file", p)
    return p, st


def looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file look like (UTF-8) text rather than binary data."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end is fine
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n\f" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


def text_preview(head: bytes, n: int = 40) -> str:
    """The first line of ``head`` as a short quoted string, for error messages."""
    first = head.decode("utf-8", "replace").strip().splitlines()
    line = first[0] if first else ""
    return repr(line[:n] + ("..." if len(line) > n else ""))


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``; exact below 1 KiB."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.4g} {unit}"
    raise AssertionError("unreachable")
