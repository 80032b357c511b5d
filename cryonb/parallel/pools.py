"""Choosing ``--pool`` (particles per thread per task) and estimating its memory."""

from __future__ import annotations

import math

__all__ = ["CPU_POOL", "GPU_POOL_MAX", "GPU_POOL_MIN", "GPU_POOL_STORED", "auto_pool",
           "gpu_pool_max", "pool_memory"]

#: automatic pool on the CPU (BLAS is efficient from a few hundred rows on)
CPU_POOL = 256
#: automatic pool on a GPU: as large as memory allows within these bounds (the upper one
#: grows for boxes below 128 px, see :func:`gpu_pool_max`)
GPU_POOL_MIN, GPU_POOL_MAX = 64, 4096
#: a GPU pool's float32 images may take this many bytes, 1 GiB: 16,384 images of 128 px, 4,096
#: of 256 px (each reader thread holds a pinned buffer of one pool, and the next pool's copy
#: another, within the worker's pinned budget; from iteration 2 a GPU worker reads only what
#: its device store lacks, cryonb.parallel.resident)
_GPU_POOL_IMAGE_BYTES = 2**30
#: automatic GPU pool once a rank's images are stored on its devices: at least this many
#: particles whatever the box (the 1 GiB bound is for the pinned buffers of reading, which
#: such pools do not use; still bounded by the free device memory)
GPU_POOL_STORED = 16384


def pool_memory(config, box: int, *, gpu: bool = True, pixel_size: float | None = None,
                stored: bool = False) -> int:
    """Bytes per particle of the E-step (an upper bound,
    :func:`cryonb.em._estep.estep_bytes_per_particle`).

    The larger of two phases: preparing the images (the pool's images unless ``stored`` on
    the device, the masked images, their transforms), and the coarse pass, whose pool of
    ``B`` particles holds ``B x translations x (classes x angles)`` float32 scores a few
    times over, and the particles' shifted transforms (``B x translations x 2P`` float32,
    ``P`` Fourier pixels of the coarse window) twice: as complex numbers and as ``[Re | Im]``
    rows; on a GPU whose run starts with three TF32 products (``--tf32_from``) twice more,
    as those rows' two TF32 parts (:func:`cryonb.kernels.split_tf32`).

    The coarse window is RELION's coarse image size (:func:`cryonb.em._estep.coarse_image_size`,
    set by ``--psi_step`` and the particle's diameter, at most the box): with ``pixel_size``
    (A/px) given, ``P`` is that window's; without it, the box's (an upper bound several times
    too large: 6,434 pixels at 128 px against about 620 for psi 10 and a particle filling 0.8
    of the box, which held the automatic pool of a 128 px, K=50 run to a quarter of what fits).
    """
    from ..em._estep import coarse_image_size, estep_bytes_per_particle, mask_diameter
    from ..em._model import Sampling

    s = Sampling.build(config.psi_step, config.offset_range, config.offset_step, 0)
    T, M = len(s.trans), config.K * len(s.psi)
    size = box
    if pixel_size:
        diameter = mask_diameter(config.particle_diameter, box, pixel_size)
        size = coarse_image_size(config.psi_step, diameter, box, pixel_size, box)
    P = math.pi * (size / 2) ** 2 / 2
    split = gpu and hasattr(config, "coarse_precision") and config.coarse_precision(1) == "3xtf32"
    return estep_bytes_per_particle(T, M, P, box, split, stored)


