"""One run started from a panel: on the kernel's event loop (a notebook) or in a thread.

The job itself always runs in a worker thread (or on the engines); what differs is where its
progress events are handled. In a notebook the Run button's callback runs on the kernel's
asyncio loop: the run is then an asyncio task and events arrive on that loop, so the kernel
stays responsive and widgets and views update from the loop. Without a running loop (a
script, a test) a supervising thread handles them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any

from .._asyncio import loop_for

__all__ = ["RunHandle"]

_TICK = 0.5  # seconds between ticks (elapsed time, deferred view updates)


class RunHandle:
    """A run in progress.

    Parameters
    ----------
    run : callable
        ``run(config, progress=..., stop_event=...)``, blocking (thread mode).
    run_async : callable
        ``await run_async(config, progress=..., stop_event=...)`` (asyncio mode).
    config : JobConfig
    on_event : callable
        Called with each progress event.
    on_tick : callable
        Called about twice a second while the run goes on.
    on_end : callable
        Called once with ``(result, error)`` at the end (``error`` is the exception or None).
    mode : {"auto", "asyncio", "thread"}
        ``auto``: asyncio when an event loop runs in this thread.

    Attributes
    ----------
    stop_event : threading.Event
    mode : str
        The mode used.
    task : asyncio.Task or None
    thread : threading.Thread or None
    result, error
        Set at the end.
    """

    def __init__(self, run: Callable, run_async: Callable, config, *,
                 on_event: Callable[[dict], None], on_tick: Callable[[], None],
                 on_end: Callable[[Any, BaseException | None], None], mode: str = "auto"):
        if mode not in ("auto", "asyncio", "thread"):
            raise ValueError(f"mode must be 'auto', 'asyncio' or 'thread', not {mode!r}")
        self.config = config
        self.stop_event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task | None = None
        self.thread: threading.Thread | None = None
        self._run, self._run_async = run, run_async
        self._on_event, self._on_tick, self._on_end = on_event, on_tick, on_end
        self._finished = threading.Event()
        self._owner = threading.get_ident()
        loop = loop_for(mode)
        self.mode = "asyncio" if loop is not None else "thread"
        if loop is not None:
            self.task = loop.create_task(self._main_async())
        else:
            self.thread = threading.Thread(target=self._main_thread, name="cryonb-panel-run",
                                           daemon=True)
            self.thread.start()

    # ------------------------------------------------------------------ control
    @property
    def done(self) -> bool:
        """Whether the run has ended (and ``on_end`` was called)."""
        return self._finished.is_set()

    def stop(self) -> None:
        """Ask the run to stop after the work in progress."""
        self.stop_event.set()

    def wait(self, timeout: float | None = None):
        """Block until the run ends (thread mode); returns its result or raises its error.

        Raises
        ------
        RuntimeError
            In asyncio mode, from the loop's own thread (await :attr:`task` instead).
        TimeoutError
            If it has not ended within ``timeout`` seconds.
        """
        if self.mode == "asyncio" and not self.done and threading.get_ident() == self._owner:
            raise RuntimeError("the run is an asyncio task of this thread's event loop: "
                               "await handle.task instead of calling handle.wait()")
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the run did not end within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    # ------------------------------------------------------------------ the two modes
    def _end(self, result, error) -> None:
        self.result, self.error = result, error
        try:
            self._on_end(result, error)
        finally:
            self._finished.set()

    async def _main_async(self) -> None:
        job = asyncio.ensure_future(self._run_async(self.config, progress=self._on_event,
                                                    stop_event=self.stop_event))
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=_TICK)
                self._on_tick()
                if done:
                    break
        except asyncio.CancelledError:
            self.stop_event.set()
            await asyncio.wait({job})
        error = job.exception() if not job.cancelled() else asyncio.CancelledError()
        self._end(None if error else job.result(), error)

    def _main_thread(self) -> None:
        with cf.ThreadPoolExecutor(1, thread_name_prefix="cryonb-panel-job") as pool:
            fut = pool.submit(self._run, self.config, progress=self._on_event,
                              stop_event=self.stop_event)
            while True:
                try:
                    result = fut.result(timeout=_TICK)
                    error = None
                    break
                except cf.TimeoutError:
                    self._on_tick()
                except BaseException as exc:  # the job's own error, reported by on_end
                    result, error = None, exc
                    break
        self._on_tick()
        self._end(result, error)
