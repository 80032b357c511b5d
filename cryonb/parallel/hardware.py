"""What a rank runs on, found without touching CUDA; pinning a rank to its devices.

Everything here runs inside the rank's own process (an ipyparallel engine, or the calling
process for a run of one rank). Devices are listed with NVML (``nvidia-ml-py``), which creates
no CUDA context, so that a rank can be pinned to its devices (``CUDA_VISIBLE_DEVICES``) before
its first CUDA call; device identity is the UUID, so that two engines on one physical GPU are
seen to share it whatever their indices.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ResourceError

__all__ = [
    "cpu_count",
    "cuda_may_be_initialised",
    "cuda_uuids",
    "describe_process",
    "device_memory",
    "gpu_utilisation",
    "limit_blas_threads",
    "mpi_world",
    "pin_devices",
    "visible_devices",
]

_ORIGINAL_VISIBLE: str | None = None  # CUDA_VISIBLE_DEVICES before the first pin
_PINNED: tuple[str, ...] | None = None  # entries pinned (CUDA may have read them already)


def cpu_count() -> int:
    """Cores this process may run on (:func:`cryonb.backend.usable_cores`)."""
    from ..backend import usable_cores

    return usable_cores()


def mpi_world() -> tuple[int, int] | None:
    """``(rank, size)`` in ``MPI.COMM_WORLD`` if this process was started by an MPI launcher.

    Read from the launcher's environment (Open MPI, MPICH/Hydra, PMIx, Slurm's PMI) so that a
    process not started under MPI never initialises MPI.
    """
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMIX_RANK", "PMIX_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    if "PMIX_RANK" in os.environ:
        from mpi4py import MPI

        return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    return None


@functools.cache
def _nvml() -> Any:
    """The initialised ``pynvml`` module, or ``None`` without an NVIDIA driver (cached)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver / library: no GPU
        return None
    return pynvml


def _text(v) -> str:
    return v if isinstance(v, str) else v.decode()


def _nvml_all() -> tuple[dict, ...]:
    """Every GPU of the host in NVML (PCI bus) order: index, uuid, name, total, free (now)."""
    nv = _nvml()
    if nv is None:
        return ()
    out = []
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                pci = _text(nv.nvmlDeviceGetPciInfo(h).busId)
            except Exception:
                pci = None
            out.append({"nvml_index": i, "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                        "name": _text(nv.nvmlDeviceGetName(h)), "total": int(mem.total),
                        "free": int(mem.free), "pci": pci})
    except Exception:
        pass
    return tuple(out)


def _bus_key(bus_id: str) -> tuple[int, str]:
    """A PCI bus id as ``(domain, "bus:device.function")``: CUDA writes the domain with 4
    hex digits, NVML with 8."""
    dom, rest = _text(bus_id).strip().lower().split(":", 1)
    return int(dom, 16), rest


def _format_uuid(raw: bytes) -> str:
    """``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` from the 16 bytes of a CUDA UUID."""
    h = bytes(raw[:16]).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _visible_entries() -> list[str] | None:
    env = _ORIGINAL_VISIBLE if _PINNED is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None
    return [e.strip() for e in env.split(",") if e.strip()]


def visible_devices() -> list[dict]:
    """The devices CUDA will number 0, 1, ... in this process, found with NVML (no CUDA call).

    Honours ``CUDA_VISIBLE_DEVICES`` as it was before :func:`pin_devices` (entries that are
    indices or UUIDs); numbering follows the PCI bus (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which
    :func:`pin_devices` sets).

    Returns
    -------
    list of dict
        ``index`` (as ``--gpu`` counts), ``uuid``, ``name``, ``total`` and ``free`` (bytes),
        ``pci`` (NVML's PCI bus id, or None),
        ``entry`` (what to put in ``CUDA_VISIBLE_DEVICES`` for it). Empty without a GPU.
    """
    devs = _nvml_all()
    entries = _visible_entries()
    if entries is None:
        chosen = [(str(d["nvml_index"]), d) for d in devs]
    else:
        chosen = []
        for e in entries:
            if e.isdigit():
                if int(e) >= len(devs):
                    break  # CUDA ignores the rest after an invalid entry
                chosen.append((e, devs[int(e)]))
            else:
                match = [d for d in devs if d["uuid"].startswith(e) or e.startswith(d["uuid"])]
                if not match:
                    break
                chosen.append((e, match[0]))
    return [{**d, "index": i, "entry": e} for i, (e, d) in enumerate(chosen)]


def cuda_may_be_initialised() -> bool:
    """Whether this process may already hold a CUDA context (then pinning cannot change it).

    True once CuPy is imported (cryonb creates contexts only through CuPy, and importing it is
    the first step of any use). A process pinned earlier but that never used CUDA, such as a
    leader rank (no device) about to work in an all-ranks job, can still be re-pinned.
    """
    return "cupy" in sys.modules


