"""The parallel runtime: ipyparallel engines as MPI-style ranks, RELION's parallel options.

Layer 4: imports :mod:`cryonb.em`, :mod:`cryonb.io` and :mod:`cryonb.backend`, never widgets
or views.

Running
    :func:`run_class2d` (and :func:`run_class2d_async`) -> :class:`RunResult`: rank 0 leads,
    ranks 1..N-1 work with ``--j`` threads each, pools handed out on demand; ``--ranks 1``
    runs in the calling process. See :mod:`cryonb.parallel.runtime`.
    :func:`run_autopick` and :func:`run_extract` -> :class:`AllRanksResult`: every rank works
    on a fixed block of micrographs (RELION's ``divide_equally``), one device per rank; see
    :mod:`cryonb.parallel.autopick`.
Devices
    :func:`parse_gpu_spec`, :func:`resolve_device_map` -> :class:`DeviceMap` (RELION's
    ``--gpu`` grammar, strict); :mod:`cryonb.parallel.hardware` (NVML identity by UUID,
    pinning before the first CUDA call).
Cluster
    :func:`start_cluster`, :func:`connect_cluster` -> :class:`ClusterHandle`.
I/O and sums
    :mod:`cryonb.parallel.images` (``parallel``, ``leader``, ``preread``, ``scratch``),
    :mod:`cryonb.parallel.combine` (``network``, ``disc``; fixed order of summation),
    :func:`auto_pool`.
Observability
    :mod:`cryonb.parallel.stats`: progress events, :class:`RunStats` per rank and stage,
    :func:`load_figures` (heartbeats for :class:`cryonb.viz.LoadMonitor`).
"""

from __future__ import annotations

from ._errors import RankError
from .autopick import AllRanksResult, autopick_device_map, run_autopick, run_extract
from .cluster import ClusterHandle, connect_cluster, start_cluster
from .devices import (
    DeviceAssignment,
    DeviceMap,
    GpuSpecError,
    parse_gpu_spec,
    resolve_device_map,
)
from .images import check_preread_memory
from .pools import auto_pool, pool_memory
from .runtime import RunResult, run_class2d, run_class2d_async
from .stats import IterationStats, RankInfo, RankTimes, RunStats, load_figures

__all__ = [
    "AllRanksResult",
    "ClusterHandle",
    "DeviceAssignment",
    "DeviceMap",
    "GpuSpecError",
    "IterationStats",
    "RankError",
    "RankInfo",
    "RankTimes",
    "RunResult",
    "RunStats",
    "auto_pool",
    "autopick_device_map",
    "check_preread_memory",
    "connect_cluster",
    "load_figures",
    "parse_gpu_spec",
    "pool_memory",
    "resolve_device_map",
    "run_autopick",
    "run_class2d",
    "run_class2d_async",
    "run_extract",
    "start_cluster",
]
