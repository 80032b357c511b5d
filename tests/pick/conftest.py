"""Shared data for the picking tests: one simulated set of 20 micrographs, picked once.

The set: 20 micrographs of 512 x 512 pixels at 5 A/px, 20 particles each (400), projected from
the real 70S ribosome map (../shared/data) in 8 directions with random in-plane angles, RELION's
CTF (defocus 1-3 um), white noise at a mean pixel SNR of 0.1, dark particles; 8 references in
noise-sigma units (:func:`cryonb.pick.simulate_pick_set`).
"""

from __future__ import annotations

import warnings

import pytest

from cryonb.pick import AutopickConfig, run_autopick, simulate_pick_set

RIBOSOME = "ComputationalCryoEM+ASPIRE-Python/gallery/tutorials/data/clean70SRibosome_vol_65p.mrc"
PIXEL_SIZE = 5.0  # A; the map's header says 0 (see cryonb.testing.relion.RIBOSOME_70S_PIXEL_SIZE)
DIAMETER = 270.0  # A; the ribosome spans ~270 A
MATCH_RADIUS = DIAMETER / PIXEL_SIZE / 4  # a quarter particle diameter, in pixels


@pytest.fixture(scope="session")
def pick_set(tmp_path_factory, shared_data):
    """The simulated set (files in a session folder)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the map's header has no voxel size
        return simulate_pick_set(tmp_path_factory.mktemp("pickset"), shared_data / RIBOSOME,
                                 map_pixel_size=PIXEL_SIZE, n_micrographs=20, size=512,
                                 per_micrograph=20, snr=0.1, particle_diameter=DIAMETER,
                                 n_views=8, seed=0)


def _config(pick_set, odir, **changes) -> AutopickConfig:
    values = dict(i=str(pick_set.micrographs_star), ref=str(pick_set.references),
                  odir=f"{odir}/", particle_diameter=DIAMETER, lowpass=20.0, ctf=True,
                  invert=True, threshold=0.1, shrink=0.0)
    values.update(changes)
    return AutopickConfig(**values).validate()


@pytest.fixture(scope="session")
def pick_config(pick_set):
    """``pick_config(odir, **changes)``: the tests' picking options (RELION's flags; maps at
    the low-pass size, ``--shrink 0``)."""
    return lambda odir, **changes: _config(pick_set, odir, **changes)


@pytest.fixture(scope="session")
def first_micrographs(pick_set):
    """``first_micrographs(n, tag)``: a micrographs STAR file of the set's first ``n``
    micrographs, beside the set's (so that the micrograph names resolve for RELION too)."""
    from cryonb.io import read_star, write_star

    def make(n: int, tag: str):
        blocks = read_star(pick_set.micrographs_star)
        blocks["micrographs"] = blocks["micrographs"].iloc[:n]
        path = pick_set.micrographs_star.parent / f"first{n}_{tag}.star"
        write_star(path, blocks)
        return path

    return make


@pytest.fixture(scope="session")
def picked(pick_set, tmp_path_factory):
    """The set picked once on the CPU with one rank and one thread: (config, result)."""
    config = _config(pick_set, tmp_path_factory.mktemp("picked"))
    return config, run_autopick(config)
