"""File-name labels of derivative outputs, shared by the writers and the readers (reports)."""

from __future__ import annotations

import re

_LABEL = re.compile(r"[^A-Za-z0-9_-]")


def file_label(name: str) -> str:
    """A file-name label: letters, digits, - and _ only; never a path."""
    return _LABEL.sub("", name.replace("/", "-")) or "map"
