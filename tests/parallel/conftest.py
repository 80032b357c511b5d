"""Fixtures of the parallel runtime's tests: a tiny particle set and its serial reference.

The set (150 particles of 32 px in 3 views, spread over 3 stacks so that reads cross stack
files) is classified with K=3, 2 iterations, psi step 20 and offset range 2: a run takes about
a second. The reference is the serial algorithm driven directly through :mod:`cryonb.em`, one
pool, one thread; every parallel configuration must give the same classes and the same sums
to 1e-6 (relative to the largest sum). Helpers are in ``parallel_cases.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from parallel_cases import BOX, N_PARTICLES, PER_STACK, tiny_config


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """``particles.star`` of the tiny set (3 stacks of 50 particles)."""
    from cryonb.io import write_mrc, write_particles
    from cryonb.simulate import simulate_particles

    d = tmp_path_factory.mktemp("tiny_set")
    sim = simulate_particles(n=N_PARTICLES, box=BOX, n_views=3, snr=0.1, seed=3)
    names = []
    for s in range(N_PARTICLES // PER_STACK):
        write_mrc(d / f"stack{s}.mrcs", sim.images[s * PER_STACK:(s + 1) * PER_STACK],
                  sim.pixel_size, stack=True)
        names += [f"{i + 1:06d}@stack{s}.mrcs" for i in range(PER_STACK)]
    table = sim.table.copy()
    table["rlnImageName"] = names
    write_particles(d / "particles.star", table)
    sim.truth.to_csv(d / "particles_truth.csv", index=False)
    return d / "particles.star"


@pytest.fixture(scope="session")
def reference(tiny_set, tmp_path_factory):
    """The serial run: final sums vector, per-particle classes (0-based), class images."""
    from cryonb.em.class2d import Class2DJob

    cfg = tiny_config(tiny_set, tmp_path_factory.mktemp("reference"))
    job = Class2DJob(cfg)
    init = job.init_sums_template()
    for p in job.pools(N_PARTICLES, 0):
        init.add_(job.init_accumulate(job.init_meta(p), job.table.images(p)))
    job.start(init)
    for it in range(1, cfg.iter + 1):
        ctx = job.estep_context(np)
        for p in job.pools(N_PARTICLES, it):
            job.store_results(p, ctx.expectation(job.make_batch(job.batch_meta(p),
                                                                job.table.images(p))))
        sums = ctx.finish().to_host()
        job.maximize(sums)
    return {"sums": sums.to_vector(), "cls": job.state.cls.copy(),
            "classes": job.model.classes.copy()}
