"""Cluster configuration: schema, loading, environment overrides, validation.

A cluster config is a small YAML document (or an equivalent dict)::

    version: 1
    type: local            # local | slurm | pbs | sge | gateway | kubernetes
    local:
      n_workers: null      # null = one per usable core
      threads_per_worker: 1
      memory_limit: null   # per worker, e.g. "4GiB"; null = 80% of RAM / n_workers
      dashboard_address: "127.0.0.1:8787"
      processes: true
      local_directory: null
    adapt: null            # or {minimum: 1, maximum: 4}

Every key is checked on load: unknown keys and values of the wrong type raise
:class:`ClusterConfigError` with a message naming the key, the file, what was
received and what is expected.  Environment variables named
``CHUNKGLM_CLUSTER__<SECTION>__<KEY>`` override the file (double underscores
separate levels, values are parsed with :func:`yaml.safe_load`).

Every backend (local, slurm, pbs, sge, gateway, kubernetes) has a validated
section, described field by field in :mod:`chunkglm.cluster.schema`; a
top-level ``storage`` section configures object storage.  Secrets (gateway
passwords, tokens, S3 keys) are never read from config files: a secret-looking
key is an error that says where the secret belongs instead.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import yaml
from dask.utils import parse_bytes

from chunkglm.chunking import MemoryBudget
from chunkglm.errors import ChunkglmError

from .schema import (
    ADAPT_SCHEMA,
    JOBQUEUE_TYPES,
    KNOWN_TYPES,
    REQUIRED,
    SCHEMA_VERSION,
    SECTION_SCHEMAS,
    STORAGE_SCHEMA,
    TOP_SCHEMA,
    Field,
)

__all__ = [
    "AVAILABLE_TYPES",
    "ClusterConfig",
    "ClusterConfigError",
    "ClusterStartError",
    "CONFIG_DIRS_ENV",
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "KNOWN_TYPES",
    "SCHEMA_VERSION",
    "available_configs",
    "bundled_config_dir",
    "chunk_budget",
    "freeze",
    "is_secret_key",
    "load_config",
    "redact",
    "resolve_config_path",
    "thaw",
    "worker_memory",
]

#: Backends that :func:`chunkglm.cluster.start` can build (each needs its
#: library: dask-jobqueue, dask-gateway or dask-kubernetes).
AVAILABLE_TYPES = KNOWN_TYPES
#: Name of the bundled config used when ``config`` is None.
DEFAULT_CONFIG = "local"
#: Prefix of environment variables that override config values.
ENV_PREFIX = "CHUNKGLM_CLUSTER__"
#: Environment variable naming extra directories of ``<name>.yaml`` configs.
CONFIG_DIRS_ENV = "CHUNKGLM_CLUSTER_CONFIGS"
#: Key-name fragments whose values are never shown.
SECRET_MARKERS = ("password", "secret", "token", "key")
REDACTED = "***"

ConfigLike = Union[None, str, os.PathLike, Mapping[str, Any]]


class ClusterConfigError(ChunkglmError, ValueError):
    """A cluster config could not be found, parsed, validated or started."""


class ClusterStartError(ClusterConfigError):
    """A valid config's cluster could not start, or its workers did not arrive."""


# --------------------------------------------------------------------------
# redaction
# --------------------------------------------------------------------------
def is_secret_key(name: Any) -> bool:
    """Tell whether a key's value must never be printed.

    Parameters
    ----------
    name : Any
        Key name; compared case-insensitively.

    Returns
    -------
    bool
        True if the name contains "password", "secret", "token" or "key".
    """
    lowered = str(name).lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def redact(value: Any) -> Any:
    """Return a copy of ``value`` with the values of secret keys replaced.

    Parameters
    ----------
    value : Any
        A mapping, list or scalar, possibly nested.

    Returns
    -------
    Any
        The same structure (mappings become dicts) with the value of every
        key for which :func:`is_secret_key` is true replaced by ``"***"``.
    """
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_key(k) and v is not None else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


