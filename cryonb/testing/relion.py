"""Reference data sets and runs made by RELION's own tools (for tests and benchmarks).

- :func:`make_class2d_set`: particles of a real map in a few well-separated views, projected
  with CTF by ``relion_project``, white noise added (NumPy or RELION) to a chosen SNR, normalised
  by ``relion_preprocess --norm`` exactly as RELION users do, with a RELION 3.1 STAR file and
  the ground truth (view, angles, origins, defocus) in ``truth.csv``.
- :func:`run_relion_class2d`: ``relion_refine`` 2D classification with the GUI's options, timed
  per iteration.
- :func:`read_relion_data` / :func:`score_relion_run`: read a run's ``_data.star`` back in the
  input order and score it against the truth (:mod:`cryonb.testing.metrics`).
- :func:`oracle_purity`: the purity a run's E-step reaches with classes made from the true
  views (from the other half of the particles): what classification reaches when the classes
  are right.

RELION conventions measured with RELION 3.1.3 (details, file layouts and excerpts in
``docs/relion_outputs.md``):

- ``relion_project --ang`` reads ``rlnOriginXAngst/YAngst`` (3.1 STAR with ``data_optics``) and
  moves the projection by ``-origin``: the particle's centre sits at ``-origin`` from the box
  centre ``(box//2, box//2)``; x is the column, y the row of the MRC array ``data[y, x]``.
- ``psi`` of ``relion_project``: ``img_psi(p) = img_0(R(psi) p)`` for pixel coordinates
  ``p = (x, y)`` about the centre, ``R(a) = [[cos a, -sin a], [sin a, cos a]]``, i.e. the content
  turns by ``-psi`` in the (x right, y down the rows) frame.
- ``relion_refine`` 2D: ``rlnAnglePsi = psi_true + c_k`` and ``rlnOriginXAngst/YAngst =
  o_true + R(-psi) s_k`` for class ``k`` with rotation ``c_k`` and centre ``s_k``.

Image names in the STAR files written here are relative to the STAR file's folder; RELION
resolves them against its working directory, so :func:`run_relion_class2d` runs
``relion_refine`` from that folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from .metrics import score_class2d

__all__ = [
    "RIBOSOME_70S_PIXEL_SIZE",
    "ClassSet",
    "RelionCommandError",
    "RelionRun",
    "default_map_path",
    "fibonacci_views",
    "find_relion_tool",
    "make_class2d_set",
    "oracle_purity",
    "read_relion_data",
    "run_relion_class2d",
    "score_relion_run",
    "shared_data_dir",
    "view_templates",
    "write_relion31_star",
]

#: Path of the default map inside the shared data folder.
RIBOSOME_70S_RELPATH = (
    "ComputationalCryoEM+ASPIRE-Python/gallery/tutorials/data/clean70SRibosome_vol_65p.mrc"
)
#: Voxel size (A) assumed for the 70S ribosome map, whose header says 0. ASPIRE's tutorials use
#: ``pixel_size = 5 * 65 / img_size`` for this map, i.e. 5 A at its native 65^3; it then spans
#: 325 A and the ribosome ~270 A, which is right for a 70S ribosome.
RIBOSOME_70S_PIXEL_SIZE = 5.0

_TAIL = 2000  # characters of a failed command's output quoted in errors


class RelionCommandError(RuntimeError):
    """A RELION program is missing or failed.

    Attributes
    ----------
    cmd : list of str
        The command line.
    returncode : int or None
        Its exit status (None when it could not be started).
    output_tail : str
        The end of its stderr and stdout.
    """

    def __init__(self, message, cmd=(), returncode=None, output_tail=""):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output_tail = output_tail
        super().__init__(message)


def shared_data_dir() -> Path:
    """The shared data folder: ``$CRYONB_SHARED_DATA`` if set, else ``../shared/data`` beside
    the checkout.

    Returns
    -------
    pathlib.Path
    """
    env = os.environ.get("CRYONB_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def default_map_path() -> Path:
    """Path of the 70S ribosome 65^3 map in the shared data folder (:func:`shared_data_dir`).

    Returns
    -------
    pathlib.Path
    """
    return shared_data_dir() / RIBOSOME_70S_RELPATH


def find_relion_tool(name: str, relion_bin_dir=None) -> str:
    """Full path of a RELION program.

    Parameters
    ----------
    name : str
        Program name, e.g. ``"relion_project"``.
    relion_bin_dir : str or os.PathLike, optional
        Folder holding RELION's programs; default: search ``$PATH``.

    Returns
    -------
    str

    Raises
    ------
    RelionCommandError
        When the program is not there.
    """
    if relion_bin_dir is not None:
        exe = Path(relion_bin_dir) / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
        raise RelionCommandError(f"{name} not found (or not executable) in {relion_bin_dir}")
    p = shutil.which(name)
    if p is None:
        raise RelionCommandError(
            f"{name} not found on PATH: install RELION 3.1 (Debian/Ubuntu: apt-get install "
            "relion) or pass relion_bin_dir="
        )
    return p


def _tail(text: str, n: int = _TAIL) -> str:
    text = text.replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip() and "~~(,_,\">" not in ln]
    return "\n".join(lines)[-n:]


def _run(cmd: Sequence[str], cwd, what: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd``; raise :class:`RelionCommandError` with its output's tail."""
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RelionCommandError(f"{what}: could not start {cmd[0]}: {exc}", cmd) from exc
    if proc.returncode != 0:
        tail = _tail(proc.stderr + "\n" + proc.stdout)
        raise RelionCommandError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n(cwd {cwd})\n{tail}",
            cmd, proc.returncode, tail,
        )
    return proc


# --------------------------------------------------------------------------------------------
# STAR writing (RELION 3.1 layout: "# version 30001", data_optics + data_particles)
# --------------------------------------------------------------------------------------------


