"""Cluster backends other than ``local``: dask-jobqueue, dask-gateway, Kubernetes.

Each backend is a pair of functions: a pure one that translates a validated
:class:`~chunkglm.cluster.config.ClusterConfig` into the library's arguments
(:func:`jobqueue_kwargs`, :func:`gateway_kwargs`, :func:`kubernetes_spec`;
testable without a scheduler) and a starter that builds the cluster and says
in one line what it started.  A ``diagnose_*`` function describes, for the
error raised when workers do not arrive, where to look (queue state, logs).

The libraries are imported inside the functions, so that chunkglm imports
without them and a missing one is reported with the pip package to install.
"""

from __future__ import annotations

import gc
import importlib
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import dask

from .config import ClusterConfig, ClusterConfigError, ClusterStartError, thaw

__all__ = [
    "GATEWAY_PASSWORD_ENV",
    "JOBQUEUE_DASHBOARD",
    "JUPYTERHUB_TOKEN_ENV",
    "default_kubernetes_image",
    "diagnose",
    "gateway_auth",
    "gateway_kwargs",
    "jobqueue_class",
    "jobqueue_kwargs",
    "kubernetes_spec",
    "release_gateway",
    "start_gateway",
    "start_jobqueue",
    "start_kubernetes",
]

#: Environment variable read for basic-auth gateway passwords (dask-gateway's
#: own configuration key ``gateway.auth.kwargs.password``).
GATEWAY_PASSWORD_ENV = "DASK_GATEWAY__AUTH__KWARGS__PASSWORD"
#: Dashboard of a dask-jobqueue scheduler unless the config or the site's
#: jobqueue.yaml says otherwise: this machine only (reach it through an SSH
#: tunnel), where dask-jobqueue's own default listens on every interface.
JOBQUEUE_DASHBOARD = "127.0.0.1:8787"
#: Environment variable read for JupyterHub API tokens (as dask-gateway does).
JUPYTERHUB_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"

_PIP = {
    "dask_jobqueue": "dask-jobqueue",
    "dask_gateway": "dask-gateway",
    "dask_kubernetes.operator": "dask-kubernetes",
}
_JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}
_QUEUE_STATUS = {"slurm": ["squeue", "-j"], "pbs": ["qstat"], "sge": ["qstat", "-j"]}
_JOINED_IDS = ("slurm", "sge")  # one comma-separated argument; PBS takes one per id


def _require(module: str, config: ClusterConfig) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ClusterConfigError(
            f"Cluster type {config.type!r} (from {config.source}) needs the Python "
            f"package {_PIP[module]!r}, which could not be imported ({exc}). "
            f"Install it with `pip install {_PIP[module]}` or `pip install chunkglm`."
        ) from None


def _given(**values: Any) -> dict[str, Any]:
    """Keep the values that are set, so the library's own config fills the rest."""
    return {k: v for k, v in values.items() if v not in (None, [], {})}


# --------------------------------------------------------------------------
# dask-jobqueue: SLURM, PBS, SGE
# --------------------------------------------------------------------------
def jobqueue_class(config: ClusterConfig) -> type:
    """Return the dask-jobqueue cluster class of a slurm/pbs/sge config.

    Parameters
    ----------
    config : ClusterConfig
        A config of type ``slurm``, ``pbs`` or ``sge``.

    Returns
    -------
    type
        ``SLURMCluster``, ``PBSCluster`` or ``SGECluster``.
    """
    module = _require("dask_jobqueue", config)
    return getattr(module, _JOBQUEUE_CLASSES[config.type])


