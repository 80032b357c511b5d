"""The ``--gpu`` device string: strict parsing, and the device of every rank and thread.

Grammar (RELION's): ``:`` separates the groups of successive ranks, ``,`` separates the threads
of one rank, and an empty string means automatic assignment. ``0,1,1,2:3`` gives the first
working rank four threads on devices 0, 1, 1 and 2, and the second all its threads on device 3.

:func:`resolve_device_map` gives the SAME map as RELION for every string RELION handles sanely
(``src/args.cpp:untangleDeviceIDs``, ``src/ml_optimiser_mpi.cpp:MlOptimiserMpi::initialise``,
``src/autopicker_mpi.cpp:deviceInitialise``), and differs where RELION silently does something
surprising:

- :func:`parse_gpu_spec` refuses what RELION misreads (whitespace, which ``sscanf`` turns into
  "device 0"; signs, letters, non-ASCII digits, empty groups such as ``0::1`` or a trailing
  ``0:``, which RELION treats as automatic; ids of devices that are not visible) with a
  :class:`GpuSpecError` that quotes the string, puts a caret under the fault and suggests a fix.
- Autopick (all ranks work) reuses the groups cyclically when there are fewer groups than ranks,
  as refine does, where RELION reads past the end of its list.
- Surprises that are legal become warnings kept on the :class:`DeviceMap` (and shown under
  :meth:`DeviceMap.format_table`): listed but unused devices, devices shared by several ranks,
  groups beyond the last rank.

Two kinds of job remain different, as in RELION, and the table shows it: in a leader/worker job
(``job="refine"``: 2D/3D classification and refinement) rank 0 leads and has no device, and the
groups belong to ranks 1, 2, ...; in an all-ranks job (``job="autopick"``) the groups belong to
ranks 0, 1, ... and each rank uses one device, the first of its group. A leader/worker job of
ONE rank (cryonb runs it in-process; RELION runs the sequential ``relion_refine``) has a single
rank 0 that leads and works, with the devices worker 1 would get.

This module is pure Python (no CuPy): the caller says how many devices are visible.
"""

from __future__ import annotations

import operator
import os
import unicodedata
import warnings as _warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

__all__ = [
    "DeviceAssignment",
    "DeviceMap",
    "GpuSpecError",
    "parse_gpu_spec",
    "resolve_device_map",
]

Role = Literal["leader", "worker"]
Mode = Literal["automatic", "explicit", "semi-automatic", "none"]
Job = Literal["refine", "autopick"]

_DIGITS = "0123456789"
_PREFIX = "  --gpu '"  # the quoted line of an error message starts with this
_CHAR_NAMES = {" ": "space", "\t": "tab", "\n": "newline", "\r": "carriage return"}
_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter"}


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
class GpuSpecError(ConfigError):
    """A ``--gpu`` string that cryonb refuses.

    Parameters
    ----------
    message : str
        The full message (the string quoted, a caret line, a suggested fix).
    spec : str
        The string as given.
    index : int or None
        0-based index of the first offending character (``None`` when the fault is not one
        place in the string, e.g. no GPU visible at all).
    character : str or None
        The offending character (or device id token).
    """

    def __init__(self, message: str, spec: str, index: int | None = None, character=None):
        super().__init__(message)
        self.spec = spec
        self.index = index
        self.character = character


def _shown(text: str) -> str:
    """``text`` with everything but printable ASCII escaped, so that columns line up."""
    out = []
    for ch in text:
        if " " <= ch <= "~":
            out.append(ch)
        elif ch.isascii():
            out.append(repr(ch)[1:-1])  # \t, \n, \x00
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def _describe(ch: str) -> str:
    """Name one character: ``'a'``, ``' ' (space)``, ``'\\t' (tab, U+0009)``, ``(U+0661 ...)``."""
    if ch == " ":
        return "' ' (space)"
    if " " <= ch <= "~":
        return f"'{ch}'"
    code = f"U+{ord(ch):04X}"
    if ch in _CHAR_NAMES:
        return f"'{_shown(ch)}' ({_CHAR_NAMES[ch]}, {code})"
    return f"'{_shown(ch)}' ({code} {unicodedata.name(ch, 'unnamed character')})"


