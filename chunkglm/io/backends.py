"""One place that turns a location and its options into a zarr store.

Local paths give a :class:`zarr.storage.LocalStore`. Object-store URLs give
either an obstore-backed :class:`zarr.storage.ObjectStore` (``s3://`` only;
about twice as fast as s3fs when reading chunks, see
``benchmarks/s3_readers.py``) or an fsspec-backed
:class:`zarr.storage.FsspecStore` (every fsspec protocol)::

    backend  "auto"    obstore for s3:// when obstore is installed, every
                       option is one it understands and the credentials come
                       from a source it reads (options, AWS_* variables, web
                       identity, container credentials) or are not needed
                       (anon); otherwise fsspec, whose botocore credential
                       chain also reads profiles, SSO and config files
             "obstore" obstore, or a clear error saying why it cannot be used
             "fsspec"  fsspec (s3fs for s3://)

Storage options use s3fs names (``endpoint_url``, ``region``, ``anon``,
``key``/``secret``/``token``, ``client_kwargs={"endpoint_url", "region_name"}``,
``requester_pays``) whatever the backend. The environment is honoured by both:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` ... Credentials are only ever
held in memory: no chunkglm code writes them to a store, a provenance record,
a log or an error message (messages name option keys, never their values).

Transient errors (5xx, throttling, dropped connections) are retried
``retries`` times with exponential backoff (obstore ``retry_config``;
botocore ``retries`` for s3fs). A request that still fails raises
:class:`~chunkglm.errors.StoreError` naming the object and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import zarr
from zarr.core.sync import sync as zarr_sync

from chunkglm.errors import StoreError
from chunkglm.provenance import redact_url

__all__ = ["BACKENDS", "DEFAULT_RETRIES", "StorageSettings", "choose_backend", "open_store",
           "storage_settings", "sync"]

BACKENDS = ("auto", "obstore", "fsspec")
#: Retries of one request after a transient error (connection, 5xx, throttling).
DEFAULT_RETRIES = 5
#: Give up on one request (all its retries) after this long.
RETRY_TIMEOUT = timedelta(minutes=2)
_OBSTORE_SCHEMES = ("s3://", "s3a://")
#: s3fs-style option names that carry credentials: never printed, never stored.
SECRET_OPTIONS = frozenset({"key", "secret", "token", "password", "aws_access_key_id",
                            "aws_secret_access_key", "aws_session_token", "access_key_id",
                            "secret_access_key", "session_token"})
#: s3fs-style option -> obstore S3Config key (None: handled separately).
_OBSTORE_NAMES = {"endpoint_url": "endpoint", "region": "region", "region_name": "region",
                  "key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
                  "anon": None, "requester_pays": "request_payer", "client_kwargs": None}
_OBSTORE_CLIENT_KWARGS = {"endpoint_url": "endpoint", "region_name": "region"}
_ENV_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class StorageSettings:
    """How to reach object storage: backend, s3fs-style options, retries.

    Pass one wherever ``storage_options`` is accepted (``convert``,
    ``open_cohort``, ``FirstLevelModel.voxelwise``): it travels to the
    workers with the tasks. A plain dict of options means
    ``StorageSettings(options=that_dict)``.

    Parameters
    ----------
    backend : {"auto", "obstore", "fsspec"}
    options : mapping
        s3fs-style storage options (``endpoint_url``, ``region``, ``anon`` ...).
    retries : int
        Retries of a request after a transient error; 0 disables them.
    """

    backend: str = "auto"
    options: Mapping = field(default_factory=dict)
    retries: int = DEFAULT_RETRIES

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise StoreError(f"storage backend must be one of {BACKENDS}; received {self.backend!r}.")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise StoreError(f"storage retries must be a whole number >= 0; received {self.retries!r}.")
        if not isinstance(self.options, Mapping):
            raise StoreError("storage options must be a mapping of s3fs-style names to values; "
                             f"received a {type(self.options).__name__}.")
        object.__setattr__(self, "options", dict(self.options))  # a copy: the caller's stays theirs

    def __repr__(self) -> str:
        return (f"StorageSettings(backend={self.backend!r}, options={redact_options(self.options)!r}, "
                f"retries={self.retries})")

    def __hash__(self) -> int:
        return hash((self.backend, self.retries, repr(sorted(self.options.items(), key=str))))


def redact_options(options) -> dict:
    """A copy of ``options`` with every credential value replaced by ``"***"``."""
    out = {}
    for key, value in dict(options or {}).items():
        if str(key).lower() in SECRET_OPTIONS:
            out[key] = "***"
        elif isinstance(value, Mapping):
            out[key] = redact_options(value)
        else:
            out[key] = value
    return out


_SETTINGS_KEYS = frozenset({"backend", "options", "retries"})


def storage_settings(storage=None, options=None) -> StorageSettings:
    """Coerce storage settings; ``options`` (e.g. ``--storage-option``) override theirs.

    Parameters
    ----------
    storage : None, dict, StorageSettings or cluster-config section
        ``None``; a dict of s3fs-style options; a :class:`StorageSettings`; the
        cluster config's ``storage`` section (a mapping with only the keys
        ``backend``/``options``/``retries``, none of which is an s3fs option)
        or any object with those attributes.
    options : dict, optional
        s3fs-style options merged over the settings' own.
    """
    settings = _coerce(storage)
    if options:
        settings = StorageSettings(settings.backend, {**settings.options, **dict(options)}, settings.retries)
    return settings


def _coerce(storage) -> StorageSettings:
    if storage is None:
        return StorageSettings()
    if isinstance(storage, StorageSettings):
        return storage
    if all(hasattr(storage, name) for name in _SETTINGS_KEYS):
        return StorageSettings(storage.backend, _plain(storage.options), storage.retries)
    if isinstance(storage, Mapping) and storage and set(storage) <= _SETTINGS_KEYS:
        return StorageSettings(storage.get("backend", "auto"), _plain(storage.get("options")),
                               storage.get("retries", DEFAULT_RETRIES))
    if isinstance(storage, Mapping):
        return StorageSettings(options=_plain(storage))
    raise StoreError(f"storage options must be a dict or StorageSettings; received {type(storage).__name__}.")


def _plain(options) -> dict:
    """Read-only mappings (the cluster config's) as plain, picklable dicts."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in dict(options or {}).items()}


def open_store(url: str, storage=None, *, read_only: bool = False) -> zarr.abc.store.Store:
    """A zarr store for an object-store URL (``s3://bucket/prefix`` ...).

    Parameters
    ----------
    url : str
        fsspec-style URL; the store is rooted at its path.
    storage : dict or StorageSettings, optional
        s3fs-style options, or backend + options + retries.
    read_only : bool

    Returns
    -------
    zarr.abc.store.Store
        A :class:`zarr.storage.ObjectStore` or :class:`zarr.storage.FsspecStore`.

    Raises
    ------
    StoreError
        ``backend="obstore"`` where obstore cannot serve this URL or options.
    """
    settings = storage_settings(storage)
    if choose_backend(url, settings) == "obstore":
        return _obstore_store(url, settings, read_only)
    return _fsspec_store(url, settings, read_only)


def choose_backend(url: str, storage=None) -> str:
    """``"obstore"`` or ``"fsspec"`` for this URL and settings (see module docs)."""
    settings = storage_settings(storage)
    if settings.backend == "fsspec":
        return "fsspec"
    reason = _obstore_refusal(url, settings.options)
    if reason is None and (settings.backend == "obstore" or _obstore_has_credentials(settings.options)):
        return "obstore"
    if settings.backend == "obstore":
        raise StoreError(f"storage backend 'obstore' cannot open {_redact_url(url)}: {reason}. "
                         "Use backend 'fsspec' (or 'auto') instead.")
    return "fsspec"


def _obstore_refusal(url: str, options: Mapping) -> str | None:
    """Why obstore cannot serve ``url`` with ``options`` (None when it can)."""
    if not str(url).startswith(_OBSTORE_SCHEMES):
        return f"it serves {'/'.join(_OBSTORE_SCHEMES)} URLs only"
    try:  # obstore is optional: without it, fsspec serves every URL
        import obstore  # noqa: F401
        from zarr.storage import ObjectStore  # noqa: F401
    except ImportError:
        return "obstore is not installed (pip install obstore)"
    unknown = sorted(set(options) - set(_OBSTORE_NAMES))
    unknown += sorted(f"client_kwargs.{k}" for k in set(options.get("client_kwargs") or {})
                      - set(_OBSTORE_CLIENT_KWARGS))
    if unknown:
        return f"it does not understand the storage option(s) {unknown}"
    return None


def _obstore_has_credentials(options: Mapping) -> bool:
    """Credentials obstore can find itself (it does not read AWS profiles or SSO)."""
    env = os.environ
    return bool(options.get("anon") or options.get("key")
                or (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"))
                or (env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"))
                or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"))


def obstore_config(options: Mapping) -> tuple[dict, dict]:
    """Map s3fs-style options (and AWS_* endpoint variables) to obstore
    ``(S3Config, ClientConfig)``."""
    config, client = {}, {}
    for key, value in (options.get("client_kwargs") or {}).items():
        config[_OBSTORE_CLIENT_KWARGS[key]] = value
    for key, value in options.items():
        name = _OBSTORE_NAMES[key]
        if name is not None and value is not None:
            config[name] = value
    if options.get("anon"):
        config["skip_signature"] = True
    endpoint = config.get("endpoint") or next((os.environ[v] for v in _ENV_ENDPOINTS if os.environ.get(v)), None)
    if endpoint:
        config["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    if "region" not in config and not os.environ.get("AWS_REGION") and os.environ.get("AWS_DEFAULT_REGION"):
        config["region"] = os.environ["AWS_DEFAULT_REGION"]
    return config, client


def _obstore_store(url: str, settings: StorageSettings, read_only: bool):
    from obstore.store import S3Store  # optional dependency: only reached when _obstore_refusal found it

    bucket, prefix = _split_s3_url(url)
    config, client = obstore_config(settings.options)
    retry = {"max_retries": settings.retries, "retry_timeout": RETRY_TIMEOUT}
    s3 = S3Store(bucket, prefix=prefix or None, config=config, client_options=client, retry_config=retry)
    return _ObjectStore(s3, read_only=read_only, url=_redact_url(url), retries=settings.retries)


def _fsspec_store(url: str, settings: StorageSettings, read_only: bool):
    options = fsspec_options(url, settings)
    return _FsspecStore.from_url(url, storage_options=options, read_only=read_only)


def fsspec_options(url: str, storage=None) -> dict:
    """fsspec storage options for ``url``: ``region`` moved to where s3fs reads
    it and botocore's retries set from ``retries``."""
    settings = storage_settings(storage)
    options = dict(settings.options)
    if not str(url).startswith(_OBSTORE_SCHEMES):
        return options
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    region = options.pop("region", None) or options.pop("region_name", None)
    if region:
        client_kwargs.setdefault("region_name", region)
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    config_kwargs = dict(options.pop("config_kwargs", None) or {})
    config_kwargs.setdefault("retries", {"max_attempts": settings.retries + 1, "mode": "standard"})
    options["config_kwargs"] = config_kwargs
    return options


def _split_s3_url(url: str) -> tuple[str, str]:
    rest = str(url).split("://", 1)[1]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"{_redact_url(url)} names no bucket; write s3://bucket/path.")
    return bucket, prefix.strip("/")


def _redact_url(url) -> str:
    return redact_url(str(url))


def sync(coroutine):
    """Run a zarr store coroutine from synchronous code (zarr's own event loop)."""
    return zarr_sync(coroutine)


class _ClearErrors:
    """Turn a storage failure that survived every retry into a StoreError that
    names the object, the retries and what to do (never credentials)."""

    def _error_types(self) -> tuple:
        return (OSError, ConnectionError)

    def _failed(self, action: str, key: str, err: Exception) -> StoreError:
        detail = str(err).split("\n\nDebug source", 1)[0].strip()  # obstore appends a Rust dump
        return StoreError(
            f"could not {action} {self._location}/{key} after {self._retries} retries: "
            f"{type(err).__name__}: {detail}. Check that the storage endpoint is reachable and the "
            "credentials allow it, then run the same command again: nodes and derivatives "
            "count as complete only once their completion marker is written, so anything cut "
            "off here is rewritten."
        )

    async def set(self, key, value):
        try:
            return await super().set(key, value)
        except self._error_types() as err:
            raise self._failed("write", key, err) from err

    async def get(self, key, prototype, byte_range=None):
        try:
            return await super().get(key, prototype, byte_range)
        except FileNotFoundError:
            raise
        except self._error_types() as err:
            raise self._failed("read", key, err) from err

    async def delete(self, key):
        try:
            return await super().delete(key)
        except FileNotFoundError:
            raise
        except self._error_types() as err:
            raise self._failed("delete", key, err) from err


class _ObjectStore(_ClearErrors, zarr.storage.ObjectStore):
    """zarr's ObjectStore with clear errors and a printable, secret-free location."""

    def __init__(self, store, *, read_only=False, url="", retries=DEFAULT_RETRIES):
        super().__init__(store, read_only=read_only)
        self._location, self._retries = url, retries

    def _error_types(self) -> tuple:
        from obstore.exceptions import BaseError  # optional dependency, present for an _ObjectStore

        return (BaseError, OSError, ConnectionError)

    def with_read_only(self, read_only: bool = False):
        return type(self)(self.store, read_only=read_only, url=self._location, retries=self._retries)

    def __str__(self) -> str:
        return self._location


class _FsspecStore(_ClearErrors, zarr.storage.FsspecStore):
    """zarr's FsspecStore with clear errors."""

    def _error_types(self) -> tuple:
        types = [OSError, ConnectionError]
        try:  # s3fs lets botocore's own connection errors through (not OSError subclasses)
            from botocore.exceptions import BotoCoreError

            types.append(BotoCoreError)
        except ImportError:
            pass
        return tuple(types)

    @property
    def _location(self) -> str:
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return _redact_url(f"{protocol}://{self.path}")

    @property
    def _retries(self) -> int:
        retries = (getattr(self.fs, "config_kwargs", None) or {}).get("retries") or {}
        return max(int(retries.get("max_attempts", 1)) - 1, 0)
