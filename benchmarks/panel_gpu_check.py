"""The notebook panel driven from code with 2 workers on the GPU, and the load it collected.

Builds a :class:`cryonb.widgets.Class2DPanel` exactly as a notebook would (no kernel needed:
the run is supervised by a thread), sets ``--ranks 3 --gpu 0 --engines local`` (rank 0 leads,
ranks 1 and 2 work, both on GPU 0) through its widgets, checks the live ``--gpu`` table,
presses Run, and prints what the panel's load monitor collected: GPU utilisation and memory
(NVML) over time, the ranks' reports (stage, particles/s, resident memory, CuPy memory) and the
engine processes' CPU. Exits 1 unless the run finished on the GPU with non-zero GPU
utilisation sampled while it ran. Say which card gave the numbers.

    python benchmarks/panel_gpu_check.py [--n 12000] [--box 64] [--iter 5] [--j 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12000, help="particles (default 12000)")
    p.add_argument("--box", type=int, default=64, help="box size (default 64)")
    p.add_argument("--K", type=int, default=10, help="classes (default 10)")
    p.add_argument("--iter", type=int, default=5, help="iterations (default 5)")
    p.add_argument("--j", type=int, default=2, help="threads per worker (default 2)")
    p.add_argument("--gpu", default="0", help="--gpu string (default '0': both workers on 0)")
    p.add_argument("--data", default="/tmp/cryonb_panel_gpu_check", help="work folder")
    a = p.parse_args(argv)

    import pandas as pd

    from cryonb.parallel.hardware import visible_devices
    from cryonb.simulate import simulate_particles, write_particle_set
    from cryonb.widgets import Class2DPanel

    devs = visible_devices()
    print("devices:", [(d["index"], d["name"], d["uuid"]) for d in devs], flush=True)
    root = Path(a.data)
    t = time.monotonic()
    sim = simulate_particles(n=a.n, box=a.box, n_views=a.K, snr=0.15, seed=1)
    star = write_particle_set(sim, root / "data")
    print(f"simulated {a.n} particles of {a.box} px in {time.monotonic() - t:.1f} s", flush=True)

    devices = None  # the panel finds them with NVML; without NVML, CuPy's count
    if not devs:
        from cryonb.backend import device_count

        devices = device_count()
        print(f"NVML lists no device; CuPy sees {devices}", flush=True)
    panel = Class2DPanel(i=str(star), o=str(root / "Class2D" / "run"), K=a.K, iter=a.iter,
                         psi_step=10.0, offset_range=4.0, random_seed=0, timeout=300.0,
                         views=False, monitor_interval=0.25, devices=devices)
    # set through the widgets, as a user would
    panel.form["ranks"].value = 3
    panel.form["j"].value = a.j
    panel.form["engines"].value = "local"
    panel.form["gpu"].text.value = a.gpu
    print("--gpu check as the panel shows it:")
    print(panel.device_report.text)
    print("I/O:", " | ".join(line for _, line in panel.kind.resource_lines(
        panel.config, gpu=True)))
    print("command:", panel.config.command_line())
    print("relion: ", panel.config.relion_command_line(), flush=True)
    if not panel.valid:
        print(f"FAIL the panel refuses the options: {panel.errors}")
        return 1

    t = time.monotonic()
    panel.run_button.click()
    last = ""
    while panel.running:
        line = panel.progress.state.summary()
        if line != last:
            print("  ", line, flush=True)
            last = line
        time.sleep(1.0)
    secs = time.monotonic() - t
    if panel.error is not None:
        print(f"FAIL the run failed: {type(panel.error).__name__}: {panel.error}")
        return 1
    result = panel.result
    print(f"run: {secs:.1f} s, gpu={result.gpu}, engines={result.engines}, "
          f"iteration {result.iteration}, pool {result.pool}")
    print(result.device_table)
    print(result.stats.table(), flush=True)

    mon = panel.monitor
    samples = mon.samples()
    gpu = mon.samples(kind="gpu")
    ranks = mon.samples(kind="rank")
    procs = mon.samples(kind="process")
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(f"\nload samples: {len(samples)} rows over {samples['elapsed'].max():.1f} s "
          f"({len(gpu)} GPU, {len(ranks)} rank, {len(procs)} process)")
    if len(gpu):
        g = gpu.assign(t=gpu["elapsed"].round(1))[["t", "name", "gpu_util", "mem_used_mib"]]
        print("GPU samples (every 4th):")
        print(g.iloc[::4].to_string(index=False))
        by = gpu.groupby("name")["gpu_util"].agg(["mean", "max", "count"])
        print("GPU utilisation per device (%):")
        print(by.to_string())
    print("rank reports (last 12):")
    cols = [c for c in ("elapsed", "name", "stage", "device", "particles_per_s", "rss_mib",
                        "gpu_mem_mib", "gpu_util", "busy_threads") if c in ranks.columns]
    print(ranks[cols].tail(12).to_string(index=False))
    print("processes (mean CPU %, max RSS MiB):")
    print(procs.groupby("name").agg(cpu=("cpu_percent", "mean"), rss=("rss_mib", "max"),
                                    gpu_mem=("gpu_mem_mib", "max")).to_string())
    busy = float(gpu["gpu_util"].max()) if len(gpu) else 0.0
    workers = sorted(int(r) for r in ranks["rank"].dropna().unique())
    ok = result.gpu and not result.stopped and busy > 0 and workers == [1, 2]
    print(f"\n{'PASS' if ok else 'FAIL'}: finished on the GPU={result.gpu}, max GPU "
          f"utilisation sampled {busy:.0f}%, ranks reporting {workers}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
