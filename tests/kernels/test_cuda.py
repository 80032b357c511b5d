"""The kernels' compiled-function cache, with a stand-in for CuPy (runs without a GPU)."""

import sys
import types

import numpy as np
import pytest

from cryonb.kernels import _cuda, _segments


@pytest.fixture
def fake_cupy(monkeypatch):
    """A ``cupy`` module whose RawModule records what it compiles; ``device`` sets the id."""
    compiled = []
    state = {"device": 0}

    class RawModule:
        def __init__(self, code):
            self.code = code

        def get_function(self, name):
            compiled.append((self.code, name, state["device"]))
            return (self.code, name, state["device"])

    class Device:
        @property
        def id(self):
            return state["device"]

    mod = types.ModuleType("cupy")
    mod.RawModule = RawModule
    mod.cuda = types.SimpleNamespace(Device=Device)
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setattr(_cuda, "_compiled", {})
    return compiled, state


def test_compiled_once_per_source_name_and_device(fake_cupy):
    compiled, state = fake_cupy
    f = _cuda.cuda_function("src A", "k")
    assert _cuda.cuda_function("src A", "k") is f
    assert len(compiled) == 1
    _cuda.cuda_function("src A", "other")
    _cuda.cuda_function("src B", "k")
    state["device"] = 1
    g = _cuda.cuda_function("src A", "k")
    assert g == ("src A", "k", 1) and len(compiled) == 4


def test_segment_kernels_get_their_value_type(fake_cupy):
    compiled, _ = fake_cupy
    code32, name, _ = _segments._cuda_kernel("seg_argmax", np.float32)
    code64, _, _ = _segments._cuda_kernel("seg_argmax", np.float64)
    assert name == "seg_argmax"
    assert code32.startswith("#define VT float\n") and "__int_as_float" in code32
    assert code64.startswith("#define VT double\n") and "__longlong_as_double" in code64
    assert len(compiled) == 2


def test_every_kernel_source_compiles_with_nvrtc():
    """NVRTC (no GPU needed) compiles every CUDA source the kernels use, for the H100/H200."""
    from cryonb.testing.nvrtc import compile_cuda, kernel_sources, nvrtc_library
    from cryonb.testing.tools import missing

    lib = nvrtc_library()
    if lib is None:
        missing("NVRTC (pip package nvidia-cuda-nvrtc-cu12)")
    sources = kernel_sources()
    names = {n for _, n in sources}
    assert {"coarse_log_posterior", "mask_images", "shifted_ri", "significant_select",
            "seg_argmax", "seg_sum", "sampled_dot", "sampled_dot_blocks", "scatter_products",
            "residual_sums_blocks", "sampled_dot_shifted", "scatter_shifted",
            "insert2d", "window_shift", "shell_power",
            "shell_sums", "significant_compact", "scatter_rows_init", "ctf_weights",
            "row_counts", "row_order", "block_samples", "add_rows_runs", "rows_fft",
            "cols_fft"} <= names
    for src, name in sources:
        ok, log = compile_cuda(lib, src, f"{name}.cu")
        assert ok, f"{name}: {log}"


def test_nvrtc_check_catches_an_error():
    from cryonb.testing.nvrtc import compile_cuda, nvrtc_library

    lib = nvrtc_library()
    if lib is None:
        pytest.skip("NVRTC not installed (the test above reports it)")
    ok, log = compile_cuda(lib, 'extern "C" __global__ void f(float* x) { x[0] = -INFINITY; }')
    assert not ok and "INFINITY" in log