# --------------------------------------------------------------------------
# the validated result
# --------------------------------------------------------------------------
def freeze(value: Any) -> Any:
    """Return a read-only copy: mappings become MappingProxyType, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Return a plain, mutable copy of a :func:`freeze`-d value (dicts, lists)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def _default_storage() -> Mapping[str, Any]:
    return freeze({key: spec.default for key, spec in STORAGE_SCHEMA.items()})


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster configuration.

    Attributes
    ----------
    type : str
        Backend name, one of :data:`KNOWN_TYPES`.
    options : Mapping[str, Any]
        Read-only mapping of the backend's section, every key of its schema
        present with defaults filled in (nested mappings read-only too, lists
        as tuples).  For ``local``, ``memory_limit`` is converted to bytes and
        ``dashboard_address`` normalised to ``"127.0.0.1:<port>"`` (or None
        when the dashboard is disabled).  For the dask-jobqueue backends a
        null ``processes`` is replaced by ``cores``.
    adapt : tuple of (int, int) or None
        ``(minimum, maximum)`` number of workers for adaptive scaling.
    source : str
        Path of the YAML file the config was read from, or ``"<dict>"``.
    storage : Mapping[str, Any]
        Read-only object-storage settings: ``backend`` (auto, obstore or
        fsspec), ``options`` (a mapping, never credentials) and ``retries``.
    """

    type: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    adapt: tuple[int, int] | None = None
    source: str = "<dict>"
    storage: Mapping[str, Any] = field(default_factory=_default_storage)

    def __repr__(self) -> str:
        return (
            f"ClusterConfig(type={self.type!r}, options={redact(thaw(self.options))!r}, "
            f"adapt={self.adapt!r}, source={self.source!r}, "
            f"storage={redact(thaw(self.storage))!r})"
        )


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Context:
    """Where values came from, to name it in error messages."""

    source: str
    origins: Mapping[tuple[str, ...], str] = field(default_factory=dict)

    def where(self, path: tuple[str, ...]) -> str:
        related = [
            origin
            for key, origin in self.origins.items()
            if key[: len(path)] == path or path[: len(key)] == key
        ]
        if not related:
            return self.source
        return f"{self.source} (overridden by {', '.join(sorted(set(related)))})"


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(str(p) for p in path)


#: Where each section's secrets belong instead of the config file.
_SECRET_HINTS = {
    "gateway": (
        "Give the gateway password in the environment variable "
        "DASK_GATEWAY__AUTH__KWARGS__PASSWORD (basic auth) or the JupyterHub token "
        "in JUPYTERHUB_API_TOKEN (jupyterhub auth); Kerberos uses your kinit ticket."
    ),
    "storage": (
        "Object-store credentials come from the environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or the standard AWS credential "
        "chain (AWS_PROFILE and ~/.aws/credentials, instance or pod roles)."
    ),
    "kubernetes": (
        "Store it in a Kubernetes Secret and give the pods access through their "
        "service account (e.g. IRSA or workload identity); chunkglm never writes "
        "secrets into cluster specs."
    ),
}


