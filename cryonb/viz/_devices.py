"""Which rank and thread runs on which device (from a ``--gpu`` device map).

The device map is read by its attributes (``assignments``, ``threads``, ...), so that this
module does not import :mod:`cryonb.parallel` (which starts the whole runtime).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import holoviews as hv
import pandas as pd

from ._base import holoviews, plural

if TYPE_CHECKING:
    from ..parallel.devices import DeviceMap

__all__ = ["device_layout", "device_table", "is_device_map"]


class _Assignment(NamedTuple):  # the fields of cryonb.parallel.devices.DeviceAssignment
    rank: int
    role: str
    devices: tuple[int, ...]
    mode: str


@dataclasses.dataclass
class _Ranks:
    assignments: list[Any]
    hosts: dict[int, str]
    warnings: list[str]
    title: str
    threads: int  # per rank


def is_device_map(obj: Any) -> bool:
    """Whether ``obj`` looks like a :class:`cryonb.parallel.devices.DeviceMap`."""
    return all(hasattr(obj, a) for a in ("assignments", "threads", "n_devices", "spec"))


def _ranks(device_map) -> _Ranks:
    if is_device_map(device_map):
        title = (f"--gpu '{device_map.spec}'" if device_map.spec else "--gpu (automatic)")
        title += (f": {plural(device_map.ranks, 'rank')} x "
                  f"{plural(device_map.threads, 'thread')}, "
                  f"{plural(device_map.n_devices, 'visible device')}")
        return _Ranks(list(device_map.assignments), dict(device_map.hosts or {}),
                      list(device_map.warnings), title, device_map.threads)
    if isinstance(device_map, Mapping):  # DeviceMap.to_json_dict(): {"rank": [devices]}
        given = {int(r): tuple(int(d) for d in devs) for r, devs in device_map.items()}
        ranks = sorted(given)
        out = []
        for r in ranks:
            devices = given[r]
            leader = r == 0 and not devices and len(ranks) > 1
            out.append(_Assignment(r, "leader" if leader else "worker", devices,
                                   "explicit" if devices else "none"))
        return _Ranks(out, {}, [], plural(len(ranks), "rank"), 1)
    raise TypeError(f"device_map must be a DeviceMap or a {{rank: [devices]}} mapping, not "
                    f"{type(device_map).__name__}")


def device_table(device_map: DeviceMap | Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """One row per rank and device: the threads of the rank on it and who else uses it.

    Parameters
    ----------
    device_map : DeviceMap or mapping
        From :func:`cryonb.parallel.devices.resolve_device_map`, or its
        :meth:`~cryonb.parallel.devices.DeviceMap.to_json_dict` form
        (``{"0": [], "1": [2, 2]}``).

    Returns
    -------
    pandas.DataFrame
        Columns ``rank``, ``role``, ``host``, ``device`` (``"GPU 2"``, ``"CPU"``, or
        ``"-"`` for a leader without one), ``threads`` (how many threads of the rank run
        there), ``thread ids``, ``mode`` and ``shared with`` (the other ranks on the same
        device of the same host).
    """
    info = _ranks(device_map)
    assignments, hosts = info.assignments, info.hosts
    users: dict[tuple[str, int], set[int]] = {}
    for a in assignments:
        for d in a.devices:
            users.setdefault((hosts.get(a.rank, ""), d), set()).add(a.rank)
    rows = []
    for a in assignments:
        host = hosts.get(a.rank, "")
        base = {"rank": a.rank, "role": a.role, "host": host, "mode": a.mode}
        if not a.devices:
            rows.append(base | {"device": "CPU" if a.role == "worker" else "-",
                                "threads": 0 if a.role == "leader" else info.threads,
                                "thread ids": "",
                                "shared with": ""})
            continue
        for d in sorted(set(a.devices)):
            ids = [t for t, dev in enumerate(a.devices) if dev == d]
            others = sorted(users[(host, d)] - {a.rank})
            rows.append(base | {"device": f"GPU {d}", "threads": len(ids),
                                "thread ids": ", ".join(map(str, ids)),
                                "shared with": ", ".join(map(str, others))})
    cols = ["rank", "role", "host", "device", "threads", "thread ids", "mode", "shared with"]
    return pd.DataFrame(rows, columns=cols)


def device_layout(device_map: DeviceMap | Mapping[str, Sequence[int]]) -> hv.Layout:
    """Which rank and thread runs on which device, as a heat map and a table.

    Parameters
    ----------
    device_map : DeviceMap or mapping
        See :func:`device_table`.

    Returns
    -------
    holoviews.Layout
        A heat map of threads per rank (rows) and device (columns; ``host:GPU d`` when the
        map knows hosts; ``CPU`` on a machine without devices), each cell labelled with its
        thread count; the table of :func:`device_table`; and the device map's warnings
        (unused devices, sharing, unused groups) when there are any.
    """
    holoviews()
    info = _ranks(device_map)
    table = device_table(device_map)
    used = table[table["threads"] > 0].copy()
    used["device"] = [f"{h}:{d}" if h else d for h, d in zip(used["host"], used["device"])]
    used["rank"] = [f"rank {r}" for r in used["rank"]]
    most = int(used["threads"].max()) if len(used) else 1
    heat = hv.HeatMap(used, kdims=["device", "rank"], vdims=["threads"]).opts(
        cmap="Blues", clim=(0, 1.6 * most), colorbar=False, tools=["hover"],
        title="Threads of each rank on each device", xlabel="device", ylabel="",
        invert_yaxis=True,
        frame_width=max(300, 90 * used["device"].nunique()),
        frame_height=max(80, 36 * used["rank"].nunique()))
    labels = hv.Labels(used.assign(text=[plural(t, "thread") for t in used["threads"]]),
                       kdims=["device", "rank"], vdims="text").opts(text_font_size="9pt",
                                                                    text_color="black")
    items = [heat * labels, hv.Table(table).opts(width=700, height=min(400, 32 + 26 * len(table)))]
    if info.warnings:
        text = "".join(f"<li>{html.escape(w)}</li>" for w in info.warnings)
        items.append(hv.Div(f"<b>Warnings</b><ul>{text}</ul>").opts(width=700))
    return hv.Layout(items, label=info.title).cols(1)