def _error(spec: str, index: int, width: int, what: str, hint: str, character: str) -> GpuSpecError:
    """A :class:`GpuSpecError` whose message points at ``spec[index:index + width]``."""
    column = len(_PREFIX) + len(_shown(spec[:index]))
    carets = "^" * max(1, len(_shown(spec[index:index + width])))
    message = (
        f"invalid --gpu string: {what} at position {index + 1}\n"
        f"{_PREFIX}{_shown(spec)}'\n"
        f"{' ' * column}{carets} here\n"
        f"{hint}"
    )
    return GpuSpecError(message, spec, index, character)


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _scan(spec: str) -> list[list[tuple[int, int, int]]]:
    """Split ``spec`` into groups of ``(id, start, stop)``; raise at the first bad character."""
    groups: list[list[tuple[int, int, int]]] = [[]]
    start: int | None = None
    for i, ch in enumerate(spec):
        if ch in _DIGITS:
            if start is None:
                start = i
        elif ch in ":,":
            if start is None:
                raise _empty_entry_error(spec, i)
            groups[-1].append((int(spec[start:i]), start, i))
            start = None
            if ch == ":":
                groups.append([])
        else:
            raise _bad_character_error(spec, i)
    if start is None:  # spec is not empty here, so it ends with ':' or ','
        raise _trailing_error(spec)
    groups[-1].append((int(spec[start:]), start, len(spec)))
    return groups


def _is_valid(spec: str) -> bool:
    try:
        _scan(spec)
    except GpuSpecError:
        return False
    return spec != ""


def _without(spec: str, i: int) -> str:
    return spec[:i] + spec[i + 1:]


def _empty_entry_error(spec: str, i: int) -> GpuSpecError:
    """``spec[i]`` is ':' or ',' with no device id before it."""
    ch = spec[i]
    fixed = _without(spec, i)
    if i == 0:
        if fixed == "":
            hint = "leave --gpu empty ('') for automatic assignment"
        else:
            hint = f"remove the leading '{ch}': did you mean '{_shown(fixed)}'?"
        return _error(spec, i, 1, f"'{ch}' with no device id before it", hint, ch)
    prev = spec[i - 1]
    if ch == ":" and prev == ":":
        what = "an empty rank group ('::')"
        hint = (f"every rank group needs at least one device id; remove one ':': did you mean "
                f"'{_shown(fixed)}'?")
    elif ch == ":":  # after ','
        fixed = _without(spec, i - 1)
        what = "',' directly before ':' (a missing device id)"
        hint = f"remove the ',' before ':': did you mean '{_shown(fixed)}'?"
    elif prev == ",":
        what = "two ',' in a row (a missing device id)"
        hint = f"remove one ',': did you mean '{_shown(fixed)}'?"
    else:  # ',' directly after ':'
        what = "',' directly after ':' (a rank group that starts with ',')"
        hint = f"remove the ',' after ':': did you mean '{_shown(fixed)}'?"
    return _error(spec, i, 1, what, hint, ch)


def _trailing_error(spec: str) -> GpuSpecError:
    i = len(spec) - 1
    ch = spec[i]
    fixed = spec[:i]
    if ch == ":":
        hint = (f"remove the trailing ':' (RELION would silently treat it as automatic): did you "
                f"mean '{_shown(fixed)}'?")
    else:
        hint = f"remove the trailing ',': did you mean '{_shown(fixed)}'?"
    return _error(spec, i, 1, f"a trailing '{ch}'", hint, ch)


def _whitespace_hint(spec: str) -> str:
    if spec.strip() == "":
        return "leave --gpu empty ('') for automatic assignment"
    tokens = spec.split()
    if len(tokens) > 1 and all(t.isascii() and t.isdigit() for t in tokens):
        return (f"did you mean '{':'.join(tokens)}' (one device per rank) or "
                f"'{','.join(tokens)}' (one device per thread)?")
    between_digits = any(
        spec[a].isspace() and _run_between_digits(spec, a) for a in range(len(spec))
    )
    if len(tokens) > 1 and all(_is_valid(t) for t in tokens) and between_digits:
        joined = ":".join(tokens)
        if _is_valid(joined):
            return f"use ':' between ranks, without spaces: did you mean '{_shown(joined)}'?"
    squeezed = "".join(tokens)
    if not between_digits and _is_valid(squeezed):
        return f"remove the whitespace: did you mean '{_shown(squeezed)}'?"
    return "use ':' between ranks and ',' between the threads of a rank, without whitespace"


