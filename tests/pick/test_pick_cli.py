"""``cryonb autopick`` and ``cryonb extract`` from the command line."""

from __future__ import annotations

import pytest

from cryonb.cli import main
from cryonb.io import read_particles
from cryonb.pick import read_coordinates


@pytest.fixture
def three_micrographs(first_micrographs, tmp_path):
    return first_micrographs(3, tmp_path.name)


def test_autopick_then_extract(pick_set, three_micrographs, tmp_path, capsys):
    odir = tmp_path / "AutoPick"
    rc = main(["autopick", "--i", str(three_micrographs), "--ref", str(pick_set.references),
               "--odir", f"{odir}/", "--pickname", "mine", "--particle_diameter", "270",
               "--psi_step", "10", "--lowpass", "20", "--ctf", "--invert", "--threshold", "0.1",
               "--shrink", "0", "--ranks", "2", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "particles picked on 3 micrographs" in out
    picks = read_coordinates(odir / "Micrographs" / "mic001_mine.star")
    assert 15 <= len(picks) <= 25
    assert (odir / "mine.star").is_file() and (odir / "summary.star").is_file()
    rc = main(["extract", "--i", str(three_micrographs), "--coords", str(odir / "mine.star"),
               "--o", f"{tmp_path}/Extract/", "--extract", "--extract_size", "64", "--norm",
               "--bg_radius", "28", "--invert_contrast"])
    assert rc == 0
    pt = read_particles(tmp_path / "Extract" / "particles.star")
    assert pt.box == 64 and pt.has_ctf
    assert len(pt) == sum(len(read_coordinates(odir / "Micrographs" / f"mic00{m}_mine.star"))
                          for m in (1, 2, 3))


def test_clear_errors(pick_set, tmp_path, capsys):
    assert main(["autopick", "--i", str(pick_set.micrographs_star)]) == 2
    assert "--ref" in capsys.readouterr().err
    assert main(["autopick", "--i", str(tmp_path / "none.star"), "--ref",
                 str(pick_set.references)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["extract", "--i", str(pick_set.micrographs_star), "--extract_size", "63"]) == 2
    assert "even" in capsys.readouterr().err
    assert main(["autopick", "--i", str(pick_set.micrographs_star), "--ref",
                 str(pick_set.references), "--ranks", "2", "--engines", "inprocess"]) == 2
    assert "--engines inprocess runs one rank" in capsys.readouterr().err
