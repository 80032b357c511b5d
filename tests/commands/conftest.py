"""A tiny simulated particle set for the command-line tests, made with ``cryonb simulate``."""

from __future__ import annotations

import os

import pytest

from cryonb.cli import main


@pytest.fixture(scope="session")
def sim_star(tmp_path_factory):
    """``particles.star`` of 150 particles, 32 px, 3 views; the images named next to it
    (``particles.mrcs``: simulated with the set's folder as the project folder)."""
    d = tmp_path_factory.mktemp("sim")
    here = os.getcwd()
    os.chdir(d)
    try:
        assert main(["simulate", "--o", ".", "--n", "150", "--box", "32", "--views", "3",
                     "--random_seed", "5"]) == 0
    finally:
        os.chdir(here)
    return d / "particles.star"