def _run_between_digits(spec: str, a: int) -> bool:
    """Whether the whitespace run around ``spec[a]`` has ASCII digits on both sides."""
    lo, hi = a, a
    while lo > 0 and spec[lo - 1].isspace():
        lo -= 1
    while hi < len(spec) - 1 and spec[hi + 1].isspace():
        hi += 1
    return lo > 0 and hi < len(spec) - 1 and spec[lo - 1] in _DIGITS and spec[hi + 1] in _DIGITS


def _bad_character_error(spec: str, i: int) -> GpuSpecError:
    ch = spec[i]
    desc = _describe(ch)
    prev = spec[i - 1] if i > 0 else ""
    nxt = spec[i + 1] if i + 1 < len(spec) else ""
    if ch.isspace():
        return _error(spec, i, 1, f"whitespace {desc}", _whitespace_hint(spec), ch)
    if ch == "-" and nxt in _DIGITS and nxt and prev in ("", ":", ","):
        stop = i + 1
        while stop < len(spec) and spec[stop] in _DIGITS:
            stop += 1
        token = spec[i:stop]
        hint = (f"device ids count from 0 (the first visible device is 0); remove the sign: did "
                f"you mean '{_shown(_without(spec, i))}'?")
        return _error(spec, i, stop - i, f"a negative device id '{token}'", hint, ch)
    if ch == "-" and prev in _DIGITS and prev and nxt in _DIGITS and nxt:
        lo_start = i
        while lo_start > 0 and spec[lo_start - 1] in _DIGITS:
            lo_start -= 1
        hi_stop = i + 1
        while hi_stop < len(spec) and spec[hi_stop] in _DIGITS:
            hi_stop += 1
        lo, hi = int(spec[lo_start:i]), int(spec[i + 1:hi_stop])
        hint = "ranges are not supported: list every device"
        if lo <= hi and hi - lo < 64:
            ids = [str(d) for d in range(lo, hi + 1)]
            hint += (f": did you mean '{':'.join(ids)}' (one device per rank) or "
                     f"'{','.join(ids)}' (one device per thread)?")
        return _error(spec, i, 1, f"a range '{spec[lo_start:hi_stop]}'", hint, ch)
    if ch in ";|/":
        fixed = spec.replace(ch, ":")
        hint = (f"'{ch}' is not a separator: use ':' between ranks and ',' between the threads "
                f"of a rank")
        if _is_valid(fixed):
            hint += f": did you mean '{_shown(fixed)}' (one group per rank)?"
        return _error(spec, i, 1, f"the character {desc}", hint, ch)
    if ch.isdigit():  # a digit, but not an ASCII one
        value = unicodedata.digit(ch, None)
        fixed = "".join(
            str(unicodedata.digit(c)) if c.isdigit() and not c.isascii() else c for c in spec
        )
        hint = f"type the ASCII digit '{value}'" if value is not None else "type ASCII digits"
        if _is_valid(fixed):
            hint += f": did you mean '{_shown(fixed)}'?"
        return _error(spec, i, 1, f"a non-ASCII digit {desc}", hint, ch)
    if ch == "+":
        hint = f"write device ids without a sign: did you mean '{_shown(_without(spec, i))}'?"
        return _error(spec, i, 1, f"the character {desc}", hint, ch)
    if ch == ".":
        hint = ("device ids are whole numbers (0, 1, ...): use ':' between ranks and ',' "
                "between the threads of a rank")
        return _error(spec, i, 1, f"the character {desc}", hint, ch)
    hint = ("device ids are whole numbers counted from 0 (0, 1, ...), separated by ':' between "
            "ranks and ',' between the threads of a rank; leave --gpu empty for automatic "
            "assignment")
    return _error(spec, i, 1, f"the character {desc}", hint, ch)


def _visible_devices_note() -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return "CUDA_VISIBLE_DEVICES is not set"
    return f"CUDA_VISIBLE_DEVICES={env}"


