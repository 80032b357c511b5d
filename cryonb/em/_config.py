"""Configuration of 2D classification (``relion_refine`` flag names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import JobConfig, option
from ..errors import ConfigError

__all__ = ["Class2DConfig"]


@dataclass
class Class2DConfig(JobConfig):
    """All options of a 2D classification run; the CLI, widgets and sweeps build this object.

    Flags are ``relion_refine``'s (``--i --o --K --iter --tau2_fudge ...``) so that a RELION
    command line runs unchanged with ``cryonb class2d``. Defaults are ``relion_refine``'s, except
    where noted (``tau2_fudge`` 2 and ``ctf``/``flatten_solvent``/``zero_mask``/``norm``/``scale``
    on, as RELION's GUI passes them, each with a ``--no_`` form; ``reseed`` is cryonb's own,
    see :mod:`cryonb.em.class2d`).
    """

    PROGRAM: ClassVar[str] = "cryonb class2d"
    RELION_PROGRAM: ClassVar[str] = "relion_refine"

    i: str = option("", "--i", "input particles STAR file", group="io")
    o: str = option("", "--o", "output rootname, e.g. Class2D/run", group="io")
    continue_from: str = option("", "--continue", "continue from this _optimiser.star (its "
                                "run's --iter, unless --iter is given, as relion_refine)",
                                group="io")
    angpix: float = option(-1.0, "--angpix", "pixel size (A) of particles whose STAR file "
                           "gives none (-1 = from the file's optics group)", group="io",
                           relion_default=-1.0)
    K: int = option(10, "--K", "number of classes")
    iter: int = option(25, "--iter", "number of iterations")
    tau2_fudge: float = option(2.0, "--tau2_fudge", "regularisation parameter T")
    particle_diameter: float = option(0.0, "--particle_diameter",
                                      "mask diameter in A (0 = 0.9 of the box)", relion_default=0.0)
    zero_mask: bool = option(True, "--zero_mask", "zeros outside the mask (else noise)")
    flatten_solvent: bool = option(True, "--flatten_solvent",
                                   "mask the class averages with the particle mask")
    ctf: bool = option(True, "--ctf", "do CTF correction (a STAR file without CTF "
                       "parameters is classified without it, with a warning)")
    ctf_intact_first_peak: bool = option(False, "--ctf_intact_first_peak",
                                         "leave the CTF uncorrected up to its first peak")
    psi_step: float = option(10.0, "--psi_step", "in-plane angular step (degrees)",
                             group="sampling")
    offset_range: float = option(6.0, "--offset_range", "offset search range (pixels)",
                                 group="sampling")
    offset_step: float = option(2.0, "--offset_step", "offset search step (pixels)",
                                group="sampling")
    oversampling: int = option(1, "--oversampling", "adaptive oversampling order (0 or 1)",
                               group="sampling", relion_default=1)
    adaptive_fraction: float = option(0.999, "--adaptive_fraction",
                                      "fraction of the weight kept in the fine pass",
                                      group="sampling", relion_default=0.999)
    maxsig: int = option(-1, "--maxsig", "at most this many significant coarse samples "
                         "(-1 = no limit)", group="sampling", relion_default=-1)
    perturb: float = option(0.5, "--perturb", "random perturbation of the sampling grids "
                            "each iteration (fraction of a step)", group="sampling",
                            relion_default=0.5)
    refine_pose: bool = option(True, "--refine_pose", "report each particle's psi and offsets "
                               "at the peak of a quadratic fitted to its log-posterior around "
                               "the best sample (finer than the grid; off: the best grid "
                               "sample, as RELION; cryonb)", group="sampling", relion=False)
    norm: bool = option(True, "--norm", "per-particle normalisation correction")
    scale: bool = option(True, "--scale", "per-group intensity scale correction")
    pad: int = option(2, "--pad", "oversampling of the Fourier grids", relion_default=2)
    incr_size: int = option(10, "--incr_size", "Fourier shells beyond the current resolution",
                            relion_default=10)
    strict_highres_exp: float = option(-1.0, "--strict_highres_exp",
                                       "never use data beyond this resolution (A) in the "
                                       "E-step (-1 = no limit)", relion_default=-1.0)
    random_seed: int = option(0, "--random_seed", "random seed (-1 = from the clock)")
    reseed: bool = option(True, "--reseed", "re-seed empty, junk and duplicate classes, "
                          "re-align junk classes and anneal the prior during the first "
                          "iterations, and keep the sampling grid in place in the last ones "
                          "(cryonb)",
                          relion=False)
    reseed_until: float = option(0.85, "--reseed_until", "last iteration that may re-seed, as "
                                 "a fraction of --iter (cryonb)", relion=False)
    tau2_anneal: float = option(8.0, "--tau2_anneal", "with --reseed: T is this many times "
                                "larger in the first M-step, back to T at 60% of --iter "
                                "(linearly; 1 = off; cryonb)", relion=False)
    tf32_from: float = option(0.85, "--tf32_from", "GPU: the coarse pass's matrix product "
                              "runs on TF32 tensor cores after this fraction of --iter, and "
                              "before it, while classes form and may be re-seeded (see "
                              "--reseed_until), as three TF32 products with float32's "
                              "accuracy (3x the product's time; 0 = TF32 throughout; "
                              "cryonb)", group="parallel", relion=False)
    write_every: int = option(1, "--write_every", "write full output every N iterations "
                              "(the last is always written)", relion=False)

    def validate(self) -> Class2DConfig:
        """Check options (see :meth:`JobConfig.validate`) and the job's own ranges."""
        super().validate()
        checks = [
            (self.K >= 1, "--K must be >= 1"),
            (self.iter >= 1 or self.continue_from, "--iter must be >= 1"),
            (self.tau2_fudge > 0, "--tau2_fudge must be > 0"),
            (0 < self.psi_step <= 180, "--psi_step must be in (0, 180] degrees"),
            (self.offset_range >= 0, "--offset_range must be >= 0"),
            (self.offset_step > 0, "--offset_step must be > 0"),
            (self.oversampling in (0, 1), "--oversampling must be 0 or 1"),
            (0 < self.adaptive_fraction <= 1, "--adaptive_fraction must be in (0, 1]"),
            (self.pad in (1, 2), "--pad must be 1 or 2"),
            (self.particle_diameter >= 0, "--particle_diameter must be >= 0"),
            (self.incr_size >= 0, "--incr_size must be >= 0"),
            (0 <= self.tf32_from <= 1, "--tf32_from must be in [0, 1] (a fraction of "
             "--iter)"),
            (self.tau2_anneal >= 1, "--tau2_anneal must be >= 1 (1 = no annealing)"),
            (self.angpix == -1 or self.angpix > 0, "--angpix must be > 0 (or -1: from the "
             "STAR file)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.io_mode == "preread" and self.scratch_dir:
            raise ConfigError("--preread_images and --scratch_dir were both given: RELION "
                              "silently ignores the scratch copy; choose one")
        return self

    def coarse_precision(self, iteration: int) -> str:
        """The precision of the GPU's coarse product in iteration ``iteration`` (1-based).

        ``"3xtf32"`` up to iteration ``round(tf32_from * iter)``, ``"tf32"`` after it (see
        :func:`cryonb.kernels.cross_products`); ``"float32"`` in every iteration where the
        environment sets ``CRYONB_TF32=0``. The CPU's product is float32 whatever this says.
        """
        from ..kernels import tf32_enabled

        if not tf32_enabled():
            return "float32"
        return "tf32" if iteration > round(self.tf32_from * self.iter) else "3xtf32"

    @property
    def n_psi(self) -> int:
        """Number of coarse in-plane angles (RELION rounds 360/psi_step up)."""
        import math

        return max(1, math.ceil(360.0 / self.psi_step - 1e-9))
