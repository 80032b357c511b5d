"""STAR files: reading through :mod:`starfile`, writing RELION-style text.

Before starfile parses a file, a fast line scan checks its structure (``data_`` blocks,
``loop_`` headers, key-value pairs) so that every malformed file fails with the line number at
fault instead of a parser traceback or, worse, a silently shifted table. Rows are checked
field by field only when starfile fails or returns missing values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import ConfigError, InputError
from ._atomic import atomic_write
from ._files import check_input_file

__all__ = ["RELION_STRING_LABELS", "TOKENS_ATTR", "StarTokens", "read_star", "star_tokens",
           "write_star"]

#: RELION labels whose values are text even when they look like numbers (e.g. a micrograph
#: called ``1``); they are always read as strings.
RELION_STRING_LABELS = (
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnReconstructImageName",
    "rlnMicrographName",
    "rlnMicrographNameNoDW",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnMicrographGainName",
    "rlnMicrographDefectFile",
    "rlnOpticsGroupName",
    "rlnMtfFileName",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnGroupName",
    "rlnReferenceImage",
    "rlnMaskName",
    "rlnTomoName",
    "rlnTomoParticleName",
    "rlnTomoTiltSeriesName",
    "rlnTomoTiltSeriesStarFile",
    "rlnPipeLineProcessName",
    "rlnPipeLineProcessAlias",
    "rlnPipeLineNodeName",
    "rlnPipeLineEdgeFromNode",
    "rlnPipeLineEdgeToNode",
    "rlnPipeLineEdgeProcess",
    "rlnJobTypeLabel",
    "rlnJobOptionVariable",
    "rlnJobOptionValue",
)

_LOOP_ATTR = "star_loop"
_ROW_TOKEN = re.compile(r'"[^"]*"|\S+')
_NEEDS_QUOTES = re.compile(r"^$|\s|^[_#$;]|^(?:data|loop|save|global|stop)_", re.IGNORECASE)
_ANY_NEEDS_QUOTES = re.compile(  # _NEEDS_QUOTES for values joined by NUL
    r"\s|\x00(?:[_#$;\x00]|(?:data|loop|save|global|stop)_)|\x00$", re.IGNORECASE
)
_UNWRITABLE = re.compile("['\"\n\r\x00]")
_ANY_UNWRITABLE = re.compile("['\"\n\r]")  # _UNWRITABLE for values joined by NUL
_CHUNK_ROWS = 65536
#: ``df.attrs[TOKENS_ATTR]``: ``{column: tokens}``, columns already formatted
#: (:func:`star_tokens`) that :func:`write_star` writes as they are
TOKENS_ATTR = "star_tokens"


@dataclasses.dataclass
class _Block:
    name: str
    line: int
    kind: str | None = None  # "loop" or "pairs"
    columns: list[str] = dataclasses.field(default_factory=list)
    column_lines: dict[str, int] = dataclasses.field(default_factory=dict)
    loop_line: int = 0
    first_row: int = 0
    n_rows: int = 0
    end: int = 0  # last line of the block


class _ScanError(InputError):
    """A structural fault; ``blocks`` are those scanned before it (their rows are unchecked)."""

    def __init__(self, message: str, path: Path, blocks: list[_Block]):
        super().__init__(message, path)
        self.blocks = blocks


def _decode(path: Path) -> str:
    with open(path, "rb") as f:
        raw = f.read(65536)
        if b"\x00" in raw:  # checked before reading what may be a huge binary file
            raise InputError("is a binary file, not a STAR file (it contains NUL bytes)", path)
        raw += f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}): a binary file, or a "
            "STAR file in another encoding; convert it to UTF-8",
            path,
        ) from exc


def _scan(lines: list[str], path: Path) -> list[_Block]:
    """Check the block structure line by line; raise InputError with the line at fault."""
    blocks: list[_Block] = []
    seen: dict[str, int] = {}
    cur: _Block | None = None
    in_header = False  # between loop_ and the first row
    header_gap = 0  # a blank/comment line inside a loop header (starfile cannot read it)

    def fail(lineno: int, msg: str) -> _ScanError:
        if blocks and not blocks[-1].end:
            blocks[-1].end = lineno - 1  # rows before the fault can still be checked
        return _ScanError(f"line {lineno}: {msg}", path, blocks)

    def close(block: _Block | None, lineno: int) -> None:
        if block is None:
            return
        block.end = lineno
        if block.kind is None:
            raise fail(block.line, f"data_{block.name} holds nothing (no loop_, no _name value)")
        if block.kind == "loop" and not block.columns:
            raise fail(block.loop_line, f"the loop_ of data_{block.name} has no _column names")

    for lineno, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s or s[0] == "#":
            if in_header and cur is not None:
                header_gap = header_gap or lineno
            continue
        if s.startswith("data_"):
            close(cur, lineno - 1)
            name = s[5:]
            if any(ch.isspace() for ch in name):
                raise fail(lineno, f"block name {name!r} contains spaces")
            if name in seen:
                raise fail(lineno, f"block data_{name} already started at line {seen[name]}")
            seen[name] = lineno
            cur = _Block(name, lineno)
            blocks.append(cur)
            in_header = False
            continue
        if cur is None:
            raise fail(lineno, f"{s[:40]!r} comes before the first data_ block")
        if s.startswith("loop_"):
            if cur.kind is not None:
                what = "a second loop_" if cur.kind == "loop" else "a loop_ after _name value lines"
                raise fail(
                    lineno,
                    f"{what} in data_{cur.name} (line {cur.line}): cryonb reads one table per "
                    "data_ block; split the file into one data_ block per table",
                )
            cur.kind, cur.loop_line, in_header, header_gap = "loop", lineno, True, 0
            if s != "loop_" and not s[5:].lstrip().startswith("#"):
                raise fail(lineno, f"unexpected text after loop_: {s!r}")
            continue
        if s[0] == ";":
            raise fail(lineno, "semicolon-delimited text fields are not supported")
        if s[0] == "_":
            if cur.kind == "loop":
                if not in_header:
                    raise fail(
                        lineno,
                        f"{s.split()[0]!r} after the rows of the loop in data_{cur.name}: "
                        "a data_ block holds either one loop_ or _name value lines",
                    )
                if header_gap:
                    raise fail(
                        header_gap,
                        f"blank or comment line inside the loop_ header of data_{cur.name}",
                    )
                tokens = s.split()
                if len(tokens) > 1 and not tokens[1].startswith("#"):
                    raise fail(lineno, f"loop column {tokens[0]!r} is followed by {tokens[1]!r}")
                col = tokens[0][1:]
                if col in cur.column_lines:
                    raise fail(
                        lineno,
                        f"column _{col} appears twice (first at line {cur.column_lines[col]})",
                    )
                cur.columns.append(col)
                cur.column_lines[col] = lineno
                continue
            cur.kind = "pairs"
            try:
                tokens = shlex.split(s)
            except ValueError as exc:
                raise fail(lineno, f"cannot split {s!r} ({exc}): unbalanced quotes?") from exc
            if len(tokens) != 2:
                raise fail(
                    lineno,
                    f"expected '_name value' but found {len(tokens)} fields in {s!r} "
                    "(quote values that contain spaces)",
                )
            key = tokens[0][1:]
            if key in cur.column_lines:
                raise fail(lineno, f"_{key} appears twice (first at line {cur.column_lines[key]})")
            cur.columns.append(key)
            cur.column_lines[key] = lineno
            continue
        if cur.kind == "loop":
            if in_header:
                if not cur.columns:
                    raise fail(cur.loop_line, f"the loop_ of data_{cur.name} has no _column names")
                in_header = False
                cur.first_row = lineno
            cur.n_rows += 1
            continue
        raise fail(
            lineno,
            f"unexpected {s[:40]!r} in data_{cur.name}: not a '_name value' line or a loop row",
        )
    close(cur, len(lines))
    if not blocks:
        raise InputError(
            "no data_ block found: not a STAR file (the file holds only blanks and comments)",
            path,
        )
    return blocks


def _row_fields(line: str) -> int:
    """Number of values on a loop row, as starfile (pandas, quotes, # comments) counts them."""
    n = 0
    for tok in _ROW_TOKEN.findall(line.replace("'", '"')):
        if tok.startswith("#"):
            break
        n += 1
    return n


def _check_rows(lines: list[str], block: _Block, path: Path) -> None:
    """Raise InputError at the first loop row whose number of values is wrong."""
    if block.kind != "loop" or not block.n_rows:
        return
    ncol = len(block.columns)
    for lineno in range(block.first_row, block.end + 1):
        s = lines[lineno - 1].strip()
        if not s or s[0] == "#":
            continue
        n = _row_fields(s)
        if n != ncol:
            shown = ", ".join("_" + c for c in block.columns[:3]) + (", ..." if ncol > 3 else "")
            raise InputError(
                f"line {lineno}: loop row has {n} values but data_{block.name} has {ncol} "
                f"columns ({shown}): fix or delete this row",
                path,
            )


def _consistent(block: _Block, value) -> bool:
    if block.kind == "pairs":
        return isinstance(value, dict) and list(value) == block.columns
    return (
        isinstance(value, pd.DataFrame)
        and list(value.columns) == block.columns
        and len(value) == block.n_rows
    )


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file.

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.

    Returns
    -------
    dict of str to pandas.DataFrame
        Block name without the ``data_`` prefix (``''`` for a bare ``data_``) -> table, in file
        order. Column names keep no leading underscore (``rlnImageName``), as starfile gives
        them. A loop gives one row per loop line; a block of ``_name value`` pairs (not a loop)
        gives a **one-row DataFrame** with one column per name, marked
        ``df.attrs["star_loop"] = False`` so that :func:`write_star` writes it back as pairs.
        Numbers become int64/float64 columns, text becomes strings; labels in
        :data:`RELION_STRING_LABELS` stay text even when they look numeric.

    Raises
    ------
    InputError
        Naming the file and, where there is one, the line: missing/empty/binary file, no
        ``data_`` block, a loop row with the wrong number of values, a second ``loop_`` in a
        block, duplicate blocks or columns, text outside any block.
    """
    p, _ = check_input_file(path)
    lines = _decode(p).splitlines()
    try:
        blocks = _scan(lines, p)
    except _ScanError as err:  # report a bad row above the structural fault first
        for block in err.blocks:
            _check_rows(lines, block, p)
        raise
    try:
        parsed = starfile.read(p, always_dict=True, parse_as_string=list(RELION_STRING_LABELS))
    except Exception as exc:  # starfile raises pandas/ValueError/TypeError...: find the line
        for block in blocks:
            _check_rows(lines, block, p)
        raise InputError(
            f"starfile cannot parse the file ({type(exc).__name__}: {exc})", p
        ) from exc
    out: dict[str, pd.DataFrame] = {}
    if list(parsed) != [b.name for b in blocks]:
        raise InputError(
            f"starfile found blocks {list(parsed)} but the file has "
            f"{[b.name for b in blocks]}: the file is malformed",
            p,
        )
    for block in blocks:
        value = parsed[block.name]
        if isinstance(value, pd.DataFrame) and (
            not _consistent(block, value) or bool(value.isna().to_numpy().any())
        ):
            _check_rows(lines, block, p)
        if not _consistent(block, value):
            raise InputError(
                f"line {block.line}: starfile read data_{block.name} inconsistently "
                f"(expected {block.n_rows} rows of {len(block.columns)} columns)",
                p,
            )
        if isinstance(value, dict):
            df = pd.DataFrame({k: [v] for k, v in value.items()})
        else:
            df = value.reset_index(drop=True)  # a new frame, without starfile's .name attribute
        df.attrs[_LOOP_ATTR] = block.kind == "loop"
        out[block.name] = df
    return out


# ---------------------------------------------------------------- writing


def _text_token(s: str, where: str) -> str:
    """A string value as a STAR token: quoted when empty, spaced or STAR-like."""
    if _UNWRITABLE.search(s):
        raise ConfigError(
            f"{where}: the value {s!r} contains a quote character or a line break, which STAR "
            "readers (starfile, RELION) cannot read back; remove it"
        )
    return f'"{s}"' if _NEEDS_QUOTES.search(s) else s


def _other_token(v, where: str) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, bool | np.bool_):
        return "1" if v else "0"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return repr(float(v))
    return _text_token(str(v), where)


def _format_column(col: pd.Series, where: str) -> list[str]:
    """The values of one column as STAR tokens (numbers round-trip exactly)."""
    dtype = col.dtype
    if isinstance(dtype, np.dtype):
        if dtype.kind == "b":
            return np.where(col.to_numpy(), "1", "0").tolist()
        if dtype.kind in "iu":
            return list(map(str, col.to_numpy().tolist()))
        if dtype == np.float64:
            return list(map(repr, col.to_numpy().tolist()))  # shortest exact text
        if dtype.kind == "f":
            return col.to_numpy().astype(str).tolist()  # shortest for its own precision
    values = col.to_numpy(dtype=object).tolist()
    if all(type(v) is str for v in values):
        joined = "\x00".join(values)  # one scan of the whole column in the common case
        if (joined.count("\x00") == len(values) - 1 and not _ANY_UNWRITABLE.search(joined)
                and not _ANY_NEEDS_QUOTES.search("\x00" + joined)):
            return values
    return [_text_token(v, where) if isinstance(v, str) else _other_token(v, where) for v in values]


class StarTokens(dict):
    """``{column: tokens}`` for ``df.attrs[TOKENS_ATTR]``, shared, not copied, by the tables
    pandas derives from ``df`` (pandas deep-copies ``attrs`` at every operation)."""

    def __deepcopy__(self, memo):
        return self


def star_tokens(col: pd.Series, where: str = "") -> list[str]:
    """The values of ``col`` as :func:`write_star` writes them (one STAR token each).

    For a column written again and again unchanged (a job's input columns, every iteration):
    format it once and hand the tokens over in ``df.attrs[TOKENS_ATTR]``, as a
    :class:`StarTokens`. ``where`` names the column in errors (default: its name).
    """
    return _format_column(col, where or f"column _{col.name}")


def _block_lines(name: str, df: pd.DataFrame, path: Path) -> Iterator[str]:
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"{path}: block {name!r} must be a pandas DataFrame, not {type(df)}")
    if any(ch.isspace() for ch in name):
        raise ConfigError(f"{path}: block name {name!r} contains spaces")
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        raise ConfigError(f"{path}: block {name!r} has duplicate column names")
    bad = [c for c in columns if not c or any(ch.isspace() for ch in c)]
    if bad:
        raise ConfigError(f"{path}: block {name!r} has invalid column names {bad}")
    yield f"data_{name}\n\n"
    pairs = df.attrs.get(_LOOP_ATTR) is False and len(df) == 1
    if pairs:
        width = max((len(c) for c in columns), default=0) + 2
        for c in columns:
            (value,) = _format_column(df[c], f"{path} data_{name} _{c}")
            yield f"_{c:<{width - 1}}{value}\n"
        yield "\n"
        return
    yield "loop_\n"
    yield "".join(f"_{c} #{i}\n" for i, c in enumerate(columns, 1))
    given = {c: t for c, t in df.attrs.get(TOKENS_ATTR, {}).items() if len(t) == len(df)}
    for start in range(0, len(df), _CHUNK_ROWS):
        chunk = df.iloc[start : start + _CHUNK_ROWS]
        cols = [given[c][start : start + _CHUNK_ROWS] if c in given else
                _format_column(chunk[c], f"{path} data_{name} _{c}") for c in columns]
        if cols:
            yield "\n".join(map(" ".join, zip(*cols))) + "\n"
    yield "\n"


def write_star(
    path: str | os.PathLike,
    blocks: Mapping[str, pd.DataFrame],
    *,
    version_comment: bool | str = True,
) -> None:
    """Write tables as a RELION-style STAR file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    blocks : mapping of str to pandas.DataFrame
        Block name (without ``data_``) -> table, written in order. A one-row table with
        ``df.attrs["star_loop"] = False`` (as :func:`read_star` gives for key-value blocks) is
        written as ``_name value`` pairs, every other table as a ``loop_`` with ``_name #i``
        column headers.
    version_comment : bool or str
        ``True`` writes RELION's ``# version 30001`` first line; a string writes
        ``# <string>`` instead; ``False`` writes none.

    Notes
    -----
    Integers are written as integers, floats with the shortest text that reads back to the
    same float64 (so read -> write -> read is exact), booleans as 0/1, missing values as
    ``nan``; strings are quoted when empty, when they contain whitespace or could be taken
    for STAR syntax.

    Raises
    ------
    ConfigError
        A block that is not a DataFrame, duplicate or blank column names, a string value with a
        quote character or a line break.
    """
    path = Path(path)
    with atomic_write(path, "w") as f:
        if version_comment:
            text = "version 30001" if version_comment is True else str(version_comment)
            f.write(f"\n# {text}\n\n")
        for name, df in blocks.items():
            for piece in _block_lines(str(name), df, path):
                f.write(piece)
