"""Parameter sweeps: run a grid of job configurations, one table row per run.

A :class:`Sweep` takes a base configuration (:class:`cryonb.em.Class2DConfig`) and a grid of
options to vary, runs every configuration with :func:`cryonb.parallel.run_class2d`, and
collects one row per run into a :class:`pandas.DataFrame` (:meth:`Sweep.table`): the
parameters, the time of every stage and in all, particles per second of the E-step, the peak
host and device memory the ranks reported, and the quality of the result (class purity and
in-plane angle error when the particles' truth is known, else the final log-likelihood and
resolution).

Two kinds of sweep, which differ only in their defaults (the fields offered by
:class:`SweepWidget`, the plots that make sense):

``"performance"``
    ranks x threads (``j``) x ``pool`` x ``io_mode`` x ``combine`` x ``gpu``: same result,
    different speed. Plots: :meth:`Sweep.plot_throughput`, :meth:`Sweep.plot_scaling`,
    :meth:`Sweep.plot_stages`.
``"algorithm"``
    ``K``, ``tau2_fudge``, ``psi_step``, ``offset_range``, ``iter``...: different results.
    Plot: :meth:`Sweep.plot_quality`.

On disc (``root``)::

    root/sweep.json            the base configuration, the grid, the kind
    root/results.csv           the table (rewritten after every run)
    root/runs/<key>/run_it*    each run's own output (RELION's files), inspectable
    root/runs/<key>/sweep_run.json   the run's row, status, error, stats, history, files

Runs are cached by configuration: ``<key>`` is :meth:`cryonb.config.JobConfig.key` of the
configuration without its output name, so running a sweep again (or another sweep that
contains the same configuration, under the same root) does no new job for a finished run.
A sweep stops after the current run's pools when ``stop_event`` is set (or
:meth:`Sweep.stop` is called), and on ``KeyboardInterrupt``; the next :meth:`Sweep.run`
resumes with the first configuration that has not finished (a stopped run starts again from
scratch, so that its times stay comparable). A configuration that fails (bad options, too
little memory...) is recorded with status ``"failed"`` and its error, and the sweep goes on.

Several ranks on a CPU-only sweep share one ipyparallel cluster, started once for the largest
``ranks`` of the grid (its start-up time is :attr:`Sweep.cluster_seconds`, not part of any
row); GPU sweeps start fresh engines per run, since an engine cannot change the devices it is
pinned to. Pass ``client=`` to use engines of your own.

Layer 5: imports :mod:`cryonb.parallel`, :mod:`cryonb.testing.metrics`, :mod:`cryonb.viz`,
hvplot and ipywidgets only when used.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import JobConfig
from .errors import ConfigError

__all__ = [
    "KINDS",
    "STATUSES",
    "SWEEP_COLUMNS",
    "Sweep",
    "SweepWidget",
    "expand_grid",
    "parse_values",
]

#: the kinds of sweep
KINDS = ("performance", "algorithm")

#: status of a configuration: not run yet, finished, failed (with its error), stopped
STATUSES = ("pending", "ok", "failed", "stopped")

#: stages whose seconds, summed over the iterations, become ``t_<stage>`` columns
_STAGE_COLUMNS = ("init", "estep", "combine", "mstep", "write")
#: set-up stages reported by progress events only (seconds once per run)
_SETUP_STAGES = ("cluster", "preread", "scratch")

#: the table's columns besides the grid's parameters (which come after ``status``)
SWEEP_COLUMNS = (
    "run", "key", "status",
    # (the grid's parameters go here)
    "t_total", "t_setup", "t_cluster", "t_preread", "t_scratch", "t_broadcast",
    *(f"t_{s}" for s in _STAGE_COLUMNS),
    "particles_per_s", "n_particles", "iterations", "pool_used", "gpu_used", "engines_used",
    "peak_host_mem_mb", "peak_device_mem_mb",
    "purity", "inplane_median_deg", "offset_median_px",
    "log_likelihood", "resolution_A", "avg_pmax",
    "error", "output_dir",
)
_PARAM_AT = SWEEP_COLUMNS.index("status") + 1

#: option groups a sweep widget offers, per kind
_WIDGET_GROUPS = {"performance": ("parallel", "io", "cluster"),
                  "algorithm": ("algorithm", "sampling")}
#: fields never swept (they name files of the run itself)
_NOT_SWEPT = ("i", "o", "continue_from")

_RECORD = "sweep_run.json"
_MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------- the grid
def expand_grid(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The configurations of a grid, as dicts of the options that change.

    Parameters
    ----------
    grid : dict or list of dict
        ``{option: [values]}``: the cartesian product, the last option varying fastest (a
        single value, or a string, counts as one value); or a list of dicts, each one
        configuration, in order.

    Returns
    -------
    list of dict

    Examples
    --------
    >>> expand_grid({"j": [1, 2], "io_mode": ["parallel", "preread"]})[1]
    {'j': 1, 'io_mode': 'preread'}
    >>> expand_grid([{"K": 2}, {"K": 4, "iter": 5}])
    [{'K': 2}, {'K': 4, 'iter': 5}]
    """
    if isinstance(grid, Mapping):
        names = list(grid)
        values = [list(v) if isinstance(v, list | tuple | range | np.ndarray) else [v]
                  for v in grid.values()]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]
    if isinstance(grid, Sequence) and not isinstance(grid, str):
        out = []
        for point in grid:
            if not isinstance(point, Mapping):
                raise TypeError(f"a grid given as a list holds dicts, not {type(point).__name__}")
            out.append(dict(point))
        return out
    raise TypeError(f"grid must be a dict of value lists or a list of dicts, not "
                    f"{type(grid).__name__}")


