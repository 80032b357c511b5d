"""Do the CPU and GPU paths of ``cryonb class2d`` give the same classes on RELION-made sets?

Issue 3 asks the two paths to agree (the same class for >= 99% of the particles, class images
correlating >= 0.99) on its accuracy sets (2000 x 64 px, 8 views, pixel SNR 0.05-0.1, 25
iterations). Per set this runs the CLI, each run in a process of its own, with the accuracy
test's flags:

- ``cpu``: the CPU path, and the CPU path again on the same images plus noise of 1e-6 of their
  standard deviation (four realisations): what a rounding-level difference alone does to a
  run (two correct
  floating-point implementations, CPU and GPU, differ at that level: FFT libraries,
  summation orders);
- ``gpu``: the GPU path as a user runs it (3 x TF32 in the coarse product up to
  ``--tf32_from``, TF32 after) twice, and once with TF32 in every iteration (``--tf32_from
  0``); ``--gpu_variants`` also offers float32 throughout (``CRYONB_TF32=0``).

``tf32cpu`` runs the CPU path with TF32's rounding of the coarse product's inputs emulated
(:func:`emulate_tf32`) from each ``--tf32_from``: what TF32 alone does to a run, on this
machine.

``sensitivity`` measures how far the CPU path is from itself: from the CPU run's saved state
at an iteration (``--from_iteration``), it continues the run on the CPU once on the same
images and ``--perturbations`` times on the images plus noise of ``--noise`` (1e-6) of their
standard deviation (job API, one process, the same pools and threads for all), and prints the
fraction of particles in the same class at the end, as numbered and after renumbering, and
each run's purity. Where those continuations part, a GPU run (whose float32 arithmetic
differs from the CPU's at that level) cannot be expected to stay on the CPU run's path.

``compare`` prints, per iteration, the fraction of particles in the same class as the CPU run,
and at the end each run's purity (against the truth), its class images' correlations with
the CPU run's, as numbered and after matching the classes by image (the assignment of largest
total correlation; a class average shifted or rotated in plane correlates poorly), and the
fraction of particles in the same class once the classes are renumbered to share the most
particles with the CPU run's.

The GPU machine has no RELION: make the sets and the CPU runs here, carry the sets' folder
(``--float16`` halves it; every run then reads the same float16 values)::

    python benchmarks/class2d_cpu_gpu.py make --out .agree --float16
    python benchmarks/class2d_cpu_gpu.py cpu --out .agree --runs bench_out/cpu_gpu
    python benchmarks/class2d_cpu_gpu.py gpu --out .agree --runs $OUT/runs   # GPU machine
    python benchmarks/class2d_cpu_gpu.py compare --runs bench_out/cpu_gpu --gpu_runs DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: name: make_class2d_set options (the accuracy test's set, and one at the low end of SNR)
SETS = {
    "acc": dict(n_particles=2000, box=64, n_views=8, snr=0.08, seed=1),
    "noise05": dict(n_particles=2000, box=64, n_views=8, snr=0.05, seed=11, noise="relion"),
    # two more at SNR 0.05 (other views, poses and noise): how often does the agreement hold?
    "noise05b": dict(n_particles=2000, box=64, n_views=8, snr=0.05, seed=12, noise="relion"),
    "noise05c": dict(n_particles=2000, box=64, n_views=8, snr=0.05, seed=13, noise="relion"),
    # four more (seeds 14-17): TF32's effect with --tf32_from 0.5 and 0.85 (tf32cpu)
    **{f"noise05{c}": dict(n_particles=2000, box=64, n_views=8, snr=0.05, seed=seed,
                           noise="relion") for c, seed in zip("defg", range(14, 18))},
}
ITER = 25
#: the iterations compared (the GPU step keeps only their _data.star files)
SHOWN = (1, 5, 10, 13, 15, 20, 25)
FLAGS = ["--K", "8", "--iter", str(ITER), "--tau2_fudge", "2", "--psi_step", "10",
         "--offset_range", "5", "--offset_step", "2", "--random_seed", "0", "--quiet"]
_CLI = "import sys; from cryonb.cli import main; sys.exit(main(sys.argv[1:]))"
#: the CLI with :func:`emulate_tf32` in effect (this folder on the path)
_CLI_TF32 = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             "import class2d_cpu_gpu as b; b.emulate_tf32(); " + _CLI.split("; ", 1)[1])


def emulate_tf32() -> None:
    """Make this process's CPU E-step round the coarse product's inputs as a TF32 tensor
    core does, in the iterations where the GPU's product is TF32 (``precision="tf32"``):
    both operands rounded to 10-bit mantissas (:func:`cryonb.kernels.split_tf32_reference`'s
    ``hi``, to nearest), products summed in float32. What TF32 alone does to a run, without
    the GPU's other differences (its FFTs, its summation orders). ``class2d_tf32_emulation.py``
    rounds the same way in a window of iterations given by number, and also as 3 x TF32."""
    import cryonb.em._estep as estep
    from cryonb.kernels import split_tf32_reference

    exact = estep.cross_products

    def cross_products(x, y, *, precision=None):
        if precision != "tf32":
            return exact(x, y, precision=precision)
        y = y[0] + y[1] if isinstance(y, tuple) else y
        return split_tf32_reference(x)[0] @ split_tf32_reference(y)[0].T

    estep.cross_products = cross_products


def make(out: Path, names, float16: bool) -> None:
    """Make each set with RELION's programs; keep its particles, truth and description."""
    import mrcfile

    from cryonb.testing import make_class2d_set

    for name in names:
        work = out / name / "made"
        s = make_class2d_set(work, **SETS[name])
        dst = out / name
        shutil.copy(s.particles_star, dst / "particles.star")
        shutil.copy(work / "set.json", dst / "set.json")
        s.truth.to_csv(dst / "truth.csv", index=False)
        with mrcfile.open(work / "particles.mrcs", permissive=True) as m:
            data, voxel = np.asarray(m.data), m.voxel_size
        with mrcfile.new(dst / "particles.mrcs", overwrite=True) as m:
            m.set_data(data.astype(np.float16 if float16 else np.float32))
            m.set_image_stack()
            m.voxel_size = voxel
        shutil.rmtree(work)
        print(f"{name}: {dst / 'particles.star'}", flush=True)


