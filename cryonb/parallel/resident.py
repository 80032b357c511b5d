"""Particle images kept in device memory between iterations (a GPU worker's store).

Every iteration of a 2D classification reads every particle image again: from the stacks on
disc (``parallel`` I/O), from RAM (``--preread_images``) or from a scratch copy, and a GPU rank
then copies each pool over PCIe to the device. The images do not change during a run, and a
modern card holds many of them (100,000 x 256 px are 26 GB in float32; 8,000 x 128 px 0.5 GB),
so a GPU worker keeps the images it has seen in device memory (:class:`ResidentImages`, one per
device of the rank) and from then on reads and copies only the particles it has not seen.

Pools are shuffled every iteration and handed out on demand, so with several ranks each rank
sees a different part of the particles each iteration; its store fills over the first few
iterations, and a pool reads only its particles that are not stored yet. In the ``leader``
I/O mode the leader sends every pool's images each iteration, and workers store nothing.

How much it may hold (:func:`resident_capacity`): what the device has free once the rank's
first pool ran (the E-step's working memory is then taken), less a reserve for everything else
(the larger of :data:`RESERVE_BYTES` and :data:`RESERVE_FRACTION` of the card: the M-step's
work on the device, later larger pools, other processes on a shared card), at most
:data:`MAX_FRACTION` of the card, divided among the ranks that share the card. A store that
cannot get its memory is not made (the run goes on reading as before). ``CRYONB_RESIDENT_IMAGES=0``
turns it off (to compare, or on a card shared with jobs whose memory grows later).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ..backend import is_out_of_memory, upload

__all__ = ["MAX_FRACTION", "RESERVE_BYTES", "RESERVE_FRACTION", "RESIDENT_ENV", "PoolRows",
           "ResidentImages", "StoredRows", "resident_capacity", "resident_enabled"]

#: environment variable: ``0`` keeps no images on the devices
RESIDENT_ENV = "CRYONB_RESIDENT_IMAGES"
#: device memory left free besides the store: at least this many bytes ...
RESERVE_BYTES = 2 * 2**30
#: ... and at least this fraction of the card
RESERVE_FRACTION = 0.25
#: a store takes at most this fraction of the card
MAX_FRACTION = 0.5


def resident_enabled() -> bool:
    """Whether GPU workers keep images on their devices (``CRYONB_RESIDENT_IMAGES`` not 0)."""
    return os.environ.get(RESIDENT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def resident_capacity(n: int, box: int, free: int, total: int, share: float = 1.0) -> int:
    """How many images of ``box`` px a rank's store may hold on a device.

    Parameters
    ----------
    n : int
        Particles of the run (the store never needs more rows).
    box : int
    free, total : int
        The device's free and total memory in bytes, measured after the rank's first pool.
    share : float
        This rank's part of the card (1 / the ranks of the run that share it).

    Returns
    -------
    int
        ``min(free - reserve, MAX_FRACTION * total) * share`` over the bytes of one float32
        image, between 0 and ``n``; the reserve is ``max(RESERVE_BYTES, RESERVE_FRACTION *
        total)``.
    """
    reserve = max(RESERVE_BYTES, RESERVE_FRACTION * total)
    room = min(free - reserve, MAX_FRACTION * total) * max(0.0, min(1.0, float(share)))
    return int(np.clip(room // (4 * box * box), 0, n))


class PoolRows:
    """A pool's images as the reader hands them over when some are stored on the device.

    Attributes
    ----------
    index : ndarray of shape (B,), int64
        The pool's particles (table rows).
    missing : ndarray of shape (B,), bool
        Which of them were read from the image source.
    host : ndarray of shape (missing.sum(), N, N), float32, or None
        Those images, in pool order; None when every image is stored.
    """

    __slots__ = ("host", "index", "missing")

    def __init__(self, index, missing, host=None):
        self.index = np.asarray(index, np.int64)
        self.missing = np.asarray(missing, bool)
        self.host = host


class StoredRows:
    """A pool's images that are all in a device store, read where they are used.

    What :meth:`ResidentImages.assemble` gives for a pool whose every image is stored: the
    E-step's masking reads the pool's rows of the store in place
    (:func:`cryonb.kernels.mask_images_2d`'s ``rows``) instead of a gathered copy of the
    whole pool.

    Parameters
    ----------
    store : float32 array of shape (capacity, N, N)
        The store's images.
    slots : int ndarray of shape (B,), host
        The pool's rows of ``store``, in pool order.
    xp : module
    """

    __slots__ = ("slots", "store", "xp")

    def __init__(self, store, slots, xp):
        self.store, self.slots, self.xp = store, np.asarray(slots, np.int64), xp

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def shape(self) -> tuple:
        return (len(self.slots), *self.store.shape[1:])

    def __getitem__(self, sl: slice) -> StoredRows:
        return StoredRows(self.store, self.slots[sl], self.xp)

    def gather(self):
        """The images as one device array, (B, N, N)."""
        return self.xp.take(self.store, self.xp.asarray(self.slots), axis=0)

    def __array__(self, dtype=None, copy=None):
        out = self.gather()
        out = out.get() if hasattr(out, "get") else out
        return out if dtype is None else out.astype(dtype)


class ResidentImages:
    """One device's store of a rank's particle images (float32, ``(capacity, N, N)``).

    Rows are given out in the order particles arrive and never taken back during a run. Safe
    to use from the rank's threads: a row is published only after its copy completed on the
    storing thread's stream, so another thread (stream) never reads it half-written.

    Parameters
    ----------
    n : int
        Particles of the run (table rows).
    box : int
    capacity : int
        Rows of the store (:func:`resident_capacity`); the memory is taken at the first
        :meth:`add`.
    xp : module
        ``cupy`` (``numpy`` in the tests); the calling thread's current device is used.
    """

    def __init__(self, n: int, box: int, capacity: int, xp):
        self.xp = xp
        self.box = int(box)
        self.capacity = int(capacity)
        self._slot = np.full(int(n), -1, np.int64)  # row of each particle; -1 none, -2 coming
        self._used = 0
        self._store = None
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Images stored."""
        with self._lock:
            return int((self._slot >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Device memory taken by the store."""
        return 0 if self._store is None else int(self._store.nbytes)

    def missing(self, index) -> np.ndarray:
        """Which of the particles ``index`` (shape (B,)) are not stored: bool, shape (B,)."""
        with self._lock:
            return self._slot[np.asarray(index, np.int64)] < 0

    def assemble(self, rows: PoolRows):
        """The pool's images on the device, shape (B, N, N): the stored ones gathered from
        the store, the others copied from ``rows.host`` (and stored where there is room). A
        pool whose every image is stored comes as :class:`StoredRows` (read in place)."""
        xp = self.xp
        index, miss = rows.index, rows.missing
        with self._lock:
            slots = self._slot[index[~miss]]
        if (slots < 0).any():
            raise RuntimeError("a pool's image is not stored although the reader found it")
        if not miss.any():
            return StoredRows(self._store, slots, xp)
        N = self.box
        out = xp.empty((len(index), N, N), xp.float32)
        if len(slots):
            out[xp.asarray(np.flatnonzero(~miss))] = xp.take(self._store, xp.asarray(slots),
                                                             axis=0)
        read = upload(rows.host, xp)
        out[xp.asarray(np.flatnonzero(miss))] = read
        self.add(index[miss], read)
        return out

    def add(self, index, images) -> int:
        """Store those of the particles ``index`` (shape (B,)) that are not stored yet, from
        their device images ``images`` (shape (B, N, N)), while rows are left. Returns how
        many were stored."""
        xp = self.xp
        index = np.asarray(index, np.int64)
        with self._lock:
            if self._store is None and self.capacity > 0:
                try:
                    self._store = xp.empty((self.capacity, self.box, self.box), xp.float32)
                except Exception as exc:  # the card is fuller than measured: store nothing
                    if not is_out_of_memory(exc):
                        raise
                    self.capacity = 0
            free = self.capacity - self._used
            new = np.flatnonzero(self._slot[index] == -1)[:max(0, free)]
            if not len(new):
                return 0
            slots = np.arange(self._used, self._used + len(new))
            self._used += len(new)
            self._slot[index[new]] = -2
        self._store[xp.asarray(slots)] = images[xp.asarray(new)]
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()
        with self._lock:
            self._slot[index[new]] = slots
        return len(new)

    def release(self) -> None:
        """Drop the images (the memory goes back to CuPy's pool)."""
        with self._lock:
            self._store = None
            self._slot[:] = -1
            self._used = 0
            self.capacity = 0
