"""``cryonb class2d`` on particle files written by other programs, and on its own output.

Every particle STAR file in the shared data whose images are there must classify (one short
iteration) or fail with one clear message; the output's image names must resolve from the
output folder, for cryonb and for RELION's own programs.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from cryonb.cli import main
from cryonb.io import read_mrc, read_particles, read_star
from cryonb.testing.tools import require_tool

ASPIRE = "ComputationalCryoEM+ASPIRE-Python/tests/saved_test_data"
DRGN = "ml-struct-bio+cryodrgn/tests/data"
ONE = ["--K", "2", "--iter", "1", "--psi_step", "30", "--offset_range", "2", "--j", "1",
       "--quiet"]
CPU = [*ONE, "--cpu"]

#: (file, extra flags, what the run must show): files RELION and other programs wrote
RUNS = [
    # rlnNormCorrection in the file (pandas 3 hands its values out read-only)
    (f"{ASPIRE}/sample_particles_relion31.star", ["--particle_diameter", "200"], ""),
    (f"{ASPIRE}/sample_particles_relion30.star", ["--particle_diameter", "200"], ""),
    (f"{DRGN}/relion31.star", ["--particle_diameter", "300"], ""),
    (f"{DRGN}/empiar_10076_7.star", ["--particle_diameter", "350"], ""),
    (f"{DRGN}/sta_testing_bin8.star", ["--particle_diameter", "110"], ""),
    # no pixel size: --angpix gives it; no CTF parameters: classified without CTF correction
    (f"{ASPIRE}/rln_proj_64.star", ["--angpix", "1.5", "--particle_diameter", "80"],
     "no CTF parameters"),
    (f"{ASPIRE}/rln_proj_64_shifted.star", ["--particle_diameter", "50"], "no CTF parameters"),
]


@pytest.mark.parametrize("device", ["--cpu", pytest.param("--gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("local", "extra", "warning"), RUNS,
                         ids=[r[0].split("/")[-1] for r in RUNS])
def test_real_particle_files_classify(shared_data, tmp_path, monkeypatch, capsys, local, extra,
                                      warning, device):
    star = shared_data / local
    monkeypatch.chdir(tmp_path)
    assert main(["class2d", "--i", str(star), "--o", "Class2D/run", *ONE, device, *extra]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and (warning in err)
    assert "UserWarning" not in err and "data_optics has no" not in err  # one plain line each
    out = read_particles(tmp_path / "Class2D" / "run_it001_data.star")
    src = read_particles(star)
    assert out.n == src.n and np.isfinite(out.particles["rlnNormCorrection"]).all()
    np.testing.assert_array_equal(out.images(), src.images())  # the names still resolve
    opt = read_star(tmp_path / "Class2D" / "run_it001_optimiser.star")["optimiser_general"]
    assert int(opt["rlnDoCorrectCtf"].iloc[0]) == (0 if warning else 1)


def test_incomplete_ctf_is_an_error(shared_data, tmp_path, capsys):
    star = shared_data / ASPIRE / "sample_incomplete_ctf_params.star"
    assert main(["class2d", "--i", str(star), "--o", str(tmp_path / "run"), *CPU]) == 2
    err = capsys.readouterr().err
    assert "no rlnVoltage column" in err and "--no_ctf" in err and "Traceback" not in err


def test_no_pixel_size_names_angpix(shared_data, tmp_path, capsys):
    star = shared_data / ASPIRE / "rln_proj_64.star"
    assert main(["class2d", "--i", str(star), "--o", str(tmp_path / "run"), *CPU]) == 2
    err = capsys.readouterr().err
    assert "no pixel size" in err and "--angpix" in err and "Traceback" not in err


def test_angpix_does_not_override_the_file(sim_star, tmp_path, capsys):
    assert main(["class2d", "--i", str(sim_star), "--o", str(tmp_path / "run"), *CPU,
                 "--angpix", "9"]) == 0
    assert "warning: --angpix 9 is ignored: the STAR file gives" in capsys.readouterr().err
    opt = read_particles(tmp_path / "run_it001_data.star").optics
    assert float(opt["rlnImagePixelSize"].iloc[0]) != 9


def test_output_names_resolve_from_the_project(sim_star, tmp_path, monkeypatch, capsys):
    """Images named next to the input STAR file (``particles.mrcs``) are written relative to
    the project folder (``data/particles.mrcs``): cryonb continues from the output, and
    RELION's programs run in the project folder read it."""
    project = tmp_path / "project"
    shutil.copytree(sim_star.parent, project / "data")
    monkeypatch.chdir(project)
    assert main(["class2d", "--i", "data/particles.star", "--o", "Class2D/run", *CPU]) == 0
    data = project / "Class2D" / "run_it001_data.star"
    names = read_particles(data).particles["rlnImageName"]
    assert names.str.endswith("@data/particles.mrcs").all(), names.iloc[0]
    # a second job on the first one's output, in another folder
    assert main(["class2d", "--i", str(data), "--o", "Class2D2/run", *CPU]) == 0
    again = read_particles(project / "Class2D2" / "run_it001_data.star").particles
    assert (again["rlnImageName"] == names).all()  # project-relative names are kept
    capsys.readouterr()


def test_relion_reads_the_output_images(sim_star, tmp_path, monkeypatch, capsys):
    tool = require_tool("relion_stack_create")
    project = tmp_path / "project"
    shutil.copytree(sim_star.parent, project / "data")
    monkeypatch.chdir(project)
    assert main(["class2d", "--i", "data/particles.star", "--o", "Class2D/run", *CPU]) == 0
    subprocess.run([tool, "--i", "Class2D/run_it001_data.star", "--o", "stacked"], check=True,
                   capture_output=True, cwd=project, timeout=120)
    stacked = read_mrc(project / "stacked.mrcs").data
    np.testing.assert_allclose(stacked, read_particles(sim_star).images(), atol=1e-5)


def test_continue_without_o_keeps_the_rootname(sim_star, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["class2d", "--i", str(sim_star), "--o", str(out), *CPU]) == 0
    assert main(["class2d", "--continue", f"{out}_it001_optimiser.star", "--iter", "2",
                 "--quiet"]) == 0
    assert f"class averages: {out}_it002_classes.mrcs" in capsys.readouterr().out


def test_vdam_flags_are_named(capsys):
    with pytest.raises(SystemExit) as e:
        main(["class2d", "--i", "p.star", "--o", "o/run", "--grad", "--grad_write_iter", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "VDAM" in err and "--grad_write_iter: " in err
    assert err.startswith("usage: cryonb class2d")


def test_no_command_is_an_error(capsys):
    assert main([]) == 2
    assert "name a command" in capsys.readouterr().err