def _run(star: Path, root: Path, device: list, diameter: float, env=None,
         cli: str = _CLI) -> float:
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", cli, "class2d", "--i", str(star), "--o", str(root),
                    "--particle_diameter", str(diameter), *FLAGS, *device], check=True,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - t0


def _diameter(folder: Path) -> float:
    return float(json.loads((folder / "set.json").read_text())["particle_diameter"])


def cpu(out: Path, runs: Path, names, perturbations: int = 4) -> None:
    """The CPU path, and again on images perturbed by 1e-6 of their standard deviation
    (``perturbations`` noise realisations)."""
    import mrcfile

    for name in names:
        src = out / name
        d = _diameter(src)
        dt = _run(src / "particles.star", runs / name / "cpu" / "run", ["--cpu", "--j", "2"], d)
        print(f"{name} cpu: {dt:.0f} s", flush=True)
        with mrcfile.open(src / "particles.mrcs", permissive=True) as m:
            x = np.asarray(m.data, np.float32)
        for seed in range(perturbations):
            pert = runs / name / f"perturbed_input_{seed}"
            pert.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "particles.star", pert / "particles.star")
            rng = np.random.default_rng(seed)
            with mrcfile.new(pert / "particles.mrcs", overwrite=True) as m:
                m.set_data(x + np.float32(1e-6 * x.std())
                           * rng.standard_normal(x.shape, np.float32))
                m.set_image_stack()
            dt = _run(pert / "particles.star", runs / name / f"cpu_perturbed_{seed}" / "run",
                      ["--cpu", "--j", "2"], d)
            print(f"{name} cpu, perturbed images {seed}: {dt:.0f} s", flush=True)


def tf32_cpu(out: Path, runs: Path, names, starts=("0.5",)) -> None:
    """The CPU path with TF32's rounding emulated in the coarse product
    (:func:`emulate_tf32`) from each ``--tf32_from`` of ``starts``."""
    for name in names:
        src = out / name
        for start in starts:
            folder = runs / name / f"tf32em_{start}"
            dt = _run(src / "particles.star", folder / "run",
                      ["--cpu", "--j", "2", "--tf32_from", start], _diameter(src), cli=_CLI_TF32)
            print(f"{name} cpu, TF32 emulated from --tf32_from {start}: {dt:.0f} s", flush=True)
            _prune(folder)


def _continue(optimiser: Path, images: np.ndarray | None) -> np.ndarray:
    """Continue a saved CPU run to its end with the job API (no files written), optionally
    on other images of the same particles; returns the final classes (0-based)."""
    import tempfile

    from cryonb.em.class2d import Class2DJob

    with tempfile.TemporaryDirectory() as tmp:
        job = Class2DJob.from_optimiser(optimiser, cpu=True, gpu="", j=1, o=f"{tmp}/run")
        while job.iteration < job.config.iter:
            it = job.iteration + 1
            ctx = job.estep_context(np)
            for p in job.pools(500, it):
                x = job.table.images(p) if images is None else images[p]
                job.store_results(p, ctx.expectation(job.make_batch(job.batch_meta(p), x)))
            job.maximize(ctx.finish().to_host())
        return job.state.cls.copy()


