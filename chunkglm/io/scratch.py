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
import uuid
from pathlib import Path

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
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
