"""The cluster config schema: one table of fields per section.

Each :class:`Field` says what a key expects (in words, for error messages),
gives an example line, converts the received value (raising ``TypeError`` or
``ValueError`` when it does not fit) and names its default.  A field with a
nested ``schema`` is itself a section, validated key by key.

Validation itself (walking the tables, naming the file and the environment
variable a bad value came from) lives in :mod:`chunkglm.cluster.config`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from dask.utils import parse_bytes

__all__ = [
    "ADAPT_SCHEMA",
    "GATEWAY_AUTH_TYPES",
    "GATEWAY_SCHEMA",
    "JOBQUEUE_TYPES",
    "KNOWN_TYPES",
    "KUBERNETES_SCHEMA",
    "LOCAL_SCHEMA",
    "REQUIRED",
    "SCHEMA_VERSION",
    "SECTION_SCHEMAS",
    "STORAGE_BACKENDS",
    "STORAGE_SCHEMA",
    "TOP_SCHEMA",
    "Field",
]

#: Schema version understood by this release.
SCHEMA_VERSION = 1
#: Every backend name the schema knows about.
KNOWN_TYPES = ("local", "slurm", "pbs", "sge", "gateway", "kubernetes")
#: Backends started through dask-jobqueue.
JOBQUEUE_TYPES = ("slurm", "pbs", "sge")
#: ``gateway.auth.type`` values.
GATEWAY_AUTH_TYPES = ("none", "basic", "kerberos", "jupyterhub")
#: ``storage.backend`` values.
STORAGE_BACKENDS = ("auto", "obstore", "fsspec")
#: Kubernetes scheduler Service types.
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
#: Marker for a key without a default.
REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One key of a config section.

    Attributes
    ----------
    expected : str
        What the key accepts, in words ("a positive integer").
    example : str
        A valid YAML line, shown in error messages.
    convert : callable
        Returns the normalised value; raises TypeError or ValueError.
    default : Any
        Value used when the key is absent (:data:`REQUIRED`: none).
    schema : Mapping[str, Field], optional
        For a nested section: the fields of that section.
    """

    expected: str
    example: str
    convert: Callable[[Any], Any]
    default: Any = None
    schema: Mapping[str, "Field"] | None = None


# --------------------------------------------------------------------------
# converters: return the normalised value or raise TypeError/ValueError
# --------------------------------------------------------------------------
def is_int(value: Any) -> bool:
    """Tell whether ``value`` is an integer (and not a bool)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def int_at_least(minimum: int) -> Callable[[Any], int]:
    """Converter accepting integers ``>= minimum``."""

    def convert(value: Any) -> int:
        if not is_int(value):
            raise TypeError
        if value < minimum:
            raise ValueError(f"it must be >= {minimum}")
        return int(value)

    return convert


def optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a converter so that null passes through."""
    return lambda value: None if value is None else convert(value)


def boolean(value: Any) -> bool:
    """Converter accepting true/false only."""
    if not isinstance(value, bool):
        raise TypeError
    return value


def text(value: Any) -> str:
    """Converter accepting a non-empty string."""
    if not isinstance(value, str):
        raise TypeError
    if not value.strip():
        raise ValueError("it must not be empty")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    """Converter accepting one of ``choices``."""

    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError
        if value not in choices:
            raise ValueError(f"choose one of: {', '.join(choices)}")
        return value

    return convert


def string_list(value: Any) -> list[str]:
    """Converter accepting a list of strings."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return list(value)


def mapping(value: Any) -> dict[str, Any]:
    """Converter accepting a mapping (copied into a dict)."""
    if not isinstance(value, Mapping):
        raise TypeError
    return dict(value)


def string_mapping(value: Any) -> dict[str, str]:
    """Converter accepting a mapping of strings to strings (environment)."""
    if not isinstance(value, Mapping):
        raise TypeError
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"the value of {bad[0]!r} is not a string; quote it in the YAML")
    return dict(value)


def memory_bytes(value: Any) -> int:
    """Converter accepting a size ("4GiB", "4 GB") or a number of bytes."""
    if isinstance(value, str):
        nbytes = parse_bytes(value)  # ValueError on an unknown unit
    elif isinstance(value, Real) and not isinstance(value, bool):
        nbytes = int(value)
    else:
        raise TypeError
    if nbytes <= 0:
        raise ValueError("it must be a positive size")
    return int(nbytes)


def memory_text(value: Any) -> str:
    """Converter accepting a size, kept as text for the job scheduler."""
    memory_bytes(value)
    return value if isinstance(value, str) else f"{int(value)}B"


def dashboard(value: Any) -> str:
    """Converter for the local dashboard address (always 127.0.0.1)."""
    if is_int(value):
        host, port = "", str(value)
    elif isinstance(value, str):
        host, _, port = value.strip().rpartition(":")
    else:
        raise TypeError
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("the port must be an integer from 0 to 65535 (0 = any free port)")
    if host not in ("", "127.0.0.1", "localhost"):
        raise ValueError(
            "the local backend listens on 127.0.0.1 only; to see the dashboard "
            "from another machine use an SSH tunnel (ssh -L 8787:127.0.0.1:8787 host)"
        )
    return f"127.0.0.1:{int(port)}"


def directory(value: Any) -> str:
    """Converter accepting a path (``~`` expanded)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError
    return os.path.expanduser(os.fspath(value))


