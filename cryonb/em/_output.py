"""RELION's per-iteration output files for 2D classification.

``<root>_it###_classes.mrcs``, ``_model.star``, ``_data.star``, ``_sampling.star`` and
``_optimiser.star`` (the last one is enough to ``--continue``), laid out as ``relion_refine``
3.1 writes them, every file written atomically.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_write, write_mrc, write_particles, write_star
from ..io._star import TOKENS_ATTR, StarTokens, star_tokens
from ._model import ssnr_shells

__all__ = ["iteration_paths", "write_iteration_files"]


def iteration_paths(root: str, it: int) -> dict[str, Path]:
    """Paths of one iteration's files."""
    base = f"{root}_it{it:03d}"
    return {k: Path(f"{base}_{k}.{ext}") for k, ext in
            (("classes", "mrcs"), ("model", "star"), ("data", "star"), ("sampling", "star"),
             ("optimiser", "star"))} | {"state": Path(f"{base}_cryonb.npz")}


def _resolution_axis(N: int, apix: float):
    idx = np.arange(N // 2 + 1)
    with np.errstate(divide="ignore"):
        res = np.where(idx > 0, N * apix / np.maximum(idx, 1), 999.0)
    return idx, 1.0 / res, res


def _model_blocks(job, paths) -> dict[str, pd.DataFrame]:
    m = job.model
    N, apix, K = m.ori_size, m.pixel_size, m.K
    idx, inv_res, res = _resolution_axis(N, apix)
    # per class: the resolution of the first shell with SSNR < 1 (999 A for empty classes)
    first_below = np.minimum(ssnr_shells(m.data_vs_prior) + 1, N // 2)
    est_res = np.where(m.pdf_class > 0, N * apix / np.maximum(first_below, 1), 999.0)
    # as RELION: rlnCurrentImageSize is the size this iteration's E-step used (the model's
    # current_size is the next one), rlnCurrentResolution comes from this iteration's SSNR
    general = pd.DataFrame({
        "rlnReferenceDimensionality": [2], "rlnDataDimensionality": [2],
        "rlnOriginalImageSize": [N], "rlnCurrentResolution": [m.current_resolution],
        "rlnCurrentImageSize": [job.size_used or m.current_size],
        "rlnPaddingFactor": [float(job.config.pad)],
        "rlnIsHelix": [0], "rlnFourierSpaceInterpolator": [1],
        "rlnMinRadiusNnInterpolation": [10], "rlnPixelSize": [apix],
        "rlnNrClasses": [K], "rlnNrBodies": [1], "rlnNrGroups": [len(m.group_names)],
        "rlnNrOpticsGroups": [m.sigma2_noise.shape[0]],
        "rlnTau2FudgeFactor": [job.config.tau2_fudge], "rlnNormCorrectionAverage": [m.avg_norm],
        "rlnSigmaOffsetsAngst": [float(np.sqrt(m.sigma2_offset)) * apix],
        "rlnOrientationalPriorMode": [0], "rlnSigmaPriorRotAngle": [0.0],
        "rlnSigmaPriorTiltAngle": [0.0], "rlnSigmaPriorPsiAngle": [0.0],
        "rlnLogLikelihood": [m.log_likelihood], "rlnAveragePmax": [m.avg_pmax],
    })
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{k + 1:06d}@{paths['classes'].name}" for k in range(K)],
        "rlnClassDistribution": m.pdf_class,
        "rlnAccuracyRotations": m.acc_rot if len(m.acc_rot) == K else np.zeros(K),
        "rlnAccuracyTranslationsAngst": m.acc_trans if len(m.acc_trans) == K else np.zeros(K),
        "rlnEstimatedResolution": est_res,
        "rlnOverallFourierCompleteness": m.fourier_coverage.mean(axis=1),
        "rlnClassPriorOffsetX": m.prior_offset[:, 0] * apix,
        "rlnClassPriorOffsetY": m.prior_offset[:, 1] * apix,
    })
    blocks = {"model_general": general, "model_classes": classes}
    for k in range(K):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": idx, "rlnResolution": inv_res, "rlnAngstromResolution": res,
            "rlnSsnrMap": m.data_vs_prior[k], "rlnFourierCompleteness": m.fourier_coverage[k],
            "rlnReferenceSigma2": m.sigma2_class[k], "rlnReferenceTau2": m.tau2[k],
        })
    for g in range(m.sigma2_noise.shape[0]):
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": idx, "rlnResolution": inv_res, "rlnSigma2Noise": m.sigma2_noise[g],
        })
    blocks["model_groups"] = pd.DataFrame({
        "rlnGroupNumber": np.arange(1, len(m.group_names) + 1), "rlnGroupName": m.group_names,
        "rlnGroupNrParticles": np.asarray(m.group_counts, int) if len(m.group_counts) else 0,
        "rlnGroupScaleCorrection": m.scale,
    })
    return blocks


