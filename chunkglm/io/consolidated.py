"""Consolidated metadata: every node's ``zarr.json`` inlined in the root's, read in one request.

The root ``zarr.json`` of a cohort store carries zarr v3's inline consolidated
metadata (``consolidated_metadata``: ``{"kind": "inline", "must_understand":
false, "metadata": {path: document}}``, the form ``zarr.consolidate_metadata``
writes and zarr-python, xarray and ``xarray.open_datatree`` read). Listing a
store of thousands of runs is then one GET; without it, one per node.

How it stays correct when several conversions write one store at once: every
change of a node (completion, version switch, removal of a superseded
version, a provenance record) *merges* that node's documents into the root's
under the store's metadata lock (``_locks/store--metadata``,
:mod:`chunkglm.io.locks`): read the root document, replace the entries under
the node's path with what the store holds now, write the root document (one
atomic write: a rename on local disk, one PUT on S3). Each merge reads the
root after taking the lock, so no conversion loses another's entries. A root
without consolidated metadata (a store written before, or a root rewritten
by another tool) is consolidated in full at the next merge. The lock files
(``_locks/``) are never consolidated: they are not data.

Batched merges (a conversion's nodes, :class:`Batch`): rewriting the root at
each node's start and completion costs two rewrites of a document that grows
with the store (~7 kB per run) per run. A conversion instead lists every node
it is about to create incomplete in one merge *before* its tasks start
(:func:`merge_many` with ``listed_as``), the tasks merge nothing of their new
nodes, and the client merges the nodes whose tasks ended in batches (one root
rewrite per :data:`BATCH_COUNT` nodes or :data:`BATCH_SECONDS` seconds,
whichever comes first, and once more before ``convert`` returns). Between a
node's completion and its batch's merge the listing says the node is
incomplete: chunkglm's readers (``open_cohort``) read the marker of every
node listed incomplete from the store, so they see it complete; readers that
trust the listing alone (``xarray.open_datatree``) see the node marked
incomplete (its attributes as listed: ``{"chunkglm": {"complete": false}}``),
i.e. not yet usable, never a node complete that the store does not hold. A conversion killed before its batch's merge leaves those entries
incomplete; the next ``convert`` of the same inputs mends them (:func:`mend`),
and ``chunkglm verify`` reports them (:func:`stale`; ``--repair`` mends them). A replaced
node (a version switch) is still merged at once, at its switch.

Writers open the store without it (:class:`chunkglm.io.writer_store.WriterStore`:
the root's own fields, read as one bounded byte range): they see the store's
own documents, never a listing from before their change, and their opens (and
zarr's checks of a new array's parents) do not read more as the store grows.
The merges here read the whole root document, listing included.
"""

from __future__ import annotations

import asyncio
import json
import time

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from chunkglm.io import locks
from chunkglm.io.writer_store import inner

__all__ = ["KEY", "Batch", "consolidate", "listing", "mend", "merge", "merge_many", "read_root", "stale"]

#: The root document's field holding the inlined documents.
KEY = "consolidated_metadata"
#: Concurrent reads of a full consolidation (object stores answer many at once).
_CONCURRENT_READS = 32
#: The store-wide lock every rewrite of the root document holds.
_LOCK = ("store", "metadata")
#: Seconds a writer waits for another one's merge (a merge is one read and one write).
LOCK_WAIT_SECONDS = 120.0
#: Nodes merged together by a :class:`Batch` (one root rewrite each).
BATCH_COUNT = 100
#: Seconds a node ended may wait in a :class:`Batch` before its merge.
BATCH_SECONDS = 10.0


def read_root(zstore) -> dict | None:
    """The root ``zarr.json`` as a dict (one GET), None when absent.

    Raises
    ------
    ValueError
        The document is not JSON (damaged).
    """
    buf = sync(inner(zstore).get("zarr.json", default_buffer_prototype()))  # the listing too
    return None if buf is None else json.loads(buf.to_bytes())


def listing(document: dict) -> dict[str, dict] | None:
    """The inlined documents of a root ``document`` by path, or None when it has none."""
    found = document.get(KEY)
    if not isinstance(found, dict) or found.get("kind") != "inline":
        return None
    return dict(found.get("metadata") or {})


def merge(root, path: str, listed_as: dict | None = None) -> None:
    """Bring the root's consolidated entries for ``path`` (and everything under it) up to date.

    ``path`` is a node (``runs/<name>``), a provenance record or any group of
    the store; where it no longer exists, its entries are removed. Parents
    missing from the listing are added. ``listed_as``: list ``path`` with this
    document instead of reading it (a node about to be created, listed
    incomplete *before* it exists: a writer cut off in between leaves a
    listing that reports too much incomplete, never a node it does not show).
    Holds the store's metadata lock.
    """
    merge_many(root, [path], listed_as)