def _fmt_column(s: pd.Series) -> list:
    if pd.api.types.is_integer_dtype(s):
        return [str(int(v)) for v in s]
    if pd.api.types.is_float_dtype(s):
        return [f"{v:.6f}" for v in s]
    out = []
    for v in s.astype(str):
        if v == "" or any(ch.isspace() for ch in v):
            raise InputError(f"STAR value {v!r} is empty or has white space")
        out.append(v)
    return out


def write_relion31_star(path, blocks: dict) -> Path:
    """Write loop blocks the way RELION 3.1 does (``# version 30001`` before each block).

    Parameters
    ----------
    path : str or os.PathLike
        Output file; written to a temporary name and renamed.
    blocks : dict of str to pandas.DataFrame
        ``{"optics": df, "particles": df}`` -> ``data_optics`` and ``data_particles``.
        Column names are the labels without the leading underscore (``rlnImageName``).

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    parts = []
    for name, df in blocks.items():
        parts.append(f"\n# version 30001\n\ndata_{name}\n\nloop_ \n")
        parts.extend(f"_{c} #{i + 1} \n" for i, c in enumerate(df.columns))
        cols = [_fmt_column(df[c]) for c in df.columns]
        parts.extend(" ".join(row) + " \n" for row in zip(*cols))
        parts.append(" \n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(parts))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Views and poses
# --------------------------------------------------------------------------------------------


def fibonacci_views(n_views: int, rng: np.random.Generator, n_candidates: int = 1000):
    """``n_views`` well-separated projection directions as RELION (rot, tilt) in degrees.

    A Fibonacci sphere of ``n_candidates`` points is turned by a random rotation (from
    ``rng``) and ``n_views`` points are picked greedily, each the farthest from those already
    picked (farthest-point sampling), so the directions are as distinct as possible.

    Parameters
    ----------
    n_views : int
    rng : numpy.random.Generator
    n_candidates : int

    Returns
    -------
    numpy.ndarray, shape (n_views, 2)
        ``(rot, tilt)``: direction ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``; rot in
        [0, 360), tilt in [0, 180].
    numpy.ndarray, shape (n_views,)
        Smallest angle (degrees) between each picked direction and the others.
    """
    if n_views < 1:
        raise InputError(f"n_views must be >= 1, got {n_views}")
    i = np.arange(n_candidates) + 0.5
    z = 1.0 - 2.0 * i / n_candidates
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z * z)
    pts = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # random orthogonal matrix
    pts = pts @ q.T
    chosen = [int(rng.integers(n_candidates))]
    mind = np.full(n_candidates, np.inf)
    for _ in range(n_views - 1):
        mind = np.minimum(mind, np.arccos(np.clip(pts @ pts[chosen[-1]], -1, 1)))
        chosen.append(int(np.argmax(mind)))
    d = pts[chosen]
    tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
    rot = np.mod(np.degrees(np.arctan2(d[:, 1], d[:, 0])), 360.0)
    ang = np.degrees(np.arccos(np.clip(d @ d.T, -1, 1)))
    np.fill_diagonal(ang, np.inf)
    sep = ang.min(axis=1) if n_views > 1 else np.array([180.0])
    return np.stack([rot, tilt], axis=1), sep


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


@dataclass
class ClassSet:
    """A 2D-classification reference set made by :func:`make_class2d_set`.

    Attributes
    ----------
    particles_star : pathlib.Path
        RELION 3.1 STAR (``data_optics`` + ``data_particles``); image names relative to its
        folder. No pose columns: the poses are the truth.
    stack : pathlib.Path
        Normalised particles (``relion_preprocess --norm``), float32, (N, box, box).
    map : pathlib.Path
        The map that was projected (box^3, header voxel size = ``pixel_size``).
    truth : pandas.DataFrame
        One row per particle in STAR order: ``image_name``, ``view`` (0-based), ``rot``,
        ``tilt``, ``psi`` (deg, as given to ``relion_project``), ``origin_x_px``,
        ``origin_y_px``, ``origin_x_A``, ``origin_y_A`` (RELION's rlnOriginX/Y: the particle's
        centre is at ``-origin`` from the box centre), ``defocus_u``, ``defocus_v`` (A),
        ``defocus_angle`` (deg), ``micrograph``, ``optics_group`` (1-based). Also saved as
        ``truth.csv``.
    n_views : int
    pixel_size : float
        A/px of the particles and the map.
    box : int
    view_angles : numpy.ndarray, shape (n_views, 2)
        ``(rot, tilt)`` of each view.
    view_separation_deg : numpy.ndarray, shape (n_views,)
        Smallest angle between each view's direction and the other views'.
    particle_diameter : float
        Suggested ``--particle_diameter`` (A) for ``relion_refine``: the map's extent plus a
        margin, within the box.
    bg_radius : int
        ``--bg_radius`` (px) used for ``relion_preprocess --norm``.
    noise_sigma : float
        Standard deviation of the white noise added to the CTF-affected projections (in the
        projections' units, before normalisation).
    signal_variance : float
        Variance of the noiseless CTF-affected projections inside the particle's circle.
    snr : float
        ``signal_variance / noise_sigma**2``.
    clean_star : pathlib.Path
        The noiseless CTF-affected projections' STAR written by ``relion_project`` (with the
        true poses); stack ``clean.mrcs``.

    Notes
    -----
    The scalar attributes, the view angles, the seed and the RELION version are also written
    to ``set.json`` beside the STAR file, so :meth:`load` gets the set back from disc.
    """

    particles_star: Path
    stack: Path
    map: Path
    truth: pd.DataFrame = field(repr=False)
    n_views: int
    pixel_size: float
    box: int
    view_angles: np.ndarray | None = field(repr=False, default=None)
    view_separation_deg: np.ndarray | None = field(repr=False, default=None)
    particle_diameter: float = 0.0
    bg_radius: int = 0
    noise_sigma: float = 0.0
    signal_variance: float = 0.0
    snr: float = 0.0
    clean_star: Path | None = None

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return len(self.truth)

    @property
    def outdir(self) -> Path:
        """Folder holding the set."""
        return Path(self.particles_star).parent

    @classmethod
    def load(cls, outdir) -> ClassSet:
        """Read a set written by :func:`make_class2d_set` back from its folder.

        Parameters
        ----------
        outdir : str or os.PathLike
            Folder holding ``particles.star``, ``truth.csv`` and ``set.json``.

        Returns
        -------
        ClassSet
        """
        outdir = Path(outdir)
        meta_path = outdir / "set.json"
        if not meta_path.is_file():
            raise InputError("not a class2d set folder (no set.json)", outdir)
        try:
            meta = json.loads(meta_path.read_text())
            truth = pd.read_csv(outdir / "truth.csv")
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable set description: {exc}", outdir) from exc
        return cls(
            particles_star=outdir / "particles.star", stack=outdir / "particles.mrcs",
            map=outdir / "map.mrc", truth=truth, n_views=int(meta["n_views"]),
            pixel_size=float(meta["pixel_size"]), box=int(meta["box"]),
            view_angles=np.array(meta["view_angles"]),
            view_separation_deg=np.array(meta["view_separation_deg"]),
            particle_diameter=float(meta["particle_diameter"]),
            bg_radius=int(meta["bg_radius"]), noise_sigma=float(meta["noise_sigma"]),
            signal_variance=float(meta["signal_variance"]), snr=float(meta["snr"]),
            clean_star=outdir / "clean.star",
        )


def _read_map(map_path, map_pixel_size):
    map_path = Path(map_path)
    if not map_path.is_file():
        raise InputError("map file not found", map_path)
    try:
        with mrcfile.open(map_path, permissive=False) as m:
            data = np.asarray(m.data, dtype=np.float64).copy()
            vox = float(m.voxel_size.x)
    except ValueError as exc:
        raise InputError(f"not a readable MRC map: {exc}", map_path) from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"map must be a cubic 3D volume, got shape {data.shape}", map_path)
    if map_pixel_size is not None:
        vox = float(map_pixel_size)
    elif vox <= 0:
        if map_path.name == Path(RIBOSOME_70S_RELPATH).name:
            vox = RIBOSOME_70S_PIXEL_SIZE
        else:
            raise InputError(
                f"header voxel size is {vox}: pass map_pixel_size= (A/voxel)", map_path
            )
    if not np.isfinite(data).all():
        raise InputError("map holds NaN or infinite values", map_path)
    return data, vox


def _centre_map(data: np.ndarray) -> np.ndarray:
    """Shift the map so that the centre of mass of its positive density is at n//2."""
    from scipy import ndimage

    pos = np.clip(data, 0, None)
    com = np.array(ndimage.center_of_mass(pos))
    shift = data.shape[0] // 2 - com
    f = ndimage.fourier_shift(np.fft.fftn(data), shift)
    return np.real(np.fft.ifftn(f))


