"""Cross-checks with RELION 3.1.3: its figure-of-merit maps and picks, its extraction, and
RELION reading the files cryonb writes."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryonb.io import read_mrc, read_particles, read_star
from cryonb.pick import (
    match_picks,
    open_picker,
    read_coordinates,
    run_autopick,
    score_picks,
    write_coordinates,
)
from cryonb.pick.extract import ExtractConfig, run_extract
from cryonb.testing.tools import require_tool

pytestmark = pytest.mark.relion


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n"
                             f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def _relion_autopick(config, star: Path, odir: Path, *extra: str) -> None:
    """relion_autopick with the same options (run where the micrograph names resolve).

    relion_autopick draws its summary plots after writing the coordinate files; without
    ghostscript (or with 0 picks) that last step may fail, which does not matter here.
    """
    exe = require_tool("relion_autopick")
    cmd = [exe, "--i", star.name, "--ref", config.ref, "--odir", f"{odir}/", "--pickname",
           "autopick", "--particle_diameter", str(config.particle_diameter), "--ang",
           str(config.psi_step), "--lowpass", str(config.lowpass), "--ctf", "--invert",
           "--threshold", str(config.threshold), "--shrink", str(config.shrink), *extra]
    subprocess.run(cmd, cwd=star.parent, capture_output=True, text=True)
    n = len(read_star(star)["micrographs"])
    written = list(odir.glob("Micrographs/*_autopick.star"))
    assert len(written) == n, f"relion_autopick wrote {len(written)} of {n} coordinate files"


def test_relion_reads_coordinate_files(picked, tmp_path):
    """relion_star_printtable reads a coordinate file, the list, and a file without picks."""
    exe = require_tool("relion_star_printtable")
    _, result = picked
    first = result.micrographs[0]
    out = _run([exe, first.coordinates, "data_", "rlnCoordinateX", "rlnCoordinateY",
                "rlnAutopickFigureOfMerit"], tmp_path).stdout
    values = np.array([[float(v) for v in line.split()] for line in out.strip().splitlines()])
    df = read_coordinates(first.coordinates)
    np.testing.assert_allclose(values, df[["rlnCoordinateX", "rlnCoordinateY",
                                           "rlnAutopickFigureOfMerit"]].to_numpy(), rtol=1e-5)
    listing = _run([exe, str(result.coordinate_list), "data_coordinate_files",
                    "rlnMicrographName", "rlnMicrographCoordinates"], tmp_path).stdout
    rows = [line.split() for line in listing.strip().splitlines()]
    assert rows == [[m.micrograph, m.coordinates] for m in result.micrographs]
    empty = tmp_path / "empty_autopick.star"
    write_coordinates(empty, df.iloc[:0])
    assert _run([exe, str(empty), "data_", "rlnCoordinateX"], tmp_path).stdout.strip() == ""


def test_fom_maps_match_relion(pick_config, pick_set, first_micrographs, tmp_path):
    """relion_autopick --write_fom_maps: the same local mean/std maps, the same best angle,
    and the same figure of merit up to the scale set by RELION's random expected ratio."""
    handler = require_tool("relion_image_handler")
    config = pick_config(tmp_path / "ours", shrink=1.0, skip_optimise_scale=True)
    star = first_micrographs(1, tmp_path.name)
    odir = tmp_path / "relion"
    _relion_autopick(config, star, odir, "--skip_optimise_scale", "--write_fom_maps")
    root = odir / "Micrographs" / "mic001_autopick"

    def spi(suffix: str) -> np.ndarray:
        src = Path(f"{root}{suffix}.spi")
        _run([handler, "--i", str(src), "--o", str(src.with_suffix(".mrc"))], tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # RELION's maps have no pixel size
            return read_mrc(src.with_suffix(".mrc")).data.astype(np.float64)

    picker, mics = open_picker(config)
    maps = picker.maps(mics.image(0), mics.ctf(0), index=0)
    np.testing.assert_allclose(maps.mean, spi("_avgNoise"), atol=1e-4)
    np.testing.assert_allclose(maps.stddev, spi("_stddevNoise"), atol=1e-4)
    inner = np.s_[32:-32, 32:-32]  # RELION never looks at the border
    for k in range(maps.fom.shape[0]):
        fom = spi(f"_ref{k:06d}._bestCCF")
        psi = spi(f"_ref{k:06d}._bestPSI")
        assert np.corrcoef(fom[inner].ravel(), maps.fom[k][inner].ravel())[0, 1] > 0.9999
        assert np.mean(psi[inner] == maps.psi[k][inner]) > 0.999


def test_picks_overlap_relion(pick_config, pick_set, first_micrographs, tmp_path):
    """On 5 micrographs, cryonb and relion_autopick pick (nearly) the same particles."""
    star = first_micrographs(5, tmp_path.name)
    config = pick_config(tmp_path / "ours", i=str(star))
    ours = run_autopick(config).picks()
    odir = tmp_path / "relion"
    _relion_autopick(config, star, odir)
    theirs = pd.concat([read_coordinates(odir / "Micrographs" / f"mic{m:03d}_autopick.star")
                        .assign(rlnMicrographName=f"Micrographs/mic{m:03d}.mrc")
                        for m in range(1, 6)], ignore_index=True)
    xy = ["rlnCoordinateX", "rlnCoordinateY"]
    matched = 0
    for mic, p in ours.groupby("rlnMicrographName"):
        q = theirs[theirs.rlnMicrographName == mic]
        matched += len(match_picks(p[xy].to_numpy(), q[xy].to_numpy(), 2.0)[0])
    print(f"cryonb {len(ours)} picks, relion_autopick {len(theirs)}, {matched} in common")
    assert matched >= 0.8 * max(len(ours), len(theirs)), (matched, len(ours), len(theirs))
    truth = pick_set.truth[pick_set.truth.rlnMicrographName.isin(ours.rlnMicrographName)]
    radius = pick_set.particle_diameter / pick_set.pixel_size / 4
    s_ours, s_relion = score_picks(ours, truth, radius), score_picks(theirs, truth, radius)
    print(f"precision/recall: cryonb {s_ours['precision']:.3f}/{s_ours['recall']:.3f}, "
          f"relion_autopick {s_relion['precision']:.3f}/{s_relion['recall']:.3f}")
    assert s_ours["recall"] >= s_relion["recall"] - 0.05, (s_ours, s_relion)


def _relion_extract(star: Path, coord_dir: Path, suffix: str, out: Path, *opts: str) -> Path:
    exe = require_tool("relion_preprocess")
    _run([exe, "--i", star.name, "--coord_dir", f"{coord_dir}/", "--coord_suffix", suffix,
          "--part_dir", f"{out}/", "--part_star", f"{out}/particles.star", "--extract", *opts],
         star.parent)
    return out / "particles.star"


@pytest.mark.parametrize("opts", [
    ("--extract_size", "64", "--norm", "--bg_radius", "28", "--invert_contrast"),
    ("--extract_size", "64", "--scale", "32", "--norm", "--bg_radius", "14"),
    ("--extract_size", "48"),
])
def test_extraction_matches_relion(pick_set, first_micrographs, tmp_path, opts):
    """True coordinates, plus particles at the edges (edge pixels repeated): every particle
    correlates >= 0.99 with relion_preprocess's, and the STAR files agree."""
    star = first_micrographs(3, tmp_path.name)
    coords = tmp_path / "coords"
    for m in range(1, 4):
        t = read_coordinates(pick_set.micrographs_star.parent / "truth" /
                             f"mic{m:03d}_truth.star")[["rlnCoordinateX", "rlnCoordinateY"]]
        if m == 1:
            t = pd.concat([t, pd.DataFrame({"rlnCoordinateX": [5.0, 510.2, 300.7],
                                            "rlnCoordinateY": [300.0, 7.9, 511.0]})])
        write_coordinates(coords / "Micrographs" / f"mic{m:03d}_true.star", t)
    theirs = read_particles(_relion_extract(star, coords, "_true.star", tmp_path / "relion",
                                            *opts))
    def value(flag: str, default: int) -> int:
        return int(opts[opts.index(flag) + 1]) if flag in opts else default

    config = ExtractConfig(i=str(star), coord_dir=f"{coords}/", coord_suffix="_true.star",
                           part_dir=f"{tmp_path}/ours/", extract_size=value("--extract_size", 0),
                           scale=value("--scale", -1), norm="--norm" in opts,
                           bg_radius=value("--bg_radius", -1),
                           invert_contrast="--invert_contrast" in opts)
    ours = read_particles(run_extract(config).particles_star)
    assert len(ours) == len(theirs) == 60 + 3
    a, b = ours.images(), theirs.images()
    assert a.shape == b.shape == (63, config.output_size, config.output_size)
    corr = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    assert min(corr) >= 0.99
    np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())))
    assert ours.pixel_size == pytest.approx(theirs.pixel_size)
    for col in ("rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU", "rlnDefocusV",
                "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift"):
        np.testing.assert_allclose(ours.particles[col].to_numpy(float),
                                   theirs.particles[col].to_numpy(float), rtol=1e-6)
    assert (ours.particles.rlnMicrographName == theirs.particles.rlnMicrographName).all()


def test_relion_stops_on_a_box_outside_and_so_does_cryonb(pick_set, first_micrographs,
                                                          tmp_path):
    """A box entirely outside the micrograph stops RELION's job; cryonb raises InputError."""
    from cryonb.errors import InputError

    star = first_micrographs(1, tmp_path.name)
    coords = tmp_path / "coords"
    write_coordinates(coords / "Micrographs" / "mic001_bad.star",
                      pd.DataFrame({"rlnCoordinateX": [100.0, -40.0],
                                    "rlnCoordinateY": [100.0, 100.0]}))
    exe = require_tool("relion_preprocess")
    out = subprocess.run([exe, "--i", star.name, "--coord_dir", f"{coords}/", "--coord_suffix",
                          "_bad.star", "--part_dir", f"{tmp_path}/relion/", "--part_star",
                          f"{tmp_path}/relion/particles.star", "--extract", "--extract_size",
                          "48"], cwd=star.parent, capture_output=True, text=True)
    assert out.returncode != 0
    config = ExtractConfig(i=str(star), coord_dir=f"{coords}/", coord_suffix="_bad.star",
                           part_dir=f"{tmp_path}/ours/", extract_size=48)
    with pytest.raises(InputError, match="completely outside"):
        run_extract(config)
