"""Choosing ``--pool`` (particles per thread per task) and estimating its memory."""

from __future__ import annotations

import math

__all__ = ["CPU_POOL", "GPU_POOL_MAX", "GPU_POOL_MIN", "auto_pool", "gpu_pool_max",
           "pool_memory"]

#: automatic pool on the CPU (BLAS is efficient from a few hundred rows on)
CPU_POOL = 256
#: automatic pool on a GPU: as large as memory allows within these bounds (the upper one
#: grows for boxes below 128 px, see :func:`gpu_pool_max`)
GPU_POOL_MIN, GPU_POOL_MAX = 64, 4096
#: a GPU pool's float32 images may take as many bytes as GPU_POOL_MAX images of 128 px (each
#: reader thread holds a pinned buffer of one pool, and the next pool's copy another)
_GPU_POOL_IMAGE_BYTES = GPU_POOL_MAX * 128 * 128 * 4
#: device memory the E-step's fine pass may take besides the pool (its own budget)
_FINE_BUDGET = 1.5e9


def pool_memory(config, box: int, *, gpu: bool = True) -> int:
    """Bytes per particle of the E-step's coarse pass (an upper bound).

    The coarse pass of a pool of ``B`` particles holds ``B x translations x (classes x
    angles)`` float32 scores a few times over, and the particles' shifted transforms
    (``B x translations x 2P`` float32, ``P`` Fourier pixels) twice: as complex numbers and
    as ``[Re | Im]`` rows; on a GPU whose run starts with three TF32 products (``--tf32_from``)
    twice more, as those rows' two TF32 parts (:func:`cryonb.kernels.split_tf32`). The
    image size is bounded by the box.
    """
    from ..em._model import Sampling

    s = Sampling.build(config.psi_step, config.offset_range, config.offset_step, 0)
    T, M = len(s.trans), config.K * len(s.psi)
    P = math.pi * (box / 2) ** 2 / 2
    split = gpu and hasattr(config, "coarse_precision") and config.coarse_precision(1) == "3xtf32"
    return int(4 * (3 * T * M + (8 if split else 4) * T * P + 8 * box * box))


def gpu_pool_max(box: int) -> int:
    """The largest automatic GPU pool for images of ``box`` px: :data:`GPU_POOL_MAX`, or more
    below 128 px, as many as fit the bytes of 4096 images of 128 px (16,384 at 64 px).

    Late in a run a GPU pool's time is mostly fixed costs (host work and kernel launches
    that do not grow with the pool), so fewer, larger pools are faster where the images are
    small. Measured on an H100 (64 px, K=50, psi 10, 20,000 particles, 25 iterations, same
    machine): pools of 10,000 against 4,096 particles took 3.9 s of E-steps against 5.1 s,
    34% of the complex TF32 ceiling over iterations 13-25 against 19%.
    """
    return max(GPU_POOL_MAX, _GPU_POOL_IMAGE_BYTES // (4 * box * box))


def auto_pool(config, n: int, box: int, threads_total: int, *, gpu: bool,
              free_bytes: float | None = None, ranks: int | None = None) -> int:
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

    Returns
    -------
    int
        CPU: 256, at most ``n / (2 * threads_total)`` rounded up, so that every thread gets
        at least two pools to take on demand. GPU: as many particles as half the free memory
        holds (after the fine pass's own budget), between 64 and 4096 (more below 128 px:
        :func:`gpu_pool_max`), and at most
        ``n / (2 * ranks)``: on a GPU a pool's time is mostly host work under the rank's
        Python lock, nearly independent of the pool's size (measured on an H200: ~0.2 s per
        pool from 1,000 to 4,000 particles of 64 px), so the threads of one rank take turns
        and splitting a rank's share into smaller pools per thread only adds pools
        (8,000 particles, one rank: 18,000 particles/s with ``--j 1``, 5,500 with ``--j 4``
        and pools split per thread).
    """
    if gpu:
        pool = gpu_pool_max(box)
        if free_bytes is not None:
            fit = (0.5 * free_bytes - _FINE_BUDGET) / max(1, pool_memory(config, box))
            pool = int(min(pool, max(GPU_POOL_MIN, fit)))
    else:
        pool = CPU_POOL
    units = (ranks or threads_total) if gpu else threads_total
    share = math.ceil(n / max(1, 2 * units))
    return max(1, min(pool, share))
