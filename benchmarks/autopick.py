"""Autopicking speed: cryonb (CPU, and GPU when present) against ``relion_autopick`` (CPU).

All programs pick the same simulated micrographs with the same references and options
(:func:`cryonb.pick.simulate_pick_set`: particles projected from the 70S ribosome map of
``../shared/data`` in ``--refs`` directions, RELION's CTF, pixel SNR 0.1; references in noise
units), and the table gives micrographs per second side by side, with each run's precision and
recall against the truth and its overlap with RELION's picks.

"wall" rates include everything a user waits for (start-up, reading the references, the
first micrograph's FFT plans and kernel compilation); "steady" rates divide the micrographs by
the time spent picking them (per rank), i.e. what a long run approaches.

Usage (the first run simulates the data into --data and reuses it afterwards)::

    python benchmarks/autopick.py --data /tmp/apbench                  # CPU + RELION here
    python benchmarks/autopick.py --data /tmp/apbench --json gpu.json  # on the GPU machine
    python benchmarks/autopick.py --data /tmp/apbench --merge gpu.json # one table of both

Timings are only comparable on the same machine: every row says where it ran. The GPU machine
has no ``../shared``: carry the map (e.g. in a git-ignored ``.gpudata/`` holding the same
relative path) and set ``CRYONB_SHARED_DATA`` to it; without the map the phantom is used.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

RIBOSOME = ("ComputationalCryoEM+ASPIRE-Python/gallery/tutorials/data/"
            "clean70SRibosome_vol_65p.mrc")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/cryonb_autopick_bench", help="data folder")
    p.add_argument("--n", type=int, default=16, help="micrographs")
    p.add_argument("--size", type=int, default=1024, help="micrograph side (pixels)")
    p.add_argument("--per_micrograph", type=int, default=60, help="particles per micrograph")
    p.add_argument("--refs", type=int, default=8, help="references (views)")
    p.add_argument("--lowpass", type=float, default=20.0)
    p.add_argument("--ang", type=float, default=10.0)
    p.add_argument("--shrink", type=float, default=1.0)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--cpu_rows", nargs="*", default=["1x1", f"{os.cpu_count() or 1}x1"],
                   help="cryonb CPU runs as RANKSxTHREADS (ranks are processes); default "
                        "1x1 and one rank per core")
    p.add_argument("--gpu_rows", nargs="*", default=None,
                   help="cryonb GPU runs as RANKSxTHREADS, rank r on GPU r %% n_gpus "
                        "(default: 1x1, 1x4, and NGPUx4 with several GPUs)")
    p.add_argument("--no_relion", action="store_true", help="skip relion_autopick")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--merge", nargs="*", default=[], help="rows from other runs to show too")
    return p.parse_args(argv)


def _where() -> str:
    return f"{platform.node()} ({os.cpu_count()} cores)"


def _gpu_name() -> str | None:
    from cryonb.backend import gpu_available

    if not gpu_available():
        return None
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{cupy.cuda.runtime.getDeviceCount()} x {name}"


def make_data(args) -> tuple:
    """Simulate the set once (reused when the folder has it)."""
    from cryonb.pick import simulate_pick_set

    data = Path(args.data)
    meta = data / "bench.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return data / "micrographs.star", data / "references.mrcs", pd.read_csv(
            data / "truth.csv"), info
    map_path = Path(__file__).resolve().parents[2] / "shared" / "data" / RIBOSOME
    env = os.environ.get("CRYONB_SHARED_DATA")
    if env:
        map_path = Path(env) / RIBOSOME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ps = simulate_pick_set(data, map_path if map_path.is_file() else None,
                               map_pixel_size=5.0 if map_path.is_file() else None,
                               n_micrographs=args.n, size=args.size,
                               per_micrograph=args.per_micrograph, snr=0.1,
                               particle_diameter=270.0 if map_path.is_file() else None,
                               n_views=args.refs, seed=0)
    ps.truth.to_csv(data / "truth.csv", index=False)
    info = {"pixel_size": ps.pixel_size, "particle_diameter": ps.particle_diameter,
            "n": args.n, "size": args.size, "refs": args.refs,
            "map": map_path.name if map_path.is_file() else "phantom"}
    meta.write_text(json.dumps(info))
    return ps.micrographs_star, ps.references, ps.truth, info


def _options(args, info) -> dict:
    return {"particle_diameter": info["particle_diameter"], "lowpass": args.lowpass,
            "psi_step": args.ang, "shrink": args.shrink, "threshold": args.threshold,
            "ctf": True, "invert": True}


def _score(picks: pd.DataFrame, truth: pd.DataFrame, info, relion=None) -> dict:
    from cryonb.pick import match_picks, score_picks

    s = score_picks(picks, truth, info["particle_diameter"] / info["pixel_size"] / 4)
    out = {"picks": len(picks), "precision": s["precision"], "recall": s["recall"]}
    if relion is not None and len(relion):
        xy = ["rlnCoordinateX", "rlnCoordinateY"]
        common = sum(len(match_picks(p[xy].to_numpy(), relion[relion.rlnMicrographName == m][
            xy].to_numpy(), 2.0)[0]) for m, p in picks.groupby("rlnMicrographName"))
        out["overlap_relion"] = common / max(len(picks), len(relion))
    return out


def run_relion(star: Path, refs: Path, args, info, odir: Path) -> tuple[dict, pd.DataFrame]:
    """relion_autopick (one process), timed; its picks."""
    from cryonb.io import read_star
    from cryonb.pick import coordinate_path, read_coordinates

    exe = shutil.which("relion_autopick")
    if exe is None:
        raise FileNotFoundError("relion_autopick is not installed here")
    o = _options(args, info)
    shutil.rmtree(odir, ignore_errors=True)
    cmd = [exe, "--i", star.name, "--ref", str(refs.resolve()), "--odir", f"{odir}/",
           "--pickname", "autopick", "--particle_diameter", str(o["particle_diameter"]),
           "--ang", str(o["psi_step"]), "--lowpass", str(o["lowpass"]), "--ctf", "--invert",
           "--threshold", str(o["threshold"]), "--shrink", str(o["shrink"])]
    t0 = time.perf_counter()
    # RELION draws plots after writing the coordinates; without ghostscript that may fail
    subprocess.run(cmd, cwd=star.parent, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    names = read_star(star)["micrographs"]["rlnMicrographName"].astype(str)
    parts = []
    for name in names:
        f = coordinate_path(odir, name)
        if not f.is_file():
            raise RuntimeError(f"relion_autopick wrote no {f}: {' '.join(cmd)}")
        parts.append(read_coordinates(f).assign(rlnMicrographName=name))
    picks = pd.concat(parts, ignore_index=True)
    row = {"program": "relion_autopick 3.1 (CPU)", "device": "cpu", "ranks_x_threads": "1x1",
           "micrographs": len(names), "wall_s": wall, "steady_s": None}
    return row, picks


def run_cryonb(star: Path, refs: Path, args, info, odir: Path, *, ranks: int, threads: int,
               devices: list | None, label: str) -> tuple[dict, pd.DataFrame]:
    """cryonb's in-process driver (ranks as processes when > 1), timed; its picks."""
    from cryonb.pick import AutopickConfig, run_autopick

    shutil.rmtree(odir, ignore_errors=True)
    config = AutopickConfig(i=str(star), ref=str(refs), odir=f"{odir}/", ranks=ranks, j=threads,
                            gpu="" if devices and devices[0] is not None else None,
                            **_options(args, info))
    t0 = time.perf_counter()
    result = run_autopick(config, devices, ranks_as="threads" if ranks == 1 else "processes")
    wall = time.perf_counter() - t0
    busy: dict[int, float] = {}
    for m in result.micrographs:
        busy[m.rank] = busy.get(m.rank, 0.0) + m.seconds
    steady = max(busy.values()) / threads
    row = {"program": "cryonb", "device": label, "ranks_x_threads": f"{ranks}x{threads}",
           "micrographs": len(result.micrographs), "wall_s": wall, "steady_s": steady}
    return row, result.picks()