def _find_secret(value: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    if isinstance(value, Mapping):
        for key, child in value.items():
            if is_secret_key(key):
                return path + (str(key),)
            found = _find_secret(child, path + (str(key),))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for child in value:
            found = _find_secret(child, path)
            if found:
                return found
    return None


def _reject_secrets(raw: Mapping[str, Any], ctx: _Context) -> None:
    found = _find_secret(raw, ())
    if found is None:
        return
    hint = _SECRET_HINTS.get(found[0], "Provide it through the environment instead.")
    raise ClusterConfigError(
        f"Secret-looking key '{_dotted(found)}' in {ctx.where(found)}: secrets are "
        f"never read from cluster config files (its value is not shown). Remove the "
        f"key. {hint}"
    )


def _check_keys(raw: Mapping, schema: Mapping, path: tuple, ctx: _Context) -> None:
    for key in raw:
        if key not in schema:
            section = f"section '{_dotted(path)}'" if path else "the top level"
            raise ClusterConfigError(
                f"Unknown key '{key}' in {section} of {ctx.where(path + (key,))}. "
                f"Allowed keys: {', '.join(schema)}. "
                "Remove the key or correct its spelling (keys are lower_case)."
            )


def _convert(spec: Field, value: Any, path: tuple, ctx: _Context) -> Any:
    try:
        return spec.convert(value)
    except (TypeError, ValueError) as exc:
        secret = is_secret_key(path[-1])
        shown = REDACTED if secret else repr(value)
        detail = f" ({exc})" if str(exc) and not secret else ""
        raise ClusterConfigError(
            f"Invalid value for '{_dotted(path)}' in {ctx.where(path)}: received "
            f"{shown} ({type(value).__name__}); expected {spec.expected}{detail}. "
            f"Fix the value, for example `{spec.example}`."
        ) from None


def _default(spec: Field, key: str, path: tuple, ctx: _Context, required: bool) -> Any:
    if spec.default is REQUIRED and not required:
        return None
    if spec.default is REQUIRED:
        raise ClusterConfigError(
            f"Missing key '{key}' in section '{_dotted(path)}' of "
            f"{ctx.where(path)}: expected {spec.expected}. "
            f"Add it, for example `{spec.example}`."
        )
    default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
    return copy.deepcopy(default)


def _validate_section(
    raw: Mapping | None,
    schema: Mapping[str, Field],
    path: tuple,
    ctx: _Context,
    required: bool = True,
) -> dict[str, Any]:
    """Check keys and values of one section; ``required=False`` (sections of
    backends not selected) accepts missing required keys."""
    raw = {} if raw is None else raw
    _check_keys(raw, schema, path, ctx)
    out = {}
    for key, spec in schema.items():
        if key in raw:
            out[key] = _convert(spec, raw[key], path + (key,), ctx)
        else:
            out[key] = _default(spec, key, path, ctx, required)
        if spec.schema is not None and out[key] is not None:
            out[key] = _validate_section(out[key], spec.schema, path + (key,), ctx, required)
    return out


def _validate_adapt(raw: Mapping | None, ctx: _Context) -> tuple[int, int] | None:
    if raw is None:
        return None
    values = _validate_section(raw, ADAPT_SCHEMA, ("adapt",), ctx)
    low, high = values["minimum"], values["maximum"]
    if low > high:
        raise ClusterConfigError(
            f"Invalid 'adapt' in {ctx.where(('adapt',))}: received minimum={low} "
            f"and maximum={high}; expected minimum <= maximum. "
            "Lower the minimum or raise the maximum."
        )
    return (low, high)


def _check_jobqueue(kind: str, options: dict[str, Any], ctx: _Context) -> None:
    cores = options["cores"]
    if options["processes"] is None:
        options["processes"] = cores  # one single-threaded worker per core
    if options["processes"] > cores:
        path = (kind, "processes")
        raise ClusterConfigError(
            f"Invalid '{kind}' section in {ctx.where(path)}: received processes="
            f"{options['processes']} and cores={cores}; every worker process needs at "
            "least one core. Lower processes or raise cores."
        )


def _validate(raw: Mapping[str, Any], ctx: _Context) -> ClusterConfig:
    _reject_secrets(raw, ctx)
    top = _validate_section(raw, TOP_SCHEMA, (), ctx)
    kind = top["type"]
    sections = {
        name: _validate_section(top[name], SECTION_SCHEMAS[name], (name,), ctx, name == kind)
        for name in KNOWN_TYPES
        if name == kind or top[name] is not None
    }
    for name in JOBQUEUE_TYPES:
        if name in sections:
            _check_jobqueue(name, sections[name], ctx)
    storage = _validate_section(top["storage"], STORAGE_SCHEMA, ("storage",), ctx)
    return ClusterConfig(
        type=kind,
        options=freeze(sections[kind]),
        adapt=_validate_adapt(top["adapt"], ctx),
        source=ctx.source,
        storage=freeze(storage),
    )


# --------------------------------------------------------------------------
# finding and reading files
# --------------------------------------------------------------------------
def bundled_config_dir() -> Path:
    """Return the directory of the configs shipped with chunkglm.

    Returns
    -------
    pathlib.Path
        ``chunkglm/cluster/configs`` inside the installed package.
    """
    return Path(__file__).resolve().parent / "configs"


def available_configs() -> list[str]:
    """List the names of the bundled configs.

    Returns
    -------
    list of str
        Sorted file stems, e.g. ``["local"]``.
    """
    return sorted(p.stem for p in bundled_config_dir().glob("*.yaml"))


def _candidates(name: str) -> Iterator[tuple[Path, str]]:
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    yield Path(name).expanduser(), f"as a path (relative to {Path.cwd()})"
    for directory in filter(None, os.environ.get(CONFIG_DIRS_ENV, "").split(os.pathsep)):
        yield Path(directory).expanduser() / filename, f"${CONFIG_DIRS_ENV}"
    yield Path.cwd() / "cluster_configs" / filename, "./cluster_configs"
    yield bundled_config_dir() / filename, "bundled with chunkglm"


def resolve_config_path(name: str | os.PathLike) -> Path:
    """Find the YAML file for a config name or path.

    Parameters
    ----------
    name : str or os.PathLike
        An existing path, or a name looked up as ``<name>.yaml`` in
        ``$CHUNKGLM_CLUSTER_CONFIGS`` (one or more directories separated by
        ``os.pathsep``), then ``./cluster_configs``, then the bundled configs.

    Returns
    -------
    pathlib.Path
        The first existing file, in that order.

    Raises
    ------
    ClusterConfigError
        If nothing matches; the message lists every place searched.
    """
    name = os.fspath(name)
    tried = []
    for path, label in _candidates(name):
        if path.is_file():
            return path.absolute()
        tried.append(f"  - {path} ({label})")
    if CONFIG_DIRS_ENV not in os.environ:
        tried.append(f"  - ${CONFIG_DIRS_ENV}/... (not searched: variable not set)")
    raise ClusterConfigError(
        f"Cluster config {name!r} was not found. Searched, in order:\n"
        + "\n".join(tried)
        + f"\nBundled configs: {', '.join(available_configs()) or '(none)'}. "
        "Pass one of those names, a path to a YAML file or a dict, or put "
        f"'{Path(name).stem}.yaml' in ${CONFIG_DIRS_ENV} or ./cluster_configs/."
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ClusterConfigError(
            f"Could not parse cluster config {path}{at}: {problem}. "
            "Fix the YAML syntax (see chunkglm/cluster/configs/local.yaml for an example)."
        ) from None
    if not isinstance(data, Mapping):
        raise ClusterConfigError(
            f"Cluster config {path} must contain a YAML mapping at the top level; "
            f"received {type(data).__name__}. Start the file with `version: 1` "
            "and `type: local`."
        )
    return dict(data)


def _read_raw(config: ConfigLike) -> tuple[dict[str, Any], str]:
    if config is None:
        config = DEFAULT_CONFIG
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config)), "<dict>"
    if isinstance(config, (str, os.PathLike)):
        path = resolve_config_path(config)
        return _read_yaml(path), str(path)
    raise ClusterConfigError(
        f"config must be None, a config name, a path to a YAML file or a dict; "
        f"received {type(config).__name__}. Pass e.g. start('local')."
    )


