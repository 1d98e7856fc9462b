"""All-or-nothing output folders: write aside, then move into place.

:class:`StagedOutput` gives a temporary folder beside ``out_dir`` (in its
parent, so on the same filesystem). Files are written there; when the
``with`` block ends without error they are moved into ``out_dir``:

- ``out_dir`` does not exist: the staged folder is renamed to it (one
  atomic rename);
- it exists: each file is moved in with :func:`os.replace` (atomic per
  file). A file it replaces is first set aside, so that if any move fails
  every moved file is taken out again, every replaced file put back and
  every folder created removed.

On any error (including KeyboardInterrupt) the temporary folder is removed
and ``out_dir`` is as it was. Only a killed process can leave a temporary
folder, named ``.<out_dir name>.chunkglm-<hex>``, in the parent, never
inside ``out_dir``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from chunkglm.errors import InputError


class StagedOutput:
    """Context manager: ``with StagedOutput(out_dir) as out: out.path("a/b.json")``.

    Parameters
    ----------
    out_dir : str or Path
        Final folder (created, with its parents, only at commit).

    Attributes
    ----------
    out_dir : Path
        The resolved final folder.
    written : list of Path
        After a successful ``with`` block: the final paths, in the order
        they were requested.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.written: list[Path] = []
        self._relative: list[str] = []
        self._tmp: Path | None = None

    def __enter__(self):
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"out_dir {self.out_dir} exists and is not a folder.")
        self._tmp = _make_temporary_folder(self.out_dir)
        (self._tmp / "out").mkdir()
        return self

    @property
    def root(self) -> Path:
        """The staged counterpart of ``out_dir``."""
        return self._tmp / "out"

    def path(self, relative: str) -> Path:
        """Where to write ``out_dir/relative`` now (its folder is created)."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative not in self._relative:
            self._relative.append(relative)
        return target

    def existing(self, relative: str) -> Path | None:
        """``out_dir/relative`` if it exists already (to merge with), else None."""
        path = self.out_dir / relative
        return path if path.is_file() else None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
                self.written = [self.out_dir / r for r in self._relative]
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return False

    def _commit(self):
        files = sorted(p.relative_to(self.root) for p in self.root.rglob("*") if not p.is_dir())
        if not self.out_dir.exists():
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(self.root, self.out_dir)
                return
            except OSError:  # created meanwhile by someone else: merge file by file
                pass
        _check_targets(self.out_dir, files)
        _move_all(self.root, self.out_dir, self._tmp / "replaced", files)


def _make_temporary_folder(out_dir: Path) -> Path:
    """A new folder in out_dir's nearest existing ancestor, on out_dir's filesystem.

    Falls back to a folder inside an existing out_dir when its parent is
    read-only or on another filesystem (out_dir is a mount point).
    """
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    name = f".{out_dir.name or 'out'}.chunkglm-{uuid.uuid4().hex[:12]}"
    if out_dir.exists() and os.stat(out_dir).st_dev != os.stat(parent).st_dev:
        parent = out_dir
    try:
        (parent / name).mkdir()
        return parent / name
    except PermissionError:
        if not out_dir.exists() or parent == out_dir:
            raise
        (out_dir / name).mkdir()
        return out_dir / name


def _check_targets(out_dir: Path, files) -> None:
    """Refuse before moving anything if a file would land on a folder or under a file."""
    for rel in files:
        target = out_dir / rel
        if target.is_dir():
            raise InputError(f"cannot write {target}: a folder of that name exists.")
        for parent in target.parents:
            if parent == out_dir:
                break
            if parent.exists() and not parent.is_dir():
                raise InputError(f"cannot write {target}: {parent} is a file, not a folder.")


def _move_all(source: Path, out_dir: Path, aside: Path, files) -> None:
    """Move every file into out_dir; on failure undo every move, then re-raise."""
    moved, created = [], []
    try:
        for rel in files:
            target = out_dir / rel
            created += _make_parents(target.parent, out_dir)
            saved = None
            if target.exists():
                saved = aside / rel
                saved.parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, saved)
            moved.append((rel, saved))
            os.replace(source / rel, target)
    except BaseException:
        _undo(moved, created, out_dir)
        raise


def _make_parents(folder: Path, out_dir: Path) -> list[Path]:
    """Create ``folder`` and its missing parents below out_dir; return those created."""
    missing = []
    while folder != out_dir and not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _undo(moved, created, out_dir: Path) -> None:
    for rel, saved in reversed(moved):
        target = out_dir / rel
        target.unlink(missing_ok=True)
        if saved is not None:
            os.replace(saved, target)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass
