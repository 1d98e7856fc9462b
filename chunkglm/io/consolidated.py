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

Writers open the store without it (``use_consolidated=False``): they see the
store's own documents, never a listing from before their change.
"""

from __future__ import annotations

import asyncio
import json

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from chunkglm.io import locks

__all__ = ["KEY", "consolidate", "listing", "mend", "merge", "read_root"]

#: The root document's field holding the inlined documents.
KEY = "consolidated_metadata"
#: Concurrent reads of a full consolidation (object stores answer many at once).
_CONCURRENT_READS = 32
#: The store-wide lock every rewrite of the root document holds.
_LOCK = ("store", "metadata")
#: Seconds a writer waits for another one's merge (a merge is one read and one write).
LOCK_WAIT_SECONDS = 120.0


def read_root(zstore) -> dict | None:
    """The root ``zarr.json`` as a dict (one GET), None when absent.

    Raises
    ------
    ValueError
        The document is not JSON (damaged).
    """
    buf = sync(zstore.get("zarr.json", default_buffer_prototype()))
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
    with locks.node_lock(root, *_LOCK, wait=LOCK_WAIT_SECONDS):
        document = read_root(root.store) or {}
        entries = listing(document)
        if entries is None:
            entries = sync(_walk(root.store, ""))
            if listed_as is not None:
                entries[path] = listed_as
        else:
            entries = {k: v for k, v in entries.items() if k != path and not k.startswith(f"{path}/")}
            entries.update({path: listed_as} if listed_as is not None else sync(_walk(root.store, path)))
            parts = path.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent not in entries:
                    entries.update(sync(_walk(root.store, parent, recurse=False)))
        _write_root(root.store, document, entries)


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


async def _walk(zstore, path: str, *, recurse: bool = True) -> dict[str, dict]:
    """Documents of ``path`` and (``recurse``) every node below it, by path (root excluded)."""
    limit = asyncio.Semaphore(_CONCURRENT_READS)
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
