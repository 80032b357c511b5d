"""2D references for autopicking: reading, rescaling, masking, rotated Fourier transforms.

What ``AutoPicker::initialise`` (RELION 3.1) does to the references, in order:

1. read them (an MRC stack, or a STAR file naming ``index@stack`` images);
2. estimate the particle diameter from them unless it is given;
3. rescale them to the micrograph pixel size when ``angpix_ref != angpix`` (Fourier
   cropping/padding of the box, :func:`resize_images_fourier`);
4. multiply them by -1 with ``--invert``;
5. multiply them by the circular particle mask ``r^2 < R^2`` with
   ``R = ROUND(diameter / (2 angpix)) - shrink_particle_mask`` (pixels);
6. put each, centred, into a micrograph-sized box and keep its 2x oversampled Fourier transform
   up to the low-pass radius, from which rotated copies are interpolated (bilinear).

Step 6 is done here without the micrograph-sized FFT: the oversampled transform of a ``B x B``
image zero-padded to ``2S`` is computed only where it is needed, as two small DFT matrix
products (:meth:`PickTemplates.oversampled_grid`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import array_module, to_numpy
from ..data.conventions import inplane_matrix
from ..errors import ConfigError, InputError
from ..fourier import fft2_centered, ifft2_centered

__all__ = [
    "PickTemplates",
    "estimate_particle_diameter",
    "read_references",
    "relion_fourier_rows",
    "relion_round",
    "resize_images_fourier",
    "synchronized",
]

_PADDING = 2  # RELION's Projector default oversampling


def relion_round(x: float) -> int:
    """RELION's ``ROUND``: to the nearest integer, halves away from zero."""
    return int(x + 0.5) if x > 0 else int(x - 0.5)


# ----------------------------------------------------------------------------- reading
def _stack_images(path: Path) -> tuple[np.ndarray, float | None]:
    from ..io import read_mrc

    vol = read_mrc(path)
    data = vol.data
    assert data is not None
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim == 3 and not vol.is_stack and data.shape[0] > 1:
        raise InputError(
            f"is a 3D map ({data.shape[0]} x {data.shape[1]} x {data.shape[2]}), not a stack of "
            "2D references: project it first (e.g. relion_project), or rename a stack of "
            "images to .mrcs", path)
    if data.ndim != 3:
        raise InputError(f"holds data of shape {data.shape}, not 2D references", path)
    return np.ascontiguousarray(data, dtype=np.float32), vol.voxel_size


def _star_images(path: Path) -> tuple[np.ndarray, float | None]:
    from ..io import parse_image_name, read_star, resolve_stack_path

    blocks = read_star(path)
    found = [(name, df, label) for name, df in blocks.items()
             for label in ("rlnReferenceImage", "rlnImageName") if label in df.columns]
    if not found:
        raise InputError("no block has rlnReferenceImage or rlnImageName: give the 2D "
                         "references as an MRC stack or a STAR file naming their images", path)
    name, df, label = found[0]
    if not len(df):
        raise InputError(f"data_{name} lists no references", path)
    particle_columns = [c for c in ("rlnMicrographName", "rlnCoordinateX") if c in df.columns]
    if label == "rlnImageName" and particle_columns:
        raise InputError(f"data_{name} has {' and '.join(particle_columns)}: this is a particle "
                         "STAR file, not references; give the class averages "
                         "(Class2D/jobNNN/run_it025_classes.mrcs) or a Select job's "
                         "class_averages.star", path)
    cache: dict[Path, tuple[np.ndarray, float | None]] = {}
    images, sizes = [], []
    for row, value in enumerate(df[label].astype(str)):
        index0, stack = parse_image_name(value, row=row, path=path)
        where = resolve_stack_path(stack, path)
        if where not in cache:
            cache[where] = _stack_images(where)
        data, apix = cache[where]
        if index0 >= len(data):
            raise InputError(f"{label} row {row} {value!r}: {stack} holds {len(data)} images",
                             path)
        images.append(data[index0])
        sizes.append(apix)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(f"the references have different sizes {sorted(shapes)}", path)
    known = [s for s in sizes if s]
    return np.stack(images), (known[0] if known else None)