def sensitivity(out: Path, runs: Path, names, from_iteration: int, perturbations: int,
                noise: float = 1e-6) -> str:
    """The CPU path against itself from a saved state (see the module's description)."""
    import mrcfile
    import pandas as pd

    from cryonb.io import read_star
    from cryonb.testing import score_class2d

    lines = []
    for name in names:
        opt = runs / name / "cpu" / f"run_it{from_iteration:03d}_optimiser.star"
        truth = pd.read_csv(out / name / "truth.csv")
        x = mrcfile.read(out / name / "particles.mrcs").astype(np.float32)
        ref = _continue(opt, None)
        data = read_star(runs / name / "cpu" / f"run_it{ITER:03d}_data.star")["particles"]

        def purity(cls, data=data, truth=truth):
            return score_class2d(data.assign(rlnClassNumber=cls + 1), truth)["purity"]

        lines += [f"### {name}: continued from iteration {from_iteration} (CPU, job API)", "",
                  f"unperturbed continuation: purity {purity(ref):.4f}", "",
                  f"| images + {noise:g} noise, draw | same class as numbered | after renumbering "
                  "| purity |", "|---|---|---|---|"]
        for seed in range(perturbations):
            rng = np.random.default_rng(seed)
            xp_ = x + np.float32(noise * x.std()) * rng.standard_normal(x.shape, np.float32)
            cls = _continue(opt, xp_)
            lines.append(f"| {seed} | {np.mean(cls == ref):.4f} | "
                         f"{_same_after_relabelling(ref + 1, cls + 1):.4f} | "
                         f"{purity(cls):.4f} |")
            print(lines[-1], flush=True)
        lines.append("")
    return "\n".join(lines)


#: GPU runs: name -> (environment, extra flags, label)
GPU_VARIANTS = {
    "default": ({"CRYONB_TF32": "1"}, [], "GPU, 3 x TF32 up to --tf32_from, TF32 after "
                "(default)"),
    "tf32": ({"CRYONB_TF32": "1"}, ["--tf32_from", "0"],
             "GPU, TF32 in every iteration (--tf32_from 0)"),
    "fp32": ({"CRYONB_TF32": "0"}, [], "GPU, float32 (CRYONB_TF32=0)"),
    "half": ({"CRYONB_TF32": "1"}, ["--tf32_from", "0.5"],
             "GPU, TF32 in the second half (--tf32_from 0.5, the default before 2026-12-07)"),
    "late": ({"CRYONB_TF32": "1"}, ["--tf32_from", "1"],
             "GPU, 3 x TF32 in every iteration (--tf32_from 1)"),
}


def gpu(out: Path, runs: Path, names, variants=("default_a", "default_b", "tf32_a")) -> None:
    """The GPU path's runs ``variants``: a :data:`GPU_VARIANTS` name and a run letter (the
    same variant twice shows whether the GPU path is deterministic)."""
    for name in names:
        src = out / name
        for v in variants:
            kind, rep = v.split("_")
            env, flags, label = GPU_VARIANTS[kind]
            folder = runs / name / f"gpu_{kind}_{rep}"
            dt = _run(src / "particles.star", folder / "run", ["--gpu", "0", "--j", "1", *flags],
                      _diameter(src), env)
            print(f"{name}: {label}, run {rep}: {dt:.0f} s", flush=True)
            _prune(folder)


def _prune(folder: Path) -> None:
    """Keep the compared iterations' _data.star and the last class images."""
    keep = {f"run_it{it:03d}_data.star" for it in SHOWN} | {f"run_it{ITER:03d}_classes.mrcs"}
    for f in folder.iterdir():
        if f.name not in keep:
            f.unlink()


def _classes_per_iteration(root: Path) -> dict:
    """Each compared iteration's classes (1-based) of a run, where its _data.star is kept."""
    from cryonb.io import read_star

    return {it: read_star(f"{root}_it{it:03d}_data.star")["particles"].rlnClassNumber
            .to_numpy() for it in SHOWN if Path(f"{root}_it{it:03d}_data.star").exists()}


def _matched(ca, cb):
    """Correlations of class images as numbered, and after matching classes."""
    from scipy.optimize import linear_sum_assignment

    K = len(ca)
    C = np.array([[np.corrcoef(ca[i].ravel(), cb[j].ravel())[0, 1] for j in range(K)]
                  for i in range(K)])
    rows, cols = linear_sum_assignment(-C)
    return np.diag(C), C[rows, cols]


def _same_after_relabelling(a, b) -> float:
    """Fraction of particles in the same class once ``b``'s classes are renumbered to
    share the most particles with ``a``'s (1-based labels; the assignment of largest
    overlap)."""
    from scipy.optimize import linear_sum_assignment

    K = int(max(a.max(), b.max()))
    table = np.zeros((K, K))
    np.add.at(table, (a - 1, b - 1), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(a))


