"""Scores of a 2D classification against known truth.

The functions take plain per-particle arrays, so they score RELION's runs and cryonb's alike:

- :func:`class_purity`: share of particles that sit in their class's majority view;
- :func:`inplane_errors`: in-plane angle errors modulo each class's own rotation;
- :func:`offset_errors`: origin errors modulo each class's own centre;
- :func:`score_class2d`: all three from an estimated table and a truth table.

Conventions (measured with RELION 3.1.3, see ``docs/relion_outputs.md``): a 2D class is the view
in an arbitrary in-plane rotation and position of its own. For a particle projected with
``psi_true`` and origin ``o_true`` (``rlnOriginX/YAngst``, RELION's sign: the particle's centre
sits at ``-o_true`` from the box centre) and assigned to class ``k`` with ``psi_est`` and
``o_est``::

    psi_est = psi_true + c_k                  (mod 360; ``sign=+1``)
    o_est   = o_true + R(-psi_est) @ s_k      (R(a) = [[cos a, -sin a], [sin a, cos a]])

where ``c_k`` is the class's rotation and ``s_k`` (a 2-vector) its centre offset; both are
estimated robustly per class (circular median, median).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = [
    "InplaneErrors",
    "OffsetErrors",
    "circular_median_deg",
    "class_purity",
    "inplane_errors",
    "majority_views",
    "offset_errors",
    "rotate_2d",
    "score_class2d",
]


def _as_1d(name, a, n=None):
    a = np.asarray(a)
    if a.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise InputError(f"{name} has {a.shape[0]} entries, expected {n}")
    return a


def majority_views(assigned_class, true_view) -> dict:
    """Each class's most frequent true view.

    Parameters
    ----------
    assigned_class : array_like, shape (N,)
        Class label per particle (any hashable values, e.g. RELION's 1-based rlnClassNumber).
    true_view : array_like, shape (N,)
        True view label per particle.

    Returns
    -------
    dict
        ``{class: majority view}``; ties go to the smallest view label.
    """
    c = _as_1d("assigned_class", assigned_class)
    v = _as_1d("true_view", true_view, c.shape[0])
    table = pd.crosstab(pd.Series(c, name="class"), pd.Series(v, name="view"))
    return {k: table.columns[int(np.argmax(row))] for k, row in zip(table.index, table.values)}


def class_purity(assigned_class, true_view) -> float:
    """Fraction of particles whose class's majority view is their own view.

    Every class is mapped to the view most of its particles come from (several classes may map
    to the same view: splitting a view is not penalised, merging two views is).

    Parameters
    ----------
    assigned_class : array_like, shape (N,)
        Class label per particle.
    true_view : array_like, shape (N,)
        True view label per particle.

    Returns
    -------
    float
        Purity in [0, 1]; 1 when every class holds a single view.

    Examples
    --------
    >>> class_purity([1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1])
    0.8333333333333334
    """
    c = _as_1d("assigned_class", assigned_class)
    v = _as_1d("true_view", true_view, c.shape[0])
    if c.shape[0] == 0:
        raise InputError("class_purity needs at least one particle")
    table = pd.crosstab(c, v).to_numpy()
    return float(table.max(axis=1).sum() / c.shape[0])


def circular_median_deg(angles_deg) -> float:
    """Circular median of angles in degrees.

    The angle (among the data points) that minimises the summed circular distance to all
    others; robust to outliers, unlike the circular mean.

    Parameters
    ----------
    angles_deg : array_like, shape (M,)

    Returns
    -------
    float
        In [0, 360).
    """
    a = np.mod(np.asarray(angles_deg, dtype=np.float64).ravel(), 360.0)
    if a.size == 0:
        return float("nan")
    # O(M^2) in memory in blocks: fine for classes of up to ~1e5 particles
    best, best_cost = a[0], np.inf
    for start in range(0, a.size, 2048):
        cand = a[start : start + 2048]
        d = np.abs(cand[:, None] - a[None, :]) % 360.0
        cost = np.minimum(d, 360.0 - d).sum(axis=1)
        i = int(np.argmin(cost))
        if cost[i] < best_cost:
            best, best_cost = cand[i], cost[i]
    return float(best)


def _circ_dist_deg(a, b):
    d = np.abs(np.asarray(a, float) - np.asarray(b, float)) % 360.0
    return np.minimum(d, 360.0 - d)


def rotate_2d(vectors, angles_deg) -> np.ndarray:
    """Rotate 2-vectors ``(x, y)`` by ``R(a) = [[cos a, -sin a], [sin a, cos a]]``.

    Parameters
    ----------
    vectors : array_like, shape (N, 2)
        ``(x, y)`` per row.
    angles_deg : array_like, shape (N,) or scalar

    Returns
    -------
    numpy.ndarray, shape (N, 2)
    """
    v = np.asarray(vectors, dtype=np.float64)
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], axis=1)


@dataclass
class InplaneErrors:
    """In-plane angle errors modulo each class's rotation.

    Attributes
    ----------
    errors : numpy.ndarray, shape (N,)
        Per particle, degrees in [0, 180]: circular distance of ``psi_est - sign*psi_true``
        to its class's rotation.
    class_rotation : dict
        ``{class: c_k}`` in degrees [0, 360), the circular median of
        ``psi_est - sign*psi_true`` over the class (``c_k`` in the module docstring).
    sign : int
        The relation used: +1 (``psi_est = psi_true + c_k``, RELION 3.1.3) or -1.
    """

    errors: np.ndarray
    class_rotation: dict
    sign: int


def inplane_errors(assigned_class, psi_est, psi_true, *, sign: int = 1, subset=None):
    """In-plane angle error of each particle, modulo its class's own rotation.

    Parameters
    ----------
    assigned_class : array_like, shape (N,)
        Class label per particle.
    psi_est : array_like, shape (N,)
        Estimated in-plane angle (degrees), e.g. RELION 2D's ``rlnAnglePsi``.
    psi_true : array_like, shape (N,)
        True ``psi`` (degrees) the particle was projected with (``rlnAnglePsi`` given to
        ``relion_project``).
    sign : {1, -1}
        Relation between estimate and truth: ``psi_est = sign * psi_true + c_k``. RELION 3.1.3
        2D classification of ``relion_project`` particles follows ``sign=+1`` (measured; see
        ``docs/relion_outputs.md``).
    subset : array_like of bool, shape (N,), optional
        Particles used to estimate each class's rotation (e.g. only those in their class's
        majority view); errors are still returned for all particles.

    Returns
    -------
    InplaneErrors
    """
    c = _as_1d("assigned_class", assigned_class)
    n = c.shape[0]
    pe = _as_1d("psi_est", psi_est, n).astype(np.float64)
    pt = _as_1d("psi_true", psi_true, n).astype(np.float64)
    if sign not in (1, -1):
        raise InputError(f"sign must be +1 or -1, got {sign!r}")
    use = np.ones(n, bool) if subset is None else _as_1d("subset", subset, n).astype(bool)
    delta = np.mod(pe - sign * pt, 360.0)
    err = np.full(n, np.nan)
    rotation = {}
    for k in pd.unique(c):
        members = c == k
        ref = members & use
        if not ref.any():
            ref = members
        rotation[k] = circular_median_deg(delta[ref])
        err[members] = _circ_dist_deg(delta[members], rotation[k])
    return InplaneErrors(errors=err, class_rotation=rotation, sign=sign)


@dataclass
class OffsetErrors:
    """Origin errors modulo each class's own centre.

    Attributes
    ----------
    errors : numpy.ndarray, shape (N,)
        Per particle, Euclidean distance ``|o_est - o_true - R(-psi_est) s_k|`` in the units of
        the origins given.
    class_shift : dict
        ``{class: s_k}`` (2-vector, the class's centre offset ``s_k`` of the module
        docstring; the median of ``R(psi_est) (o_est - o_true)`` over the class).
    """

    errors: np.ndarray
    class_shift: dict


def offset_errors(assigned_class, psi_est, origin_est, origin_true, *, subset=None):
    """Origin error of each particle, modulo its class's own centre.

    Parameters
    ----------
    assigned_class : array_like, shape (N,)
        Class label per particle.
    psi_est : array_like, shape (N,)
        Estimated in-plane angle in degrees (``rlnAnglePsi`` of the 2D run).
    origin_est : array_like, shape (N, 2)
        Estimated ``(rlnOriginX, rlnOriginY)`` (px or A).
    origin_true : array_like, shape (N, 2)
        True ``(rlnOriginX, rlnOriginY)`` given to ``relion_project``, same units.
    subset : array_like of bool, shape (N,), optional
        Particles used to estimate each class's centre; errors are returned for all.

    Returns
    -------
    OffsetErrors

    Notes
    -----
    The relation ``o_est = o_true + R(-psi_est) s_k`` follows from RELION's E-step: the
    particle is shifted by ``+o`` and compared with the class turned by ``psi`` (the content
    of a class turns by ``R(-psi)``, the same convention as ``relion_project``'s psi), so a
    class centred at ``s_k`` adds ``R(-psi) s_k`` to every origin; the particle's own origin is
    not rotated. Measured on RELION 3.1.3 (``docs/relion_outputs.md``): this relation gives a
    median error of 0.44 px where ``R(+psi)`` gives 1.2 px and ignoring ``s_k`` 2.2 px.
    """
    c = _as_1d("assigned_class", assigned_class)
    n = c.shape[0]
    pe = _as_1d("psi_est", psi_est, n).astype(np.float64)
    oe = np.asarray(origin_est, dtype=np.float64)
    ot = np.asarray(origin_true, dtype=np.float64)
    for name, o in (("origin_est", oe), ("origin_true", ot)):
        if o.shape != (n, 2):
            raise InputError(f"{name} must have shape ({n}, 2), got {o.shape}")
    use = np.ones(n, bool) if subset is None else _as_1d("subset", subset, n).astype(bool)
    local = rotate_2d(oe - ot, pe)  # s_k estimate per particle
    err = np.full(n, np.nan)
    shift = {}
    for k in pd.unique(c):
        members = c == k
        ref = members & use
        if not ref.any():
            ref = members
        s = np.median(local[ref], axis=0)
        shift[k] = s
        pred = ot[members] + rotate_2d(np.broadcast_to(s, (members.sum(), 2)), -pe[members])
        err[members] = np.hypot(*(oe[members] - pred).T)
    return OffsetErrors(errors=err, class_shift=shift)


def score_class2d(estimated: pd.DataFrame, truth: pd.DataFrame, *, pixel_size=None) -> dict:
    """Purity, in-plane and offset errors of a 2D classification against truth.

    Parameters
    ----------
    estimated : pandas.DataFrame
        One row per particle in the same order as ``truth`` (e.g. the ``particles`` block of a
        RELION ``_data.star`` of a run on the set, sorted back to the input order), with
        ``rlnClassNumber``, ``rlnAnglePsi``, ``rlnOriginXAngst``, ``rlnOriginYAngst``.
    truth : pandas.DataFrame
        The set's truth table (:attr:`cryonb.testing.ClassSet.truth`): ``view``, ``psi``,
        ``origin_x_A``, ``origin_y_A``.
    pixel_size : float, optional
        A/px, to report offset errors in pixels too.

    Returns
    -------
    dict
        ``purity``, ``n_correct`` (particles in their class's majority view),
        ``inplane_median_deg`` / ``inplane_mean_deg`` / ``inplane_p90_deg`` over correctly
        classified particles, ``offset_median_A`` / ``offset_mean_A`` (and ``_px``),
        ``class_sizes``, ``class_to_view``, ``class_rotation_deg``, ``class_shift_A``.
    """
    if len(estimated) != len(truth):
        raise InputError(
            f"estimated table has {len(estimated)} rows, truth has {len(truth)}: they must "
            "describe the same particles in the same order"
        )
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        if col not in estimated.columns:
            raise InputError(f"estimated table lacks column {col}")
    cls = estimated["rlnClassNumber"].to_numpy()
    view = truth["view"].to_numpy()
    purity = class_purity(cls, view)
    maj = majority_views(cls, view)
    correct = np.array([maj[k] == v for k, v in zip(cls, view)])
    ip = inplane_errors(cls, estimated["rlnAnglePsi"].to_numpy(), truth["psi"].to_numpy(),
                        subset=correct)
    oe = estimated[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    ot = truth[["origin_x_A", "origin_y_A"]].to_numpy(float)
    off = offset_errors(cls, estimated["rlnAnglePsi"].to_numpy(), oe, ot, subset=correct)
    e_ip = ip.errors[correct]
    e_off = off.errors[correct]
    out = {
        "purity": purity,
        "n_particles": len(cls),
        "n_correct": int(correct.sum()),
        "inplane_median_deg": float(np.median(e_ip)),
        "inplane_mean_deg": float(np.mean(e_ip)),
        "inplane_p90_deg": float(np.percentile(e_ip, 90)),
        "offset_median_A": float(np.median(e_off)),
        "offset_mean_A": float(np.mean(e_off)),
        "class_sizes": {int(k): int(v) for k, v in pd.Series(cls).value_counts().items()},
        "class_to_view": {int(k): int(v) for k, v in maj.items()},
        "class_rotation_deg": {int(k): float(v) for k, v in ip.class_rotation.items()},
        "class_shift_A": {int(k): [float(x) for x in v] for k, v in off.class_shift.items()},
    }
    if pixel_size:
        out["offset_median_px"] = out["offset_median_A"] / pixel_size
        out["offset_mean_px"] = out["offset_mean_A"] / pixel_size
    return out