#: more references than this are warned about (a particle stack given as --ref?)
MANY_REFERENCES = 200


def read_references(path) -> tuple[np.ndarray, float | None]:
    """Read 2D references for autopicking.

    Parameters
    ----------
    path : str or os.PathLike
        An MRC stack (``.mrcs``; e.g. RELION's ``run_it025_classes.mrcs``) or single image, or a
        STAR file with ``rlnReferenceImage`` or ``rlnImageName`` (``index@stack``) per reference.

    Returns
    -------
    refs : numpy.ndarray of shape (K, B, B), float32
        Origin at ``B // 2``. Their grey values must be in units of the micrograph noise
        sigma (see :mod:`cryonb.pick`).
    pixel_size : float or None
        From the MRC header, if it gives one.

    Raises
    ------
    InputError
        Missing or unreadable files, a 3D map, non-square or differently sized references.
    """
    p = Path(path)
    if p.suffix.lower() == ".star":
        refs, apix = _star_images(p)
    else:
        refs, apix = _stack_images(p)
    if refs.shape[-1] != refs.shape[-2]:
        raise InputError(f"the references are {refs.shape[-2]} x {refs.shape[-1]} (y x x): "
                         "they must be square", p)
    if refs.shape[-1] < 4:
        raise InputError(f"the references are only {refs.shape[-1]} pixels wide", p)
    if not np.all(np.isfinite(refs)):
        raise InputError("the references hold NaN or infinite values", p)
    if len(refs) > MANY_REFERENCES:
        warnings.warn(f"{p}: {len(refs)} references; picking time grows with their number "
                      "(a few to a few dozen class averages are usual): is it a particle "
                      "stack?", UserWarning, stacklevel=2)
    return refs, apix