def _check_range(spec: str, groups: list[list[tuple[int, int, int]]], n_devices: int) -> None:
    if n_devices == 0:
        raise GpuSpecError(
            f"--gpu '{_shown(spec)}' given but no GPU is visible ({_visible_devices_note()}); "
            f"use --cpu, or leave --gpu empty", spec)
    for group in groups:
        for value, start, stop in group:
            if value >= n_devices:
                visible = "only device 0 is" if n_devices == 1 else \
                    f"only devices 0-{n_devices - 1} are"
                hint = f"{visible} visible ({_visible_devices_note()})"
                if os.environ.get("CUDA_VISIBLE_DEVICES"):
                    hint += ("; ids count the visible devices from 0, not the physical GPU "
                             "numbers")
                raise _error(spec, start, stop - start, f"device {value} does not exist", hint,
                             spec[start:stop])


def parse_gpu_spec(spec: str | None, n_devices: int | None = None) -> list[list[int]]:
    """Parse a ``--gpu`` string strictly into groups of device ids.

    Parameters
    ----------
    spec : str or None
        RELION's device string: ``:`` between the groups of successive ranks, ``,`` between
        the threads of one rank, e.g. ``'0,1,1,2:3'``. ``None`` or ``''`` means automatic.
    n_devices : int, optional
        Number of visible devices; when given, every id must be below it (0 refuses any id).

    Returns
    -------
    list of list of int
        One list per rank group, one id per entry (``[]`` for automatic), e.g.
        ``[[0, 1, 1, 2], [3]]``.

    Raises
    ------
    GpuSpecError
        (a :class:`~cryonb.errors.ConfigError`) for whitespace anywhere, anything but ASCII
        digits, ``:`` and ``,``, an empty group or entry (``0::1``, ``0:``, ``:0``, ``0,,1``,
        ``1,``), or an id that is not visible. The message quotes the string, marks the first
        fault with a caret line, names the character and suggests a fix. The error's
        ``index`` is the 0-based position of the fault.

    Examples
    --------
    >>> parse_gpu_spec("0,1,1,2:3")
    [[0, 1, 1, 2], [3]]
    >>> parse_gpu_spec("")
    []
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        raise ConfigError(
            f"--gpu must be a string such as '0:1' or '0,1', not {type(spec).__name__} {spec!r}")
    if n_devices is not None:
        n_devices = _count(n_devices, "n_devices", minimum=0)
    if spec == "":
        return []
    groups = _scan(spec)
    if n_devices is not None:
        _check_range(spec, groups, n_devices)
    return [[value for value, _, _ in group] for group in groups]


# --------------------------------------------------------------------------------------------
# the device map
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceAssignment:
    """What one rank runs on.

    Attributes
    ----------
    rank : int
        The rank (ipyparallel engine / MPI rank).
    role : {"leader", "worker"}
        ``"leader"``: rank 0 of a leader/worker job of 2 or more ranks; it hands out work,
        merges results and has no device. Every other rank is a ``"worker"`` (all ranks of an
        autopick job; the single rank of a one-rank job, which also leads, in-process).
    devices : tuple of int
        The device of each thread, ``devices[t]`` for thread ``t`` (refine); for autopick the
        one device of the rank, ``(d,)``; empty for the leader and on the CPU.
    mode : {"automatic", "explicit", "semi-automatic", "none"}
        How RELION's rule chose the devices: ``"automatic"`` (empty string),
        ``"explicit"`` (the group lists exactly one id per thread), ``"semi-automatic"``
        (threads cycle through a group of another length), ``"none"`` (no device).
    """

    rank: int
    role: Role
    devices: tuple[int, ...] = ()
    mode: Mode = "none"


@dataclass
class DeviceMap:
    """The resolved device of every rank and thread, and what looks wrong about it.

    Build it with :func:`resolve_device_map`.

    Attributes
    ----------
    job : {"refine", "autopick"}
        Leader/worker job or all-ranks job.
    spec : str
        The ``--gpu`` string as given (``''`` for automatic).
    ranks, threads, n_devices : int
        Ranks, threads per rank, visible devices (0: CPU).
    assignments : list of DeviceAssignment
        One per rank, in rank order.
    warnings : list of str
        Listed-but-unused devices, devices shared by several ranks, unused rank groups.
    hosts : dict of int to str or None
        Host name of each rank, when known; a device index then names a device per host.
    """

    job: Job
    spec: str
    ranks: int
    threads: int
    n_devices: int
    assignments: list[DeviceAssignment]
    warnings: list[str] = field(default_factory=list)
    hosts: dict[int, str] | None = None
    _sharing: list[str] = field(default_factory=list, repr=False, compare=False)

    def devices_of(self, rank: int) -> tuple[int, ...]:
        """Device of each thread of ``rank`` (empty for the leader and on the CPU).

        Raises
        ------
        KeyError
            If there is no such rank.
        """
        for a in self.assignments:
            if a.rank == rank:
                return a.devices
        raise KeyError(f"no rank {rank}: ranks are 0-{self.ranks - 1}")

    def sharing(self, host: str | None = None) -> dict[int, list[tuple[int, int]]]:
        """Who runs on each device.

        Parameters
        ----------
        host : str, optional
            Only the ranks on this host (see :attr:`hosts`); by default all ranks, which
            counts equal indices as one device (one host).

        Returns
        -------
        dict of int to list of (int, int)
            ``{device: [(rank, thread), ...]}`` over the devices in use, sorted by device. For
            autopick each rank appears once, as thread 0 (all its threads use that device).
        """
        out: dict[int, list[tuple[int, int]]] = {}
        for a in self.assignments:
            if host is not None and (self.hosts or {}).get(a.rank) != host:
                continue
            for t, d in enumerate(a.devices):
                out.setdefault(d, []).append((a.rank, t))
        return dict(sorted(out.items()))

    def workers_per_device(self, host: str | None = None) -> dict[int, int]:
        """Number of distinct ranks on each device in use (RELION's "shares").

        A rank on a device shared by ``n`` ranks budgets ``1/n`` of its free memory.
        ``host`` restricts the count to one host, as in :meth:`sharing`.
        """
        return {d: len({r for r, _ in users}) for d, users in self.sharing(host).items()}

    def to_json_dict(self) -> dict[str, list[int]]:
        """The map as JSON-ready data: ``{"0": [], "1": [0, 1], ...}``.

        Keys are ranks as strings; values the device per thread (refine), the rank's one
        device as a one-element list (autopick), or ``[]`` (leader, CPU).
        """
        return {str(a.rank): list(a.devices) for a in self.assignments}

    def format_table(self, uuids: Mapping | None = None, names: Mapping | None = None,
                     hosts: Mapping[int, str] | None = None) -> str:
        """The map as a plain-text table to show before a run, with the warnings below it.

        Parameters
        ----------
        uuids, names : mapping, optional
            Device UUID / name, keyed by device index (one host) or by ``(rank, device)``
            (engines that see different devices). Adds a ``UUID`` / ``name`` column. When
            UUIDs are given, sharing is counted by UUID, not by index.
        hosts : mapping of int to str, optional
            Host name of each rank (default: :attr:`hosts`); without UUIDs, equal indices on
            different hosts are different devices.

        Returns
        -------
        str
            Columns rank, role, host, thread, device, [UUID], [name], mode, shared by
            (e.g. ``2 ranks, 3 threads``), then one ``warning:`` line per warning. When
            ``uuids`` or other ``hosts`` are given, the warnings about shared devices are
            made again from them (the same index on two machines is not one device).
        """
        hosts = dict(hosts if hosts is not None else self.hosts or {})

        def lookup(m: Mapping | None, rank: int, dev: int) -> str | None:
            if not m:
                return None
            value = m.get((rank, dev), m.get(dev))
            return None if value is None else str(value)

        def key(rank: int, dev: int) -> object:
            uuid = lookup(uuids, rank, dev)
            return ("uuid", uuid) if uuid is not None else ("index", hosts.get(rank), dev)

        users: dict[object, list[tuple[int, int]]] = {}
        for a in self.assignments:
            for t, d in enumerate(a.devices):
                users.setdefault(key(a.rank, d), []).append((a.rank, t))

        def shared_by(rank: int, dev: int) -> str:
            u = users[key(rank, dev)]
            nr, nt = len({r for r, _ in u}), len(u)
            if self.job == "autopick":
                return "-" if nr == 1 else f"{nr} ranks"
            if nr == 1 and nt == 1:
                return "-"
            return f"{nr} rank{'s' * (nr != 1)}, {nt} thread{'s' * (nt != 1)}"

        header = ["rank", "role", "host", "thread", "device"]
        if uuids:
            header.append("UUID")
        if names:
            header.append("name")
        header += ["mode", "shared by"]
        rows: list[list[str]] = []
        for a in self.assignments:
            role: str = a.role
            if self.job == "refine" and self.ranks == 1:
                role = "leader+worker"
            host = hosts.get(a.rank, "-")
            if not a.devices:
                thread = "-" if a.role == "leader" else _thread_range(self.threads)
                device = "-" if a.role == "leader" else "cpu"
                row = [str(a.rank), role, host, thread, device]
                row += ["-"] * (bool(uuids) + bool(names))
                rows.append([*row, a.mode, "-"])
                continue
            for t, d in enumerate(a.devices):
                thread = _thread_range(self.threads) if self.job == "autopick" else str(t)
                row = [str(a.rank), role, host, thread, str(d)]
                if uuids:
                    row.append(lookup(uuids, a.rank, d) or "?")
                if names:
                    row.append(lookup(names, a.rank, d) or "?")
                rows.append([*row, a.mode, shared_by(a.rank, d)])
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        kind = "leader/worker" if self.job == "refine" else "all ranks work"
        lines = [
            f"--gpu '{_shown(self.spec)}' ({'automatic' if not self.spec else 'as given'}): "
            f"{self.job} ({kind}), {self.ranks} rank{'s' * (self.ranks != 1)} x "
            f"{self.threads} thread{'s' * (self.threads != 1)}, {self.n_devices} visible "
            f"device{'s' * (self.n_devices != 1)}",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        messages = self.warnings
        if uuids or hosts != (self.hosts or {}):  # sharing by UUID / these hosts instead

            def label(rank: int, dev: int) -> tuple[object, str]:
                uuid = lookup(uuids, rank, dev)
                if uuid is not None:
                    return (1, uuid), f"device {dev} ({uuid})"
                host = hosts.get(rank)
                return (0, dev, host or ""), f"device {dev}" + (f" on host {host}" * bool(host))

            messages = [w for w in messages if w not in self._sharing]
            messages += _sharing_warnings(self.job, _working(self.assignments), label)
        lines += [f"warning: {w}" for w in messages]
        return "\n".join(lines)


def _working(assignments: list[DeviceAssignment]) -> list[DeviceAssignment]:
    return [a for a in assignments if a.role == "worker"]


def _thread_range(threads: int) -> str:
    return "0" if threads == 1 else f"0-{threads - 1}"


def _count(value, what: str, minimum: int | None) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a whole number, not {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be a whole number, not {value!r}") from None
    if minimum is not None and n < minimum:
        raise ConfigError(f"{what} must be at least {minimum}, not {n}")
    return n


def _workers_on_host(workers_on_host, hosts: dict[int, str] | None,
                     worker_ranks: Sequence[int]) -> dict[int, int]:
    """Workers on each worker's host (RELION's ``ranksOnHost[hostId[rank]]``)."""
    if workers_on_host is None and hosts is not None:
        return {r: sum(hosts[q] == hosts[r] for q in worker_ranks) for r in worker_ranks}
    if workers_on_host is None:
        return {r: len(worker_ranks) for r in worker_ranks}
    if isinstance(workers_on_host, Mapping):
        missing = [r for r in worker_ranks if r not in workers_on_host]
        if missing:
            raise ConfigError(f"workers_on_host gives no count for worker ranks {missing}")
        return {r: _count(workers_on_host[r], f"workers_on_host[{r}]", 1) for r in worker_ranks}
    k = _count(workers_on_host, "workers_on_host", 1)
    return {r: k for r in worker_ranks}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _id_list(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _split_suggestion(groups: list[list[int]], per_rank: int) -> str:
    chunks = [g[s:s + per_rank] for g in groups for s in range(0, len(g), per_rank)]
    return ":".join(",".join(str(d) for d in c) for c in chunks)


def _collect_warnings(job: Job, spec: str, groups: list[list[int]], ranks: int, threads: int,
                      assignments: list[DeviceAssignment],
                      hosts: dict[int, str] | None) -> list[str]:
    out: list[str] = []
    working = _working(assignments)
    used = {d for a in working for d in a.devices}
    if groups:
        n_used_groups = min(len(groups), len(working))
        in_used_groups = {d for g in groups[:n_used_groups] for d in g}
        unused = sorted(in_used_groups - used)
        if unused:
            per_rank = threads if job == "refine" else 1
            them = "them" if len(unused) > 1 else "it"
            verb = "are" if len(unused) > 1 else "is"
            devs = "devices" if len(unused) > 1 else "device"
            msg = (f"{devs} {_id_list(unused)} {verb} listed in --gpu '{_shown(spec)}' but no "
                   f"thread uses {them}: ',' separates the threads of ONE rank")
            if job == "autopick":
                msg += " and autopick uses only the first device of each rank"
            msg += f"; did you mean '{_split_suggestion(groups, per_rank)}'?"
            out.append(msg)
        if len(groups) > len(working):
            n = len(working)
            noun = "worker" if job == "refine" else "rank"
            first = n + 1
            which = (f"group {first} is unused" if len(groups) == first
                     else f"groups {first}-{len(groups)} are unused")
            msg = (f"--gpu lists {len(groups)} rank groups but there {'is' if n == 1 else 'are'} "
                   f"only {_plural(n, noun)}: {which}")
            if job == "refine" and ranks > 1 and len(groups) == ranks:
                msg += (" (rank 0, the leader, takes no device: the groups are for ranks 1, 2, "
                        "...; give one group per worker, or one more rank)")
            out.append(msg)
    def label(rank: int, dev: int) -> tuple[int, str]:
        return dev, (f"device {dev}" if hosts is None else f"device {dev} on host {hosts[rank]}")

    return out + _sharing_warnings(job, working, label)


def _sharing_warnings(job: Job, working: list[DeviceAssignment], label) -> list[str]:
    """One warning per physical device used by several ranks.

    ``label(rank, dev)`` gives ``(sort key, text)``; equal texts are one physical device.
    """
    per_device: dict[tuple[object, str], list[int]] = {}
    for a in working:
        for d in sorted(set(a.devices)):
            ranks = per_device.setdefault(label(a.rank, d), [])
            if a.rank not in ranks:
                ranks.append(a.rank)
    out = []
    for (_, text), rs in sorted(per_device.items(), key=lambda item: (item[0][0], item[0][1])):
        if len(rs) > 1:
            share = _FRACTIONS.get(len(rs), f"1/{len(rs)}")
            who = "worker ranks" if job == "refine" else "ranks"
            out.append(f"{text} is shared by {len(rs)} {who} ({_id_list(rs)}): each gets "
                       f"{share} of its free memory")
    return out


def resolve_device_map(
    spec: str | None,
    ranks: int,
    threads: int = 1,
    *,
    n_devices: int,
    job: Job = "refine",
    workers_on_host: int | Mapping[int, int] | None = None,
    hosts: Mapping[int, str] | None = None,
    warn: bool = False,
) -> DeviceMap:
    """Give every rank and thread its device, as RELION would, and say what looks wrong.

    Parameters
    ----------
    spec : str or None
        The ``--gpu`` string (see :func:`parse_gpu_spec`); ``None``/``''``: automatic.
    ranks : int
        Number of ranks (>= 1). For ``job="refine"``, rank 0 leads and ranks 1..ranks-1
        work; ``ranks=1`` is a single-process run whose rank 0 leads AND works, with the
        devices worker 1 would get (RELION's sequential ``relion_refine``).
    threads : int, default 1
        Threads per rank (``--j``).
    n_devices : int
        Visible devices per rank (keyword only). 0 means CPU: every rank gets no device
        (mode ``"none"``), and a non-empty ``spec`` is an error.
    job : {"refine", "autopick"}, default "refine"
        ``"refine"``: leader/worker job (RELION's ``MlOptimiserMpi``); ``"autopick"``: every
        rank works on ONE device, the first id of its group (rank ``r`` uses group
        ``r % len(groups)``, where RELION crashes past the last group), or ``r % n_devices``
        when automatic.
    workers_on_host : int or mapping of int to int, optional
        For the automatic refine rule: workers on the host of each worker, one count for all
        or ``{rank: count}``. Default: counted from ``hosts``, else all workers on one host.
    hosts : mapping of int to str, optional
        Host name of every working rank (the leader's may be left out). Devices are then
        per host: the same index on two hosts is not shared, and the table shows the hosts.
    warn : bool, default False
        Also emit each warning with :func:`warnings.warn` (``UserWarning``).

    Returns
    -------
    DeviceMap
        One :class:`DeviceAssignment` per rank, and the warnings.

    Raises
    ------
    GpuSpecError
        For a malformed string or an id >= ``n_devices`` (see :func:`parse_gpu_spec`).
    ConfigError
        For a bad count, job, ``workers_on_host`` or ``hosts``.

    Notes
    -----
    Refine, with ``nF`` workers, ``j`` threads and ``groups`` the parsed string: if
    ``0 < len(groups) < nF`` the groups repeat cyclically, so worker ``f`` (1-based) uses
    ``g = groups[(f - 1) % len(groups)]``. Thread ``i`` of worker ``f`` then runs on

    - automatic (empty string): ``n_devices * (((f - 1) % k) * j + i) // (k * j)`` with ``k``
      workers on its host when ``k > 1``, else ``n_devices * i // j``;
    - explicit (``len(g) == j``): ``g[i]``;
    - semi-automatic (otherwise): ``g[i % len(g)]``.

    Examples
    --------
    >>> m = resolve_device_map("2:3", ranks=3, threads=2, n_devices=4)
    >>> m.to_json_dict()
    {'0': [], '1': [2, 2], '2': [3, 3]}
    """
    if job not in ("refine", "autopick"):
        raise ConfigError(f"job must be 'refine' or 'autopick', not {job!r}")
    n_devices = _count(n_devices, "n_devices", 0)
    threads = _count(threads, "threads (--j)", 1)
    ranks = _count(ranks, "ranks", None)
    if ranks < 1:
        if job == "refine":
            raise ConfigError(
                f"ranks={ranks}: a leader/worker job needs at least 2 ranks (1 leader + 1 "
                f"worker), or 1 rank for a single-process run that leads and works")
        raise ConfigError(f"ranks={ranks}: an autopick job needs at least 1 rank")
    spec_str = "" if spec is None else spec
    groups = parse_gpu_spec(spec, n_devices=n_devices)
    if job == "autopick":
        working_ranks = list(range(ranks))
    else:
        working_ranks = [0] if ranks == 1 else list(range(1, ranks))
    host_of = None
    if hosts is not None:
        host_of = {operator.index(r): str(h) for r, h in hosts.items()}
        missing = [r for r in working_ranks if r not in host_of]
        if missing:
            raise ConfigError(f"hosts gives no host name for working ranks {missing}")

    assignments: list[DeviceAssignment] = []
    if job == "autopick":
        for r in range(ranks):
            if n_devices == 0:
                assignments.append(DeviceAssignment(r, "worker", (), "none"))
            elif not groups:
                assignments.append(DeviceAssignment(r, "worker", (r % n_devices,), "automatic"))
            else:
                dev = groups[r % len(groups)][0]
                assignments.append(DeviceAssignment(r, "worker", (dev,), "explicit"))
    else:
        if ranks > 1:
            assignments.append(DeviceAssignment(0, "leader", (), "none"))
        k_of = _workers_on_host(workers_on_host, host_of, working_ranks)
        for f, r in enumerate(working_ranks, start=1):
            if n_devices == 0:
                assignments.append(DeviceAssignment(r, "worker", (), "none"))
                continue
            if not groups:
                k = k_of[r]
                if k > 1:
                    devs = [n_devices * (((f - 1) % k) * threads + i) // (k * threads)
                            for i in range(threads)]
                else:
                    devs = [n_devices * i // threads for i in range(threads)]
                mode: Mode = "automatic"
            else:
                g = groups[(f - 1) % len(groups)]
                if len(g) == threads:
                    devs, mode = list(g), "explicit"
                else:
                    devs, mode = [g[i % len(g)] for i in range(threads)], "semi-automatic"
            assignments.append(DeviceAssignment(r, "worker", tuple(devs), mode))

    messages = _collect_warnings(job, spec_str, groups, ranks, threads, assignments, host_of)
    if warn:
        for msg in messages:
            _warnings.warn(msg, UserWarning, stacklevel=2)
    sharing = [m for m in messages if " is shared by " in m]
    return DeviceMap(job, spec_str, ranks, threads, n_devices, assignments, messages, host_of,
                     sharing)
