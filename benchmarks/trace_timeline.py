"""Where a profiled E-step's device waited: the timeline of a trace that
``class2d_gpu.py --kernels_at`` kept (environment ``CRYONB_TRACE_DIR``).

Prints the device's longest idle gaps in time order, each with the host stage it was charged
to (the next ``mark:`` range of ``cryonb.em._estep``), the operations before and after it and
the host's CUDA calls inside it. Then, per stage, the device's busy time, its idle time and
its operations. A gap after a copy to the host with no long CUDA call inside it is the host's
own work (Python, NumPy) while the device had nothing queued. The per-stage table charges
each device operation to the stage whose host marks bracket its start: where the host runs
ahead of the device, work queued in one stage shows under a later one.

    python benchmarks/trace_timeline.py TRACE.json.gz [--gaps 25]

Runs anywhere (the trace is plain JSON): the device tool brings the file back.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from collections import Counter

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_API = ("cuda_runtime", "cuda_driver")


def load(path: str) -> list[dict]:
    """The trace's complete events (``ph == "X"``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        events = json.load(fh).get("traceEvents", [])
    return [e for e in events if e.get("ph") == "X"]


def gaps_of(device: list[dict]) -> list[tuple[float, float, str, str]]:
    """The device's idle intervals (start, end, operation before, operation after), in the
    trace's microseconds, between its first and last operation (streams may overlap)."""
    out, end, prev = [], None, ""
    for e in device:
        a = float(e["ts"])
        b = a + float(e.get("dur", 0))
        if end is not None and a > end:
            out.append((end, a, prev, e["name"][:40]))
        if end is None or b > end:
            end, prev = b, e["name"][:40]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="a trace (.json or .json.gz)")
    ap.add_argument("--gaps", type=int, default=25, help="longest gaps listed (default 25)")
    a = ap.parse_args(argv)
    events = load(a.trace)
    device = sorted((e for e in events if e.get("cat") in DEVICE), key=lambda e: e["ts"])
    if not device:
        print(f"{a.trace}: no device operations in the trace", file=sys.stderr)
        return 1
    api = sorted((e for e in events if e.get("cat") in HOST_API), key=lambda e: e["ts"])
    marks = sorted((float(e["ts"]), e["name"][5:]) for e in events
                   if str(e.get("name", "")).startswith("mark:"))
    times = [m[0] for m in marks]

    def stage(t: float) -> str:
        i = bisect.bisect_left(times, t)
        return marks[i][1] if i < len(marks) else "after the last mark"

    t0 = float(device[0]["ts"])
    gaps = gaps_of(device)
    print(f"device idle {sum(b - a for a, b, *_ in gaps) / 1e3:.2f} ms in {len(gaps)} gaps; "
          f"{len(device)} operations")
    for a0, b0, before, after in sorted(sorted(gaps, key=lambda g: g[0] - g[1])[:a.gaps]):
        inside = [x for x in api if a0 <= float(x["ts"]) < b0]
        calls = dict(Counter(x["name"] for x in inside))
        slow = [(x["name"], round(float(x.get("dur", 0)))) for x in inside
                if float(x.get("dur", 0)) > 50]
        print(f"{(a0 - t0) / 1e3:8.2f} ms  gap {(b0 - a0) / 1e3:6.3f} ms  [{stage(a0)}]  "
              f"after {before}  before {after}  host calls {calls}"
              + (f"  long {slow}" if slow else ""))
    print("\nstage (host mark) | device busy ms | device idle ms | operations")
    lo = t0
    for t, name in marks:
        ops = [e for e in device if lo <= float(e["ts"]) < t]
        busy = sum(float(e.get("dur", 0)) for e in ops) / 1e3
        idle = sum(max(0.0, min(b, t) - max(a_, lo)) for a_, b, *_ in gaps) / 1e3
        if ops or idle:
            print(f"{name[:60]:60s} | {busy:7.2f} | {idle:7.2f} | {len(ops)}")
        lo = t
    return 0


if __name__ == "__main__":
    sys.exit(main())
