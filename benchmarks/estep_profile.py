"""Where the E-step's time goes: per-stage seconds on one pool size (CPU or GPU).

    python benchmarks/estep_profile.py --n 2000 --box 128 --K 50 [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--psi", type=float, default=10.0, help="--psi_step")
    ap.add_argument("--views", type=int, default=20, help="views of the simulated set (<= K)")
    ap.add_argument("--pool", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)
    os.environ["CRYONB_PROFILE"] = "1"
    try:  # run as a script: benchmarks/ is on the path
        from class2d_gpu import simulate
    except ImportError:  # imported as benchmarks.estep_profile from the repository root
        from benchmarks.class2d_gpu import simulate
    from cryonb.em import Class2DConfig
    from cryonb.em.class2d import Class2DJob

    star = simulate(a.n, a.box, views=min(a.K, a.views))
    cfg = Class2DConfig(i=str(star), o=str(star.parent / f"prof_{a.K}" / "run"), K=a.K,
                        iter=a.warmup + 1, psi_step=a.psi, offset_range=5, offset_step=2,
                        random_seed=0, **({"gpu": "0"} if a.gpu else {"cpu": True}))
    job = Class2DJob(cfg)
    if a.gpu:
        import cupy as xp
    else:
        xp = np
    init = job.init_sums_template()
    for p in job.pools(a.pool, 0):
        init.add_(job.init_accumulate(job.init_meta(p), job.table.images(p)))
    job.start(init)
    for it in range(1, a.warmup + 2):
        ctx = job.estep_context(xp)
        t0 = time.perf_counter()
        for p in job.pools(a.pool, it):
            job.store_results(p, ctx.expectation(job.make_batch(job.batch_meta(p),
                                                                job.table.images(p))))
        e = time.perf_counter() - t0
        t1 = time.perf_counter()
        sums = ctx.finish().to_host()
        fin = time.perf_counter() - t1
        t2 = time.perf_counter()
        job.maximize(sums)
        m = time.perf_counter() - t2
        print(json.dumps({"iteration": it, "estep_s": round(e, 3), "finish_s": round(fin, 3),
                          "mstep_s": round(m, 3), "n_sig": float(job.state.n_sig.mean()),
                          "current_size": job.model.current_size,
                          "profile": {k: round(v, 3) for k, v in ctx.profile.items()},
                          "tally": ctx.tally}),
              flush=True)


if __name__ == "__main__":
    main()
