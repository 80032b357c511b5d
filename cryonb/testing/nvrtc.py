"""Compile the kernels' CUDA sources with NVRTC on a machine without a GPU.

The GPU kernels (``cryonb/kernels/``) are CUDA C++ compiled at run time by CuPy through
NVRTC. Errors in them (an identifier NVRTC does not define, a type mismatch) would otherwise
show only on a GPU machine. NVRTC itself needs no GPU: the ``nvidia-cuda-nvrtc-cu12`` wheel
(a ``dev`` extra on Linux) has the library, which this module calls through ctypes.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["compile_cuda", "kernel_sources", "nvrtc_library"]


def nvrtc_library() -> ctypes.CDLL | None:
    """The NVRTC library of the ``nvidia-cuda-nvrtc-cu12`` wheel, or None without it."""
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        libs = sorted(glob.glob(str(Path(base) / "cuda_nvrtc" / "lib" / "libnvrtc.so*")))
        libs = [p for p in libs if ".alt." not in p]
        if libs:
            return ctypes.CDLL(libs[0])
    return None


def compile_cuda(lib: ctypes.CDLL, src: str, name: str = "kernel.cu",
                 arch: str = "compute_90") -> tuple[bool, str]:
    """Compile ``src`` to PTX with NVRTC; returns (success, the compiler's log)."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc == 0, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def kernel_sources() -> list[tuple[str, str]]:
    """Every (source, function name) the kernels compile, as they would on a GPU.

    Collected by running the kernels' compile helpers against a stand-in for CuPy that
    records what it is asked to compile (``sys.modules['cupy']`` is restored afterwards).
    """
    from ..kernels import (
        _bins,
        _coarse,
        _ctfvals,
        _cuda,
        _fine,
        _insert,
        _pose,
        _prepare,
        _sampled,
        _segments,
        _select,
        _shells,
        _transform,
    )

    seen: list[tuple[str, str]] = []

    class _Module:
        def __init__(self, code):
            self.code = code

        def get_function(self, fname):
            seen.append((self.code, fname))
            return None

    fake: Any = types.ModuleType("cupy")
    fake.RawModule = _Module
    fake.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=-1))
    saved, saved_cache = sys.modules.get("cupy"), dict(_cuda._compiled)
    sys.modules["cupy"] = fake
    try:
        for dtype in ("float32", "float64"):
            _segments._cuda_kernel("seg_argmax", dtype)
        _segments._cuda_kernel("seg_sum")
        for fname in ("sampled_dot", "scatter_products", "scatter_rows", "block_samples"):
            _sampled._cuda_kernel(fname)
        for ts, ps in ((4, 2), (1, 2)):  # the E-step's blocks (2D oversampling 1)
            _sampled._blocks_kernel(ts, ps)
            _sampled._blocks_kernel(ts, ps, "residual_sums_blocks")
            _sampled._blocks_kernel(ts, ps, "scatter_blocks")
            _sampled._blocks_kernel(ts, ps, "sampled_dot_shifted")
            _sampled._blocks_kernel(ts, ps, "scatter_shifted")
            _sampled._blocks_kernel(ts, ps, "scatter_rows_init")
        _cuda.cuda_function(_coarse._CUDA_SRC, "coarse_log_posterior")
        _cuda.cuda_function(_fine._CUDA_SRC, "fine_sample_terms")
        _cuda.cuda_function(_fine._WEIGHTS_SRC, "fine_weights")
        _cuda.cuda_function(_prepare._CUDA_SRC, "mask_images")
        _cuda.cuda_function(_ctfvals._WEIGHTS_SRC, "ctf_weights")
        _cuda.cuda_function(_prepare._SHIFT_SRC, "shifted_ri")
        _cuda.cuda_function(_prepare._WINDOW_SRC, "window_shift")
        _cuda.cuda_function(_shells._CUDA_SRC, "shell_power")
        _cuda.cuda_function(_shells._CUDA_SRC, "shell_sums")
        _cuda.cuda_function(_pose._CUDA_SRC, "pose_neighbours")
        _cuda.cuda_function(_pose._CUDA_SRC, "row_counts")
        _cuda.cuda_function(_pose._CUDA_SRC, "row_order")
        _cuda.cuda_function(_pose._REFINE_SRC, "refine_pose")
        _cuda.cuda_function(_bins._CUDA_SRC, "weighted_bincounts")
        _cuda.cuda_function(_bins._CUDA_SRC, "add_rows_runs")
        for n in _transform.FUSED_BOXES:
            _cuda.cuda_function(_transform._source(n), "rows_fft")
            _cuda.cuda_function(_transform._source(n), "cols_fft")
        _cuda.cuda_function(_transform._source(256, hold_tables=False, min_blocks=4), "cols_fft")
        _cuda.cuda_function(_select._CUDA_SRC, "significant_select")
        _cuda.cuda_function(_select._CUDA_SRC, "significant_compact")
    finally:
        _cuda._compiled.clear()
        _cuda._compiled.update(saved_cache)
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
    seen.append((_insert._CUDA_SRC, "insert2d"))
    return seen
