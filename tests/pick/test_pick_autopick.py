"""Autopicking on simulated micrographs: accuracy, conventions, ranks/threads, GPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryonb.backend import gpu_available
from cryonb.pick import (
    match_picks,
    open_picker,
    read_coordinates,
    run_autopick,
    score_picks,
)


def _picks(result) -> pd.DataFrame:
    return result.picks()


def _radius(pick_set) -> float:
    """A quarter particle diameter, in pixels."""
    return pick_set.particle_diameter / pick_set.pixel_size / 4


def test_precision_and_recall(picked, pick_set):
    """>= 20 micrographs, 400 particles, SNR 0.1: precision and recall >= 0.9."""
    _, result = picked
    s = score_picks(_picks(result), pick_set.truth, _radius(pick_set))
    assert len(result.micrographs) == 20 and s["n_true"] == 400
    assert s["precision"] >= 0.9, s
    assert s["recall"] >= 0.9, s
    assert s["mean_error"] < 2.0, s  # pixels (the FOM maps are at half size here)


def test_psi_and_reference_of_picks(picked, pick_set):
    """rlnAnglePsi is the particle's in-plane angle and rlnClassNumber its view (1-based)."""
    _, result = picked
    picks = _picks(result)
    xy = ["rlnCoordinateX", "rlnCoordinateY"]
    dpsi, same_view = [], []
    for mic, t in pick_set.truth.groupby("rlnMicrographName"):
        p = picks[picks.rlnMicrographName == mic]
        pi, ti = match_picks(p[xy].to_numpy(), t[xy].to_numpy(), _radius(pick_set))
        d = (p.rlnAnglePsi.to_numpy()[pi] - t.rlnAnglePsi.to_numpy()[ti] + 180) % 360 - 180
        dpsi.append(np.abs(d))
        same_view.append(p.rlnClassNumber.to_numpy()[pi] == t.view.to_numpy()[ti] + 1)
    dpsi, same_view = np.concatenate(dpsi), np.concatenate(same_view)
    assert np.mean(dpsi <= 10.0) >= 0.9, np.quantile(dpsi, [0.5, 0.9])
    assert same_view.mean() >= 0.9


def test_coordinate_files(picked):
    """One file per micrograph with RELION's columns, and the two lists."""
    config, result = picked
    from cryonb.io import read_star

    first = result.micrographs[0]
    assert first.coordinates.endswith("Micrographs/mic001_autopick.star")
    df = read_coordinates(first.coordinates)
    assert list(df.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber",
                                "rlnAutopickFigureOfMerit", "rlnAnglePsi"]
    assert len(df) == first.n_picks and (df.rlnAutopickFigureOfMerit >= config.threshold).all()
    listing = read_star(result.coordinate_list)["coordinate_files"]
    assert list(listing.columns) == ["rlnMicrographName", "rlnMicrographCoordinates"]
    assert listing.rlnMicrographName.tolist() == [m.micrograph for m in result.micrographs]
    summary = read_star(result.summary)[""]
    assert summary.rlnGroupNrParticles.sum() == result.n_picks


@pytest.mark.parametrize("ranks,j,ranks_as", [(3, 2, "threads"), (2, 1, "processes")])
def test_same_picks_whatever_ranks_and_threads(picked, first_micrographs, pick_config, tmp_path,
                                               ranks, j, ranks_as):
    """Micrograph i is seeded with random_seed + i: the split of the first 7 micrographs over
    ranks (3, 2, 2 or 4, 3) and threads changes nothing."""
    _, result = picked
    other = run_autopick(pick_config(tmp_path, ranks=ranks, j=j,
                                     i=str(first_micrographs(7, tmp_path.name))),
                         ranks_as=ranks_as)
    sizes = [sum(m.rank == r for m in other.micrographs) for r in range(ranks)]
    assert sizes == ([3, 2, 2] if ranks == 3 else [4, 3])
    first7 = _picks(result)
    first7 = first7[first7.rlnMicrographName.isin([m.micrograph for m in other.micrographs])]
    pd.testing.assert_frame_equal(_picks(other), first7.reset_index(drop=True))


def test_repick_from_maps_equals_pick(picked, pick_set):
    """TemplatePicker.peaks(maps) gives pick()'s result; a higher threshold keeps a subset."""
    config, result = picked
    picker, mics = open_picker(config)
    maps = picker.maps(mics.image(2), mics.ctf(2), index=2)
    assert maps.fom.shape == (8, picker.geometry.work_size, picker.geometry.work_size)
    again = picker.peaks(maps)
    expected = read_coordinates(result.micrographs[2].coordinates)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), expected, check_dtype=False)
    fewer = picker.peaks(maps, threshold=0.6)
    assert len(fewer) < len(again) and (fewer.rlnAutopickFigureOfMerit >= 0.6).all()