_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def walltime(value: Any) -> str:
    """Converter accepting a job time limit such as "01:30:00" or "1-00:00:00"."""
    if not isinstance(value, str):
        raise TypeError
    if not _WALLTIME.match(value.strip()):
        raise ValueError('write it as "HH:MM:SS" (or "D-HH:MM:SS" for SLURM)')
    return value.strip()


def http_url(value: Any) -> str:
    """Converter accepting an http:// or https:// address."""
    if not isinstance(value, str):
        raise TypeError
    if not value.startswith(("http://", "https://")):
        raise ValueError("it must start with http:// or https://")
    return value.rstrip("/")


def proxy_address(value: Any) -> str | int:
    """Converter accepting a gateway scheduler-proxy address or a port."""
    if is_int(value):
        if not 0 < value <= 65535:
            raise ValueError("a port must be from 1 to 65535")
        return int(value)
    return text(value)


_CLUSTER_NAME = re.compile(r"^(?=.{1,53}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def cluster_name(value: Any) -> str:
    """Converter accepting a Kubernetes DaskCluster name (RFC 1123, <= 53 chars)."""
    if not isinstance(value, str):
        raise TypeError
    if not _CLUSTER_NAME.match(value):
        raise ValueError(
            "use at most 53 lower-case letters, digits and '-', starting and "
            "ending with a letter or digit"
        )
    return value


_QUANTITY = re.compile(r"^([+]?(\d+(\.\d*)?|\.\d+))(([KMGTPE]i)|[mkMGTPE]|([eE][+-]?\d+))?$")


def quantity(value: Any) -> str:
    """Converter accepting a Kubernetes quantity ("500m", "2", "4Gi")."""
    if is_int(value) or (isinstance(value, float) and value > 0):
        return str(value)
    if not isinstance(value, str):
        raise TypeError
    if not _QUANTITY.match(value):
        raise ValueError('use a Kubernetes quantity such as "2", "500m" or "4Gi"')
    return value


def command(value: Any) -> list[str]:
    """Converter accepting a command as a string or a list of strings."""
    if isinstance(value, str):
        parts = value.split()
    else:
        parts = string_list(value)
    if not parts:
        raise ValueError("it must not be empty")
    return parts


def version(value: Any) -> int:
    """Converter for the schema version."""
    if not is_int(value):
        raise TypeError
    if value != SCHEMA_VERSION:
        raise ValueError(f"this release of chunkglm reads version {SCHEMA_VERSION}")
    return int(value)


def type_name(value: Any) -> str:
    """Converter for the backend type."""
    if not isinstance(value, str):
        raise TypeError
    if value not in KNOWN_TYPES:
        raise ValueError(f"available in this release: {', '.join(KNOWN_TYPES)}")
    return value


# --------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------
def _wait_timeout(what: str) -> Field:
    return Field(
        f"a number of seconds to wait for the {what} workers, or null not to wait",
        "wait_timeout: 600",
        optional(int_at_least(1)),
        600,
    )


LOCAL_SCHEMA: dict[str, Field] = {
    "n_workers": Field(
        "a positive integer, or null for one worker per usable core",
        "n_workers: 4",
        optional(int_at_least(1)),
    ),
    "threads_per_worker": Field(
        "a positive integer", "threads_per_worker: 1", int_at_least(1), 1
    ),
    "memory_limit": Field(
        'a memory size per worker such as "4GiB", "4 GB", "4000MB" or an integer '
        "number of bytes, or null for 80% of RAM divided among the workers",
        'memory_limit: "4GiB"',
        optional(memory_bytes),
    ),
    "dashboard_address": Field(
        'an address "127.0.0.1:<port>" (or ":<port>"; port 0 = any free port), '
        "an integer port, or null to disable the dashboard",
        'dashboard_address: "127.0.0.1:8787"',
        optional(dashboard),
        "127.0.0.1:8787",
    ),
    "processes": Field(
        "true (worker processes) or false (threads in this process)",
        "processes: true",
        boolean,
        True,
    ),
    "local_directory": Field(
        "a directory path for worker scratch files, or null for the default",
        'local_directory: "/tmp/chunkglm-dask"',
        optional(directory),
    ),
}

_STRINGS = "a list of strings"

JOBQUEUE_SCHEMA: dict[str, Field] = {
    "cores": Field("a positive integer: cores per job", "cores: 4", int_at_least(1), 4),
    "processes": Field(
        "a positive integer: worker processes per job (at most cores), or null "
        "for one single-threaded worker per core",
        "processes: 4",
        optional(int_at_least(1)),
    ),
    "memory": Field(
        'the memory of one job, such as "16GiB" or "16 GB"',
        'memory: "16GiB"',
        memory_text,
        "16GiB",
    ),
    "walltime": Field(
        'a time limit "HH:MM:SS" ("D-HH:MM:SS" on SLURM)',
        'walltime: "01:00:00"',
        walltime,
        "01:00:00",
    ),
    "queue": Field(
        "a queue (SLURM partition) name, or null for the site default",
        "queue: normal",
        optional(text),
    ),
    "account": Field(
        "an account/project to charge, or null", "account: my-lab", optional(text)
    ),
    "job_extra_directives": Field(
        _STRINGS + " of extra scheduler directives",
        'job_extra_directives: ["--qos=short"]',
        string_list,
        (),
    ),
    "job_script_prologue": Field(
        _STRINGS + " of shell lines run before the worker starts",
        'job_script_prologue: ["module load python"]',
        string_list,
        (),
    ),
    "local_directory": Field(
        "a node-local scratch directory for workers, or null",
        'local_directory: "$TMPDIR"',
        optional(text),
    ),
    "log_directory": Field(
        "a directory for the jobs' stdout/stderr files, or null",
        'log_directory: "~/chunkglm-dask-logs"',
        optional(directory),
    ),
    "interface": Field(
        "a network interface name for the workers and scheduler (e.g. ib0), or null",
        "interface: ib0",
        optional(text),
    ),
    "python": Field(
        "the Python executable on the compute nodes, or null for this one",
        'python: "/opt/venvs/chunkglm/bin/python"',
        optional(text),
    ),
    "worker_extra_args": Field(
        _STRINGS + " of extra `dask worker` arguments",
        'worker_extra_args: ["--lifetime", "55m"]',
        string_list,
        (),
    ),
    "scheduler_options": Field(
        "a mapping of distributed.Scheduler arguments",
        "scheduler_options: {host: 127.0.0.1, dashboard_address: ':8787'}",
        mapping,
        {},
    ),
    "jobs": Field(
        "a non-negative integer: jobs submitted at start when adapt is null",
        "jobs: 2",
        int_at_least(0),
        1,
    ),
    "wait_timeout": _wait_timeout("requested"),
}

RESOURCE_SPEC = Field(
    "a resource request string, or null",
    'resource_spec: "select=1:ncpus=4:mem=16GB"',
    optional(text),
)

_RESOURCE_PAIR: dict[str, Field] = {
    "cpu": Field('a Kubernetes CPU quantity such as "2" or "500m"', 'cpu: "2"', optional(quantity)),
    "memory": Field(
        'a Kubernetes memory quantity such as "4Gi"', 'memory: "4Gi"', optional(quantity)
    ),
}

_RESOURCES: dict[str, Field] = {
    "requests": Field(
        "a mapping {cpu, memory}", 'requests: {cpu: "1", memory: "4Gi"}',
        optional(mapping), None, _RESOURCE_PAIR,
    ),
    "limits": Field(
        "a mapping {cpu, memory}", 'limits: {cpu: "1", memory: "4Gi"}',
        optional(mapping), None, _RESOURCE_PAIR,
    ),
}

GATEWAY_AUTH_SCHEMA: dict[str, Field] = {
    "type": Field(
        f"one of: {', '.join(GATEWAY_AUTH_TYPES)}",
        "type: basic",
        one_of(*GATEWAY_AUTH_TYPES),
        "basic",
    ),
    "username": Field(
        "a user name (basic auth), or null for your login name",
        "username: alice",
        optional(text),
    ),
}

GATEWAY_SCHEMA: dict[str, Field] = {
    "address": Field(
        "the gateway's http(s):// address", 'address: "https://gateway.example.org"',
        http_url, REQUIRED,
    ),
    "proxy_address": Field(
        'the scheduler proxy, "gateway://host:port" or a port, or null for the address',
        'proxy_address: "gateway://gateway.example.org:8786"',
        optional(proxy_address),
    ),
    "public_address": Field(
        "the gateway address as seen from a browser (dashboard links), or null",
        'public_address: "https://gateway.example.org"',
        optional(http_url),
    ),
    "auth": Field(
        "a mapping {type, username}", "auth: {type: basic, username: alice}",
        optional(mapping), {}, GATEWAY_AUTH_SCHEMA,
    ),
    "cluster_options": Field(
        "a mapping of the gateway's cluster options (see gateway.cluster_options())",
        "cluster_options: {worker_cores: 2, worker_memory: 4}",
        mapping,
        {},
    ),
    "workers": Field(
        "a non-negative integer: workers requested when adapt is null",
        "workers: 2",
        int_at_least(0),
        2,
    ),
    "shutdown_on_close": Field(
        "true to stop the gateway cluster when chunkglm exits, false to keep it",
        "shutdown_on_close: true",
        boolean,
        True,
    ),
    "wait_timeout": _wait_timeout("requested"),
}

KUBERNETES_SCHEMA: dict[str, Field] = {
    "name": Field(
        "a DaskCluster name (lower-case letters, digits, '-')", "name: chunkglm",
        cluster_name, "chunkglm",
    ),
    "namespace": Field(
        "a Kubernetes namespace, or null for the current context's",
        "namespace: dask", optional(text),
    ),
    "image": Field(
        "a container image with chunkglm installed, or null for the dask image "
        "matching this dask version",
        'image: "ghcr.io/my-lab/chunkglm:0.1.0"',
        optional(text),
    ),
    "n_workers": Field(
        "a non-negative integer: workers of the default worker group",
        "n_workers: 2", int_at_least(0), 2,
    ),
    "resources": Field(
        "a mapping {requests: {cpu, memory}, limits: {cpu, memory}}, or null",
        'resources: {requests: {cpu: "1", memory: "4Gi"}, limits: {memory: "4Gi"}}',
        optional(mapping), None, _RESOURCES,
    ),
    "env": Field(
        "a mapping of environment variable names to string values",
        'env: {OMP_NUM_THREADS: "1"}', string_mapping, {},
    ),
    "worker_command": Field(
        "the worker command (string or list)", 'worker_command: "dask worker"',
        command, ("dask", "worker"),
    ),
    "scheduler_service_type": Field(
        f"one of: {', '.join(SERVICE_TYPES)}", "scheduler_service_type: ClusterIP",
        one_of(*SERVICE_TYPES), "ClusterIP",
    ),
    "idle_timeout": Field(
        "seconds after which an idle cluster is deleted (0 = never)",
        "idle_timeout: 0", int_at_least(0), 0,
    ),
    "wait_timeout": _wait_timeout("requested"),
}

STORAGE_SCHEMA: dict[str, Field] = {
    "backend": Field(
        f"one of: {', '.join(STORAGE_BACKENDS)}", "backend: auto",
        one_of(*STORAGE_BACKENDS), "auto",
    ),
    "options": Field(
        "a mapping of object-store options (endpoint_url, region, anon, ...)",
        'options: {endpoint_url: "https://s3.example.org", region: eu-west-1}',
        mapping, {},
    ),
    "retries": Field(
        "a non-negative integer: retries of a transient storage error",
        "retries: 5", int_at_least(0), 5,
    ),
}

ADAPT_SCHEMA: dict[str, Field] = {
    "minimum": Field(
        "a non-negative integer number of workers", "minimum: 1", int_at_least(0), 1
    ),
    "maximum": Field(
        "a positive integer number of workers", "maximum: 4", int_at_least(1), REQUIRED
    ),
}

#: Schema of each backend's section.
SECTION_SCHEMAS: dict[str, dict[str, Field]] = {
    "local": LOCAL_SCHEMA,
    "slurm": JOBQUEUE_SCHEMA,
    "pbs": {**JOBQUEUE_SCHEMA, "resource_spec": RESOURCE_SPEC},
    "sge": {**JOBQUEUE_SCHEMA, "resource_spec": RESOURCE_SPEC},
    "gateway": GATEWAY_SCHEMA,
    "kubernetes": KUBERNETES_SCHEMA,
}


def _section_field(name: str) -> Field:
    return Field(
        f"a mapping of {name} options, or null",
        f"{name}: {{...}}",
        optional(mapping),
    )


TOP_SCHEMA: dict[str, Field] = {
    "version": Field(f"the integer {SCHEMA_VERSION}", "version: 1", version, 1),
    "type": Field(f"one of: {', '.join(KNOWN_TYPES)}", "type: local", type_name, "local"),
    **{name: _section_field(name) for name in KNOWN_TYPES},
    "adapt": Field(
        "null or a mapping with keys minimum and maximum",
        "adapt: {minimum: 1, maximum: 4}",
        optional(mapping),
    ),
    "storage": Field(
        "a mapping {backend, options, retries}, or null for the defaults",
        "storage: {backend: auto, options: {}, retries: 5}",
        optional(mapping),
    ),
}
