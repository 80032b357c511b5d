"""Fixtures of the panel tests: a tiny simulated particle set, a tiny picking set.

The particle set (120 particles of 24 px in 3 views) classifies with K=2 in about 0.1 s per
iteration on the CPU, so that runs, stops and continues take a few seconds in all.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def particles(tmp_path_factory):
    """``particles.star`` of the tiny set, its images named next to it (``particles.mrcs``)."""
    from cryonb.simulate import simulate_particles, write_particle_set

    sim = simulate_particles(n=120, box=24, n_views=3, snr=0.2, seed=2)
    d = tmp_path_factory.mktemp("particles")
    return write_particle_set(sim, d, project=d)


@pytest.fixture(scope="session")
def pick_set(tmp_path_factory):
    """3 simulated micrographs of 192 px with their references (see ``cryonb.pick``)."""
    from cryonb.pick import simulate_pick_set

    return simulate_pick_set(tmp_path_factory.mktemp("pick"), n_micrographs=3, size=192,
                             per_micrograph=4, n_views=3, seed=1)
