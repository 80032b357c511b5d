"""GPU checks of the parallel runtime (issue 4), in one call on the GPU machine.

1. One rank, ``--j 4`` threads on the GPU (each its own CUDA stream) against the CPU path.
2. Local engines: 2 workers on ONE GPU (``--gpu 0``, reused cyclically) with ``--j 4``; the
   resolved table must show the device shared by both workers, identified by the UUID CUDA
   reports in each engine.
3. Engines under MPI: 2 workers on the GPU, leader reads and sends (MPI), sums through MPI.
4. With 2 or more GPUs: ``--gpu 0:1``, one worker per GPU (different UUIDs).
5. ``cryonb gpumap`` on the real devices.

Every GPU run must agree with the CPU run within class2d's CPU/GPU tolerance: the same class
for >= 99% of the particles and class images correlated >= 0.99. Prints PASS/FAIL lines and
per-stage times; exits 1 on any failure. Say which card gave the numbers.

    python benchmarks/parallel_gpu_check.py [--n 800] [--box 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _config(a, out, **kw):
    from cryonb.em._config import Class2DConfig

    base = {"i": str(a.star), "o": str(out / "run"), "K": a.views, "iter": a.iter,
            "psi_step": 15.0, "offset_range": 3.0, "random_seed": 0, "timeout": 300.0}
    return Class2DConfig(**{**base, **kw}).validate()


def _outcome(result):
    from cryonb.io import read_mrc, read_particles

    cls = read_particles(result.files["data"]).particles["rlnClassNumber"].to_numpy()
    return cls, read_mrc(result.classes).data


def _compare(name, result, ref, secs, failures):
    cls, classes = _outcome(result)
    same = float(np.mean(cls == ref[0]))
    corr = min(float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) for x, y in zip(classes, ref[1]))
    ok = same >= 0.99 and corr >= 0.99 and result.gpu
    if not ok:
        failures.append(name)
    est = result.stats.iterations[-1]
    print(f"{'PASS' if ok else 'FAIL'} {name}: same class {same:.4f}, min class correlation "
          f"{corr:.4f}, gpu={result.gpu}, {secs:.1f} s, last E-step {est.stages['estep']:.2f} s "
          f"({est.particles_per_s:.0f} particles/s)", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=800)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--iter", type=int, default=3)
    p.add_argument("--data", default="/tmp/cryonb_gpu_check")
    p.add_argument("--skip_inprocess", action="store_true")
    a = p.parse_args(argv)

    from cryonb.cli import main as cli
    from cryonb.parallel import run_class2d, start_cluster
    from cryonb.parallel.hardware import visible_devices
    from cryonb.simulate import simulate_particles, write_particle_set

    devs = visible_devices()
    print("devices:", [(d["index"], d["name"], d["uuid"]) for d in devs], flush=True)
    root = Path(a.data)
    sim = simulate_particles(n=a.n, box=a.box, n_views=a.views, snr=0.15, seed=1)
    a.star = write_particle_set(sim, root / "data")
    failures: list[str] = []

    t = time.monotonic()
    cpu = run_class2d(_config(a, root / "cpu", j=4, cpu=True))
    print(f"CPU reference: {time.monotonic() - t:.1f} s", flush=True)
    print(cpu.stats.table(), flush=True)
    ref = _outcome(cpu)

    if not a.skip_inprocess:
        t = time.monotonic()
        r = run_class2d(_config(a, root / "gpu1", j=4, gpu=""))
        _compare("1 rank, --j 4 on the GPU", r, ref, time.monotonic() - t, failures)
        print(r.device_table)
        print(r.stats.table(), flush=True)

    with start_cluster(3, "local") as cluster:
        t = time.monotonic()
        r = run_class2d(_config(a, root / "shared", ranks=3, j=4, gpu="0"), client=cluster)
        _compare("2 workers sharing one GPU, --j 4 (local engines)", r, ref,
                 time.monotonic() - t, failures)
        print(r.device_table)
        print(r.stats.table(), flush=True)
        u1, u2 = r.ranks[1].uuids, r.ranks[2].uuids
        shared = len(set(u1)) == 1 and set(u1) == set(u2) and "?" not in u1
        shown = ("2 ranks, 8 threads" in r.device_table
                 and "is shared by 2 worker ranks (1, 2)" in r.device_table)
        if not (shared and shown):
            failures.append("sharing by UUID")
        print(f"{'PASS' if shared and shown else 'FAIL'} sharing detected by UUID: {u1} / {u2}",
              flush=True)

    if len(devs) >= 2:  # fresh engines: an engine keeps the GPUs it was first pinned to
        with start_cluster(3, "local") as cluster:
            t = time.monotonic()
            r = run_class2d(_config(a, root / "two", ranks=3, j=2, gpu="0:1"), client=cluster)
            _compare("2 workers on 2 GPUs (--gpu 0:1)", r, ref, time.monotonic() - t, failures)
            print(r.device_table, flush=True)
            if set(r.ranks[1].uuids) == set(r.ranks[2].uuids):
                failures.append("two GPUs, two UUIDs")
                print("FAIL the two workers report the same GPU", flush=True)

    with start_cluster(3, "mpi") as cluster:
        t = time.monotonic()
        r = run_class2d(_config(a, root / "mpi", ranks=3, j=2, gpu="", io_mode="leader",
                                combine="network"), client=cluster)
        _compare("MPI engines, leader reads and sends, sums through MPI", r, ref,
                 time.monotonic() - t, failures)
        print(r.device_table)
        print(r.stats.table(), flush=True)

    cli(["gpumap", "--ranks", "3", "--j", "4"])
    print("FAILURES: " + (", ".join(failures) if failures else "none"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
