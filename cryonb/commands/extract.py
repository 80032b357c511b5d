"""``cryonb extract``: particle extraction with ``relion_preprocess --extract``'s flags.

Options come from :class:`cryonb.pick.extract.ExtractConfig`. ``--o`` is accepted for
``--part_dir`` and ``--coords`` for ``--coord_list``; ``--extract`` (which
``relion_preprocess`` needs) is accepted and implied. Ranks run on the parallel runtime
(:func:`cryonb.parallel.run_extract`), as for ``cryonb autopick``: ``--ranks 1`` in this
process, more on ipyparallel engines (``--engines local``, ``mpi`` or ``attach``).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

_EPILOG = """\
examples:
  cryonb extract --i CtfFind/job004/micrographs_ctf.star --coord_dir AutoPick/job011/ \\
      --coord_suffix _autopick.star --part_dir Extract/job012/ \\
      --part_star Extract/job012/particles.star --extract_size 256 --scale 64 \\
      --norm --bg_radius 25 --invert_contrast
  cryonb extract --i micrographs.star --coords AutoPick/job011/autopick.star --o Extract/ ...
"""


def add_parser(sub) -> None:
    """Register the subcommand."""
    from ..pick.extract import ExtractConfig
    from ._options import add_config_arguments

    p = sub.add_parser(
        "extract", help="extract particles at picked coordinates (relion_preprocess's flags)",
        description="Cut boxes at picked coordinates from each micrograph, optionally "
                    "rescale, normalise and invert them, and write a stack per micrograph and "
                    "a RELION 3.1 particles STAR file carrying each micrograph's CTF.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ExtractConfig, relion=False)
    p.add_argument("--o", dest="part_dir", default=None, help="the same as --part_dir")
    p.add_argument("--coords", dest="coord_list", default=None, help="the same as --coord_list")
    p.add_argument("--extract", action="store_true", help="accepted (relion_preprocess needs it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    """Build the configuration, extract on the ranks, report the particles STAR file."""
    from ..errors import ConfigError
    from ..parallel import run_extract
    from ..pick.extract import ExtractConfig
    from ._options import config_from_args
    from .autopick import run_with_progress

    config, _ = config_from_args(ExtractConfig, args)
    if not config.i:
        raise ConfigError("--i (micrographs STAR file) is required")
    out = run_with_progress(run_extract, config, quiet=args.quiet)
    if out.stopped:
        print(f"stopped after {out.seconds:.1f} s: the stacks of the micrographs done are "
              "written, the particles STAR file is not")
        return 0
    result = out.result
    print(f"{result.n_particles} particles from {len(result.stacks)} micrographs "
          f"in {out.seconds:.1f} s: {result.particles_star}")
    if result.skipped:
        print(f"{len(result.skipped)} micrographs without coordinates were skipped")
    return 0