# --------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------
def _parse_env_value(key: str, text: str) -> Any:
    if is_secret_key(key):
        return text  # never interpret secrets (a password may look like YAML)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(raw: dict, path: tuple[str, ...], value: Any, origin: str) -> None:
    node = raw
    for depth, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, Mapping):
            raise ClusterConfigError(
                f"Cannot apply {origin}: '{_dotted(path[: depth + 1])}' is a "
                f"{type(child).__name__}, expected a mapping. Fix the config or "
                "unset the override."
            )
        else:
            child = node[key] = dict(child)
        node = child
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> Iterator[tuple[tuple[str, ...], Any, str]]:
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if not all(path):
            raise ClusterConfigError(
                f"Environment variable {name} does not name a config key; expected "
                f"{ENV_PREFIX}<SECTION>__<KEY> such as {ENV_PREFIX}LOCAL__N_WORKERS. "
                "Rename or unset it."
            )
        yield path, _parse_env_value(path[-1], environ[name]), f"environment variable {name}"


def _apply_overrides(
    raw: dict[str, Any], environ: Mapping[str, str], overrides: Mapping[str, Any]
) -> dict[tuple[str, ...], str]:
    origins: dict[tuple[str, ...], str] = {}
    for path, value, origin in _env_overrides(environ):
        _set_path(raw, path, value, origin)
        origins[path] = origin
    section = raw.get("type", TOP_SCHEMA["type"].default)
    for key, value in overrides.items():
        if not isinstance(section, str) or section not in KNOWN_TYPES:
            break  # the type error is reported by validation
        origin = f"start() keyword argument {key}="
        _set_path(raw, (section, key), value, origin)
        origins[(section, key)] = origin
    return origins