def pin_devices(devices: Sequence[int], *, leader: bool = False) -> list[int]:
    """Make this process see only its devices; call before its first CUDA call.

    Parameters
    ----------
    devices : sequence of int
        The device of each thread, as ``--gpu`` numbers them (see :func:`visible_devices`).
        Empty: the process uses no GPU.
    leader : bool
        A rank without devices: hide every GPU from it (``CUDA_VISIBLE_DEVICES=""``), so that
        nothing it does can create a context on device 0.

    Returns
    -------
    list of int
        The device index each thread must use afterwards (CUDA's numbering after the pin).

    Raises
    ------
    ResourceError
        If CUDA was initialised in this process with other devices than those asked for
        (an engine reused with another ``--gpu`` map): restart the engines.
    """
    global _ORIGINAL_VISIBLE, _PINNED
    if not devices and not leader:
        return []
    vis = visible_devices()
    want: list[str] = []
    for d in devices:
        if d >= len(vis):
            raise ResourceError(f"device {d} is not visible in this process (it sees "
                                f"{len(vis)}: CUDA_VISIBLE_DEVICES="
                                f"{os.environ.get('CUDA_VISIBLE_DEVICES')})")
        if vis[d]["entry"] not in want:
            want.append(vis[d]["entry"])
    if cuda_may_be_initialised():
        if _PINNED is None:
            return list(devices)  # CUDA numbering is still the original one
        if all(e in _PINNED for e in want):
            return [_PINNED.index(vis[d]["entry"]) for d in devices]
        raise ResourceError(
            f"this process already uses the GPUs {list(_PINNED)} and cannot switch to "
            f"{want}: restart the cluster's engines (ipyparallel: "
            f"cluster.restart_engines_sync()) to run with another --gpu map")
    if _PINNED is None:
        _ORIGINAL_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(want)
    _PINNED = tuple(want)
    return [want.index(vis[d]["entry"]) for d in devices]


def cuda_uuids(devices: Sequence[int]) -> list[str]:
    """The UUID CUDA itself gives each of ``devices`` (CUDA numbering), ``GPU-xxxxxxxx-...``.

    Confirms after :func:`pin_devices` which physical GPU each thread drives (``"?"`` where
    neither NVML nor CuPy says). The device's PCI bus id (CUDA) is looked up in NVML; only
    without NVML are CUDA's own UUID bytes used, and only when complete: CuPy hands them over
    as a C string, cut at the first zero byte (a UUID with a ``00`` byte came out as
    ``GPU-f70d8eec-e7---``, which NVML then could not find, so the device's load was missing).
    """
    import cupy

    by_bus = {}
    for e in _nvml_all():
        if e.get("pci"):
            try:
                by_bus[_bus_key(e["pci"])] = e["uuid"]
            except ValueError:
                continue
    out = []
    for d in devices:
        uuid = None
        try:
            uuid = by_bus.get(_bus_key(cupy.cuda.runtime.deviceGetPCIBusId(int(d))))
        except Exception:
            uuid = None
        if uuid is None:
            try:
                raw = bytes(cupy.cuda.runtime.getDeviceProperties(int(d))["uuid"])
                uuid = _format_uuid(raw) if len(raw) >= 16 else None
            except Exception:
                uuid = None
        out.append(uuid or "?")
    return out


def device_memory(devices: Sequence[int]) -> dict[str, int]:
    """Bytes held by CuPy's memory pool on each of ``devices`` (CUDA numbering)."""
    if "cupy" not in sys.modules or not devices:
        return {}
    import cupy

    out = {}
    pool = cupy.get_default_memory_pool()
    for d in sorted(set(devices)):
        with cupy.cuda.Device(d):
            out[str(d)] = int(pool.used_bytes())
    return out


def gpu_utilisation(uuids: Sequence[str]) -> dict[str, float]:
    """NVML's utilisation (% of time a kernel ran, over its last sample period) of each GPU.

    Parameters
    ----------
    uuids : sequence of str
        ``GPU-xxxxxxxx-...`` (:func:`cuda_uuids`); NVML finds them whatever
        ``CUDA_VISIBLE_DEVICES`` says.

    Returns
    -------
    dict of str to float
        For the GPUs NVML could read (empty without NVML).
    """
    nv = _nvml()
    out: dict[str, float] = {}
    if nv is None:
        return out
    for u in dict.fromkeys(uuids):
        # pynvml releases differ in what they take: str (nvidia-ml-py 12+) or bytes (older)
        keys = (u, u.encode()) if isinstance(u, str) else (u, _text(u))
        for key in keys:
            try:
                h = nv.nvmlDeviceGetHandleByUUID(key)
                out[_text(u)] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                break
            except Exception:
                continue
    return out


def limit_blas_threads(n: int):
    """Limit BLAS/OpenMP threads of this process to ``n`` (``threadpoolctl``); returns the
    controller (its ``restore_original_limits()`` undoes it) or ``None`` without threadpoolctl.
    """
    if importlib.util.find_spec("threadpoolctl") is None:
        return None
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=max(1, int(n)))


def describe_process() -> dict:
    """Who and where this process is, and what it could use (no CUDA call).

    Returns
    -------
    dict
        ``host``, ``pid``, ``mpi`` (``(rank, size)`` or ``None``), ``cores``, ``mem_available``
        (bytes), ``devices`` (:func:`visible_devices`), ``cupy`` (installed),
        ``cuda_initialised`` (:func:`cuda_may_be_initialised`).
    """
    from .images import available_memory

    return {"host": socket.gethostname(), "pid": os.getpid(), "mpi": mpi_world(),
            "cores": cpu_count(), "mem_available": available_memory(),
            "devices": visible_devices(),
            "cupy": importlib.util.find_spec("cupy") is not None,
            "cuda_initialised": cuda_may_be_initialised()}
