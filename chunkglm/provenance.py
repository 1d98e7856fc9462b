"""Provenance records: what produced an output folder, and with what.

Every output folder chunkglm writes gets one JSON record (the cohort store
keeps its records in its root attributes). A record holds:

- ``inputs``: paths or URLs (credentials removed), sizes, sha256 where known;
- ``options``: the model parameters, contrasts and command-line arguments,
  minus secrets;
- ``versions``: chunkglm, dask, distributed, zarr, numpy, nibabel, nilearn,
  python;
- ``cluster``: backend type and size (workers, threads, memory limit);
- ``started`` (UTC, ISO 8601) and ``wall_time_s``: in the cohort store's
  records only. A record written into an output folder (:func:`write_record`,
  the commands' ``*provenance.json``) leaves the times out
  (:func:`without_times`), so that running a command again writes every file
  of its derivatives byte for byte as before.

Secrets never reach a record: values under keys that name a secret
(``key``, ``secret``, ``password``, ``token``, ``credential``, ...) are
replaced by ``"***"``, URLs lose their ``user:password@`` part, and nothing
is read from the environment.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "REDACTED",
    "Stopwatch",
    "cluster_summary",
    "is_secret_key",
    "read_record",
    "record",
    "redact_url",
    "strip_secrets",
    "versions",
    "without_times",
    "write_record",
]

#: This host, as the temporary files of records name it.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"

REDACTED = "***"
#: Key names whose values are secrets (compared case-insensitively, as parts).
_SECRET = re.compile(r"key|secret|passw|token|credential|auth|session|signature|cookie",
                     re.IGNORECASE)
#: Keys that contain one of the words above but hold nothing secret.
_NOT_SECRET = {"chunk_key_encoding", "sort_keys"}
_PACKAGES = ("chunkglm", "dask", "distributed", "zarr", "numpy", "nibabel", "nilearn")


def is_secret_key(name) -> bool:
    """True when a mapping key's value must never be written or printed.

    Parameters
    ----------
    name : object
        The key (``"secret"``, ``"aws_access_key_id"``, ``"password"`` ...).

    Returns
    -------
    bool
    """
    return str(name) not in _NOT_SECRET and bool(_SECRET.search(str(name)))


def redact_url(url: str) -> str:
    """Drop any ``user:password@`` part of a URL before it is stored or printed."""
    return re.sub(r"(://)[^/@]*@", r"\1", str(url))


def strip_secrets(value):
    """A copy of ``value`` safe to write: secrets replaced, URLs without credentials.

    Parameters
    ----------
    value : mapping, list, tuple, str, Path or scalar, possibly nested

    Returns
    -------
    The same structure (mappings become dicts, tuples lists, paths
    strings) with every secret-named key's value replaced by ``"***"`` and
    ``scheme://user:password@host`` written ``scheme://host``.
    """
    if isinstance(value, Mapping):
        return {str(k): REDACTED if is_secret_key(k) and v is not None else strip_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [strip_secrets(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return redact_url(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return repr(value)


def versions() -> dict[str, str]:
    """Versions of chunkglm, its main dependencies and Python.

    Returns
    -------
    dict
        ``{"chunkglm": "0.1.0", "dask": ..., ..., "python": "3.11.9"}``;
        ``"not installed"`` for a package that cannot be imported.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def cluster_summary(client=None, config=None) -> dict:
    """Kind and size of the cluster that ran the work.

    Parameters
    ----------
    client : distributed.Client, optional
        None: the work ran in this process (dask's threaded scheduler).
    config : chunkglm.cluster.ClusterConfig, optional
        Its ``type`` names the backend; without it the cluster's class does.

    Returns
    -------
    dict
        ``type``, ``n_workers``, ``threads`` (total), ``memory_limit``
        (bytes per worker, the largest), from the scheduler's view at the
        time of the call. No address, no credentials.
    """
    if client is None:
        return {"type": "none", "scheduler": "threaded (in process)", "n_workers": 0,
                "threads": os.cpu_count() or 1, "memory_limit": None}
    every = {"n_workers": -1} if _takes_n_workers(client) else {}  # newer: 5 workers by default
    workers = client.scheduler_info(**every).get("workers", {})
    cluster = getattr(client, "cluster", None)
    kind = getattr(config, "type", None) or (type(cluster).__name__ if cluster is not None else "remote")
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    return {"type": kind, "cluster_class": type(cluster).__name__ if cluster is not None else None,
            "n_workers": len(workers), "threads": sum(w.get("nthreads", 0) for w in workers.values()),
            "memory_limit": max(limits) if limits else None}


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


class Stopwatch:
    """Start time (UTC) and elapsed wall time of an operation.

    Examples
    --------
    >>> watch = Stopwatch()
    >>> sorted(watch.times())
    ['started', 'wall_time_s']
    """

    def __init__(self):
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self._t0 = time.perf_counter()

    def times(self) -> dict:
        """``{"started": ISO time, "wall_time_s": seconds so far}``."""
        return {"started": self.started, "wall_time_s": round(time.perf_counter() - self._t0, 3)}


def record(operation: str, *, inputs, options, cluster, stopwatch: Stopwatch, **extra) -> dict:
    """Assemble one provenance record, secrets stripped.

    Parameters
    ----------
    operation : str
        What produced the output, e.g. ``"first-level"``, ``"convert"``.
    inputs : list of dict
        One entry per input: ``path`` (or URL), ``size``, ``sha256``...
    options : dict
        Model parameters, contrasts, command-line arguments.
    cluster : dict
        From :func:`cluster_summary`.
    stopwatch : Stopwatch
        Started when the operation started.
    **extra
        More top-level fields (e.g. ``outputs``).

    Returns
    -------
    dict
        JSON-serialisable.
    """
    body = {"operation": operation, "inputs": inputs, "options": options, **extra}
    return {"chunkglm_provenance": 1, **strip_secrets(body), "versions": versions(),
            "cluster": strip_secrets(cluster), **stopwatch.times()}


#: The fields of a record that differ between two runs of one command (:meth:`Stopwatch.times`).
TIMES = ("started", "wall_time_s")


def without_times(content: dict) -> dict:
    """``content`` less its :data:`TIMES`: what an output folder's record holds (a run of the
    same command on the same inputs writes the same bytes)."""
    return {key: value for key, value in content.items() if key not in TIMES}


def write_record(path, content: dict) -> Path:
    """Write a record as JSON atomically (a reader sees all of it or nothing), without its times
    (:func:`without_times`).

    Parameters
    ----------
    path : str or Path
        Destination; its folder must exist.
    content : dict
        A record from :func:`record` (secrets are stripped again here).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    _remove_stale_partials(path)
    partial = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        partial.write_text(json.dumps(strip_secrets(without_times(content)), indent=2, sort_keys=False) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _remove_stale_partials(path: Path) -> None:
    """Remove the temporary files of ``path`` left by processes of this host that are gone
    (killed between writing one and renaming it)."""
    pattern = re.compile(re.escape(f".{path.name}.{_HOST}-") + r"(\d+)-[0-9a-f]+\.partial$")
    try:
        siblings = list(path.parent.glob(f".{glob.escape(path.name)}.*.partial"))
    except OSError:
        return
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if match and not process_alive(int(match.group(1))):
            sibling.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts); the owner check of
    every host-pid named leftover: temporary files, scratch folders, node locks."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_record(path) -> dict | None:
    """A record written by :func:`write_record`, or None if absent or unreadable."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None
