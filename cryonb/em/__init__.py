"""Algorithms: 2D classification by maximum-likelihood EM (RELION's), later 3D refinement.

- :class:`Class2DConfig`: every option of a run (``relion_refine`` flag names).
- :class:`Class2DJob`: the leader's side (data, model, per-particle state, M-step, files);
  :class:`EStepContext`: a worker's E-step on pools of particles (NumPy or CuPy).
- Run it with :func:`cryonb.parallel.run_class2d` (ranks, threads, GPUs) or ``cryonb class2d``.
"""

from ._config import Class2DConfig
from ._estep import EStepContext
from ._model import Class2DModel, Class2DSums, ParticleBatch, Sampling
from .class2d import Class2DJob

__all__ = [
    "Class2DConfig",
    "Class2DJob",
    "Class2DModel",
    "Class2DSums",
    "EStepContext",
    "ParticleBatch",
    "Sampling",
]