def jobqueue_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """Translate a slurm/pbs/sge config into dask-jobqueue keyword arguments.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``slurm``, ``pbs`` or ``sge``.

    Returns
    -------
    dict
        Arguments for ``SLURMCluster``/``PBSCluster``/``SGECluster``.  Keys
        left null or empty in the config are omitted, so that a site's
        ``~/.config/dask/jobqueue.yaml`` still applies; ``account`` becomes
        ``project`` for SGE.  ``scheduler_options`` merges the site's with
        the config's, over a dashboard on 127.0.0.1:8787.  ``jobs`` and ``wait_timeout`` are chunkglm's
        and are not included.
    """
    o = thaw(config.options)
    kwargs = dict(cores=o["cores"], processes=o["processes"], memory=o["memory"],
                  walltime=o["walltime"])
    kwargs.update(_given(
        queue=o["queue"],
        job_extra_directives=o["job_extra_directives"],
        job_script_prologue=o["job_script_prologue"],
        local_directory=o["local_directory"],
        log_directory=o["log_directory"],
        interface=o["interface"],
        python=o["python"],
        worker_extra_args=o["worker_extra_args"],
        resource_spec=o.get("resource_spec"),
    ))
    site = dask.config.get(f"jobqueue.{config.type}.scheduler-options", None) or {}
    kwargs["scheduler_options"] = {
        "dashboard_address": JOBQUEUE_DASHBOARD, **site, **o["scheduler_options"]}
    if o["account"] is not None:
        kwargs["project" if config.type == "sge" else "account"] = o["account"]
    return kwargs


def start_jobqueue(config: ClusterConfig) -> tuple[Any, str]:
    """Start a dask-jobqueue cluster and submit its jobs.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``slurm``, ``pbs`` or ``sge``.

    Returns
    -------
    cluster, summary : JobQueueCluster, str
        The cluster (scheduler running in this process, ``jobs`` jobs
        submitted unless ``adapt`` is set) and a one-line description.
    """
    kwargs = jobqueue_kwargs(config)
    cluster = jobqueue_class(config)(**kwargs)
    o = config.options
    try:
        _check_submission(cluster, config)
    except BaseException:
        cluster.close()
        raise
    if config.adapt is None:
        cluster.scale(jobs=o["jobs"])
    jobs = f"{o['jobs']} job(s)" if config.adapt is None else "jobs"
    summary = (
        f"{config.type}, {jobs} of {o['processes']} worker(s), {o['cores']} core(s) and "
        f"{o['memory']} per job, walltime {o['walltime']}"
    )
    return cluster, summary