#: the columns of ``_data.star`` that change from iteration to iteration (the others are the
#: input's, formatted once per run: see _input_tokens)
_RESULT_COLUMNS = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
                   "rlnNormCorrection", "rlnLogLikeliContribution",
                   "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnGroupNumber")


def _input_tokens(job, df: pd.DataFrame) -> StarTokens:
    """The STAR text of the ``_data.star`` columns that are the run's input as it is (CTF,
    coordinates, names...), made at the first write of a run and kept on the job: at 20,000
    particles formatting every number again took most of an iteration's writing."""
    cache = getattr(job, "_data_tokens", None)
    if cache is None or cache[0] is not job.table.particles:
        optics = set(job.table.optics.columns) | {"rlnOpticsGroup"}
        cache = (job.table.particles, StarTokens(
            (c, star_tokens(df[c], f"{job.config.i}: column _{c}")) for c in df.columns
            if c not in _RESULT_COLUMNS and c not in optics))
        job._data_tokens = cache
    return cache[1]


def _data_table(job) -> pd.DataFrame:
    df = job.table.particles.copy()
    # names that resolve from the output folder too (RELION's: relative to the project)
    df["rlnImageName"] = job.output_image_names
    tokens = _input_tokens(job, df)
    st = job.state
    apix = job.pixel_size
    done = st.cls >= 0
    df["rlnAnglePsi"] = np.where(done, st.pose_psi, df.get("rlnAnglePsi", 0.0))
    df["rlnOriginXAngst"] = st.pose_offset[:, 0] * apix
    df["rlnOriginYAngst"] = st.pose_offset[:, 1] * apix
    df["rlnClassNumber"] = np.where(done, st.cls + 1, 0).astype(int)
    df["rlnNormCorrection"] = st.norm
    df["rlnLogLikeliContribution"] = st.loglik
    df["rlnMaxValueProbDistribution"] = st.pmax
    df["rlnNrOfSignificantSamples"] = st.n_sig.astype(int)
    df["rlnGroupNumber"] = job.groups + 1
    for old in ("rlnOriginX", "rlnOriginY"):
        if old in df.columns:
            df = df.drop(columns=old)
    df.attrs[TOKENS_ATTR] = tokens
    return df


def _sampling_blocks(job) -> dict[str, pd.DataFrame]:
    cfg = job.config
    return {"sampling_general": pd.DataFrame({
        "rlnIs3DSampling": [0], "rlnIs3DTranslationalSampling": [0], "rlnHealpixOrder": [-1],
        "rlnPsiStep": [360.0 / cfg.n_psi], "rlnTranslationalSamplingStep": [cfg.offset_step],
        "rlnOffsetRange": [cfg.offset_range], "rlnOffsetStep": [cfg.offset_step],
        "rlnSymmetryGroup": ["C1"],
    })}


def _data_optics(job) -> pd.DataFrame:
    optics = job.table.optics.copy()
    for col, value in (("rlnImageSize", job.N), ("rlnImageDimensionality", 2)):
        if col not in optics.columns:
            optics[col] = value
    return optics


def write_data_star(job, path) -> None:
    """Write the job's particles with their current classes and poses (``_data.star``)."""
    write_particles(path, _data_table(job), _data_optics(job))


