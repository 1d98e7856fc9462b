"""Temporary folders that a killed process cannot leave behind for good.

Each folder's name carries its owner: ``<prefix><host>-<pid>-<hex>``. Making a
new one first removes those of the same prefix, in the same parent, whose
process is gone on this host (a ``kill -9`` skips every clean-up). Folders of
live processes, and of other hosts (a shared file system), are left alone.
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

from chunkglm.provenance import process_alive

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def owned_name(prefix: str) -> str:
    """A new folder name for ``prefix``, naming this host and process."""
    return f"{prefix}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale(parent, prefix: str) -> list[Path]:
    """Remove the folders ``<prefix><this host>-<pid>-*`` in ``parent`` whose process is gone.

    Returns the folders removed. Unreadable parents and folders that vanish
    meanwhile are not errors (another process may be cleaning up too).
    """
    pattern = re.compile(re.escape(prefix) + re.escape(_HOST) + r"-(\d+)-[0-9a-f]+$")
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


class TemporaryFolder:
    """``tempfile.TemporaryDirectory`` with an owned name (see :func:`owned_name`).

    Creating one removes the folders of ``prefix`` left in the temporary
    directory by killed processes of this host. The folder is removed by
    :meth:`cleanup`, at the end of a ``with`` block (which gives its path as a
    string, as ``TemporaryDirectory`` does), or when the object is collected,
    without the ``ResourceWarning`` ``TemporaryDirectory`` gives then.
    """

    def __init__(self, prefix: str, parent=None):
        parent = Path(parent if parent is not None else tempfile.gettempdir())
        remove_stale(parent, prefix)
        self.name = str(parent / owned_name(prefix))
        os.mkdir(self.name, 0o700)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.name, True)

    def cleanup(self) -> None:
        """Remove the folder and everything in it (again: nothing happens)."""
        self._finalizer()

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<TemporaryFolder {self.name!r}>"
