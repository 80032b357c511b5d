"""State of a 2D classification: the model broadcast to workers and the sums they return."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["Class2DModel", "Class2DSums", "ParticleBatch", "Sampling"]


@dataclass
class Sampling:
    """The coarse and fine search grids of one iteration.

    Attributes
    ----------
    psi : ndarray of shape (n_psi,)
        Coarse in-plane angles (degrees), ``r * 360 / n_psi``.
    psi_fine : ndarray of shape (n_psi * 2**os,)
        Fine angles; fine angle ``r * 2**os + q`` refines coarse angle ``r``.
    trans : ndarray of shape (n_trans, 2)
        Coarse translations (pixels, x y), a circular grid of step ``offset_step`` within
        ``offset_range``, relative to each particle's previous offset.
    trans_fine : ndarray of shape (n_trans * 4**os, 2)
        Fine translations; fine ``j * 4**os + q`` refines coarse ``j``.
    oversampling : int
        RELION's adaptive oversampling order (0: no fine grid, 1: twice finer).
    """

    psi: np.ndarray
    psi_fine: np.ndarray
    trans: np.ndarray
    trans_fine: np.ndarray
    oversampling: int

    @classmethod
    def build(cls, psi_step: float, offset_range: float, offset_step: float,
              oversampling: int = 1, perturb: float = 0.0) -> Sampling:
        """RELION's 2D sampling: psi every ``360/ceil(360/psi_step)`` degrees, offsets on a disc.

        ``perturb`` (a fraction of a step, RELION's per-iteration random perturbation) shifts
        all angles and translations by ``perturb`` steps, so that successive iterations do not
        sample the same grid points.
        """
        n_psi = max(1, math.ceil(360.0 / psi_step - 1e-9))
        dpsi = 360.0 / n_psi
        psi = np.arange(n_psi) * dpsi
        n = math.floor(offset_range / offset_step + 1e-9)
        g = np.arange(-n, n + 1) * offset_step
        tx, ty = np.meshgrid(g, g, indexing="xy")
        keep = tx**2 + ty**2 <= offset_range**2 + 1e-6
        trans = np.stack([tx[keep], ty[keep]], axis=1).astype(np.float64)
        psi = psi + perturb * dpsi
        trans = trans + perturb * offset_step
        if oversampling == 0:
            return cls(psi, psi.copy(), trans, trans.copy(), 0)
        npsi_sub = 2**oversampling
        dpsi_f = dpsi / npsi_sub
        psi_fine = (psi[:, None] - dpsi / 2 + dpsi_f * (np.arange(npsi_sub) + 0.5)).ravel()
        ntr_sub = 2**oversampling
        d = offset_step / ntr_sub
        sub = (np.arange(ntr_sub) + 0.5) * d - offset_step / 2
        sx, sy = np.meshgrid(sub, sub, indexing="xy")
        sub2 = np.stack([sx.ravel(), sy.ravel()], axis=1)
        trans_fine = (trans[:, None, :] + sub2[None]).reshape(-1, 2)
        return cls(psi, psi_fine, trans, trans_fine, oversampling)

    @property
    def psi_sub(self) -> int:
        """Fine angles per coarse angle."""
        return len(self.psi_fine) // len(self.psi)

    @property
    def trans_sub(self) -> int:
        """Fine translations per coarse translation."""
        return len(self.trans_fine) // len(self.trans)


@dataclass
class Class2DModel:
    """The model of one iteration: what every worker needs for the E-step.

    Attributes
    ----------
    iteration : int
        The iteration that produced this model (0 = initial).
    classes : ndarray of shape (K, N, N), float32
        Class averages (real space, origin at ``N // 2``).
    pdf_class : ndarray of shape (K,)
        Class priors (sum 1).
    prior_offset : ndarray of shape (K, 2)
        Per-class prior offset (pixels, x y), centre of the offset prior.
    sigma2_noise : ndarray of shape (G, N // 2 + 1)
        Noise power per Fourier component (per real/imaginary part) per shell and optics group,
        RELION's normalisation (forward FFT divided by ``N**2``).
    sigma2_offset : float
        Variance of the offset prior (pixels^2, per axis).
    scale : ndarray of shape (n_groups,)
        Intensity scale per group (``rlnGroupScaleCorrection``).
    avg_norm : float
        Average norm correction.
    current_size, coarse_size : int
        Image sizes (even, pixels of the Fourier box) used in the fine and coarse passes.
    tau2, sigma2_class, data_vs_prior : ndarray of shape (K, N // 2 + 1)
        Per-class signal power prior, class power spectrum, SSNR estimate per shell.
    fourier_coverage : ndarray of shape (K, N // 2 + 1)
    class_overlap : ndarray of shape (K, K)
        Normalised co-responsibilities of the last E-step (1 on the diagonal).
    class_margin : ndarray of shape (K, K)
        Mean over class ``a``'s particles of the log-likelihood they would lose in class
        ``b`` (``Class2DSums.class_margin`` per particle); used by the re-seeding's merges.
    """

    iteration: int
    pixel_size: float
    classes: np.ndarray
    pdf_class: np.ndarray
    prior_offset: np.ndarray
    sigma2_noise: np.ndarray
    sigma2_offset: float
    scale: np.ndarray
    avg_norm: float
    current_size: int
    coarse_size: int
    tau2: np.ndarray
    sigma2_class: np.ndarray
    data_vs_prior: np.ndarray
    fourier_coverage: np.ndarray
    perturb: float = 0.0
    log_likelihood: float = 0.0
    avg_pmax: float = 0.0
    acc_rot: np.ndarray = field(default_factory=lambda: np.zeros(0))
    acc_trans: np.ndarray = field(default_factory=lambda: np.zeros(0))
    group_names: list = field(default_factory=list)
    group_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    optics_names: list = field(default_factory=list)
    reseeded: list = field(default_factory=list)
    class_overlap: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    class_margin: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def K(self) -> int:
        """Number of classes."""
        return self.classes.shape[0]

    @property
    def ori_size(self) -> int:
        """Box size of the particles (pixels)."""
        return self.classes.shape[-1]

    @property
    def current_resolution(self) -> float:
        """RELION's current resolution (A): that of the highest shell with SSNR >= 1.

        The shell is :func:`ssnr_max_shell` of ``data_vs_prior``; the next image size is
        ``2 * (shell + incr_size)`` (at most the box), so the fine pass looks ``incr_size``
        shells beyond it.
        """
        return self.ori_size * self.pixel_size / ssnr_max_shell(self.data_vs_prior)

    def copy(self) -> Class2DModel:
        """A deep copy (arrays copied)."""
        vals = {}
        for f in fields(self):
            v = getattr(self, f.name)
            vals[f.name] = v.copy() if isinstance(v, np.ndarray | list) else v
        return Class2DModel(**vals)


@dataclass
class ParticleBatch:
    """A pool of particles for the E-step, with the metadata the E-step needs.

    Attributes
    ----------
    index : ndarray of shape (B,), int
        Row numbers in the particle table.
    images : ndarray of shape (B, N, N), float32
        Host or device images, or :class:`cryonb.parallel.resident.StoredRows` (images in a
        device store, read in place by the E-step).
    offset : ndarray of shape (B, 2)
        Previous offsets (pixels, x y; RELION rlnOriginX/YAngst / pixel size).
    norm : ndarray of shape (B,)
        Previous norm corrections (rlnNormCorrection).
    optics : ndarray of shape (B,), int
        0-based optics group (selects sigma2_noise).
    group : ndarray of shape (B,), int
        0-based scale group.
    ctf : dict of str -> ndarray of shape (B,)
        :class:`cryonb.ctf.CTFParams` fields.
    seed_class : ndarray of shape (B,), int
        Class each particle is restricted to (the first iteration's random seeds), or -1.
    """

    index: np.ndarray
    images: np.ndarray
    offset: np.ndarray
    norm: np.ndarray
    optics: np.ndarray
    group: np.ndarray
    ctf: dict
    seed_class: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, start: int, stop: int, images=None) -> ParticleBatch:
        """Particles ``start:stop`` as a batch (views of these arrays); ``images``: theirs
        if already elsewhere (e.g. on the device), default the batch's own rows."""
        sl = slice(start, stop)
        return ParticleBatch(
            index=self.index[sl], images=self.images[sl] if images is None else images,
            offset=self.offset[sl], norm=self.norm[sl], optics=self.optics[sl],
            group=self.group[sl], ctf={k: v[sl] for k, v in self.ctf.items()},
            seed_class=self.seed_class[sl])


def pack_arrays(arrays) -> np.ndarray:
    """Concatenate arrays (complex as pairs of floats) into one float64 host vector.

    Each array is copied once, straight into its part of the vector (from the device where
    it is a CuPy array): at 256 px, K=50 the sums are 158 MB, and every extra copy cost an
    iteration tens of milliseconds.
    """
    arrays = [a if hasattr(a, "get") else np.asarray(a) for a in arrays]
    cplx = [a.dtype.kind == "c" for a in arrays]
    sizes = [a.size * (2 if c else 1) for a, c in zip(arrays, cplx)]
    out = np.empty(sum(sizes), np.float64)
    o = 0
    for a, c, n in zip(arrays, cplx, sizes):
        part = out[o : o + n]
        o += n
        dst = (part.view(np.complex128) if c else part).reshape(a.shape)
        if not n:
            continue
        if not hasattr(a, "get"):
            dst[...] = a
        elif a.dtype == dst.dtype and a.flags.c_contiguous:
            a.get(out=dst)
        else:
            dst[...] = a.get()
    return out


def unpack_arrays(vec: np.ndarray, shapes) -> dict:
    """Inverse of :func:`pack_arrays` given ``(name, shape, is_complex)`` triples."""
    out, o = {}, 0
    for name, shape, cplx in shapes:
        size = int(np.prod(shape)) * (2 if cplx else 1)
        a = vec[o : o + size]
        o += size
        out[name] = (a.view(np.complex128) if cplx else a).reshape(shape).copy()
    if o != vec.size:
        raise ValueError(f"sum vector has {vec.size} values, expected {o}")
    return out


#: RELION's minres_map: no regularisation below this shell, and the lowest current resolution
MINRES_MAP = 5


def ssnr_shells(data_vs_prior: np.ndarray) -> np.ndarray:
    """Per class, the last shell before the SSNR drops below 1 (the last shell if it never does).

    Parameters
    ----------
    data_vs_prior : ndarray of shape (K, N // 2 + 1)
        SSNR per class and shell.

    Returns
    -------
    int ndarray of shape (K,)
    """
    rows = np.atleast_2d(data_vs_prior)
    out = np.full(rows.shape[0], rows.shape[1] - 1, np.int64)
    for k, row in enumerate(rows):
        below = np.flatnonzero(row[1:] < 1.0)
        if below.size:
            out[k] = below[0]
    return out


def ssnr_max_shell(data_vs_prior: np.ndarray) -> int:
    """RELION's ``maxres`` (``updateCurrentResolution``): the largest :func:`ssnr_shells` over
    the classes, at least ``MINRES_MAP``."""
    return max(MINRES_MAP, int(ssnr_shells(data_vs_prior).max()))


# Per-particle outputs of the E-step, in this order, as columns of one float64 array:
# "psi"/"offset_x"/"offset_y" are the best sample of the grid (the next iteration's search
# centre, as RELION), the "_refined" ones the pose reported in _data.star (--refine_pose).
RESULT_COLUMNS = (
    "class", "psi", "offset_x", "offset_y", "pmax", "loglik", "n_sig", "norm", "acc_rot",
    "acc_trans", "psi_refined", "offset_x_refined", "offset_y_refined",
)


@dataclass
class Class2DSums:
    """Weighted sums of the E-step that the M-step needs; summed over ranks and threads.

    All arrays are float64 (complex128) so that the order in which pools are summed changes
    results only at the 1e-15 level.

    Attributes
    ----------
    data : complex128 array of shape (K, pad*N, pad*N // 2 + 1)
        Back-rotated ``w CTF X / sigma2`` on the oversampled half-plane grid.
    weight : float64 array of the same shape
        Back-rotated ``w CTF^2 / sigma2``.
    sigma2_noise : (G, N // 2 + 1)
        Sum of weighted residual power per optics group and shell.
    sumw_optics : (G,)
        Sum of weights (particles) per optics group.
    pdf_class : (K,)
    prior_offset : (K, 2)
        Sum of ``w * offset`` per class.
    sigma2_offset : ()
        Sum of ``w * |offset - prior|^2``.
    scale_xa, scale_aa : (n_groups, N // 2 + 1)
        Per-group sums of ``Re(X conj(CTF A))`` and ``|CTF A|^2`` per shell (scale correction).
    norm_sum : ()
        Sum of new norm corrections.
    loglik, pmax : ()
        Sums of per-particle log-likelihood and maximum probability.
    n : ()
        Number of particles summed.
    acc_rot, acc_trans : (K,)
        Sums of weighted angular / translational posterior spread per class.
    class_overlap : (K, K)
        Sum over particles of ``p_i(a) p_i(b)`` (class posteriors): how much classes share
        their particles.
    class_margin : (K, K)
        Sum over the particles whose best class is ``a`` of ``min(L_i(a) - L_i(b), cap)``,
        ``L_i(k)`` the particle's best coarse log-likelihood in class ``k`` (offset prior
        included, class prior not): what moving class ``a``'s particles to class ``b`` would
        cost them (see :func:`cryonb.em._reseed.merge_ratios`).
    margin_n : (K,)
        Particles per best class in those sums.
    """

    data: np.ndarray
    weight: np.ndarray
    sigma2_noise: np.ndarray
    sumw_optics: np.ndarray
    pdf_class: np.ndarray
    prior_offset: np.ndarray
    sigma2_offset: np.ndarray
    scale_xa: np.ndarray
    scale_aa: np.ndarray
    norm_sum: np.ndarray
    loglik: np.ndarray
    pmax: np.ndarray
    n: np.ndarray
    acc_rot: np.ndarray
    acc_trans: np.ndarray
    class_overlap: np.ndarray
    class_margin: np.ndarray
    margin_n: np.ndarray

    @classmethod
    def zeros(cls, K: int, N: int, pad: int, n_optics: int, n_groups: int, xp=np):
        """Empty sums for K classes of box N."""
        p = pad * N
        nsh = N // 2 + 1
        z = xp.zeros
        return cls(
            data=z((K, p, p // 2 + 1), dtype=xp.complex128),
            weight=z((K, p, p // 2 + 1), dtype=xp.float64),
            sigma2_noise=z((n_optics, nsh)), sumw_optics=z(n_optics),
            pdf_class=z(K), prior_offset=z((K, 2)), sigma2_offset=z(()),
            scale_xa=z((n_groups, nsh)), scale_aa=z((n_groups, nsh)), norm_sum=z(()),
            loglik=z(()), pmax=z(()), n=z(()), acc_rot=z(K), acc_trans=z(K),
            class_overlap=z((K, K)), class_margin=z((K, K)), margin_n=z(K))

    def names(self) -> list[str]:
        """Field names, in the packing order."""
        return [f.name for f in fields(self)]

    def to_vector(self) -> np.ndarray:
        """All sums packed into one float64 host vector (for reductions and files)."""
        return pack_arrays(getattr(self, name) for name in self.names())

    def shapes(self) -> list[tuple[str, tuple, bool]]:
        """(name, shape, is_complex) of each field, to unpack a vector."""
        return [(n, tuple(getattr(self, n).shape), bool(np.iscomplexobj(getattr(self, n))))
                for n in self.names()]

    @classmethod
    def from_vector(cls, vec: np.ndarray, shapes) -> Class2DSums:
        """Inverse of :meth:`to_vector` given :meth:`shapes` of a template."""
        return cls(**unpack_arrays(vec, shapes))

    def to_host(self) -> Class2DSums:
        """A copy with every array on the host (NumPy)."""
        vals = {}
        for name in self.names():
            a = getattr(self, name)
            vals[name] = a.get() if hasattr(a, "get") else np.array(a)
        return Class2DSums(**vals)

    def add_(self, other: Class2DSums) -> Class2DSums:
        """In-place sum (same backend)."""
        for name in self.names():
            getattr(self, name)[...] += getattr(other, name)
        return self