def test_full_size_maps_pick_as_well(pick_config, pick_set, first_micrographs, tmp_path):
    """RELION's default --shrink 1 (maps of 510 pixels: 512 has the prime factor 257)."""
    config = pick_config(tmp_path, shrink=1.0, i=str(first_micrographs(4, tmp_path.name)))
    result = run_autopick(config)
    picker, _ = open_picker(config)
    assert picker.geometry.work_size == 510
    truth = pick_set.truth[pick_set.truth.rlnMicrographName.isin(
        [m.micrograph for m in result.micrographs])]
    s = score_picks(_picks(result), truth, _radius(pick_set))
    assert s["precision"] >= 0.9 and s["recall"] >= 0.9, s
    assert s["mean_error"] < 1.5, s


def test_non_square_micrograph_and_angpix_ref(pick_config, pick_set, tmp_path):
    """A micrograph cut to 512 x 400 picks the particles inside it; references at another
    pixel size are rescaled (--angpix_ref)."""
    from cryonb.io import read_mrc, read_star, write_mrc, write_star
    from cryonb.pick import resize_images_fourier

    mics = read_star(pick_set.micrographs_star)
    row = mics["micrographs"].iloc[:1].copy()
    image = read_mrc(pick_set.micrographs_star.parent / row.rlnMicrographName.iloc[0]).data
    (tmp_path / "Micrographs").mkdir()
    apix = pick_set.pixel_size
    write_mrc(tmp_path / "Micrographs/cut.mrc", image[50:450], apix)
    row["rlnMicrographName"] = "Micrographs/cut.mrc"
    write_star(tmp_path / "cut.star", {"optics": mics["optics"], "micrographs": row})
    refs = read_mrc(pick_set.references).data
    write_mrc(tmp_path / "refs80.mrcs", resize_images_fourier(refs, 80), apix * 64 / 80)
    config = pick_config(tmp_path / "out", i=str(tmp_path / "cut.star"),
                         ref=str(tmp_path / "refs80.mrcs"), angpix_ref=apix * 64 / 80)
    picks = _picks(run_autopick(config))
    t = pick_set.truth[pick_set.truth.rlnMicrographName == "Micrographs/mic001.mrc"]
    t = t[(t.rlnCoordinateY >= 50 + 32) & (t.rlnCoordinateY < 450 - 32)].assign(
        rlnCoordinateY=lambda d: d.rlnCoordinateY - 50,
        rlnMicrographName="Micrographs/cut.mrc")
    s = score_picks(picks, t, _radius(pick_set))
    assert s["recall"] >= 0.9 and s["precision"] >= 0.8, s


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable GPU (CuPy)")
def test_cpu_and_gpu_give_the_same_picks(picked, pick_config, tmp_path):
    """The GPU path (CuPy, CUDA kernels) picks what the CPU path picks (float32 FFTs on both:
    a pick may move by a pixel or change its FOM in the 5th digit, nothing more)."""
    _, result = picked
    gpu = run_autopick(pick_config(tmp_path, ranks=2, j=2, gpu=""), devices=[0, 0])
    a, b = _picks(result), _picks(gpu)
    assert abs(len(a) - len(b)) <= max(1, len(a) // 100)
    xy = ["rlnCoordinateX", "rlnCoordinateY"]
    matched = 0
    for mic, p in a.groupby("rlnMicrographName"):
        q = b[b.rlnMicrographName == mic]
        pi, qi = match_picks(p[xy].to_numpy(), q[xy].to_numpy(), 1.5)
        matched += len(pi)
        np.testing.assert_allclose(p.rlnAutopickFigureOfMerit.to_numpy()[pi],
                                   q.rlnAutopickFigureOfMerit.to_numpy()[qi], atol=1e-3)
    assert matched >= 0.99 * len(a)
    same = a.merge(b, on=["rlnMicrographName", *xy], how="inner")
    assert len(same) >= 0.98 * len(a)


def test_pick_distance_and_threshold_options(picked, pick_set):
    """--min_distance removes both members of close pairs (RELION); --max_stddev_noise
    below the background std removes everything."""
    config, _ = picked
    picker, mics = open_picker(config)
    maps = picker.maps(mics.image(0), mics.ctf(0), index=0)
    base = picker.peaks(maps)
    xy = base[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    apix = pick_set.pixel_size
    assert d.min() > 32  # default --min_distance: half the 64-pixel box
    far = picker.peaks(maps, min_distance=(d.min() + 2) * apix)
    assert len(far) <= len(base) - 2
    assert picker.peaks(maps, max_stddev_noise=0.5).empty
    assert len(picker.peaks(maps, skip_side=200)) < len(base)
    assert np.sqrt(picker.templates.radius2) == pick_set.particle_diameter / apix / 2 - 2
