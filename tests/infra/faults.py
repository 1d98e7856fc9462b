"""Fault injection for tests: the process dies (``os._exit(137)``, as after SIGKILL) just before
its k-th write.

A *write point* is every call that changes a file system or an object store:

- files: ``open``/``io.open``/``os.open`` for writing (modes ``w``, ``a``, ``x``, ``+``; flags
  ``O_WRONLY``, ``O_RDWR``, ``O_CREAT``), ``os.replace``, ``os.rename``, ``os.link``,
  ``os.unlink``/``os.remove``, ``os.rmdir`` (so every step of a ``shutil.rmtree`` too);
- zarr stores: ``set``, ``set_if_not_exists`` and ``delete`` of ``LocalStore``,
  ``ObjectStore`` (obstore) and ``FsspecStore`` (a local store's own temporary file and rename
  are further points: a kill between them leaves a ``.partial`` file);
- s3fs: ``_pipe_file``, ``_put_file``, ``_rm_file``, ``_rm``, ``_cp_file``.

Folders made with ``mkdir`` are not points (an empty folder is all a kill there can leave, and
every later write into it is one).

Runs are forked from a server process that imported chunkglm once (multiprocessing's
``forkserver``): a run costs a fork, not an interpreter start and its imports.
:func:`run_command` runs ``chunkglm ARGS`` there, counting its write points (``kill_at=None``)
or dying before the ``kill_at``-th (1-based). The log file gets one line per point,
``kind<TAB>target``, and ``KILLED<TAB>kind<TAB>target`` for the one it died at. When threads
write concurrently (dask tasks, zarr's thread pool) the order of points can differ between
runs: a kill at k is then a kill at one of the k-th points of some interleaving, which is what a
real SIGKILL would hit too; the log says which.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import multiprocessing
import os
import re
import threading
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

#: The exit status of a process killed by the injected fault (128 + SIGKILL, as a shell reports).
KILLED = 137
_PRELOAD = ["chunkglm.cli.commands", "zarr", "zarr.storage", "obstore", "s3fs", "nibabel",
            "dask.array", "distributed", "pandas", "scipy.stats", "sklearn.linear_model"]
_OS_OPEN, _OS_WRITE, _OS_CLOSE = os.open, os.write, os.close
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class _Injector:
    """Counts write points; dies before the ``kill_at``-th one.

    With ``once`` (a file path), only the first process of all that install one dies: it
    creates ``once`` before dying, and a process that finds it there only counts (a restarted
    dask worker must not die again at the same point).
    """

    def __init__(self, kill_at: int | None, log: str, once: str | None = None):
        self.kill_at, self.count, self.lock, self.once = kill_at, 0, threading.Lock(), once
        self._os_open, self._os_write, self._os_close = _OS_OPEN, _OS_WRITE, _OS_CLOSE  # not counted
        self._log = self._os_open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def point(self, kind: str, target) -> None:
        with self.lock:
            self.count += 1
            line = f"{kind}\t{target}\n"
            if self.count == self.kill_at and self._may_die():
                self._os_write(self._log, f"KILLED\t{line}".encode())
                os._exit(KILLED)
            self._os_write(self._log, line.encode())

    def _may_die(self) -> bool:
        if self.once is None:
            return True
        try:
            self._os_close(self._os_open(self.once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        return True


def _writes(mode) -> bool:
    return any(c in str(mode) for c in "wax+")


_INSTALLED: list[_Injector] = []


def install(kill_at: int | None, log: str, once: str | None = None) -> _Injector:
    """Wrap every write function (see the module docstring) of this process.

    Called again in the same process: the write functions stay wrapped once; the count
    starts again from 0 with the new ``kill_at``, ``log`` and ``once``.
    """
    if _INSTALLED:
        injector = _INSTALLED[0]
        with injector.lock:
            injector.__init__(kill_at, log, once)
        return injector
    injector = _Injector(kill_at, log, once)
    _INSTALLED.append(injector)

    def wrap_sync(owner, name, kind, applies=lambda *a, **k: True, target=lambda *a, **k: a[0]):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if applies(*args, **kwargs):
                injector.point(kind, target(*args, **kwargs))
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        return wrapper

    def wrap_async(owner, name, kind):
        original = owner.__dict__.get(name)
        if original is None:  # inherited: wrap the class's own lookup
            original = getattr(owner, name)

        @functools.wraps(original)
        async def wrapper(self, key, *args, **kwargs):
            injector.point(kind, f"{getattr(self, 'root', getattr(self, 'path', ''))}/{key}")
            return await original(self, key, *args, **kwargs)

        setattr(owner, name, wrapper)

    def file_mode(file, mode="r", *args, **kwargs):
        return isinstance(file, (str, bytes, os.PathLike)) and _writes(mode)

    opened = wrap_sync(io, "open", "open", file_mode)
    builtins.open = opened
    wrap_sync(os, "open", "open", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
    for name in ("replace", "rename", "link"):
        wrap_sync(os, name, name, target=lambda src, dst, *a, **k: f"{src} -> {dst}")
    for name in ("unlink", "remove", "rmdir"):
        wrap_sync(os, name, name)

    from zarr.storage import FsspecStore, LocalStore, ObjectStore

    for store in (LocalStore, ObjectStore, FsspecStore):
        for name in ("set", "set_if_not_exists", "delete"):
            if hasattr(store, name):
                wrap_async(store, name, f"{store.__name__}.{name}")
    try:
        from s3fs import S3FileSystem
    except ImportError:
        S3FileSystem = None
    if S3FileSystem is not None:
        for name in ("_pipe_file", "_put_file", "_rm_file", "_rm", "_cp_file"):
            wrap_async(S3FileSystem, name, f"s3fs.{name}")
    return injector


class WorkerFaults(WorkerPlugin):
    """A dask worker plugin: each worker process counts its write points into ``log``; the
    first to reach its ``kill_at``-th write dies there (one worker in all, see ``once``)."""

    name = "chunkglm-faults"

    def __init__(self, kill_at: int | None, log: str, once: str):
        self.kill_at, self.log, self.once = kill_at, log, once

    def setup(self, worker):
        install(self.kill_at, self.log, self.once)


class StageFaults(WorkerPlugin):
    """A dask worker plugin that kills the worker process running the ``kill_at``-th task of a
    named stage: no sleeps, no timing guesses.

    A *stage* is a task-name prefix (dask's ``key_split`` of the key, e.g. ``"moments"``), or
    several joined by ``|``. Tasks are counted over all worker processes of the cluster when
    they reach the state ``when``: ``"executing"`` (the worker dies as the task starts, losing
    it and every result the worker held) or ``"memory"`` (it dies once the task's result is
    held: a computed result lost, which the scheduler recomputes from its inputs). The count is
    shared through files ``<tag>.<n>`` created with ``O_EXCL`` (the n-th task to reach the state
    creates the n-th file), so the k-th task of the stage dies wherever it runs. Only one process
    ever dies (``<tag>.killed`` is created before dying; a restarted worker finds the counts
    past k and only logs).

    ``log`` gets one line per counted task, ``n<TAB>key<TAB>worker pid``, and
    ``KILLED<TAB>n<TAB>key<TAB>pid`` for the one it died at. With ``kill_at=None`` it only logs
    (every task of the graph, all stages, ``stage=None``), to list a command's stages.
    """

    name = "chunkglm-stage-faults"

    def __init__(self, stage: str | None, kill_at: int | None, tag: str, when: str = "executing"):
        if when not in ("executing", "memory"):
            raise ValueError(f"when must be 'executing' or 'memory'; received {when!r}")
        self.stages = None if stage is None else frozenset(stage.split("|"))
        self.kill_at, self.tag, self.when = kill_at, tag, when

    def setup(self, worker):
        self._log = _OS_OPEN(f"{self.tag}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _claim(self) -> int:
        n = 1
        while True:
            try:
                _OS_CLOSE(_OS_OPEN(f"{self.tag}.{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return n
            except FileExistsError:
                n += 1

    def transition(self, key, start, finish, **kwargs):
        if finish != self.when or (finish == "memory" and start not in ("executing", "long-running")):
            return  # a result fetched from another worker or scattered here: no task ran
        from dask.utils import key_split

        stage = key_split(key)
        if self.stages is not None and stage not in self.stages:
            return
        n = self._claim()
        line = f"{n}\t{stage}\t{key}\t{os.getpid()}\n"
        if n == self.kill_at:
            try:
                _OS_CLOSE(_OS_OPEN(f"{self.tag}.killed", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                pass
            else:
                _OS_WRITE(self._log, f"KILLED\t{line}".encode())
                os._exit(KILLED)
        _OS_WRITE(self._log, line.encode())


def _child(argv: list[str], env: dict[str, str], cwd: str, kill_at: int | None, log: str,
           output: str) -> None:
    """Run ``chunkglm argv`` in this forked process and exit with its status."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import sys

    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    from chunkglm.cli.commands import main

    install(kill_at, log)
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


class Run:
    """One finished run: its exit status, its log of write points and what it printed."""

    def __init__(self, code: int, log: Path, output: Path):
        self.code = code
        self.points = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
        self.output = output.read_text(errors="replace") if output.exists() else ""

    @property
    def killed_at(self) -> str:
        return next(("\t".join(p[1:]) for p in self.points if p[0] == "KILLED"), "")

    @property
    def kinds(self) -> set[str]:
        return {p[0] for p in self.points if p[0] != "KILLED"}


def start_command(argv, work: Path, *, kill_at: int | None = None, env=None, cwd=None):
    """Start ``chunkglm argv`` in a forked process; return (process, log path, output path)."""
    work.mkdir(parents=True, exist_ok=True)
    tag = "count" if kill_at is None else f"kill-{kill_at}"
    log, output = work / f"{tag}.points", work / f"{tag}.out"
    for path in (log, output):
        path.unlink(missing_ok=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = _context().Process(target=_child, args=([str(a) for a in argv], environment,
                                                      str(cwd or os.getcwd()), kill_at, str(log),
                                                      str(output)))
    process.start()
    return process, log, output


def run_command(argv, work: Path, *, kill_at: int | None = None, env=None, cwd=None,
                timeout: float = 300.0) -> Run:
    """Run ``chunkglm argv`` (see :func:`start_command`) and wait for it."""
    process, log, output = start_command(argv, work, kill_at=kill_at, env=env, cwd=cwd)
    return _finish(process, log, output, timeout)


def _finish(process, log, output, timeout) -> Run:
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"the run did not end within {timeout} s; its output: {output}")
    return Run(process.exitcode, log, output)


def run_many(jobs, *, parallel: int = 2, timeout: float = 300.0) -> list[Run]:
    """Run ``(argv, work, kill_at, env)`` jobs, ``parallel`` at a time; results in job order."""
    results: list[Run | None] = [None] * len(jobs)
    running: list[tuple[int, tuple]] = []
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < parallel:
            index, (argv, work, kill_at, env) = pending.pop(0)
            running.append((index, start_command(argv, work, kill_at=kill_at, env=env)))
        index, started = running.pop(0)
        results[index] = _finish(*started, timeout)
    return results


def strided(count: int, limit: int) -> list[int]:
    """Every k in 1..count when count <= limit; else ``limit`` evenly spaced k (first and last
    included): the same list on every machine for the same count."""
    if count <= limit:
        return list(range(1, count + 1))
    step = (count - 1) / (limit - 1)
    return sorted({1 + round(i * step) for i in range(limit)})


# -- comparing outputs -------------------------------------------------------------------
# What two runs of one command into two places must share: every file byte for byte, except
# the times JSON documents record, the output's own path, and the names of provenance records
# and version folders (see tests/test_fault_matrix.py).

#: JSON keys whose values are times or durations of the run that wrote them.
VOLATILE = {"created", "written", "started", "wall_time_s", "time", "version", "superseded"}
_VERSION = re.compile(r"v-[0-9]+")
_IN_VERSION = re.compile(r"(^|/)v-[0-9]+(/|$)")
_RECORD = re.compile(r"(^|/)_provenance/[^/]+/")


def _strip(value):
    if isinstance(value, dict):  # a consolidated listing names the records: compared below
        out = {k: _strip(v) for k, v in value.items()  # and its version folders' documents
               if k not in VOLATILE and not _RECORD.search(f"{k}/") and not _IN_VERSION.search(k)}
        if "subjects_computed" in out and "subjects_skipped" in out:  # by this run / before it
            out["subjects"] = sorted(out.pop("subjects_computed") + out.pop("subjects_skipped"))
        return out
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def normalised(files: dict[str, bytes], root: str) -> dict[str, object]:
    """name -> content, comparable between runs into different output folders.

    A store's provenance records (one per conversion that wrote nodes) become one entry: the
    union of the inputs they name and their other content, each distinct once.
    """
    out: dict[str, object] = {}
    inputs, records = set(), []
    files = _as_read(files)
    for name, data in files.items():
        if name.endswith(".json"):
            content = _strip(json.loads(data.decode().replace(root.rstrip("/"), "<OUT>")))
        else:
            content = data
        if _RECORD.search(name):
            record = content.get("attributes", {}).get("chunkglm", {})
            inputs |= {json.dumps(entry, sort_keys=True) for entry in record.pop("inputs", [])}
            if content not in records:
                records.append(content)
            continue
        out[name] = content
    if records:
        out["_provenance records"] = {"inputs": sorted(inputs), "records": records}
    return out


def _as_read(files: dict[str, bytes]) -> dict[str, bytes]:
    """A store's files as readers see them: a node switched to a version folder (a replacement,
    e.g. meta's table re-converted by a re-run) shows that version's files under the node's
    name; the versions it replaced (kept an hour for open readers) are left out."""
    current = {}
    for name, data in files.items():
        if name.endswith("zarr.json"):
            meta = json.loads(data).get("attributes", {}).get("chunkglm", {})
            if isinstance(meta, dict) and _VERSION.fullmatch(str(meta.get("version", ""))):
                current[name[: -len("zarr.json")]] = meta["version"]
    if not current:
        return files
    out = {}
    for name, data in files.items():
        node = next((n for n in current if name.startswith(n) and name != f"{n}zarr.json"), None)
        if node is None:
            out[name] = data
        elif name.startswith(f"{node}{current[node]}/"):
            rest = name[len(node) + len(current[node]) + 1:]
            if rest != "zarr.json":  # the version group's own document: the node's is compared
                out[node + rest] = data
    return out


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def differences(got: dict, want: dict) -> list[str]:
    lines = [f"missing: {n}" for n in sorted(set(want) - set(got))]
    lines += [f"extra: {n}" for n in sorted(set(got) - set(want))]
    lines += [f"differs: {n}" for n in sorted(set(got) & set(want)) if got[n] != want[n]]
    return lines


__all__ = ["KILLED", "Run", "StageFaults", "WorkerFaults", "differences", "install", "local_files", "normalised", "run_command",
           "run_many", "start_command", "strided"]
