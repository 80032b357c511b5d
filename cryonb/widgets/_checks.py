"""What the panels check while the user types: the ``--gpu`` device map, the memory or disc
an I/O mode needs, the inputs. Plain functions returning text (no widgets), so that they are
tested without a browser.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import ConfigError, CryonbError

if TYPE_CHECKING:
    from ..parallel.devices import DeviceMap

__all__ = [
    "DeviceReport",
    "Line",
    "class2d_io_lines",
    "device_report",
    "file_stamp",
    "micrograph_info",
    "particle_info",
    "visible_gpus",
]

#: (level, text): level "info", "warning" or "error"
Line = tuple[str, str]


def visible_gpus() -> list[dict]:
    """GPUs the runtime could use here, found with NVML (no CUDA context is made).

    Returns
    -------
    list of dict
        :func:`cryonb.parallel.hardware.visible_devices` entries (``index``, ``uuid``,
        ``name``, ``total``, ``free``); empty when ``CRYONB_BACKEND=cpu`` or CuPy is not
        installed (the runtime then runs on the CPU whatever NVML sees).
    """
    if os.environ.get("CRYONB_BACKEND", "auto").lower() == "cpu":
        return []
    if importlib.util.find_spec("cupy") is None:
        return []
    from ..parallel.hardware import visible_devices

    return visible_devices()


@dataclass
class DeviceReport:
    """The outcome of checking a ``--gpu`` string.

    Attributes
    ----------
    ok : bool
    text : str
        The resolved table (with its warnings), or the error message (the string quoted,
        a caret line under the fault, a suggested fix).
    device_map : DeviceMap or None
        The resolved map when ``ok``.
    devices : list of dict
        The visible devices used for the check.
    """

    ok: bool
    text: str
    device_map: DeviceMap | None = None
    devices: list = field(default_factory=list)


def _as_devices(devices) -> list[dict]:
    if devices is None:
        return visible_gpus()
    if isinstance(devices, int):
        return [{"index": i, "uuid": "", "name": ""} for i in range(devices)]
    return [dict(d, index=i) for i, d in enumerate(devices)]


def _device_line(devices: list[dict]) -> str:
    if not devices:
        why = ("CRYONB_BACKEND=cpu" if os.environ.get("CRYONB_BACKEND", "").lower() == "cpu"
               else "CuPy is not installed" if importlib.util.find_spec("cupy") is None
               else "NVML sees none")
        return f"visible GPUs: none ({why}): the CPU path is used"
    items = [f"{d['index']}: {' '.join(x for x in (d.get('name'), d.get('uuid')) if x)}".rstrip()
             for d in devices]
    return f"visible GPUs ({len(devices)}): " + "; ".join(items)


def device_report(spec: str | None, ranks: int, threads: int, *, cpu: bool = False,
                  job: Literal["refine", "autopick"] = "refine", devices=None) -> DeviceReport:
    """Check a ``--gpu`` string for ``ranks`` ranks of ``threads`` threads.

    Parameters
    ----------
    spec : str or None
        The string (``None``: flag not given; ``""``: automatic).
    ranks, threads : int
    cpu : bool
        ``--cpu`` is given: every rank runs on the CPU (a non-empty ``spec`` is an error).
    job : {"refine", "autopick"}
        Leader/worker job or all-ranks job (see :func:`cryonb.parallel.resolve_device_map`).
    devices : int or list of dict, optional
        Visible devices (default: :func:`visible_gpus`); an ``int`` stands for that many
        anonymous devices (tests, planning for another machine).

    Returns
    -------
    DeviceReport
        Never raises for a bad string: the error is in ``text``.
    """
    from ..parallel.devices import GpuSpecError, parse_gpu_spec, resolve_device_map

    devs = _as_devices(devices)
    head = _device_line(devs)
    try:
        if spec:
            parse_gpu_spec(spec)  # the grammar first: its message points at the character
        if cpu and spec:
            raise ConfigError("--cpu and --gpu were both given: choose one (clear --cpu to "
                              "use the GPUs, or clear the --gpu string)")
        n = 0 if cpu else len(devs)
        dmap = resolve_device_map(spec, ranks, threads, n_devices=n, job=job)
    except (GpuSpecError, ConfigError) as exc:
        return DeviceReport(False, f"{exc}\n{head}", None, devs)
    uuids = {d["index"]: d["uuid"] for d in devs if d.get("uuid")} or None
    names = {d["index"]: d["name"] for d in devs if d.get("name")} or None
    if cpu or not devs:
        uuids = names = None
    return DeviceReport(True, f"{dmap.format_table(uuids=uuids, names=names)}\n{head}", dmap,
                        devs)


# ------------------------------------------------------------------------------ inputs
def file_stamp(path: str) -> tuple | None:
    """``(path, mtime, size)`` of an existing file (a cache key), or ``None``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _particles(stamp: tuple) -> tuple[int, int, float | None]:
    from ..io import read_particles

    table = read_particles(stamp[0])
    ps = table.pixel_sizes
    apix = float(ps[0]) if ps is not None and len(ps) and math.isfinite(ps[0]) else None
    return table.n, table.box, apix


def particle_info(path: str) -> tuple[int, int, float | None]:
    """Particles, box size and pixel size (A, None when the file gives none) of a particle
    STAR file (cached while the file is unchanged).

    Raises
    ------
    CryonbError
        The file is missing or unreadable (the message says why).
    """
    stamp = file_stamp(path)
    if stamp is None:
        raise ConfigError(f"--i {path}: no such file")
    return _particles(stamp)


