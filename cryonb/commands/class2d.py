"""``cryonb class2d``: 2D classification with ``relion_refine``'s flags.

A ``relion_refine`` (or ``mpirun -n N relion_refine_mpi``) command line for 2D classification
runs unchanged with ``cryonb class2d`` (``--ranks N`` replaces ``mpirun -n N``). Options come
from :class:`cryonb.em.Class2DConfig`'s field metadata, so that the CLI, the notebook widgets
and the config file never disagree.
"""

from __future__ import annotations

import sys

__all__ = ["add_parser", "report", "run"]

_EPILOG = """\
examples:
  cryonb class2d --i Extract/job007/particles.star --o Class2D/run --K 50 --iter 25 \\
      --particle_diameter 200 --psi_step 10 --offset_range 5 --offset_step 2 --j 1 --gpu
      (on one GPU, one rank with --j 1 is fastest: threads or ranks sharing it slow
      each other)
  cryonb class2d --ranks 3 --j 1 --gpu 0:1 ...        (2 workers, one GPU each)
  cryonb class2d --ranks 5 --engines mpi --no_parallel_disc_io ...
  cryonb class2d --continue Class2D/run_it010_optimiser.star --iter 25
      (without --o the run goes on under its own rootname, Class2D/run; without --iter
      it stops at its own --iter, as relion_refine --continue)

RELION's --no_parallel_disc_io, --preread_images, --dont_combine_weights_via_disc and
--scratch_dir are understood; so is --pipeline_control DIR (RELION's GUI and schedules: the
job's RELION_JOB_EXIT_* marker in DIR at the end; RELION_JOB_ABORT_NOW there stops the run
cleanly). Harmless relion_refine flags (--dont_check_norm, --fast_subsets ...) are accepted
with a warning.

On a GPU the coarse pass's matrix product runs on TF32 tensor cores (it only ranks the
samples; the second pass scores them again in float32) once no class can be re-seeded any
more (--tf32_from 0.85, as --reseed_until): before, while the classes form, it runs as three
TF32 products with float32's accuracy, so that the GPU's classes are the CPU's on noisy sets
too.
--tf32_from 0 uses TF32 throughout; CRYONB_TF32=0 in the environment keeps the product in
float32 on the FP32 pipes (at 128 px, K=100: half the E-step's speed).
"""


def add_parser(sub) -> None:
    """Register the subcommand."""
    import argparse

    from ..em._config import Class2DConfig
    from ._options import add_config_arguments

    p = sub.add_parser(
        "class2d", help="2D classification (relion_refine's flags)",
        description="Maximum-likelihood 2D classification as relion_refine does it, on CPU "
                    "or GPU, on one or several ranks (ipyparallel engines, optionally under "
                    "MPI). Writes RELION's per-iteration files under --o.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, Class2DConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    """Build the configuration, run, report where the class averages are."""
    from ..em._config import Class2DConfig
    from ..errors import ConfigError
    from ..parallel import run_class2d
    from ._options import config_from_args
    from ._runner import run_job

    extra = {}
    if getattr(args, "continue_from", None) and getattr(args, "iter", None) is None:
        # as relion_refine --continue: the run's own --iter unless one is given
        from ..em.class2d import Class2DJob

        n_iter = Class2DJob.optimiser_iterations(args.continue_from)
        if n_iter:
            extra["iter"] = n_iter
    config, warnings = config_from_args(Class2DConfig, args, **extra)
    if not config.continue_from:
        missing = [text for flag, text in (
            (config.i, "--i, the particles STAR file"),
            (config.o, "--o, the output rootname (e.g. Class2D/run)")) if not flag]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              "required (or --continue <run>_it###_optimiser.star)")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    result = run_job(run_class2d, config, quiet=args.quiet)
    report(result)
    return 0


def report(result, file=None) -> None:
    """Print where the class averages are and how long each stage took."""
    file = file or sys.stdout
    if result.stopped:
        print(f"stopped after iteration {result.iteration}" if result.iteration >= 0
              else "stopped before the initial model", file=file)
    if result.classes:
        print(f"class averages: {result.classes}", file=file)
    for key in ("model", "data", "optimiser"):
        if key in result.files:
            print(f"{key + ':':11s} {result.files[key]}", file=file)
    print(result.stats.table(), file=file)
