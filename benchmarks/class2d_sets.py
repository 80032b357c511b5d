"""cryonb class2d on RELION-made sets of several kinds, against the purity their noise allows.

Issue 3's accuracy is checked on one kind of set (64 px, 8 views of the 70S ribosome, pixel
SNR 0.08); held-out sets differ. Each set here (:func:`cryonb.testing.make_class2d_set`) varies
one thing: RELION's own noise (``relion_project --add_noise``) at SNR 0.05, 12 views, larger
origins, more classes than views, 128 px, another map (a small particle), 200 kV with
``--ctf_intact_first_peak``. For each, ``cryonb class2d --cpu`` with RELION's GUI flags, then:

- purity, median in-plane and offset errors against the truth;
- the *oracle* purity (:func:`cryonb.testing.oracle_purity`): the run's E-step with the true
  views as class images, the best any classifier can do on that noise (K = views only);
- with ``--relion``, ``relion_refine --j 2`` with the same flags (slow: minutes per set).

    python benchmarks/class2d_sets.py [--sets a,b] [--iter 25] [--relion] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

#: name: (make_class2d_set options, K, extra Class2DConfig options, what it varies)
SETS = {
    "relion_noise": (dict(n_particles=2000, box=64, n_views=8, snr=0.05, seed=11,
                          noise="relion"), 8, {}, "relion_project --add_noise, SNR 0.05"),
    "views12": (dict(n_particles=3000, box=64, n_views=12, snr=0.06, seed=13), 12, {},
                "12 views, SNR 0.06"),
    "offsets5": (dict(n_particles=2000, box=64, n_views=8, snr=0.08, seed=14,
                      max_offset_px=5.0), 8, {}, "origins up to 5 px"),
    "k10_views8": (dict(n_particles=2000, box=64, n_views=8, snr=0.08, seed=15), 10, {},
                   "K=10 for 8 views"),
    "box128": (dict(n_particles=2000, box=128, n_views=8, snr=0.06, seed=16), 8, {},
               "128 px, SNR 0.06"),
    "hand": (dict(n_particles=2000, box=64, n_views=8, snr=0.08, seed=12,
                  map_path="ml-struct-bio+cryodrgn/tests/data/hand-vol.mrc"), 8, {},
             "cryoDRGN's hand map (a 28 px particle)"),
    "kv200_icfp": (dict(n_particles=2000, box=64, n_views=8, snr=0.08, seed=17, voltage=200.0,
                        amplitude_contrast=0.07), 8, {"ctf_intact_first_peak": True},
                   "200 kV, Q0 0.07, --ctf_intact_first_peak"),
    "box100": (dict(n_particles=2400, box=100, n_views=6, snr=0.06, seed=18, pixel_size=3.5,
                    max_offset_px=4.0), 6, {}, "100 px at 3.5 A/px, SNR 0.06"),
    "snr004": (dict(n_particles=3000, box=64, n_views=5, snr=0.04, seed=19,
                    defocus_range=(5000.0, 50000.0)), 5, {},
               "5 views, SNR 0.04, defocus 0.5-5 um"),
    "two_optics": (dict(n_particles=2400, box=64, n_views=8, snr=0.08, seed=23,
                        particles_per_micrograph=50,
                        optics_groups=[{}, {"voltage": 200.0, "cs": 1.4,
                                            "amplitude_contrast": 0.07}]), 8, {},
                   "two optics groups: 300 kV, Cs 2.7 / 200 kV, Cs 1.4, Q0 0.07"),
}


def _score(data_star, s) -> dict:
    from cryonb.io import read_star
    from cryonb.testing import score_class2d

    sc = score_class2d(read_star(data_star)["particles"], s.truth, pixel_size=s.pixel_size)
    return {k: sc[k] for k in ("purity", "inplane_median_deg", "offset_median_px")}


def run_set(name: str, out: Path, iterations: int, relion: bool, seed: int = 0,
            oracle: bool = True) -> dict:
    """Make one set, classify it with cryonb (and RELION), score both and the oracle."""
    from cryonb.em import Class2DConfig
    from cryonb.parallel import run_class2d
    from cryonb.testing import (
        make_class2d_set,
        oracle_purity,
        run_relion_class2d,
        score_relion_run,
    )
    from cryonb.testing.relion import shared_data_dir

    kw, K, extra, what = SETS[name]
    kw = dict(kw)
    if "map_path" in kw:  # relative to the shared data folder
        kw["map_path"] = shared_data_dir() / kw["map_path"]
    s = make_class2d_set(out / name / "set", **kw)
    flags = dict(tau2_fudge=2, particle_diameter=s.particle_diameter, psi_step=10,
                 offset_range=5, offset_step=2)
    cfg = Class2DConfig(i=str(s.particles_star), o=str(out / name / "cryonb" / "run"), K=K,
                        iter=iterations, random_seed=seed, cpu=True, j=2, **flags, **extra)
    t0 = time.perf_counter()
    res = run_class2d(cfg)
    row = {"set": name, "what": what, "n": s.n_particles, "box": s.box, "K": K,
           "snr": round(s.snr, 3), "cryonb_s": round(time.perf_counter() - t0, 1),
           "cryonb": _score(res.files["data"], s)}
    if oracle and K == s.n_views:
        row["oracle"] = oracle_purity(res.files["optimiser"], s,
                                      workdir=out / name / "templates")["purity"]
    if relion:
        rx = ["--ctf_intact_first_peak"] if extra.get("ctf_intact_first_peak") else []
        r = run_relion_class2d(s.particles_star, out / name / "relion", K=K,
                               iterations=iterations, threads=2, seed=0, progress=False,
                               extra=rx, **flags)
        sc = score_relion_run(r, s)
        row["relion"] = {k: sc[k] for k in ("purity", "inplane_median_deg",
                                            "offset_median_px")}
        row["relion_s"] = round(r.total_seconds, 1)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--relion", action="store_true", help="also run relion_refine (slow)")
    ap.add_argument("--out", default="bench_out/class2d_sets")
    ap.add_argument("--seed", type=int, default=0, help="cryonb's --random_seed")
    ap.add_argument("--no_oracle", action="store_true",
                    help="skip the classes made from the truth (their purity)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    rows = []
    for name in a.sets.split(","):
        row = run_set(name, out, a.iter, a.relion, a.seed, not a.no_oracle)
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = f"{platform.node()} ({os.cpu_count()} cores)"
    lines = [f"machine: {machine}, {time.strftime('%Y-%m-%d')}, {a.iter} iterations, "
             f"--random_seed {a.seed}, --ctf "
             "--zero_mask --tau2_fudge 2 --psi_step 10 --offset_range 5 --offset_step 2",
             "", "| set | particles x px, K, SNR | cryonb purity | oracle purity | "
             "RELION purity | in-plane median (deg) | offset median (px) | cryonb s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cryonb"]
        oracle = f"{r['oracle']:.3f}" if "oracle" in r else "-"
        rel = f"{r['relion']['purity']:.3f}" if "relion" in r else "-"
        lines.append(f"| {r['set']}: {r['what']} | {r['n']} x {r['box']}, K={r['K']}, "
                     f"{r['snr']} | {c['purity']:.3f} | {oracle} | {rel} | "
                     f"{c['inplane_median_deg']:.2f} | {c['offset_median_px']:.2f} | "
                     f"{r['cryonb_s']:.0f} |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "class2d_sets.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
