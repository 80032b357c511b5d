"""The same invariance grid on engines started under MPI (``engines="mpi"``).

Needs ``mpiexec`` and mpi4py: skipped on a laptop without them, a failure in CI.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from parallel_cases import CASES, IDS, run_case

from cryonb.parallel import start_cluster
from cryonb.testing.tools import missing

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("mpiexec") is None:
        missing("program 'mpiexec' (Open MPI)")
    if importlib.util.find_spec("mpi4py") is None:
        missing("Python module mpi4py")
    with start_cluster(3, "mpi") as handle:
        yield handle


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mpi_engines_match_the_serial_run(cluster, tiny_set, reference, tmp_path, case):
    run_case(cluster, tiny_set, reference, tmp_path, case, mpi=True)


def test_mpi_engines_of_a_larger_world_use_a_sub_communicator(cluster, tiny_set, reference,
                                                                 tmp_path):
    # 2 of the 3 MPI engines: the run's communicator spans world ranks 0 and 1 only
    result = run_case(cluster, tiny_set, reference, tmp_path, (2, 2, 30, "leader", "network"),
                      mpi=True)
    assert [r.mpi_rank for r in result.ranks] == [0, 1]