def load_config(
    config: ConfigLike = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClusterConfig:
    """Load, override and validate a cluster config.

    Parameters
    ----------
    config : None, str, os.PathLike or Mapping
        None for the bundled ``local`` config; a name or path resolved by
        :func:`resolve_config_path`; or a dict with the structure of the YAML.
    overrides : Mapping, optional
        Keys of the selected backend's section (e.g. ``{"n_workers": 2}``);
        they take precedence over the file and the environment.
    environ : Mapping, optional
        Environment to read ``CHUNKGLM_CLUSTER__*`` overrides from; defaults
        to :data:`os.environ`.

    Returns
    -------
    ClusterConfig
        The validated config.

    Raises
    ------
    ClusterConfigError
        If the config cannot be found or parsed, has an unknown key, a value
        of the wrong type, or an unknown backend ``type``.
    """
    raw, source = _read_raw(config)
    environ = os.environ if environ is None else environ
    origins = _apply_overrides(raw, environ, overrides or {})
    return _validate(raw, _Context(source, origins))


# --------------------------------------------------------------------------
# the memory budget
# --------------------------------------------------------------------------
def worker_memory(config: ClusterConfig) -> int | None:
    """Bytes of memory of one worker as the config states it, or None when it does not.

    ``local``: ``memory_limit`` (None when null: the machine's share, decided at
    start). ``slurm``/``pbs``/``sge``: the job's ``memory`` over its ``processes``.
    ``gateway`` and ``kubernetes``: None (their worker memory is set by the
    gateway or the pod spec).
    """
    options = config.options
    if config.type == "local":
        return options.get("memory_limit")
    if config.type in JOBQUEUE_TYPES and options.get("memory"):
        return parse_bytes(options["memory"]) // max(1, int(options.get("processes") or 1))
    return None


def chunk_budget(config: ClusterConfig, chunk_bytes=None) -> tuple[MemoryBudget, str | None]:
    """The user's memory budget (``chunk_bytes``; None: the default) for this cluster.

    A budget larger than a quarter of a worker's memory (:func:`worker_memory`)
    is lowered to that quarter: a task holds its block, a float64 copy and the
    kernels' temporaries. Returns the budget and a note saying it was lowered
    (None when it was not).
    """
    return MemoryBudget.of(chunk_bytes).capped(worker_memory(config))
