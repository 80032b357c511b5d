"""Fixtures of the view tests: a small synthetic Class2D output, a map, a fake NVML."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryonb.io import write_mrc, write_star

K, N, N_PARTICLES, ITERATIONS, APIX = 4, 24, 60, 3, 2.5


def _pairs(**values) -> pd.DataFrame:
    df = pd.DataFrame({k: [v] for k, v in values.items()})
    df.attrs["star_loop"] = False  # written as _name value pairs, as RELION does
    return df


def write_class2d_iteration(root: Path, it: int, rng: np.random.Generator) -> None:
    """``<root>_it###_classes.mrcs``, ``_model.star`` and ``_data.star`` of one iteration."""
    base = f"{root}_it{it:03d}"
    classes = rng.normal(size=(K, N, N)).astype(np.float32)
    write_mrc(f"{base}_classes.mrcs", classes, APIX)
    cls = rng.integers(1, K + 1, N_PARTICLES)
    if it == ITERATIONS - 1:
        cls[cls == K] = 1  # the last class is empty in the last iteration
    pdf = np.bincount(cls - 1, minlength=K) / N_PARTICLES
    idx = np.arange(N // 2 + 1)
    inv = idx / (N * APIX)
    blocks = {
        "model_general": _pairs(rlnCurrentResolution=20.0 - it, rlnCurrentImageSize=16 + 2 * it,
                                rlnPixelSize=APIX, rlnNrClasses=K,
                                rlnLogLikelihood=1000.0 * (it + 1), rlnAveragePmax=0.1 * it),
        "model_classes": pd.DataFrame({
            "rlnReferenceImage": [f"{k + 1:06d}@{Path(base).name}_classes.mrcs"
                                  for k in range(K)],
            "rlnClassDistribution": pdf,
            "rlnEstimatedResolution": [12.0 + k for k in range(K)],
        }),
    }
    for k in range(K):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": idx, "rlnResolution": inv,
            "rlnAngstromResolution": np.where(idx > 0, 1 / np.maximum(inv, 1e-9), 999.0),
            "rlnSsnrMap": 100.0 * np.exp(-idx / (2.0 + k)),
        })
    write_star(f"{base}_model.star", blocks)
    write_star(f"{base}_data.star", {
        "optics": pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["og1", "og2"],
                                "rlnImagePixelSize": [APIX, APIX], "rlnImageSize": [N, N],
                                "rlnImageDimensionality": [2, 2]}),
        "particles": pd.DataFrame({
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(N_PARTICLES)],
            "rlnOpticsGroup": 1 + (np.arange(N_PARTICLES) % 2),
            "rlnClassNumber": cls,
            "rlnAnglePsi": rng.uniform(-180, 180, N_PARTICLES),
        }),
    })


@pytest.fixture(scope="session")
def class2d_facts() -> types.SimpleNamespace:
    """Sizes of :func:`class2d_root`'s output."""
    return types.SimpleNamespace(K=K, N=N, n_particles=N_PARTICLES, iterations=ITERATIONS,
                                 pixel_size=APIX)


@pytest.fixture(scope="session")
def class2d_root(tmp_path_factory) -> Path:
    """Root ``.../Class2D/run`` of iterations 0-2 (K=4 classes of 24 px, 60 particles)."""
    folder = tmp_path_factory.mktemp("Class2D")
    rng = np.random.default_rng(5)
    for it in range(ITERATIONS):
        write_class2d_iteration(folder / "run", it, rng)
    return folder / "run"


@pytest.fixture(scope="session")
def map_file(tmp_path_factory) -> Path:
    """A 3D map of 20 x 24 x 28 voxels (z, y, x), 1.5 A/voxel."""
    path = tmp_path_factory.mktemp("maps") / "map.mrc"
    z, y, x = np.mgrid[:20, :24, :28]
    vol = np.exp(-((z - 10) ** 2 + (y - 12) ** 2 + (x - 14) ** 2) / 30.0).astype(np.float32)
    write_mrc(path, vol, 1.5)
    return path


class FakeNvml:
    """The pynvml functions LoadMonitor calls, for ``n`` fake GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, n: int):
        self.n, self.inits, self.shutdowns, self.calls = n, 0, 0, 0

    def install(self, monkeypatch) -> None:
        import pynvml

        for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount",
                     "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
                     "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
                     "nvmlDeviceGetComputeRunningProcesses"):
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-fake-{h}".encode()

    def nvmlDeviceGetName(self, h):
        return "Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        self.calls += 1
        return types.SimpleNamespace(gpu=10 * (h + 1), memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        import os

        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**20 * 100)] if h else []


@pytest.fixture
def fake_nvml(monkeypatch):
    """Two fake GPUs behind pynvml (the process under test uses 100 MiB on GPU 1)."""
    fake = FakeNvml(2)
    fake.install(monkeypatch)
    return fake


@pytest.fixture(scope="session")
def render():
    """``render(obj)``: the bokeh model of a holoviews object (fails on any error)."""
    import holoviews as hv

    from cryonb.viz import ensure_extension

    ensure_extension()

    def _render(obj):
        return hv.render(obj, backend="bokeh")

    return _render
