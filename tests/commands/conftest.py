"""A tiny simulated particle set for the command-line tests, made with ``cryonb simulate``."""

from __future__ import annotations

import pytest

from cryonb.cli import main


@pytest.fixture(scope="session")
def sim_star(tmp_path_factory):
    """``particles.star`` of 150 particles, 32 px, 3 views."""
    d = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--o", str(d), "--n", "150", "--box", "32", "--views", "3",
                 "--random_seed", "5"]) == 0
    return d / "particles.star"
