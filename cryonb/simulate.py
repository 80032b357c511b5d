"""Simulated data with known truth: phantom maps, particle stacks and micrographs.

Everything is seeded and reproducible. Particles are projected with
:class:`cryonb.fourier.Projector` (RELION's conventions, see :mod:`cryonb.data.conventions`),
shifted, multiplied by a per-particle CTF (:func:`cryonb.ctf.ctf_2d`) and given white Gaussian
noise at a chosen pixel SNR. Files are written as RELION 3.1 STAR + MRC stacks with a truth
table beside them.

SNR convention: ``var(signal) / var(noise)`` where ``var(signal)`` is the mean over particles of
the variance of the noiseless CTF-modulated image inside the particle's circular mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .backend import to_numpy
from .ctf import CTFParams, ctf_2d
from .data.conventions import euler_to_matrix
from .fourier import Projector, fft2_centered, ifft2_centered, shift_phases_2d

__all__ = [
    "SimulatedMicrographs",
    "SimulatedParticles",
    "discrete_views",
    "load_or_phantom",
    "phantom_map",
    "simulate_micrographs",
    "simulate_particles",
    "write_micrograph_set",
    "write_particle_set",
]

DEFAULT_PIXEL_SIZE = 3.0


def phantom_map(box: int = 64, *, radius_fraction: float = 0.36, seed: int = 0):
    """An asymmetric, protein-like phantom with distinct domains.

    A large elongated body, a globular head off its axis, a thin arm reaching away and a small
    dense knob, each a cluster of Gaussian blobs: every view of it looks different, as for a
    real complex (a featureless blob would make 2D classification meaningless).

    Parameters
    ----------
    box : int
        Box size (voxels).
    radius_fraction : float
        Overall radius as a fraction of the box.
    seed : int
        Jitter of the blobs within their domains.

    Returns
    -------
    ndarray of shape (box, box, box), float32
        Axes (z, y, x), origin at ``box // 2``, positive density, max 1.
    """
    rng = np.random.default_rng(seed)
    r = radius_fraction * box
    domains = [  # (centre (x, y, z) in units of r, spread (x, y, z), blobs, width, amplitude)
        ((-0.15, -0.05, 0.0), (0.45, 0.25, 0.18), 22, 0.06, 1.0),  # body
        ((0.5, 0.4, 0.12), (0.15, 0.15, 0.15), 10, 0.055, 0.95),  # head
        ((-0.6, 0.55, 0.3), (0.06, 0.06, 0.06), 3, 0.04, 0.9),  # arm tip
        ((-0.38, 0.3, 0.15), (0.07, 0.07, 0.07), 4, 0.035, 0.8),  # arm middle
        ((0.15, -0.62, -0.3), (0.05, 0.05, 0.05), 3, 0.04, 1.2),  # knob
    ]
    ax = np.arange(box, dtype=np.float32) - box // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((box, box, box), np.float32)
    for centre, spread, n, width, amp in domains:
        pts = (np.asarray(centre) + rng.normal(size=(n, 3)) * np.asarray(spread)) * r
        for cx, cy, cz in pts:
            w = width * box * rng.uniform(0.8, 1.2)
            vol += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * w * w))
    return (vol / vol.max()).astype(np.float32)


def load_or_phantom(map_path=None, box: int | None = None, pixel_size: float | None = None,
                    seed: int = 0):
    """The map to simulate from: a file (resampled to ``box``) or the built-in phantom.

    Parameters
    ----------
    map_path : path, optional
        An MRC map. Its voxel size is used unless ``pixel_size`` is given (required when the
        header has none).
    box : int, optional
        Output box; a map of another size is Fourier-cropped/padded to it, which changes the
        pixel size by ``old_box / box``.
    pixel_size : float, optional

    Returns
    -------
    volume : ndarray of shape (box, box, box), float32
    pixel_size : float
        Angstrom per voxel of the returned volume.
    """
    if map_path is None:
        b = box or 64
        return phantom_map(b, seed=seed), float(pixel_size or DEFAULT_PIXEL_SIZE)
    from .errors import InputError
    from .io import read_map

    vol, apix = read_map(map_path)
    if pixel_size is None:
        if not apix:
            raise InputError("the map has no voxel size in its header: give --angpix", map_path)
        pixel_size = apix
    vol = np.asarray(vol, dtype=np.float32)
    if vol.shape[0] != vol.shape[1] or vol.shape[1] != vol.shape[2]:
        raise InputError(f"the map is {vol.shape} voxels; a cubic map is needed", map_path)
    n = vol.shape[0]
    if box is None or box == n:
        return vol, float(pixel_size)
    return resample_volume(vol, box), float(pixel_size) * n / box


def resample_volume(vol, box: int):
    """Fourier-crop or zero-pad a cubic volume to ``box`` (keeps the physical extent).

    Parameters
    ----------
    vol : ndarray of shape (n, n, n)
    box : int

    Returns
    -------
    ndarray of shape (box, box, box), float32
    """
    n = vol.shape[0]
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    out = np.zeros((box, box, box), np.complex128)
    m = min(n, box)
    si, so = n // 2 - m // 2, box // 2 - m // 2
    out[so : so + m, so : so + m, so : so + m] = f[si : si + m, si : si + m, si : si + m]
    res = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real * (box / n) ** 3
    return res.astype(np.float32)


def discrete_views(n_views: int, seed: int = 0):
    """``n_views`` well-separated projection directions (rot, tilt) in degrees.

    Points of a Fibonacci sphere on the upper hemisphere, randomly rotated (seeded), so that
    no two views are related by an in-plane rotation or a mirror.

    Returns
    -------
    ndarray of shape (n_views, 2)
        Columns rot, tilt (degrees).
    """
    rng = np.random.default_rng(seed)
    i = np.arange(n_views) + 0.5
    tilt = np.degrees(np.arccos(1 - i / n_views))  # upper hemisphere, even area
    rot = (np.degrees(np.pi * (1 + 5**0.5) * i) + rng.uniform(0, 360)) % 360
    return np.stack([rot, tilt], axis=1)


@dataclass
class SimulatedParticles:
    """A simulated particle stack with its RELION table and the truth.

    Attributes
    ----------
    images : ndarray of shape (n, box, box), float32
    table : DataFrame
        RELION 3.1 columns (optics merged), CTF but no poses: rlnImageName is filled by
        :func:`write_particle_set`.
    truth : DataFrame
        Per particle: view (or -1), rot, tilt, psi (deg), origin_x/y (px, RELION's sign: the
        particle's centre is at ``box//2 - origin``), defocus_u/v.
    pixel_size : float
    volume : ndarray of shape (box, box, box)
    """

    images: np.ndarray
    table: pd.DataFrame
    truth: pd.DataFrame
    pixel_size: float
    volume: np.ndarray


def _circle_mask(box: int, radius: float):
    ax = np.arange(box) - box // 2
    return (ax[:, None] ** 2 + ax[None, :] ** 2) <= radius * radius


def _random_ctf(rng, n, defocus_range, astig, voltage, cs, amplitude_contrast):
    dfu = rng.uniform(*defocus_range, n)
    dfv = dfu - rng.uniform(0, astig, n)
    return CTFParams(defocus_u=dfu, defocus_v=dfv, defocus_angle=rng.uniform(0, 180, n),
                     voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)


def normalise_background(images, bg_radius: float):
    """Scale images to zero mean, unit std outside ``bg_radius`` (``relion_preprocess --norm``).

    Parameters
    ----------
    images : ndarray of shape (n, box, box)
    bg_radius : float
        Pixels; the background is everything outside this circle.
    """
    bg = ~_circle_mask(images.shape[-1], bg_radius)
    vals = images[:, bg]
    mean = vals.mean(axis=1)[:, None, None]
    std = vals.std(axis=1)[:, None, None]
    return ((images - mean) / np.where(std > 0, std, 1)).astype(np.float32)


def simulate_particles(volume=None, *, n: int = 1000, box: int | None = None,
                       pixel_size: float | None = None, n_views: int | None = 8,
                       max_offset_px: float = 3.0, snr: float = 0.1, ctf: bool = True,
                       defocus_range=(10000.0, 30000.0), astigmatism: float = 1000.0,
                       voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1,
                       particle_diameter: float | None = None, normalise: bool = True,
                       seed: int = 0, progress: bool = False, chunk: int = 256, xp=np):
    """Project a map into a particle stack with known poses, CTFs and noise.

    Parameters
    ----------
    volume : ndarray of shape (m, m, m), optional
        The map (default: :func:`phantom_map`). Resampled to ``box`` when given.
    n : int
        Number of particles.
    box : int, optional
        Image size (default: the map's).
    pixel_size : float, optional
        A/pixel of ``volume`` (default 3.0 for the phantom).
    n_views : int or None
        ``K`` discrete projection directions (:func:`discrete_views`), particle ``i`` in view
        ``perm[i] % K``; ``None`` for uniformly random orientations.
    max_offset_px : float
        Offsets uniform in a disc of this radius (pixels).
    snr : float
        Pixel SNR after CTF (see the module docstring); ``inf`` for no noise.
    ctf : bool
        Apply a random CTF per particle (defocus U in ``defocus_range``, astigmatism up to
        ``astigmatism`` A, random angle).
    particle_diameter : float, optional
        A; sets the SNR mask and the background radius (default 0.75 of the box).
    normalise : bool
        Normalise like ``relion_preprocess --norm`` (background mean 0, std 1).
    seed : int
    progress : bool
        Show a tqdm bar.
    chunk : int
        Particles projected per step.
    xp : module
        Where the projections, shifts and CTFs are computed: ``numpy`` or ``cupy`` (a GPU
        makes large sets of big boxes in seconds rather than minutes). The poses, CTFs and
        noise are drawn on the host either way, so both give the same set up to float32
        rounding of the projections (~1e-6 relative).

    Returns
    -------
    SimulatedParticles
        Images on the host.
    """
    rng = np.random.default_rng(seed)
    if volume is None:
        volume, pixel_size = load_or_phantom(None, box or 64, pixel_size, seed=seed)
    pixel_size = float(pixel_size or DEFAULT_PIXEL_SIZE)
    if box is not None and box != volume.shape[0]:
        pixel_size *= volume.shape[0] / box
        volume = resample_volume(volume, box)
    box = volume.shape[0]
    if n_views:
        views = discrete_views(n_views, seed)
        view = rng.permutation(n) % n_views
        rot, tilt = views[view, 0], views[view, 1]
    else:
        view = np.full(n, -1)
        rot = rng.uniform(0, 360, n)
        tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    psi = rng.uniform(0, 360, n)
    rr = max_offset_px * np.sqrt(rng.uniform(0, 1, n))
    th = rng.uniform(0, 2 * np.pi, n)
    ox, oy = rr * np.cos(th), rr * np.sin(th)
    params = (_random_ctf(rng, n, defocus_range, astigmatism, voltage, cs, amplitude_contrast)
              if ctf else None)
    diameter_px = (particle_diameter / pixel_size) if particle_diameter else 0.75 * box
    mask = _circle_mask(box, diameter_px / 2)

    proj = Projector(xp.asarray(volume, dtype=xp.float32))
    clean = np.empty((n, box, box), np.float32)
    from tqdm.auto import tqdm

    for s in tqdm(range(0, n, chunk), desc="projecting", disable=not progress, unit="chunk"):
        sl = slice(s, min(n, s + chunk))
        f = proj.project(euler_to_matrix(rot[sl], tilt[sl], psi[sl]), box)
        # RELION origins: the particle is the centred projection shifted by -origin
        f = f * shift_phases_2d(box, -np.stack([ox[sl], oy[sl]], axis=1), xp)
        if params is not None:
            f = f * ctf_2d(params.subset(sl), box, pixel_size, xp)
        clean[sl] = to_numpy(ifft2_centered(f.astype(xp.complex64), box))
    signal_var = float(np.mean(clean[:, mask].var(axis=1)))
    sigma = np.sqrt(signal_var / snr) if np.isfinite(snr) and snr > 0 else 0.0
    images = clean + rng.normal(0, 1, clean.shape).astype(np.float32) * np.float32(sigma)
    if normalise:
        images = normalise_background(images, diameter_px / 2)

    truth = pd.DataFrame({
        "view": view, "rot": rot, "tilt": tilt, "psi": psi, "origin_x": ox, "origin_y": oy,
        "defocus_u": params.defocus_u if params else 0.0,
        "defocus_v": params.defocus_v if params else 0.0,
        "defocus_angle": params.defocus_angle if params else 0.0,
    })
    # poses stay out of the particle table (they are the truth a job must find)
    table = pd.DataFrame({"rlnImageName": [""] * n, "rlnOpticsGroup": 1})
    if params is not None:
        table["rlnDefocusU"] = params.defocus_u
        table["rlnDefocusV"] = params.defocus_v
        table["rlnDefocusAngle"] = params.defocus_angle
        table["rlnPhaseShift"] = 0.0
        table["rlnCtfBfactor"] = 0.0
    table["rlnOpticsGroupName"] = "opticsGroup1"
    table["rlnImagePixelSize"] = pixel_size
    table["rlnImageSize"] = box
    table["rlnImageDimensionality"] = 2
    table["rlnVoltage"] = voltage
    table["rlnSphericalAberration"] = cs
    table["rlnAmplitudeContrast"] = amplitude_contrast
    table["rlnCtfDataAreFlipped"] = 0
    return SimulatedParticles(images, table, truth, pixel_size, volume)


def write_particle_set(sim: SimulatedParticles, outdir, name: str = "particles", *,
                       project=None):
    """Write ``name.mrcs``, ``name.star`` (RELION 3.1) and ``name_truth.csv`` into ``outdir``.

    The STAR file names the stack as RELION does (:func:`cryonb.io.project_name`): relative
    to the project folder ``project`` (default: the current directory) when ``outdir`` is
    under it, else by its absolute path. ``project=outdir`` names it ``name.mrcs``.

    Returns
    -------
    Path
        The STAR file.
    """
    from .io import project_name, write_mrc, write_particles

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stack = outdir / f"{name}.mrcs"
    write_mrc(stack, sim.images, sim.pixel_size, stack=True)
    table = sim.table.copy()
    # as RELION names images: relative to the project folder (the current one), so that
    # relion_refine --i sim/particles.star run from there finds them; absolute elsewhere
    stack_name = project_name(stack, project)
    table["rlnImageName"] = [f"{i + 1:06d}@{stack_name}" for i in range(len(table))]
    star = outdir / f"{name}.star"
    write_particles(star, table)
    sim.truth.to_csv(outdir / f"{name}_truth.csv", index=False)
    return star


@dataclass
class SimulatedMicrographs:
    """Simulated micrographs with particles at known coordinates.

    Attributes
    ----------
    micrographs : list of ndarray of shape (size, size), float32
    coordinates : DataFrame
        One row per particle: micrograph index, x, y (pixels, RELION rlnCoordinateX/Y: 0-based
        pixel where the particle's centre is), rot, tilt, psi.
    ctf : CTFParams
        One entry per micrograph.
    pixel_size : float
    """

    micrographs: list
    coordinates: pd.DataFrame
    ctf: CTFParams
    pixel_size: float


def simulate_micrographs(volume=None, *, n_micrographs: int = 4, size: int = 512,
                         pixel_size: float | None = None, particles_per_micrograph: int = 20,
                         particle_diameter: float | None = None, min_distance: float | None = None,
                         snr: float = 0.1, defocus_range=(10000.0, 30000.0),
                         astigmatism: float = 500.0, voltage: float = 300.0, cs: float = 2.7,
                         amplitude_contrast: float = 0.1, invert_contrast: bool = True,
                         seed: int = 0, progress: bool = False):
    """Micrographs with randomly oriented particles at known, non-overlapping positions.

    Parameters
    ----------
    volume : ndarray of shape (m, m, m), optional
        The map (default: the phantom); ``pixel_size`` its voxel size (A).
    n_micrographs, size : int
        Number and size (pixels, square) of the micrographs.
    particles_per_micrograph : int
        Particles placed per micrograph (fewer if they do not fit ``min_distance`` apart).
    particle_diameter : float, optional
        A (default: 0.7 of the map's box).
    min_distance : float, optional
        Minimum centre distance in A (default: the particle diameter).
    snr : float
        Pixel SNR of the CTF-modulated particles (measured inside the particle discs).
    invert_contrast : bool
        Particles dark on a light background, as in raw micrographs (default).
    seed : int

    Returns
    -------
    SimulatedMicrographs
    """
    rng = np.random.default_rng(seed)
    if volume is None:
        volume, pixel_size = load_or_phantom(None, 64, pixel_size, seed=seed)
    pixel_size = float(pixel_size or DEFAULT_PIXEL_SIZE)
    box = volume.shape[0]
    diameter_px = (particle_diameter / pixel_size) if particle_diameter else 0.7 * box
    min_d = (min_distance / pixel_size) if min_distance else diameter_px
    margin = box // 2 + 1
    proj = Projector(volume.astype(np.float32))
    params = _random_ctf(rng, n_micrographs, defocus_range, astigmatism, voltage, cs,
                         amplitude_contrast)
    mics, rows = [], []
    from tqdm.auto import tqdm

    for m in tqdm(range(n_micrographs), desc="micrographs", disable=not progress):
        pts: list[tuple[float, float]] = []
        tries = 0
        while len(pts) < particles_per_micrograph and tries < 200 * particles_per_micrograph:
            tries += 1
            p = rng.uniform(margin, size - margin, 2)
            if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_d * min_d for q in pts):
                pts.append((float(p[0]), float(p[1])))
        k = len(pts)
        rot = rng.uniform(0, 360, k)
        tilt = np.degrees(np.arccos(rng.uniform(-1, 1, k)))
        psi = rng.uniform(0, 360, k)
        mic = np.zeros((size, size), np.float32)
        if k:
            xy = np.array(pts)
            ixy = np.floor(xy).astype(int)
            frac = xy - ixy
            f = proj.project(euler_to_matrix(rot, tilt, psi), box) * shift_phases_2d(box, frac)
            imgs = ifft2_centered(f.astype(np.complex64), box)
            for (ix, iy), img in zip(ixy, imgs):
                mic[iy - box // 2 : iy - box // 2 + box, ix - box // 2 : ix - box // 2 + box] += img
        fm = fft2_centered(mic) * ctf_2d(params.subset(m), size, pixel_size)
        clean = ifft2_centered(fm, size)
        if k:
            yy, xx = np.mgrid[0:size, 0:size]
            inside = np.zeros((size, size), bool)
            for x, y in pts:
                inside |= (xx - x) ** 2 + (yy - y) ** 2 <= (diameter_px / 2) ** 2
            signal_var = float(clean[inside].var())
        else:
            signal_var = float(clean.var()) or 1.0
        sigma = np.sqrt(signal_var / snr) if np.isfinite(snr) and snr > 0 else 0.0
        noisy = clean + rng.normal(0, sigma, clean.shape).astype(np.float32)
        if invert_contrast:
            noisy = -noisy
        mics.append(((noisy - noisy.mean()) / (noisy.std() or 1)).astype(np.float32))
        for (x, y), a, b, c in zip(pts, rot, tilt, psi):
            rows.append({"micrograph": m, "x": x, "y": y, "rot": a, "tilt": b, "psi": c})
    coords = pd.DataFrame(rows, columns=["micrograph", "x", "y", "rot", "tilt", "psi"])
    return SimulatedMicrographs(mics, coords, params, pixel_size)


def write_micrograph_set(sim: SimulatedMicrographs, outdir, name: str = "micrographs"):
    """Write micrographs (``Micrographs/mic###.mrc``), ``name.star`` with CTF, and the truth.

    The truth coordinates go to ``truth/mic###_truth.star`` (RELION coordinate files:
    ``rlnCoordinateX``/``Y``, pixels) and ``name_truth.csv``.

    Returns
    -------
    Path
        The micrographs STAR file (RELION 3.1: data_optics + data_micrographs).
    """
    from .io import write_mrc, write_star

    outdir = Path(outdir)
    (outdir / "Micrographs").mkdir(parents=True, exist_ok=True)
    (outdir / "truth").mkdir(exist_ok=True)
    names = []
    for m, mic in enumerate(sim.micrographs):
        rel = os.path.join("Micrographs", f"mic{m + 1:03d}.mrc")
        write_mrc(outdir / rel, mic, sim.pixel_size)
        names.append(rel)
        c = sim.coordinates[sim.coordinates.micrograph == m]
        write_star(outdir / "truth" / f"mic{m + 1:03d}_truth.star", {"": pd.DataFrame({
            "rlnCoordinateX": c.x.to_numpy(), "rlnCoordinateY": c.y.to_numpy(),
            "rlnAngleRot": c.rot.to_numpy(), "rlnAngleTilt": c.tilt.to_numpy(),
            "rlnAnglePsi": c.psi.to_numpy()})})
    p = sim.ctf
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographPixelSize": [sim.pixel_size], "rlnVoltage": [float(np.ravel(p.voltage)[0])],
        "rlnSphericalAberration": [float(np.ravel(p.cs)[0])],
        "rlnAmplitudeContrast": [float(np.ravel(p.amplitude_contrast)[0])],
    })
    mics = pd.DataFrame({
        "rlnMicrographName": names, "rlnOpticsGroup": 1,
        "rlnDefocusU": p.defocus_u, "rlnDefocusV": p.defocus_v,
        "rlnDefocusAngle": p.defocus_angle, "rlnCtfAstigmatism": np.abs(
            np.asarray(p.defocus_u) - np.asarray(p.defocus_v)),
        "rlnCtfMaxResolution": 4.0 * sim.pixel_size, "rlnCtfFigureOfMerit": 0.2,
    })
    star = outdir / f"{name}.star"
    write_star(star, {"optics": optics, "micrographs": mics})
    coords = sim.coordinates.copy()
    coords["micrograph_name"] = [names[i] for i in coords.micrograph]
    coords.to_csv(outdir / f"{name}_truth.csv", index=False)
    return star
