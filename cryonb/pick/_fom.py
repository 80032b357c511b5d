"""RELION's autopicking figure of merit, and the peaks picked from it (one micrograph).

Array code, written once for NumPy and CuPy (``xp`` from the data); the only per-backend
pieces are the peak kernels of :mod:`cryonb.kernels`.

Per micrograph (RELION 3.1 ``AutoPicker::autoPickOneMicrograph``; ``S`` the micrograph side,
``ws`` the size of the figure-of-merit maps, ``d`` the low-pass size):

1. ``X`` = the micrograph with pixels beyond ``outlier_removal_zscore`` sigma set to the mean,
   z-scored with the mean and (sample) std of the original; a non-square micrograph is put in
   the middle of an ``S x S`` square whose other pixels are N(0, 1) noise.
2. Local background mean ``mu(x)`` and std ``sigma(x)`` over the background mask (the corners
   of the ``B x B`` reference box outside the particle radius ``R``), by FFT correlation.
3. For every reference and in-plane angle: the rotated transform (times the micrograph's CTF
   with ``--ctf``) up to radius ``d / 2``, and the cross-correlation
   ``CC(x) = (1 / n_in) sum_d A(d) X(x + d)`` on the ``ws`` grid.
4. From the first angle's real-space ``A``: ``a1 = sum A / (n_in + 1)``,
   ``a2 = sum A^2 / (n_in + 1)`` and the expected probability ratio
   ``E = exp(sum(A^2 + 2 A g) / (2 (n_in + 1)))`` with ``g ~ N(0, 1)`` (seeded per micrograph).
5. ``D(x) = (-2 CC(x) + 2 mu(x) a1) / sigma(x) + a2``, ``FOM(x) = (exp(-D(x)/2) - 1) / (E - 1)``,
   the best over angles per reference. ``FOM`` increases with ``CC`` at each pixel (for
   ``E > 1``), so the best angle is the one of the highest ``CC``, and the exponential is
   taken once per reference rather than once per angle.
6. Peaks: :func:`cryonb.kernels.find_peaks_2d` per reference, then
   :func:`cryonb.kernels.prune_peak_clusters` per reference, over all references again, and
   :func:`cryonb.kernels.remove_close_peaks`.

Coordinates follow RELION: ``rlnCoordinateX/Y`` are pixel indices of the micrograph (column,
row; 0-based) of the reference centre, divided by ``scale = ws / S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..backend import array_module, to_numpy
from ..ctf import CTFParams, ctf_at
from ..errors import ConfigError, InputError
from ..fourier import fft2_centered, ifft2_centered
from ..kernels import find_peaks_2d, prune_peak_clusters, remove_close_peaks, update_best_2d
from ._config import AutopickConfig
from ._templates import PickTemplates, relion_fourier_rows, relion_round, synchronized

__all__ = ["COORDINATE_COLUMNS", "PeakOptions", "PickGeometry", "PickMaps", "TemplatePicker",
           "UnusableMicrograph",
           "copy_fourier_window", "good_fourier_size", "prepare_micrograph"]

#: Columns of a RELION 3.1 autopick coordinate file, in RELION's order.
class UnusableMicrograph(InputError):
    """One micrograph that cannot be picked (constant, not finite, or of another size than
    the run's first): the job goes on without it, as RELION's does."""


COORDINATE_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber",
                      "rlnAutopickFigureOfMerit", "rlnAnglePsi")
_LARGEST_ACCEPTABLE_PRIME = 43


def _largest_prime(n: int) -> int:
    i, p = 2, n
    while i * i <= p:
        if p % i:
            i += 1
        else:
            p //= i
    return p


def good_fourier_size(requested: int, limit: int, optimise: bool = True) -> int:
    """RELION's ``getGoodFourierDims``: an even size near ``requested`` with small primes.

    Unless the largest prime factor of ``n`` and ``n / 2 + 1`` is at most 43, the nearest even
    sizes above (up to ``limit + 2``) and below with factors below 43 are found and the closer
    one is taken (the lower one on ties or when the upper one exceeds ``limit``).
    """
    def worst(n: int) -> int:
        return max(_largest_prime(n), _largest_prime(n // 2 + 1))

    if not optimise or worst(requested) <= _LARGEST_ACCEPTABLE_PRIME:
        return requested
    up = requested
    while worst(up) >= _LARGEST_ACCEPTABLE_PRIME and up <= limit + 2:
        up += 2
    down = requested
    while worst(down) >= _LARGEST_ACCEPTABLE_PRIME:
        down -= 2
    return down if (up - requested) > (requested - down) or up > limit else up


def copy_fourier_window(src, dst) -> None:
    """Copy the frequencies two half-plane transforms share (RELION's
    ``windowFourierTransform``, crop or zero-pad).

    Parameters
    ----------
    src : array of shape (..., n, n // 2 + 1)
    dst : array of shape (..., m, m // 2 + 1)
        Written in place where both grids have the frequency; the rest is left as it is (zero
        it first to pad). Rows follow RELION's order (:func:`relion_fourier_rows`), which for
        the ``n < m`` or ``n > m`` rows in use is also NumPy's.

    Notes
    -----
    When padding, RELION copies only the disc ``|k| <= n / 2`` of the smaller transform; the
    transforms padded here are zero outside that disc already.
    """
    n, m = src.shape[-2], dst.shape[-2]
    pos = min(n // 2, m // 2) + 1
    neg = min(n - (n // 2 + 1), m - (m // 2 + 1))
    cols = min(src.shape[-1], dst.shape[-1])
    dst[..., :pos, :cols] = src[..., :pos, :cols]
    if neg > 0:
        dst[..., m - neg:, :cols] = src[..., n - neg:, :cols]


def _take(a, iy, ix) -> np.ndarray:
    """``a[iy, ix]`` on the host, indexing on ``a``'s device (only the values travel)."""
    xp = array_module(a)
    return to_numpy(a[xp.asarray(iy), xp.asarray(ix)])


@dataclass(frozen=True)
class PickGeometry:
    """Sizes of the micrographs and of the maps computed from them.

    Attributes
    ----------
    xsize, ysize : int
        Micrograph width and height (pixels).
    size : int
        ``S = max(xsize, ysize)``: side of the square the micrograph is put in.
    downsize : int
        ``d``: the low-pass diameter of the transforms compared (``2 ROUND(S angpix / lowpass)``,
        or ``S`` without low-pass).
    work_size : int
        ``ws``: side of the figure-of-merit maps (even).
    scale : float
        ``ws / S`` (single precision, as RELION computes it).
    """

    xsize: int
    ysize: int
    size: int
    downsize: int
    work_size: int
    scale: float

    @classmethod
    def for_micrographs(cls, xsize: int, ysize: int, pixel_size: float, *,
                        lowpass: float = -1.0, shrink: float = 1.0,
                        optimise_scale: bool = True) -> PickGeometry:
        """The geometry ``relion_autopick`` chooses (``--lowpass``, ``--shrink``,
        ``--skip_optimise_scale``).

        Raises
        ------
        ConfigError
            A ``--shrink`` size larger than the micrograph, or a low-pass beyond Nyquist.
        """
        s = max(int(xsize), int(ysize))
        d = s if lowpass <= 0 else 2 * relion_round(s * pixel_size / lowpass)
        if d > s:
            raise ConfigError(
                f"--lowpass {lowpass:g} A is beyond the Nyquist frequency of {pixel_size:g} A/px "
                f"micrographs ({2 * pixel_size:g} A): give a larger value or -1")
        if d < 2:
            raise ConfigError(f"--lowpass {lowpass:g} A keeps nothing of {s}-pixel micrographs")
        if shrink > 1:
            want = relion_round(shrink)
            want -= want % 2
            if want >= s:
                raise ConfigError(f"--shrink {shrink:g} pixels is not smaller than the "
                                  f"micrographs ({s} pixels): give a fraction in (0, 1]")
        elif shrink > 0:
            want = relion_round(shrink * s)
            want -= want % 2
        else:
            want = d
        ws = good_fourier_size(want, s, optimise_scale)
        ws -= ws % 2
        if ws < 4:
            raise ConfigError(f"--shrink {shrink:g} leaves maps of {ws} pixels")
        scale = float(np.float32(ws) / np.float32(s))
        return cls(int(xsize), int(ysize), s, d, ws, scale)

    def _scaled(self, n: int) -> int:
        return int(np.float32(n) * np.float32(self.scale))

    def search_region(self, box: int, skip_side: int = 0) -> tuple[int, int, int, int]:
        """Rows and columns of the maps where peaks are searched (RELION's ``peakSearch``).

        The micrograph's own area (not the noise padding of a non-square one) less a border
        of ``max(1, int((box // 2 + skip_side) * scale))`` pixels.

        Returns
        -------
        (y0, y1, x0, x1) : tuple of int
            Half-open ranges of map indices.
        """
        skip = max(1, int(np.float32(box // 2 + skip_side) * np.float32(self.scale)))
        c = self.work_size // 2
        ys, xs = self._scaled(self.ysize), self._scaled(self.xsize)
        y0, x0 = c - ys // 2 + skip, c - xs // 2 + skip
        return y0, c - ys // 2 + ys - skip, x0, c - xs // 2 + xs - skip

    def peak_position(self, iy, ix):
        """RELION's integer peak position (``Peak.x``, ``Peak.y``) of map indices.

        Returns
        -------
        x, y : numpy.ndarray of int64
            In pixels of the scaled micrograph (``coordinate * scale``).
        """
        c = self.work_size // 2
        x = np.asarray(ix, np.int64) - c + self._scaled(self.xsize) // 2
        y = np.asarray(iy, np.int64) - c + self._scaled(self.ysize) // 2
        return x, y


def prepare_micrograph(image, geometry: PickGeometry, outlier_zscore: float = 8.0,
                       rng: np.random.Generator | None = None, xp=np):
    """Remove outliers, z-score and square a micrograph (RELION's first steps).

    Parameters
    ----------
    image : array of shape (ysize, xsize), real
    geometry : PickGeometry
    outlier_zscore : float
        Pixels more than this many std from the mean become the mean.
    rng : numpy.random.Generator, optional
        Noise for the padding of a non-square micrograph (drawn on the host, in row-major
        order, so that every device pads alike).
    xp : module
        Where the result lives (the statistics are computed there, in float64).

    Returns
    -------
    array of shape (S, S), float32
        Mean 0 and std 1 (of the original pixels, before outlier removal); the micrograph's
        pixel ``(y, x)`` is at ``(y - ysize//2 + S//2, x - xsize//2 + S//2)``.

    Raises
    ------
    InputError
        A micrograph of another size than the geometry's, constant, or not finite.
    """
    if tuple(image.shape) != (geometry.ysize, geometry.xsize):
        raise UnusableMicrograph(f"micrograph of {image.shape[1]} x {image.shape[0]} pixels, "
                                 f"but the run's first micrograph is {geometry.xsize} x "
                                 f"{geometry.ysize}: all micrographs of one run must have the "
                                 "same size")
    img = xp.asarray(image).astype(xp.float64)
    avg, std = float(img.mean()), float(img.std(ddof=1)) if img.size > 1 else 0.0
    if not (np.isfinite(avg) and np.isfinite(std)):
        raise UnusableMicrograph("the micrograph holds NaN or infinite values")
    if not std > 0:
        raise UnusableMicrograph("the micrograph is constant (std 0): nothing to pick")
    img = xp.where(xp.abs(img - avg) / std > outlier_zscore, avg, img)
    img = ((img - avg) / std).astype(xp.float32)
    s = geometry.size
    if img.shape == (s, s):
        return img
    y0, x0 = s // 2 - geometry.ysize // 2, s // 2 - geometry.xsize // 2
    outside = np.ones((s, s), bool)
    outside[y0:y0 + geometry.ysize, x0:x0 + geometry.xsize] = False
    rng = rng if rng is not None else np.random.default_rng(0)
    noise = np.zeros((s, s), np.float32)
    noise[outside] = rng.standard_normal(int(outside.sum()))
    out = xp.asarray(noise)
    out[y0:y0 + geometry.ysize, x0:x0 + geometry.xsize] = img
    return out


@dataclass
class PickMaps:
    """Figure-of-merit maps of one micrograph (for views, and re-picking without recomputing).

    Attributes
    ----------
    fom : numpy.ndarray of shape (K, ws, ws), float64
        Best figure of merit over in-plane angles, per reference; map pixel ``(i, j)`` is
        micrograph position ``geometry.peak_position(i, j) / geometry.scale``.
    psi_index : numpy.ndarray of shape (K, ws, ws), int16
        Index into ``psi_angles`` of that best value.
    psi_angles : numpy.ndarray of shape (P,)
        The in-plane angles searched (degrees).
    mean, stddev : numpy.ndarray of shape (ws, ws), float64
        Local background mean and std of the z-scored micrograph.
    expected_ratio : numpy.ndarray of shape (K,)
        ``E`` per reference.
    geometry : PickGeometry
    """

    fom: np.ndarray
    psi_index: np.ndarray
    psi_angles: np.ndarray
    mean: np.ndarray
    stddev: np.ndarray
    expected_ratio: np.ndarray
    geometry: PickGeometry

    @property
    def psi(self) -> np.ndarray:
        """Best in-plane angle per reference and pixel (degrees), shape (K, ws, ws)."""
        return self.psi_angles[self.psi_index]


@dataclass(frozen=True)
class PeakOptions:
    """Peak-picking options (see :class:`AutopickConfig` for their meaning)."""

    threshold: float = 0.25
    min_distance: float = -1.0
    max_stddev_noise: float = -1.0
    min_avg_noise: float = -999.0
    skip_side: int = 0

    @classmethod
    def from_config(cls, config: AutopickConfig, **changes) -> PeakOptions:
        """The configuration's options, with some replaced."""
        bad = set(changes) - set(cls.__dataclass_fields__)
        if bad:
            raise ConfigError(f"unknown peak option(s) {', '.join(sorted(bad))}: choose from "
                              f"{', '.join(cls.__dataclass_fields__)}")
        values = {k: getattr(config, k) for k in cls.__dataclass_fields__}
        values.update(changes)
        return cls(**values)


@dataclass
class _RefMaps:
    fom: object  # (ws, ws) float64, xp
    psi_index: object  # (ws, ws) int16, xp
    expected_ratio: float


class TemplatePicker:
    """Everything one rank needs to pick micrographs of one size with one set of references.

    Parameters
    ----------
    templates : PickTemplates
    geometry : PickGeometry
    config : AutopickConfig
        Uses ``psi_angles``, ``ctf``, ``ctf_intact_first_peak``, ``threshold``,
        ``min_distance``, ``max_stddev_noise``, ``min_avg_noise``, ``skip_side``,
        ``outlier_removal_zscore`` and ``random_seed``.
    xp : module
        ``numpy`` (CPU) or ``cupy`` (GPU, on the calling thread's current device).

    Notes
    -----
    Thread-safe: every call allocates its own work arrays, and the per-device caches
    (constants, rotated reference transforms) hold identical values whoever fills them, made
    complete (stream-synchronised) before they are shared, so threads of one rank, each on its
    own CUDA stream, can share a picker.
    """

    def __init__(self, templates: PickTemplates, geometry: PickGeometry,
                 config: AutopickConfig, xp=np):
        if geometry.downsize > geometry.size:
            raise ConfigError("the low-pass size exceeds the micrograph size")
        self.templates = templates
        self.geometry = geometry
        self.config = config
        self.xp = xp
        self.psi = np.asarray(config.psi_angles, dtype=np.float64)
        self._device: dict = {}

    # ------------------------------------------------------------------ device-side constants
    def _constants(self):
        xp = self.xp
        key = (xp.__name__, 0 if xp is np else int(xp.cuda.Device().id))
        c = self._device.get(key)
        if c is not None:
            return c
        g, t = self.geometry, self.templates
        d = g.downsize
        ky = relion_fourier_rows(d)[:, None] + np.zeros((1, d // 2 + 1), np.int64)
        kx = np.arange(d // 2 + 1)[None, :] + np.zeros((d, 1), np.int64)
        # (-1)^(kx + ky) moves the origin of the ws-sized correlation map to its centre
        sign = np.where((kx + ky) % 2 == 0, 1.0, -1.0)
        weight = sign * (float(g.work_size) ** 2 * float(g.size) ** 2 / t.n_in)
        _, background = t.masks(g.size, xp)
        c = {"kx": xp.asarray(kx), "ky": xp.asarray(ky),
             "cc_weight": xp.asarray(weight.astype(np.float32)),
             "bg_ft": xp.conj(fft2_centered(background))}
        synchronized(c["bg_ft"])
        self._device[key] = c
        return c

    # ------------------------------------------------------------------ maps
    def local_background(self, fmic, fmic2):
        """Local background mean and std maps on the ws grid (RELION's
        ``calculateStddevAndMeanUnderMask``).

        Parameters
        ----------
        fmic, fmic2 : arrays of shape (S, S // 2 + 1), complex
            ``fft2_centered`` of the prepared micrograph and of its square.

        Returns
        -------
        mean, stddev : arrays of shape (ws, ws), float64
            ``stddev`` is 1 where the variance is <= 1e-10.
        """
        xp, g, c = self.xp, self.geometry, self._constants()
        ws = g.work_size
        norm = float(g.size) ** 2 / self.templates.n_bg
        both = xp.zeros((2, ws, ws // 2 + 1), dtype=xp.complex64)
        copy_fourier_window(xp.stack([fmic, fmic2]) * c["bg_ft"], both)
        m = ifft2_centered(both, ws).astype(xp.float64) * norm
        mean, var = m[0], m[1] - m[0] * m[0]
        big = var > 1e-10
        return mean, xp.where(big, xp.sqrt(xp.where(big, var, 1.0)), 1.0)

    def _ctf_grid(self, ctf: CTFParams | None):
        if not self.config.ctf:
            return None
        if ctf is None:
            raise ConfigError("--ctf needs each micrograph's CTF (a micrographs STAR file with "
                              "rlnDefocusU, rlnDefocusV, rlnDefocusAngle, rlnVoltage, "
                              "rlnSphericalAberration and rlnAmplitudeContrast)")
        c = self._constants()
        return ctf_at(ctf, c["kx"], c["ky"], self.geometry.size, self.templates.pixel_size,
                      self.xp, intact_first_peak=self.config.ctf_intact_first_peak)

    def _expected_ratio(self, a, rng: np.random.Generator):
        """``a1``, ``a2`` and ``E`` of one CTF-modulated reference transform (first angle)."""
        xp, g, t = self.xp, self.geometry, self.templates
        s = g.size
        f = xp.zeros((s, s // 2 + 1), dtype=xp.complex64)
        copy_fourier_window(a, f)
        b = t.box
        lo = s // 2 - b // 2
        box = to_numpy(ifft2_centered(f, s)[lo:lo + b, lo:lo + b]).astype(np.float64)
        inside, _ = t.masks(b)
        vals = box[inside > 0]  # row-major, as RELION loops
        noise = rng.standard_normal(vals.size)
        n = vals.size + 1.0
        a1 = vals.sum() / n
        a2 = (vals * vals).sum() / n
        ratio = float(np.exp((a2 * n + 2.0 * (vals * noise).sum()) / (2.0 * n)))
        return a1, a2, ratio

    def _batch(self) -> int:
        if self.xp is np:
            return 1
        ws = self.geometry.work_size
        return int(max(1, min(len(self.psi), (1 << 30) // (12 * ws * ws))))

    def _reference_maps(self, fmic, mean, stddev, ctf_grid, rng):
        """Yield ``(k, _RefMaps)`` for every reference, in order (one map in memory at a time)."""
        xp, g, c = self.xp, self.geometry, self._constants()
        ws, d = g.work_size, g.downsize
        fm = xp.zeros((d, d // 2 + 1), dtype=xp.complex64)
        copy_fourier_window(fmic, fm)
        fm *= c["cc_weight"]
        batch = self._batch()
        spec = xp.zeros((batch, ws, ws // 2 + 1), dtype=xp.complex64)
        for k in range(self.templates.n_refs):
            a = self.templates.rotated_transforms(k, g.size, d, self.psi, xp)  # (P, d, d/2+1)
            if ctf_grid is not None:
                a = a * ctf_grid
            a1, a2, ratio = self._expected_ratio(a[0], rng)
            if ratio == 1.0:
                raise InputError(f"reference {k + 1} is zero inside the particle mask: nothing "
                                 "to pick with it")
            sign = 1.0 if ratio > 1.0 else -1.0  # FOM increases with CC iff E > 1
            best = xp.full((ws, ws), -np.inf, dtype=xp.float32)
            psi_index = xp.zeros((ws, ws), dtype=xp.int16)
            for start in range(0, len(self.psi), batch):
                stop = min(len(self.psi), start + batch)
                part = spec[: stop - start]
                copy_fourier_window(xp.conj(a[start:stop]) * fm, part)
                update_best_2d(best, psi_index, xp.fft.irfft2(part, s=(ws, ws)), start, sign)
            cc = best.astype(xp.float64) * sign
            dd = (-2.0 * cc + 2.0 * a1 * mean) / stddev + a2
            fom = (xp.exp(-0.5 * dd) - 1.0) / (ratio - 1.0)
            yield k, _RefMaps(fom, psi_index, ratio)

    def _start(self, image, index: int):
        xp = self.xp
        rng = np.random.default_rng(int(self.config.random_seed) + int(index))
        x = prepare_micrograph(image, self.geometry, self.config.outlier_removal_zscore, rng,
                               xp)
        fmic = fft2_centered(x)
        mean, stddev = self.local_background(fmic, fft2_centered(x * x))
        return fmic, mean, stddev, rng

    def maps(self, image, ctf: CTFParams | None = None, index: int = 0) -> PickMaps:
        """Figure-of-merit maps of one micrograph, on the host.

        Parameters
        ----------
        image : array of shape (ysize, xsize)
        ctf : CTFParams, optional
            Scalars; needed with ``--ctf``.
        index : int
            The micrograph's index in the run (seeds the expected-ratio noise with
            ``random_seed + index``, as RELION does).
        """
        fmic, mean, stddev, rng = self._start(image, index)
        foms, psis, ratios = [], [], []
        for _, m in self._reference_maps(fmic, mean, stddev, self._ctf_grid(ctf), rng):
            foms.append(to_numpy(m.fom))
            psis.append(to_numpy(m.psi_index))
            ratios.append(m.expected_ratio)
        return PickMaps(np.stack(foms), np.stack(psis), self.psi.copy(), to_numpy(mean),
                        to_numpy(stddev), np.asarray(ratios), self.geometry)

    def pick(self, image, ctf: CTFParams | None = None, index: int = 0) -> pd.DataFrame:
        """Pick one micrograph.

        Parameters
        ----------
        image : array of shape (ysize, xsize)
        ctf : CTFParams, optional
            Scalars; needed with ``--ctf``.
        index : int
            The micrograph's index in the run (seeds ``random_seed + index``).

        Returns
        -------
        pandas.DataFrame
            :data:`COORDINATE_COLUMNS`: ``rlnCoordinateX/Y`` (micrograph pixels, see the
            module docstring), ``rlnClassNumber`` (1-based reference),
            ``rlnAutopickFigureOfMerit``, ``rlnAnglePsi`` (degrees), in RELION's order.
        """
        fmic, mean, stddev, rng = self._start(image, index)
        opts = PeakOptions.from_config(self.config)
        parts = [self._reference_peaks(k, m.fom, m.psi_index, mean, stddev, opts)
                 for k, m in self._reference_maps(fmic, mean, stddev, self._ctf_grid(ctf), rng)]
        return self._final_peaks(parts, opts)

    def peaks(self, maps: PickMaps, **changes) -> pd.DataFrame:
        """Pick again from computed maps, optionally with other peak options.

        Parameters
        ----------
        maps : PickMaps
            From :meth:`maps` of this picker.
        **changes
            ``threshold``, ``min_distance``, ``max_stddev_noise``, ``min_avg_noise`` or
            ``skip_side`` to use instead of the configuration's (see :class:`PeakOptions`).

        Returns
        -------
        pandas.DataFrame
            As :meth:`pick`; with no changes, the same picks.
        """
        opts = PeakOptions.from_config(self.config, **changes)
        parts = [self._reference_peaks(k, maps.fom[k], maps.psi_index[k], maps.mean,
                                       maps.stddev, opts) for k in range(maps.fom.shape[0])]
        return self._final_peaks(parts, opts)

    # ------------------------------------------------------------------ peaks
    def _distances(self, opts: PeakOptions) -> tuple[float, float]:
        """Squared cluster radius and squared minimum distance in map pixels (float32 maths)."""
        t, g = self.templates, self.geometry
        min_distance = opts.min_distance if opts.min_distance > 0 else t.box * t.pixel_size / 2
        md = relion_round(min_distance / t.pixel_size)
        s = np.float32(g.scale)
        return (float(np.float32(t.radius2) * s * s),
                float(np.float32(md) * np.float32(md) * s * s))

    def _reference_peaks(self, k: int, fom, psi_index, mean, stddev,
                         opts: PeakOptions) -> pd.DataFrame:
        g = self.geometry
        region = g.search_region(self.templates.box, opts.skip_side)
        iy, ix = find_peaks_2d(fom, opts.threshold, region, stddev=stddev, mean=mean,
                               max_stddev_noise=opts.max_stddev_noise,
                               min_avg_noise=opts.min_avg_noise,
                               neighbours_above_threshold=g.scale >= 1.0)
        x, y = g.peak_position(iy, ix)
        values = _take(fom, iy, ix).astype(np.float64)
        psi = self.psi[_take(psi_index, iy, ix)]
        cluster_r2, min_d2 = self._distances(opts)
        keep = prune_peak_clusters(x, y, values, cluster_r2, min_d2)
        return pd.DataFrame({"x": x[keep], "y": y[keep], "ref": k, "fom": values[keep],
                             "psi": psi[keep]})

    def _final_peaks(self, parts: list[pd.DataFrame], opts: PeakOptions) -> pd.DataFrame:
        peaks = pd.concat(parts, ignore_index=True)
        cluster_r2, min_d2 = self._distances(opts)
        x, y = peaks["x"].to_numpy(), peaks["y"].to_numpy()
        peaks = peaks.iloc[prune_peak_clusters(x, y, peaks["fom"].to_numpy(), cluster_r2,
                                               min_d2)]
        keep = remove_close_peaks(peaks["x"].to_numpy(), peaks["y"].to_numpy(), min_d2)
        peaks = peaks[keep]
        s = np.float32(self.geometry.scale)
        return pd.DataFrame({
            "rlnCoordinateX": (peaks["x"].to_numpy() / s).astype(np.float64),
            "rlnCoordinateY": (peaks["y"].to_numpy() / s).astype(np.float64),
            "rlnClassNumber": peaks["ref"].to_numpy(np.int64) + 1,
            "rlnAutopickFigureOfMerit": peaks["fom"].to_numpy(np.float64),
            "rlnAnglePsi": peaks["psi"].to_numpy(np.float64),
        }, columns=list(COORDINATE_COLUMNS))
