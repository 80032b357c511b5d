"""The tutorial notebooks: each runs top to bottom without error, none is committed with
outputs, and the Binder environment has what they need.

Every notebook is executed with nbclient in a fresh kernel, in a temporary folder (the
notebooks write their data under ``cryonb_tutorial/`` of the working directory), with
``CRYONB_NOTEBOOK_SMALL=1`` (the notebooks' smallest defaults) and on the CPU
(``CRYONB_BACKEND=cpu``); the ``gpu`` variant runs them again with the GPU. A failing cell
fails the test with the cell's source and traceback.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell
FIRST_CELL = "import cryonb.viz; cryonb.viz.ensure_extension()"


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:4] == ["01_data_and_simulation", "02_class2d", "03_ranks_threads_gpus",
                         "04_parameter_sweeps"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    with_output = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not with_output, (f"{path.name}: code cells {with_output} have outputs; clear them "
                             "(jupyter nbconvert --clear-output --inplace) before committing")
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: saved widget state"
    assert "".join(code[0]["source"]).strip() == FIRST_CELL, (
        f"{path.name}: the first cell must load BokehJS inline: {FIRST_CELL}")


def _execute(path: Path, workdir: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYONB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("CRYONB_BACKEND", backend)
    _execute(path, tmp_path)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_binder_environment_is_complete():
    """repo2docker reads binder/: every dependency of the package is installed there (postBuild
    installs cryonb with --no-deps), no GPU or MPI package, and postBuild installs cryonb."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"]}
    lines = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    listed = {_name(r) for r in lines if r.strip() and not r.lstrip().startswith("#")}
    assert needed <= listed, f"missing in binder/requirements.txt: {sorted(needed - listed)}"
    assert not {n for n in listed if n.startswith("cupy") or n == "mpi4py"}, listed
    assert re.fullmatch(r"python-3\.1[1-9]", (ROOT / "binder" / "runtime.txt").read_text().strip())
    post = ROOT / "binder" / "postBuild"
    assert post.stat().st_mode & 0o111, "binder/postBuild must be executable"
    assert "pip install --no-deps -e ." in post.read_text()
    start = (ROOT / "binder" / "start").read_text()
    assert start.strip().endswith('exec "$@"')
