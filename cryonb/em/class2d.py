"""2D classification by maximum-likelihood EM, as ``relion_refine`` does it (see CLASS2D.md).

The algorithm is split into the pieces that the parallel runtime (:mod:`cryonb.parallel`)
places on ranks, so that one implementation serves one process, several threads and many
engines:

- :class:`Class2DJob` (the leader, rank 0): reads the particle table, builds the initial model,
  hands out pools of particles with their metadata, stores per-particle results, runs the
  M-step (:func:`cryonb.em._mstep.maximization`), re-seeds classes, writes RELION's files.
- :class:`cryonb.em._estep.EStepContext` (workers, one per thread and device): the E-step on
  pools of particles, as batched matrix products on NumPy (BLAS) or CuPy (cuBLAS).
- :class:`cryonb.em._model.Class2DSums`: the partial sums combined between them.

Class re-seeding (cryonb's addition, ``--reseed``, on by default): ML 2D classification can
settle in a local optimum where one class holds two views while two other classes describe the
same view (RELION 3.1 ends there on many simulated sets). During the first ``reseed_until``
part of the run, after an M-step (at most every other iteration), the leader frees classes that
are nearly empty, junk (their particles' maximum probabilities well below the median class's)
or the smaller of a duplicate pair (the same image up to an in-plane rotation and sub-pixel
shift), and gives each free slot one half of a class split in two: the largest classes when
their aligned particles fall into two well-separated clusters, and junk classes always (low
probabilities are how merged views show). A junk or crowded class with no free slot takes the
smaller class of a pair whose particles fit both almost equally well (one view split over two
classes; judged from the E-step's class margins), or, for a crowded class that splits
clearly, the smaller of two half-size classes that fit each other better than the rest. EM
then refines the two halves. See
:mod:`cryonb.em._reseed`. Where the leader drives a GPU (one rank with ``--gpu``), the class
similarities, split tests and re-alignments run there (``Class2DJob.reseed_device``). In the
same part of the run the prior is annealed (``--tau2_anneal``,
:meth:`Class2DJob.tau2_factor`): the regularisation parameter T starts larger and returns to
the user's value, which lets classes that are still blends of many views separate sooner on
noisy data. In the last ``SETTLE_FRACTION`` of the run the sampling
grid is no longer perturbed at random, so that the final classes do not depend on the last
draw (:meth:`Class2DJob.grid_perturbation`). ``--no_reseed`` gives the plain algorithm
(benchmarks/RESULTS.md compares the two).
"""

from __future__ import annotations

import functools
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError
from ._config import Class2DConfig
from ._estep import EStepContext, check_mask_radius, mask_radius, soft_circular_mask
from ._model import RESULT_COLUMNS, Class2DModel, Class2DSums, ParticleBatch
from ._mstep import InitSums, initial_model, initial_pass_sums, maximization

__all__ = ["ANNEAL_UNTIL", "REALIGN_JUNK", "REALIGN_MIN_GAIN", "RESEED_MIN_PMAX",
           "SETTLE_FRACTION", "SPLIT_BATCH_BYTES", "Class2DJob", "ParticleState"]

#: re-seeding starts once the average maximum posterior probability reaches this value
RESEED_MIN_PMAX = 0.2
#: prior annealing (``--tau2_anneal``) ends at this fraction of ``--iter``
ANNEAL_UNTIL = 0.6
#: with ``--reseed``, the last iterations (this fraction of ``--iter``) keep the sampling grid
#: in place: no random perturbation (:meth:`Class2DJob.grid_perturbation`)
SETTLE_FRACTION = 0.1
#: re-align junk classes that cannot be split (see :meth:`Class2DJob._maybe_reseed`)
REALIGN_JUNK = True
#: ... when the re-aligned average's log-likelihood is this much higher per particle
REALIGN_MIN_GAIN = 1.0
#: a GPU's split tests take the particles of several classes in one call
#: (``_reseed.split_classes``), as many as this many bytes of its arrays hold (about
#: 64 x size^2 bytes a particle at the tests' Fourier size: 0.26 MB at size 64, 1 MB at 128)
SPLIT_BATCH_BYTES = 1 << 30


def _group_ids(df: pd.DataFrame):
    """Scale groups: rlnGroupNumber, else rlnGroupName, else micrograph, else one group."""
    for col in ("rlnGroupNumber", "rlnGroupName", "rlnMicrographName"):
        if col in df.columns:
            codes, names = pd.factorize(df[col].astype(str), sort=True)
            return codes.astype(np.int64), [str(x) for x in names]
    return np.zeros(len(df), np.int64), ["group_1"]


