"""Picked and extracted particles go on to 2D classification, whose classes follow the views."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryonb.em import Class2DConfig
from cryonb.io import read_particles, read_star
from cryonb.parallel import run_class2d
from cryonb.pick import ExtractConfig
from cryonb.pick._score import match_picks
from cryonb.pick.extract import run_extract
from cryonb.testing import class_purity


def test_extracted_picks_classify_by_view(picked, pick_set, tmp_path):
    """Autopick -> extract (rescaled to 48 px, normalised, contrast inverted) -> class2d: each
    class holds one view (8 views, 400 particles at SNR 0.1 on the micrographs)."""
    config, _ = picked
    ext = run_extract(ExtractConfig(
        i=str(pick_set.micrographs_star), coord_list=str(Path(config.odir) / "autopick.star"),
        part_dir=f"{tmp_path}/Extract/", extract_size=80, scale=48, norm=True, bg_radius=18,
        invert_contrast=True).validate())
    pt = read_particles(ext.particles_star)
    assert pt.box == 48 and pt.has_ctf and ext.n_particles == len(pt) >= 380

    # the true view of each extracted particle: its pick matched to the truth
    table = pt.particles
    views = np.full(len(table), -1)
    radius = pick_set.particle_diameter / pick_set.pixel_size / 4
    for mic, rows in table.groupby("rlnMicrographName"):
        true = pick_set.truth[pick_set.truth.rlnMicrographName == mic]
        ip, it = match_picks(rows[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(),
                             true[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), radius)
        views[rows.index.to_numpy()[ip]] = true["view"].to_numpy()[it]
    matched = views >= 0
    assert matched.mean() >= 0.95

    res = run_class2d(Class2DConfig(
        i=str(ext.particles_star), o=str(tmp_path / "Class2D" / "run"), K=8, iter=15,
        tau2_fudge=2, particle_diameter=300, psi_step=10, offset_range=5, offset_step=2,
        ctf=True, random_seed=0, cpu=True, j=2))
    out = read_star(res.files["data"])["particles"]
    assert len(out) == len(table)
    purity = class_purity(out.rlnClassNumber.to_numpy()[matched], views[matched])
    assert purity >= 0.9, purity
