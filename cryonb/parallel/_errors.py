"""Errors of ranks: a dead, silent or failing rank is named by rank, engine, pid and host."""

from __future__ import annotations

import re

from ..errors import ConfigError, CryonbError, InputError, ResourceError

__all__ = ["RankError", "from_record", "from_remote"]


class RankError(CryonbError, RuntimeError):
    """A rank died, stopped answering, or failed with an unexpected error.

    Attributes
    ----------
    rank : int or None
    host : str or None
    """

    def __init__(self, message: str, rank: int | None = None, host: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.host = host


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours of IPython's tracebacks

_USER_ERRORS = {"InputError": InputError, "ConfigError": ConfigError,
                "GpuSpecError": ConfigError, "ResourceError": ResourceError,
                "RankError": RankError}


def _user_error(ename: str, message: str, rank, host) -> CryonbError | None:
    cls = _USER_ERRORS.get(ename)
    if cls is None:
        return None
    if cls is RankError:
        return RankError(message, rank, host)
    return cls(message)


def from_remote(exc: BaseException, label: str, what: str, rank=None, host=None) -> Exception:
    """Translate an exception of a call to a rank into the error to raise.

    ``ipyparallel`` reports an engine's exception as ``RemoteError`` (``ename``, ``evalue``,
    ``traceback``): user errors (:class:`~cryonb.errors.CryonbError` subclasses) become the
    same class with the rank named in front; a dead engine becomes a :class:`RankError`; any
    other error a :class:`RankError` with the engine's traceback.
    """
    ename = getattr(exc, "ename", None)
    if ename is None:
        return exc
    evalue = getattr(exc, "evalue", str(exc))
    if ename == "EngineError" or ("died" in str(evalue) and "Engine" in str(evalue)):
        return RankError(f"{label} died during {what} ({evalue})", rank, host)
    user = _user_error(ename, f"{label}: {evalue}", rank, host)
    if user is not None:
        return user
    tb = _ANSI.sub("", getattr(exc, "traceback", "") or "")
    return RankError(f"{label} failed during {what}: {ename}: {evalue}\n{tb}", rank, host)


def from_record(rec: dict, label: str, rank=None, host=None) -> Exception:
    """Translate a worker's error record (:func:`~cryonb.parallel._worker.error_record`)."""
    where = f"thread {rec['thread']}, " if rec.get("thread") is not None else ""
    msg = f"{label} ({where}{rec.get('stage', 'work')}): {rec['message']}"
    if rec.get("cryonb"):
        user = _user_error(rec["type"], msg, rank, host)
        if user is not None:
            return user
    return RankError(f"{msg}\n{rec.get('traceback', '')}", rank, host)
