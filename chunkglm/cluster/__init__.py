"""Start a dask.distributed cluster and Client from a validated YAML config.

Examples
--------
>>> from chunkglm.cluster import start
>>> with start() as client:  # doctest: +SKIP
...     ...  # every dask computation in this block runs on the local cluster

See the commented configs in ``chunkglm/cluster/configs/`` (``local.yaml``,
``slurm.yaml``, ``pbs.yaml``, ``sge.yaml``, ``gateway.yaml``,
``kubernetes.yaml``) for the config format.
"""

from .backends import (
    default_kubernetes_image,
    gateway_kwargs,
    jobqueue_class,
    jobqueue_kwargs,
    kubernetes_spec,
)
from .config import (
    AVAILABLE_TYPES,
    KNOWN_TYPES,
    ClusterConfig,
    ClusterConfigError,
    ClusterStartError,
    available_configs,
    load_config,
    redact,
    resolve_config_path,
)
from .start import (
    ClusterClient,
    default_memory_limit,
    default_n_workers,
    expected_workers,
    local_cluster_kwargs,
    start,
    total_memory,
    usable_cores,
)

__all__ = [
    "AVAILABLE_TYPES",
    "KNOWN_TYPES",
    "ClusterClient",
    "ClusterConfig",
    "ClusterConfigError",
    "ClusterStartError",
    "available_configs",
    "default_kubernetes_image",
    "default_memory_limit",
    "default_n_workers",
    "expected_workers",
    "gateway_kwargs",
    "jobqueue_class",
    "jobqueue_kwargs",
    "kubernetes_spec",
    "load_config",
    "local_cluster_kwargs",
    "redact",
    "resolve_config_path",
    "start",
    "total_memory",
    "usable_cores",
]
