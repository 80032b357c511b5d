"""``cryonb autopick``: template autopicking with ``relion_autopick``'s flags.

A ``relion_autopick`` (or ``mpirun -n N relion_autopick_mpi``) command line for template
picking runs unchanged with ``cryonb autopick`` (``--ranks N`` replaces ``mpirun -n N``;
``--psi_step`` is accepted for RELION's ``--ang``). Options come from
:class:`cryonb.pick.AutopickConfig`'s field metadata. Every rank works (an all-ranks job); the
``--gpu`` string gives each rank one device (the first of its group, groups reused cyclically
when there are fewer groups than ranks). Ranks run as processes of this command.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "rank_devices", "run"]

_EPILOG = """\
examples:
  cryonb autopick --i CtfFind/job004/micrographs_ctf.star \\
      --ref Class2D/job010/run_it025_classes.mrcs --odir AutoPick/job011/ \\
      --pickname autopick --particle_diameter 200 --ang 10 \\
      --lowpass 20 --ctf --invert --threshold 0.3 --min_distance 100
  cryonb autopick --ranks 4 --gpu 0:1 ...      (4 ranks, two on each GPU)
  cryonb autopick --ranks 2 --j 4 ...          (CPU: 2 ranks x 4 threads)

The references must be in units of the micrograph noise (class averages of --norm extracted
particles are); --invert picks dark particles with white references.
"""


def add_parser(sub) -> None:
    """Register the subcommand."""
    from ..pick import AutopickConfig
    from ._options import add_config_arguments

    p = sub.add_parser(
        "autopick", help="template autopicking (relion_autopick's flags)",
        description="Pick particles by matching 2D references against micrographs with "
                    "RELION's figure of merit, on CPU or GPU, on one or several ranks. Writes "
                    "<odir><micrograph>_<pickname>.star per micrograph, <odir><pickname>.star "
                    "and <odir>summary.star.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, AutopickConfig, relion=False)
    p.add_argument("--psi_step", dest="psi_step", type=float, default=None,
                   help="the same as --ang")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def rank_devices(config) -> tuple[list, str]:
    """The device of each rank from ``--gpu``/``--cpu`` (autopick rule), and the table.

    Returns
    -------
    devices : list of int or None
        One per rank; None = CPU.
    table : str
        The resolved map to show (empty on the CPU).

    Raises
    ------
    ResourceError
        ``--gpu`` given but no GPU usable here.
    """
    from ..backend import device_count, gpu_available
    from ..errors import ResourceError
    from ..parallel.devices import resolve_device_map

    if config.cpu or config.gpu is None:
        return [None] * config.ranks, ""
    if not gpu_available():
        raise ResourceError("--gpu was given but no GPU is usable here (CuPy and a CUDA "
                            "device are needed): drop --gpu to pick on the CPU")
    dmap = resolve_device_map(config.gpu, config.ranks, config.j, n_devices=device_count(),
                              job="autopick")
    return [a.devices[0] for a in dmap.assignments], dmap.format_table()


def run(args) -> int:
    """Build the configuration, pick, report the number of picks and the files."""
    from ..errors import ConfigError
    from ..pick import AutopickConfig, run_autopick
    from ._options import config_from_args

    config, _ = config_from_args(AutopickConfig, args)
    if not config.i or not config.ref:
        raise ConfigError("--i (micrographs STAR file) and --ref (2D references) are required")
    if config.engines not in ("auto", "inprocess"):
        raise ConfigError(f"--engines {config.engines}: autopick runs its ranks as processes of "
                          "this command (--engines inprocess); a cluster runtime calls "
                          "cryonb.pick.autopick_engine on each engine")
    devices, table = rank_devices(config)
    if table and not args.quiet:
        print(table, file=sys.stderr)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        from ..pick import MicrographSet

        bar = tqdm(total=len(MicrographSet.read(config.i, config.angpix)), unit="mic",
                   desc="autopick", file=sys.stderr)
    ranks_as = "threads" if config.ranks == 1 else "processes"
    try:
        result = run_autopick(config, devices, ranks_as=ranks_as,
                              on_micrograph=(lambda r: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    n = len(result.micrographs)
    print(f"{result.n_picks} particles picked on {n} micrographs in {result.seconds:.1f} s "
          f"({n / max(result.seconds, 1e-9):.2f} micrographs/s)")
    print(f"coordinate files: {result.coordinate_list}")
    print(f"summary:          {result.summary}")
    return 0
