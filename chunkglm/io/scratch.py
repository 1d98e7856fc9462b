"""Temporary folders that a killed process cannot leave behind for good.

Each folder's name carries its owner: ``<prefix><host>-<pid>-<hex>``. Making a
new one first removes those of the same prefix, in the same parent, whose
process is gone on this host (a ``kill -9`` skips every clean-up). Folders of
live processes, and of other hosts (a shared file system), are left alone.

A parent may be an object-store URL (``s3://bucket/cohort.zarr/.scratch``): the
"folder" is then a key prefix under it (nothing to make; zarr writes its keys),
listed and removed through fsspec with the store's credentials from the
environment, as the stores chunkglm opens without ``storage_options``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
import weakref
from pathlib import Path

import fsspec

from chunkglm.io.backends import fsspec_options
from chunkglm.io.layout import is_url
from chunkglm.provenance import process_alive

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def owned_name(prefix: str) -> str:
    """A new folder name for ``prefix``, naming this host and process."""
    return f"{prefix}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale(parent, prefix: str) -> list:
    """Remove the folders ``<prefix><this host>-<pid>-*`` in ``parent`` whose process is gone.

    Returns the folders removed (paths; URLs for an object-store parent). Unreadable parents
    and folders that vanish meanwhile are not errors (another process may be cleaning up too).
    """
    pattern = re.compile(re.escape(prefix) + re.escape(_HOST) + r"-(\d+)-[0-9a-f]+$")
    if is_url(parent):
        return _remove_stale_keys(str(parent), pattern)
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _remove_stale_keys(parent: str, pattern) -> list[str]:
    """:func:`remove_stale` under an object-store URL: its "folders" are key prefixes."""
    fs, root = _filesystem(parent)
    try:
        entries = fs.ls(root, detail=False, refresh=True)
    except OSError:  # FileNotFoundError: nothing there yet
        return []
    removed = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = pattern.match(name)
        if match and not process_alive(int(match.group(1))):
            url = join(parent, name)
            remove_folder(url)
            removed.append(url)
    return removed


def join(parent, name: str):
    """``parent / name`` for a local folder (a Path), ``parent/name`` for a URL (a string)."""
    return f"{str(parent).rstrip('/')}/{name}" if is_url(parent) else Path(parent) / name


def remove_folder(folder) -> None:
    """Remove a local folder, or every key under an object-store URL; missing is not an error."""
    if not is_url(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    fs, root = _filesystem(folder)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def _filesystem(url: str):
    """fsspec's file system of ``url``, with the options the store backends give it."""
    return fsspec.core.url_to_fs(url, **fsspec_options(url))


class TemporaryFolder:
    """``tempfile.TemporaryDirectory`` with an owned name (see :func:`owned_name`).

    Creating one removes the folders of ``prefix`` left in ``parent`` (default the
    temporary directory; a local folder or an object-store URL) by killed processes
    of this host. The folder is removed by :meth:`cleanup`, at the end of a ``with``
    block (which gives its path, or URL, as a string, as ``TemporaryDirectory``
    does), or when the object is collected, without the ``ResourceWarning``
    ``TemporaryDirectory`` gives then. Under a URL nothing is made: the folder is
    the prefix of the keys written under :attr:`name`.
    """

    def __init__(self, prefix: str, parent=None):
        parent = parent if parent is not None else tempfile.gettempdir()
        remove_stale(parent, prefix)
        self.name = str(join(parent, owned_name(prefix)))
        if not is_url(parent):
            os.mkdir(self.name, 0o700)
        self._finalizer = weakref.finalize(self, remove_folder, self.name)

    def path(self, name: str):
        """``name`` inside the folder: a Path, or a URL string under an object-store parent."""
        return join(self.name, name)

    def cleanup(self) -> None:
        """Remove the folder and everything in it (again: nothing happens)."""
        self._finalizer()

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<TemporaryFolder {self.name!r}>"
