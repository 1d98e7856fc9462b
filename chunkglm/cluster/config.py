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

Only the ``local`` backend has a validated section in this version; the
sections of the other known backends are accepted as plain mappings so that
files written for later versions still load.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import yaml
from dask.utils import parse_bytes

from chunkglm.errors import ChunkglmError

__all__ = [
    "AVAILABLE_TYPES",
    "ClusterConfig",
    "ClusterConfigError",
    "CONFIG_DIRS_ENV",
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "KNOWN_TYPES",
    "available_configs",
    "bundled_config_dir",
    "is_secret_key",
    "load_config",
    "redact",
    "resolve_config_path",
]

#: Schema version understood by this release.
SCHEMA_VERSION = 1
#: Every backend name the schema knows about (a later release adds the rest).
KNOWN_TYPES = ("local", "slurm", "pbs", "sge", "gateway", "kubernetes")
#: Backends that :func:`chunkglm.cluster.start` can build in this release.
AVAILABLE_TYPES = ("local",)
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
@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster configuration.

    Attributes
    ----------
    type : str
        Backend name, one of :data:`KNOWN_TYPES`.
    options : Mapping[str, Any]
        Read-only mapping of the backend's section.  For ``local`` every key
        of the schema is present, defaults filled in, ``memory_limit``
        converted to bytes and ``dashboard_address`` normalised to
        ``"127.0.0.1:<port>"`` (or None when the dashboard is disabled).
    adapt : tuple of (int, int) or None
        ``(minimum, maximum)`` number of workers for adaptive scaling.
    source : str
        Path of the YAML file the config was read from, or ``"<dict>"``.
    """

    type: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    adapt: tuple[int, int] | None = None
    source: str = "<dict>"

    def __repr__(self) -> str:
        return (
            f"ClusterConfig(type={self.type!r}, options={redact(self.options)!r}, "
            f"adapt={self.adapt!r}, source={self.source!r})"
        )


# --------------------------------------------------------------------------
# value converters: return the normalised value or raise TypeError/ValueError
# --------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not _is_int(value):
            raise TypeError
        if value < minimum:
            raise ValueError(f"it must be >= {minimum}")
        return int(value)

    return convert


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _memory(value: Any) -> int:
    if isinstance(value, str):
        nbytes = parse_bytes(value)  # ValueError on an unknown unit
    elif isinstance(value, Real) and not isinstance(value, bool):
        nbytes = int(value)
    else:
        raise TypeError
    if nbytes <= 0:
        raise ValueError("it must be a positive size")
    return int(nbytes)


def _dashboard(value: Any) -> str:
    if _is_int(value):
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


def _directory(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError
    return os.path.expanduser(os.fspath(value))


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError
    return value


def _version(value: Any) -> int:
    if not _is_int(value):
        raise TypeError
    if value != SCHEMA_VERSION:
        raise ValueError(f"this release of chunkglm reads version {SCHEMA_VERSION}")
    return int(value)


def _type_name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    if value not in KNOWN_TYPES:
        raise ValueError(f"available in this release: {', '.join(AVAILABLE_TYPES)}")
    return value


# --------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------
_REQUIRED = object()


@dataclass(frozen=True)
class _Field:
    expected: str
    example: str
    convert: Callable[[Any], Any]
    default: Any = None


def _section_field(name: str) -> _Field:
    return _Field(
        f"a mapping of {name} options, or null",
        f"{name}: {{...}}",
        _optional(_mapping),
    )


TOP_SCHEMA: dict[str, _Field] = {
    "version": _Field(f"the integer {SCHEMA_VERSION}", "version: 1", _version, 1),
    "type": _Field(f"one of: {', '.join(KNOWN_TYPES)}", "type: local", _type_name, "local"),
    **{name: _section_field(name) for name in KNOWN_TYPES},
    "adapt": _Field(
        "null or a mapping with keys minimum and maximum",
        "adapt: {minimum: 1, maximum: 4}",
        _optional(_mapping),
    ),
}

LOCAL_SCHEMA: dict[str, _Field] = {
    "n_workers": _Field(
        "a positive integer, or null for one worker per usable core",
        "n_workers: 4",
        _optional(_int_at_least(1)),
    ),
    "threads_per_worker": _Field(
        "a positive integer", "threads_per_worker: 1", _int_at_least(1), 1
    ),
    "memory_limit": _Field(
        'a memory size per worker such as "4GiB", "4 GB", "4000MB" or an integer '
        "number of bytes, or null for 80% of RAM divided among the workers",
        'memory_limit: "4GiB"',
        _optional(_memory),
    ),
    "dashboard_address": _Field(
        'an address "127.0.0.1:<port>" (or ":<port>"; port 0 = any free port), '
        "an integer port, or null to disable the dashboard",
        'dashboard_address: "127.0.0.1:8787"',
        _optional(_dashboard),
        "127.0.0.1:8787",
    ),
    "processes": _Field(
        "true (worker processes) or false (threads in this process)",
        "processes: true",
        _boolean,
        True,
    ),
    "local_directory": _Field(
        "a directory path for worker scratch files, or null for the default",
        'local_directory: "/tmp/chunkglm-dask"',
        _optional(_directory),
    ),
}

ADAPT_SCHEMA: dict[str, _Field] = {
    "minimum": _Field(
        "a non-negative integer number of workers", "minimum: 1", _int_at_least(0), 1
    ),
    "maximum": _Field(
        "a positive integer number of workers", "maximum: 4", _int_at_least(1), _REQUIRED
    ),
}


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


def _check_keys(raw: Mapping, schema: Mapping, path: tuple, ctx: _Context) -> None:
    for key in raw:
        if key not in schema:
            section = f"section '{_dotted(path)}'" if path else "the top level"
            raise ClusterConfigError(
                f"Unknown key '{key}' in {section} of {ctx.where(path + (key,))}. "
                f"Allowed keys: {', '.join(schema)}. "
                "Remove the key or correct its spelling (keys are lower_case)."
            )


def _convert(spec: _Field, value: Any, path: tuple, ctx: _Context) -> Any:
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


def _validate_section(
    raw: Mapping | None, schema: Mapping[str, _Field], path: tuple, ctx: _Context
) -> dict[str, Any]:
    raw = {} if raw is None else raw
    _check_keys(raw, schema, path, ctx)
    out = {}
    for key, spec in schema.items():
        if key in raw:
            out[key] = _convert(spec, raw[key], path + (key,), ctx)
        elif spec.default is _REQUIRED:
            raise ClusterConfigError(
                f"Missing key '{key}' in section '{_dotted(path)}' of "
                f"{ctx.where(path)}: expected {spec.expected}. "
                f"Add it, for example `{spec.example}`."
            )
        else:
            out[key] = spec.default
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


def _validate(raw: Mapping[str, Any], ctx: _Context) -> ClusterConfig:
    top = _validate_section(raw, TOP_SCHEMA, (), ctx)
    local = _validate_section(top["local"], LOCAL_SCHEMA, ("local",), ctx)
    adapt = _validate_adapt(top["adapt"], ctx)
    kind = top["type"]
    options = local if kind == "local" else copy.deepcopy(dict(top[kind] or {}))
    return ClusterConfig(
        type=kind, options=MappingProxyType(options), adapt=adapt, source=ctx.source
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
