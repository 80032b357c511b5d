"""Which iterations decide whether a TF32 coarse product changes the classes? (CPU only)

The GPU path's coarse product can run on TF32 tensor cores (inputs rounded to 10-bit
mantissas); the CPU path's runs in float32. With TF32 in every iteration (``--tf32_from 0``),
on RELION-made sets at pixel SNR 0.05 the two paths end with different classes for a few
per cent of the particles (``benchmarks/RESULTS.md``); these runs chose the default, three
TF32 products in the first half of a run. This emulates the GPU's rounding on the CPU, so
that the effect of *when* and *how* the product is rounded can be measured without a GPU:
each run is ``cryonb class2d --cpu --j 1`` (deterministic) in a process of its own, with
``cryonb.em._estep``'s ``cross_products`` wrapped:

- ``plain``: not wrapped (the CPU path);
- ``tf32``: both inputs rounded to TF32 (round half up on the 13 dropped bits) in the E-steps
  of iterations ``--tf32_from`` .. ``--tf32_until - 1``, float32 in the others;
- ``split3``: "3 x TF32", ``hi*hi + hi*lo + lo*hi`` with ``hi`` the TF32 rounding and ``lo``
  the rounded remainder (what three TF32 products on the GPU would give).

``compare`` prints, for the iterations of ``class2d_cpu_gpu.SHOWN``, the fraction of
particles in the same class as the first run, as numbered and after renumbering::

    python benchmarks/class2d_tf32_emulation.py run plain --set .agree/noise05 --out R/plain
    python benchmarks/class2d_tf32_emulation.py run tf32 --tf32_from 13 --set ... --out R/f13
    python benchmarks/class2d_tf32_emulation.py compare R/plain R/f13

``class2d_cpu_gpu.py tf32cpu`` rounds the same way, but where the run's own schedule asks
for TF32 (``--tf32_from`` as a fraction of ``--iter``: the E-step's ``precision``), beside
that script's CPU and GPU runs and in its comparison table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _tf32(a):
    """float32 -> the nearest TF32 value (10-bit mantissa, round half up), as float32."""
    from cryonb.kernels import split_tf32_reference

    return split_tf32_reference(a)[0]


def _patch(mode: str, first: int, until: int) -> None:
    """Wrap the E-step's coarse product (this process only)."""
    import cryonb.em._estep as estep

    orig, init0 = estep.cross_products, estep.EStepContext.__init__
    state = {"it": 0}

    def init(self, model, *a, **k):
        state["it"] = int(model.iteration) + 1  # the iteration this E-step belongs to
        init0(self, model, *a, **k)

    def product(x, y, **kw):
        if not first <= state["it"] < until:
            return orig(x, y, **kw)
        xh, yh = _tf32(x), _tf32(y)
        if mode == "tf32":
            return orig(xh, yh, **kw)
        xl, yl = _tf32(np.asarray(x, np.float32) - xh), _tf32(np.asarray(y, np.float32) - yh)
        return orig(xh, yh, **kw) + (orig(xh, yl, **kw) + orig(xl, yh, **kw))

    estep.EStepContext.__init__ = init
    estep.cross_products = product


def run(a) -> None:
    """One classification of ``a.set`` with the flags of ``class2d_cpu_gpu.py``."""
    sys.path.insert(0, str(HERE))
    from class2d_cpu_gpu import FLAGS

    if a.child:
        if a.mode != "plain":
            _patch(a.mode, a.tf32_from, a.tf32_until)
        from cryonb.cli import main

        d = json.loads((Path(a.set) / "set.json").read_text())["particle_diameter"]
        Path(a.out).mkdir(parents=True, exist_ok=True)
        sys.exit(main(["class2d", "--i", str(Path(a.set) / "particles.star"), "--o",
                       str(Path(a.out) / "run"), "--particle_diameter", str(d), *FLAGS,
                       "--cpu", "--j", "1"]))
    cmd = [sys.executable, __file__, "run", a.mode, "--set", a.set, "--out", a.out,
           "--tf32_from", str(a.tf32_from), "--tf32_until", str(a.tf32_until), "--child"]
    subprocess.run(cmd, check=True, env=dict(os.environ))


def compare(a) -> None:
    """Same class as the first run, per shown iteration: as numbered / renumbered."""
    sys.path.insert(0, str(HERE))
    from class2d_cpu_gpu import SHOWN, _same_after_relabelling

    from cryonb.io import read_star

    def classes(root, it):
        f = Path(root) / f"run_it{it:03d}_data.star"
        return read_star(f)["particles"].rlnClassNumber.to_numpy() if f.exists() else None

    for other in a.runs[1:]:
        cells = []
        for it in SHOWN:
            x, y = classes(a.runs[0], it), classes(other, it)
            if x is not None and y is not None:
                cells.append(f"{it}: {(x == y).mean():.3f} / {_same_after_relabelling(x, y):.3f}")
        print(f"{other}: " + ", ".join(cells), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("mode", choices=["plain", "tf32", "split3"])
    r.add_argument("--set", required=True, help="folder with particles.star and set.json")
    r.add_argument("--out", required=True)
    r.add_argument("--tf32_from", type=int, default=0, help="first iteration rounded")
    r.add_argument("--tf32_until", type=int, default=10**6, help="first iteration not rounded")
    r.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+", help="output folders; the first is the reference")
    a = ap.parse_args(argv)
    run(a) if a.cmd == "run" else compare(a)


if __name__ == "__main__":
    main()
