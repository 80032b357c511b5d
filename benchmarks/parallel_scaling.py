"""Throughput of the parallel runtime: workers x threads x I/O mode (issue 4).

For every combination, one 2D classification run of ``--iter`` iterations on a simulated set;
the E-step of the last iteration is timed (particles per second over its wall time) with the
per-stage times the runtime reports (read, E-step, combine, M-step). ``1 rank`` is the
in-process run (the calling process leads and works); ``W workers`` run on ``W + 1`` engines
(rank 0 leads), all taken from one cluster started at the beginning.

CPU here; on the GPU machine add ``--gpu ''`` (automatic map: with one GPU every worker shares
it) and larger sets. Example::

    python benchmarks/parallel_scaling.py --smoke
    python benchmarks/parallel_scaling.py --n 8000 --box 64 --workers 1 2 4 --threads 1 2 3 4
    python benchmarks/parallel_scaling.py --gpu '' --n 40000 --box 128 --K 50 --engines mpi

Prints a table (and ``--json FILE`` writes every run's numbers); say which machine and card
gave them when copying them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/cryonb_scaling", help="folder for the data and runs")
    p.add_argument("--n", type=int, default=4000, help="particles")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--iter", type=int, default=2, help="iterations per run (the last is timed)")
    p.add_argument("--psi_step", type=float, default=10.0)
    p.add_argument("--offset_range", type=float, default=4.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                   help="worker ranks (1 also runs in-process)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--io", nargs="+", default=["parallel", "leader", "preread", "scratch"])
    p.add_argument("--combine", default="network", choices=("network", "disc"))
    p.add_argument("--pool", type=int, default=0, help="0 = automatic")
    p.add_argument("--gpu", nargs="?", const="", default=None, help="device string (GPU path)")
    p.add_argument("--engines", default="local", choices=("local", "mpi"))
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run of every code path (seconds, for CI and a first look)")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.box, a.K, a.iter = 240, 32, 3, 1
        a.psi_step, a.offset_range = 30.0, 2.0
        a.workers, a.threads = [1, 2], [1, 2]
    return a


def _dataset(a) -> Path:
    from cryonb.simulate import simulate_particles, write_particle_set

    folder = Path(a.data) / f"set_{a.n}_{a.box}_{a.K}"
    star = folder / "particles.star"
    if not star.exists():
        sim = simulate_particles(n=a.n, box=a.box, n_views=a.K, snr=0.1, seed=0)
        write_particle_set(sim, folder)
    return star


def _run(a, star, client, ranks, j, io):
    from cryonb.em._config import Class2DConfig
    from cryonb.parallel import run_class2d

    out = Path(a.data) / "runs" / f"r{ranks}_j{j}_{io}" / "run"
    cfg = Class2DConfig(i=str(star), o=str(out), K=a.K, iter=a.iter, psi_step=a.psi_step,
                        offset_range=a.offset_range, random_seed=0, ranks=ranks, j=j,
                        pool=a.pool, io_mode=io, combine=a.combine, gpu=a.gpu,
                        cpu=a.gpu is None,
                        scratch_dir=str(Path(a.data) / "scratch") if io == "scratch" else "")
    t0 = time.monotonic()
    res = run_class2d(cfg, client=client if ranks > 1 else None)
    wall = time.monotonic() - t0
    last = res.stats.iterations[-1]
    ranks_t = last.ranks.values()
    return {"ranks": ranks, "workers": max(1, ranks - 1), "threads": j, "io": io,
            "pool": res.pool, "gpu": res.gpu, "engines": res.engines,
            "estep_s": last.stages.get("estep", 0.0), "particles_per_s": last.particles_per_s,
            "read_s": sum(t.read_s for t in ranks_t), "combine_s": last.stages["combine"],
            "mstep_s": last.stages["mstep"], "write_s": last.stages["write"],
            "iteration_s": last.wall_s, "run_s": wall, "device_table": res.device_table}


def _table(rows) -> str:
    head = ["ranks", "workers", "j", "io", "pool", "E-step s", "ptcl/s", "read s", "combine s",
            "M-step s", "speed-up"]
    base = {r["io"]: r["particles_per_s"] for r in rows if r["ranks"] == 1 and r["threads"] == 1}
    lines = []
    for r in rows:
        b = base.get(r["io"]) or rows[0]["particles_per_s"]
        lines.append([str(r["ranks"]), str(r["workers"]), str(r["threads"]), r["io"],
                      str(r["pool"]), f"{r['estep_s']:.2f}", f"{r['particles_per_s']:.0f}",
                      f"{r['read_s']:.2f}", f"{r['combine_s']:.2f}", f"{r['mstep_s']:.2f}",
                      f"{r['particles_per_s'] / b:.2f}x" if b else "-"])
    w = [max(len(x[c]) for x in [head, *lines]) for c in range(len(head))]
    return "\n".join("  ".join(v.rjust(n) for v, n in zip(x, w)) for x in [head, *lines])


def main(argv=None) -> int:
    a = _args(argv)
    from cryonb.parallel import start_cluster
    from cryonb.parallel.hardware import cpu_count, visible_devices

    star = _dataset(a)
    devs = visible_devices()
    print(f"# {platform.node()}: {cpu_count()} cores, "
          f"{', '.join(d['name'] for d in devs) or 'no GPU'}; {a.n} particles x {a.box} px, "
          f"K={a.K}, psi step {a.psi_step}, offsets {a.offset_range}; "
          f"{'GPU' if a.gpu is not None else 'CPU'} path", flush=True)
    rows = []
    n_engines = max(a.workers) + 1
    with start_cluster(n_engines, a.engines) as cluster:
        # warm-up (imports, compiled kernels, page cache) on this process and the engines
        _run(a, star, None, 1, 1, "parallel")
        _run(a, star, cluster, n_engines, 1, "parallel")
        for io in a.io:
            for j in a.threads:
                for w in [0, *a.workers]:  # 0: one rank in this process
                    if w == 0 and 1 not in a.workers:
                        continue
                    ranks = 1 if w == 0 else w + 1
                    row = _run(a, star, cluster, ranks, j, io)
                    rows.append(row)
                    print(f"ranks {ranks} j {j} {io}: {row['particles_per_s']:.0f} particles/s "
                          f"(E-step {row['estep_s']:.2f} s)", flush=True)
    print()
    print(_table(rows))
    if rows:
        print()
        print(rows[-1]["device_table"])
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
