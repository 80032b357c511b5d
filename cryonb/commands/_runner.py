"""Running a job from the command line: progress bars, Ctrl-C, the closing report.

The first Ctrl-C stops the run cleanly after the pools being computed (the last complete
iteration's files stay on disc); a second one aborts. Under RELION's pipeline control, its
``RELION_JOB_ABORT_NOW`` file stops the run the same way (:mod:`._pipeline`).
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading

__all__ = ["ProgressPrinter", "run_job"]


class ProgressPrinter:
    """A ``progress`` callback that draws one tqdm bar per iteration (particles done).

    Parameters
    ----------
    file : file-like
        Where bars and messages go (default ``sys.stderr``).
    quiet : bool
        Only warnings.
    """

    def __init__(self, file=None, quiet: bool = False):
        self.file = file or sys.stderr
        self.quiet = quiet
        self.bar = None
        self.n = 0
        self.iterations = 0

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def __call__(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == "setup":
            self.n, self.iterations = ev["n_particles"], ev["iterations"]
            if not self.quiet:
                self._print(ev["device_table"])
                what = "GPU" if ev["gpu"] else "CPU"
                self._print(f"{self.n} particles, pools of {ev['pool']} per thread, "
                            f"{ev['io_mode']} I/O, {ev['combine']} combine, {what} path, "
                            f"engines: {ev['engines']}")
                for line in ev.get("scratch", []):
                    self._print(line)
            for w in ev["warnings"]:
                if not w.startswith(("scratch:",)):
                    self._print(f"warning: {w}")
        elif kind == "stage" and ev["state"] == "start" and ev["stage"] in ("init", "estep"):
            self._close()
            if not self.quiet:
                from tqdm.auto import tqdm

                it = ev["iteration"]
                desc = "initial model" if ev["stage"] == "init" else \
                    f"iteration {it}/{self.iterations}"
                self.bar = tqdm(total=self.n, desc=desc, unit="ptcl", file=self.file,
                                leave=True, dynamic_ncols=True)
        elif kind == "stage" and self.bar is not None:
            if ev["state"] == "start":
                self.bar.set_postfix_str(ev["stage"])
            elif ev["stage"] == "stop":
                self.bar.set_postfix_str("stopping")
        elif kind == "pool" and self.bar is not None:
            self.bar.update(ev["n"])
        elif kind == "iteration":
            if self.bar is not None:
                h = ev["history"]
                parts = [f"{ev['stats']['wall_s']:.1f} s"]
                if "current_resolution" in h:
                    parts.append(f"resolution {h['current_resolution']:.1f} A")
                if "avg_pmax" in h and ev["iteration"] > 0:
                    parts.append(f"pmax {h['avg_pmax']:.3f}")
                self.bar.set_postfix_str(", ".join(parts))
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_job(run, config, *, quiet: bool = False, **kwargs):
    """Run ``run(config, progress=..., stop_event=..., **kwargs)`` with bars and Ctrl-C.

    Returns
    -------
    The run's result.
    """
    from ._pipeline import ABORT_NOW, active

    printer = ProgressPrinter(quiet=quiet)
    control = active()  # RELION's pipeline control: its abort request stops the run too
    stop = threading.Event()
    fut: cf.Future = cf.Future()

    def target():
        try:
            fut.set_result(run(config, progress=printer, stop_event=stop, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)

    def watch_abort() -> None:
        if control is not None and not stop.is_set() and control.abort_requested():
            stop.set()
            printer._print(f"{control.folder / ABORT_NOW} found: "
                           "stopping after the pools being computed")

    watch_abort()  # a request already there stops the run before its first iteration
    # a daemon thread, so that a second Ctrl-C can leave without waiting for it
    threading.Thread(target=target, name="cryonb-run", daemon=True).start()
    try:
        while True:
            try:
                return fut.result(timeout=0.5)
            except cf.TimeoutError:
                watch_abort()
                continue
            except KeyboardInterrupt:
                if stop.is_set():
                    raise
                stop.set()
                if control is not None:  # a run stopped by hand has not succeeded
                    control.aborted = True
                printer._print("stopping after the pools being computed "
                               "(Ctrl-C again to abort)")
    finally:
        printer._close()
