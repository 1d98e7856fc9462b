"""Build a dask.distributed cluster and Client from a :class:`ClusterConfig`.

Backends: ``local`` (:class:`distributed.LocalCluster`; scheduler, workers and
dashboard on 127.0.0.1 only), ``slurm``/``pbs``/``sge`` (dask-jobqueue),
``gateway`` (dask-gateway) and ``kubernetes`` (the dask-kubernetes operator),
see :mod:`chunkglm.cluster.backends`.  The returned :class:`ClusterClient`
owns its cluster: closing the client (or leaving ``with start() as client:``)
also shuts the cluster down (cancels the batch jobs, stops the gateway or
Kubernetes cluster unless ``shutdown_on_close: false``).

Scripts that start worker processes must guard their entry point with
``if __name__ == "__main__":`` because workers are spawned, not forked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import dask
import psutil
from dask.utils import format_bytes
from distributed import Client, LocalCluster
from distributed.core import Status
from distributed.system import MEMORY_LIMIT

from . import backends
from .main_guard import REIMPORTING_METHODS, unguarded_call_site
from .config import (
    AVAILABLE_TYPES,
    JOBQUEUE_TYPES,
    ClusterConfig,
    ClusterConfigError,
    ClusterStartError,
    ConfigLike,
    load_config,
)

__all__ = [
    "ClusterClient",
    "MEMORY_FRACTION",
    "default_memory_limit",
    "default_n_workers",
    "expected_workers",
    "local_cluster_kwargs",
    "start",
    "total_memory",
    "usable_cores",
]

#: Fraction of the machine's memory shared among the workers by default.
MEMORY_FRACTION = 0.8
#: Interface every local listener binds to.
LOCALHOST = "127.0.0.1"


class ClusterClient(Client):
    """A :class:`distributed.Client` that closes its cluster when closed.

    ``Client(cluster)`` normally leaves the cluster running after
    ``client.close()``; this subclass shuts it down too, so that a single
    ``close()`` (or the end of a ``with`` block) releases the scheduler and
    every worker process.
    """

    def close(self, *args: Any, **kwargs: Any) -> Any:
        """Close the client, then the cluster it was started with.

        Parameters
        ----------
        *args, **kwargs
            Passed to :meth:`distributed.Client.close` (e.g. ``timeout``).
        """
        cluster = self.cluster
        try:
            return super().close(*args, **kwargs)
        finally:
            if cluster is not None and not _is_closed(cluster):
                if not sys.is_finalizing():  # at exit the cluster closes itself
                    _close_cluster(cluster)


def _close_cluster(cluster: Any) -> None:
    # SpecCluster (dask-jobqueue) asserts on close that every worker object it
    # created has stopped.  A job whose submission failed (sbatch missing or
    # refusing) stays "created" and would make close() fail half-way, leaving
    # the cluster's event-loop thread running; such a job has failed.  A
    # submitted job is closed by scancel/qdel, but dask-jobqueue's Job.close()
    # never moves its status off "running" (seen with a job still pending when
    # the client closed), which trips the same assertion: mark it closing, the
    # cluster still cancels it.
    for worker in list(getattr(cluster, "_created", ())):
        status = getattr(worker, "status", None)
        if status == Status.created:
            worker.status = Status.failed
        elif status == Status.running and getattr(worker, "job_id", None):
            worker.status = Status.closing
    cluster.close()
    backends.release_gateway(cluster)


def _is_closed(cluster: Any) -> bool:
    # distributed clusters use the Status enum, dask-gateway's a plain string
    status = getattr(cluster, "status", None)
    return status == Status.closed or status == "closed"


# --------------------------------------------------------------------------
# default sizing (pure functions)
# --------------------------------------------------------------------------
def usable_cores() -> int:
    """Return the number of CPU cores this process may run on.

    Returns
    -------
    int
        ``len(os.sched_getaffinity(0))`` (honours taskset, cgroups cpusets and
        SLURM allocations), or ``os.cpu_count()`` where affinity is unknown.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def total_memory() -> int:
    """Return the memory available to this process, in bytes.

    Returns
    -------
    int
        ``psutil.virtual_memory().total``, capped by a cgroup or rlimit memory
        limit when one is set (as detected by ``distributed.system``).
    """
    return int(min(psutil.virtual_memory().total, MEMORY_LIMIT))


