"""``cryonb info FILE...``: what a STAR or MRC file holds."""

from __future__ import annotations

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the subcommand."""
    p = sub.add_parser("info", help="describe STAR / MRC files",
                       description="Print what STAR and MRC files hold (blocks, particles, "
                                   "optics groups; shape, mode, voxel size).")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    """Describe each file; a bad file is reported and the others still described."""
    from ..errors import CryonbError
    from ..io import describe

    status = 0
    for i, f in enumerate(args.files):
        if i:
            print()
        try:
            print(describe(f))
        except CryonbError as exc:
            print(f"{f}: error: {exc}")
            status = 2
    return status