def merge_many(root, paths, listed_as: dict | None = None) -> None:
    """:func:`merge` of every path of ``paths`` in one rewrite of the root (nothing when empty).

    Holds the store's metadata lock while it reads the root, the documents of
    ``paths`` (concurrently) and writes the root once.
    """
    paths = list(dict.fromkeys(paths))
    if not paths:
        return
    with locks.node_lock(root, *_LOCK, wait=LOCK_WAIT_SECONDS):
        document = read_root(root.store) or {}
        entries = listing(document)
        if entries is None:
            entries = sync(_walk(root.store, ""))
            if listed_as is not None:
                entries.update({path: listed_as for path in paths})
        else:
            entries = _without(entries, paths)
            if listed_as is not None:
                entries.update({path: listed_as for path in paths})
            else:
                entries.update(sync(_walk_many(root.store, paths)))
            parents = {"/".join(p.split("/")[:depth]) for p in paths for depth in range(1, p.count("/") + 1)}
            missing = sorted(p for p in parents if p not in entries)
            if missing:
                entries.update(sync(_documents(root.store, missing)))
        _write_root(root.store, document, entries)


def _without(entries: dict, paths) -> dict:
    """``entries`` less those of ``paths`` and everything under them."""
    gone = set(paths)
    return {k: v for k, v in entries.items() if not any(p in gone for p in _prefixes(k))}


