"""``cryonb gpumap``: what a ``--gpu`` string means for given ranks and threads.

Prints the resolved table (rank, role, thread -> device, sharing, warnings), or with ``--json``
the map ``{"<rank>": [device per thread], ...}`` (``[]`` for the leader) for scripts. Without
``--devices`` the devices visible here are counted (NVML; no CUDA context is made) and their
UUIDs and names shown.
"""

from __future__ import annotations

import json
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "gpumap", help="show the device map of a --gpu string",
        description="Resolve RELION's --gpu device string for N ranks of T threads, exactly "
                    "as relion_refine_mpi (--job refine: rank 0 leads and has no device) or "
                    "relion_autopick_mpi (--job autopick: every rank works on one device) "
                    "would, and show what looks wrong (unused or shared devices).")
    p.add_argument("--gpu", nargs="?", const="", default="", metavar="SPEC",
                   help="the device string (':' between ranks, ',' between threads; empty = "
                        "automatic)")
    p.add_argument("--ranks", type=int, default=1, help="number of ranks (mpirun -n)")
    p.add_argument("--j", type=int, default=1, help="threads per rank")
    p.add_argument("--devices", type=int, default=None,
                   help="visible devices per host (default: count those visible here)")
    p.add_argument("--job", choices=("refine", "autopick"), default="refine",
                   help="leader/worker job (2D/3D classification, refinement) or all-ranks job")
    p.add_argument("--json", action="store_true", help="print the map as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    """Resolve and print the map."""
    from ..errors import ConfigError
    from ..parallel.devices import resolve_device_map
    from ..parallel.hardware import visible_devices

    visible = visible_devices() if args.devices is None else []
    n = len(visible) if args.devices is None else args.devices
    if n == 0 and args.gpu and args.devices is None:
        raise ConfigError("no GPU is visible here: give --devices D to see the map for D "
                          "devices per host")
    dmap = resolve_device_map(args.gpu, args.ranks, args.j, n_devices=n, job=args.job)
    if args.json:
        print(json.dumps(dmap.to_json_dict()))
        for w in dmap.warnings:
            print(f"warning: {w}", file=sys.stderr)
        return 0
    uuids = {d["index"]: d["uuid"] for d in visible} or None
    names = {d["index"]: d["name"] for d in visible} or None
    print(dmap.format_table(uuids=uuids, names=names))
    return 0
