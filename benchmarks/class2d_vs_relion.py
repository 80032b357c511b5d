"""cryonb class2d vs relion_refine on the same data, cores, iterations and sampling (CPU).

For each data set (made by RELION's own programs, :func:`cryonb.testing.make_class2d_set`):
runs ``relion_refine --j 2`` (RELION's GUI command for 2D classification) and
``cryonb class2d --cpu --j 2`` with the same flags, then prints wall and CPU seconds per
iteration of both, their ratio, and both purities and pose errors against the truth. Also runs
cryonb without class re-seeding (``--no_reseed``), to show what re-seeding does, and gives the
purity reached when the classes are right (:func:`cryonb.testing.oracle_purity`: cryonb's
E-step with classes made from the true views, on the other half of the particles).

    python benchmarks/class2d_vs_relion.py [--sets small,large] [--iter 25] [--out DIR]

Wall times depend on what else the machine runs; CPU times (user + system of all threads) are
the steadier comparison. Say which machine gave the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

SETS = {  # name: (particles, box, views, pixel SNR)  -- the two shapes quoted in issue 3
    # at 48 px, SNR 0.08 leaves both programs at chance (purity ~0.3 with 6 classes): the
    # small set is made at SNR 0.25 so that its purities say something
    "small": (1500, 48, 6, 0.25),
    "large": (4000, 64, 8, 0.08),
}


def run_cryonb(s, out: Path, iterations: int, reseed: bool = True) -> dict:
    """cryonb class2d (CPU, 2 threads) with RELION's GUI flags; per-iteration timings."""
    import resource

    from cryonb.em import Class2DConfig
    from cryonb.io import read_star
    from cryonb.parallel import run_class2d
    from cryonb.testing import score_class2d

    cfg = Class2DConfig(i=str(s.particles_star), o=str(out / "run"), K=s.n_views,
                        iter=iterations, tau2_fudge=2, particle_diameter=s.particle_diameter,
                        psi_step=10, offset_range=5, offset_step=2, random_seed=0, cpu=True,
                        j=2, reseed=reseed)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = run_class2d(cfg)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    per = [it.wall_s for it in res.stats.iterations if it.iteration > 0]
    score = score_class2d(read_star(res.files["data"])["particles"], s.truth,
                          pixel_size=s.pixel_size)
    return {"wall_s": wall, "cpu_s": cpu, "wall_per_iteration": float(np.mean(per)),
            "cpu_per_iteration": cpu / iterations, "score": _short(score),
            "optimiser": str(res.files["optimiser"])}


def run_relion(s, out: Path, iterations: int, reuse: bool = False) -> dict:
    """relion_refine --j 2 with the same flags (``reuse``: the numbers of an earlier run on
    the same set, kept in ``out/benchmark.json``, when its command was the same)."""
    from cryonb.testing import run_relion_class2d, score_relion_run

    kept = out / "benchmark.json"
    if reuse and kept.is_file():
        old = json.loads(kept.read_text())
        if old.get("iterations") == iterations and old.get("set") == str(s.particles_star):
            return old["result"]

    r = run_relion_class2d(s.particles_star, out, K=s.n_views, iterations=iterations,
                           tau2_fudge=2, particle_diameter=s.particle_diameter, psi_step=10,
                           offset_range=5, offset_step=2, threads=2, seed=0, progress=False)
    result = {"wall_s": r.total_seconds, "cpu_s": r.total_cpu_seconds,
              "wall_per_iteration": float(np.mean(r.seconds_per_iteration)),
              "cpu_per_iteration": r.total_cpu_seconds / iterations,
              "score": _short(score_relion_run(r, s)), "command": " ".join(r.command),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    kept.write_text(json.dumps({"iterations": iterations, "set": str(s.particles_star),
                                "result": result}))
    return result


def _short(score: dict) -> dict:
    keys = ("purity", "inplane_median_deg", "offset_median_px", "class_sizes")
    return {k: score[k] for k in keys if k in score}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="small,large")
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--out", default="bench_out/class2d_vs_relion")
    ap.add_argument("--snr", type=float, default=None,
                    help="pixel SNR of every set (default: each set's own, see SETS)")
    ap.add_argument("--reuse_relion", action="store_true",
                    help="reuse RELION's numbers from an earlier run of this script on the "
                         "same set and iterations (RELION's runs take most of the time)")
    a = ap.parse_args(argv)
    from cryonb.testing import make_class2d_set, oracle_purity

    out = Path(a.out)
    rows = []
    machine = f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or 'cpu'})"
    for name in a.sets.split(","):
        n, box, views, snr = SETS[name]
        snr = a.snr if a.snr is not None else snr
        s = make_class2d_set(out / f"{name}_set", n_particles=n, box=box, n_views=views,
                             snr=snr, seed=1)
        rel = run_relion(s, out / f"{name}_relion", a.iter, reuse=a.reuse_relion)
        print(name, "relion", json.dumps(rel), flush=True)
        ours = run_cryonb(s, out / f"{name}_cryonb", a.iter)
        print(name, "cryonb", json.dumps(ours), flush=True)
        plain = run_cryonb(s, out / f"{name}_cryonb_noreseed", a.iter, reseed=False)
        print(name, "cryonb --no_reseed", json.dumps(plain), flush=True)
        oracle = oracle_purity(ours["optimiser"], s, workdir=out / f"{name}_templates")
        print(name, "oracle", json.dumps(oracle), flush=True)
        rows.append((name, n, box, views, snr, rel, ours, plain, oracle))
    lines = [f"machine: {machine}, {time.strftime('%Y-%m-%d')}, {a.iter} iterations, "
             "--tau2_fudge 2 --psi_step 10 --offset_range 5 --offset_step 2",
             "", "| set | program | total wall (s) | s/iteration (wall) | s/iteration (CPU) | "
             "purity | in-plane median (deg) | offset median (px) |",
             "|---|---|---|---|---|---|---|---|"]
    for _name, n, box, views, snr, rel, ours, plain, oracle in rows:
        label = f"{n} x {box} px, K={views}, SNR {snr}"
        for prog, r in (("relion_refine --j 2", rel), ("cryonb --cpu --j 2", ours),
                        ("cryonb --no_reseed", plain)):
            sc = r["score"]
            lines.append(f"| {label} | {prog} | {r['wall_s']:.1f} | "
                         f"{r['wall_per_iteration']:.2f} | "
                         f"{r['cpu_per_iteration']:.2f} | {sc['purity']:.3f} | "
                         f"{sc.get('inplane_median_deg', float('nan')):.2f} | "
                         f"{sc.get('offset_median_px', float('nan')):.2f} |")
        lines.append(f"| {label} | ratio (RELION / cryonb) | "
                     f"{rel['wall_s'] / ours['wall_s']:.1f}x | "
                     f"{rel['wall_per_iteration'] / ours['wall_per_iteration']:.1f}x | "
                     f"{rel['cpu_per_iteration'] / ours['cpu_per_iteration']:.1f}x | | | |")
        lines.append(f"| {label} | oracle (classes from the true views) | | | | "
                     f"{oracle['purity']:.3f} | | |")
    text = "\n".join(lines)
    (out / "class2d_vs_relion.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
