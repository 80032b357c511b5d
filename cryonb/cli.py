"""The ``cryonb`` command: RELION-style flags, one subcommand per job.

Each subcommand lives in :mod:`cryonb.commands` as a module with ``add_parser(subparsers)``
and ``run(args) -> int``. User errors (:class:`cryonb.errors.CryonbError`) are printed as one
clear message with exit status 2, never as a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from . import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

#: subcommand name -> module in cryonb.commands
COMMANDS = {
    "demo": "demo",
    "simulate": "simulate",
    "info": "info",
    "class2d": "class2d",
    "autopick": "autopick",
    "extract": "extract",
    "gpumap": "gpumap",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands whose modules are missing are left out)."""
    p = argparse.ArgumentParser(
        prog="cryonb",
        description="GPU cryo-EM single-particle processing you can see and steer from a "
                    "notebook; RELION's flags and file formats.",
    )
    p.add_argument("--version", action="version", version=f"cryonb {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS.values():
        try:
            m = importlib.import_module(f"cryonb.commands.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("cryonb.commands"):
                continue
            raise
        m.add_parser(sub)
    return p


def _plain_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one line of text, no source line (``--debug``: Python's
    own format)."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cryonb`` console script.

    Under RELION's pipeline (``--pipeline_control DIR``) the run ends with RELION's exit
    marker in ``DIR``, whatever happens, bad options included (see
    :mod:`cryonb.commands._pipeline`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    folder = _pipeline_folder(argv)
    if not folder:
        return _main(argv)
    from .commands._pipeline import PipelineControl

    control = PipelineControl(folder)
    try:
        control.start()
    except OSError as exc:
        print(f"cryonb: error: --pipeline_control {folder}: cannot use it as the job's folder "
              f"({exc.strerror or exc})", file=sys.stderr)
        return 2
    rc: int | str | None = 1
    try:
        rc = _main(argv)
    except SystemExit as exc:  # argparse: --help, or a usage error
        rc = exc.code
        raise
    finally:
        control.close()
        try:
            marker = control.finish(rc in (0, None))
        except OSError as exc:  # keep the run's own outcome; say why RELION won't see it
            marker = None
            print(f"cryonb: warning: RELION's exit marker could not be written in {folder}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
    if control.aborted:
        print(f"cryonb: aborted on request ({control.folder / (marker or '')})",
              file=sys.stderr)
        return 2
    return int(rc or 0)


def _pipeline_folder(argv: list[str]) -> str | None:
    """``--pipeline_control``'s value in ``argv``, read before parsing so that a usage error
    gets its marker too: ``--pipeline_control DIR`` or ``=DIR``, or a prefix of the flag
    that argparse takes for it (``--pipeline DIR``); the last one given, as argparse."""
    found = None
    for i, word in enumerate(argv):
        flag, eq, value = word.partition("=")
        if len(flag) >= 5 and "--pipeline_control".startswith(flag):
            if eq:
                found = value
            elif i + 1 < len(argv):
                found = argv[i + 1]
    return found


def _main(argv: list[str]) -> int:
    from .commands._options import explain_unknown

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\ncryonb: error: name a command, e.g. cryonb demo", file=sys.stderr)
        return 2
    if unknown:
        handler = getattr(args, "unknown_handler", None)
        if handler is None:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[args.command].error(explain_unknown(unknown))
        handler(unknown)
    return _run_command(args)


def _run_command(args) -> int:
    """``args.func(args)``, with a one-line error instead of a traceback for bad input."""
    from .errors import CryonbError

    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _plain_warning
            return int(args.func(args) or 0)
    except CryonbError as exc:
        if args.debug:
            raise
        print(f"cryonb {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a file or folder the command could not read or make (permissions, a missing or
        # read-only parent, a full disc): say which and why instead of a traceback
        if args.debug or not exc.filename:
            raise
        print(f"cryonb {args.command}: error: {exc.filename}: {exc.strerror or exc} "
              "(check the path and that you may write there; --debug shows the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryonb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