def default_n_workers(cores: int, threads_per_worker: int = 1) -> int:
    """Return the default number of local workers.

    Parameters
    ----------
    cores : int
        Usable cores, see :func:`usable_cores`.
    threads_per_worker : int, default 1
        Threads of each worker.

    Returns
    -------
    int
        ``cores // threads_per_worker``, at least 1: one single-threaded
        worker per core by default.
    """
    return max(1, cores // threads_per_worker)


def default_memory_limit(
    total_bytes: int, n_workers: int, fraction: float = MEMORY_FRACTION
) -> int:
    """Return the default memory limit of one worker.

    Parameters
    ----------
    total_bytes : int
        Memory of the machine, see :func:`total_memory`.
    n_workers : int
        Number of workers sharing it (the adaptive maximum when larger).
    fraction : float, default 0.8
        Share of ``total_bytes`` given to all workers together.

    Returns
    -------
    int
        ``fraction * total_bytes / n_workers`` in bytes.
    """
    return int(total_bytes * fraction) // max(1, n_workers)


def local_cluster_kwargs(
    config: ClusterConfig, *, cores: int | None = None, memory: int | None = None
) -> dict[str, Any]:
    """Translate a validated ``local`` config into LocalCluster arguments.

    Parameters
    ----------
    config : ClusterConfig
        A config of type ``local``.
    cores, memory : int, optional
        Usable cores and total memory in bytes; measured when omitted.

    Returns
    -------
    dict
        Keyword arguments for :class:`distributed.LocalCluster`, with
        ``n_workers`` and ``memory_limit`` filled in when the config leaves
        them null.  With worker processes ``host`` is fixed to 127.0.0.1;
        with ``processes: false`` the scheduler and workers communicate
        in-process and open no TCP listener (the dashboard, if enabled,
        still binds to 127.0.0.1).
    """
    opts = config.options
    threads = opts["threads_per_worker"]
    n_workers = opts["n_workers"] or default_n_workers(cores or usable_cores(), threads)
    sharing = max(n_workers, config.adapt[1]) if config.adapt else n_workers
    memory_limit = opts["memory_limit"] or default_memory_limit(
        memory or total_memory(), sharing
    )
    kwargs = dict(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=opts["processes"],
        memory_limit=memory_limit,
        dashboard_address=opts["dashboard_address"],
        worker_dashboard_address=None,
    )
    if opts["processes"]:  # threads talk in-process (inproc://), no socket at all
        kwargs["host"] = LOCALHOST
    if opts["local_directory"]:
        kwargs["local_directory"] = opts["local_directory"]
    return kwargs


# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------
def _start_local(config: ClusterConfig) -> tuple[LocalCluster, str]:
    kwargs = local_cluster_kwargs(config)
    summary = (
        f"local, {kwargs['n_workers']} worker "
        f"{'processes' if kwargs['processes'] else 'threads'} x "
        f"{kwargs['threads_per_worker']} thread(s), "
        f"{format_bytes(kwargs['memory_limit'])} per worker"
    )
    return LocalCluster(**kwargs), summary


_BACKENDS: dict[str, Callable[[ClusterConfig], tuple[Any, str]]] = {
    "local": _start_local,
    **{kind: backends.start_jobqueue for kind in JOBQUEUE_TYPES},
    "gateway": backends.start_gateway,
    "kubernetes": backends.start_kubernetes,
}


def _backend(config: ClusterConfig) -> Callable[[ClusterConfig], tuple[Any, str]]:
    if config.type in _BACKENDS:
        return _BACKENDS[config.type]
    raise ClusterConfigError(
        f"Cluster type {config.type!r} (from {config.source}) is not available; "
        f"available: {', '.join(AVAILABLE_TYPES)}. Set `type:` to one of them."
    )


def expected_workers(config: ClusterConfig) -> int:
    """Return how many workers :func:`start` waits for.

    Parameters
    ----------
    config : ClusterConfig
        A validated config.

    Returns
    -------
    int
        0 for ``local`` (LocalCluster starts its workers before returning);
        with ``adapt`` its minimum; otherwise the requested workers: ``jobs *
        processes`` (jobqueue), ``workers`` (gateway), ``n_workers``
        (kubernetes).
    """
    options = config.options
    if config.type == "local":
        return 0
    if config.adapt is not None:
        return config.adapt[0]
    if config.type in JOBQUEUE_TYPES:
        return options["jobs"] * options["processes"]
    return options["workers"] if config.type == "gateway" else options["n_workers"]


def _wait_for_workers(client: Client, config: ClusterConfig) -> None:
    n_workers = expected_workers(config)
    timeout = config.options.get("wait_timeout")
    if not n_workers or timeout is None:
        return
    try:
        client.wait_for_workers(n_workers, timeout=timeout)
    except TimeoutError:
        arrived = len(client.scheduler_info(n_workers=-1)["workers"])
        hints = backends.diagnose(client.cluster, config)
        raise ClusterStartError(
            f"Only {arrived} of {n_workers} {config.type} worker(s) joined the scheduler "
            f"{client.scheduler.address} within wait_timeout={timeout} s (from "
            f"{config.source}). {hints}\nRaise {config.type}.wait_timeout if the queue "
            "is just slow, or set it to null not to wait."
        ) from None


def _apply_adapt(cluster: Any, config: ClusterConfig) -> None:
    if config.adapt is None:
        return
    if not callable(getattr(cluster, "adapt", None)):
        raise ClusterConfigError(
            f"'adapt' is set in {config.source} but the {config.type!r} backend "
            f"({type(cluster).__name__}) cannot scale adaptively. Set `adapt: null`."
        )
    minimum, maximum = config.adapt
    cluster.adapt(minimum=minimum, maximum=maximum)


def _announce(client: Client, summary: str, stream: TextIO | None = None) -> None:
    stream = sys.stderr if stream is None else stream
    cluster = client.cluster
    link = cluster.dashboard_link if cluster is not None else ""
    print(f"Scheduler: {client.scheduler.address} ({summary})", file=stream, flush=True)
    print(f"Dashboard: {link or 'disabled (dashboard_address: null)'}", file=stream, flush=True)


def _check_main_guard(config: ClusterConfig) -> None:
    """Refuse at once a local cluster of worker processes started from a script's top level
    without ``if __name__ == "__main__":`` (its workers would import the script again and die;
    see :mod:`chunkglm.cluster.main_guard`)."""
    if config.type != "local" or not config.options["processes"]:
        return
    if dask.config.get("distributed.worker.multiprocessing-method") not in REIMPORTING_METHODS:
        return
    site = unguarded_call_site(sys._getframe(2))
    if site is None:
        return
    script, line = site
    raise ClusterStartError(
        f"a local cluster is started at the top level of {script} (line {line}) without "
        "`if __name__ == \"__main__\":`. Its worker processes import that script again, so each would "
        "start another cluster and die (multiprocessing's 'bootstrapping phase' error) while this "
        "process waited for them. Put the code that starts the cluster under "
        "`if __name__ == \"__main__\":` (or in a function called from there), or use threads "
        "(processes: false in the config, CHUNKGLM_CLUSTER__LOCAL__PROCESSES=false).")


def start(config: ConfigLike = None, *, verbose: bool = True, **overrides: Any) -> Client:
    """Start a dask cluster described by a config and connect a Client to it.

    Parameters
    ----------
    config : None, str, os.PathLike or Mapping, optional
        None for the bundled ``local`` config; a config name (looked up as a
        path, in ``$CHUNKGLM_CLUSTER_CONFIGS``, ``./cluster_configs`` and the
        bundled configs); a path to a YAML file; or a dict of the same shape.
    verbose : bool, default True
        Print the scheduler address and the dashboard link to stderr.
    **overrides
        Keys of the backend's section, e.g. ``n_workers=2`` or
        ``dashboard_address=":0"``; they win over the file and the
        ``CHUNKGLM_CLUSTER__*`` environment variables.

    Returns
    -------
    distributed.Client
        A :class:`ClusterClient`, set as the default dask scheduler; closing
        it (or leaving ``with start() as client:``) shuts the cluster down.

    Raises
    ------
    ClusterConfigError
        If the config is invalid or its backend's library is not installed.
    ClusterStartError
        If the cluster cannot be created, or fewer than the requested
        workers (see :func:`expected_workers`) join within the section's
        ``wait_timeout``; the message says where to look (queue state, job
        logs).  The cluster is shut down first.

    Examples
    --------
    >>> with start(n_workers=2, dashboard_address=":0") as client:  # doctest: +SKIP
    ...     total = dask.array.ones(1000, chunks=100).sum().compute()
    """
    config_ = load_config(config, overrides=overrides)
    _check_main_guard(config_)
    cluster, summary = _backend(config_)(config_)
    try:
        _apply_adapt(cluster, config_)
        client = ClusterClient(cluster)
    except BaseException:
        cluster.close()
        raise
    if verbose:
        if config_.adapt:
            summary += ", adaptive {}-{} workers".format(*config_.adapt)
        _announce(client, summary)
    try:
        _wait_for_workers(client, config_)
    except BaseException:
        client.close()
        raise
    return client
