"""2D classification on the GPU: E-step throughput, iteration time, fraction of the GEMM ceiling.

Run on the GPU machine (through the device tool). In one run it measures, on the same card:

1. the GEMM ceilings: float32 (FP32 pipes) and TF32 tensor cores, real products of the shapes
   the coarse pass uses, with cupyx.profiler.benchmark, and the rate of the E-step's own
   product (``cryonb.kernels.cross_products``) on the same shape; the E-step runs as a user's
   job does (TF32 in the coarse product only, set per call: no process-wide compute type);
2. the E-step alone (coarse pass + second pass + accumulation) on pools of simulated particles
   at 64, 128 and 256 px with K = 50..200 and psi_step 6..10: particles/s, and the coarse
   pass's matrix products as a fraction of the TF32 ceiling (and the most that fraction can
   be while the images are copied from host memory: the product's time at the complex
   ceiling over the copy's at the pinned host-to-device rate measured in the same run); the
   E-step of a late iteration (TF32 product), and the same again as in the first part of a
   run, with three TF32 products (``--tf32_from``);
3. whole iterations (``cryonb.parallel.run_class2d``, one rank) on RELION 5's published shape:
   10,000 particles, 128 px, K=20, psi_step 10, offset range 5 / step 2;
4. with ``--runs ITER``, instead of 2.: a whole run of ITER iterations per shape with every
   E-step and M-step timed (:func:`run_profile`): the fraction of the ceiling over the run,
   over its TF32 iterations and per iteration, and what the M-steps (re-seeding on the GPU,
   or on the host with ``--reseed_on_host``) cost beside them.

Writes a markdown table and a JSON file to ``--out`` and prints both.

    python benchmarks/class2d_gpu.py --out $OUT [--quick]
"""

from __future__ import annotations

