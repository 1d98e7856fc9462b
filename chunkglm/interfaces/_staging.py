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

``out_dir`` may also be an object-store URL (``s3://bucket/derivatives``):
files are staged in a local temporary folder and, when the block ends
without error, uploaded (with retries, see :mod:`chunkglm.io.storage`).
Object stores have no atomic rename, so completeness is carried by a
``marker``: a relative path that is deleted first and written last, once
every other file is uploaded. A set whose marker is missing is incomplete
(:func:`output_complete`); re-running rewrites it. The marker works the same
on local folders (moved in last; an old marker is set aside first).

Relative paths can never leave ``out_dir``: absolute paths, ``..`` and
backslashes are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

from chunkglm._version import __version__
from chunkglm.errors import InputError
from chunkglm.io.store import is_url, redact_url


class StagedOutput:
    """Context manager: ``with StagedOutput(out_dir) as out: out.path("a/b.json")``.

    Parameters
    ----------
    out_dir : str or Path
        Final folder (created, with its parents, only at commit), or an
        object-store URL such as ``s3://bucket/derivatives``.
    marker : str, optional
        Relative path of a completion marker, written last. Write it like any
        other file (``out.path(marker)``) or leave it to StagedOutput, which
        then writes a small JSON record (files, time, chunkglm version).
    storage_options : dict or chunkglm.io.storage.StorageSettings, optional
        For URL out dirs; credentials otherwise come from the environment or
        the standard AWS chain.

    Attributes
    ----------
    out_dir : Path or str
        The resolved final folder (a str for URLs).
    written : list of Path or str
        After a successful ``with`` block: the final paths (URLs for an
        object-store out_dir), in the order they were requested.
    """

    def __init__(self, out_dir, *, marker: str | None = None, storage_options=None):
        self.remote = is_url(str(out_dir))
        self.out_dir = str(out_dir).rstrip("/") if self.remote else Path(out_dir).expanduser().resolve()
        self.marker = None if marker is None else check_relative(marker)
        self.storage_options = storage_options
        self.written: list = []
        self._relative: list[str] = []
        self._tmp: Path | None = None

    def __enter__(self):
        if self.remote:
            self._tmp = Path(tempfile.mkdtemp(prefix="chunkglm-upload-"))
        else:
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
        relative = check_relative(relative)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative not in self._relative:
            self._relative.append(relative)
        return target

    def existing(self, relative: str) -> Path | None:
        """``out_dir/relative`` if it exists already (to merge with), else None.

        For a URL out_dir the file is downloaded into the staging folder.
        """
        relative = check_relative(relative)
        if self.remote:
            return _download(self._store(), relative, self._tmp / "existing" / relative)
        path = self.out_dir / relative
        return path if path.is_file() else None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._write_marker()
                if self.remote:
                    _upload_all(self._store(), self.root, self._staged_files(), self.marker)
                    self.written = [f"{redact_url(self.out_dir)}/{r}" for r in self._relative]
                else:
                    self._commit()
                    self.written = [self.out_dir / r for r in self._relative]
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return False

    def _store(self):
        from chunkglm.io.storage import open_store

        return open_store(self.out_dir, self.storage_options)

    def _staged_files(self) -> list[str]:
        """Every staged file, relative, marker last."""
        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if not p.is_dir())
        if self.marker in files:
            files.remove(self.marker)
            files.append(self.marker)
        return files

    def _write_marker(self):
        if self.marker is None or (self.root / self.marker).is_file():
            return
        record = {"complete": True, "files": [r for r in self._relative if r != self.marker],
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "chunkglm_version": __version__}
        self.path(self.marker).write_text(json.dumps(record, indent=2))

    def _commit(self):
        files = [Path(f) for f in self._staged_files()]
        if not self.out_dir.exists():
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(self.root, self.out_dir)
                return
            except OSError:  # created meanwhile by someone else: merge file by file
                pass
        _check_targets(self.out_dir, files)
        _move_all(self.root, self.out_dir, self._tmp / "replaced", files, self.marker)


def check_relative(relative) -> str:
    """A relative POSIX path that stays inside out_dir, or InputError."""
    text = str(relative)
    parts = PurePosixPath(text).parts
    if (not text.strip() or not parts or "\\" in text or text.startswith("/") or ":" in parts[0]
            or ".." in parts):
        raise InputError(f"{text!r} cannot name a file inside the output folder: use a relative "
                         "path without '..', '.', backslashes or a leading '/'.")
    return PurePosixPath(text).as_posix()


def output_complete(out_dir, marker: str, storage_options=None) -> bool:
    """True when ``out_dir/marker`` exists (local folder or object-store URL)."""
    marker = check_relative(marker)
    if not is_url(str(out_dir)):
        return (Path(out_dir).expanduser() / marker).is_file()
    from chunkglm.io.storage import open_store, sync

    return sync(open_store(str(out_dir).rstrip("/"), storage_options, read_only=True).exists(marker))


def _download(store, relative: str, target: Path) -> Path | None:
    from zarr.core.buffer import default_buffer_prototype

    from chunkglm.io.storage import sync

    data = sync(store.get(relative, default_buffer_prototype()))
    if data is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.to_bytes())
    return target


def _upload_all(store, root: Path, files: list[str], marker: str | None, in_flight: int = 8) -> None:
    """Delete the old marker, upload every file (``in_flight`` at a time), then the marker."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    from chunkglm.io.storage import sync

    buffer = default_buffer_prototype().buffer
    body = [f for f in files if f != marker]

    async def upload(relative, gate):
        async with gate:
            await store.set(relative, buffer.from_bytes((root / relative).read_bytes()))

    async def run():
        if marker is not None and await store.exists(marker):
            await store.delete(marker)
        gate = asyncio.Semaphore(in_flight)
        await asyncio.gather(*(upload(f, gate) for f in body))
        if marker is not None:
            await upload(marker, gate)

    sync(run())


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


def _move_all(source: Path, out_dir: Path, aside: Path, files, marker=None) -> None:
    """Move every file into out_dir; on failure undo every move, then re-raise.

    An existing ``marker`` is set aside before anything else moves (the
    marker itself comes last in ``files``), so a set cut off half-way never
    carries a marker.
    """
    moved, created = [], []
    try:
        if marker is not None and (out_dir / marker).is_file():
            (aside / marker).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out_dir / marker, aside / marker)
            moved.append((Path(marker), aside / marker))
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