def compare(runs: Path, gpu_runs: Path | None, sets_dir: Path, names) -> str:
    """Per-iteration agreement with the CPU run, final purities and class correlations."""
    import pandas as pd

    from cryonb.io import read_mrc, read_star
    from cryonb.testing import score_class2d

    lines = []
    for name in names:
        truth = pd.read_csv(sets_dir / name / "truth.csv")
        apix = float(json.loads((sets_dir / name / "set.json").read_text())["pixel_size"])
        roots = {f"cpu, images perturbed ({p.name.split('_')[-1]})": p / "run"
                 for p in sorted((runs / name).glob("cpu_perturbed_*"))}
        for folder in sorted((runs / name).glob("tf32em_*")):
            roots[f"CPU, TF32 emulated from --tf32_from {folder.name.split('_')[1]}"] = \
                folder / "run"
        for folder in sorted(((gpu_runs or runs) / name).glob("gpu_*_*")):
            kind, rep = folder.name.split("_")[1:]
            label = GPU_VARIANTS[kind][2] if kind in GPU_VARIANTS else f"GPU, {kind}"
            roots[f"{label}, run {rep}"] = folder / "run"
        ref = runs / name / "cpu" / "run"
        ref_cls = _classes_per_iteration(ref)
        ref_img = read_mrc(f"{ref}_it{ITER:03d}_classes.mrcs").data
        sc = score_class2d(read_star(f"{ref}_it{ITER:03d}_data.star")["particles"], truth,
                           pixel_size=apix)
        lines += [f"### {name}: {SETS[name]}", "",
                  f"CPU run: purity {sc['purity']:.3f}", "",
                  f"| run | same class as the CPU run, iterations {', '.join(map(str, SHOWN))} | "
                  "purity | class correlation, min as numbered | min after matching classes "
                  "by image | same class after renumbering |", "|---|---|---|---|---|---|"]
        for label, root in roots.items():
            cls = _classes_per_iteration(root)
            same = [f"{(cls[it] == ref_cls[it]).mean():.3f}" if it in cls else "-"
                    for it in SHOWN]
            img = read_mrc(f"{root}_it{ITER:03d}_classes.mrcs").data
            diag, matched = _matched(ref_img, img)
            shared = _same_after_relabelling(ref_cls[ITER], cls[ITER])
            s = score_class2d(read_star(f"{root}_it{ITER:03d}_data.star")["particles"], truth,
                              pixel_size=apix)
            lines.append(f"| {label} | {', '.join(same)} | {s['purity']:.3f} | "
                         f"{diag.min():.3f} | {matched.min():.3f} | {shared:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["make", "cpu", "tf32cpu", "gpu", "sensitivity",
                                     "compare"])
    ap.add_argument("--out", default=".agree", help="the sets' folder")
    ap.add_argument("--runs", default="bench_out/cpu_gpu", help="the runs' folder")
    ap.add_argument("--gpu_runs", default=None, help="compare: the GPU runs' folder, if apart")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--float16", action="store_true", help="make: float16 stacks")
    ap.add_argument("--perturbations", type=int, default=4,
                    help="cpu, sensitivity: runs on perturbed images (noise realisations)")
    ap.add_argument("--noise", type=float, default=1e-6,
                    help="sensitivity: the noise added, relative to the images' deviation")
    ap.add_argument("--from_iteration", type=int, default=4,
                    help="sensitivity: continue the CPU run from this iteration's state")
    ap.add_argument("--gpu_variants", default="default_a,default_b,tf32_a",
                    help="gpu: runs as variant and run letter (default_a, tf32_a, fp32_a: "
                         "see GPU_VARIANTS)")
    ap.add_argument("--tf32_from", default="0.5",
                    help="tf32cpu: --tf32_from values, comma-separated")
    a = ap.parse_args(argv)
    names = a.sets.split(",")
    out, runs = Path(a.out), Path(a.runs)
    if a.step == "make":
        make(out, names, a.float16)
    elif a.step == "cpu":
        cpu(out, runs, names, a.perturbations)
    elif a.step == "tf32cpu":
        tf32_cpu(out, runs, names, a.tf32_from.split(","))
    elif a.step == "gpu":
        gpu(out, runs, names, a.gpu_variants.split(","))
    elif a.step == "sensitivity":
        text = sensitivity(out, runs, names, a.from_iteration, a.perturbations, a.noise)
        print(text)
        (runs / f"sensitivity_it{a.from_iteration:03d}_{a.noise:g}.md").write_text(text + "\n")
    else:
        text = compare(runs, Path(a.gpu_runs) if a.gpu_runs else None, out, names)
        runs.mkdir(parents=True, exist_ok=True)
        (runs / "class2d_cpu_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
