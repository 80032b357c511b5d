"""Array backends: NumPy on the CPU, CuPy on NVIDIA GPUs.

The array module is chosen per call from the data (``xp = array_module(x)``), never fixed at
import. Whether CuPy is *usable* is decided lazily, once, by touching a device: ``import cupy``
succeeds on machines without a GPU and only device calls fail there.

The environment variable ``CRYONB_BACKEND`` (``auto`` | ``cpu`` | ``gpu``) overrides the probe:
``cpu`` never uses CuPy, ``gpu`` raises if no GPU is usable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from types import ModuleType
from typing import Any

import numpy as np

from .errors import ResourceError

__all__ = [
    "add_rows_at",
    "array_module",
    "device_count",
    "fft_batch",
    "fft_module",
    "fft_threads",
    "gpu_available",
    "is_gpu_array",
    "release_device_memory",
    "to_device",
    "to_numpy",
    "usable_cores",
    "use_device",
]

_local = threading.local()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a Slurm allocation, ``taskset``),
    not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS)
        return os.cpu_count() or 1


@functools.cache
def _probe_cupy() -> tuple[bool, str]:
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed (pip install 'cryonb[gpu]')"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "no CUDA device visible"
        cupy.zeros(1, dtype=cupy.float32).sum().item()
    except Exception as exc:  # any failure means: not usable
        return False, f"CuPy cannot use a GPU here ({type(exc).__name__}: {exc})"
    return True, ""


def gpu_available() -> bool:
    """Whether a CUDA GPU is usable through CuPy (cached; honours ``CRYONB_BACKEND``).

    Returns
    -------
    bool
        ``False`` when ``CRYONB_BACKEND=cpu``, when CuPy is missing, or when no device answers.

    Raises
    ------
    ResourceError
        When ``CRYONB_BACKEND=gpu`` but no GPU is usable.
    """
    mode = os.environ.get("CRYONB_BACKEND", "auto").lower()
    if mode == "cpu":
        return False
    ok, why = _probe_cupy()
    if mode == "gpu" and not ok:
        raise ResourceError(f"CRYONB_BACKEND=gpu but {why}")
    return ok


def device_count() -> int:
    """Number of visible CUDA devices (0 without a usable GPU)."""
    if not gpu_available():
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def is_gpu_array(x: Any) -> bool:
    """True if ``x`` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(*arrays: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) of the given arrays.

    Parameters
    ----------
    *arrays
        Arrays or scalars; if any is a CuPy array the result is ``cupy``.

    Returns
    -------
    module
        ``numpy`` or ``cupy``.
    """
    for a in arrays:
        if is_gpu_array(a):
            import cupy

            return cupy
    return np


@contextlib.contextmanager
def fft_threads(n: int):
    """Host FFTs (``scipy.fft``) of the calling thread use ``n`` threads inside the block.

    The setting is per thread (``scipy.fft.set_workers``): a rank's ``--j`` threads each get
    their share of the cores, as its BLAS does. The results do not depend on ``n`` (a batch
    of transforms is split between the threads, each transform computed as before).
    """
    import scipy.fft

    with scipy.fft.set_workers(max(1, int(n))):
        yield


def fft_module(xp: ModuleType) -> ModuleType:
    """The FFT functions for arrays of ``xp`` (NumPy's ``fft`` API in both cases).

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    module
        ``scipy.fft`` for NumPy (the same pocketfft in C++, 2-5x NumPy's own on batched
        float32 forward transforms: 2000 x 64^2 0.12 s -> 0.025 s; float32 stays float32),
        ``cupy.fft`` (cuFFT) for CuPy.
    """
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def fft_batch(n: int, xp: ModuleType, at_most: int | None = None) -> int:
    """How many transforms to compute for a batch of ``n``, padding it with zeros.

    On the host ``n``. On a GPU the next power of two (at most ``at_most``, at least ``n``):
    cuFFT makes a plan for each batch size, ~20 ms each for the re-seeding's transforms on
    an H100 (0.3 s of a re-seeding check at K=100 went to plans for batches that differ from
    one check to the next); powers of two keep the sizes, and CuPy's cached plans, few.
    """
    if xp is np or n <= 1:
        return n
    m = 1 << (int(n) - 1).bit_length()
    return max(n, min(m, at_most)) if at_most else m


def to_numpy(x: Any) -> np.ndarray:
    """Copy ``x`` to host memory as a NumPy array (no copy if it already is one)."""
    if is_gpu_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x: Any, xp: ModuleType | str | None = None) -> Any:
    """Move ``x`` to the backend ``xp`` (``numpy``, ``cupy``, ``"cpu"`` or ``"gpu"``).

    With ``xp=None`` the GPU is used when available. The CuPy device is the calling thread's
    current device (see :func:`use_device`).
    """
    if isinstance(xp, str):
        xp = None if xp == "auto" else xp
        if xp == "cpu":
            return to_numpy(x)
        if xp == "gpu" and not gpu_available():
            raise ResourceError("a GPU array was asked for but no GPU is usable")
    if xp is np:
        return to_numpy(x)
    if xp is None and not gpu_available():
        return to_numpy(x)
    import cupy

    return cupy.asarray(x)


def pinned_empty(shape, dtype=np.float32, device: int | None = None) -> np.ndarray:
    """An uninitialised NumPy array in page-locked host memory (CuPy's pinned pool).

    The device copies such an array at the bus's full speed and asynchronously (an ordinary
    array is staged through a pinned buffer first, on the calling thread). Without a usable
    GPU, an ordinary array.

    Parameters
    ----------
    shape : tuple of int
    dtype : numpy dtype
    device : int, optional
        The CUDA device whose context allocates (the calling thread's current device by
        default): a thread with no device of its own passes its rank's, so that no context
        is created on another GPU.
    """
    if not gpu_available():
        return np.empty(shape, dtype)
    import cupyx

    with use_device(device):
        return cupyx.empty_pinned(shape, dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CuPy's device out-of-memory error (told by its class name, so that
    CPU-only installs need not import CuPy to ask)."""
    return type(exc).__name__ == "OutOfMemoryError"


def device_room(xp: ModuleType) -> int | None:
    """Bytes the current CUDA device can still give this process: its free memory plus the
    free blocks CuPy's memory pool holds for reuse. ``None`` on the CPU (NumPy)."""
    if xp is np:
        return None
    free, _ = xp.cuda.runtime.memGetInfo()
    return int(free + xp.get_default_memory_pool().free_bytes())


def upload(a: Any, xp: ModuleType, dtype=np.float32) -> Any:
    """``a`` as a C-contiguous ``dtype`` array of ``xp``.

    To CuPy: one host-to-device copy on the current thread's current stream (asynchronous
    when ``a`` is in pinned memory, see :func:`pinned_empty`; the caller keeps ``a`` alive until
    the stream has passed the copy, e.g. until a result was copied back). NumPy: no copy when
    ``a`` already is such an array.
    """
    if xp is np:
        return np.ascontiguousarray(a, dtype=dtype)
    if is_gpu_array(a):
        return xp.ascontiguousarray(a, dtype=dtype)
    a = np.ascontiguousarray(a, dtype=dtype)
    out = xp.empty(a.shape, dtype)
    out.set(a, stream=xp.cuda.get_current_stream())
    return out


@contextlib.contextmanager
def use_device(device: int | None):
    """Make ``device`` the current CUDA device of this thread inside the block.

    ``None`` (CPU work) is a no-op. Each thread keeps its own current device, so threads of one
    rank can drive different GPUs.
    """
    if device is None or not gpu_available():
        yield None
        return
    import cupy

    prev = getattr(_local, "device", None)
    with cupy.cuda.Device(int(device)) as dev:
        _local.device = int(device)
        try:
            yield dev
        finally:
            _local.device = prev


def release_device_memory(devices) -> None:
    """Give the memory cached by CuPy's pools on ``devices`` back to the driver.

    CuPy keeps freed device memory in a per-device pool for reuse. A run calls this when it
    ends so that the next run on the same engines (a sweep, a second job in a notebook) and
    other users of a shared GPU see that memory as free again. A no-op without CuPy in use.

    Parameters
    ----------
    devices : iterable of int
        CUDA device ordinals (as visible to this process).
    """
    import gc
    import sys

    if "cupy" not in sys.modules or not gpu_available():
        return
    import cupy

    gc.collect()  # arrays held only by reference cycles go back to the pool first
    for d in sorted(set(int(x) for x in devices)):
        with cupy.cuda.Device(d):
            cupy.cuda.Device(d).synchronize()
            cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def add_rows_at(acc, idx, rows) -> None:
    """``acc[idx[i]] += rows[i]`` for every ``i``, with repeated indices summed (in place).

    Parameters
    ----------
    acc : array of shape (M, ...)
    idx : int array of shape (n,)
    rows : array of shape (n, ...)
        Cast to ``acc.dtype`` before summing (so float32 rows add into a float64 ``acc``).

    Notes
    -----
    NumPy: rows are sorted by index and summed with ``add.reduceat`` (one pass, deterministic
    order). CuPy: atomic adds (float64 makes the order irrelevant to ~1e-16), one per run of
    equal consecutive indices into a contiguous float64 ``acc``
    (:func:`cryonb.kernels.add_rows_runs`), else ``cupy.add.at``.
    """
    xp = array_module(acc)
    if len(idx) == 0:
        return
    if xp is np:
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        starts = np.flatnonzero(np.r_[True, sidx[1:] != sidx[:-1]])
        sums = np.add.reduceat(rows[order].astype(acc.dtype, copy=False), starts, axis=0)
        acc[sidx[starts]] += sums
        return
    if acc.dtype == xp.float64 and acc.flags.c_contiguous:
        from .kernels._bins import add_rows_runs

        add_rows_runs(acc, idx, rows)
        return
    xp.add.at(acc, idx, rows.astype(acc.dtype, copy=False))
