"""ipyparallel clusters as ranks: start local engines (optionally under MPI) or attach.

``ClusterHandle`` is a context manager around an ``ipyparallel.Client`` that remembers whether
it started the engines (then leaving the block stops them). Engines under MPI are started with
``mpiexec`` by ipyparallel's own MPI launcher; for several machines start a cluster with
ipyparallel's MPI, Slurm, PBS or SSH launchers (``ipcluster start --engines=slurm ...``) and
attach to it with :func:`connect_cluster` (``--engines attach --cluster_id ... --profile ...``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from ..errors import ConfigError, ResourceError

__all__ = ["ClusterHandle", "connect_cluster", "start_cluster"]


class ClusterHandle:
    """A connected ipyparallel client and, when this process started them, the engines.

    Attributes
    ----------
    client : ipyparallel.Client
    cluster : ipyparallel.Cluster or None
        Set when the engines were started here (stopped by :meth:`stop`).
    """

    def __init__(self, client, cluster=None):
        self.client = client
        self.cluster = cluster

    @property
    def owned(self) -> bool:
        """Whether :meth:`stop` stops the engines."""
        return self.cluster is not None

    @property
    def engine_ids(self) -> list[int]:
        """The connected engines."""
        return sorted(self.client.ids)

    def stop(self) -> None:
        """Close the client; stop the engines if they were started here."""
        try:
            self.client.close()
        except Exception:
            pass
        if self.cluster is not None:
            try:
                self.cluster.stop_cluster_sync()
            except Exception:
                pass
            self.cluster = None

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _mpi_launcher_args() -> list[str]:
    """``mpiexec`` options: ``--oversubscribe`` for Open MPI (more ranks than cores)."""
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise ResourceError("--engines mpi needs mpiexec (Debian: apt-get install openmpi-bin "
                            "libopenmpi-dev) and mpi4py (pip install mpi4py)")
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        return ["--oversubscribe"]
    return []


def start_cluster(n: int, engines: str = "local", *, timeout: float = 120.0) -> ClusterHandle:
    """Start ``n`` local ipyparallel engines and connect to them.

    Parameters
    ----------
    n : int
    engines : {"local", "mpi"}
        ``"mpi"``: the engines are one ``mpiexec -n N`` job (engine id = MPI rank, mpi4py's
        ``COMM_WORLD`` spans them); as root Open MPI is allowed to run and to oversubscribe.
    timeout : float
        Seconds to wait for the engines to register.

    Raises
    ------
    ResourceError
        mpiexec or mpi4py missing, or the engines did not come up in time.
    """
    import importlib.util

    import ipyparallel as ipp

    kw = {}
    if engines == "mpi":
        args = _mpi_launcher_args()
        if importlib.util.find_spec("mpi4py") is None:
            raise ResourceError("--engines mpi needs mpi4py (pip install mpi4py)")
        kw["engines"] = "mpi"
    elif engines != "local":
        raise ConfigError(f"cannot start engines of kind {engines!r}: use 'local' or 'mpi', "
                          "or attach to a running cluster")
    cluster = ipp.Cluster(n=n, log_level=logging.WARNING, **kw)
    if engines == "mpi" and args:
        cluster.config.MPILauncher.mpi_args = args
    try:
        client = cluster.start_and_connect_sync(activate=False)
        client.wait_for_engines(n, timeout=timeout)
    except Exception as exc:
        try:
            cluster.stop_cluster_sync()
        except Exception:
            pass
        raise ResourceError(f"starting {n} {engines} engines failed: {type(exc).__name__}: "
                            f"{exc}") from None
    return ClusterHandle(client, cluster)


def connect_cluster(cluster_id: str = "", profile: str = "", *, n: int | None = None,
                    timeout: float = 60.0) -> ClusterHandle:
    """Attach to a running cluster (its engines are left running afterwards).

    Parameters
    ----------
    cluster_id, profile : str
        As given to ``ipcluster start`` (empty: the default).
    n : int, optional
        Wait until at least this many engines are registered.

    Raises
    ------
    ResourceError
        No such cluster, or too few engines in time.
    """
    import ipyparallel as ipp

    try:
        client = ipp.Client(profile=profile or "default", cluster_id=cluster_id or "",
                            timeout=timeout)
    except Exception as exc:
        raise ResourceError(f"cannot attach to the ipyparallel cluster (profile "
                            f"{profile or 'default'!r}, cluster id {cluster_id!r}): "
                            f"{type(exc).__name__}: {exc}") from None
    if n:
        try:
            client.wait_for_engines(n, timeout=timeout)
        except Exception:
            have = len(client.ids)
            client.close()
            raise ResourceError(f"the cluster has {have} engines, {n} are needed") from None
    return ClusterHandle(client)
