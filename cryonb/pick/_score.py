"""Scoring picks against known particle positions (precision, recall, position error)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = ["match_picks", "score_picks"]

_XY = ["rlnCoordinateX", "rlnCoordinateY"]


def match_picks(picked, true, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of picked and true positions within ``radius``.

    Pairs are taken greedily from the closest: every pick matches at most one true position
    and vice versa.

    Parameters
    ----------
    picked : array of shape (n, 2)
        (x, y) pixels.
    true : array of shape (m, 2)
    radius : float
        Pixels; pairs farther apart never match.

    Returns
    -------
    pick_index, true_index : numpy.ndarray of shape (k,), int64
        Matched pairs.
    """
    picked = np.asarray(picked, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 2)
    if not len(picked) or not len(true):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    d = np.hypot(picked[:, None, 0] - true[None, :, 0], picked[:, None, 1] - true[None, :, 1])
    i, j = np.nonzero(d <= radius)
    order = np.argsort(d[i, j], kind="stable")
    used_p, used_t = set(), set()
    pi, ti = [], []
    for a, b in zip(i[order], j[order]):
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
            pi.append(a)
            ti.append(b)
    return np.asarray(pi, np.int64), np.asarray(ti, np.int64)


def score_picks(picks: pd.DataFrame, truth: pd.DataFrame, radius: float) -> dict:
    """Precision and recall of picks against true particle positions, micrograph by micrograph.

    Parameters
    ----------
    picks, truth : pandas.DataFrame
        Columns ``rlnMicrographName``, ``rlnCoordinateX``, ``rlnCoordinateY`` (pixels).
    radius : float
        A pick is right when a true position not matched by another pick lies within this
        many pixels (e.g. a quarter of the particle diameter).

    Returns
    -------
    dict
        ``precision``, ``recall``, ``tp``, ``fp``, ``fn``, ``n_picked``, ``n_true``,
        ``mean_error`` and ``max_error`` (pixels, over matched picks; NaN when none).

    Raises
    ------
    InputError
        A table without the needed columns.
    """
    for name, df in (("picks", picks), ("truth", truth)):
        missing = {"rlnMicrographName", *_XY} - set(df.columns)
        if missing:
            raise InputError(f"{name} has no {', '.join(sorted(missing))} column")
    errors: list[np.ndarray] = []
    tp = 0
    for mic, t in truth.groupby("rlnMicrographName", sort=False):
        p = picks[picks["rlnMicrographName"] == mic]
        pi, ti = match_picks(p[_XY].to_numpy(), t[_XY].to_numpy(), radius)
        tp += len(pi)
        if len(pi):
            errors.append(np.hypot(*(p[_XY].to_numpy()[pi] - t[_XY].to_numpy()[ti]).T))
    n_picked, n_true = len(picks), len(truth)
    err = np.concatenate(errors) if errors else np.empty(0)
    return {
        "precision": tp / n_picked if n_picked else float("nan"),
        "recall": tp / n_true if n_true else float("nan"),
        "tp": tp, "fp": n_picked - tp, "fn": n_true - tp,
        "n_picked": n_picked, "n_true": n_true,
        "mean_error": float(err.mean()) if err.size else float("nan"),
        "max_error": float(err.max()) if err.size else float("nan"),
    }
