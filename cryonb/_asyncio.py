"""Blocking jobs driven from an asyncio event loop (a notebook cell), and loop detection."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


def loop_for(mode: str) -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, when ``mode`` allows one.

    Parameters
    ----------
    mode : {"auto", "asyncio", "thread"}
        ``"thread"``: never a loop; ``"auto"``: the running loop, or ``None`` when none runs;
        ``"asyncio"``: the running loop, which must exist.

    Raises
    ------
    RuntimeError
        ``mode="asyncio"`` and no loop runs in this thread.
    """
    if mode == "thread":
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        if mode == "asyncio":
            raise RuntimeError("no asyncio event loop runs in this thread: use "
                               "mode='thread'") from None
        return None


async def run_blocking(job: Callable[..., Any], progress: Callable | None = None,
                       stop_event: threading.Event | None = None) -> Any:
    """Run ``job(progress=..., stop_event=...)`` in a worker thread and await its result.

    Parameters
    ----------
    job : callable
        Blocking; called with ``progress`` (a callable taking one event) and ``stop_event``
        (a :class:`threading.Event` it checks to end early and cleanly).
    progress : callable, optional
        Receives the job's events, on the awaiting loop (safe for widgets).
    stop_event : threading.Event, optional
        Set to stop the job; a new one when not given.

    Returns
    -------
    Whatever ``job`` returns.

    Notes
    -----
    Cancelling the awaiting task sets the stop event and waits for the job to end before the
    cancellation propagates: no thread is left writing output behind the caller's back.
    """
    loop = asyncio.get_running_loop()
    stop = stop_event if stop_event is not None else threading.Event()

    def relay(event):
        if progress is not None:
            loop.call_soon_threadsafe(progress, event)

    fut = loop.run_in_executor(None, lambda: job(progress=relay, stop_event=stop))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([fut])
        raise
