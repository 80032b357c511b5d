"""Two versions of cryonb on the same GPU E-step shapes, interleaved (A, B, A, B, ...).

Timings of the same code on the device move by 10-25% from one call to the next (see
``benchmarks/RESULTS.md``), as much as most single changes. Comparing a change with the code
before it therefore needs both in one call, run in turns, the faster of each version's runs
kept. Each run is ``benchmarks/class2d_gpu.py`` for one shape in a subprocess whose
``PYTHONPATH`` puts that version's tree first (the simulated sets in ``$TMPDIR`` are made once
and shared).

    git archive <commit> cryonb benchmarks | tar -x -C _base     # the other version's tree
    python benchmarks/class2d_gpu_ab.py --base _base --cases 128:50:10,128:200:10 --out $OUT

Prints, per shape, each version's E-step particles/s (best of ``--rounds``) and the stages
whose times differ most, and writes ``class2d_gpu_ab.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(tree: Path, case: str, pool: str) -> dict:
    """One E-step measurement of ``case`` ("box:K:psi") with the cryonb of ``tree``."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(tree / "benchmarks" / "class2d_gpu.py"), "--out", out,
               "--cases", case, "--no_variants", "--skip_iterations", "--pool", pool]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        path = Path(out) / "class2d_gpu.json"
        if proc.returncode or not path.exists():
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise RuntimeError(f"{tree} {case}: exit {proc.returncode}\n{tail}")
        est = json.loads(path.read_text())["estep"]
    if not est or "error" in est[0]:
        raise RuntimeError(f"{tree} {case}: {est[0].get('error') if est else 'no result'}")
    return est[0]


def compare(runs_a: list, runs_b: list, top: int = 8) -> dict:
    """The faster run of each version, and the stages that differ most between them."""
    a = min(runs_a, key=lambda r: r["seconds"])
    b = min(runs_b, key=lambda r: r["seconds"])
    names = sorted(set(a["stages_s"]) | set(b["stages_s"]))
    diff = sorted(((n, a["stages_s"].get(n, 0.0), b["stages_s"].get(n, 0.0)) for n in names),
                  key=lambda t: -abs(t[1] - t[2]))[:top]
    return {"a_particles_per_s": [round(r["particles_per_s"]) for r in runs_a],
            "b_particles_per_s": [round(r["particles_per_s"]) for r in runs_b],
            "a_best": a["particles_per_s"], "b_best": b["particles_per_s"],
            "ratio_b_over_a": b["particles_per_s"] / a["particles_per_s"],
            "stages_a_b": [(n, x, y) for n, x, y in diff],
            "stages_a_all": a["stages_s"], "stages_b_all": b["stages_s"],
            "mean_significant_a_b": (a.get("mean_significant"), b.get("mean_significant"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="tree of version A (with cryonb/, benchmarks/)")
    ap.add_argument("--new", default=str(HERE.parent), help="tree of version B (default: this)")
    ap.add_argument("--cases", default="128:50:10,128:200:10", help="box:K:psi,...")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each version per shape")
    ap.add_argument("--pool", default="auto")
    ap.add_argument("--out", default=".")
    ap.add_argument("--json", default="class2d_gpu_ab.json", help="file name in --out")
    a = ap.parse_args(argv)
    trees = {"A": Path(a.base).resolve(), "B": Path(a.new).resolve()}
    for name, tree in trees.items():
        if not (tree / "cryonb").is_dir() or not (tree / "benchmarks" / "class2d_gpu.py").exists():
            ap.error(f"--{'base' if name == 'A' else 'new'} {tree}: needs cryonb/ and "
                     "benchmarks/class2d_gpu.py (git archive <commit> cryonb benchmarks)")
    results = {"trees": {k: str(v) for k, v in trees.items()}, "cases": {}}
    for case in a.cases.split(","):
        runs = {"A": [], "B": []}
        for _ in range(a.rounds):
            for name in ("A", "B"):
                runs[name].append(run_once(trees[name], case, a.pool))
                print(f"{case} {name}: {runs[name][-1]['particles_per_s']:.0f} particles/s",
                      flush=True)
        c = compare(runs["A"], runs["B"])
        results["cases"][case] = c
        print(f"{case}: A {c['a_best']:.0f}, B {c['b_best']:.0f} particles/s "
              f"(B/A {c['ratio_b_over_a']:.3f})")
        for n, x, y in c["stages_a_b"]:
            print(f"    {n:<52} A {1e3 * x:7.2f} ms   B {1e3 * y:7.2f} ms")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
