"""``cryonb autopick``: template autopicking with ``relion_autopick``'s flags.

A ``relion_autopick`` (or ``mpirun -n N relion_autopick_mpi``) command line for template
picking runs unchanged with ``cryonb autopick`` (``--ranks N`` replaces ``mpirun -n N``;
``--psi_step`` is accepted for RELION's ``--ang``). Options come from
:class:`cryonb.pick.AutopickConfig`'s field metadata. Every rank works (an all-ranks job); the
``--gpu`` string gives each rank one device (the first of its group, groups reused cyclically
when there are fewer groups than ranks). Ranks run on the parallel runtime
(:func:`cryonb.parallel.run_autopick`): ``--ranks 1`` in this process, more on ipyparallel
engines started here (``--engines local``, or ``mpi`` under mpiexec) or of a running cluster
(``--engines attach --cluster_id ID``). The first Ctrl-C lets the ranks finish the micrographs
being picked and stops (continue with ``--only_do_unfinished``); a second one aborts.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["MicrographProgress", "add_parser", "nothing_picked_hint", "rank_devices", "run",
           "run_with_progress"]

_EPILOG = """\
examples:
  cryonb autopick --i CtfFind/job004/micrographs_ctf.star \\
      --ref Class2D/job010/run_it025_classes.mrcs --odir AutoPick/job011/ \\
      --pickname autopick --particle_diameter 200 --ang 10 \\
      --lowpass 20 --ctf --invert --threshold 0.3 --min_distance 100
  cryonb autopick --ranks 4 --gpu 0:1 ...      (4 ranks, two on each GPU)
  cryonb autopick --ranks 2 --j 4 ...          (CPU: 2 ranks x 4 threads)
  cryonb autopick --ranks 8 --engines mpi --gpu 0:1:2:3 ...   (engines under mpiexec)

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
    p.add_argument("--psi_step", dest="psi_step_alias", type=float, default=None,
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
    from ..parallel import autopick_device_map

    if config.cpu or config.gpu is None:
        return [None] * config.ranks, ""
    if not gpu_available():
        raise ResourceError("--gpu was given but no GPU is usable here (CuPy and a CUDA "
                            "device are needed): drop --gpu to pick on the CPU")
    dmap = autopick_device_map(config, device_count())
    return [a.devices[0] for a in dmap.assignments], dmap.format_table()


class MicrographProgress:
    """A ``progress`` callback of an all-ranks job: the device table, then a bar of
    micrographs.

    Parameters
    ----------
    quiet : bool
        Draw nothing.
    file : file-like
        Default ``sys.stderr``.
    """

    def __init__(self, quiet: bool = False, file=None):
        self.quiet = quiet
        self.file = file or sys.stderr
        self.bar = None

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        kind = ev["event"]
        if kind == "setup":
            from tqdm.auto import tqdm

            ranks = len(ev["ranks"])
            if ev["device_table"]:
                print(ev["device_table"], file=self.file)
            print(f"{ev['n_micrographs']} micrographs on {ranks} rank{'s' * (ranks != 1)} "
                  f"({ev['engines']}, {'GPU' if ev['gpu'] else 'CPU'} path)", file=self.file)
            self.bar = tqdm(total=ev["n_micrographs"], desc=ev["job"], unit="mic",
                            file=self.file, dynamic_ncols=True)
        elif self.bar is not None and kind == "pool":
            self.bar.update(1)
        elif self.bar is not None and kind == "stage" and ev["stage"] == "stop":
            self.bar.set_postfix_str("stopping")
        elif kind == "done":
            self.close()

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_with_progress(run, config, quiet: bool = False):
    """``run(config, progress=..., stop_event=...)`` with a micrograph bar and Ctrl-C handling
    (:func:`cryonb.commands._runner.run_job`: the first Ctrl-C stops cleanly)."""
    from ._runner import run_job

    bar = MicrographProgress(quiet)

    def go(cfg, *, progress, stop_event):
        def both(ev):
            progress(ev)  # warnings
            bar(ev)

        return run(cfg, progress=both, stop_event=stop_event)

    try:
        return run_job(go, config, quiet=True)
    finally:
        bar.close()


def run(args) -> int:
    """Build the configuration, pick on the ranks, report the number of picks and the files."""
    from ..errors import ConfigError
    from ..parallel import run_autopick
    from ..pick import AutopickConfig
    from ._options import config_from_args

    alias = getattr(args, "psi_step_alias", None)
    if alias is not None:
        if args.psi_step is not None and args.psi_step != alias:
            raise ConfigError(f"--ang {args.psi_step:g} and --psi_step {alias:g} are the same "
                              "option: give one")
        args.psi_step = alias
    config, _ = config_from_args(AutopickConfig, args)
    if not config.i or not config.ref:
        raise ConfigError("--i (micrographs STAR file) and --ref (2D references) are required")
    out = run_with_progress(run_autopick, config, quiet=args.quiet)
    if out.stopped:
        print(f"stopped after {out.seconds:.1f} s: the coordinate files of the micrographs "
              "picked are written; run again with --only_do_unfinished to pick the rest")
        return 0
    result = out.result
    n = len(result.micrographs)
    print(f"{result.n_picks} particles picked on {n} micrographs in {out.seconds:.1f} s "
          f"({n / max(out.seconds, 1e-9):.2f} micrographs/s)")
    print(f"coordinate files: {result.coordinate_list}")
    print(f"summary:          {result.summary}")
    if result.n_picks == 0 and n:
        print(nothing_picked_hint(config), file=sys.stderr)
    return 0


def nothing_picked_hint(config) -> str:
    """What to try when a run picked nothing, from the options it ran with."""
    tries = []
    if not config.invert:
        tries.append("--invert if the particles are dark in the micrographs and white in the "
                     "references (class averages of --invert_contrast extracted particles)")
    if not config.ctf:
        tries.append("--ctf if the micrographs have a CTF and the references are "
                     "CTF-corrected class averages")
    tries.append(f"a lower --threshold (this run: {config.threshold:g})")
    return "nothing was picked; try " + "; or ".join(tries)