def _extent_radius(data: np.ndarray, threshold: float = 0.05) -> float:
    """Radius (voxels) about n//2 beyond which ``|density| < threshold * max(density)``."""
    n = data.shape[0]
    g = np.arange(n) - n // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    strong = np.abs(data) >= threshold * data.max()
    return float(r[strong].max()) if strong.any() else 0.0


def _circle(box: int, radius: float) -> np.ndarray:
    g = np.arange(box) - box // 2
    return (g[:, None] ** 2 + g[None, :] ** 2) <= radius**2


def _write_stack(path: Path, data: np.ndarray, pixel_size: float) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(data, dtype=np.float32))
        m.set_image_stack()
        m.voxel_size = pixel_size


def make_class2d_set(
    outdir,
    *,
    map_path=None,
    n_particles: int = 2000,
    box: int = 64,
    n_views: int = 8,
    snr: float = 0.08,
    pixel_size: float | None = None,
    max_offset_px: float = 3.0,
    defocus_range=(10000.0, 30000.0),
    max_astigmatism: float = 500.0,
    seed: int = 0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    particles_per_micrograph: int = 100,
    map_pixel_size: float | None = None,
    center_map: bool = True,
    bg_radius: int | None = None,
    keep_noisy: bool = False,
    noise: str = "numpy",
    optics_groups=None,
    relion_bin_dir=None,
) -> ClassSet:
    """Make a 2D-classification set of known truth with RELION's own tools.

    Steps: (1) the map is centred on its centre of mass (NumPy Fourier shift) and resampled
    and windowed to ``box`` at ``pixel_size`` by ``relion_image_handler --rescale_angpix
    --new_box``; (2) ``n_views`` well-separated directions are chosen (:func:`fibonacci_views`);
    particle ``i`` gets view ``perm(i % n_views)``, psi uniform in [0, 360), an origin uniform
    in the disc of radius ``max_offset_px`` and a random astigmatic defocus; (3)
    ``relion_project --ctf --ang`` makes the noiseless CTF-affected projections
    (``clean.mrcs``); (4) white Gaussian noise is added (NumPy, seeded, or ``relion_project
    --add_noise``: ``noise``), its variance set so that (variance of the clean projections
    inside the particle's circle) / (noise variance) = ``snr``; (5) ``relion_preprocess
    --operate_on --norm --bg_radius`` normalises (background mean 0, stddev 1) into
    ``particles.mrcs``; (6) ``particles.star`` (RELION 3.1) and ``truth.csv`` are written.

    Parameters
    ----------
    outdir : str or os.PathLike
        Folder for the set (created; files in it are overwritten).
    map_path : str or os.PathLike, optional
        Cubic map; default the 70S ribosome 65^3 map (:func:`default_map_path`), whose header
        voxel size of 0 is read as :data:`RIBOSOME_70S_PIXEL_SIZE` (5 A).
    n_particles, box, n_views : int
        Set size, image size (px), number of distinct views (= classes to find).
    snr : float
        Pixel SNR after CTF, defined above.
    pixel_size : float, optional
        A/px of the particles; default ``1.25 * (map extent in A) / box``, so the whole map
        fits with a margin. RELION rounds it so that the resampled map has an even integer
        size; the value used is read back from the map header (ribosome: 6.35 asked, 6.5 A/px
        used at box 64, i.e. 50^3 padded to 64^3; 10.156 A/px at box 40).
    max_offset_px : float
        Largest origin (px).
    defocus_range : (float, float)
        Mean defocus drawn uniformly in this range (A).
    max_astigmatism : float
        ``rlnDefocusU - rlnDefocusV`` drawn uniformly in [0, this] (A); angle uniform [0, 180).
    seed : int
        Everything random derives from it; same seed, same files.
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction.
    particles_per_micrograph : int
        Particles sharing one ``rlnMicrographName`` (RELION's default grouping for ``--scale``).
    map_pixel_size : float, optional
        Overrides the map header's voxel size.
    center_map : bool
        Centre the map's positive density before projecting.
    bg_radius : int, optional
        ``--bg_radius`` for normalisation (px); default the larger of RELION's default
        (75 % of the box radius) and the particle's radius + 1, at most ``box//2 - 1``.
    keep_noisy : bool
        Keep the noisy stack before normalisation (``noisy.mrcs``).
    noise : {"numpy", "relion"}
        Who adds the white noise of step (4): NumPy (seeded by ``seed``), or ``relion_project
        --ctf --add_noise --white_noise sigma`` projecting the map again (RELION's own
        generator, which starts from the same state every run: the same poses give the same
        noise whatever ``seed``).
    optics_groups : sequence of dict, optional
        Several optics groups (RELION 3.1's ``data_optics`` rows), each a dict that may set
        ``voltage``, ``cs`` and ``amplitude_contrast`` (the others from the arguments above);
        the micrographs are dealt to the groups in turn (micrograph ``m`` to group
        ``m % len(optics_groups) + 1``), and ``relion_project`` applies each group's CTF.
        Default: one group.
    relion_bin_dir : str or os.PathLike, optional
        Folder of RELION's programs; default ``$PATH``.

    Returns
    -------
    ClassSet

    Raises
    ------
    InputError
        Bad map or options.
    RelionCommandError
        A RELION program is missing or failed (the message gives the command and its output).
    """
    if n_particles < 1 or box < 8 or box % 2:
        raise InputError(f"need n_particles >= 1 and an even box >= 8, got {n_particles}, {box}")
    if not 1 <= n_views <= n_particles:
        raise InputError(f"n_views must be in [1, n_particles], got {n_views}")
    if snr <= 0:
        raise InputError(f"snr must be > 0, got {snr}")
    if noise not in ("numpy", "relion"):
        raise InputError(f"noise must be 'numpy' or 'relion', got {noise!r}")
    if max_offset_px < 0 or max_offset_px >= box / 4:
        raise InputError(f"max_offset_px must be in [0, box/4), got {max_offset_px}")
    groups = [dict(g) for g in (optics_groups or [{}])]
    for g in groups:
        unknown = set(g) - {"voltage", "cs", "amplitude_contrast"}
        if unknown:
            raise InputError(f"optics_groups: unknown key(s) {sorted(unknown)}; a group may set "
                             "voltage, cs and amplitude_contrast")
    lo, hi = map(float, defocus_range)
    if not 0 < lo <= hi:
        raise InputError(f"defocus_range must be 0 < lo <= hi, got {defocus_range}")
    tools = {
        t: find_relion_tool(t, relion_bin_dir)
        for t in ("relion_image_handler", "relion_project", "relion_preprocess")
    }
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence(seed)
    rng_pose, rng_noise = (np.random.default_rng(s) for s in ss.spawn(2))

    # 1. map ------------------------------------------------------------------------------
    data, vox = _read_map(default_map_path() if map_path is None else map_path, map_pixel_size)
    if center_map:
        data = _centre_map(data)
    n_in = data.shape[0]
    if pixel_size is None:
        pixel_size = 1.25 * n_in * vox / box
    src = outdir / "map_input.mrc"
    with mrcfile.new(src, overwrite=True) as m:
        m.set_data(data.astype(np.float32))
        m.voxel_size = vox
    map_out = outdir / "map.mrc"
    _run([tools["relion_image_handler"], "--i", src.name, "--o", map_out.name,
          "--angpix", f"{vox:.6f}", "--rescale_angpix", f"{pixel_size:.6f}",
          "--new_box", str(box)], outdir, "resampling the map")
    src.unlink()
    with mrcfile.open(map_out, mode="r+") as m:
        if m.data.shape != (box, box, box):
            raise RelionCommandError(f"relion_image_handler made a map of shape "
                                     f"{m.data.shape}, expected {(box,) * 3}")
        pixel_size = float(m.voxel_size.x)
        vol = np.asarray(m.data, dtype=np.float64)
    radius_px = _extent_radius(vol)
    particle_diameter = min(2.0 * (radius_px + 2) * pixel_size, (box - 2) * pixel_size)
    if bg_radius is None:
        bg_radius = max(round(0.375 * box), math.ceil(radius_px) + 1)
    bg_radius = int(min(bg_radius, box // 2 - 1))

    # 2. poses ----------------------------------------------------------------------------
    view_angles, sep = fibonacci_views(n_views, rng_pose)
    views = rng_pose.permutation(np.arange(n_particles) % n_views)
    psi = rng_pose.uniform(0.0, 360.0, n_particles)
    r = max_offset_px * np.sqrt(rng_pose.uniform(0.0, 1.0, n_particles))
    th = rng_pose.uniform(0.0, 2 * np.pi, n_particles)
    ox, oy = r * np.cos(th), r * np.sin(th)
    dmean = rng_pose.uniform(lo, hi, n_particles)
    astig = rng_pose.uniform(0.0, max_astigmatism, n_particles)
    dang = rng_pose.uniform(0.0, 180.0, n_particles)
    mic = np.arange(n_particles) // max(1, particles_per_micrograph)
    group = mic % len(groups) + 1  # each particle's optics group (1-based)
    truth = pd.DataFrame({
        "image_name": [f"{i + 1:06d}@particles.mrcs" for i in range(n_particles)],
        "view": views.astype(int),
        "rot": view_angles[views, 0],
        "tilt": view_angles[views, 1],
        "psi": psi,
        "origin_x_px": ox,
        "origin_y_px": oy,
        "origin_x_A": ox * pixel_size,
        "origin_y_A": oy * pixel_size,
        "defocus_u": dmean + astig / 2,
        "defocus_v": dmean - astig / 2,
        "defocus_angle": dang,
        "micrograph": [f"mics/mic{m + 1:04d}.mrc" for m in mic],
        "optics_group": group,
    })
    ng = len(groups)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(ng)],
        "rlnOpticsGroup": np.arange(1, ng + 1),
        "rlnVoltage": [float(g.get("voltage", voltage)) for g in groups],
        "rlnSphericalAberration": [float(g.get("cs", cs)) for g in groups],
        "rlnAmplitudeContrast": [float(g.get("amplitude_contrast", amplitude_contrast))
                                 for g in groups],
        "rlnImagePixelSize": [pixel_size] * ng,
        "rlnImageSize": [box] * ng,
        "rlnImageDimensionality": [2] * ng,
    })
    ctf_cols = {
        "rlnDefocusU": truth["defocus_u"].to_numpy(),
        "rlnDefocusV": truth["defocus_v"].to_numpy(),
        "rlnDefocusAngle": truth["defocus_angle"].to_numpy(),
        "rlnCtfBfactor": np.zeros(n_particles),
        "rlnCtfScalefactor": np.ones(n_particles),
        "rlnPhaseShift": np.zeros(n_particles),
    }
    ang = pd.DataFrame({
        "rlnAngleRot": truth["rot"].to_numpy(),
        "rlnAngleTilt": truth["tilt"].to_numpy(),
        "rlnAnglePsi": truth["psi"].to_numpy(),
        "rlnOriginXAngst": truth["origin_x_A"].to_numpy(),
        "rlnOriginYAngst": truth["origin_y_A"].to_numpy(),
        **ctf_cols,
        "rlnOpticsGroup": group,
    })
    write_relion31_star(outdir / "project_in.star", {"optics": optics, "particles": ang})

    # 3. noiseless CTF projections -------------------------------------------------------
    _run([tools["relion_project"], "--i", map_out.name, "--ang", "project_in.star",
          "--o", "clean", "--ctf", "--angpix", f"{pixel_size:.6f}"], outdir,
         "projecting the map")
    clean_star, clean_mrcs = outdir / "clean.star", outdir / "clean.mrcs"
    with mrcfile.mmap(clean_mrcs, mode="r+") as m:
        if m.data.shape != (n_particles, box, box):
            raise RelionCommandError(f"relion_project wrote {m.data.shape}, expected "
                                     f"{(n_particles, box, box)}", output_tail=str(clean_mrcs))
        m.voxel_size = pixel_size
        clean = np.asarray(m.data, dtype=np.float32).copy()

    # 4. noise ---------------------------------------------------------------------------
    inside = _circle(box, radius_px)
    signal_var = float(clean[:, inside].astype(np.float64).var())
    if not signal_var > 0:
        raise InputError("the projections are blank: is the map empty?", map_out)
    sigma = math.sqrt(signal_var / snr)
    if noise == "relion":
        del clean
        _run([tools["relion_project"], "--i", map_out.name, "--ang", "project_in.star",
              "--o", "noisy", "--ctf", "--angpix", f"{pixel_size:.6f}", "--add_noise",
              "--white_noise", f"{sigma:.9g}"], outdir, "projecting the map with noise")
        (outdir / "noisy.star").unlink(missing_ok=True)
    else:
        noisy = clean + (rng_noise.standard_normal(clean.shape, dtype=np.float32)
                         * np.float32(sigma))
        del clean
        _write_stack(outdir / "noisy.mrcs", noisy, pixel_size)
        del noisy

    # 5. normalisation as RELION's extraction does --------------------------------------
    _run([tools["relion_preprocess"], "--operate_on", "noisy.mrcs", "--norm",
          "--bg_radius", str(bg_radius), "--operate_out", "particles.mrcs"], outdir,
         "normalising the particles")
    stack = outdir / "particles.mrcs"
    with mrcfile.mmap(stack, mode="r+") as m:  # relion_preprocess writes voxel size 0
        m.voxel_size = pixel_size
    if not keep_noisy:
        (outdir / "noisy.mrcs").unlink()

    # 6. STAR + truth --------------------------------------------------------------------
    parts = pd.DataFrame({
        "rlnImageName": truth["image_name"],
        "rlnMicrographName": truth["micrograph"],
        **ctf_cols,
        "rlnOpticsGroup": group,
    })
    star = write_relion31_star(outdir / "particles.star",
                               {"optics": optics, "particles": parts})
    truth.to_csv(outdir / "truth.csv", index=False, float_format="%.6f")
    result = ClassSet(
        particles_star=star, stack=stack, map=map_out, truth=truth, n_views=n_views,
        pixel_size=pixel_size, box=box, view_angles=view_angles, view_separation_deg=sep,
        particle_diameter=float(round(particle_diameter)), bg_radius=bg_radius,
        noise_sigma=sigma, signal_variance=signal_var, snr=signal_var / sigma**2,
        clean_star=clean_star,
    )
    version = _run([tools["relion_project"], "--version"], outdir, "asking RELION's version")
    meta = {
        "n_particles": n_particles, "n_views": n_views, "box": box, "pixel_size": pixel_size,
        "snr": result.snr, "noise_sigma": sigma, "signal_variance": signal_var,
        "particle_diameter": result.particle_diameter, "bg_radius": bg_radius,
        "view_angles": view_angles.tolist(), "view_separation_deg": sep.tolist(),
        "max_offset_px": max_offset_px, "defocus_range": [lo, hi],
        "max_astigmatism": max_astigmatism, "voltage": voltage, "cs": cs,
        "amplitude_contrast": amplitude_contrast, "seed": seed, "noise": noise,
        "optics_groups": json.loads(optics.to_json(orient="records")),
        "map_path": str(default_map_path() if map_path is None else map_path),
        "map_pixel_size": vox, "center_map": center_map,
        "relion_version": " ".join(version.stdout.split()),
    }
    (outdir / "set.json").write_text(json.dumps(meta, indent=1) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# relion_refine 2D
# --------------------------------------------------------------------------------------------


@dataclass
class RelionRun:
    """A finished ``relion_refine`` run.

    Attributes
    ----------
    root : pathlib.Path
        Output root (``outdir/run``); files are ``run_it###_*``.
    command : list of str
    iterations : int
        Last iteration written.
    seconds_per_iteration : numpy.ndarray, shape (iterations,)
        Wall time of iterations 1..N: differences of the newest modification time of each
        iteration's files (``_it000_`` is written after initialisation).
    init_seconds : float
        From start to the ``_it000_`` files.
    total_seconds : float
        Wall time of the whole command.
    cpu_seconds_per_iteration : numpy.ndarray, shape (iterations,)
        CPU time (user + system, all threads) of each iteration, sampled from
        ``/proc/PID/stat`` when each iteration's files appear (Linux; NaN elsewhere and under
        MPI). Less sensitive than wall time to other jobs sharing the cores.
    total_cpu_seconds : float
        CPU time of the whole command (``os.wait4``; children included).
    data_star, model_star, classes_mrcs, optimiser_star, sampling_star : pathlib.Path
        The last iteration's files.
    log : pathlib.Path
        ``relion_refine``'s stdout+stderr.
    cwd : pathlib.Path
        Folder it ran in (image names in ``data_star`` are relative to it).
    """

    root: Path
    command: list
    iterations: int
    seconds_per_iteration: np.ndarray
    init_seconds: float
    total_seconds: float
    cpu_seconds_per_iteration: np.ndarray
    total_cpu_seconds: float
    data_star: Path
    model_star: Path
    classes_mrcs: Path
    optimiser_star: Path
    sampling_star: Path
    log: Path
    cwd: Path

    def iteration_file(self, it: int, kind: str) -> Path:
        """Path of ``run_it{it:03d}_{kind}``, e.g. ``kind="model.star"``."""
        return Path(f"{self.root}_it{it:03d}_{kind}")

    def model_general(self) -> pd.DataFrame:
        """``data_model_general`` of every iteration (one row per iteration)."""
        rows = []
        for it in range(self.iterations + 1):
            f = self.iteration_file(it, "model.star")
            if f.is_file():
                g = starfile.read(f, read_n_blocks=1)
                g = g if isinstance(g, pd.DataFrame) else pd.DataFrame([g])
                rows.append(g.assign(iteration=it))
        return pd.concat(rows, ignore_index=True)


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads); NaN if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _iteration_mtimes(root: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for f in root.parent.glob(root.name + "_it*_*"):
        try:
            it = int(f.name[len(root.name) + 3 : len(root.name) + 6])
        except ValueError:
            continue
        out[it] = max(out.get(it, 0.0), f.stat().st_mtime)
    return out


def run_relion_class2d(
    particles_star,
    outdir,
    *,
    K: int,
    iterations: int = 25,
    tau2_fudge: float = 2.0,
    particle_diameter: float,
    psi_step: float = 10.0,
    offset_range: float = 5.0,
    offset_step: float = 2.0,
    ctf: bool = True,
    zero_mask: bool = True,
    flatten_solvent: bool = True,
    norm: bool = True,
    scale: bool = True,
    pool: int = 3,
    threads: int = 2,
    seed: int = 0,
    mpi_ranks: int = 1,
    extra: Sequence[str] = (),
    progress: bool = True,
    timeout: float | None = None,
    relion_bin_dir=None,
) -> RelionRun:
    """Run ``relion_refine`` 2D classification as RELION's GUI does, timing each iteration.

    The command is::

        relion_refine --i STAR --o OUTDIR/run --dont_combine_weights_via_disc --pool 3 --pad 2
          [--ctf] --iter N --tau2_fudge T --particle_diameter D --K K [--flatten_solvent]
          [--zero_mask] --oversampling 1 --psi_step S --offset_range R --offset_step St
          [--norm] [--scale] --j THREADS --random_seed SEED [EXTRA...]

    (the RELION 3.1 GUI's Class2D job; note that the GUI's "in-plane angular sampling" and
    "offset search step" are the oversampled values and it passes twice them: GUI 6 deg / 1 px
    -> ``--psi_step 12 --offset_step 2``). It runs from the STAR file's folder, because image
    names are relative to it.

    Parameters
    ----------
    particles_star : str or os.PathLike
        Input particles (RELION 3.1 STAR).
    outdir : str or os.PathLike
        Output folder (created); files ``outdir/run_it###_*``.
    K, iterations : int
        Classes, EM iterations.
    tau2_fudge : float
        Regularisation T.
    particle_diameter : float
        Mask diameter (A).
    psi_step, offset_range, offset_step : float
        Coarse in-plane step (deg), offset search radius and step (px).
    ctf, zero_mask, flatten_solvent, norm, scale : bool
        The corresponding flags.
    pool, threads : int
        ``--pool``, ``--j``.
    seed : int
        ``--random_seed``.
    mpi_ranks : int
        > 1: ``mpirun -n mpi_ranks relion_refine_mpi`` (one leader + workers).
    extra : sequence of str
        More arguments, appended.
    progress : bool
        Show a tqdm bar over iterations.
    timeout : float, optional
        Seconds before the run is killed (RelionCommandError).
    relion_bin_dir : str or os.PathLike, optional

    Returns
    -------
    RelionRun
    """
    particles_star = Path(particles_star).resolve()
    if not particles_star.is_file():
        raise InputError("particles STAR not found", particles_star)
    outdir = Path(outdir).resolve()
    if any(ch.isspace() for ch in str(outdir)):
        raise InputError("RELION writes this path into STAR files, which cannot hold white "
                         "space: choose a folder without spaces", outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    root = outdir / "run"
    for f in outdir.glob("run_it*_*"):
        f.unlink()
    prog = "relion_refine" if mpi_ranks <= 1 else "relion_refine_mpi"
    cmd = [find_relion_tool(prog, relion_bin_dir)]
    if mpi_ranks > 1:
        cmd = [find_relion_tool("mpirun"), "-n", str(mpi_ranks), *cmd]
    cmd += ["--i", particles_star.name, "--o", str(root),
            "--dont_combine_weights_via_disc", "--pool", str(pool), "--pad", "2"]
    cmd += ["--ctf"] if ctf else []
    cmd += ["--iter", str(iterations), "--tau2_fudge", f"{tau2_fudge:g}",
            "--particle_diameter", f"{particle_diameter:g}", "--K", str(K)]
    cmd += ["--flatten_solvent"] if flatten_solvent else []
    cmd += ["--zero_mask"] if zero_mask else []
    cmd += ["--oversampling", "1", "--psi_step", f"{psi_step:g}",
            "--offset_range", f"{offset_range:g}", "--offset_step", f"{offset_step:g}"]
    cmd += ["--norm"] if norm else []
    cmd += ["--scale"] if scale else []
    cmd += ["--j", str(threads), "--random_seed", str(seed), *map(str, extra)]

    log = outdir / "run.log"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, desc=f"relion_refine K={K}", unit="it")
    t0 = time.time()
    done = -1
    cpu_at: dict = {}  # iteration -> CPU seconds of relion_refine when its files appeared
    rusage = None
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=particles_star.parent, stdout=fh,
                                    stderr=subprocess.STDOUT)
        except OSError as exc:
            raise RelionCommandError(f"could not start {cmd[0]}: {exc}", cmd) from exc
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    rusage = ru
                    break
                time.sleep(0.25)
                if timeout is not None and time.time() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise RelionCommandError(
                        f"relion_refine ran over {timeout} s and was killed: {' '.join(cmd)}",
                        cmd, None, _tail(log.read_text()))
                its = [i for i in range(done + 1, iterations + 1)
                       if Path(f"{root}_it{i:03d}_optimiser.star").exists()]
                if its:
                    cpu_now = _process_cpu_seconds(proc.pid)
                    for i in its:
                        cpu_at[i] = cpu_now
                    if bar is not None:
                        bar.update(max(its) - max(done, 0))
                    done = max(its)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            if bar is not None:
                bar.close()
    total = time.time() - t0
    cpu_total = rusage.ru_utime + rusage.ru_stime if rusage is not None else float("nan")
    if proc.returncode != 0:
        tail = _tail(log.read_text())
        raise RelionCommandError(
            f"relion_refine failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"(cwd {particles_star.parent}; log {log})\n{tail}", cmd, proc.returncode, tail)
    mt = _iteration_mtimes(root)
    if not mt:
        raise RelionCommandError(f"relion_refine wrote no iteration files under {root}", cmd)
    last = max(mt)
    secs = np.array([mt[i] - mt[i - 1] for i in range(1, last + 1)]) if last else np.zeros(0)
    cpu_at.setdefault(last, cpu_total)  # the last files may appear after the final poll
    cpu_marks = [cpu_at.get(i, float("nan")) for i in range(last + 1)]
    cpu = np.array([cpu_marks[i] - cpu_marks[i - 1] for i in range(1, last + 1)])
    if mpi_ranks > 1:  # /proc sees only mpirun
        cpu[:] = np.nan

    def final(kind):
        return Path(f"{root}_it{last:03d}_{kind}")

    return RelionRun(
        root=root, command=cmd, iterations=last, seconds_per_iteration=secs,
        init_seconds=float(mt[0] - t0) if 0 in mt else float("nan"), total_seconds=total,
        cpu_seconds_per_iteration=cpu, total_cpu_seconds=float(cpu_total),
        data_star=final("data.star"), model_star=final("model.star"),
        classes_mrcs=final("classes.mrcs"), optimiser_star=final("optimiser.star"),
        sampling_star=final("sampling.star"), log=log,
        cwd=particles_star.parent,
    )


def read_relion_data(data_star, order_by=None) -> pd.DataFrame:
    """The ``particles`` block of a RELION ``_data.star``, optionally put in a given order.

    Parameters
    ----------
    data_star : str or os.PathLike
    order_by : sequence of str, optional
        Image names (``rlnImageName``) in the wanted order, e.g. ``truth["image_name"]``;
        RELION keeps the input order, but this makes it explicit and checks it.

    Returns
    -------
    pandas.DataFrame
    """
    d = starfile.read(data_star, always_dict=True)
    if "particles" not in d:
        raise InputError(f"no data_particles block (blocks: {list(d)})", data_star)
    p = d["particles"]
    if order_by is not None:
        idx = pd.Index(p["rlnImageName"])
        pos = idx.get_indexer(list(order_by))
        if (pos < 0).any():
            raise InputError("some particles of the truth are missing", data_star)
        p = p.iloc[pos].reset_index(drop=True)
    return p


def score_relion_run(run, class_set: ClassSet) -> dict:
    """Score a RELION 2D run against a set's truth (:func:`cryonb.testing.score_class2d`).

    Parameters
    ----------
    run : RelionRun or str or os.PathLike
        The run, or its ``_data.star``.
    class_set : ClassSet

    Returns
    -------
    dict
    """
    data_star = run.data_star if isinstance(run, RelionRun) else Path(run)
    est = read_relion_data(data_star, order_by=class_set.truth["image_name"])
    return score_class2d(est, class_set.truth, pixel_size=class_set.pixel_size)


# --------------------------------------------------------------------------------------------
# what classification reaches when the classes are right
# --------------------------------------------------------------------------------------------


def view_templates(class_set: ClassSet, workdir=None, relion_bin_dir=None) -> np.ndarray:
    """Each view's noiseless projection, in the units of the set's normalised particles.

    ``relion_project --rot --tilt --psi 0`` of the set's map (origin 0, no CTF), divided by
    the set's ``noise_sigma``: ``relion_preprocess --norm`` divided each particle by its
    background's standard deviation, which is the noise's.

    Parameters
    ----------
    class_set : ClassSet
    workdir : str or os.PathLike, optional
        Folder for the projections (default: ``templates/`` in the set's folder).

    Returns
    -------
    ndarray of shape (n_views, box, box), float64
    """
    if class_set.view_angles is None or not class_set.noise_sigma > 0:
        raise InputError("the set has no view angles or noise level (set.json)",
                         class_set.outdir)
    exe = find_relion_tool("relion_project", relion_bin_dir)
    work = Path(workdir) if workdir is not None else class_set.outdir / "templates"
    work.mkdir(parents=True, exist_ok=True)
    out = np.empty((class_set.n_views, class_set.box, class_set.box))
    for k, (rot, tilt) in enumerate(np.asarray(class_set.view_angles, float)):
        name = f"view{k:03d}.mrc"
        _run([exe, "--i", str(Path(class_set.map).resolve()), "--o", name, "--rot",
              f"{rot:.6f}", "--tilt", f"{tilt:.6f}", "--psi", "0", "--angpix",
              f"{class_set.pixel_size:.6f}"], work, f"projecting view {k}")
        with mrcfile.open(work / name, permissive=True) as m:
            out[k] = np.asarray(m.data, dtype=np.float64).reshape(class_set.box, class_set.box)
    return out / class_set.noise_sigma


def oracle_purity(optimiser_star, class_set: ClassSet, workdir=None, pool: int = 256,
                  n_fixed: int = 2, seed: int = 0) -> dict:
    """The purity of a cryonb run's E-step with classes made from the true views.

    The particles are split in two halves at random. For each half, the run's last iteration
    is reloaded (noise model, offsets, norm and scale corrections, image sizes, sampling),
    its class images are replaced by :func:`view_templates`, and ``n_fixed`` EM iterations on
    that half with every particle held to its true view (RELION-style class restriction)
    make class averages on the data's own scale and filtering. One E-step on the grid without
    perturbation then assigns the *other* half freely, so no particle helps make the classes
    it is judged against (a particle inside its class's average would gain ~P/n nats for
    its own class).

    This is what classification reaches when the classes are right: a reference for a
    run's purity, not a strict bound (the classes come from half the particles, so they are
    noisier than a run's; measured 2026-12-05 on 64 px sets at pixel SNR 0.05-0.08: runs
    0.961 / 0.966 against 0.963 / 0.973 here; at 48 px, SNR 0.25: 0.995 against 0.981).

    Parameters
    ----------
    optimiser_star : str or os.PathLike
        A cryonb run's ``_optimiser.star`` on ``class_set``, with ``--K`` = the number of views.
    class_set : ClassSet
    workdir : str or os.PathLike, optional
        Folder for the projections (see :func:`view_templates`).
    pool : int
        Particles per E-step batch.
    n_fixed : int
        EM iterations with the classes held to the truth.
    seed : int
        Seed of the split in halves.

    Returns
    -------
    dict
        ``purity`` (majority view per class, :func:`~cryonb.testing.class_purity`) and
        ``accuracy`` (class ``k`` taken as view ``k``).
    """
    from ..em.class2d import Class2DJob
    from .metrics import class_purity

    view = class_set.truth["view"].to_numpy()
    templates = view_templates(class_set, workdir)
    half = np.random.default_rng(seed).permutation(len(view)) % 2
    cls = np.full(len(view), -1, np.int64)

    def pools(idx):
        return [idx[i : i + pool] for i in range(0, len(idx), pool)]

    for h in (0, 1):
        job = Class2DJob.from_optimiser(optimiser_star, cpu=True)
        if job.config.K != class_set.n_views:
            raise InputError(f"the run has --K {job.config.K} but the set {class_set.n_views}"
                             " views: the oracle needs one class per view", optimiser_star)
        if job.n != len(view):
            raise InputError(f"the run has {job.n} particles, the set {len(view)}",
                             optimiser_star)
        m, K = job.model, job.config.K
        m.classes = templates.astype(m.classes.dtype)
        m.pdf_class = np.full(K, 1.0 / K)
        m.prior_offset = np.zeros_like(m.prior_offset)
        make, test = np.flatnonzero(half == h), np.flatnonzero(half != h)
        for _ in range(n_fixed):
            job.seed_class = view.copy()
            job.model.perturb = 0.0
            ctx = job.estep_context(np)
            for p in pools(make):
                job.store_results(p, ctx.expectation(job.make_batch(job.batch_meta(p),
                                                                    job.table.images(p))))
            job.maximize(ctx.finish().to_host())
        job.model.perturb = 0.0
        ctx = job.estep_context(np)
        for p in pools(test):
            res = ctx.expectation(job.make_batch(job.batch_meta(p), job.table.images(p)))
            cls[p] = res[:, 0].astype(np.int64)
    return {"purity": class_purity(cls, view), "accuracy": float(np.mean(cls == view))}