@functools.lru_cache(maxsize=16)
def _micrographs(stamp: tuple, angpix: float) -> tuple[int, tuple[int, int], float]:
    from ..pick import MicrographSet

    mics = MicrographSet.read(stamp[0], angpix)
    return len(mics), mics.shape(), float(mics.pixel_size)


def micrograph_info(path: str, angpix: float = -1.0) -> tuple[int, tuple[int, int], float]:
    """Micrographs, their shape ``(y, x)`` and pixel size (A) of a micrographs STAR file.

    Raises
    ------
    CryonbError
        The file is missing or unreadable.
    """
    stamp = file_stamp(path)
    if stamp is None:
        raise ConfigError(f"--i {path}: no such file")
    return _micrographs(stamp, float(angpix))


# ------------------------------------------------------------------------------ class2d I/O
def _free_disc(folder: str) -> int:
    """Free bytes on the disc of ``folder`` (or of its nearest existing parent)."""
    p = Path(folder).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def class2d_io_lines(cfg, n: int, box: int, *, gpu: bool,
                     pixel_size: float | None = None) -> list[Line]:
    """What ``cfg``'s I/O mode, pools and combine mode need for ``n`` particles of ``box`` px
    (``pixel_size``: A/px, for the coarse pass's memory, :func:`cryonb.parallel.pool_memory`).

    Ranks are assumed on this host (``--engines auto/local/mpi``); with ``--engines attach``
    the figures are per host of the cluster.

    Returns
    -------
    list of (level, text)
    """
    from ..parallel import check_preread_memory, pool_memory
    from ..parallel.images import available_memory, format_bytes, image_bytes
    from ..parallel.pools import CPU_POOL, GPU_POOL_MIN, auto_pool, gpu_pool_max

    workers = 1 if cfg.ranks == 1 else cfg.ranks - 1
    host = socket.gethostname()
    data = image_bytes(n, box)
    who = f"{workers} worker{'s' * (workers != 1)}"
    where = "per host" if cfg.engines == "attach" else f"on this host ({host})"
    lines: list[Line] = [("info", f"data: {n} particles of {box} x {box} px = "
                                  f"{format_bytes(data)} (float32)")]
    mode = cfg.io_mode
    if mode == "parallel":
        lines.append(("info", f"parallel disc I/O: each of the {who} reads its own pools "
                              "from the stacks (memory-mapped); nothing is held up front"))
    elif mode == "leader":
        lines.append(("info", f"leader reads: rank 0 reads every image and sends it with its "
                              f"pool, {format_bytes(data)} through the network per iteration"))
    elif mode == "preread":
        avail = available_memory()
        try:
            per = check_preread_memory(n, box, {host: workers}, {host: avail})
            lines.append(("info", f"preread: every worker holds all particles in RAM, "
                                  f"{format_bytes(per)} each: {format_bytes(per * workers)} "
                                  f"for {who} {where}, {format_bytes(avail)} available"))
        except CryonbError as exc:
            lines.append(("error", str(exc)))
    elif mode == "scratch":
        need = data + 4096
        if not cfg.scratch_dir:
            lines.append(("error", "--io_mode scratch needs --scratch_dir DIR"))
        else:
            room = max(0, _free_disc(cfg.scratch_dir) - int(cfg.keep_free_scratch * 1e9))
            fit = min(n, room // max(1, image_bytes(1, box)))
            text = (f"scratch: {format_bytes(need)} copied to {cfg.scratch_dir} once per host; "
                    f"{format_bytes(room)} free there after --keep_free_scratch "
                    f"{cfg.keep_free_scratch:g} GB")
            if fit >= n:
                lines.append(("info", text + ": all particles fit"))
            else:
                lines.append(("warning", text + f": only {fit} of {n} particles fit, the "
                                                "others are read from their stacks"))
    per_particle = pool_memory(cfg, box, gpu=gpu, pixel_size=pixel_size)
    threads = workers * cfg.j
    kind = "GPU" if gpu else "host"
    if cfg.pool:
        pool = cfg.pool
        how = f"--pool {pool}"
    elif gpu:
        pool = auto_pool(cfg, n, box, threads, gpu=True, ranks=workers, pixel_size=pixel_size)
        how = (f"--pool 0: chosen at the start from each device's free memory "
               f"({GPU_POOL_MIN}-{gpu_pool_max(box)}, here at most {pool}; once all images "
               f"are on the cards, one pool per rank and card of up to "
               f"{gpu_pool_max(box, stored=True)} within half the free memory)")
    else:
        pool = auto_pool(cfg, n, box, threads, gpu=False)
        how = f"--pool 0: automatic ({CPU_POOL} on the CPU, here {pool})"
    lines.append(("info", f"E-step: {format_bytes(per_particle)} of {kind} memory per particle "
                          f"of a pool; {how} -> {format_bytes(per_particle * pool)} per thread, "
                          f"{format_bytes(per_particle * pool * threads)} for {threads} "
                          f"thread{'s' * (threads != 1)}"))
    if cfg.ranks > 1:
        how = ("through the network (MPI under --engines mpi, else through this process)"
               if cfg.combine == "network" else
               "through files <o>_it###_rank<r>.tmp in the output folder")
        lines.append(("info", f"combine: the workers' sums go to the leader {how}"))
    return lines