def _check_submission(cluster: Any, config: ClusterConfig) -> None:
    """Ask SLURM whether it would run the worker job at all (``sbatch
    --test-only``: validated, never queued), so that a request no node can
    satisfy fails now with sbatch's own words, not after ``wait_timeout``.
    PBS and SGE have no such dry run; without ``sbatch`` on PATH the wait for
    workers reports the problem."""
    if config.type != "slurm":
        return
    try:
        result = subprocess.run(["sbatch", "--test-only"], input=cluster.job_script(),
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise ClusterStartError(
            f"SLURM refuses the worker job built from {config.source}: `sbatch --test-only` says: "
            f"{said}\nFix cores/memory/walltime/queue/account/job_extra_directives in the slurm "
            "section (`sinfo -o '%P %c %m %l'` lists what the partitions offer).")


def _queue_state(kind: str, job_ids: list[str]) -> str:
    command = _QUEUE_STATUS[kind] + ([",".join(job_ids)] if kind in _JOINED_IDS else job_ids)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{shlex.join(command)}` could not run ({exc})"
    output = (result.stdout + result.stderr).strip() or "(no output)"
    return f"`{shlex.join(command)}` says:\n{output}"


def _diagnose_jobqueue(cluster: Any, config: ClusterConfig) -> str:
    job_ids = [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]
    logs = config.options["log_directory"]
    where = (
        f"Job logs: {logs}." if logs
        else f"Job logs: the scheduler's default output files in {os.getcwd()} "
        "(set log_directory to collect them)."
    )
    return (
        f"Submitted jobs: {', '.join(job_ids) or 'none'}. "
        f"{_queue_state(config.type, job_ids) if job_ids else ''}\n{where}\n"
        "Check the queue/partition, account, walltime and memory, and that the "
        "compute nodes reach the scheduler (set interface or scheduler_options.host)."
    )


# --------------------------------------------------------------------------
# dask-gateway
# --------------------------------------------------------------------------
def gateway_auth(config: ClusterConfig) -> Any:
    """Build the dask-gateway authenticator; secrets come from the environment.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``gateway``.

    Returns
    -------
    dask_gateway.auth.GatewayAuth
        ``none``: no credentials; ``basic``: user name from the config (or
        the login name) and password from ``$DASK_GATEWAY__AUTH__KWARGS__PASSWORD``
        or dask's ``gateway.auth.kwargs.password`` (empty if neither);
        ``kerberos``: the current Kerberos ticket; ``jupyterhub``: the token
        in ``$JUPYTERHUB_API_TOKEN``.

    Raises
    ------
    ClusterConfigError
        For ``jupyterhub`` without ``$JUPYTERHUB_API_TOKEN``.
    """
    auth = _require("dask_gateway", config).auth
    options = config.options["auth"]
    kind = options["type"]
    if kind == "none":
        return auth.GatewayAuth()
    if kind == "kerberos":
        return auth.KerberosAuth()
    if kind == "jupyterhub":
        token = os.environ.get(JUPYTERHUB_TOKEN_ENV)
        if not token:
            raise ClusterConfigError(
                f"gateway.auth.type is 'jupyterhub' in {config.source} but "
                f"${JUPYTERHUB_TOKEN_ENV} is not set. Set it to your JupyterHub API "
                "token (JupyterHub sets it inside single-user servers)."
            )
        return auth.JupyterHubAuth(api_token=token)
    password = os.environ.get(GATEWAY_PASSWORD_ENV)
    if password is None:
        password = dask.config.get("gateway.auth.kwargs.password", None)
    return auth.BasicAuth(username=options["username"], password=password)


def gateway_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """Translate a gateway config into ``dask_gateway.GatewayCluster`` arguments.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``gateway``.

    Returns
    -------
    dict
        ``address``, ``proxy_address``, ``public_address``,
        ``shutdown_on_close`` and the cluster options as keyword arguments
        (without the authenticator, see :func:`gateway_auth`).
    """
    o = thaw(config.options)
    kwargs = dict(
        address=o["address"],
        proxy_address=o["proxy_address"],
        public_address=o["public_address"],
        shutdown_on_close=o["shutdown_on_close"],
    )
    kwargs.update(o["cluster_options"])
    return kwargs


def start_gateway(config: ClusterConfig) -> tuple[Any, str]:
    """Create a cluster on a dask-gateway server and request its workers.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``gateway``.

    Returns
    -------
    cluster, summary : dask_gateway.GatewayCluster, str

    Raises
    ------
    ClusterStartError
        If the gateway refuses or cannot be reached (the message names the
        address and the gateway's answer).
    """
    gateway = _require("dask_gateway", config)
    auth = gateway_auth(config)
    kwargs = gateway_kwargs(config)
    try:
        cluster = _create_gateway_cluster(gateway.GatewayCluster, auth, kwargs)
    except Exception as exc:  # noqa: BLE001 - aiohttp, HTTP and option errors alike
        raise ClusterStartError(
            f"Could not create a cluster on the dask-gateway at {kwargs['address']} "
            f"(from {config.source}): {type(exc).__name__}: {exc}. Check the address, "
            f"proxy_address, the credentials (${GATEWAY_PASSWORD_ENV} or "
            f"${JUPYTERHUB_TOKEN_ENV}) and cluster_options."
        ) from exc
    if config.adapt is None:
        cluster.scale(config.options["workers"])
    summary = f"dask-gateway {kwargs['address']}, cluster {cluster.name}"
    if config.adapt is None:
        summary += f", {config.options['workers']} workers"
    return cluster, summary


# A request on a pooled keep-alive connection that the gateway closed meanwhile
# (after its 401 answer, which every first request gets) fails inside aiohttp
# before anything is sent: an AssertionError from aiohttp's connection code, or
# a connector error.  Such a start is tried again, twice at most; an answer of
# the gateway (refused credentials, invalid options) is never retried.
_GATEWAY_ATTEMPTS = 3


def _nothing_was_sent(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - dask-gateway depends on aiohttp
        return False
    if isinstance(exc, aiohttp.ClientConnectorError):
        return True
    if type(exc) is AssertionError:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and "aiohttp" in tb.tb_frame.f_code.co_filename
    return False


def _create_gateway_cluster(cls: type, auth: Any, kwargs: dict[str, Any]) -> Any:
    for attempt in range(1, _GATEWAY_ATTEMPTS + 1):
        try:
            return _without_collection_meanwhile(cls, auth, kwargs)
        except Exception as exc:
            _close_failed_gateway_clusters(cls)
            if attempt == _GATEWAY_ATTEMPTS or not _nothing_was_sent(exc):
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _without_collection_meanwhile(cls: type, auth: Any, kwargs: dict[str, Any]) -> Any:
    # A Gateway left in a reference cycle (a failed start's, kept until its exception is dropped)
    # closes itself in __del__, taking distributed's class-wide LoopRunner lock. Collected inside
    # the new Gateway's event-loop thread while this thread holds that lock to start the loop, it
    # deadlocked the start for good (seen once: test_gateway_errors_... hung 600 s). Collect here,
    # in this thread, and not again until the cluster is made.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return cls(auth=auth, **kwargs)
    finally:
        if enabled:
            gc.enable()


def _close_failed_gateway_clusters(cls: type) -> None:
    # A GatewayCluster whose start failed has cleaned up its HTTP session but
    # not stopped its Gateway's event-loop thread; stop it now, not at exit.
    for cluster in list(getattr(cls, "_instances", ())):
        if cluster.status == "closed" and cluster.scheduler_address is None:
            if hasattr(cluster.gateway, "_loop_runner"):
                cluster.gateway.close()
                release_gateway(cluster)


def release_gateway(cluster: Any) -> None:
    """Finish closing a GatewayCluster's HTTP client.

    ``GatewayCluster.close()`` closes its ``Gateway`` client, whose
    ``__del__`` later calls ``close()`` again and fails on the stopped event
    loop ("Exception ignored in Gateway.__del__ ... RuntimeError", printed
    on stderr).  Dropping the stopped loop runner makes that second call a
    no-op (``__del__`` only closes when the attribute exists).

    Parameters
    ----------
    cluster : Any
        A closed cluster; anything but a GatewayCluster is left alone.
    """
    gateway = getattr(cluster, "gateway", None)
    if gateway is not None and getattr(cluster, "status", None) == "closed":
        vars(gateway).pop("_loop_runner", None)


def _diagnose_gateway(cluster: Any, config: ClusterConfig) -> str:
    return (
        f"Gateway cluster {cluster.name} at {config.options['address']}. Check the "
        "gateway's limits and its worker logs (ask its administrator), and "
        "cluster_options (worker_cores, worker_memory)."
    )


# --------------------------------------------------------------------------
# Kubernetes (dask-kubernetes operator)
# --------------------------------------------------------------------------
def default_kubernetes_image() -> str:
    """Return the dask image matching this dask and Python version.

    Returns
    -------
    str
        ``ghcr.io/dask/dask:<dask version>-py<major>.<minor>``.  It does not
        contain chunkglm: for real work build an image that adds it.
    """
    return f"ghcr.io/dask/dask:{dask.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}"


def _resources(options: Any) -> dict[str, dict[str, str]] | None:
    if not options:
        return None
    out = {
        part: {k: v for k, v in (options[part] or {}).items() if v is not None}
        for part in ("requests", "limits")
    }
    return {part: values for part, values in out.items() if values} or None


def _set_container_options(container: dict, resources: Any, env: dict[str, str]) -> None:
    for key in ("env", "resources"):
        container.pop(key, None)  # make_cluster_spec sets them to null when unset
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if resources:
        container["resources"] = resources


def kubernetes_spec(config: ClusterConfig) -> dict[str, Any]:
    """Build the ``DaskCluster`` resource for the dask-kubernetes operator.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``kubernetes``.

    Returns
    -------
    dict
        The manifest from ``dask_kubernetes.operator.make_cluster_spec``, with
        resources and environment set on the scheduler and worker containers
        (null fields removed), the scheduler started with ``dask scheduler``
        (this distributed has no ``dask-scheduler`` script) and the namespace
        in ``metadata`` when the config names one.
    """
    operator = _require("dask_kubernetes.operator", config)
    o = thaw(config.options)
    spec = operator.make_cluster_spec(
        name=o["name"],
        image=o["image"] or default_kubernetes_image(),
        n_workers=o["n_workers"],
        worker_command=o["worker_command"],
        scheduler_service_type=o["scheduler_service_type"],
        idle_timeout=o["idle_timeout"],
    )
    resources = _resources(o["resources"])
    for part in ("scheduler", "worker"):
        for container in spec["spec"][part]["spec"]["containers"]:
            _set_container_options(container, resources, o["env"])
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    if scheduler["args"][:1] == ["dask-scheduler"]:
        scheduler["args"] = ["dask", "scheduler", *scheduler["args"][1:]]
    if o["namespace"]:
        spec["metadata"]["namespace"] = o["namespace"]
    return spec


def start_kubernetes(config: ClusterConfig) -> tuple[Any, str]:
    """Create a ``DaskCluster`` through the dask-kubernetes operator.

    Parameters
    ----------
    config : ClusterConfig
        A validated config of type ``kubernetes``.

    Returns
    -------
    cluster, summary : dask_kubernetes.operator.KubeCluster, str

    Raises
    ------
    ClusterStartError
        If the cluster cannot be created (no Kubernetes access, operator
        not installed, ...).
    """
    operator = _require("dask_kubernetes.operator", config)
    spec = kubernetes_spec(config)
    o = config.options
    try:
        cluster = operator.KubeCluster(
            custom_cluster_spec=spec, namespace=o["namespace"], shutdown_on_close=True,
            quiet=True,
        )
    except Exception as exc:  # noqa: BLE001 - kr8s/kubernetes raise many kinds
        _forget_failed_kubeclusters(operator.KubeCluster, o["name"])
        raise ClusterStartError(
            f"Could not create the DaskCluster {o['name']!r} (from {config.source}): "
            f"{type(exc).__name__}: {exc}. Check `kubectl get pods` works (KUBECONFIG "
            "or an in-cluster service account) and that the dask-kubernetes operator "
            "is installed (helm install dask-operator dask/dask-kubernetes-operator)."
        ) from exc
    image = spec["spec"]["worker"]["spec"]["containers"][0]["image"]
    return cluster, f"kubernetes {o['name']}, {o['n_workers']} workers, image {image}"


def _forget_failed_kubeclusters(cls: type, name: str) -> None:
    # A KubeCluster that failed in __init__ stays registered for dask-kubernetes'
    # atexit reaper, which then fails again (with a traceback) on the same
    # missing credentials; nothing was created, so there is nothing to reap.
    instances = getattr(cls, "_instances", None)
    for cluster in list(instances or ()):
        if getattr(cluster, "name", None) == name and not getattr(cluster, "scheduler_comm", None):
            instances.discard(cluster)


def _diagnose_kubernetes(cluster: Any, config: ClusterConfig) -> str:
    name = config.options["name"]
    return (
        f"DaskCluster {name}: see `kubectl get pods -l dask.org/cluster-name={name}` "
        f"and `kubectl describe daskcluster {name}` (image pull, resource quota, "
        "pending pods)."
    )


def diagnose(cluster: Any, config: ClusterConfig) -> str:
    """Say where to look when a cluster's workers did not arrive.

    Parameters
    ----------
    cluster : Any
        The started cluster.
    config : ClusterConfig
        Its config.

    Returns
    -------
    str
        Backend-specific hints: queue state and job logs (jobqueue), gateway
        cluster name, kubectl commands, or an empty string for ``local``.
    """
    if config.type in _JOBQUEUE_CLASSES:
        return _diagnose_jobqueue(cluster, config)
    if config.type == "gateway":
        return _diagnose_gateway(cluster, config)
    if config.type == "kubernetes":
        return _diagnose_kubernetes(cluster, config)
    return ""
