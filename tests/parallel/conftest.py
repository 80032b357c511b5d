"""Fixtures of the parallel runtime's tests: a tiny particle set and its serial reference.

The set (150 particles of 32 px in 3 views, spread over 3 stacks so that reads cross stack
files) is classified with K=3, 2 iterations, psi step 20 and offset range 2: a run takes about
a second. The reference is the serial algorithm driven directly through :mod:`cryonb.em`, one
pool, one thread; every parallel configuration must give the same classes and the same sums
to 1e-6 (relative to the largest sum).
"""

from __future__ import annotations

import numpy as np
import pytest

from cryonb.em._config import Class2DConfig

N_PARTICLES, BOX, PER_STACK = 150, 32, 50
SUM_RTOL = 1e-6


def tiny_config(star, out, **kw) -> Class2DConfig:
    """The tests' 2D classification options (fast, CPU path), with ``kw`` changed."""
    base = {"i": str(star), "o": str(out / "run"), "K": 3, "iter": 2, "psi_step": 20.0,
            "offset_range": 2.0, "random_seed": 0, "timeout": 120.0, "cpu": True}
    base.update(kw)
    return Class2DConfig(**base).validate()


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


def assert_same_as_reference(result, reference) -> None:
    """Same classes per particle, sums equal to :data:`SUM_RTOL` of the largest sum."""
    from cryonb.io import read_mrc, read_particles

    assert result.iteration == 2 and not result.stopped
    assert result.sums is not None
    ref = reference["sums"]
    err = np.max(np.abs(result.sums - ref)) / np.max(np.abs(ref))
    assert err < SUM_RTOL, f"sums differ by {err:.2e} of the largest"
    cls = read_particles(result.files["data"]).particles["rlnClassNumber"].to_numpy() - 1
    np.testing.assert_array_equal(cls, reference["cls"])
    classes = read_mrc(result.classes).data
    assert classes.shape == reference["classes"].shape