def _field_kind(f: dataclasses.Field) -> str:
    """``bool``, ``int``, ``float`` or ``str`` from a field's annotation (a string here)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for kind in ("bool", "int", "float"):
        if t.split("|")[0].strip() == kind:
            return kind
    return "str"


def parse_values(config: JobConfig, name: str, text: str) -> list[Any]:
    """Values of option ``name`` typed as text, e.g. in :class:`SweepWidget`.

    Parameters
    ----------
    config : JobConfig
        Gives the option's type and allowed values.
    name : str
        The option (a field of ``config``).
    text : str
        Numbers and choices separated by commas, semicolons or spaces (``1, 2, 4``;
        ``parallel preread``); booleans as ``true``/``false``. Free text (``--gpu`` strings,
        which contain commas) separated by ``;``, with ``none`` for "not given" and ``auto``
        (or ``''``) for the empty string: ``0:1; 0,1; auto``.

    Returns
    -------
    list

    Raises
    ------
    ConfigError
        Unknown option, a value that is not of its type, or not among its choices.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise ConfigError(f"{type(config).__name__} has no option {name!r}")
    f = fields[name]
    kind = _field_kind(f)
    choices = f.metadata.get("choices")
    seps = ";" if kind == "str" and not choices else ",; \t\n"
    tokens = [text]
    for sep in seps:
        tokens = [p for t in tokens for p in t.split(sep)]
    tokens = [t.strip() for t in tokens if t.strip()]
    out: list[Any] = []
    for tok in tokens:
        try:
            if kind == "bool":
                low = tok.lower()
                if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(tok)
                out.append(low in ("true", "yes", "1", "on"))
            elif kind == "int":
                out.append(int(tok))
            elif kind == "float":
                out.append(float(tok))
            elif tok.lower() == "none":
                out.append(None)
            elif tok.lower() in ("auto", "''", '""'):
                out.append("")
            else:
                out.append(tok)
        except ValueError:
            raise ConfigError(f"{config.flag(name)}: {tok!r} is not a {kind}") from None
        if choices and out[-1] not in choices:
            raise ConfigError(f"{config.flag(name)} {tok!r}: choose among "
                              f"{', '.join(map(str, choices))}")
    if not out:
        raise ConfigError(f"{config.flag(name)}: no values given")
    return out


# ---------------------------------------------------------------------------------- one run
class _Recorder:
    """The progress callback of one run: set-up stage times, memory peaks, forwarding."""

    def __init__(self, key: str, forward: Callable | None):
        self.key = key
        self.forward = forward
        self.setup_s: dict[str, float] = {}
        self.host_peak: dict[int, int] = {}  # rank -> bytes
        self.device_peak: dict[tuple[int, str], int] = {}  # (rank, device) -> bytes
        self.pool_memory = 0

    def memory(self, rank: int, memory: Mapping | None) -> None:
        if not memory:
            return
        rss = int(memory.get("rss", 0) or 0)
        self.host_peak[rank] = max(self.host_peak.get(rank, 0), rss)
        for dev, used in (memory.get("devices") or {}).items():
            k = (rank, str(dev))
            self.device_peak[k] = max(self.device_peak.get(k, 0), int(used))

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "heartbeat":
            self.memory(int(event.get("rank", 0)), event.get("memory"))
        elif kind == "setup":
            self.pool_memory = int(event.get("pool_memory") or 0)
        elif (kind == "stage" and event.get("state") == "end"
              and event.get("stage") in _SETUP_STAGES):
            s = event["stage"]
            self.setup_s[s] = self.setup_s.get(s, 0.0) + float(event.get("seconds", 0.0))
        if self.forward is not None:
            self.forward({**event, "run": self.key})

    def peaks_mb(self) -> tuple[float, float]:
        """Host: the ranks' peak RSS summed; device: the busiest device's peak (NaN: none)."""
        host = sum(self.host_peak.values()) / _MB if self.host_peak else math.nan
        per_dev: dict[str, int] = {}
        for (_, dev), used in self.device_peak.items():
            per_dev[dev] = per_dev.get(dev, 0) + used
        device = max(per_dev.values()) / _MB if per_dev else math.nan
        return host, device


def _timing_columns(result, rec: _Recorder, wall: float) -> dict[str, Any]:
    """``t_*`` columns and particles/s of a :class:`~cryonb.parallel.RunResult`."""
    stats = result.stats
    totals = stats.stage_totals()
    row: dict[str, Any] = {"t_total": wall, "t_setup": stats.setup_s,
                           "t_broadcast": totals.get("setup", 0.0)}
    for s in _SETUP_STAGES:
        row[f"t_{s}"] = rec.setup_s.get(s, 0.0)
    for s in _STAGE_COLUMNS:
        row[f"t_{s}"] = totals.get(s, 0.0)
    est = [it for it in stats.iterations if it.iteration >= 1] or list(stats.iterations)
    secs = sum(it.stages.get("estep", it.stages.get("init", 0.0)) for it in est)
    row["particles_per_s"] = sum(it.particles for it in est) / secs if secs > 0 else math.nan
    for it in stats.iterations:
        for r, t in it.ranks.items():
            rec.memory(int(r), t.memory)
    row["peak_host_mem_mb"], row["peak_device_mem_mb"] = rec.peaks_mb()
    return row


def _read_truth(truth) -> pd.DataFrame | None:
    if truth is None or truth is False:
        return None
    if isinstance(truth, pd.DataFrame):
        return truth
    return pd.read_csv(truth)


