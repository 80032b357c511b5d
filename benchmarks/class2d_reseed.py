"""2D classification: what a re-seeding iteration costs, with the split tests on the device or
on the host, against another tree of cryonb.

Each run is a user's run (``cryonb.parallel.run_class2d``, one rank, in a fresh process) on a
simulated set; per iteration it prints the wall seconds, the M-step's seconds (where the split
tests run) and the classes re-seeded. Variants:

- ``device``: this tree as shipped (with ``--gpu``: the split tests on the rank's GPU);
- ``host``: this tree with the split tests on the host (``Class2DJob.reseed_device`` cleared
  in every M-step: the host path, as on a CPU run or a leader without a GPU);
- ``base``: the tree given with ``--base`` (another version of cryonb, e.g. ``git archive``).

With ``--similarity K ...`` it first times the class similarities of a re-seeding check alone
(:func:`cryonb.em._reseed.class_similarity`, all pairs of K class images: projections of the
phantom at random orientations, 128 px, 72 angles, radius 16 and 32 px) on the host and, when
CuPy is usable, on the GPU.

The default shape is RELION 5's published one (10,000 x 128 px, K=20, psi step 10, offsets
5 / 2), whose re-seeding iteration took 3.5 s (2.8 s of M-step) on an H100 host on 2026-12-06.

    python benchmarks/class2d_reseed.py --out DIR [--cpu] [--base TREE] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def one_run(args) -> dict:
    """One run in this process; returns per-iteration times and the re-seeding history."""
    from cryonb.em import Class2DConfig
    from cryonb.em.class2d import Class2DJob
    from cryonb.parallel import run_class2d

    if args.variant == "host":
        orig = Class2DJob._maybe_reseed

        def on_host(job):
            job.reseed_device = None
            orig(job)

        Class2DJob._maybe_reseed = on_host
    profiles = []
    if args.profile_mstep:  # cProfile of each re-seeding M-step's re-seeding
        import cProfile
        import io
        import pstats

        inner = Class2DJob._maybe_reseed

        def profiled(job):
            pr = cProfile.Profile()
            pr.enable()
            inner(job)
            pr.disable()
            if job.model.reseeded:
                text = io.StringIO()
                pstats.Stats(pr, stream=text).sort_stats("cumtime").print_stats(30)
                profiles.append(text.getvalue())

        Class2DJob._maybe_reseed = profiled
    out = Path(args.out) / args.variant / "run"
    cfg = Class2DConfig(i=args.star, o=str(out), K=args.K, iter=args.iter, psi_step=10,
                        offset_range=5, offset_step=2, random_seed=0, j=args.j,
                        cpu=args.cpu, gpu="" if args.cpu else "0")
    t0 = time.perf_counter()
    res = run_class2d(cfg)
    rows = []
    hist = {h.get("iteration"): h for h in res.history}
    for it in (s for s in res.stats.iterations if s.iteration > 0):
        h = hist.get(it.iteration, {})
        rows.append({"iteration": it.iteration, "wall_s": round(it.wall_s, 3),
                     "mstep_s": round(it.stages.get("mstep", 0.0), 3),
                     "reseeded": [r["class"] for r in h.get("reseeded", [])],
                     "on_host_for_memory": h.get("reseed_on_host_for_memory", 0)})
    return {"variant": args.variant, "total_s": round(time.perf_counter() - t0, 2),
            "iterations": rows, **({"profiles": profiles} if profiles else {})}


def similarity_timing(Ks, box: int = 128) -> list[dict]:
    """Seconds of :func:`class_similarity` for K class images, host and device."""
    import numpy as np

    from cryonb.backend import gpu_available
    from cryonb.data.conventions import euler_to_matrix
    from cryonb.em._reseed import class_similarity
    from cryonb.fourier import Projector, ifft2_centered
    from cryonb.simulate import phantom_map

    rng = np.random.default_rng(0)
    proj = Projector(phantom_map(box).astype(np.float32))
    backends = [("host", np)]
    if gpu_available():
        import cupy

        backends.append(("device", cupy))
    rows = []
    for K in Ks:
        rot = euler_to_matrix(rng.uniform(0, 360, K), np.degrees(np.arccos(rng.uniform(-1, 1, K))),
                              rng.uniform(0, 360, K))
        classes = np.stack([ifft2_centered(f, box) for f in proj.project(rot)]).astype(np.float32)
        for r in (16, 32):
            row = {"K": K, "radius_px": r}
            for name, xp in backends:
                class_similarity(classes[:4], n_psi=72, max_res_px=r, xp=xp)  # warm-up
                t = time.perf_counter()
                sim = class_similarity(classes, n_psi=72, max_res_px=r, xp=xp)
                row[f"{name}_s"] = round(time.perf_counter() - t, 3)
                row["pairs_refined"] = int((np.triu(sim, 1) > 0.75).sum())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def simulate(out: Path, n: int, box: int, views: int, snr: float, seed: int) -> str:
    """The simulated set (made once; reused by every run)."""
    star = out / "set" / "particles.star"
    if not star.exists():
        from cryonb.simulate import simulate_particles, write_particle_set

        write_particle_set(simulate_particles(n=n, box=box, n_views=views, snr=snr, seed=seed),
                           star.parent)
    return str(star)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--views", type=int, default=20)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--iter", type=int, default=5)
    p.add_argument("--j", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="run on the host (no --gpu)")
    p.add_argument("--base", help="another cryonb tree for the 'base' variant")
    p.add_argument("--variants", nargs="*", default=["device", "host", "base"])
    p.add_argument("--profile_mstep", action="store_true",
                   help="cProfile each re-seeding (in the JSON, printed for the device run)")
    p.add_argument("--similarity", type=int, nargs="*", default=[],
                   help="time the class similarities alone for these K first")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--star", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variant:  # a child: one run
        print("RESULT " + json.dumps(one_run(a)), flush=True)
        return 0
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sims = similarity_timing(a.similarity) if a.similarity else []
    if sims:
        (out / "class_similarity.json").write_text(json.dumps(sims, indent=1))
    if not a.variants:
        return 0
    star = simulate(out, a.n, a.box, a.views, a.snr, a.seed)
    results = []
    for v in a.variants:
        if v == "base" and not a.base:
            continue
        tree = Path(a.base).resolve() if v == "base" else HERE
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(tree)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--star", star,
               "--variant", v, "--K", str(a.K), "--iter", str(a.iter), "--j", str(a.j)]
        cmd += (["--cpu"] if a.cpu else []) + (["--profile_mstep"] if a.profile_mstep else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            r = {"variant": v, "error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            r = json.loads(line[len("RESULT "):])
        results.append(r)
        for text in r.pop("profiles", []):
            print(f"--- {v}: the re-seeding M-step's profile\n" + "\n".join(
                text.splitlines()[:45]), flush=True)
        print(json.dumps(r), flush=True)
    (out / "class2d_reseed.json").write_text(json.dumps(results, indent=1))
    print(f"\n{a.n} x {a.box} px, K={a.K}, {'CPU' if a.cpu else 'GPU 0'}, --j {a.j}")
    print("| variant | " + " | ".join(f"it {i} s (M-step)" for i in range(1, a.iter + 1))
          + " | re-seeded at |")
    print("|---" * (a.iter + 2) + "|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][-200:]!r} |")
            continue
        cells = [f"{x['wall_s']:.2f} ({x['mstep_s']:.2f})" for x in r["iterations"]]
        when = [str(x["iteration"]) for x in r["iterations"] if x["reseeded"]]
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {', '.join(when) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