def _prefixes(key: str):
    parts = key.split("/")
    return ("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))


async def _walk_many(zstore, paths: list[str]) -> dict[str, dict]:
    """:func:`_walk` of each path, their reads sharing one bound on concurrent requests."""
    limit = asyncio.Semaphore(_CONCURRENT_READS)
    found: dict[str, dict] = {}
    for part in await asyncio.gather(*(_walk(zstore, p, limit=limit) for p in paths)):
        found.update(part)
    return found


class Batch:
    """Merges of many nodes into the root's listing, one rewrite for many nodes.

    The client driving a conversion adds (:meth:`add`) each node whose task ended
    (completed, failed or switched); the pending nodes are merged
    (:func:`merge_many`) once :data:`BATCH_COUNT` are pending or the oldest
    has waited :data:`BATCH_SECONDS`, and by :meth:`flush` at the end. The
    nodes must have been listed incomplete before their tasks started (see the
    module docstring): until their merge, readers see them incomplete.

    Parameters
    ----------
    root : zarr.Group
        The store's root, opened for writing.
    count : int, optional
        Pending nodes that trigger a merge (default :data:`BATCH_COUNT`).
    seconds : float, optional
        Seconds the oldest pending node may wait (default :data:`BATCH_SECONDS`).
    clock : callable
        Monotonic seconds (tests give their own).
    """

    def __init__(self, root, count: int | None = None, seconds: float | None = None, clock=time.monotonic):
        self.root = root
        self.count = max(1, int(BATCH_COUNT if count is None else count))
        self.seconds = float(BATCH_SECONDS if seconds is None else seconds)
        self.clock = clock
        self.pending: list[str] = []
        self.since: float | None = None
        self.merges = 0

    def add(self, path: str) -> None:
        """Queue ``path`` for the next merge; merge now when the batch is full or due."""
        if not self.pending:
            self.since = self.clock()
        self.pending.append(path)
        if len(self.pending) >= self.count or self.seconds_left() == 0.0:
            self.flush()

    def seconds_left(self) -> float | None:
        """Seconds until the pending nodes are due (0 when due), None when none is pending."""
        if not self.pending:
            return None
        return max(0.0, self.seconds - (self.clock() - self.since))

    def flush_if_due(self) -> None:
        """Merge the pending nodes when the oldest has waited long enough."""
        if self.seconds_left() == 0.0:
            self.flush()

    def flush(self) -> None:
        """Merge every pending node now (one rewrite of the root; none when nothing is pending)."""
        if self.pending:
            merge_many(self.root, self.pending)
            self.merges += 1
        self.pending, self.since = [], None


def mend(root, paths) -> list[str]:
    """List again the nodes of ``paths`` whose document differs from the listed one; return them.

    For a conversion's nodes at its end: one that a process cut off between its
    completion (or version switch) and its merge left out of date is mended by
    running the same command again. Reads the root and each node's document;
    writes the root only when something differed. Holds the store's metadata lock.
    """
    with locks.node_lock(root, *_LOCK, wait=LOCK_WAIT_SECONDS):
        document = read_root(root.store) or {}
        entries = listing(document)
        if entries is None:
            entries = sync(_walk(root.store, ""))
            _write_root(root.store, document, entries)
            return sorted(paths)
        entries, mended = _mended(root.store, entries, paths)
        if mended:
            _write_root(root.store, document, entries)
    return mended


def stale(root, paths) -> list[str] | None:
    """The paths of ``paths`` whose listed documents differ from the store's: what :func:`mend`
    would list again (read only, no lock). None when the root has no listing at all."""
    entries = listing(read_root(root.store) or {})
    if entries is None:
        return None
    return _mended(root.store, entries, list(paths))[1]


def _mended(zstore, entries: dict, paths) -> tuple[dict, list[str]]:
    current = sync(_documents(zstore, list(paths)))
    mended = sorted(p for p in paths if current.get(p) != entries.get(p) or _unlisted_children(zstore, entries, p))
    for node in mended:
        entries = {k: v for k, v in entries.items() if k != node and not k.startswith(f"{node}/")}
        entries.update(sync(_walk(zstore, node)))
    return entries, mended


#: Groups whose children are added without changing the group's own document (one provenance
#: record per command): a child missing from the listing is looked for by name.
_APPEND_ONLY = ("_provenance",)


def _unlisted_children(zstore, entries: dict, path: str) -> bool:
    if path not in _APPEND_ONLY:
        return False

    async def children():
        try:
            return {key async for key in zstore.list_dir(path) if key != "zarr.json"}
        except (FileNotFoundError, OSError):
            return set()

    listed = {key[len(path) + 1:].split("/")[0] for key in entries if key.startswith(f"{path}/")}
    return bool(sync(children()) - listed)


async def _documents(zstore, paths: list[str]) -> dict[str, dict]:
    """The documents of ``paths`` themselves (no descendants), read concurrently."""
    limit = asyncio.Semaphore(_CONCURRENT_READS)

    async def one(path):
        async with limit:
            return await _walk(zstore, path, recurse=False)

    found: dict[str, dict] = {}
    for part in await asyncio.gather(*(one(p) for p in paths)):
        found.update(part)
    return found


def consolidate(root) -> int:
    """Consolidate the whole store anew (every node's documents read); return the entries.

    Used where the listing may lack nodes: a conversion cut off between a
    node's completion and its merge, a store written before consolidated
    metadata. Holds the store's metadata lock.
    """
    with locks.node_lock(root, *_LOCK, wait=LOCK_WAIT_SECONDS):
        document = read_root(root.store) or {}
        entries = sync(_walk(root.store, ""))
        _write_root(root.store, document, entries)
    return len(entries)


def _write_root(zstore, document: dict, entries: dict) -> None:
    document = {k: v for k, v in document.items() if k != KEY}
    document.setdefault("zarr_format", 3)
    document.setdefault("node_type", "group")
    document[KEY] = {"kind": "inline", "must_understand": False,
                     "metadata": {k: entries[k] for k in sorted(entries)}}
    # compact: the document grows with the store (~6 kB per run), and is read at every open
    data = json.dumps(document, separators=(",", ":"), allow_nan=True).encode()
    sync(zstore.set("zarr.json", default_buffer_prototype().buffer.from_bytes(data)))


async def _walk(zstore, path: str, *, recurse: bool = True, limit=None) -> dict[str, dict]:
    """Documents of ``path`` and (``recurse``) every node below it, by path (root excluded)."""
    limit = limit or asyncio.Semaphore(_CONCURRENT_READS)
    found: dict[str, dict] = {}

    async def visit(node: str) -> None:
        async with limit:
            key = f"{node}/zarr.json" if node else "zarr.json"
            buf = await zstore.get(key, default_buffer_prototype())
            if buf is None:
                return  # a folder without a document (a removed node's leftovers)
            try:
                document = json.loads(buf.to_bytes())
            except ValueError:
                return  # a document cut off mid-write is not listed (verify reports it)
            if node:
                found[node] = {k: v for k, v in document.items() if k != KEY}
            if not recurse or document.get("node_type") != "group":
                return
            children = [name async for name in zstore.list_dir(node)]
        await asyncio.gather(*(visit(f"{node}/{name}" if node else name) for name in children
                               if name != "zarr.json" and not _skipped(node, name)))

    await visit(path)
    return found


def _skipped(parent: str, name: str) -> bool:
    """Lock objects and zarr's temporary files are never listed."""
    return (not parent and name == locks.LOCKS) or name.endswith(".partial")
