"""A simulated picking data set: micrographs, references in noise-sigma units, the truth.

For tests, benchmarks and tutorials. Particles are projections of a map in ``n_views``
directions spread over the whole sphere (a Fibonacci lattice), each at a random in-plane
angle and position; the references are the projections of those directions, i.e. ideal 2D
class averages. (With particles in uniformly random directions a handful of references matches
them poorly, and RELION's figure of merit, which compares absolute amplitudes, cannot pick them
at SNR 0.1; real class averages come from the particles' own views.)

Each micrograph is the sum of the particles, multiplied in Fourier space by the micrograph's
CTF (RELION's), plus white Gaussian noise of one standard deviation ``sigma`` for the whole set
(the same dose everywhere): ``sigma^2 = mean signal variance inside the particles / snr``.
Contrast is inverted (dark particles, as in raw micrographs) and each micrograph is z-scored.
The references are the projections divided by ``sigma``: in units of the noise, as RELION's
figure of merit needs them (see :mod:`cryonb.pick`); pick with ``--invert --ctf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["PickSet", "simulate_pick_set", "sphere_views"]


@dataclass
class PickSet:
    """Files and truth of a simulated picking data set.

    Attributes
    ----------
    micrographs_star : pathlib.Path
        RELION 3.1 micrographs STAR file (optics with ``rlnMicrographPixelSize``, CTF per
        micrograph); micrograph names (``Micrographs/mic001.mrc``...) are relative to its folder.
    references : pathlib.Path
        ``references.mrcs``: ``(n_views, B, B)`` white projections in noise-sigma units.
    truth : pandas.DataFrame
        ``rlnMicrographName``, ``rlnCoordinateX``, ``rlnCoordinateY`` (pixels, RELION's
        convention: the particle centre's column and row) of every particle, its
        ``rlnAngleRot/Tilt/Psi`` and ``view`` (0-based reference).
    pixel_size : float
        Angstrom per pixel of micrographs and references.
    particle_diameter : float
        Angstrom.
    noise_sigma : float
        Noise standard deviation in units of the projected density.
    """

    micrographs_star: Path
    references: Path
    truth: pd.DataFrame
    pixel_size: float
    particle_diameter: float
    noise_sigma: float


def sphere_views(n: int) -> np.ndarray:
    """``n`` projection directions spread evenly over the whole sphere (Fibonacci lattice).

    Returns
    -------
    numpy.ndarray of shape (n, 2)
        Columns rot, tilt (degrees); ``tilt`` covers (0, 180), so mirror-related views (seen
        from opposite sides) are both present.
    """
    i = np.arange(n) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * i / n))
    rot = np.degrees(np.pi * (1 + 5**0.5) * i) % 360
    return np.stack([rot, tilt], axis=1)


def _positions(rng, n: int, size: int, margin: int, min_d: float) -> np.ndarray:
    pts: list[np.ndarray] = []
    tries = 0
    while len(pts) < n and tries < 200 * n:
        tries += 1
        p = rng.uniform(margin, size - margin, 2)
        if all(((p - q) ** 2).sum() >= min_d * min_d for q in pts):
            pts.append(p)
    return np.asarray(pts).reshape(-1, 2)


def simulate_pick_set(outdir, map_path=None, *, map_pixel_size: float | None = None,
                      n_micrographs: int = 20, size: int = 512, per_micrograph: int = 20,
                      snr: float = 0.1, particle_diameter: float | None = None,
                      n_views: int = 8, defocus_range=(10000.0, 30000.0),
                      astigmatism: float = 500.0, seed: int = 0) -> PickSet:
    """Simulate micrographs with known particles and matching picking references.

    Parameters
    ----------
    outdir : path
        Written: ``micrographs.star``, ``Micrographs/mic###.mrc``, ``truth/``,
        ``micrographs_truth.csv``, ``references.mrcs``.
    map_path : path, optional
        The map (default: :func:`cryonb.simulate.phantom_map`).
    map_pixel_size : float, optional
        Its voxel size (A), when the header has none.
    n_micrographs, size, per_micrograph : int
        Square micrographs of ``size`` pixels with up to ``per_micrograph`` particles each, at
        least a particle diameter apart and half a map box from the edges.
    snr : float
        Mean pixel SNR inside the particles (after CTF).
    particle_diameter : float, optional
        A (default 0.8 of the map's box).
    n_views : int
        Projection directions (:func:`sphere_views`) = references.
    defocus_range : (float, float)
        Defocus U range (A); ``astigmatism`` (A) is the largest U - V.
    seed : int

    Returns
    -------
    PickSet
    """
    from ..ctf import CTFParams, ctf_2d
    from ..data.conventions import euler_to_matrix
    from ..fourier import Projector, fft2_centered, ifft2_centered, pad_centered, shift_phases_2d
    from ..io import write_mrc
    from ..simulate import SimulatedMicrographs, load_or_phantom, write_micrograph_set

    outdir = Path(outdir)
    rng = np.random.default_rng(seed)
    volume, apix = load_or_phantom(map_path, None, map_pixel_size, seed=seed)
    box = volume.shape[0]
    diameter = float(particle_diameter or 0.8 * box * apix)
    views = sphere_views(n_views)
    proj = Projector(volume.astype(np.float32))
    dfu = rng.uniform(defocus_range[0], defocus_range[1], n_micrographs)
    ctf = CTFParams(defocus_u=dfu, defocus_v=dfu - rng.uniform(0, astigmatism, n_micrographs),
                    defocus_angle=rng.uniform(0, 180, n_micrographs))
    yy, xx = np.mgrid[0:size, 0:size]
    clean, rows, signal = [], [], []
    for m in range(n_micrographs):
        xy = _positions(rng, per_micrograph, size, box // 2 + 1, diameter / apix)
        view = rng.integers(0, n_views, len(xy))
        psi = rng.uniform(0, 360, len(xy))
        mic = np.zeros((size, size), np.float32)
        inside = np.zeros((size, size), bool)
        if len(xy):
            ixy = np.floor(xy).astype(int)
            f = proj.project(euler_to_matrix(views[view, 0], views[view, 1], psi), box)
            imgs = ifft2_centered((f * shift_phases_2d(box, xy - ixy)).astype(np.complex64), box)
            lo = box // 2
            for (ix, iy), img in zip(ixy, imgs):
                mic[iy - lo: iy - lo + box, ix - lo: ix - lo + box] += img
            for x, y in xy:
                inside |= (xx - x) ** 2 + (yy - y) ** 2 <= (diameter / apix / 2) ** 2
        c = ifft2_centered(fft2_centered(mic) * ctf_2d(ctf.subset(m), size, apix), size)
        clean.append(c)
        signal.append(float(c[inside].var()) if inside.any() else np.nan)
        rows += [{"micrograph": m, "x": x, "y": y, "rot": views[v, 0], "tilt": views[v, 1],
                  "psi": p, "view": v} for (x, y), v, p in zip(xy, view, psi)]
    sigma = float(np.sqrt(np.nanmean(signal) / snr)) if snr > 0 else 1.0
    mics = []
    for c in clean:
        noisy = -(c + rng.normal(0.0, sigma, c.shape).astype(np.float32))
        mics.append(((noisy - noisy.mean()) / noisy.std()).astype(np.float32))
    coords = pd.DataFrame(rows, columns=["micrograph", "x", "y", "rot", "tilt", "psi", "view"])
    sim = SimulatedMicrographs(mics, coords, ctf, float(apix))
    star = write_micrograph_set(sim, outdir)
    refs = ifft2_centered(proj.project(euler_to_matrix(views[:, 0], views[:, 1], 0.0), box)
                          .astype(np.complex64), box) / np.float32(sigma)
    refs = pad_centered(refs, box - box % 2, ndim=2)  # an even box, as RELION expects
    references = outdir / "references.mrcs"
    write_mrc(references, refs, apix, stack=True)
    truth = pd.DataFrame({
        "rlnMicrographName": [f"Micrographs/mic{m + 1:03d}.mrc" for m in coords.micrograph],
        "rlnCoordinateX": coords.x.to_numpy(), "rlnCoordinateY": coords.y.to_numpy(),
        "rlnAngleRot": coords.rot.to_numpy(), "rlnAngleTilt": coords.tilt.to_numpy(),
        "rlnAnglePsi": coords.psi.to_numpy(), "view": coords.view.to_numpy(),
    })
    return PickSet(star, references, truth, float(apix), diameter, sigma)
