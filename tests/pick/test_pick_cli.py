"""``cryonb autopick`` and ``cryonb extract`` from the command line."""

from __future__ import annotations

import numpy as np
import pandas as pd
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
               "--shrink", "0", "--ranks", "2", "--quiet",
               "--pipeline_control", f"{odir}/"])  # as RELION's GUI runs relion_autopick
    out = capsys.readouterr().out
    assert rc == 0 and "particles picked on 3 micrographs" in out
    assert (odir / "RELION_JOB_EXIT_SUCCESS").is_file()
    picks = read_coordinates(odir / "Micrographs" / "mic001_mine.star")
    assert 15 <= len(picks) <= 25
    assert (odir / "mine.star").is_file() and (odir / "summary.star").is_file()
    rc = main(["extract", "--i", str(three_micrographs), "--coords", str(odir / "mine.star"),
               "--o", f"{tmp_path}/Extract/", "--extract", "--extract_size", "64", "--norm",
               "--bg_radius", "28", "--invert_contrast",
               "--pipeline_control", f"{tmp_path}/Extract/"])
    assert rc == 0 and (tmp_path / "Extract" / "RELION_JOB_EXIT_SUCCESS").is_file()
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


def _pick_argv(mics, refs, odir, *extra):
    return ["autopick", "--i", str(mics), "--ref", str(refs), "--odir", f"{odir}/",
            "--particle_diameter", "270", "--ang", "10", "--lowpass", "20", "--ctf", "--invert",
            "--threshold", "0.1", "--shrink", "0", "--quiet", *extra]


def test_an_unusable_micrograph_is_skipped_with_a_warning(pick_set, first_micrographs,
                                                          tmp_path, capsys):
    """A constant (or NaN) micrograph gets an empty coordinate file and a warning naming it;
    the others are picked and the lists written (relion_autopick goes on too). Run again
    with --only_do_unfinished, the summary keeps the counts of the files already there."""
    from cryonb.io import read_star, write_mrc, write_star

    star = first_micrographs(2, tmp_path.name)
    blocks = read_star(star)
    mics = blocks["micrographs"]
    flat = tmp_path / "flat.mrc"
    write_mrc(flat, np.full((512, 512), 3.0, np.float32), 5.0)
    nan = tmp_path / "nan.mrc"
    write_mrc(nan, np.full((512, 512), np.nan, np.float32), 5.0)
    extra = mics.iloc[[0, 0]].copy()
    extra["rlnMicrographName"] = [str(flat), str(nan)]
    blocks["micrographs"] = pd.concat([mics, extra], ignore_index=True)
    write_star(star, blocks)
    odir = tmp_path / "AutoPick"
    assert main(_pick_argv(star, pick_set.references, odir)) == 0
    cap = capsys.readouterr()
    assert f"warning: {flat}: the micrograph is constant" in cap.err
    assert f"warning: {nan}: the micrograph holds NaN" in cap.err
    summary = read_star(odir / "summary.star")[""]
    counts = summary["rlnGroupNrParticles"].tolist()
    assert counts[2:] == [0, 0] and min(counts[:2]) >= 15
    assert main(_pick_argv(star, pick_set.references, odir, "--only_do_unfinished")) == 0
    assert f"{sum(counts)} particles picked on 4 micrographs" in capsys.readouterr().out
    again = read_star(odir / "summary.star")[""]
    assert again["rlnGroupNrParticles"].tolist() == counts
    np.testing.assert_allclose(again["rlnAutopickFigureOfMerit"],
                               summary["rlnAutopickFigureOfMerit"], rtol=1e-6)


def test_output_and_reference_errors_come_first(pick_set, first_micrographs, tmp_path, capsys):
    star = first_micrographs(1, tmp_path.name)
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main(_pick_argv(star, pick_set.references, blocker / "AutoPick")) == 2
    err = capsys.readouterr().err
    assert "--odir" in err and "cannot write in the folder" in err and "Traceback" not in err
    # a particle STAR file given as the references
    from cryonb.io import write_mrc, write_star

    write_mrc(tmp_path / "p.mrcs", np.zeros((2, 64, 64), np.float32), 5.0, stack=True)
    write_star(tmp_path / "particles.star", {"particles": pd.DataFrame({
        "rlnImageName": ["1@p.mrcs", "2@p.mrcs"], "rlnMicrographName": ["m.mrc"] * 2,
        "rlnCoordinateX": [1.0, 2.0], "rlnCoordinateY": [1.0, 2.0]})})
    assert main(_pick_argv(star, tmp_path / "particles.star", tmp_path / "A")) == 2
    assert "a particle STAR file, not references" in capsys.readouterr().err
    assert main(_pick_argv(star, pick_set.references, tmp_path / "B", "--psi_step", "5")) == 2
    assert "--ang 10 and --psi_step 5 are the same option" in capsys.readouterr().err
    assert main(_pick_argv(star, pick_set.references, tmp_path / "C", "--threshold",
                           "nan")) == 2
    assert "--threshold nan: give a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_pick_argv(star, pick_set.references, tmp_path / "D", "--LoG"))
    assert "--LoG: Laplacian-of-Gaussian picking is not implemented" in capsys.readouterr().err


def test_nothing_picked_says_what_to_try(pick_set, first_micrographs, tmp_path, capsys):
    star = first_micrographs(1, tmp_path.name)
    argv = [a for a in _pick_argv(star, pick_set.references, tmp_path / "A")
            if a not in ("--ctf", "--invert")]
    argv[argv.index("--threshold") + 1] = "50"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "nothing was picked; try --invert" in err and "--ctf" in err
    assert "a lower --threshold (this run: 50)" in err
    assert main(["extract", "--i", str(star), "--coord_dir", f"{tmp_path}/A/", "--o",
                 f"{tmp_path}/E/", "--extract_size", "64"]) == 2
    assert "hold no picks" in capsys.readouterr().err
    assert main(["extract", "--i", str(star), "--coord_dir", f"{tmp_path}/none/", "--o",
                 f"{tmp_path}/E/", "--extract_size", "64"]) == 2
    assert "no coordinate file was found (the first micrograph's would be" in \
        capsys.readouterr().err


def test_absolute_micrograph_names_keep_outputs_in_their_folders(pick_set, first_micrographs,
                                                                 tmp_path, capsys):
    """Micrographs named by absolute paths (STAR files of other programs): the coordinate
    files and particle stacks go under --odir and --o, as RELION's string join puts them,
    never next to the micrographs."""
    from cryonb.io import read_star, write_star

    star = first_micrographs(1, tmp_path.name)
    blocks = read_star(star)
    mics = blocks["micrographs"]
    absolute = (star.parent / mics["rlnMicrographName"].iloc[0]).resolve()
    mics["rlnMicrographName"] = [str(absolute)]
    write_star(star, blocks)
    before = set(absolute.parent.iterdir())
    odir = tmp_path / "AutoPick"
    assert main(_pick_argv(star, pick_set.references, odir)) == 0
    coords = odir / str(absolute.with_suffix("")).lstrip("/")
    coords = coords.with_name(coords.name + "_autopick.star")
    assert len(read_coordinates(coords)) >= 15
    assert main(["extract", "--i", str(star), "--coord_dir", f"{odir}/", "--o",
                 f"{tmp_path}/Extract/", "--extract_size", "64"]) == 0
    stack = tmp_path / "Extract" / (str(absolute.with_suffix("")).lstrip("/") + ".mrcs")
    assert stack.is_file()
    assert set(absolute.parent.iterdir()) == before  # nothing written beside the micrograph
    capsys.readouterr()