@dataclass
class ParticleState:
    """Per-particle results the leader keeps between iterations (arrays of shape (n,))."""

    offset: np.ndarray  # (n, 2) pixels
    norm: np.ndarray
    cls: np.ndarray
    psi: np.ndarray
    pmax: np.ndarray
    loglik: np.ndarray
    n_sig: np.ndarray
    acc_rot: np.ndarray = field(default_factory=lambda: np.zeros(0))
    acc_trans: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: the pose written to _data.star (``--refine_pose``: finer than the grid); ``psi`` and
    #: ``offset`` are the best sample, the next iteration's search centre
    pose_psi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pose_offset: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def __post_init__(self):
        if len(self.pose_psi) != len(self.psi):
            self.pose_psi = np.array(self.psi, float)
        if len(self.pose_offset) != len(self.offset):
            self.pose_offset = np.array(self.offset, float)

    @classmethod
    def initial(cls, n: int, offset=None, norm=None) -> ParticleState:
        """Starting state: offsets/norms from the input table when present."""
        # copies: the E-step writes into them, and pandas may hand out read-only views
        return cls(offset=np.zeros((n, 2)) if offset is None else np.array(offset, float),
                   norm=np.ones(n) if norm is None else np.array(norm, float),
                   cls=np.full(n, -1), psi=np.zeros(n), pmax=np.zeros(n),
                   loglik=np.zeros(n), n_sig=np.zeros(n), acc_rot=np.zeros(n),
                   acc_trans=np.zeros(n))

    def store(self, index: np.ndarray, res: np.ndarray) -> None:
        """Write E-step results (columns of ``RESULT_COLUMNS``) for rows ``index``."""
        c = {name: res[:, i] for i, name in enumerate(RESULT_COLUMNS)}
        self.cls[index] = c["class"].astype(np.int64)
        self.psi[index] = c["psi"]
        self.offset[index, 0] = c["offset_x"]
        self.offset[index, 1] = c["offset_y"]
        self.pmax[index] = c["pmax"]
        self.loglik[index] = c["loglik"]
        self.n_sig[index] = c["n_sig"]
        self.norm[index] = c["norm"]
        self.acc_rot[index] = c["acc_rot"]
        self.acc_trans[index] = c["acc_trans"]
        self.pose_psi[index] = c["psi_refined"]
        self.pose_offset[index, 0] = c["offset_x_refined"]
        self.pose_offset[index, 1] = c["offset_y_refined"]


def _read_ahead(read, items, ahead: int = 2):
    """``read(item)`` for each item in order, up to ``ahead`` of them read by helper threads
    while the caller works on the previous ones."""
    with ThreadPoolExecutor(max_workers=ahead) as ex:
        todo = [ex.submit(read, x) for x in items[:ahead]]
        for i in range(len(items)):
            if i + ahead < len(items):
                todo.append(ex.submit(read, items[i + ahead]))
            yield todo[i].result()


