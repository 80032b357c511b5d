"""``cryonb demo``: simulate a small data set and classify it, in a couple of minutes on a laptop.

Writes ``<o>/data/particles.star`` (+ stack and truth table) with :mod:`cryonb.simulate`, runs
2D classification into ``<o>/Class2D/run`` (on a GPU when one is usable), and prints where the
class averages are and how well the classes match the simulated views.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "demo", help="simulate a small data set and classify it",
        description="Simulate particles of a phantom in a few discrete views (with CTF and "
                    "noise) and run 2D classification on them: the quickest way to see cryonb "
                    "work. A GPU is used when one is usable.")
    p.add_argument("--o", default="cryonb_demo", help="output folder (default: ./cryonb_demo)")
    p.add_argument("--n", type=int, default=1200, help="particles (default 1200)")
    p.add_argument("--box", type=int, default=64, help="box size in pixels (default 64)")
    p.add_argument("--views", type=int, default=6, help="discrete views (default 6)")
    p.add_argument("--snr", type=float, default=0.1, help="pixel SNR after CTF (default 0.1)")
    p.add_argument("--K", type=int, default=None, help="classes (default: --views)")
    p.add_argument("--iter", type=int, default=15, help="iterations (default 15)")
    p.add_argument("--psi_step", type=float, default=10.0, help="degrees (default 10)")
    p.add_argument("--offset_range", type=float, default=4.0, help="pixels (default 4)")
    p.add_argument("--j", type=int, default=None, help="threads (default: all cores, up to 4)")
    p.add_argument("--ranks", type=int, default=1, help="ranks (default 1: this process)")
    p.add_argument("--gpu", nargs="?", const="", default=None, metavar="SPEC",
                   help="device string (default: a GPU if one is usable)")
    p.add_argument("--cpu", action="store_true", help="use the CPU path")
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    """Simulate, classify, report."""
    import numpy as np
    import pandas as pd

    from ..em._config import Class2DConfig
    from ..io import read_particles
    from ..parallel import run_class2d
    from ..parallel.hardware import cpu_count
    from ..simulate import simulate_particles, write_particle_set
    from ._runner import run_job
    from .class2d import report

    out = Path(args.o)
    print(f"simulating {args.n} particles ({args.box} px, {args.views} views, SNR {args.snr})",
          file=sys.stderr)
    sim = simulate_particles(n=args.n, box=args.box, n_views=args.views, snr=args.snr,
                             seed=args.random_seed, progress=not args.quiet)
    star = write_particle_set(sim, out / "data")
    config = Class2DConfig(
        i=str(star), o=str(out / "Class2D" / "run"), K=args.K or args.views, iter=args.iter,
        psi_step=args.psi_step, offset_range=args.offset_range, random_seed=args.random_seed,
        j=args.j or min(4, cpu_count()), ranks=args.ranks, gpu=args.gpu, cpu=args.cpu,
    ).validate()
    print(f"particles: {star}")
    result = run_job(run_class2d, config, quiet=args.quiet)
    report(result)
    if result.files.get("data"):
        table = read_particles(result.files["data"]).particles
        truth = pd.read_csv(out / "data" / "particles_truth.csv")
        cls = table["rlnClassNumber"].to_numpy()
        counts = pd.crosstab(cls, truth["view"].to_numpy()).to_numpy()
        purity = counts.max(axis=1).sum() / max(1, len(cls))
        print(f"class purity against the simulated views: {purity:.3f} "
              f"({len(np.unique(cls))} classes used; 1.000 = every class holds particles of "
              "one view only)")
        print(f"next: look at the classes with `relion_display --i {result.classes}` or "
              "`cryonb info` on them, or in a notebook (notebooks/02_class2d.ipynb); run on your "
              "own particles with `cryonb class2d --i particles.star --o Class2D/run --K 50 "
              "--particle_diameter <A>` (RELION's flags)")
    return 0