def gpu_pool_max(box: int, stored: bool = False) -> int:
    """The largest automatic GPU pool for images of ``box`` px: as many as fit 1 GiB of
    float32 images (16,384 at 128 px, 4,096 at 256 px), at least :data:`GPU_POOL_MAX`;
    with ``stored`` (the images are on the device already: nothing to read into pinned
    buffers) at least :data:`GPU_POOL_STORED` (16,384 at 256 px).

    Late in a run a GPU pool's time is mostly fixed costs (host work and kernel launches
    that do not grow with the pool), so fewer, larger pools are faster. Measured on an H100
    (K=50, psi 10, 25 iterations, images kept on the device, same machine, in turns):
    128 px, 16,000 particles: pools of 16,000 against 4,096 took 2.4 s of E-steps against
    3.5 s, 35% of the complex TF32 ceiling over iterations 13-25 against 22% (one late
    E-step: 45 ms with the device busy 82% of it, against 77 ms and 58%); 256 px, 4,000
    particles: pools of 4,000 against 1,024, 1.3 s against 2.4 s, 11.6% against 5.9%;
    64 px, 20,000 particles: pools of 10,000 against 4,096, 3.9 s against 5.1 s, 34% against
    19% (benchmarks/RESULTS.md, 2026-12-06). The same at 256 px with the images stored
    (16,000 particles, late iterations): one pool of 16,000 against four of 4,096 took 71 ms
    against 100 ms per E-step at K=50 (2026-12-07).
    """
    cap = max(GPU_POOL_MAX, _GPU_POOL_IMAGE_BYTES // (4 * box * box))
    return max(cap, GPU_POOL_STORED) if stored else cap


def auto_pool(config, n: int, box: int, threads_total: int, *, gpu: bool,
              free_bytes: float | None = None, ranks: int | None = None,
              pixel_size: float | None = None, per_rank: int = 2) -> int:
    """The pool size used when ``--pool`` is 0.

    Parameters
    ----------
    config : Class2DConfig
    n, box : int
        Particles and box size.
    threads_total : int
        Working threads over all ranks.
    gpu : bool
    free_bytes : float, optional
        Free device memory per thread (the device's free memory divided among the threads
        of all ranks that share it).
    ranks : int, optional
        Working ranks (default: ``threads_total``). Used on GPUs, see below.
    pixel_size : float, optional
        A/px of the images: the coarse window's size in :func:`pool_memory` (without it, the
        box's, an upper bound).
    per_rank : int, optional
        GPU: pools per working rank at least (default 2, so that a rank's reader reads the
        next pool while the device computes one). Where every rank's images are stored on
        its devices (:mod:`cryonb.parallel.resident`) there is nothing to read, and the run
        asks for 1: one pool per rank where memory allows (each pool costs the host ~430
        launches and waits: on an H100, a late 128 px, K=50 E-step of two pools of 8,000
        kept the device busy only 66% of the time), up to ``gpu_pool_max(box, stored=True)``.

    Returns
    -------
    int
        CPU: 256, at most ``n / (2 * threads_total)`` rounded up, so that every thread gets
        at least two pools to take on demand. GPU: as many particles as half the free memory
        holds (after the fine pass's own budget), between 64 and :func:`gpu_pool_max`
        (16,384 at 128 px, 4,096 from 256 px; with ``per_rank=1`` at least 16,384), and at most
        ``n / (per_rank * ranks)``: on a GPU a pool's time is mostly host work under the rank's
        Python lock, nearly independent of the pool's size (measured on an H200: ~0.2 s per
        pool from 1,000 to 4,000 particles of 64 px), so the threads of one rank take turns
        and splitting a rank's share into smaller pools per thread only adds pools
        (8,000 particles, one rank: 18,000 particles/s with ``--j 1``, 5,500 with ``--j 4``
        and pools split per thread).
    """
    if gpu:
        pool = gpu_pool_max(box, stored=per_rank <= 1)
        if free_bytes is not None:
            from ..em._estep import FINE_BUDGET

            fit = (0.5 * free_bytes - FINE_BUDGET) / max(1, pool_memory(
                config, box, pixel_size=pixel_size, stored=per_rank <= 1))
            pool = int(min(pool, max(GPU_POOL_MIN, fit)))
    else:
        pool = CPU_POOL
    units = (ranks or threads_total) * max(1, per_rank) if gpu else 2 * threads_total
    share = math.ceil(n / max(1, units))
    return max(1, min(pool, share))