import argparse
import bisect
import inspect
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def card_name() -> str:
    """The GPU's name (NVML), or the CPU's."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return platform.processor() or "cpu"


def gemm_ceiling(m: int, n: int, k: int) -> dict:
    """GEMM ceilings in TFLOP/s (median of 20): an (m x k) @ (k x n) float32 product on the
    FP32 pipes (``fp32``) and with TF32 tensor cores (``tf32``, ``2 m n k`` flops), and the
    complex64 product of half that depth with TF32 (``tf32_complex``, ``8 m n (k/2)`` flops:
    the same pixels as complex numbers, the issue's "TF32 complex GEMM ceiling")."""
    import cupy
    from cupy._core import _routines_linalg as rl
    from cupyx.profiler import benchmark

    a = cupy.random.standard_normal((m, k), dtype=cupy.float32)
    b = cupy.random.standard_normal((n, k), dtype=cupy.float32)
    ac = a[:, : k // 2] + 1j * a[:, k // 2:]
    bc = b[:, : k // 2] + 1j * b[:, k // 2:]
    out = {}
    for name, x, y, dtype, flops in (
            ("fp32", a, b, cupy.float32, 2.0 * m * n * k),
            ("tf32", a, b, cupy.float32, 2.0 * m * n * k),
            ("tf32_complex", ac, bc, cupy.complex64, 8.0 * m * n * (k // 2))):
        old = rl.get_compute_type(dtype)
        rl.set_compute_type(dtype, rl.COMPUTE_TYPE_DEFAULT if name == "fp32"
                            else rl.COMPUTE_TYPE_TF32)
        try:
            t = benchmark(lambda x=x, y=y: x @ y.T, n_repeat=20,
                          n_warmup=3).gpu_times.ravel()
        finally:
            rl.set_compute_type(dtype, old)
        out[name] = flops / float(np.median(t)) / 1e12
    # the E-step's own coarse product (cryonb.kernels.cross_products: TF32 per call)
    from cryonb.kernels import cross_products

    t = benchmark(lambda: cross_products(a, b), n_repeat=20, n_warmup=3).gpu_times.ravel()
    out["cross_products"] = 2.0 * m * n * k / float(np.median(t)) / 1e12
    return out


def h2d_bandwidth(nbytes: int = 512 << 20) -> float:
    """Host-to-device copy rate from pinned memory (bytes/s, the faster of 5 copies)."""
    import cupy

    from cryonb.backend import pinned_empty

    host = pinned_empty(nbytes, np.uint8)
    host[:] = 1
    dev = cupy.empty(nbytes, cupy.uint8)
    best = float("inf")
    for _ in range(5):
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        dev.set(host)
        cupy.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def simulate(n: int, box: int, views: int, seed: int = 0, snr: float = 0.1):
    """A simulated set (phantom map) as a ParticleTable-compatible folder; returns its STAR.
    Projected on the GPU (16,000 particles of 256 px in seconds; the host's ~20 ms each
    kept the earlier 256 px runs at 2,000-4,000 particles)."""
    import cupy

    from cryonb.simulate import simulate_particles, write_particle_set

    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"cryonb_bench_{n}_{box}_{views}_{seed}"
    star = out / "particles.star"
    if not star.exists():
        sim = simulate_particles(n=n, box=box, n_views=views, snr=snr, seed=seed,
                                 max_offset_px=box / 32, xp=cupy)
        write_particle_set(sim, out)
    return star


def _xp():
    """CuPy where a GPU is usable, else NumPy (``--runs --quick`` as a smoke test on a laptop)."""
    from cryonb.backend import gpu_available

    if gpu_available():
        import cupy

        return cupy
    return np


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def _timed_estep(job, pools, images, keep: list | None = None, xp=None, resident=None):
    """One GPU E-step over every pool, timed between device synchronisations.

    Returns the E-step context and the seconds it took. With ``keep`` (a list), the pools'
    results are stored in the job and the E-step's sums appended to ``keep``, as a run does.
    ``resident``: the images from a device store (:func:`run_pools`).
    """
    if xp is None:
        import cupy as xp

    ctx = job.estep_context(xp)
    _sync(xp)
    t0 = time.perf_counter()
    run_pools(ctx, job, pools, images, store=keep is not None, resident=resident)
    sums = ctx.finish()
    _sync(xp)
    if keep is not None:
        keep.append(sums)
    return ctx, time.perf_counter() - t0


def _timed_estep_threads(job, pools, images, streams: list) -> float:
    """The E-step over every pool by one host thread per stream in ``streams``, sharing the
    one GPU, as a worker rank with ``--j`` threads all on this GPU runs it (``--gpu 0,0``):
    each thread has its own CUDA stream (kept from call to call, as a worker's threads keep
    theirs, so that CuPy's per-stream memory pool is warm) and E-step context, takes every
    ``len(streams)``-th pool and prefetches its next one. Returns the seconds between device
    synchronisations."""
    import threading

    import cupy

    threads = len(streams)
    errors: list = []
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        try:
            with streams[t]:
                ctx = job.estep_context(cupy)
                streams[t].synchronize()
                start.wait()
                mine = range(t, len(pools), threads)
                run_pools(ctx, job, [pools[i] for i in mine], [images[i] for i in mine])
                ctx.finish()
                streams[t].synchronize()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            start.abort()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    cupy.cuda.Device().synchronize()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt


def run_pools(ctx, job, pools, images, store: bool = False, resident=None) -> None:
    """The E-step over the pools as a GPU worker thread runs it: the next pool's images are
    copied to the device (``EStepContext.prefetch``) while the current one is computed. With
    ``store``, each pool's per-particle results are kept in the job (a run's next iteration
    starts from them). With ``resident`` (a ``cryonb.parallel.resident.ResidentImages``
    holding every particle; ``images`` unused), each pool's images are gathered from the
    device store instead, as a GPU worker does from its second iteration on."""
    from cryonb.parallel.resident import PoolRows

    for i, p in enumerate(pools):
        if resident is not None:
            im = resident.assemble(PoolRows(p, np.zeros(len(p), bool)))
        else:
            im = images[i]
            if i + 1 < len(images):
                ctx.prefetch(images[i + 1])
        res = ctx.expectation(job.make_batch(job.batch_meta(p), im))
        if store:
            job.store_results(p, res)


#: the E-step's scatter-adds that choose between atomic adds and sparse products, in call
#: order per pool (the residual's per-particle sums are cryonb.kernels.residual_sums_blocks)
SCATTER_KINDS = ("data", "weights")


def scatter_choice(job, pools, images) -> list:
    """Each back-projection sum of one E-step timed three ways: atomic adds, sparse products and
    samples grouped by row.

    The E-step's :func:`cryonb.kernels.scatter_products` calls per pool (in the order of
    ``SCATTER_KINDS``) are each run every way on copies of the accumulator, between device
    synchronisations, then as the E-step does. Returns one record per call: samples ``n``,
    accumulator rows and those hit, row width, the three times, the default rule's choice.
    """
    import cupy

    from cryonb.em import _estep
    from cryonb.kernels import _sampled

    orig, rec = _estep.scatter_products, []

    def timed(acc, U, V, iu, iv, iacc, w, method=None):
        t = {}
        for how in ("atomic", "sparse", "rows"):
            a = acc.copy()
            _sampled.SUMS_METHOD = how
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            orig(a, U, V, iu, iv, iacc, w)
            cupy.cuda.Device().synchronize()
            t[how] = time.perf_counter() - t0
        _sampled.SUMS_METHOD = None
        orig(acc, U, V, iu, iv, iacc, w, method)
        rec.append({"kind": SCATTER_KINDS[len(rec) % len(SCATTER_KINDS)], "n": int(iu.shape[0]),
                    "acc_rows": int(acc.shape[0]), "rows_hit": int(cupy.unique(iacc).size),
                    "D": int(acc.shape[1]), "atomic_s": t["atomic"], "sparse_s": t["sparse"],
                    "rows_s": t["rows"],
                    "rule": _sampled._scatter_method(int(iu.shape[0]), acc.shape[0])})

    _estep.scatter_products = timed
    try:
        _timed_estep(job, pools, images)
    finally:
        _estep.scatter_products = orig
    return rec


def _pinned_pools(job, pool: int, iteration: int, pageable: bool = True):
    """The pools of one iteration and their images in pinned host memory (as a GPU worker's
    reader thread hands them over, cryonb.parallel._worker), and pageable copies (None
    without ``pageable``)."""
    from cryonb.backend import pinned_empty

    pools = job.pools(pool, iteration)
    images = []
    for p in pools:
        a = np.ascontiguousarray(job.table.images(p))
        images.append(pinned_empty(a.shape))
        images[-1][...] = a
    return pools, images, ([np.ascontiguousarray(a) for a in images] if pageable else None)


def _job(star, K: int, psi_step: float, iterations: int, pool: int):
    """A class2d job on the GPU with the grid's flags (offsets 5 / 2, seed 0), its initial
    pass done and its model started."""
    from cryonb.em import Class2DConfig
    from cryonb.em.class2d import Class2DJob

    cfg = Class2DConfig(i=str(star), o=str(Path(star).parent / f"out_{K}_{psi_step}" / "run"),
                        K=K, iter=iterations, psi_step=psi_step, offset_range=5,
                        offset_step=2, random_seed=0, gpu="0")
    job = Class2DJob(cfg)
    init = job.init_sums_template()
    for p in job.pools(pool, 0):
        init.add_(job.init_accumulate(job.init_meta(p), job.table.images(p)))
    job.start(init)
    return job


def coarse_flops(job, ctx) -> float:
    """The useful flops of an E-step's coarse cross term over every particle: the real
    product (B T, 2P) @ (2P, M) of [Re | Im] rows, ``2 B T M 2P`` (the complex product
    (B T, P) @ (P, M) counts twice that: see :func:`main`). In the first part of a run
    (three TF32 products) the useful product's flops, not the three's."""
    c = ctx.coarse
    return 2.0 * job.n * c.phases.shape[0] * c.refs.shape[0] * 2 * len(c.kx)


def _device_store(job, xp):
    """Every particle's image in a device store (``cryonb.parallel.resident``), as a GPU
    worker's is after its first iteration."""
    from cryonb.parallel.resident import ResidentImages

    st = ResidentImages(job.n, job.N, job.n, xp)
    for s in range(0, job.n, 1024):
        idx = np.arange(s, min(job.n, s + 1024))
        st.add(idx, xp.asarray(job.table.images(idx)))
    return st


def run_profile(star, K: int, psi_step: float, pool: int, iterations: int = 25,
                reseed_on_gpu: bool = True, profile_mstep: bool = False,
                stages_at=(), resident: bool = False, kernels_at=(),
                pool_stored: int | None = None) -> dict:
    """A whole run of ``iterations`` (RELION's default 25) with every E-step timed.

    The grid of :func:`estep_throughput` times one E-step at the model of iteration 3, while
    the classes still form and each particle keeps thousands of significant samples. A run
    spends most of its E-steps later: the classes are sharp, few samples are significant and
    the current resolution (the pixels in the product) has grown. Here each iteration's
    E-step runs as :func:`_timed_estep` times it (images from pinned memory, the next pool's
    copy behind the current one), then its M-step (re-seeding included) on the host, timed
    apart. Returns per-iteration records and the run's totals: the useful coarse flops of
    all E-steps over their summed time (``run_tflops``) and over the late iterations only
    (TF32 product, ``late_tflops``).

    ``reseed_on_gpu``: the M-step's re-seeding (class similarities, split tests) on the GPU,
    as a one-rank run's leader does it (``cryonb.parallel.runtime``), or on the host cores,
    as the leader of a run with several ranks does. ``profile_mstep``: the slowest M-step's
    cProfile (``mstep_profile``, text). ``stages_at``: iterations whose E-step runs once more
    with a device synchronisation at every stage boundary (``stages_s``: where the time
    goes; not counted in the timings). ``resident``: from iteration 2 on, each pool's images
    are gathered from a device store holding every particle (``cryonb.parallel.resident``,
    what a GPU worker does by default), not copied from pinned host memory. ``kernels_at``:
    iterations whose E-step runs once more under PyTorch's profiler (``kernels``: the
    device's busy time against the wall time, :func:`_kernel_profile`; not counted either).
    ``pool_stored``: with ``resident``, the pool from iteration 3 on (default ``pool``), as a
    run with the automatic pool makes it once a rank found all its images stored
    (``cryonb.parallel.runtime``: one pool per rank).
    """
    import cProfile
    import io
    import pstats

    xp = _xp()
    job = _job(star, K, psi_step, iterations, pool)
    job.reseed_device = 0 if reseed_on_gpu and xp is not np else None
    rows, slowest = [], (0.0, "")
    store = None
    for it in range(1, iterations + 1):
        if store is None and resident and it > 1:
            store = _device_store(job, xp)
        if store is None:
            pools, images, _ = _pinned_pools(job, pool, it, pageable=False)
        else:
            pools, images = job.pools((pool_stored or pool) if it > 2 else pool, it), None
        sums: list = []
        ctx, dt = _timed_estep(job, pools, images, keep=sums, xp=xp, resident=store)
        stages = (_stage_profile(job, pools, images, xp, resident=store)[0]
                  if it in stages_at else None)
        kernels = (_kernel_profile(job, pools, images, xp, resident=store)
                   if it in kernels_at else None)
        if kernels:  # and where the host's time goes in the same E-step (cProfile)
            kernels["host_profile"] = _host_profile(job, pools, images, xp, resident=store)
        del images
        prof = cProfile.Profile() if profile_mstep else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        job.maximize(sums.pop().to_host())
        if prof:
            prof.disable()
            if time.perf_counter() - t0 > slowest[0]:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
                slowest = (time.perf_counter() - t0, f"iteration {it}:\n{text.getvalue()}")
        rows.append({"iteration": it, "precision": ctx.precision, "estep_s": round(dt, 4),
                     "particles_per_s": round(job.n / dt, 1),
                     "coarse_tflops": coarse_flops(job, ctx) / dt / 1e12,
                     "flops": coarse_flops(job, ctx), "current_size": int(ctx.fine.size),
                     "mean_significant": float(job.state.n_sig.mean()),
                     "mstep_s": round(time.perf_counter() - t0, 4),
                     "reseeded": len(job.model.reseeded),
                     **({"stages_s": stages} if stages else {}),
                     **({"kernels": kernels} if kernels else {})})
        del ctx
    late = [r for r in rows if r["precision"] != "3xtf32"]
    return {"box": job.N, "K": K, "psi_step": psi_step, "n": job.n, "pool": pool,
            "pool_stored": (pool_stored or pool) if resident else pool,
            "iterations": rows,
            "run_tflops": sum(r["flops"] for r in rows) / sum(r["estep_s"] for r in rows) / 1e12,
            "late_tflops": (sum(r["flops"] for r in late) / sum(r["estep_s"] for r in late)
                            / 1e12 if late else float("nan")),
            "estep_s": sum(r["estep_s"] for r in rows), "mstep_s": sum(r["mstep_s"] for r in rows),
            "reseed_on": "gpu" if job.reseed_device is not None else "host",
            "images": "device" if resident else "host",
            **({"mstep_profile": slowest[1]} if profile_mstep else {})}


def _stage_profile(job, pools, images, xp, resident=None) -> dict:
    """The E-step over the pools again (results not stored) with a device synchronisation
    at every stage boundary: seconds per stage, largest first, and the E-step's tallies."""
    prof = job.estep_context(xp)
    prof._profiling = True
    run_pools(prof, job, pools, images, resident=resident)
    prof.finish()
    return dict(sorted(((k, round(v, 4)) for k, v in prof.profile.items()),
                       key=lambda kv: -kv[1])), dict(prof.tally)


def _kernel_profile(job, pools, images, xp, resident=None, top: int = 25) -> dict:
    """The E-step over the pools again (results not stored) under PyTorch's profiler, which
    records every kernel, copy and memset the process puts on the device (CUPTI; CuPy's and
    cuBLAS's alike). Returns the E-step's wall time, the device's busy time (the union of the
    kernels', copies' and memsets' intervals), their count, and the ``top`` kernel names by
    time: whether a pool is bound by the device's work or by the host that queues it.
    Needs torch (installed on the GPU machine); without it, ``{"error": ...}``."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except Exception as exc:  # a missing profiler is reported, not raised
        return {"error": repr(exc)}
    try:
        # the host's activity too: the record_function ranges of _host_regions (the stages
        # and calls that idle time is charged to) are recorded only with it
        r = _traced_estep(job, pools, images, xp, resident, top, profile,
                          [ProfilerActivity.CPU, ProfilerActivity.CUDA])
        # what the E-step adds to the device memory at its peak: the E-step once more (not
        # traced) with CuPy's pool emptied of cached blocks first, its held bytes after
        # (blocks are kept once allocated)
        mp = xp.get_default_memory_pool()
        _sync(xp)
        mp.free_all_blocks()
        held = mp.total_bytes()
        ctx = job.estep_context(xp)
        run_pools(ctx, job, pools, images, resident=resident)
        ctx.finish()
        _sync(xp)
        r["peak_bytes"] = int(mp.total_bytes() - held)
        r["peak_bytes_per_particle"] = int(r["peak_bytes"] / max(len(p) for p in pools))
        return r
    except Exception as exc:  # keep the run going: the profile is an extra
        return {"error": repr(exc)}


def _host_profile(job, pools, images, xp=None, resident=None, top: int = 30) -> str:
    """The E-step over the pools again under cProfile: the host's functions by own time,
    then the E-step's own functions by cumulative time (launches, waits at syncs)."""
    import cProfile
    import io
    import pstats

    if xp is None:
        import cupy as xp
    ctx = job.estep_context(xp)
    _sync(xp)
    prof = cProfile.Profile()
    prof.enable()
    run_pools(ctx, job, pools, images, resident=resident)
    ctx.finish()
    _sync(xp)
    prof.disable()
    text = io.StringIO()
    st = pstats.Stats(prof, stream=text)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats("cryonb", top)
    return text.getvalue()


class _host_regions:
    """Name the host's work in a profiled E-step: each stage between two of the context's
    ``_mark`` calls (a zero-length ``mark:STAGE`` range at its end) and each call of a
    function of ``cryonb.kernels``, ``cryonb.ctf`` or ``cryonb.backend`` made by
    ``cryonb.em._estep`` (a range of its name), for :func:`_idle_by_region`."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.saved: dict = {}

    def __enter__(self):
        from torch.autograd.profiler import record_function

        import cryonb.em._estep as mod

        def marked(stage, _orig=self.ctx._mark):
            with record_function(f"mark:{stage}"):
                pass
            return _orig(stage)

        def wrap(name, fn):
            def inner(*args, **kw):
                with record_function(f"call:{name}"):
                    return fn(*args, **kw)
            return inner

        self.ctx._mark = marked
        for name, fn in vars(mod).items():  # functions only: classes keep their methods
            if inspect.isfunction(fn) and fn.__module__.startswith(
                    ("cryonb.kernels", "cryonb.ctf", "cryonb.backend")):
                self.saved[name] = fn
                setattr(mod, name, wrap(name, fn))
        return self

    def __exit__(self, *exc):
        import cryonb.em._estep as mod

        for name, fn in self.saved.items():
            setattr(mod, name, fn)
        self.ctx.__dict__.pop("_mark", None)
        return False


def _idle_by_region(gaps, events, top: int = 25) -> dict:
    """The device's idle time (``gaps``, (start, end) in the trace's microseconds) charged
    to what the host was doing meanwhile: the E-step's stage (the next ``mark:STAGE`` range
    after the moment) and the innermost ``call:NAME`` range around it (``own code`` where
    none), from the ranges :class:`_host_regions` records."""
    marks = sorted(float(e["ts"]) for e in events if str(e.get("name", "")).startswith("mark:"))
    mark_names = {float(e["ts"]): e["name"][5:] for e in events
                  if str(e.get("name", "")).startswith("mark:")}
    calls = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"][5:])
                   for e in events if e.get("ph") == "X"
                   and str(e.get("name", "")).startswith("call:"))
    by_stage: dict = {}
    by_call: dict = {}
    total = 0.0
    for a, b in gaps:
        cuts = sorted({a, b, *(t for c in calls for t in c[:2] if a < t < b),
                       *(t for t in marks if a < t < b)})
        for lo, hi in itertools.pairwise(cuts):
            mid = 0.5 * (lo + hi)
            i = bisect.bisect_left(marks, mid)
            stage = mark_names[marks[i]] if i < len(marks) else "finish and after"
            inner = [c for c in calls if c[0] <= mid < c[1]]
            call = max(inner)[2] if inner else "own code"
            dt = (hi - lo) / 1e3
            total += dt
            by_stage[stage] = by_stage.get(stage, 0.0) + dt
            key = f"{stage} / {call}"
            by_call[key] = by_call.get(key, 0.0) + dt
    rank = sorted(by_call.items(), key=lambda kv: -kv[1])[:top]
    return {"total_ms": round(total, 3), "gaps": len(gaps),
            "by_stage_ms": {k: round(v, 3) for k, v in
                            sorted(by_stage.items(), key=lambda kv: -kv[1])},
            "by_call_ms": {k: round(v, 3) for k, v in rank}}


def _traced_estep(job, pools, images, xp, resident, top, profile, activities) -> dict:
    """The body of :func:`_kernel_profile`."""
    import tempfile

    ctx = job.estep_context(xp)
    _sync(xp)
    with tempfile.TemporaryDirectory() as d:
        with profile(activities=activities) as prof, _host_regions(ctx):
            t0 = time.perf_counter()
            run_pools(ctx, job, pools, images, resident=resident)
            ctx.finish()
            _sync(xp)
            wall = time.perf_counter() - t0
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        text = path.read_text()
        keep = os.environ.get("CRYONB_TRACE_DIR")
        if keep:  # the whole trace, gzipped, for a look at the timeline elsewhere
            import gzip

            Path(keep).mkdir(parents=True, exist_ok=True)
            dest = Path(keep) / f"estep_trace_{time.strftime('%H%M%S')}.json.gz"
            dest.write_bytes(gzip.compress(text.encode()))
        events = json.loads(text).get("traceEvents", [])
    dev = [e for e in events if e.get("ph") == "X"
           and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in dev)
    busy, end = 0.0, -np.inf
    gaps = []  # the device's idle intervals between its first and last operation
    for a, b in spans:  # union of the intervals (streams may overlap)
        if b > end:
            if end > -np.inf and a > end:
                gaps.append((end, a))
            busy += b - max(a, end)
            end = b
    by_name: dict = {}
    for e in dev:
        name = e.get("name", "?")[:90]
        n, t = by_name.get(name, (0, 0.0))
        by_name[name] = (n + 1, t + float(e.get("dur", 0)))
    cats: dict = {}
    api: dict = {}  # the host's calls into CUDA (launches, copies, waits, allocations)
    for e in events:
        if e.get("ph") == "X":
            cats[e.get("cat", "?")] = cats.get(e.get("cat", "?"), 0) + 1
            if e.get("cat") in ("cuda_runtime", "cuda_driver"):
                n, t = api.get(e.get("name", "?"), (0, 0.0))
                api[e.get("name", "?")] = (n + 1, t + float(e.get("dur", 0)))
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    calls = sorted(api.items(), key=lambda kv: -kv[1][1])[:12]
    return {"wall_s": round(wall, 4), "device_busy_s": round(busy / 1e6, 4),
            "idle": _idle_by_region(gaps, events),
            "device_ops": len(dev), "span_s": round((spans[-1][1] - spans[0][0]) / 1e6, 4)
            if spans else 0.0, "categories": cats,
            "top": [{"name": k, "count": n, "ms": round(t / 1e3, 3)} for k, (n, t) in ranked],
            "host_calls": [{"name": k, "count": n, "ms": round(t / 1e3, 3)}
                           for k, (n, t) in calls]}


def estep_throughput(star, K: int, psi_step: float, pool: int, iterations: int = 2,
                     scatter: bool = False, variants: bool = True,
                     pool_sweep=(), host_profile: bool = False, threads=()) -> dict:
    """Time the E-step on the GPU for one pool size, after ``iterations`` warm-up iterations.

    The model comes from running a few real iterations (so that significant sets have the
    size they have mid-run); the timed E-step then processes every particle once.
    """
    import cupy

    job = _job(star, K, psi_step, iterations + 1, pool)
    # the timed E-step is a late one, TF32; the warm-up iterations float32-accurate (as with
    # this grid's earlier results, whatever the default --tf32_from)
    job.config.tf32_from = 0.5
    xp = cupy
    for it in range(1, iterations + 1):
        ctx = job.estep_context(xp)
        for p in job.pools(pool, it):
            job.store_results(p, ctx.expectation(job.make_batch(job.batch_meta(p),
                                                                job.table.images(p))))
        job.maximize(ctx.finish().to_host())
    pools, images, pageable = _pinned_pools(job, pool, iterations + 1)
    # the faster of two runs: the first after a shape change also pays for growing CuPy's
    # memory pool (it made the first shape of a grid up to 30% slower than when run later)
    ctx, dt = min((_timed_estep(job, pools, images) for _ in range(2)), key=lambda r: r[1])
    dt_pageable = _timed_estep(job, pools, pageable)[1] if variants else float("nan")
    del pageable
    # the same E-step as in the first part of a run (--tf32_from): the coarse product as
    # three TF32 products (float32's accuracy)
    assert ctx.precision in ("tf32", "float32"), ctx.precision
    tf32_from, job.config.tf32_from = job.config.tf32_from, 1.0
    try:
        ctx3, dt_3x = min((_timed_estep(job, pools, images) for _ in range(2)),
                          key=lambda r: r[1])
        assert ctx3.precision in ("3xtf32", "float32"), ctx3.precision
        del ctx3
    finally:
        job.config.tf32_from = tf32_from
    # several host threads sharing the GPU, each with its own stream (--j on one device); the
    # pools are split further where there are fewer than two per thread
    by_threads = {}
    for nt in threads:
        pp, im = pools, images
        if len(pools) < 2 * nt:
            pp, im, _ = _pinned_pools(job, -(-job.n // (2 * nt)), iterations + 1)
        try:
            streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(nt)]
            # the first run grows the streams' memory pools; the best of the next two counts
            by_threads[nt] = round(job.n / min(_timed_estep_threads(job, pp, im, streams)
                                               for _ in range(3)), 1)
        except Exception as exc:  # keep the other measurements
            by_threads[nt] = repr(exc)
        del pp, im
    c = ctx.coarse
    flops = coarse_flops(job, ctx)
    # the same E-step again with a device synchronisation at every stage boundary: where the
    # time goes, and the matrix product's own rate
    stages, tally = _stage_profile(job, pools, images, xp)
    gemm_s = stages.get("coarse: matrix product", 0.0)
    # the back-projection sums all as atomic adds, then all as sparse products (by default
    # each call chooses by samples per accumulator row)
    from cryonb.kernels import _sampled

    forced = {"atomic": float("nan"), "sparse": float("nan")}
    for how in forced if variants else ():
        _sampled.SUMS_METHOD = how
        try:
            forced[how] = _timed_estep(job, pools, images)[1]
        finally:
            _sampled.SUMS_METHOD = None
    dt_atomic, dt_sparse = forced["atomic"], forced["sparse"]
    scatter_calls = scatter_choice(job, pools, images) if scatter else None
    profile = _host_profile(job, pools, images) if host_profile else None
    sweep = {}
    for ps in pool_sweep:  # the same E-step with other pool sizes (same model)
        pp, im, _ = _pinned_pools(job, ps, iterations + 1)
        _timed_estep(job, pp, im)  # warm-up: CuPy's memory pool grows to the new size
        sweep[ps] = round(job.n / _timed_estep(job, pp, im)[1], 1)
        del pp, im
    return {"K": K, "psi_step": psi_step, "pool": pool, "n": job.n, "box": job.N,
            "coarse_size": c.size, "current_size": ctx.fine.size,
            "translations": int(c.phases.shape[0]), "rotations": int(c.refs.shape[0]),
            "seconds": dt, "particles_per_s": job.n / dt, "precision": ctx.precision,
            "particles_per_s_3xtf32": job.n / dt_3x,
            "coarse_tflops_achieved_3xtf32": flops / dt_3x / 1e12,
            "particles_per_s_atomic_sums": job.n / dt_atomic,
            "particles_per_s_sparse_sums": job.n / dt_sparse,
            "particles_per_s_pageable_images": job.n / dt_pageable,
            "coarse_tflops_achieved": flops / dt / 1e12,
            "coarse_product_tflops": flops / gemm_s / 1e12 if gemm_s > 0 else None,
            "stages_s": stages, "tally": tally,
            "mean_significant": float(job.state.n_sig.mean()),
            **({"pool_sweep_particles_per_s": sweep} if sweep else {}),
            **({"threads_particles_per_s": by_threads} if by_threads else {}),
            **({"host_profile": profile} if profile else {}),
            **({"scatter_calls": scatter_calls} if scatter else {})}


def selection_timing(B: int, N: int, fraction: float = 0.999) -> dict:
    """Significant-sample selection on (B, N) log-weights: a sort per row vs the radix select.

    The sort-based selection is :func:`cryonb.kernels.significant_samples_reference` on CuPy
    arrays; both masks are compared.
    """
    import cupy
    from cupyx.profiler import benchmark

    from cryonb.kernels import significant_samples, significant_samples_reference

    rng = cupy.random.default_rng(0)
    lw = (rng.standard_normal((B, N), dtype=cupy.float32) * 8).astype(cupy.float32)

    def by_sort():
        return significant_samples_reference(lw, fraction)

    t_sort = float(np.median(benchmark(by_sort, n_repeat=3, n_warmup=1).gpu_times))
    t_sel = float(np.median(benchmark(lambda: significant_samples(lw, fraction), n_repeat=5,
                                      n_warmup=1).gpu_times))
    same = float((by_sort() == significant_samples(lw, fraction)).mean())
    return {"B": B, "N": N, "sort_s": t_sort, "select_s": t_sel, "same_fraction": same}


def iteration_time(star, K: int, iterations: int, pool: int = 0, j: int = 1,
                   resident: bool = True) -> dict:
    """Whole iterations with the runtime (one rank, ``j`` threads on GPU 0); ``resident``:
    whether the worker keeps the images on the device (``CRYONB_RESIDENT_IMAGES``)."""
    from cryonb.em import Class2DConfig
    from cryonb.parallel import run_class2d
    from cryonb.parallel.resident import RESIDENT_ENV

    out = Path(star).parent / f"iter_{K}_{j}_{int(resident)}" / "run"
    cfg = Class2DConfig(i=str(star), o=str(out), K=K, iter=iterations, psi_step=10,
                        offset_range=5, offset_step=2, random_seed=0, gpu="0", j=j,
                        pool=pool)
    before = os.environ.get(RESIDENT_ENV)
    os.environ[RESIDENT_ENV] = "1" if resident else "0"
    try:
        t0 = time.perf_counter()
        res = run_class2d(cfg)
        total = time.perf_counter() - t0
    finally:
        if before is None:
            os.environ.pop(RESIDENT_ENV)
        else:
            os.environ[RESIDENT_ENV] = before
    per = [round(it.wall_s, 3) for it in res.stats.iterations if it.iteration > 0]
    estep = [round(it.stages.get("estep", 0.0), 3) for it in res.stats.iterations
             if it.iteration > 0]
    ranks = res.stats.rank_totals()
    return {"K": K, "iterations": iterations, "total_s": total, "per_iteration_s": per,
            "estep_s": estep, "stages_s": res.stats.stage_totals(), "pool": res.pool,
            "threads": j, "resident": resident,
            "read_s": round(sum(t.read_s for t in ranks.values()), 3),
            "stored": sum(t.stored for t in ranks.values())}


def _pool(spec: str, n: int, box: int, K: int, psi: float, star=None, per_rank: int = 2) -> int:
    """The E-step grid's pool size for ``--pool`` (see :func:`main`); ``star``: the set, for
    its pixel size (the coarse window in the memory estimate, as a run counts it);
    ``per_rank``: pools per rank (``auto_pool``'s; 1 once the images are stored)."""
    if spec != "auto":
        return int(spec)
    import cupy

    from cryonb.em import Class2DConfig
    from cryonb.io import read_particles
    from cryonb.parallel.pools import auto_pool

    apix = float(read_particles(star).pixel_sizes[0]) if star is not None else None
    cfg = Class2DConfig(i="x", o="y", K=K, psi_step=psi, offset_range=5, offset_step=2)
    # the free memory of a fresh run: not what CuPy's pool still holds from earlier shapes
    cupy.get_default_memory_pool().free_all_blocks()
    return auto_pool(cfg, n, box, 1, gpu=True, free_bytes=cupy.cuda.Device().mem_info[0],
                     ranks=1, pixel_size=apix, per_rank=per_rank)


def _print_scatter(box, K, psi, calls) -> None:
    """Per kind of sum: seconds each way, samples per row hit."""
    for kind in SCATTER_KINDS:
        c = [r for r in calls if r["kind"] == kind]
        if not c:
            continue
        at, spr, rows = (sum(r[k] for r in c) for k in ("atomic_s", "sparse_s", "rows_s"))
        per_row = [r["n"] / max(r["rows_hit"], 1) for r in c]
        rule = sum(r[r["rule"] + "_s"] for r in c)
        print(f"scatter {box} px K={K} psi {psi:g} {kind}: atomic {at:.4f} s, sparse "
              f"{spr:.4f} s, by rows {rows:.4f} s, rule {rule:.4f} s; samples per row hit "
              f"{min(per_row):.0f}-{max(per_row):.0f}, samples per call "
              f"{min(r['n'] for r in c)}-{max(r['n'] for r in c)}, rows {c[0]['acc_rows']}",
              flush=True)


def _whole_run(star, n: int, box: int, K: int, psi: float, a, results: dict,
               resident: bool = True, pool: int | None = None) -> dict:
    """:func:`run_profile` of one shape, with its fractions of the complex TF32 ceiling
    (``pool``: the pool size, default ``--pool``'s)."""
    ceiling = results["gemm"]["tf32_complex"]
    try:
        r = run_profile(star, K, psi, pool=pool or _pool(a.pool, n, box, K, psi, star),
                        iterations=a.runs, reseed_on_gpu=not a.reseed_on_host,
                        profile_mstep=a.mstep_profile, stages_at=a.stages_at,
                        resident=resident, kernels_at=a.kernels_at,
                        pool_stored=pool or _pool(a.pool, n, box, K, psi, star, per_rank=1))
    except Exception as exc:  # keep measuring the other shapes
        r = {"box": box, "K": K, "psi_step": psi, "error": repr(exc)}
        print(json.dumps(r), flush=True)
        return r
    # the complex product (B T, P) @ (P, M) counts twice the real product's flops (main)
    r["run_fraction_of_tf32_complex"] = 2 * r["run_tflops"] / ceiling
    r["late_fraction_of_tf32_complex"] = 2 * r["late_tflops"] / ceiling
    for it in r["iterations"]:
        it["fraction_of_tf32_complex"] = 2 * it["coarse_tflops"] / ceiling
        host = it.get("kernels", {}).pop("host_profile", None)
        print(json.dumps({"box": box, "K": K, **it}), flush=True)
        if host:
            print(host, flush=True)
    print(json.dumps({k: v for k, v in r.items() if k not in ("iterations", "mstep_profile")}),
          flush=True)
    print(r.get("mstep_profile", ""), flush=True)
    return r


def _runs_table(results: dict) -> list[str]:
    """Markdown lines for the whole runs (``--runs``): totals per shape, then per iteration."""
    runs = [r for r in results.get("runs", []) if "error" not in r]
    if not runs:
        return []
    lines = ["", "Whole runs, every E-step timed (`--runs`): % of the TF32 complex ceiling",
             "", "| box | K | psi step | particles | iterations | images (from iteration 2) |"
             " E-steps s | M-steps s |"
             " re-seeding on | % over the run | % over the TF32 iterations | per iteration |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        per = " ".join(f"{100 * it['fraction_of_tf32_complex']:.0f}"
                       for it in r["iterations"])
        lines.append(f"| {r['box']} | {r['K']} | {r['psi_step']:g} | {r['n']} | "
                     f"{len(r['iterations'])} | {r.get('images', 'host')} | "
                     f"{r['estep_s']:.2f} | {r['mstep_s']:.2f} | "
                     f"{r['reseed_on']} | "
                     f"{100 * r['run_fraction_of_tf32_complex']:.1f}% | "
                     f"{100 * r['late_fraction_of_tf32_complex']:.1f}% | {per} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--skip_estep", action="store_true",
                    help="only the whole iterations on RELION 5's shape (not the E-step grid)")
    ap.add_argument("--cases", default="",
                    help="E-step shapes as box:K:psi_step,... (default: the whole grid)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="--j values of the whole-iteration runs (default 1 2)")
    ap.add_argument("--skip_iterations", action="store_true",
                    help="no whole-iteration runs (only the E-step grid)")
    ap.add_argument("--pool", default="auto",
                    help="E-step pool size: 'auto' (default) for the runtime's own choice, what "
                         "a run without --pool gets (cryonb.parallel.pools.auto_pool: one rank, "
                         "the free device memory), or a number; sections of RESULTS.md before "
                         "2026-12-05's fourth session used 2048 (512 at 256 px)")
    ap.add_argument("--no_variants", action="store_true",
                    help="time the E-step only as the runtime runs it (not again with pageable "
                         "images, all-atomic and all-sparse sums)")
    ap.add_argument("--scatter", action="store_true",
                    help="also time each back-projection sum both ways (atomic adds, sparse "
                         "products) with its sizes")
    ap.add_argument("--pool_sweep", type=int, nargs="*", default=[],
                    help="also time the E-step with these pool sizes (same model)")
    ap.add_argument("--estep_threads", type=int, nargs="*", default=[],
                    help="also time the E-step with this many host threads sharing the GPU, "
                         "each with its own stream and context, e.g. 2 3 (default: none; "
                         "measured slower than one thread, RESULTS.md 2026-12-06)")
    ap.add_argument("--runs", type=int, default=0, metavar="ITER",
                    help="instead of the one-E-step grid, a whole run of ITER iterations per "
                         "shape (25: RELION's default) with every E-step timed: the fraction of "
                         "the ceiling over the run, and per iteration (run_profile)")
    ap.add_argument("--reseed_on_host", action="store_true",
                    help="with --runs: the M-step's re-seeding on the host cores (as the leader "
                         "of a run with several ranks does), not on the GPU")
    ap.add_argument("--mstep_profile", action="store_true",
                    help="with --runs: print the slowest M-step's cProfile")
    ap.add_argument("--stages_at", type=int, nargs="*", default=[],
                    help="with --runs: these iterations' E-steps once more, timed per stage")
    ap.add_argument("--kernels_at", type=int, nargs="*", default=[],
                    help="with --runs: these iterations' E-steps once more under PyTorch's "
                         "profiler: the device's busy time against the wall time, and the "
                         "kernels that take it (environment CRYONB_TRACE_DIR: also keep "
                         "each trace there, gzipped)")
    ap.add_argument("--run_pools", type=int, nargs="*", default=[],
                    help="with --runs: one run per pool size, in turns (default: --pool)")
    ap.add_argument("--particles", default="",
                    help="particles per box size, BOX:N,... (default 64:20000,128:8000,"
                         "256:2000)")
    ap.add_argument("--images", choices=("device", "host", "both"), default="device",
                    help="with --runs and for the whole iterations: images kept on the device "
                         "from iteration 2 on (the default of a GPU worker, "
                         "cryonb.parallel.resident), copied from the host every iteration "
                         "(CRYONB_RESIDENT_IMAGES=0; sections of RESULTS.md before the "
                         "eighteenth session), or both in turns")
    ap.add_argument("--iteration_set", default="10000:128:20",
                    help="the whole iterations' set and classes, N:BOX:K (default RELION 5's "
                         "shape: 10,000 x 128 px, K=20)")
    ap.add_argument("--host_profile", action="store_true",
                    help="print where the host's time goes in one E-step (cProfile)")
    ap.add_argument("--simulate_only", action="store_true",
                    help="only make the cases' sets (in $TMPDIR, reused by later calls): run it "
                         "before timed calls whose time limit should not cover the simulation")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import cupy

    results = {"card": card_name(), "date": time.strftime("%Y-%m-%d"),
               "cupy": cupy.__version__, "estep": [], "iterations": [], "runs": []}
    print("card:", results["card"], flush=True)
    results["gemm"] = gemm_ceiling(16384, 7200, 4096)
    print("GEMM ceiling (TFLOP/s):", results["gemm"], flush=True)
    results["h2d_gb_per_s"] = h2d_bandwidth() / 1e9
    print(f"host-to-device copies (pinned): {results['h2d_gb_per_s']:.1f} GB/s", flush=True)
    cases = [(128, 50, 10.0)] if a.quick else [
        (64, 50, 10.0), (64, 200, 6.0), (128, 50, 10.0), (128, 100, 6.0), (128, 200, 10.0),
        (256, 50, 10.0)]
    if a.cases:
        cases = [(int(b), int(k), float(p)) for b, k, p in
                 (c.split(":") for c in a.cases.split(","))]
    if a.skip_estep:
        cases = []
    particles = {64: 20000, 128: 8000, 256: 2000}
    particles.update({int(b): int(v) for b, v in
                      (c.split(":") for c in a.particles.split(",") if c)})
    for box, K, psi in cases:
        n = particles.get(box, 2000) // (4 if a.quick else 1)
        star = simulate(n, box, views=min(K, 50))
        if a.simulate_only:
            print(f"set of {n} x {box} px ({min(K, 50)} views): {star}", flush=True)
            continue
        if a.runs:
            for pool in a.run_pools or (None,):
                for mode in ("host", "device") if a.images == "both" else (a.images,):
                    results["runs"].append(_whole_run(star, n, box, K, psi, a, results,
                                                      resident=mode == "device", pool=pool))
            (out / "class2d_gpu.json").write_text(json.dumps(results, indent=1))
            continue
        try:
            r = estep_throughput(star, K, psi, pool=_pool(a.pool, n, box, K, psi, star),
                                 scatter=a.scatter, variants=not a.no_variants,
                                 pool_sweep=a.pool_sweep, host_profile=a.host_profile,
                                 threads=[t for t in a.estep_threads if t > 1])
            r["fraction_of_tf32"] = r["coarse_tflops_achieved"] / results["gemm"]["tf32"]
            # the cross term as the complex product (B T, P) @ (P, M) counts 8 B T M P flops,
            # twice the real [Re | Im] product's (which computes only the real part it needs)
            r["fraction_of_tf32_complex"] = (2 * r["coarse_tflops_achieved"]
                                             / results["gemm"]["tf32_complex"])
            # early iterations (3 x TF32): the useful product's flops, not the three's
            r["fraction_of_tf32_complex_3xtf32"] = (2 * r["coarse_tflops_achieved_3xtf32"]
                                                    / results["gemm"]["tf32_complex"])
            # with several host threads on the GPU: the same flops in less time
            r["fraction_of_tf32_complex_threads"] = {
                nt: r["fraction_of_tf32_complex"] * v / r["particles_per_s"]
                for nt, v in r.get("threads_particles_per_s", {}).items()
                if isinstance(v, float)}
            # the most that fraction can be while the images come from host memory each
            # iteration: the complex product's time over the float32 images' copy alone
            upload_s = n * box * box * 4 / (results["h2d_gb_per_s"] * 1e9)
            r["upload_bound_of_tf32_complex"] = (r["fraction_of_tf32_complex"] * r["seconds"]
                                                 / upload_s)
        except Exception as exc:  # keep measuring the other shapes
            r = {"box": box, "K": K, "psi_step": psi, "error": repr(exc)}
        results["estep"].append(r)
        calls = r.pop("scatter_calls", None)
        profile = r.pop("host_profile", None)
        print(json.dumps(r), flush=True)
        if profile:
            print(profile, flush=True)
        if calls:
            r["scatter_calls"] = calls
            _print_scatter(box, K, psi, calls)
        (out / "class2d_gpu.json").write_text(json.dumps(results, indent=1))
    if a.simulate_only:
        return
    for B, N in ([(256, 37800)] if a.quick else [(2048, 37800), (2048, 252000)]):
        r = selection_timing(B, N)
        results.setdefault("selection", []).append(r)
        print(json.dumps(r), flush=True)
    n, ibox, iK = (int(v) for v in a.iteration_set.split(":"))
    n = n // 4 if a.quick else n
    threads = () if a.skip_iterations else a.threads or ((1,) if a.quick else (1, 2))
    star = simulate(n, ibox, views=iK, seed=5, snr=0.05) if threads else None
    modes = ("host", "device") if a.images == "both" else (a.images,)
    for j in threads:
        for mode in modes:
            try:
                r = iteration_time(star, iK, 3 if a.quick else 5, j=j,
                                   resident=mode == "device")
            except Exception as exc:
                r = {"error": repr(exc), "threads": j, "resident": mode == "device"}
            r.update(n=n, box=ibox)
            results["iterations"].append(r)
            print(json.dumps(r), flush=True)
            (out / "class2d_gpu.json").write_text(json.dumps(results, indent=1))
    lines = [f"card: {results['card']}, {results['date']}, CuPy {results['cupy']}",
             f"GEMM ceiling: FP32 {results['gemm']['fp32']:.0f} TFLOP/s, "
             f"TF32 {results['gemm']['tf32']:.0f} TFLOP/s, "
             f"complex64 TF32 {results['gemm']['tf32_complex']:.0f} TFLOP/s, the E-step's "
             f"own product {results['gemm']['cross_products']:.0f} TFLOP/s; "
             f"host-to-device copies {results['h2d_gb_per_s']:.1f} GB/s",
             "", "| box | K | psi step | particles | E-step particles/s | (atomic sums) |"
             " (sparse sums) | (pageable images) | coarse TFLOP/s | % of TF32 |"
             " % of TF32 complex | product alone TFLOP/s | significant samples |"
             " bound from the upload | early iterations (3 x TF32): particles/s |"
             " % of TF32 complex | more host threads: particles/s (% of TF32 complex) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["estep"]:
        if "error" in r:
            lines.append(f"| {r['box']} | {r['K']} | {r['psi_step']} | error: {r['error']} ||||")
            continue
        lines.append(f"| {r['box']} | {r['K']} | {r['psi_step']} | {r['n']} | "
                     f"{r['particles_per_s']:.0f} | {r['particles_per_s_atomic_sums']:.0f} | "
                     f"{r['particles_per_s_sparse_sums']:.0f} | "
                     f"{r['particles_per_s_pageable_images']:.0f} | "
                     f"{r['coarse_tflops_achieved']:.1f} | "
                     f"{100 * r['fraction_of_tf32']:.1f}% | "
                     f"{100 * r['fraction_of_tf32_complex']:.1f}% | "
                     f"{r['coarse_product_tflops'] or 0:.0f} | {r['mean_significant']:.0f} | "
                     f"{100 * r['upload_bound_of_tf32_complex']:.0f}% | "
                     f"{r['particles_per_s_3xtf32']:.0f} | "
                     f"{100 * r['fraction_of_tf32_complex_3xtf32']:.1f}% | "
                     + ", ".join(f"{nt}: {v:.0f} "
                                 f"({100 * r['fraction_of_tf32_complex_threads'][nt]:.1f}%)"
                                 if isinstance(v, float) else f"{nt}: {v}"
                                 for nt, v in r.get("threads_particles_per_s", {}).items())
                     + " |")
    lines += _runs_table(results)
    for r in results["iterations"]:
        lines.append(f"\n{n} x {ibox} px, K={iK}, psi 10, offsets 5/2, --j {r.get('threads')}, "
                     f"images {'on the device' if r.get('resident') else 'from the host'}: "
                     + (f"{np.mean(r['per_iteration_s'][1:] or r['per_iteration_s']):.2f} s "
                        f"per iteration ({r['per_iteration_s']}; E-steps {r['estep_s']}; "
                        f"reading {r['read_s']:.2f} s; {r['stored']} particles not read)"
                        if "error" not in r else f"error {r['error']}"))
    (out / "class2d_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
