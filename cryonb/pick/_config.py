"""Configuration of template autopicking (``relion_autopick`` flag names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import JobConfig, option
from ..errors import ConfigError

__all__ = ["AutopickConfig", "as_config"]


@dataclass
class AutopickConfig(JobConfig):
    """All options of a template autopicking run; the CLI, widgets and sweeps build this object.

    Flags and defaults are ``relion_autopick``'s (template matching, RELION 3.1), so that a
    RELION command line runs unchanged with ``cryonb autopick``. ``psi_step`` is RELION's
    ``--ang`` (both flags are accepted). Every rank works (an all-ranks job): micrographs are
    split in contiguous blocks over ``ranks``, and each rank picks on one device (the first of
    its ``--gpu`` group) with ``j`` threads. See :mod:`cryonb.pick` for the algorithm.

    Units: pixel sizes and distances in Angstrom; thresholds in RELION's figure-of-merit
    units; ``max_stddev_noise``/``min_avg_noise`` in units of the z-scored micrograph.
    """

    #: micrographs are split over the ranks whole, read by the rank that works on them
    CLI_UNUSED: ClassVar[tuple[str, ...]] = ("pool", "io_mode", "scratch_dir",
                                             "keep_free_scratch", "combine")

    PROGRAM: ClassVar[str] = "cryonb autopick"
    RELION_PROGRAM: ClassVar[str] = "relion_autopick"

    i: str = option("", "--i", "micrographs STAR file (or a glob of MRC files)", group="io")
    ref: str = option("", "--ref", "2D references: MRC stack (e.g. _classes.mrcs) or STAR "
                      "file with rlnReferenceImage / rlnImageName", group="io")
    odir: str = option("AutoPick/", "--odir", "output folder for the coordinate files",
                       group="io", relion_default="AutoPick/")
    pickname: str = option("autopick", "--pickname", "coordinate files are "
                           "<odir><micrograph>_<pickname>.star", group="io",
                           relion_default="autopick")
    angpix: float = option(-1.0, "--angpix", "micrograph pixel size (A); taken from the STAR "
                           "file when it has rlnMicrographPixelSize", relion_default=-1.0)
    angpix_ref: float = option(-1.0, "--angpix_ref", "pixel size of the references (A); "
                               "-1 = same as the micrographs", relion_default=-1.0)
    particle_diameter: float = option(-1.0, "--particle_diameter", "particle mask diameter "
                                      "(A); -1 = estimated from the references",
                                      relion_default=-1.0)
    shrink_particle_mask: int = option(2, "--shrink_particle_mask", "shrink the particle mask "
                                       "by this many pixels", relion_default=2)
    psi_step: float = option(10.0, "--ang", "in-plane angular sampling (degrees); 360 = no "
                             "rotation", group="sampling", relion_default=10.0)
    lowpass: float = option(-1.0, "--lowpass", "compare references and micrographs up to "
                            "this resolution (A); -1 = no limit", relion_default=-1.0)
    ctf: bool = option(False, "--ctf", "multiply the references by each micrograph's CTF")
    ctf_intact_first_peak: bool = option(False, "--ctf_intact_first_peak",
                                         "leave the CTF at 1 up to its first peak")
    invert: bool = option(False, "--invert", "the density in the micrographs is inverted "
                          "with respect to the references (dark particles, white references)")
    threshold: float = option(0.25, "--threshold", "minimum figure of merit of a pick "
                              "(fraction of the expected probability ratio)",
                              relion_default=0.25)
    min_distance: float = option(-1.0, "--min_distance", "minimum distance between picks (A); "
                                 "-1 = half the reference box", relion_default=-1.0)
    max_stddev_noise: float = option(-1.0, "--max_stddev_noise", "no picks where the local "
                                     "background std exceeds this (-1 = no limit)",
                                     relion_default=-1.0)
    min_avg_noise: float = option(-999.0, "--min_avg_noise", "no picks where the local "
                                  "background mean is below this (-999 = no limit)",
                                  relion_default=-999.0)
    skip_side: int = option(0, "--skip_side", "extra border (pixels) without picks",
                            relion_default=0)
    shrink: float = option(1.0, "--shrink", "size of the FOM maps: fraction (0, 1] of the "
                           "micrograph, 0 = the --lowpass size, > 1 = pixels",
                           group="sampling", relion_default=1.0)
    skip_optimise_scale: bool = option(False, "--skip_optimise_scale", "keep the FOM map size "
                                       "even when its FFTs have large prime factors",
                                       group="sampling")
    outlier_removal_zscore: float = option(8.0, "--outlier_removal_zscore", "replace "
                                           "micrograph pixels this many sigma from the mean",
                                           relion_default=8.0)
    random_seed: int = option(1, "--random_seed", "seed of the expected-ratio noise "
                              "(micrograph i uses seed + i)", relion_default=1)
    only_do_unfinished: bool = option(False, "--only_do_unfinished", "skip micrographs whose "
                                      "coordinate file exists", group="io")

    def validate(self) -> AutopickConfig:
        """Check options (see :meth:`JobConfig.validate`) and the job's own ranges."""
        super().validate()
        checks = [
            (0 < self.psi_step <= 360, f"--ang {self.psi_step}: must be in (0, 360] degrees"),
            (self.lowpass == -1 or self.lowpass > 0,
             f"--lowpass {self.lowpass}: give a resolution in A (> 0) or -1 for none"),
            (self.angpix == -1 or self.angpix > 0,
             f"--angpix {self.angpix}: give a pixel size in A (> 0) or -1"),
            (self.angpix_ref == -1 or self.angpix_ref > 0,
             f"--angpix_ref {self.angpix_ref}: give a pixel size in A (> 0) or -1"),
            (self.particle_diameter == -1 or self.particle_diameter > 0,
             f"--particle_diameter {self.particle_diameter}: give a diameter in A (> 0) or -1"),
            (self.min_distance == -1 or self.min_distance > 0,
             f"--min_distance {self.min_distance}: give a distance in A (> 0) or -1"),
            (self.shrink >= 0, f"--shrink {self.shrink}: must be >= 0"),
            (self.skip_side >= 0, f"--skip_side {self.skip_side}: must be >= 0"),
            (self.shrink_particle_mask >= 0,
             f"--shrink_particle_mask {self.shrink_particle_mask}: must be >= 0"),
            (self.outlier_removal_zscore > 0,
             f"--outlier_removal_zscore {self.outlier_removal_zscore}: must be > 0"),
            (not self.ctf_intact_first_peak or self.ctf,
             "--ctf_intact_first_peak needs --ctf"),
            (bool(self.pickname) and "/" not in self.pickname,
             f"--pickname {self.pickname!r}: give a non-empty name without '/'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    @property
    def n_psi(self) -> int:
        """Number of in-plane angles: ``ROUND(360 / psi_step)`` (RELION evens the step out)."""
        return max(1, int(360.0 / self.psi_step + 0.5))

    @property
    def psi_angles(self) -> list[float]:
        """The in-plane angles searched (degrees): ``0, 360/n, ..., 360 (n-1)/n``."""
        n = self.n_psi
        return [360.0 * k / n for k in range(n)]

    def _relion_extra_args(self) -> list[str]:
        return []


def as_config(config, cls):
    """``config`` as a validated ``cls``: the object itself, or built from its ``to_dict()``
    (what engines receive).

    Raises
    ------
    ConfigError
        Anything else, or invalid values.
    """
    if isinstance(config, cls):
        return config.validate()
    if isinstance(config, dict):
        return cls.from_dict(config)
    raise ConfigError(f"expected a {cls.__name__} or its to_dict(), not {type(config).__name__}")
