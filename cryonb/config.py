"""Job configuration objects: one dataclass per job, shared by the CLI, widgets and sweeps.

:class:`JobConfig` holds what every job has (ranks, threads, pool, devices, I/O and combine
modes, cluster); job classes (:class:`cryonb.em.Class2DConfig`, :class:`cryonb.pick.AutopickConfig`)
add their algorithm's options. Every field carries its RELION flag name and help text as
metadata (see :func:`option`), from which the command line parser, the notebook widgets, the
equivalent ``cryonb``/``relion_*`` command lines and the ``_optimiser.star`` round trip are all
generated; nothing is listed twice.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["IO_MODES", "JobConfig", "option"]

IO_MODES = ("parallel", "leader", "preread", "scratch")
COMBINE_MODES = ("network", "disc")
ENGINE_KINDS = ("auto", "inprocess", "local", "mpi", "attach")


def option(default: Any, flag: str | None = None, help: str = "", *, group: str = "algorithm",
           choices: tuple | None = None, relion: bool = True, cli: bool = True,
           widget: bool = True, relion_default: Any = dataclasses.MISSING,
           default_factory=None):
    """A dataclass field with command-line metadata.

    Parameters
    ----------
    default : Any
        Default value (``dataclasses.MISSING`` with ``default_factory``).
    flag : str, optional
        Command-line flag (RELION's name where RELION has the option); default ``--<name>``.
    help : str
        One line for ``--help`` and the widget tooltip.
    group : str
        ``io``, ``algorithm``, ``sampling``, ``parallel``, ``cluster``: sections of ``--help``
        and of the widget panel.
    choices : tuple, optional
        Allowed values.
    relion : bool
        Whether ``relion_refine`` (or the job's RELION program) knows the flag, so that it
        appears in the equivalent RELION command line.
    cli, widget : bool
        Whether the field is exposed on the command line / in widgets.
    relion_default : Any, optional
        The value RELION assumes without the flag: such values are left out of the
        equivalent RELION command line.
    """
    md = {"flag": flag, "help": help, "group": group, "choices": choices, "relion": relion,
          "cli": cli, "widget": widget, "relion_default": relion_default}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass
class JobConfig:
    """Options every job shares: how many ranks, threads and devices, how images are read.

    Attributes
    ----------
    ranks : int
        Number of ranks (``mpirun -n N``). Leader/worker jobs use rank 0 as the leader; with
        ``ranks=1`` the single rank leads and works, in the calling process.
    j : int
        Threads per rank (``--j``).
    pool : int
        Particles (or micrographs) per thread per task (``--pool``); 0 = automatic, chosen from
        the device and its free memory.
    gpu : str or None
        RELION's ``--gpu`` device string; ``None`` = flag not given, ``""`` = automatic.
    cpu : bool
        Force the CPU path (``--cpu``).
    io_mode : str
        ``parallel`` (workers read their own particles; RELION's default), ``leader``
        (``--no_parallel_disc_io``: rank 0 reads and sends), ``preread``
        (``--preread_images``), ``scratch`` (``--scratch_dir``).
    scratch_dir : str
        Local scratch folder for ``io_mode="scratch"``.
    keep_free_scratch : float
        GB to leave free on the scratch disc (RELION's ``--keep_free_scratch``).
    combine : str
        How partial sums are combined: ``network`` (MPI allreduce, or through the cluster)
        or ``disc`` (files in the output directory).
    engines : str
        ``auto`` (in-process for 1 rank, else a local cluster), ``inprocess``, ``local``
        (local ipyparallel engines), ``mpi`` (engines started under mpiexec), ``attach``
        (an existing cluster: ``cluster_id`` / ``profile``).
    """

    PROGRAM: ClassVar[str] = "cryonb"
    RELION_PROGRAM: ClassVar[str] = ""
    #: shared options that a job does not use: left off its command line
    CLI_UNUSED: ClassVar[tuple[str, ...]] = ()

    ranks: int = option(1, "--ranks", "number of ranks (mpirun -n); rank 0 leads", group="parallel",
                        relion=False)
    j: int = option(1, "--j", "threads per rank", group="parallel", relion_default=1)
    pool: int = option(0, "--pool", "particles per thread per task (0 = automatic)",
                       group="parallel")
    gpu: str | None = option(None, "--gpu", "device string: ':' between ranks, ',' between "
                             "threads; empty = automatic", group="parallel")
    cpu: bool = option(False, "--cpu", "use the CPU path even if a GPU is present",
                       group="parallel")
    io_mode: str = option("parallel", "--io_mode", "how particles are read",
                          group="io", choices=IO_MODES, relion=False)
    scratch_dir: str = option("", "--scratch_dir", "copy particles to this local folder first",
                              group="io")
    keep_free_scratch: float = option(10.0, "--keep_free_scratch",
                                      "GB to keep free on the scratch disc", group="io",
                                      relion_default=10.0)
    combine: str = option("network", "--combine", "how partial sums are combined",
                          group="parallel", choices=COMBINE_MODES, relion=False)
    engines: str = option("auto", "--engines", "where ranks run", group="cluster",
                          choices=ENGINE_KINDS, relion=False)
    cluster_id: str = option("", "--cluster_id", "attach to this running ipyparallel cluster",
                             group="cluster", relion=False)
    profile: str = option("", "--profile", "ipyparallel profile of the cluster to attach to",
                          group="cluster", relion=False)
    timeout: float = option(600.0, "--timeout", "seconds without a heartbeat before a rank is "
                            "reported dead", group="cluster", relion=False)

    # ------------------------------------------------------------------ validation
    def validate(self) -> JobConfig:
        """Check option values and combinations; raise :class:`ConfigError` naming the flag."""
        for f in fields(self):
            ch = f.metadata.get("choices")
            if ch and getattr(self, f.name) not in ch:
                raise ConfigError(f"{self.flag(f.name)} {getattr(self, f.name)!r}: choose one of "
                                  f"{', '.join(map(str, ch))}")
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{self.flag(f.name)} nan: give a number")
        if self.ranks < 1:
            raise ConfigError(f"--ranks {self.ranks}: at least 1 rank is needed")
        if self.j < 1:
            raise ConfigError(f"--j {self.j}: at least 1 thread per rank is needed")
        if self.pool < 0:
            raise ConfigError(f"--pool {self.pool}: must be >= 0 (0 = automatic)")
        if self.cpu and self.gpu:
            raise ConfigError("--cpu and --gpu were both given: choose one")
        if self.io_mode == "scratch" and not self.scratch_dir:
            raise ConfigError("--io_mode scratch needs --scratch_dir DIR")
        if self.engines == "attach" and not (self.cluster_id or self.profile):
            raise ConfigError("--engines attach needs --cluster_id or --profile")
        return self

    # ------------------------------------------------------------------ metadata helpers
    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of field ``name``."""
        f = {f.name: f for f in fields(cls)}[name]
        return f.metadata.get("flag") or f"--{name}"

    @classmethod
    def option_fields(cls, *, cli: bool | None = None, widget: bool | None = None):
        """Fields with metadata, optionally only those exposed on the CLI / in widgets."""
        out = []
        for f in fields(cls):
            if cli is not None and (f.metadata.get("cli", True) and
                                    f.name not in cls.CLI_UNUSED) != cli:
                continue
            if widget is not None and f.metadata.get("widget", True) != widget:
                continue
            out.append(f)
        return out

    def replace(self, **changes) -> JobConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        """Field values as a plain dict (JSON-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from :meth:`to_dict` output; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown option(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
        return cls(**d).validate()

    def key(self) -> str:
        """A stable hash of the options that change results or timing (for sweep caches)."""
        import hashlib
        import json

        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
                            ).hexdigest()[:16]

    # ------------------------------------------------------------------ command lines
    def _args(self, *, relion: bool) -> list[str]:
        """Flags of this configuration.

        For cryonb, only options that differ from the defaults (``--no_<name>`` turns a flag
        off). For RELION, every option RELION knows, since its defaults differ from cryonb's.
        """
        default = type(self)()
        out: list[str] = []
        for f in fields(self):
            md = f.metadata
            if not md.get("cli", True) or (relion and not md.get("relion", True)):
                continue
            v = getattr(self, f.name)
            if v is None or (not relion and v == getattr(default, f.name)):
                continue
            if relion and v == md.get("relion_default", dataclasses.MISSING):
                continue
            flag = md.get("flag") or f"--{f.name}"
            if isinstance(v, bool):
                if v:
                    out.append(flag)
                elif not relion:
                    out.append("--no_" + flag[2:])
            elif relion and (v == "" or (v == 0 and f.name == "pool")) and f.name != "gpu":
                continue  # RELION's empty options are left out (``--coord_dir ''``)
            elif relion and f.name == "gpu":
                out += [flag, v] if v else [flag]
            elif isinstance(v, float):  # 153.6, not 153.60000000000002
                out += [flag, repr(float(f"{v:.12g}"))]
            else:
                out += [flag, str(v)]
        return out

    def command_line(self) -> str:
        """The equivalent ``cryonb <job> ...`` command (non-default options only)."""
        return shlex.join([*self.PROGRAM.split(), *self._args(relion=False)])

    def relion_command_line(self) -> str:
        """The equivalent RELION command, ``mpirun -n N relion_xxx_mpi ...``."""
        prog = self.RELION_PROGRAM
        args = self._relion_extra_args() + self._args(relion=True)
        if self.ranks > 1:
            return shlex.join(["mpirun", "-n", str(self.ranks), f"{prog}_mpi", *args])
        return shlex.join([prog, *args])

    def _relion_extra_args(self) -> list[str]:
        out = []
        if self.io_mode == "leader":
            out.append("--no_parallel_disc_io")
        elif self.io_mode == "preread":
            out.append("--preread_images")
        if self.combine == "network" and self.ranks > 1:
            out.append("--dont_combine_weights_via_disc")
        return out