def _quality_columns(result, truth: pd.DataFrame | None) -> dict[str, Any]:
    """Log-likelihood, resolution, pmax; purity and angle errors against ``truth``."""
    last = result.history[-1] if result.history else {}
    row = {"log_likelihood": last.get("log_likelihood", math.nan),
           "resolution_A": last.get("current_resolution", math.nan),
           "avg_pmax": last.get("avg_pmax", math.nan)}
    data = (result.files or {}).get("data")
    if truth is None or not data:
        return row
    from .io import read_particles
    from .testing.metrics import score_class2d

    try:
        table = read_particles(data)
        est = table.particles
        apix = table.pixel_size
        t = truth
        if "origin_x_A" not in t.columns and {"origin_x", "origin_y"} <= set(t.columns):
            t = t.assign(origin_x_A=t["origin_x"] * apix, origin_y_A=t["origin_y"] * apix)
        if "view" in t.columns and (t["view"] < 0).all():
            return row  # random orientations: there is no view to be pure about
        score = score_class2d(est, t, pixel_size=apix)
    except Exception as exc:
        warnings.warn(f"cannot score {data} against the truth: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return row
    row.update(purity=score["purity"], inplane_median_deg=score["inplane_median_deg"],
               offset_median_px=score.get("offset_median_px", math.nan))
    return row


def _jsonable(obj):
    """Plain JSON types (NumPy scalars and arrays, paths, NaN as null)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


def _write_json(path: Path, data: dict) -> None:
    from .io import atomic_write

    with atomic_write(path, "w") as fh:
        json.dump(_jsonable(data), fh, indent=1)


def _config_class(name: str):
    module, _, qual = name.rpartition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------- the sweep
class Sweep:
    """Run every configuration of a grid, once, and tabulate times, memory and quality.

    Parameters
    ----------
    base_config : Class2DConfig
        Options shared by every run (``i`` the particles; ``o`` is replaced by each run's
        own folder under ``root``).
    grid : dict or list of dict
        Options to vary (see :func:`expand_grid`): ``{"j": [1, 2, 4], "io_mode":
        ["parallel", "preread"]}`` (cartesian product) or ``[{"ranks": 1}, {"ranks": 3,
        "j": 2}]``.
    kind : {"performance", "algorithm"}
        What the sweep is about (defaults of the widget and the plots).
    root : str or os.PathLike
        Folder of the sweep's runs and tables (created).
    truth : str, os.PathLike, DataFrame, False or None
        Per-particle truth of simulated data (the ``*_truth.csv`` of
        :func:`cryonb.simulate.write_particle_set`: ``view``, ``psi``, ``origin_x/y`` in
        pixels, or ``origin_x_A/y_A``), in the order of the input STAR file. ``None``: the
        ``<name>_truth.csv`` beside the input ``<name>.star`` when there is one; ``False``:
        never score against truth.
    client : ipyparallel.Client, Cluster or ClusterHandle, optional
        Engines for runs of several ranks (left running).
    runner : callable, optional
        ``runner(config, progress=, stop_event=, client=) -> RunResult``; default
        :func:`cryonb.parallel.run_class2d`.
    retry_failed : bool
        Run failed configurations again (default: a failure is a result, kept).
    share_cluster : {"auto", True, False}
        Reuse one cluster for all runs of several ranks (``"auto"``: on CPU-only sweeps).
    warmup : bool, optional
        Before the first timed run, run once untimed (one iteration, output removed) so that
        one-off costs (compiling kernels, imports, file caches) do not land on the first row:
        in this process with the first one-rank configuration, and on the shared cluster with
        the largest. Default: on for performance sweeps.

    Attributes
    ----------
    grid : dict or list of dict
        As given.
    points : list of dict
        The grid's configurations (options that change).
    configs : list of JobConfig
        The full configuration of every run (``o`` in its run folder).
    keys : list of str
        The cache key of every run.
    cluster_seconds : float
        Time spent starting shared clusters (not part of any run's row).
    warmup_seconds : float
        Time spent warming up (not part of any run's row).

    Examples
    --------
    >>> sweep = Sweep(Class2DConfig(i="data/particles.star", K=4, iter=5, cpu=True),
    ...               {"j": [1, 2], "io_mode": ["parallel", "preread"]}, root="sweeps/io")
    >>> df = sweep.run()                     # doctest: +SKIP
    >>> sweep.plot_throughput(x="j")         # doctest: +SKIP
    """

    def __init__(self, base_config: JobConfig, grid, kind: str = "performance",
                 root: str | os.PathLike = "sweeps/sweep", truth=None, client=None, *,
                 runner: Callable | None = None, retry_failed: bool = False,
                 share_cluster: bool | str = "auto", warmup: bool | None = None):
        if not isinstance(base_config, JobConfig):
            raise TypeError(f"base_config must be a job configuration (e.g. Class2DConfig), "
                            f"not {type(base_config).__name__}")
        if kind not in KINDS:
            raise ConfigError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.base = base_config
        self.kind = kind
        self.root = Path(root)
        self.client = client
        self.runner = runner
        self.retry_failed = retry_failed
        self.share_cluster = share_cluster
        self.warmup = kind == "performance" if warmup is None else warmup
        self.grid = grid
        self.points = expand_grid(grid)
        names = {f.name for f in dataclasses.fields(base_config)}
        bad = sorted({k for p in self.points for k in p} - names)
        if bad:
            raise ConfigError(f"{type(base_config).__name__} has no option(s) "
                              f"{', '.join(bad)}")
        swept = sorted({k for p in self.points for k in p} & set(_NOT_SWEPT))
        if swept:
            raise ConfigError(f"a sweep cannot vary {', '.join(swept)}: each run writes to "
                              "its own folder under root, from the base configuration's input")
        self.params = list(dict.fromkeys(k for p in self.points for k in p))
        self.configs: list[JobConfig] = []
        self.keys: list[str] = []
        own = {"o", "continue_from"} & names
        for p in self.points:
            cfg = dataclasses.replace(base_config, **{**dict.fromkeys(own, ""), **p})
            key = cfg.key()
            self.keys.append(key)
            if "o" in own:
                out: dict[str, Any] = {"o": str(self.run_dir(key) / "run")}
                cfg = dataclasses.replace(cfg, **out)
            self.configs.append(cfg)
        self._truth_arg = truth
        self._truth: pd.DataFrame | None = None
        self._stop = threading.Event()
        self._clusters: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.cluster_seconds = 0.0
        self.warmup_seconds = 0.0
        self.current: int | None = None

    # ------------------------------------------------------------------ persistence
    @classmethod
    def open(cls, root: str | os.PathLike, **kwargs) -> Sweep:
        """Reopen the sweep saved under ``root`` (its ``sweep.json``), e.g. to read its table.

        Parameters
        ----------
        root : str or os.PathLike
        **kwargs
            ``truth``, ``client``, ``runner``... as for :class:`Sweep`.
        """
        root = Path(root)
        path = root / "sweep.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no sweep was saved under {root}")
        d = json.loads(path.read_text())
        cfg_cls = _config_class(d["config_class"])
        base = cfg_cls(**d["base"])
        return cls(base, d["points"], kind=d["kind"], root=root, **kwargs)

    def _save_definition(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cls = type(self.base)
        _write_json(self.root / "sweep.json", {
            "kind": self.kind, "config_class": f"{cls.__module__}:{cls.__qualname__}",
            "base": self.base.to_dict(), "points": self.points, "keys": self.keys})

    def run_dir(self, key_or_index: str | int) -> Path:
        """The output folder of a run (by its key or its index in the grid)."""
        key = self.keys[key_or_index] if isinstance(key_or_index, int) else key_or_index
        return self.root / "runs" / key

    def record(self, index: int) -> dict | None:
        """Everything saved about run ``index``: row, status, error and traceback, the
        configuration, the stats per iteration, stage and rank, the history, the files
        (``None`` if it never ran)."""
        path = self.run_dir(index) / _RECORD
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def status(self, index: int) -> str:
        """``pending``, ``ok``, ``failed`` or ``stopped``."""
        rec = self.record(index)
        return rec["status"] if rec else "pending"

    # ------------------------------------------------------------------ the table
    def table(self) -> pd.DataFrame:
        """One row per configuration of the grid, in grid order (pending ones included).

        Columns: ``run``, ``key``, ``status``, the grid's options, then the rest of
        :data:`SWEEP_COLUMNS`: ``t_*`` (seconds; ``t_total`` is the whole call, ``t_setup``
        the run's set-up including ``t_cluster``/``t_preread``/``t_scratch``, ``t_broadcast``
        the per-iteration task lists and model broadcast, then the stages summed over the
        iterations), ``particles_per_s`` (E-step of iterations 1 and later), memory peaks in
        MB (host: the working ranks' peak RSS summed; device: the busiest device's CuPy pool),
        quality, ``error`` and ``output_dir``.
        """
        rows = []
        for i, (point, key) in enumerate(zip(self.points, self.keys)):
            rec = self.record(i)
            row = dict.fromkeys(SWEEP_COLUMNS)
            row.update(rec["row"] if rec else {})
            row.update(run=i, key=key, status=rec["status"] if rec else "pending",
                       output_dir=str(self.run_dir(key)))
            row.update({k: point.get(k, getattr(self.base, k)) for k in self.params})
            rows.append(row)
        cols = [*SWEEP_COLUMNS[:_PARAM_AT], *self.params, *SWEEP_COLUMNS[_PARAM_AT:]]
        df = pd.DataFrame(rows, columns=cols)
        num = [c for c in cols if c.startswith("t_") or c in (
            "particles_per_s", "peak_host_mem_mb", "peak_device_mem_mb", "purity",
            "inplane_median_deg", "offset_median_px", "log_likelihood", "resolution_A",
            "avg_pmax")]
        df[num] = df[num].astype(float)
        return df

    @property
    def results(self) -> pd.DataFrame:
        """The finished runs only (``status == "ok"``)."""
        df = self.table()
        return df[df["status"] == "ok"].reset_index(drop=True)

    def rank_table(self) -> pd.DataFrame:
        """Per finished run and working rank: particles, pools, read/compute/wall seconds,
        particles/s, summed over the iterations."""
        rows = []
        for i in range(len(self.points)):
            rec = self.record(i)
            if not rec or rec["status"] != "ok":
                continue
            acc: dict[int, dict] = {}
            for it in rec.get("stats", {}).get("iterations", []):
                for r, t in it.get("ranks", {}).items():
                    a = acc.setdefault(int(r), {"particles": 0, "pools": 0, "read_s": 0.0,
                                                "compute_s": 0.0, "wall_s": 0.0})
                    for k in a:
                        a[k] += t.get(k, 0) or 0
            for r, a in sorted(acc.items()):
                pps = a["particles"] / a["wall_s"] if a["wall_s"] > 0 else math.nan
                rows.append({"run": i, "key": self.keys[i], **self.points[i], "rank": r, **a,
                             "particles_per_s": pps})
        return pd.DataFrame(rows)

    def _write_table(self) -> None:
        from .io import atomic_write

        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.root / "results.csv", "w") as fh:
            self.table().to_csv(fh, index=False)

    # ------------------------------------------------------------------ running
    @property
    def truth(self) -> pd.DataFrame | None:
        """The truth table used for scoring (``None``: none known)."""
        if self._truth is None and self._truth_arg is not False:
            arg = self._truth_arg
            if arg is None:
                star = Path(getattr(self.base, "i", "") or "")
                cand = star.with_name(star.stem + "_truth.csv") if star.name else None
                arg = cand if cand is not None and cand.exists() else None
            self._truth = _read_truth(arg)
        return self._truth

    def stop(self) -> None:
        """Stop after the current run's pools (that run is recorded as stopped)."""
        self._stop.set()

    def _todo(self) -> list[int]:
        done = ("ok",) if self.retry_failed else ("ok", "failed")
        return [i for i in range(len(self.points)) if self.status(i) not in done]

    def run(self, *, progress: Callable | None = None,
            stop_event: threading.Event | None = None) -> pd.DataFrame:
        """Run every configuration not finished yet, in grid order; return :meth:`table`.

        Parameters
        ----------
        progress : callable, optional
            Called with dict events: ``{"event": "warmup", "ranks"}`` (see ``warmup``),
            ``{"event": "run_start", "run": i, "key", "params", "todo"}``, every runtime
            event of the current run (see :mod:`cryonb.parallel.stats`) with ``"run": key``
            added, ``{"event": "run_end", "run": i, "key", "status", "row"}`` and finally
            ``{"event": "sweep_end", "stopped": bool}``.
        stop_event : threading.Event, optional
            Set it to stop after the current run's pools (as :meth:`stop`).

        Returns
        -------
        pandas.DataFrame

        Raises
        ------
        KeyboardInterrupt
            After recording the interrupted run as stopped and saving the table; the next
            call resumes there.
        """
        if stop_event is not None:
            self._stop = stop_event
        elif self._stop.is_set():
            self._stop = threading.Event()
        stop = self._stop
        self._save_definition()
        todo = self._todo()
        stopped = False
        try:
            if self.warmup and todo:
                self._warm_up(todo, progress, stop)
            for n, i in enumerate(todo):
                if stop.is_set():
                    stopped = True
                    break
                _emit(progress, "run_start", run=i, key=self.keys[i], params=self.points[i],
                      todo=len(todo) - n)
                status = self._run_one(i, progress, stop)
                self._write_table()
                _emit(progress, "run_end", run=i, key=self.keys[i], status=status,
                      row=(self.record(i) or {}).get("row", {}))
                if status == "stopped":
                    stopped = True
                    break
        finally:
            self.current = None
            self._close_clusters()
            self._write_table()
        _emit(progress, "sweep_end", stopped=stopped)
        return self.table()

    async def run_async(self, *, progress: Callable | None = None,
                        stop_event: threading.Event | None = None) -> pd.DataFrame:
        """:meth:`run` in a thread, for an event loop; events are delivered on the loop.

        Cancelling the awaiting task stops the sweep after the current run's pools.
        """
        from ._asyncio import run_blocking

        return await run_blocking(self.run, progress, stop_event)

    def _runner(self) -> Callable:
        if self.runner is not None:
            return self.runner
        from .parallel import run_class2d

        return run_class2d

    def _run_one(self, i: int, progress, stop: threading.Event) -> str:
        cfg, key = self.configs[i], self.keys[i]
        rdir = self.run_dir(key)
        if rdir.exists():  # an earlier attempt that did not finish: start afresh
            shutil.rmtree(rdir)
        rdir.mkdir(parents=True)
        self.current = i
        rec = _Recorder(key, progress)
        base = {"run": i, "key": key, "params": self.points[i], "config": cfg.to_dict(),
                "command_line": cfg.command_line(), "started": time.time()}
        t0 = time.monotonic()
        try:
            cfg.validate()
            client = self._client_for(cfg)  # a shared cluster's start is not the run's time
            t0 = time.monotonic()
            result = self._runner()(cfg, progress=rec, stop_event=stop, client=client)
        except KeyboardInterrupt:
            self._save_record(rdir, base, "stopped", {}, error="KeyboardInterrupt")
            raise
        except Exception as exc:
            if type(exc).__name__ == "RankError":  # engines may be unusable now
                self._close_clusters()
            self._save_record(rdir, base, "failed", {"t_total": time.monotonic() - t0},
                              error=f"{type(exc).__name__}: {exc}",
                              tb=traceback.format_exc())
            return "failed"
        wall = time.monotonic() - t0
        status = "stopped" if result.stopped else "ok"
        row = {**_timing_columns(result, rec, wall), **_quality_columns(result, self.truth),
               "n_particles": _n_particles(result), "iterations": result.iteration,
               "pool_used": result.pool, "gpu_used": bool(result.gpu),
               "engines_used": result.engines}
        self._save_record(rdir, base, status, row, result=result)
        return status

    def _warm_up(self, todo: list[int], progress, stop: threading.Event) -> None:
        """Untimed one-iteration runs: in-process, and on the shared cluster (see ``warmup``)."""
        cfgs = [self.configs[i] for i in todo]
        picks = [c for c in cfgs if c.ranks == 1][:1]
        shared = [c for c in cfgs if c.ranks > 1 and self.client is None and self._shares()]
        picks += [max(shared, key=lambda c: c.ranks)] if shared else []
        out = self.root / "warmup"
        t0 = time.monotonic()
        for cfg in picks:
            if stop.is_set():
                break
            changes: dict[str, Any] = {"o": str(out / "run")} if hasattr(cfg, "o") else {}
            if hasattr(cfg, "iter"):
                changes["iter"] = 1
            _emit(progress, "warmup", ranks=cfg.ranks)
            try:
                cfg = dataclasses.replace(cfg, **changes).validate()
                self._runner()(cfg, progress=None, stop_event=stop,
                               client=self._client_for(cfg))
            except Exception:  # the timed run reports what is wrong
                pass
            finally:
                shutil.rmtree(out, ignore_errors=True)
        self.warmup_seconds += time.monotonic() - t0

    def _save_record(self, rdir: Path, base: dict, status: str, row: dict, *,
                     error: str | None = None, tb: str | None = None, result=None) -> None:
        data = {**base, "status": status, "finished": time.time(),
                "row": {**row, "error": error}, "error": error, "traceback": tb}
        if result is not None:
            data.update(stats=result.stats.to_dict(), history=result.history,
                        files=result.files, device_table=result.device_table,
                        warnings=result.warnings, ranks=[r.to_dict() for r in result.ranks])
        _write_json(rdir / _RECORD, data)

    # ------------------------------------------------------------------ engines
    def _shares(self) -> bool:
        if self.share_cluster != "auto":
            return bool(self.share_cluster)
        from .backend import gpu_available

        return all(c.cpu for c in self.configs) or not gpu_available()

    def _client_for(self, cfg):
        """The engines of a run of several ranks: the user's, a shared cluster, or none."""
        if self.client is not None:
            return self.client
        if cfg.ranks == 1 or cfg.engines in ("inprocess", "attach") or not self._shares():
            return None
        kind = "mpi" if cfg.engines == "mpi" else "local"
        with self._lock:
            handle = self._clusters.get(kind)
            if handle is not None and len(handle.engine_ids) < cfg.ranks:
                handle.stop()
                handle = None
            if handle is None:
                from .parallel import start_cluster

                n = max(c.ranks for c in self.configs
                        if ("mpi" if c.engines == "mpi" else "local") == kind)
                t0 = time.monotonic()
                handle = start_cluster(n, kind)
                self.cluster_seconds += time.monotonic() - t0
                self._clusters[kind] = handle
        return handle

    def _close_clusters(self) -> None:
        with self._lock:
            for handle in self._clusters.values():
                log = getattr(getattr(handle, "cluster", None), "log", None)
                if log is not None:  # engines stopped on purpose exit with code 1: no warning
                    log.setLevel(logging.ERROR)
                try:
                    handle.stop()
                except Exception:  # pragma: no cover  (already gone)
                    pass
            self._clusters.clear()

    # ------------------------------------------------------------------ plots
    def _varying(self, df: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
        ex = set(exclude)
        return [p for p in self.params
                if p not in ex and df[p].astype(str).nunique() > 1]

    def _labelled(self, by: Sequence[str] | str | None, x: str,
                  df: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
        """Finished runs with a ``label`` column naming ``by`` and the other varying options."""
        df = self.results if df is None else df
        by = [by] if isinstance(by, str) else list(by or [])
        cols = [c for c in by if c in df.columns] + [
            c for c in self._varying(df, exclude=[x, *by])]
        df = df.copy()
        df["label"] = (df[cols].astype(str).apply(
            lambda r: ", ".join(f"{c}={v}" for c, v in r.items()), axis=1)
            if cols else "all")
        return df, cols

    def _x(self, preferred: Sequence[str]) -> str:
        df = self.results
        varying = self._varying(df) if len(df) else list(self.params)
        for name in preferred:
            if name in varying:
                return name
        if varying:
            return varying[0]
        if self.params:
            return self.params[0]
        raise ValueError("the sweep varies no option: nothing to plot against")

    @staticmethod
    def _hvplot(df: pd.DataFrame):
        """``df.hvplot`` without importing :mod:`hvplot.pandas`.

        That import loads the bokeh extension again, from the CDN: on an offline machine
        the plots of that cell stay blank. The extension is loaded inline instead
        (:func:`cryonb.viz.ensure_extension`).
        """
        from hvplot import hvPlotTabular

        from .viz import ensure_extension

        ensure_extension()
        return hvPlotTabular(df)

    def _lines(self, df: pd.DataFrame, x: str, y: str, title: str, ylabel: str):
        df = df.sort_values(x) if df[x].map(lambda v: isinstance(v, int | float)).all() else df
        kw = {"x": x, "y": y, "by": "label", "title": title, "ylabel": ylabel,
              "hover_cols": ["run", "key"], "height": 320, "width": 520, "legend": "top_left"}
        plot = self._hvplot(df)
        return plot.line(**kw) * plot.scatter(**kw)

    def plot_throughput(self, x: str | None = None, by: str | Sequence[str] = "io_mode"):
        """Particles per second against threads (``j``) or ``pool``, one line per I/O mode.

        Parameters
        ----------
        x : str, optional
            Default: ``j`` if it varies, else ``pool`` (as used: ``pool_used``), else the
            first varying option.
        by : str or list of str
            Options that make separate lines (with any other varying options).

        Returns
        -------
        holoviews.Overlay
        """
        x = x or self._x(("j", "pool"))
        col = "pool_used" if x == "pool" else x
        df, _ = self._labelled(by, x)
        return self._lines(df, col, "particles_per_s", f"throughput vs {x}", "particles/s")

    def plot_scaling(self, by: str | Sequence[str] = "io_mode"):
        """Particles per second against ranks, with ideal linear scaling of the workers.

        A run of ``ranks`` > 1 has ``ranks - 1`` working ranks (rank 0 leads); a run of one
        rank works itself. The dashed line scales the smallest run's throughput by the number
        of working ranks.

        Returns
        -------
        holoviews.Overlay
        """
        import holoviews as hv

        df, _ = self._labelled(by, "ranks")
        df["workers"] = df["ranks"].clip(lower=2) - 1
        plot = self._lines(df, "ranks", "particles_per_s", "scaling vs ranks", "particles/s")
        ideal = []
        for _, g in df.groupby("label"):
            g = g.sort_values("ranks")
            first = g.iloc[0]
            ideal.append(hv.Curve((g["ranks"], first["particles_per_s"] * g["workers"]
                                   / first["workers"]), "ranks", "particles/s",
                                  label="ideal").opts(line_dash="dashed", color="gray"))
        return plot * hv.Overlay(ideal) if ideal else plot

    def plot_stages(self):
        """Seconds of every stage, stacked, one bar per finished run.

        Returns
        -------
        holoviews.Bars
        """
        df, _ = self._labelled([], "")
        cols = ["t_setup", "t_broadcast", *(f"t_{s}" for s in _STAGE_COLUMNS)]
        long = df.melt(id_vars=["label"], value_vars=cols, var_name="stage",
                       value_name="seconds")
        long["stage"] = long["stage"].str[2:]
        return self._hvplot(long).bar(x="label", y="seconds", by="stage", stacked=True,
                                      rot=30, title="time per stage", height=360, width=640,
                                      legend="top_right")

    def plot_quality(self, param: str | None = None, metrics: Sequence[str] | None = None):
        """Result quality against an option, one panel per metric.

        Parameters
        ----------
        param : str, optional
            Default: the first varying option.
        metrics : list of str, optional
            Columns to plot; default ``purity`` and ``inplane_median_deg`` when the truth is
            known, else ``log_likelihood`` and ``resolution_A``.

        Returns
        -------
        holoviews.Layout
        """
        import holoviews as hv

        param = param or self._x(("K", "tau2_fudge", "psi_step", "offset_range", "iter"))
        df, _ = self._labelled([], param)
        if metrics is None:
            known = len(df) and df["purity"].notna().any()
            metrics = (["purity", "inplane_median_deg"] if known
                       else ["log_likelihood", "resolution_A"])
        plots = [self._lines(df, param, m, f"{m} vs {param}", m) for m in metrics]
        return hv.Layout(plots).cols(2)

    # ------------------------------------------------------------------ display
    def widget(self) -> SweepWidget:
        """A :class:`SweepWidget` on this sweep (its grid, its root)."""
        return SweepWidget(self.base, kind=self.kind, root=self.root, grid=self.grid,
                           truth=self._truth_arg, client=self.client, runner=self.runner)

    def __repr__(self) -> str:
        counts = pd.Series([self.status(i) for i in range(len(self.points))]).value_counts()
        done = ", ".join(f"{n} {s}" for s, n in counts.items())
        return (f"Sweep({self.kind}, {len(self.points)} runs of {', '.join(self.params)}: "
                f"{done}; root {self.root})")


def _n_particles(result) -> int:
    its = result.stats.iterations
    return int(its[-1].particles) if its else 0


def _emit(progress, event: str, **data) -> None:
    if progress is not None:
        progress({"event": event, "time": time.time(), **data})


# ---------------------------------------------------------------------------------- the widget
class SweepWidget:
    """Define a sweep's grid in a notebook, run it in the background, watch the table fill.

    Pick an option (those of the kind's groups, from the configuration's metadata), type its
    values (see :func:`parse_values`), press *add*; *run* starts the sweep in a thread,
    *stop* ends it after the current run's pools (run again to resume). The table updates
    after every run, with the current run's progress above it; the sweep's plots appear when
    it ends.

    Parameters
    ----------
    base_config : JobConfig
    kind : {"performance", "algorithm"}
    root : str or os.PathLike
    grid : dict or list of dict, optional
        Initial grid (a list of dicts is shown as the options' value lists).
    truth, client, runner
        As for :class:`Sweep`.

    Attributes
    ----------
    sweep : Sweep or None
        The sweep of the last run.
    box : ipywidgets.VBox
        The widget (the object itself displays as it).
    """

    def __init__(self, base_config: JobConfig, *, kind: str = "performance",
                 root: str | os.PathLike = "sweeps/sweep", grid=None, truth=None,
                 client=None, runner=None):
        import ipywidgets as w

        if kind not in KINDS:
            raise ConfigError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.base = base_config
        self.kind = kind
        self.root = Path(root)
        self._kw = {"truth": truth, "client": client, "runner": runner}
        self.sweep: Sweep | None = None
        self._thread: threading.Thread | None = None
        self._grid: dict[str, list] = {}
        self._points: list[dict] | None = None
        groups = _WIDGET_GROUPS[kind]
        options = []
        for f in base_config.option_fields(widget=True):
            if f.name in _NOT_SWEPT or f.metadata.get("group", "algorithm") not in groups:
                continue
            options.append((f"{f.name}  ({f.metadata.get('help', '')})", f.name))
        self.field = w.Dropdown(options=options, description="option",
                                layout=w.Layout(width="420px"))
        self.values = w.Text(placeholder="values: 1, 2, 4   (text: a; b; auto)",
                             layout=w.Layout(width="300px"))
        self.add_button = w.Button(description="add", icon="plus")
        self.clear_button = w.Button(description="clear", icon="trash")
        self.run_button = w.Button(description="run", icon="play", button_style="success")
        self.stop_button = w.Button(description="stop", icon="stop", button_style="danger",
                                    disabled=True)
        self.grid_view = w.HTML()
        self.status = w.HTML("")
        self.table_view = w.HTML()
        self.plots = w.Output()
        self.add_button.on_click(lambda _: self._add_clicked())
        self.clear_button.on_click(lambda _: self.clear())
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.box = w.VBox([
            w.HBox([self.field, self.values, self.add_button, self.clear_button]),
            self.grid_view, w.HBox([self.run_button, self.stop_button]), self.status,
            self.table_view, self.plots])
        if grid is not None:
            if isinstance(grid, Mapping):
                self._grid = {name: [p[name] for p in expand_grid({name: vals})]
                              for name, vals in grid.items()}
            else:
                self._points = expand_grid(grid)
        self._show_grid()

    # ------------------------------------------------------------------ the grid
    @property
    def grid(self) -> dict[str, list] | list[dict]:
        """The grid as defined so far (a list of dicts when one was given as such)."""
        return self._points if self._points is not None else dict(self._grid)

    def add(self, name: str, values: str | Sequence[Any]) -> None:
        """Vary option ``name`` over ``values`` (a list, or text for :func:`parse_values`)."""
        vals = parse_values(self.base, name, values) if isinstance(values, str) else list(values)
        if self._points is not None:  # a list-grid becomes a product from now on
            self._grid = {k: list(dict.fromkeys(p.get(k) for p in self._points))
                          for k in dict.fromkeys(k for p in self._points for k in p)}
            self._points = None
        self._grid[name] = vals
        self._show_grid()

    def clear(self) -> None:
        """Forget the grid."""
        self._grid, self._points = {}, None
        self._show_grid()

    def _add_clicked(self) -> None:
        try:
            self.add(self.field.value, self.values.value)
            self.values.value = ""
        except ConfigError as exc:
            self.status.value = f"<span style='color:#b00'>{_html(str(exc))}</span>"

    def _show_grid(self) -> None:
        if self._points is not None:
            items = [", ".join(f"{k}={v!r}" for k, v in p.items()) for p in self._points]
            n = len(self._points)
        else:
            items = [f"<b>{k}</b>: {', '.join(map(repr, v))}" for k, v in self._grid.items()]
            n = math.prod(len(v) for v in self._grid.values()) if self._grid else 0
        body = "".join(f"<li>{_html(i) if self._points is not None else i}</li>" for i in items)
        self.grid_view.value = (f"<div>{self.kind} sweep, {n} run{'s' if n != 1 else ''}"
                                f"<ul>{body}</ul></div>")

    # ------------------------------------------------------------------ running
    def make_sweep(self) -> Sweep:
        """The :class:`Sweep` of the current grid."""
        return Sweep(self.base, self.grid, kind=self.kind, root=self.root, **self._kw)

    def run(self, wait: bool = False) -> threading.Thread | None:
        """Run the sweep of the current grid in a thread (``wait``: until it ends)."""
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        try:
            self.sweep = self.make_sweep()
        except (ConfigError, TypeError, ValueError) as exc:
            self.status.value = f"<span style='color:#b00'>{_html(str(exc))}</span>"
            return None
        self.run_button.disabled, self.stop_button.disabled = True, False
        self._show_table()
        self._thread = threading.Thread(target=self._work, name="cryonb-sweep", daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()
        return self._thread

    def stop(self) -> None:
        """Stop after the current run's pools."""
        if self.sweep is not None:
            self.sweep.stop()
            self.status.value = "stopping after the current run's pools..."

    def wait(self, timeout: float | None = None) -> None:
        """Block until the sweep's thread ends."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        sweep = self.sweep
        assert sweep is not None
        try:
            sweep.run(progress=self._on_event)
        except Exception as exc:  # shown, never lost in a thread
            self.status.value = (f"<span style='color:#b00'>sweep error: "
                                 f"{_html(f'{type(exc).__name__}: {exc}')}</span>")
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True
            self._show_table()
            self._show_plots()

    def _on_event(self, ev: dict) -> None:
        kind = ev.get("event")
        sweep = self.sweep
        if sweep is None:
            return
        if kind == "run_start":
            done = len(sweep.points) - ev["todo"]
            params = ", ".join(f"{k}={v!r}" for k, v in ev["params"].items())
            self.status.value = f"run {ev['run'] + 1} of {len(sweep.points)} ({done} done): " \
                                f"{_html(params)}"
        elif kind == "iteration":
            self.status.value = (self.status.value.split(" &mdash;")[0]
                                 + f" &mdash; iteration {ev.get('iteration')}")
        elif kind == "run_end":
            self._show_table()
        elif kind == "sweep_end":
            self.status.value = "stopped: run again to resume" if ev["stopped"] else "done"

    def _show_table(self) -> None:
        if self.sweep is None:
            return
        df = self.sweep.table()
        keep = [c for c in df.columns if c not in ("key", "output_dir")
                and not (c.startswith("t_") and c not in ("t_total", "t_estep"))]
        self.table_view.value = df[keep].to_html(index=False, na_rep="",
                                                 float_format=lambda v: f"{v:.3g}")

    def _show_plots(self) -> None:
        sweep = self.sweep
        if sweep is None or not len(sweep.results):
            return
        from IPython.display import display

        self.plots.clear_output()
        with self.plots:
            try:
                if self.kind == "performance":
                    display(sweep.plot_scaling() if "ranks" in sweep._varying(sweep.results)
                            else sweep.plot_throughput())
                else:
                    display(sweep.plot_quality())
            except Exception as exc:
                print(f"no plot: {type(exc).__name__}: {exc}")

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)


def _html(text: str) -> str:
    import html

    return html.escape(text)
