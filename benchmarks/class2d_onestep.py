"""Where do the CPU and GPU paths of one class2d iteration part? (diagnostic, GPU machine)

From any iteration's saved state of a run (``<run>_it###_optimiser.star``), this runs the next
iteration's E-step on the CPU and on the GPU, then the M-step (re-seeding included) with each
E-step's sums, its re-seeding on the host cores or on the GPU (as a one-rank GPU run's leader
does it). It prints, per class, the relative difference ``||a - b|| / ||a||`` of

- the E-step's back-projected sums (``data``, ``weight``) and class priors, GPU against CPU;
- the new class images of each (E-step, M-step) combination against the all-CPU one;

and each M-step's re-seeding record. A relative difference near float32 rounding (1e-7 to
1e-6) in every class means the two paths compute the same iteration; a larger one in some
classes names the step that separates them.

    python benchmarks/class2d_onestep.py RUN_it009_optimiser.star [--pool 500]

Without CuPy (no GPU) it runs the CPU parts only (a dry run: every difference is 0).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _relative(a, b) -> list[float]:
    return [float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-300))
            for k in range(len(a))]


def _estep(opt: str, pool: int, xp, **options):
    """The E-step after the saved iteration: per-particle results (host) and sums (host)."""
    from cryonb.em.class2d import Class2DJob

    job = Class2DJob.from_optimiser(opt, **options)
    ctx = job.estep_context(xp)
    rows = []
    for p in job.pools(pool, job.iteration + 1):
        r = ctx.expectation(job.make_batch(job.batch_meta(p), job.table.images(p)))
        rows.append(r.get() if hasattr(r, "get") else np.asarray(r))
    return np.concatenate(rows), ctx.finish().to_host()


def _mstep(opt: str, pool: int, results, sums, reseed_on_gpu: bool):
    """The M-step of that iteration from the given E-step: new class images and history."""
    from cryonb.em.class2d import Class2DJob

    job = Class2DJob.from_optimiser(opt, cpu=True, gpu="", j=1)
    pools = job.pools(pool, job.iteration + 1)
    for p, r in zip(pools, np.split(results, np.cumsum([len(p) for p in pools])[:-1])):
        job.store_results(p, r)
    job.reseed_device = 0 if reseed_on_gpu else None
    job.maximize(sums)
    return job.model.classes.copy(), job.history[-1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimiser", help="a run's _it###_optimiser.star (cryonb's)")
    ap.add_argument("--pool", type=int, default=500, help="particles per E-step pool")
    a = ap.parse_args(argv)
    try:
        import cupy
    except ImportError:
        cupy = None
    opt, pool = a.optimiser, a.pool
    # o: the continued jobs write nothing here, but each needs an output root of its own
    rc, sc = _estep(opt, pool, np, cpu=True, gpu="", j=1, o="/tmp/class2d_onestep_cpu/run")
    rg, sg = (_estep(opt, pool, cupy, cpu=False, gpu="0", j=1,
                     o="/tmp/class2d_onestep_gpu/run") if cupy else (rc, sc))
    rep = {"particles whose best class differs": int((rc[:, 0] != rg[:, 0]).sum()),
           "E-step sums, GPU vs CPU": {n: _relative(getattr(sc, n), getattr(sg, n))
                                       for n in ("data", "weight")},
           "class priors, GPU vs CPU": float(np.abs(sg.pdf_class - sc.pdf_class).max()
                                             / sc.pdf_class.sum())}
    ref, hist = _mstep(opt, pool, rc, sc, False)
    rep["re-seeding (E-step CPU, M-step host)"] = hist["reseeded"]
    for label, res, sums, on_gpu in (("E-step CPU, re-seeding GPU", rc, sc, True),
                                     ("E-step GPU, re-seeding host", rg, sg, False),
                                     ("E-step GPU, re-seeding GPU", rg, sg, True)):
        if cupy is None and (on_gpu or sums is not sc):
            continue
        cls, h = _mstep(opt, pool, res, sums, on_gpu)
        rep[f"classes, {label}"] = _relative(ref, cls)
        rep[f"re-seeding ({label})"] = h["reseeded"]
    for k, v in rep.items():
        if isinstance(v, dict):
            for n, x in v.items():
                print(f"{k}, {n}: " + " ".join(f"{y:.1e}" for y in x))
        elif isinstance(v, list) and v and isinstance(v[0], float):
            print(f"{k}: " + " ".join(f"{y:.1e}" for y in v))
        else:
            print(f"{k}: {json.dumps(v)}")
    return rep


if __name__ == "__main__":
    main()
