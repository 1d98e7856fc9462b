"""Start a dask.distributed cluster and Client from a validated YAML config.

Examples
--------
>>> from chunkglm.cluster import start
>>> with start() as client:  # doctest: +SKIP
...     ...  # every dask computation in this block runs on the local cluster

See ``chunkglm/cluster/configs/local.yaml`` for the config format.
"""

from .config import (
    AVAILABLE_TYPES,
    KNOWN_TYPES,
    ClusterConfig,
    ClusterConfigError,
    available_configs,
    load_config,
    redact,
    resolve_config_path,
)
from .start import (
    ClusterClient,
    default_memory_limit,
    default_n_workers,
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
    "available_configs",
    "default_memory_limit",
    "default_n_workers",
    "load_config",
    "local_cluster_kwargs",
    "redact",
    "resolve_config_path",
    "start",
    "total_memory",
    "usable_cores",
]
