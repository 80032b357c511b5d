"""Combining the partial sums of threads and ranks, in a fixed order.

The E-step's sums (:class:`cryonb.em.Class2DSums`, and :class:`cryonb.em._mstep.InitSums` for
the initial pass) travel as one packed float64 vector (``to_vector``). Every path adds the
vectors in the same order, thread 0, 1, ... within a rank and then rank 1, 2, ... (rank 0 in a
run of one rank), so that the ``network`` and ``disc`` modes give bit-identical sums for the
same per-rank sums:

``network``
    Under MPI, each worker sends its vector to the leader, which receives and adds them in rank
    order (:func:`mpi_send_sum`, :func:`mpi_receive_sum`; RELION allreduces instead, because its
    workers each reconstruct some classes, while here the leader alone runs the M-step).
    Without MPI the client collects the vectors and adds them in rank order
    (:func:`ordered_sum`).
``disc`` (RELION's default, ``--dont_combine_weights_via_disc`` off)
    Each worker writes its vector atomically to ``<o>_it###_rank<r>.tmp``
    (:func:`write_rank_sum`); the leader reads and adds them in rank order and removes them
    (:func:`read_rank_sums`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import ResourceError

__all__ = [
    "MPI_CHUNK",
    "mpi_receive_sum",
    "mpi_send_sum",
    "ordered_sum",
    "rank_sum_path",
    "read_rank_sums",
    "write_rank_sum",
]

#: float64 values per MPI message (large vectors go in pieces of 128 MB)
MPI_CHUNK = 16 * 1024 * 1024
_TAG_SUMS = 32000


def ordered_sum(vectors: Iterable[np.ndarray | None], size: int | None = None, *,
                own: bool = False) -> np.ndarray:
    """Add vectors in the order given (``None`` entries are skipped).

    Parameters
    ----------
    vectors : iterable of float64 arrays of shape (m,) or None
    size : int, optional
        ``m``, for a zero result when every entry is ``None``.
    own : bool
        The caller hands the vectors over: the first one becomes the result (no copy; the
        others are added to it in place) unless it is read-only.

    Returns
    -------
    float64 array of shape (m,)
        ``((v0 + v1) + v2) + ...``: a new array (the first vector with ``own``).
    """
    total = None
    for v in vectors:
        if v is None:
            continue
        v = np.asarray(v, np.float64)
        if total is None:
            total = v if own and v.flags.writeable else v.copy()
        else:
            if v.shape != total.shape:
                raise ValueError(f"cannot add sums of {v.size} and {total.size} values")
            total += v
    if total is None:
        if size is None:
            raise ValueError("no sums to add and no size given")
        return np.zeros(size)
    return total


def rank_sum_path(root: str, kind: str, iteration: int, rank: int) -> Path:
    """``<root>_it###_rank<r>.tmp`` (``kind`` ``"init"`` adds ``_init``)."""
    extra = "_init" if kind == "init" else ""
    return Path(f"{root}_it{iteration:03d}{extra}_rank{rank}.tmp")


def write_rank_sum(root: str, kind: str, iteration: int, rank: int, vector: np.ndarray) -> str:
    """Write one rank's sum vector atomically (``.npy`` format); return the path."""
    from ..io import atomic_write

    path = rank_sum_path(root, kind, iteration, rank)
    with atomic_write(path) as fh:
        np.save(fh, np.asarray(vector, np.float64), allow_pickle=False)
    return str(path)


def read_rank_sums(root: str, kind: str, iteration: int, ranks: Iterable[int], size: int,
                   remove: bool = True) -> np.ndarray:
    """Read the ranks' files, add them in rank order, remove them.

    Raises
    ------
    ResourceError
        A file is missing or has the wrong length (naming the rank and the path).
    """
    ranks = sorted(ranks)
    paths = [rank_sum_path(root, kind, iteration, r) for r in ranks]
    total = np.zeros(size)
    for r, p in zip(ranks, paths):
        try:
            v = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ResourceError(f"rank {r}'s sums {p} cannot be read ({exc}); is the output "
                                "folder on a disc every rank sees?") from None
        if v.shape != (size,):
            raise ResourceError(f"rank {r}'s sums {p} hold {v.size} values, expected {size}")
        total += v
    if remove:
        for p in paths:
            try:
                os.unlink(p)
            except OSError:
                pass
    return total


def mpi_send_sum(comm, vector: np.ndarray, root: int = 0) -> None:
    """Send one rank's vector to ``root`` in pieces of :data:`MPI_CHUNK` values."""
    v = np.ascontiguousarray(vector, np.float64)
    for s in range(0, v.size, MPI_CHUNK):
        comm.Send(v[s : s + MPI_CHUNK], dest=root, tag=_TAG_SUMS)


def mpi_receive_sum(comm, size: int, ranks: Iterable[int]) -> np.ndarray:
    """Receive the vectors of ``ranks`` and add them in rank order (at the root)."""
    total = np.zeros(size)
    buf = np.empty(min(size, MPI_CHUNK) or 1)
    for r in sorted(ranks):
        for s in range(0, size, MPI_CHUNK):
            m = min(MPI_CHUNK, size - s)
            comm.Recv(buf[:m], source=r, tag=_TAG_SUMS)
            total[s : s + m] += buf[:m]
    return total
