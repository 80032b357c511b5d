"""RELION's pipeline control (``--pipeline_control DIR``): the job's exit markers and its
abort request, as RELION's GUI, pipeliner and schedules expect them.

RELION's programs, given ``--pipeline_control Class2D/job008/``:

- remove ``RELION_JOB_EXIT_SUCCESS``, ``_FAILURE`` and ``_ABORTED`` from that folder when
  they start;
- stop when a file ``RELION_JOB_ABORT_NOW`` appears there (the GUI's "Abort" button puts it
  there), and then write ``RELION_JOB_EXIT_ABORTED``;
- write ``RELION_JOB_EXIT_SUCCESS`` when they end well and ``RELION_JOB_EXIT_FAILURE`` when
  they fail.

The pipeliner reads these files to mark a job finished, failed or aborted: without them, a
job run by another program stays "running" in the GUI for ever. cryonb does the same, with
two differences that remove RELION's traps: the value is a folder whether or not it ends
with ``/`` (RELION appends the marker's name to the string, so ``Class2D/job008`` gives
``Class2D/job008RELION_JOB_EXIT_SUCCESS``), made if missing; and an abort removes
``RELION_JOB_ABORT_NOW`` once done, as RELION asks of external programs, so that continuing
the job later does not stop it at once. An abort stops the run cleanly after the pools
being computed (as a first Ctrl-C does): the last complete iteration's files stay on disc.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ABORT_NOW", "EXIT_ABORTED", "EXIT_FAILURE", "EXIT_SUCCESS", "PipelineControl",
           "active"]

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"

_active: PipelineControl | None = None


def active() -> PipelineControl | None:
    """The pipeline control of the command being run (``None`` without one)."""
    return _active


class PipelineControl:
    """The exit markers and abort request of one command run under RELION's pipeline.

    Parameters
    ----------
    folder : str or Path
        ``--pipeline_control``'s value: the job's folder (e.g. ``Class2D/job008/``).

    Attributes
    ----------
    aborted : bool
        ``RELION_JOB_ABORT_NOW`` was seen (:meth:`abort_requested`).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.aborted = False

    def start(self) -> PipelineControl:
        """Make the folder, remove earlier exit markers, become :func:`active`.

        Raises
        ------
        OSError
            The folder cannot be made or its markers removed.
        """
        global _active
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
            (self.folder / name).unlink(missing_ok=True)
        _active = self
        return self

    def close(self) -> None:
        """No longer :func:`active`."""
        global _active
        if _active is self:
            _active = None

    def abort_requested(self) -> bool:
        """Whether ``RELION_JOB_ABORT_NOW`` is in the folder (remembered in :attr:`aborted`)."""
        if not self.aborted and (self.folder / ABORT_NOW).exists():
            self.aborted = True
        return self.aborted

    def finish(self, ok: bool) -> str:
        """Write the exit marker: aborted if the run stopped for an abort request (removing
        the request), else success or failure. Returns the marker's name."""
        if self.aborted:
            name = EXIT_ABORTED
            (self.folder / ABORT_NOW).unlink(missing_ok=True)
        else:
            name = EXIT_SUCCESS if ok else EXIT_FAILURE
        (self.folder / name).touch()
        return name
