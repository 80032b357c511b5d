"""Host arrays for the device's copies: page-locked memory from CuPy's pinned pool.

A fresh NumPy array of a megabyte or more is mapped lazily: its first write to each page
takes a page fault (several microseconds each on a virtual machine), and a copy from the
device into it goes through the driver's staging buffer. A pool's E-step has a few such
arrays (its columns of per-particle values up, its results down); made here from CuPy's
pinned memory pool, whose blocks are reused from pool to pool, they cost neither.
"""

from __future__ import annotations

import numpy as np

__all__ = ["host_empty", "to_host"]


def host_empty(shape, dtype, xp=np):
    """An uninitialised host array for copies to and from ``xp``'s device: pinned memory for
    CuPy (reused from CuPy's pool), ``numpy.empty`` for NumPy."""
    if xp is np:
        return np.empty(shape, dtype)
    import cupyx

    return cupyx.empty_pinned(shape, dtype)


def to_host(a, before_wait=None):
    """``a`` on the host: for a device array, a copy into page-locked memory (CuPy's pinned
    pool, reused from call to call) instead of ``a.get()``'s freshly allocated pageable
    array, whose first touch of each page (a page fault, several microseconds each on a
    virtual machine) held the host for milliseconds per MB; ``before_wait()`` is called after
    the copy is queued and before the host waits for it, so that the device still has that
    work when the host goes on.

    Returns
    -------
    numpy.ndarray
        ``a`` itself for a NumPy array; otherwise an array backed by pinned memory (returned
        to the pool when dropped).
    """
    if not hasattr(a, "get"):
        if before_wait is not None:
            before_wait()
        return np.asarray(a)
    import cupy

    pinned = host_empty(a.shape, a.dtype, cupy)
    a.get(out=pinned, blocking=False)
    copied = cupy.cuda.get_current_stream().record()
    if before_wait is not None:
        before_wait()
    copied.synchronize()
    return pinned
