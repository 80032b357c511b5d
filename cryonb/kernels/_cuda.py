"""Compiled CUDA functions of the kernels' sources, cached per device."""

from __future__ import annotations

__all__ = ["cuda_function"]

_compiled: dict = {}


def cuda_function(src: str, name: str):
    """The function ``name`` of the CUDA source ``src``, compiled for the current CuPy device.

    Compiled (``cupy.RawModule``, NVRTC) on first use per (source, name, device); CuPy also
    keeps the binaries in its on-disc kernel cache.

    Parameters
    ----------
    src : str
        CUDA C++ source with ``extern "C" __global__`` functions.
    name : str
        The function's name.

    Returns
    -------
    cupy.RawKernel
        Call as ``f(grid, block, args)``.
    """
    import cupy

    key = (src, name, cupy.cuda.Device().id)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = cupy.RawModule(code=src).get_function(name)
    return fn