def table(rows: list[dict]) -> str:
    """The side-by-side table (Markdown)."""
    head = ["program", "device", "ranks x threads", "where", "mics", "wall s", "mic/s (wall)",
            "mic/s (steady)", "picks", "precision", "recall", "overlap w/ RELION"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    for r in rows:
        steady = r["micrographs"] / r["steady_s"] if r.get("steady_s") else None
        lines.append("| " + " | ".join([
            r["program"], r["device"], r["ranks_x_threads"].replace("x", " x "), r["where"],
            str(r["micrographs"]), f(r["wall_s"], ".1f"), f(r["micrographs"] / r["wall_s"], ".3f"),
            f(steady, ".3f"), str(r["picks"]), f(r["precision"], ".3f"), f(r["recall"], ".3f"),
            f(r.get("overlap_relion"), ".3f")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _args(argv)
    star, refs, truth, info = make_data(args)
    where = _where()
    print(f"data: {info['n']} micrographs of {info['size']}^2 at {info['pixel_size']} A/px, "
          f"{len(truth)} particles, {info['refs']} references ({info['map']}); --lowpass "
          f"{args.lowpass} --ang {args.ang} --shrink {args.shrink} --ctf --invert", flush=True)
    rows: list[dict] = []
    relion_picks = None
    runs = []
    if not args.no_relion:
        runs.append(("relion", functools.partial(run_relion, star, refs, args, info,
                                                 Path(args.data) / "out_relion")))
    for spec in args.cpu_rows:
        r, j = (int(v) for v in spec.split("x"))
        runs.append((f"cpu {spec}", functools.partial(
            run_cryonb, star, refs, args, info, Path(args.data) / f"out_cpu{r}x{j}", ranks=r,
            threads=j, devices=None, label="cpu")))
    gpu = _gpu_name()
    if gpu is not None:
        from cryonb.backend import device_count

        n_gpu = device_count()
        specs = args.gpu_rows if args.gpu_rows is not None else (
            ["1x1", "1x4"] + ([f"{n_gpu}x4"] if n_gpu > 1 else []))
        for spec in specs:
            r, j = (int(v) for v in spec.split("x"))
            runs.append((f"gpu {spec}", functools.partial(
                run_cryonb, star, refs, args, info, Path(args.data) / f"out_gpu{r}x{j}",
                ranks=r, threads=j, devices=[i % n_gpu for i in range(r)],
                label=f"GPU: {gpu}")))
    for name, run in runs:
        try:
            row, picks = run()
        except FileNotFoundError as exc:
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        if name == "relion":
            relion_picks = picks
        row.update(_score(picks, truth, info, None if name == "relion" else relion_picks))
        row["where"] = where
        rows.append(row)
        print(f"{name}: {row['micrographs'] / row['wall_s']:.3f} micrographs/s "
              f"(wall {row['wall_s']:.1f} s)", flush=True)
    for other in args.merge:
        rows += json.loads(Path(other).read_text())["rows"]
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": info, "options": vars(args),
                                               "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
