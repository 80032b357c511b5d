"""The particles' masked transforms, kept on a device between iterations.

Every E-step prepares each particle image the same way: centred on its previous offset rounded
to whole pixels, masked (``--zero_mask``: the background set to the image's own weighted
mean), Fourier transformed, and its power summed per shell over the whole box; only then is
it shifted by the rest of its offset and windowed to the pass's pixels. With ``--zero_mask``
this is a linear function of the image for a given rounded offset, and the norm correction is
a factor on it: a particle whose rounded offset did not change since the last iteration has the
same transform, times the ratio of its norm corrections. Late in a run most particles keep their
rounded offset (about 80% of them from one iteration to the next on the test sets), so a GPU
worker that holds every particle's image on its device (:mod:`cryonb.parallel.resident`) also
keeps their transforms where the card has room for both: :class:`TransformCache`. On a 256 px
box the preparation (gathering the images, masking, the transform, the whole box's shell powers)
is about a sixth of a late E-step of 50 classes.

Without ``--zero_mask`` the background is new noise in every iteration, and nothing is kept.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["TransformCache", "transform_bytes"]

#: a key that no rounded offset has (marks a row whose transform is being replaced)
_STALE = np.iinfo(np.int64).min


def transform_bytes(box: int) -> int:
    """Device bytes :class:`TransformCache` takes per particle of a ``box`` px image: its
    half transform (complex64) and its shell powers (float64)."""
    return 8 * box * (box // 2 + 1) + 8 * (box // 2 + 1)


class TransformCache:
    """Each particle's masked transform at its last rounded offset, with its shell powers.

    Row ``slot[i]`` of :attr:`data` holds particle ``i``'s :func:`cryonb.fourier.fft2_centered`
    of its image centred on the rounded offset ``key[i]`` and masked, with the forward
    transform's ``1 / N^2`` and no norm correction (the E-step multiplies that in), flat;
    :attr:`power` its power per shell over the whole box. Rows are given out as particles
    arrive and kept for the run. Safe to share among a device's threads: a row's key is set
    only once its values are written (:meth:`commit`), and a row being rewritten has no key.

    Parameters
    ----------
    n : int
        Particles of the run (table rows); the cache holds all of them.
    box : int
    xp : module
        ``cupy`` (``numpy`` in the tests); the memory is taken now, on the current device.

    Raises
    ------
    cupy.cuda.memory.OutOfMemoryError
        Where the device has no room (the caller then goes without).
    """

    def __init__(self, n: int, box: int, xp):
        self.xp = xp
        self.box = int(box)
        nsh = self.box // 2 + 1
        self.data = xp.empty((int(n), self.box * nsh), xp.complex64)
        self.power = xp.empty((int(n), nsh), xp.float64)
        self._slot = np.full(int(n), -1, np.int64)
        self._key = np.full((int(n), 2), _STALE, np.int64)
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.power.nbytes)

    def lookup(self, index, rounded):
        """Rows of the particles ``index`` and which of them must be (re)computed.

        Parameters
        ----------
        index : int array of shape (B,)
            The particles (table rows), each at most once.
        rounded : int array of shape (B, 2)
            Their rounded offsets (x, y) in pixels, as the transforms are centred.

        Returns
        -------
        slots : int64 ndarray of shape (B,), host
            Each particle's row of :attr:`data` and :attr:`power`.
        fresh : bool ndarray of shape (B,), host
            The particles whose rows do not hold their transform at ``rounded``: the caller
            writes those rows, then calls :meth:`commit`.
        """
        index = np.asarray(index, np.int64)
        rounded = np.asarray(rounded, np.int64)
        with self._lock:
            slots = self._slot[index]
            new = slots < 0
            if new.any():
                slots[new] = np.arange(self._used, self._used + int(new.sum()))
                self._used += int(new.sum())
                self._slot[index[new]] = slots[new]
            fresh = (self._key[index] != rounded).any(axis=1)
            self._key[index[fresh]] = _STALE
            self.hits += int(len(index) - fresh.sum())
            self.misses += int(fresh.sum())
        return slots, fresh

    def commit(self, index, rounded) -> None:
        """Record that the rows of particles ``index`` now hold their transforms at
        ``rounded`` (call after writing them; on a GPU, on the stream that wrote them)."""
        with self._lock:
            self._key[np.asarray(index, np.int64)] = np.asarray(rounded, np.int64)

    def release(self) -> None:
        """Drop the transforms (the memory goes back to CuPy's pool)."""
        with self._lock:
            self.data = self.power = None
            self._slot[:] = -1
            self._key[:] = _STALE
            self._used = 0