class Class2DJob:
    """The leader of a 2D classification: data, model, per-particle state, output files.

    Parameters
    ----------
    config : Class2DConfig
    table : cryonb.io.ParticleTable, optional
        Already-read particle table (default: read ``config.i``).
    """

    def __init__(self, config: Class2DConfig, table=None):
        from ..io import output_folder, read_particles

        self.config = config.validate()
        if not config.i and table is None:
            raise ConfigError("--i is required: the particles STAR file")
        if not config.o:
            raise ConfigError("--o is required: the output rootname, e.g. Class2D/run")
        self.table = table if table is not None else read_particles(config.i)
        t = self.table
        if t.n == 0:
            raise InputError("the particle table has no particles", config.i)
        self.N = int(t.box)
        ps = t.pixel_sizes
        if config.angpix > 0 and (ps is None or not np.all(np.isfinite(ps))):
            t.set_missing_pixel_size(config.angpix)
            ps = t.pixel_sizes
        elif config.angpix > 0 and np.any(np.abs(ps - config.angpix) > 1e-4 * ps):
            warnings.warn(f"--angpix {config.angpix:g} is ignored: the STAR file gives "
                          f"{ps[0]:g} A (rlnImagePixelSize)", UserWarning, stacklevel=2)
        if ps is None or not np.all(np.isfinite(ps)):
            raise InputError("no pixel size: the optics group needs rlnImagePixelSize (or "
                             "rlnMagnification and rlnDetectorPixelSize); give it with --angpix",
                             config.i)
        if np.ptp(ps) > 1e-4 * ps.max():
            raise InputError(f"particles have different pixel sizes ({sorted(set(ps))}): "
                             "2D classification needs one pixel size; rescale first", config.i)
        self.pixel_size = float(ps[0])
        check_mask_radius(config.particle_diameter, self.N, self.pixel_size)
        if config.ctf and not t.has_ctf:
            missing = t.missing_ctf_columns()  # the pixel size is there by now
            if {"rlnDefocusU", "rlnDefocusV"} & set(t.particles.columns):
                raise InputError(f"incomplete CTF parameters: no {', '.join(missing)} column: "
                                 "add it (to data_optics) or give --no_ctf to classify without "
                                 "CTF correction", config.i)
            warnings.warn(f"{config.i}: no CTF parameters ({', '.join(missing)}): classifying "
                          "without CTF correction, as with --no_ctf; if the images have a CTF, "
                          "estimate it first (RELION's CTF estimation job)", UserWarning,
                          stacklevel=2)
            # the workers take the leader's configuration, so they follow
            self.config = config = self.config.replace(ctf=False)
        df = t.particles
        self.n = len(df)
        if config.K > self.n:
            raise ConfigError(f"--K {config.K} asks for more classes than there are particles "
                              f"({self.n} in {config.i})")
        codes, names = pd.factorize(df["rlnOpticsGroup"].astype(int), sort=True)
        self.optics = codes.astype(np.int64)
        opt_names = []
        for g in names:
            row = t.optics[t.optics["rlnOpticsGroup"].astype(int) == int(g)]
            opt_names.append(str(row["rlnOpticsGroupName"].iloc[0])
                             if "rlnOpticsGroupName" in row and len(row) else f"opticsGroup{g}")
        self.optics_names = opt_names
        self.groups, self.group_names = _group_ids(df)
        self.ctf = self._ctf_arrays() if config.ctf else {}
        off = None
        if "rlnOriginXAngst" in df and "rlnOriginYAngst" in df:
            off = np.stack([df["rlnOriginXAngst"], df["rlnOriginYAngst"]], 1) / self.pixel_size
        elif "rlnOriginX" in df and "rlnOriginY" in df:
            off = np.stack([df["rlnOriginX"], df["rlnOriginY"]], 1)
        norm = df["rlnNormCorrection"].to_numpy(float) if "rlnNormCorrection" in df else None
        self.state = ParticleState.initial(self.n, off, norm)
        seed = config.random_seed if config.random_seed >= 0 else int(time.time()) & 0x7FFFFFFF
        self.seed = int(seed)
        self.model: Class2DModel | None = None
        self.iteration = 0
        self.seed_class = np.full(self.n, -1)
        rng = np.random.default_rng([self.seed, 0])
        self.init_psi = rng.uniform(0, 360, self.n)
        self.init_class = rng.integers(0, config.K, self.n)
        self.history: list[dict] = []
        self._last_reseed = -10
        self._realigned: dict[int, int] = {}  # class -> iteration of its last re-alignment
        self._realign_tried: list[dict] = []
        #: the CUDA device on which the M-step's re-seeding (class similarities, split tests,
        #: re-alignments) runs (None: the host); the runtime sets it when the leader's process
        #: drives a GPU (one rank with ``--gpu``)
        self.reseed_device: int | None = None
        self._reseed_on_host = 0  # this M-step's re-seeding work short of device memory
        #: the image size the last E-step used (RELION's rlnCurrentImageSize of its iteration)
        self.size_used: int | None = None
        self.mask = soft_circular_mask(self.N, self.mask_radius_px, 5.0)
        output_folder(Path(config.o).parent, f"--o {config.o}")

    @classmethod
    def from_optimiser(cls, optimiser_star, **overrides) -> Class2DJob:
        """Continue a run from any iteration's ``_optimiser.star`` (``--continue``).

        The exact state (model, per-particle poses, random seed, history) is restored from the
        iteration's ``_cryonb.npz`` named in the optimiser file, so that the continued run gives
        the same result as an uninterrupted one. ``overrides`` change options (e.g. ``iter``
        for more iterations, ``o`` for a new output root, ``j``/``pool``/``gpu``).
        """
        import json

        from ..io import read_star

        path = Path(optimiser_star)
        blocks = read_star(path)
        gen = blocks.get("optimiser_general")
        if gen is None or "rlnCryonbStateFile" not in gen.columns:
            raise InputError("not an optimiser file written by cryonb (no rlnCryonbStateFile); "
                             "cryonb continues its own runs only", path)
        state_file = Path(str(gen["rlnCryonbStateFile"].iloc[0]))
        if not state_file.is_absolute() and not state_file.exists():
            state_file = path.parent / state_file.name
        if not state_file.exists():
            raise InputError(f"the state file {state_file} named in it is missing", path)
        with np.load(state_file, allow_pickle=False) as z:
            st = {k: z[k] for k in z.files}
        cfg = Class2DConfig.from_dict(json.loads(str(st["config"])))
        changes = {k: v for k, v in overrides.items() if v is not None}
        changes.setdefault("continue_from", str(path))
        cfg = cfg.replace(**changes)
        if cfg.i and not Path(cfg.i).exists():
            where = ("" if Path(cfg.i).is_absolute() else
                     f" (a path relative to the folder the run was started in, not {Path.cwd()}: "
                     "continue from that folder)")
            raise InputError(f"the run's particles {cfg.i} are missing{where}; --continue "
                             "reads the particles the run was started with", path)
        job = cls(cfg)
        job.seed = int(gen["rlnRandomSeed"].iloc[0])
        job._restore(st)
        # the next E-step's grid perturbation follows this run's --iter (the settling part,
        # see grid_perturbation); the same value as saved when --iter is unchanged
        job.model.perturb = job.grid_perturbation(job.iteration + 1)
        return job

    @staticmethod
    def optimiser_iterations(optimiser_star) -> int | None:
        """The ``--iter`` of the run an ``_optimiser.star`` belongs to
        (``rlnNumberOfIterations``), or ``None`` where the file does not say (then
        :meth:`from_optimiser` reports what is wrong with it)."""
        from ..io import read_star

        try:
            gen = read_star(optimiser_star).get("optimiser_general")
            return int(gen["rlnNumberOfIterations"].iloc[0])
        except Exception:  # from_optimiser gives the error a user can act on
            return None

    def _restore(self, st: dict) -> None:
        import json

        from ._model import Class2DModel

        n = self.n
        if st["offset"].shape[0] != n:
            raise InputError(f"the saved state has {st['offset'].shape[0]} particles but the "
                             f"STAR file has {n}", self.config.i)
        self.state = ParticleState(offset=st["offset"], norm=st["norm"], cls=st["cls"],
                                   psi=st["psi"], pmax=st["pmax"], loglik=st["loglik"],
                                   n_sig=st["n_sig"], acc_rot=st["acc_rot_p"],
                                   acc_trans=st["acc_trans_p"],
                                   pose_psi=st.get("pose_psi", np.zeros(0)),
                                   pose_offset=st.get("pose_offset", np.zeros((0, 2))))
        self.seed_class = st["seed_class"]
        scalars = ("sigma2_offset", "avg_norm", "log_likelihood", "avg_pmax", "perturb")
        ints = ("current_size", "coarse_size", "iteration")
        kw = {k: st[k] for k in ("classes", "pdf_class", "prior_offset", "sigma2_noise", "scale",
                                 "tau2", "sigma2_class", "data_vs_prior", "fourier_coverage",
                                 "acc_rot", "acc_trans", "group_counts")}
        kw.update({k: float(st[k]) for k in scalars if k in st})
        kw.update({k: int(st[k]) for k in ints})
        self.model = Class2DModel(pixel_size=self.pixel_size, optics_names=self.optics_names,
                                  group_names=self.group_names, **kw)
        self.iteration = self.model.iteration
        self.history = json.loads(str(st["history"])) if "history" in st else []
        # the re-seeding schedule's memory, as an uninterrupted run has it
        for h in self.history:
            if h.get("reseeded"):
                self._last_reseed = int(h["iteration"])
            for t in h.get("realign_tried", []):
                self._realigned[int(t["class"]) - 1] = int(h["iteration"])

    # ------------------------------------------------------------------ basics
    @functools.cached_property
    def output_image_names(self) -> np.ndarray:
        """``rlnImageName`` of the output ``_data.star`` files, object array of shape (n,):
        the input's names made to resolve from the output folder too
        (:meth:`cryonb.io.ParticleTable.portable_image_names`, from the current directory)."""
        return self.table.portable_image_names().to_numpy(dtype=object)

    @property
    def mask_radius_px(self) -> float:
        """Radius of the particle mask in pixels."""
        return mask_radius(self.config.particle_diameter, self.N, self.pixel_size)

    def _ctf_arrays(self) -> dict:
        p = self.table.ctf_params()
        out = {k: np.asarray(p[k], float) for k in
               ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs",
                "amplitude_contrast", "phase_shift", "bfactor")}
        out["scale"] = np.asarray(p.get("ctf_scalefactor", np.ones(self.n)), float)
        return out

    def batch_meta(self, index: np.ndarray) -> dict:
        """What a worker needs besides the images for the particles ``index``."""
        index = np.asarray(index, np.int64)
        return {"index": index, "offset": self.state.offset[index].copy(),
                "norm": self.state.norm[index].copy(), "optics": self.optics[index],
                "group": self.groups[index], "ctf": {k: v[index] for k, v in self.ctf.items()},
                "seed_class": self.seed_class[index].copy()}

    @staticmethod
    def make_batch(meta: dict, images: np.ndarray) -> ParticleBatch:
        """A :class:`ParticleBatch` from :meth:`batch_meta` output and the images."""
        return ParticleBatch(images=images, **meta)

    def pools(self, pool_size: int, iteration: int) -> list[np.ndarray]:
        """Particle indices in pools of ``pool_size``, shuffled per iteration (seeded)."""
        rng = np.random.default_rng([self.seed, iteration])
        order = rng.permutation(self.n)
        return [order[i : i + pool_size] for i in range(0, self.n, pool_size)]

    # ------------------------------------------------------------------ initial pass
    def init_meta(self, index: np.ndarray) -> dict:
        """Metadata of the initial pass: optics group, CTF, random class and angle."""
        index = np.asarray(index, np.int64)
        return {"index": index, "optics": self.optics[index],
                "ctf": {k: v[index] for k, v in self.ctf.items()},
                "init_class": self.init_class[index], "init_psi": self.init_psi[index]}

    def init_accumulate(self, meta: dict, images: np.ndarray) -> InitSums:
        """Worker side of the initial pass (see :func:`cryonb.em._mstep.initial_pass_sums`)."""
        return initial_pass_sums(images, meta, self.config, self.pixel_size,
                                 len(self.optics_names), self.mask)

    def init_sums_template(self) -> InitSums:
        """Zero :class:`InitSums` (shapes for reductions)."""
        return InitSums.zeros(self.config.K, self.N, self.config.pad, len(self.optics_names))

    def start(self, init: InitSums) -> Class2DModel:
        """Build the initial model (iteration 0) from the summed initial pass."""
        counts = np.bincount(self.groups, minlength=len(self.group_names))
        self.model = initial_model(init, self.config, self.pixel_size, len(self.group_names),
                                   self.optics_names, self.group_names, counts)
        self.iteration = 0
        self._perturb()
        return self.model

    def _perturb(self) -> None:
        """Set the model's grid perturbation for the next E-step (:meth:`grid_perturbation`)."""
        self.model.perturb = self.grid_perturbation(self.iteration + 1)

    def grid_perturbation(self, iteration: int) -> float:
        """RELION's random perturbation of the sampling grids in the E-step of ``iteration``
        (a fraction of the steps, new every iteration, within ``--perturb``); with
        ``--reseed``, none in the last ``SETTLE_FRACTION`` of the run.

        Why: on coarse grids a particle's best class can depend on where the grid falls. At
        48 px and pixel SNR 0.25 (``benchmarks/class2d_vs_relion.py``'s small set) the
        purity swung between 0.95 and 0.995 from one iteration to the next with the draw,
        so the final answer was a lottery; one E-step on the grid left in place brought it
        back to 0.995, and on five 64 px sets the last two iterations without perturbation
        moved the purity by at most 0.001 (benchmarks/RESULTS.md).
        """
        cfg = self.config
        if cfg.reseed and iteration > cfg.iter - round(SETTLE_FRACTION * cfg.iter):
            return 0.0
        rng = np.random.default_rng([self.seed, iteration - 1, 3])
        return float(rng.uniform(-cfg.perturb, cfg.perturb))

    # ------------------------------------------------------------------ E-step side
    def estep_context(self, xp=np) -> EStepContext:
        """An E-step context for the current model (call once per iteration per device)."""
        return EStepContext(self.model, self.config, xp, n_optics=len(self.optics_names),
                            n_groups=len(self.group_names))

    def sums_template(self) -> Class2DSums:
        """Zero sums of the right shapes (host)."""
        return Class2DSums.zeros(self.config.K, self.N, self.config.pad,
                                 len(self.optics_names), len(self.group_names))

    def store_results(self, index: np.ndarray, res: np.ndarray) -> None:
        """Keep one pool's per-particle results."""
        self.state.store(np.asarray(index, np.int64), res)

    # ------------------------------------------------------------------ M-step side
    def maximize(self, sums: Class2DSums) -> Class2DModel:
        """M-step, optional re-seeding; advances the iteration."""
        cfg_m = self.config
        self.size_used = int(self.model.current_size)
        factor = self.tau2_factor(self.iteration + 1)
        if factor != 1.0:
            cfg_m = cfg_m.replace(tau2_fudge=cfg_m.tau2_fudge * factor)
        self.model = maximization(self.model, sums, cfg_m)
        self.iteration = self.model.iteration
        self.seed_class = np.full(self.n, -1)
        self._realign_tried = []
        self._reseed_on_host = 0
        self._maybe_reseed()
        self._perturb()
        pdf = self.model.pdf_class
        self.history.append({
            "iteration": self.iteration, "log_likelihood": self.model.log_likelihood,
            "avg_pmax": self.model.avg_pmax, "current_resolution":
                self.model.current_resolution, "current_size": self.model.current_size,
            "n_empty": int((pdf <= 0).sum()), "reseeded": list(self.model.reseeded),
            "tau2_fudge_used": cfg_m.tau2_fudge, "realign_tried": self._realign_tried,
            **({"reseed_on_host_for_memory": self._reseed_on_host}
               if self._reseed_on_host else {}),
        })
        return self.model

    def tau2_factor(self, iteration: int) -> float:
        """The factor on T in the M-step of ``iteration`` (prior annealing, cryonb's addition).

        With ``--reseed``, T is ``tau2_anneal`` times larger in the first M-step and returns
        linearly to the user's T at iteration ``ANNEAL_UNTIL * iter`` (or ``reseed_until *
        iter`` if earlier); 1 afterwards and without ``--reseed``.

        Why: in the first iterations every class is a blend of many views, and RELION's prior
        (``tau2``, the power of the current class) is that of a blurred image, far below a
        single view's. The prior then damps exactly the small differences between classes
        from which they separate, and on noisy data (pixel SNR 0.05) the classes stay blends
        for 10-15 iterations. A weaker prior early lets them separate sooner. The last 40% of
        the iterations run with the user's T, so the result is regularised as asked and has
        time to settle (ending at 85% cost a short run of 15 iterations 10% purity).
        benchmarks/RESULTS.md has the comparison.
        """
        cfg = self.config
        last = self._anneal_last()
        if not cfg.reseed or cfg.tau2_anneal <= 1 or iteration > last or last < 1:
            return 1.0
        a = cfg.tau2_anneal
        return float(a + (1 - a) * (iteration - 1) / max(1, last - 1))

    def _anneal_last(self) -> int:
        """The last iteration of the prior annealing (``ANNEAL_UNTIL`` or ``reseed_until`` of
        ``--iter``, whichever is earlier)."""
        cfg = self.config
        return round(min(ANNEAL_UNTIL, cfg.reseed_until) * cfg.iter)

    def _maybe_reseed(self) -> None:
        """Re-seed empty, junk and duplicate classes by splitting classes that mix views;
        re-align junk classes left without a slot (``REALIGN_JUNK``).

        See :mod:`cryonb.em._reseed`. Active from iteration 3 (once the average maximum
        probability reaches ``RESEED_MIN_PMAX``) until ``reseed_until * iter``, at most every
        other iteration.
        """
        from ._reseed import (
            CROWDED_RATIO,
            SPLIT_SEPARATION,
            find_free_classes,
            half_pairs,
            merge_candidates,
            split_accepted,
        )

        cfg, m = self.config, self.model
        K = cfg.K
        last = round(cfg.reseed_until * cfg.iter)
        if not cfg.reseed or K < 2 or not (3 <= self.iteration <= last):
            return
        if m.avg_pmax < RESEED_MIN_PMAX or self.iteration - self._last_reseed < 2:
            return
        cls = self.state.cls
        counts = np.bincount(cls[cls >= 0], minlength=K).astype(float)
        pmax = np.array([self.state.pmax[cls == k].mean() if counts[k] else 0.0
                         for k in range(K)])
        free, reasons = self._on_reseed_device(functools.partial(
            find_free_classes, counts, m.classes, self.n, m.class_overlap, pmax,
            margin=m.class_margin, n_psi=max(36, 2 * cfg.n_psi),
            max_res_px=max(4, m.current_size // 4)))
        late = self.iteration >= self._anneal_last()
        merges = merge_candidates(m.class_margin, counts, free) if late else []
        # one view split in two small classes, for a class that clearly holds two views
        halves = half_pairs(m.class_margin, counts, free) if late else []
        if not free and not merges and not halves:
            return
        # the classes to split: the largest, and junk classes (often two views merged: split,
        # such a class keeps one half and gives the other to a free slot)
        junk = {k for k in free if reasons[k].startswith("junk")}
        cands = [int(k) for k in np.argsort(-counts)
                 if (k not in free or k in junk) and counts[k] >= 20]
        cands = cands[: 2 * len(free) + 2]
        med = float(np.median(counts[counts > 0]))
        if not free:
            # no slot: only a crowded class can take one, from a merge or a half pair (below),
            # so the others' split tests could change nothing (the largest come first: the
            # crowded ones' particle draws are the same)
            cands = [k for k in cands if counts[k] >= CROWDED_RATIO * med]
            if not cands:
                return
        rng = np.random.default_rng([self.seed, self.iteration, 11])
        # the particles of each candidate (drawn in order: the same whatever the threads),
        # then the split tests: one after the other on the device, or in parallel on the host
        # (FFTs, gathers and BLAS release the GIL) with one BLAS thread each (with as many as
        # cores each, 14 tests on 16 cores took as long as on 2)
        picks = [self._split_particles(k, rng) for k in cands]
        if self.reseed_device is not None:
            splits = self._split_on_device(cands, picks)
        else:
            from threadpoolctl import threadpool_limits

            from ..backend import usable_cores

            workers = max(1, min(len(picks), usable_cores()))
            with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers) as ex:
                splits = list(ex.map(self._split, cands, picks))
        tests = []
        # the crowded rule's bar: the best separation among the crowded candidates (a class
        # of typical size that separates better is not split, so it does not hold them back:
        # a class of five times the median size holding three views stayed unsplit to the end
        # behind one of 1.3 times; benchmarks/RESULTS.md, 2026-12-06 twelfth session)
        top = max((sep for k, (_a, _l, sep) in zip(cands, splits)
                   if counts[k] >= CROWDED_RATIO * med), default=0.0)
        for k, (avgs, labels, sep) in zip(cands, splits):
            if split_accepted(sep, float(labels.mean()), counts[k], med, top, k in junk, late):
                tests.append((sep, k, avgs, float(labels.mean())))
        tests.sort(key=lambda t: -t[0])
        # slots: nearly empty classes first, then duplicates, then junk
        rank = {"nearly": 0, "duplicate": 1, "junk": 2}
        slots = sorted(free, key=lambda k: (rank[reasons[k].split()[0]], k))
        # A class seeded earlier in this loop is not split again in it: its split test was
        # made on its previous particles, and splitting it would throw the new seed away (a
        # junk slot given half of a two-view class, then split from its empty picks: two of
        # twelve runs on notebook 02's set stayed at purity 0.81-0.82 that way;
        # benchmarks/RESULTS.md, 2026-12-06 twelfth session)
        exhausted = False  # the free slots ran out: from then on only merges give slots
        seeded = set()
        for sep, big, avgs, share in tests:
            if big in seeded:
                continue
            slot = None if exhausted else next((k for k in slots if k != big), None)
            crowded = counts[big] >= CROWDED_RATIO * med
            if slot is None and (big in junk or crowded):
                # a class holding two views with nowhere to go: merge a pair that describes
                # the same particles (one view split over two classes) to free a slot
                pair = next((p for p in merges if big not in p[1:]), None)
                if pair is None and crowded and sep >= SPLIT_SEPARATION:
                    pair = next((p for p in halves if big not in p[1:]), None)
                if pair is not None:
                    ratio, slot, into = pair
                    reasons[slot] = (f"merged into class {into + 1} (merge cost ratio "
                                     f"{ratio:.2f})")
            if slot is None:
                exhausted = True
                if not merges and not halves:
                    break
                continue
            slots = [k for k in slots if k not in (slot, big)]
            merges = [p for p in merges if slot not in p[1:] and big not in p[1:]]
            halves = [p for p in halves if slot not in p[1:] and big not in p[1:]]
            total = m.pdf_class[big]
            m.classes[big], m.classes[slot] = avgs[0], avgs[1]
            m.pdf_class[big], m.pdf_class[slot] = total * (1 - share), total * share
            m.prior_offset[slot] = m.prior_offset[big]
            m.tau2[slot] = m.tau2[big]
            m.data_vs_prior[slot] = m.data_vs_prior[big]
            seeded.add(slot)
            m.reseeded.append({"class": slot + 1, "split": big + 1, "why": reasons[slot],
                               "separation": round(sep, 2), "share": round(share, 3)})
        # junk classes left (no slot to split into): often a class smeared by rotation (a
        # round blob whose particles' angles are arbitrary), which EM keeps to the end;
        # re-aligned from its own particles when that explains them clearly better
        if REALIGN_JUNK:
            for k in sorted(junk & set(slots)):
                idx = self._split_particles(k, rng, at_most=300)
                if len(idx) < 20 or self.iteration - self._realigned.get(k, -10) < 4:
                    continue
                self._realigned[k] = self.iteration
                img, gain = self._realign(k, idx)
                self._realign_tried.append({"class": k + 1, "gain_per_particle": round(gain, 3)})
                if gain > REALIGN_MIN_GAIN:
                    m.classes[k] = img
                    m.reseeded.append({"class": k + 1, "realigned": True, "why": reasons[k],
                                       "gain_per_particle": round(gain, 2)})
        if m.reseeded:
            m.pdf_class = np.maximum(m.pdf_class, 1e-3 / K)
            m.pdf_class /= m.pdf_class.sum()
            self._last_reseed = self.iteration

    def _split_particles(self, k: int, rng, at_most: int = 1500) -> np.ndarray:
        """The particles of class ``k`` used for its split test (at most ``at_most``, drawn)."""
        idx = np.flatnonzero(self.state.cls == k)
        if len(idx) > at_most:
            idx = np.sort(rng.choice(idx, at_most, replace=False))
        return idx

    def _class_particles(self, idx: np.ndarray):
        """Images (norm-corrected), CTF parameters and noise power of the particles ``idx``."""
        from ..ctf import CTFParams

        cfg, m = self.config, self.model
        imgs = self.table.images(idx)  # a new float32 array (ParticleTable.images)
        if cfg.norm:
            imgs *= (m.avg_norm / np.maximum(self.state.norm[idx], 1e-6))[:, None, None]
        ctf = None
        if cfg.ctf:
            ctf = CTFParams.from_dict({key: v[idx] for key, v in self.ctf.items()})
            ctf.scale = ctf.scale * (m.scale[self.groups[idx]] if cfg.scale else 1.0)
        return imgs, ctf, self._noise_power(idx)

    def _noise_power(self, idx: np.ndarray) -> np.ndarray:
        """The noise power per shell of the particles ``idx``: their most common optics
        group's, shape (N//2+1,)."""
        return self.model.sigma2_noise[int(np.bincount(self.optics[idx]).argmax())]

    def _split(self, k: int, idx: np.ndarray):
        """Split test of class ``k`` on particles ``idx`` (see ``_reseed.split_class``)."""
        return self._split_tests([k], [idx])[0]

    def _split_tests(self, cands: list, picks: list, particles=None) -> list:
        """The split tests of classes ``cands`` on particles ``picks`` in one call of
        ``_reseed.split_classes``, on the M-step's device if any; ``particles``: the
        :meth:`_class_particles` of all the picks in order, if read already.

        Each class gets what its own split test gives it: the call shares the per-particle
        work and the averages' sums; each class keeps its own noise power, prior and
        principal components.
        """
        from ._reseed import split_classes

        cfg, m = self.config, self.model
        idx = np.concatenate(picks)
        imgs, ctf, _sigma2 = particles or self._class_particles(idx)
        ends = np.cumsum([len(p) for p in picks])
        return self._on_reseed_device(functools.partial(
            split_classes, imgs, self.state.psi[idx], self.state.offset[idx], ctf,
            [np.arange(e - len(p), e) for p, e in zip(picks, ends)],
            np.stack([self._noise_power(p) for p in picks]),
            np.stack([m.tau2[k] for k in cands]), cfg.tau2_fudge, self._split_size(),
            self.mask, self.pixel_size, seed=self.seed + self.iteration))

    def _split_on_device(self, cands: list, picks: list) -> list:
        """:meth:`_split_tests` of classes ``cands`` on particles ``picks`` on the M-step's
        device, several classes per call (at most ``SPLIT_BATCH_BYTES`` of arrays, or one
        class), helper threads reading the next batch's images meanwhile."""
        most = max(1, SPLIT_BATCH_BYTES // (64 * self._split_size() ** 2))
        batches, size = [], most + 1
        for j, idx in enumerate(picks):
            if size + len(idx) > most:
                batches.append([])
                size = 0
            batches[-1].append(j)
            size += len(idx)
        rows = [np.concatenate([picks[j] for j in b]) for b in batches]
        out = []
        for b, particles in zip(batches, _read_ahead(self._class_particles, rows)):
            out += self._split_tests([cands[j] for j in b], [picks[j] for j in b], particles)
        return out

    def _split_size(self) -> int:
        """The Fourier box of the split tests: the current size, at least 16 or half the box."""
        return min(self.model.current_size, max(16, self.N // 2))

    def _on_reseed_device(self, work):
        """``work(xp=...)`` on the M-step's device (``reseed_device``), else on the host.

        The device's memory is shared with the E-step's pools: work that runs out of it frees
        CuPy's cached blocks and runs on the host (counted in the iteration's history).
        """
        if self.reseed_device is None:
            return work()
        from ..backend import is_out_of_memory, release_device_memory, use_device

        try:
            with use_device(self.reseed_device):
                import cupy

                return work(xp=cupy)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        release_device_memory([self.reseed_device])
        self._reseed_on_host += 1
        return work()

    def _realign(self, k: int, idx: np.ndarray):
        """Reference-free re-alignment of class ``k`` on particles ``idx``
        (see ``_reseed.realign_class``); returns the new image and the gain per particle."""
        from ._reseed import realign_class

        cfg, m = self.config, self.model
        imgs, ctf, sigma2 = self._class_particles(idx)
        others = [j for j in range(cfg.K) if j != k and m.pdf_class[j] > 0]
        tau2 = np.median(m.tau2[others or [k]], axis=0)
        return self._on_reseed_device(functools.partial(
            realign_class, imgs, ctf, sigma2, tau2, cfg.tau2_fudge,
            min(m.current_size, max(16, self.N // 2), 24), m.classes[k], self.mask,
            self.pixel_size, offset_range=min(cfg.offset_range, 5.0),
            seed=self.seed + self.iteration))

    # ------------------------------------------------------------------ outputs
    def output_root(self) -> str:
        """The ``--o`` rootname."""
        return self.config.o

    def write_iteration(self, final: bool = False) -> dict:
        """Write the current iteration's RELION files; returns their paths."""
        from ._output import write_iteration_files

        it = self.iteration
        if not final and it > 0 and self.config.write_every > 1 and it % self.config.write_every:
            return {}
        return write_iteration_files(self, it)

    def summary(self) -> dict:
        """A compact description of the current model (for progress views)."""
        m = self.model
        return {"iteration": self.iteration, "classes": m.classes,
                "pdf_class": m.pdf_class.copy(), "current_resolution": m.current_resolution,
                "log_likelihood": m.log_likelihood, "avg_pmax": m.avg_pmax,
                "acc_rot": m.acc_rot.copy(), "reseeded": list(m.reseeded)}
