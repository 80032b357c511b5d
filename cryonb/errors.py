"""Exceptions raised by cryonb.

Every error a user can cause (bad input files, bad options, too little memory or disc) is a
subclass of :class:`CryonbError`, so that the command line can print its message without a
traceback. The message always names the file, field or character at fault and what to do.
"""

from __future__ import annotations

__all__ = ["ConfigError", "CryonbError", "InputError", "ResourceError"]


class CryonbError(Exception):
    """Base class of all user-facing cryonb errors."""


class InputError(CryonbError, ValueError):
    """An input file is unreadable, malformed or inconsistent.

    Parameters
    ----------
    message : str
        What is wrong and what to do about it.
    path : str or os.PathLike, optional
        The file at fault; prefixed to the message.
    """

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(CryonbError, ValueError):
    """A job option or combination of options is invalid."""


class ResourceError(CryonbError, RuntimeError):
    """Not enough memory, disc or devices for what was asked."""