def write_iteration_files(job, it: int) -> dict[str, Path]:
    """Write all files of iteration ``it`` for a :class:`cryonb.em.Class2DJob`."""
    paths = iteration_paths(job.config.o, it)
    m = job.model
    write_mrc(paths["classes"], m.classes.astype(np.float32), m.pixel_size, stack=True)
    write_star(paths["model"], _model_blocks(job, paths))
    write_data_star(job, paths["data"])
    write_star(paths["sampling"], _sampling_blocks(job))
    # the cryonb state needed to continue exactly (RELION keeps it in its own files too)
    with atomic_write(paths["state"]) as fh:
        np.savez(fh, **_state_arrays(job))
    cfg = job.config
    cmdline = " ".join(shlex.quote(a) for a in sys.argv) if sys.argv else cfg.command_line()
    opt = pd.DataFrame({
        "rlnOutputRootName": [cfg.o], "rlnModelStarFile": [str(paths["model"])],
        "rlnExperimentalDataStarFile": [str(paths["data"])],
        "rlnOrientSamplingStarFile": [str(paths["sampling"])],
        "rlnCurrentIteration": [it], "rlnNumberOfIterations": [cfg.iter],
        "rlnDoSplitRandomHalves": [0], "rlnAdaptiveOversampleOrder": [cfg.oversampling],
        "rlnAdaptiveOversampleFraction": [cfg.adaptive_fraction],
        "rlnRandomSeed": [job.seed], "rlnParticleDiameter": [2 * job.mask_radius_px * m.pixel_size],
        "rlnWidthMaskEdge": [5], "rlnDoZeroMask": [int(cfg.zero_mask)],
        "rlnDoSolventFlattening": [int(cfg.flatten_solvent)],
        "rlnCoarseImageSize": [m.coarse_size], "rlnMaximumCoarseImageSize": [m.ori_size],
        "rlnIncrementImageSize": [cfg.incr_size], "rlnDoMapEstimation": [1],
        "rlnDoCorrectCtf": [int(cfg.ctf)], "rlnDoIgnoreCtfUntilFirstPeak":
            [int(cfg.ctf_intact_first_peak)], "rlnDoNormCorrection": [int(cfg.norm)],
        "rlnDoScaleCorrection": [int(cfg.scale)], "rlnTau2FudgeFactor": [cfg.tau2_fudge],
        "rlnCryonbStateFile": [str(paths["state"])],
    })
    with atomic_write(paths["optimiser"], "w") as fh:
        fh.write(f"# RELION optimiser; version 30001 (written by cryonb)\n# {cmdline}\n\n")
    _append_star(paths["optimiser"], {"optimiser_general": opt})
    return paths


def _append_star(path: Path, blocks):
    """Write ``blocks`` after the header lines already in ``path`` (atomically)."""
    head = path.read_text()
    tmp = path.with_name(path.name + ".blocks")
    write_star(tmp, blocks)
    body = tmp.read_text()
    tmp.unlink()
    with atomic_write(path, "w") as fh:
        fh.write(head + body)


def _state_arrays(job) -> dict[str, np.ndarray]:
    m = job.model
    st = job.state
    return {
        "seed_class": job.seed_class, "offset": st.offset, "norm": st.norm, "cls": st.cls,
        "psi": st.psi, "pmax": st.pmax, "loglik": st.loglik, "n_sig": st.n_sig,
        "acc_rot_p": st.acc_rot, "acc_trans_p": st.acc_trans, "pose_psi": st.pose_psi,
        "pose_offset": st.pose_offset,
        "classes": m.classes, "pdf_class": m.pdf_class, "prior_offset": m.prior_offset,
        "sigma2_noise": m.sigma2_noise, "sigma2_offset": np.float64(m.sigma2_offset),
        "scale": m.scale, "avg_norm": np.float64(m.avg_norm),
        "current_size": np.int64(m.current_size), "coarse_size": np.int64(m.coarse_size),
        "tau2": m.tau2, "sigma2_class": m.sigma2_class, "data_vs_prior": m.data_vs_prior,
        "fourier_coverage": m.fourier_coverage, "log_likelihood": np.float64(m.log_likelihood),
        "avg_pmax": np.float64(m.avg_pmax), "acc_rot": m.acc_rot, "acc_trans": m.acc_trans,
        "group_counts": m.group_counts, "iteration": np.int64(m.iteration),
        "perturb": np.float64(m.perturb),
        "history": np.array(json.dumps(job.history)),
        "config": np.array(json.dumps(job.config.to_dict(), sort_keys=True)),
    }