# ----------------------------------------------------------------------------- geometry
def estimate_particle_diameter(refs: np.ndarray, pixel_size: float) -> float:
    """RELION's estimate of the particle diameter from the references (Angstrom).

    On the centre row of each reference, the first pixel that differs from the corner value
    (by more than 1e-6) and the last one before the value returns to it bound the particle;
    the mean width over the references times the pixel size is the diameter.

    Parameters
    ----------
    refs : array of shape (K, B, B)
    pixel_size : float
        Angstrom per reference pixel.
    """
    refs = np.asarray(refs, dtype=np.float64)
    widths = []
    for ref in refs:
        corner = ref[0, 0]
        row = ref[ref.shape[0] // 2]
        first, last = 0, row.size - 1
        found_first = found_last = False
        for j, v in enumerate(row):
            if not found_first:
                if abs(v - corner) > 1e-6:
                    first, found_first = j, True
            elif not found_last and abs(v - corner) < 1e-6:
                last, found_last = j - 1, True
        widths.append(last - first)
    return float(np.mean(widths)) * float(pixel_size)


def resize_images_fourier(images, new_box: int):
    """Resample images to another box size by Fourier cropping or zero-padding.

    RELION's ``resizeMap``: the transform (forward normalised by the number of pixels) is
    windowed to ``new_box`` and transformed back, so grey values keep their scale and the
    centre ``B // 2`` stays the centre ``new_box // 2``.

    Parameters
    ----------
    images : array of shape (..., B, B), real
    new_box : int

    Returns
    -------
    array of shape (..., new_box, new_box), float32
    """
    xp = array_module(images)
    b = images.shape[-1]
    if new_box == b:
        return images.astype(xp.float32, copy=True)
    f = fft2_centered(xp.asarray(images, dtype=xp.float32))
    out = xp.zeros((*images.shape[:-2], new_box, new_box // 2 + 1), dtype=f.dtype)
    if new_box < b:  # crop: every element of the smaller transform
        ky = relion_fourier_rows(new_box)
        out[...] = f[..., ky % b, : new_box // 2 + 1]
    else:  # pad: RELION copies only the disc of the smaller transform
        ky = relion_fourier_rows(b)
        kx = np.arange(b // 2 + 1)
        disc = xp.asarray(ky[:, None] ** 2 + kx[None, :] ** 2 <= (b // 2) ** 2)
        out[..., ky % new_box, : b // 2 + 1] = xp.where(disc, f, 0)
    return ifft2_centered(out, new_box)


def relion_fourier_rows(n: int) -> np.ndarray:
    """Frequency ``ky`` of each row of a half-plane transform, as RELION indexes it.

    Rows ``0 .. n // 2`` hold ``ky = 0 .. n // 2`` and the others ``ky = row - n``: for even
    ``n`` RELION's Nyquist row is ``+n/2`` (NumPy's ``fftfreq`` calls it ``-n/2``).

    Returns
    -------
    numpy.ndarray of shape (n,), int64
    """
    i = np.arange(n)
    return np.where(i < n // 2 + 1, i, i - n).astype(np.int64)


@dataclass
class PickTemplates:
    """References prepared for picking on micrographs of one pixel size.

    Build with :meth:`from_references`. Arrays are NumPy (host); device copies of the rotated
    transforms are made on demand by :meth:`rotated_points` and cached per device.

    Attributes
    ----------
    refs : numpy.ndarray of shape (K, B, B), float32
        Rescaled to the micrograph pixel size, inverted if asked, multiplied by the particle
        mask. Origin at ``B // 2``.
    pixel_size : float
        Micrograph pixel size (Angstrom), which the references now have.
    particle_diameter : float
        Angstrom (given, or estimated from the references).
    radius2 : int
        Squared mask radius ``R^2`` in pixels: the particle is ``r^2 < R^2``, the local
        background ``r^2 >= R^2`` (inside the ``B x B`` box).
    n_in, n_bg : int
        Pixels of the particle and background masks.
    cache_bytes : int
        Most memory (per process, all devices) kept for rotated transforms (default 1 GiB);
        beyond it they are recomputed for every micrograph.
    """

    refs: np.ndarray
    pixel_size: float
    particle_diameter: float
    radius2: int
    n_in: int
    n_bg: int
    cache_bytes: int = 1 << 30
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def box(self) -> int:
        """Reference box size ``B`` (pixels, after rescaling)."""
        return int(self.refs.shape[-1])

    @property
    def n_refs(self) -> int:
        """Number of references ``K``."""
        return int(self.refs.shape[0])

    @classmethod
    def from_references(cls, refs, pixel_size: float, *, ref_pixel_size: float | None = None,
                        particle_diameter: float | None = None, invert: bool = False,
                        shrink_particle_mask: int = 2) -> PickTemplates:
        """Prepare references as ``relion_autopick`` does (module docstring, steps 2-5).

        Parameters
        ----------
        refs : array of shape (K, B, B) or (B, B)
            In units of the micrograph noise sigma.
        pixel_size : float
            Micrograph pixel size (A).
        ref_pixel_size : float, optional
            Reference pixel size (A); default ``pixel_size``.
        particle_diameter : float, optional
            Mask diameter (A); default estimated by :func:`estimate_particle_diameter`.
        invert : bool
            Multiply the references by -1 (``--invert``: dark particles in the micrographs).
        shrink_particle_mask : int
            Pixels taken off the mask radius (RELION's ``--shrink_particle_mask``).

        Raises
        ------
        ConfigError
            A diameter larger than the box, or a mask radius below one pixel.
        """
        refs = np.asarray(to_numpy(refs), dtype=np.float32)
        if refs.ndim == 2:
            refs = refs[np.newaxis]
        if refs.ndim != 3 or refs.shape[-1] != refs.shape[-2] or not refs.shape[0]:
            raise ConfigError(f"references must be a (K, B, B) stack, not shape {refs.shape}")
        ref_apix = float(ref_pixel_size or pixel_size)
        if particle_diameter is None or particle_diameter <= 0:
            particle_diameter = estimate_particle_diameter(refs, ref_apix)
        if particle_diameter > refs.shape[-1] * ref_apix:
            raise ConfigError(
                f"--particle_diameter {particle_diameter:g} A is larger than the reference box "
                f"({refs.shape[-1]} px x {ref_apix:g} A = {refs.shape[-1] * ref_apix:g} A)")
        if abs(ref_apix - pixel_size) > 1e-3:
            b = refs.shape[-1]
            new_box = 2 * relion_round((b // 2) * ref_apix / pixel_size)
            if new_box < 4:
                raise ConfigError(f"rescaling the {b}-pixel references from {ref_apix:g} to "
                                  f"{pixel_size:g} A/px leaves a box of {new_box} pixels")
            refs = resize_images_fourier(refs, new_box)
            if new_box > b:
                refs = refs * np.float32(b / new_box)
        if invert:
            refs = -refs
        r = relion_round(particle_diameter / (2.0 * pixel_size)) - int(shrink_particle_mask)
        if r < 1:
            raise ConfigError(
                f"the particle mask radius is {r} pixels (--particle_diameter "
                f"{particle_diameter:g} A at {pixel_size:g} A/px, minus --shrink_particle_mask "
                f"{shrink_particle_mask}): give a larger diameter")
        b = refs.shape[-1]
        r2 = _box_radius2(b)
        inside = r2 < r * r
        refs = np.where(inside, refs, np.float32(0)).astype(np.float32)
        return cls(refs, float(pixel_size), float(particle_diameter), r * r,
                   int(inside.sum()), int((~inside).sum()))

    def masks(self, size: int, xp=np):
        """Particle and background masks, centred in a ``size x size`` box.

        Returns
        -------
        inside, background : arrays of shape (size, size), float32
            Ones where ``r^2 < R^2`` (resp. ``r^2 >= R^2`` within the ``B x B`` box centred on
            ``size // 2``), zeros elsewhere.
        """
        b = self.box
        r2 = _box_radius2(b)
        lo = size // 2 - b // 2
        inside = xp.zeros((size, size), xp.float32)
        background = xp.zeros((size, size), xp.float32)
        inside[lo:lo + b, lo:lo + b] = xp.asarray(r2 < self.radius2, dtype=xp.float32)
        background[lo:lo + b, lo:lo + b] = xp.asarray(r2 >= self.radius2, dtype=xp.float32)
        return inside, background

    def oversampled_grid(self, k: int, size: int, r_max: int) -> np.ndarray:
        """2x oversampled transform of reference ``k`` centred in a ``size`` box.

        Parameters
        ----------
        k : int
            Reference index.
        size : int
            Micrograph box ``S`` the references are put in.
        r_max : int
            Radius (pixels of the ``S`` box) up to which transforms are kept (RELION's
            ``current_size / 2``).

        Returns
        -------
        numpy.ndarray of shape (2G + 3, G + 2), complex64
            ``G = ROUND(2 r_max)``. Element ``[G + 1 + jy, jx]`` is
            ``sum_p ref_k(p) exp(-2 pi i (jx px + jy py) / (2 S)) / S^2`` for ``p`` the
            pixel position from the box centre (RELION's normalisation), zero where
            ``jx^2 + jy^2 > G^2`` as in RELION's ``Projector``; one extra ring of zeros
            bounds the interpolation.
        """
        g = relion_round(_PADDING * r_max)
        b = self.box
        p = np.arange(b, dtype=np.float64) - b // 2
        jx = np.arange(g + 2, dtype=np.float64)
        jy = np.arange(-(g + 1), g + 2, dtype=np.float64)
        ex = np.exp(-2j * np.pi * np.outer(p, jx) / (_PADDING * size))  # (B, G+2)
        ey = np.exp(-2j * np.pi * np.outer(jy, p) / (_PADDING * size))  # (2G+3, B)
        grid = (ey @ self.refs[k].astype(np.float64) @ ex) / float(size) ** 2
        keep = jx[None, :] ** 2 + jy[:, None] ** 2 <= g * g
        return np.where(keep, grid, 0).astype(np.complex64)

    def rotated_transforms(self, k: int, size: int, downsize: int, psi, xp=np):
        """Rotated transforms of reference ``k`` on the low-pass grid (bilinear interpolation).

        RELION's ``Projector::get2DFourierTransform`` for ``Euler_angles2matrix(0, 0, psi)``:
        the value at ``q = (kx, ky)`` is the oversampled transform (:meth:`oversampled_grid`
        with ``r_max = downsize // 2``) at ``2 A^T q`` with ``A = inplane_matrix(psi)``, read
        through Friedel symmetry where its x is negative; zero beyond ``|q| > downsize / 2``.

        Parameters
        ----------
        k : int
            Reference index.
        size : int
            Micrograph box ``S`` (frequencies are in pixels of that box).
        downsize : int
            ``d``: the grid returned is ``d x (d // 2 + 1)``.
        psi : sequence of float
            In-plane angles (degrees).
        xp : module
            Where the result lives (``numpy`` or ``cupy``, current device).

        Returns
        -------
        array of shape (P, d, d // 2 + 1), complex64
            Half-plane transforms, rows in RELION's order (:func:`relion_fourier_rows`).
            Cached per device and arguments while the cache holds at most
            ``cache_bytes`` (the same transforms serve every micrograph of a run).
        """
        key = (xp.__name__, _device_id(xp), k, size, downsize, tuple(np.round(psi, 9)))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        r_max = downsize // 2
        disc, i00, fx, fy, neg, nx = self._interpolation(size, downsize, psi, xp)
        flat = xp.asarray(self.oversampled_grid(k, size, r_max)).reshape(-1)
        vals = ((1 - fy) * ((1 - fx) * flat[i00] + fx * flat[i00 + 1])
                + fy * ((1 - fx) * flat[i00 + nx] + fx * flat[i00 + nx + 1]))
        vals = xp.where(neg, xp.conj(vals), vals)
        out = xp.zeros((len(psi), downsize * (downsize // 2 + 1)), dtype=xp.complex64)
        out[:, disc] = vals
        out = out.reshape(len(psi), downsize, downsize // 2 + 1)
        used = sum(int(v.nbytes) for k_, v in self._cache.items() if k_[0] != "geometry")
        if used + out.nbytes <= self.cache_bytes:
            self._cache[key] = synchronized(out)
        return out

    def _interpolation(self, size: int, downsize: int, psi, xp):
        """Where the rotated low-pass grid samples the oversampled one (same for every
        reference): flat corner index, fractions, Friedel flags (cached per device)."""
        key = ("geometry", xp.__name__, _device_id(xp), size, downsize,
               tuple(np.round(psi, 9)))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        r_max = downsize // 2
        g = relion_round(_PADDING * r_max)
        ky = relion_fourier_rows(downsize)[:, None]
        kx = np.arange(downsize // 2 + 1)[None, :]
        disc = np.flatnonzero((kx**2 + ky**2 <= r_max**2).ravel())
        q = np.stack(np.broadcast_arrays(kx, ky), -1).reshape(-1, 2)[disc]  # (n, 2) = (kx, ky)
        a = xp.asarray(_PADDING * inplane_matrix(np.asarray(psi, dtype=np.float64)))
        qx, qy = (xp.asarray(v, dtype=xp.float64)[None, :] for v in q.T)
        cx = qx * a[:, 0, 0, None] + qy * a[:, 1, 0, None]  # (P, n): 2 A^T q
        cy = qx * a[:, 0, 1, None] + qy * a[:, 1, 1, None]
        neg = cx < 0
        cx, cy = xp.where(neg, -cx, cx), xp.where(neg, -cy, cy)
        bx, by = xp.floor(cx), xp.floor(cy)
        nx = g + 2
        i00 = (by.astype(xp.int64) + (g + 1)) * nx + bx.astype(xp.int64)
        hit = (xp.asarray(disc), i00, (cx - bx).astype(xp.float32),
               (cy - by).astype(xp.float32), neg, nx)
        self._cache[key] = synchronized(hit)
        return hit


def synchronized(value):
    """``value`` once the work making it on the current CUDA stream is done (NumPy: as is).

    Device arrays cached for other threads must be complete: each thread of a rank works on its
    own stream, and another stream could otherwise read them half-written.
    """
    arrays = value if isinstance(value, tuple) else (value,)
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()
            break
    return value


def _box_radius2(b: int) -> np.ndarray:
    """Squared distance of every pixel of a ``b x b`` box from its centre ``b // 2``."""
    ax = np.arange(b) - b // 2
    return ax[:, None] ** 2 + ax[None, :] ** 2


def _device_id(xp) -> int:
    if xp is np:
        return -1
    return int(xp.cuda.Device().id)
