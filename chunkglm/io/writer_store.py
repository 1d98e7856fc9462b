"""The store as a writer sees it: the root ``zarr.json`` without its consolidated listing.

The root document of a cohort store inlines every node's documents
(:mod:`chunkglm.io.consolidated`): ~7 kB per run, megabytes for a store of
hundreds of runs. A writer never uses that listing (it reads the store's own
documents, never a listing from before its change), yet zarr reads the root
document whole at every open and at every array or group it creates (its
check that no parent of the new node is an array), and parses it each time:
a conversion task read it about twelve times, so its cost grew with the
store (0.15-0.2 s per task at 570 runs).

:class:`WriterStore` wraps any zarr store (local, S3, in memory) and answers a
plain read of the root document with the root's own fields only (attributes,
``zarr_format``, ``node_type``), read as one bounded byte range
(:data:`HEAD_BYTES`) when the document is larger: the listing is the last field
of every root chunkglm writes, so the fields before it are a prefix of the
document. Anything else (a root written by another tool in another order, a
root whose own attributes exceed the range) is read whole, as before. Every
other key, every ranged read and every write go to the wrapped store
unchanged. Code that needs the listing itself (the merges of
:mod:`chunkglm.io.consolidated`) reads the root through :func:`inner`.
"""

from __future__ import annotations

import json
import re

from zarr.abc.store import RangeByteRequest
from zarr.storage import WrapperStore

__all__ = ["HEAD_BYTES", "ROOT", "WriterStore", "inner", "root_head"]

#: The root document's key.
ROOT = "zarr.json"
#: Bytes read from the start of a large root document for its own fields (a root's
#: attributes are a few hundred bytes; stores of older chunkglm versions kept their
#: provenance in them and are read whole when it does not fit).
HEAD_BYTES = 64 * 1024
#: Where the listing starts in a root document: a key of the top-level object (compact or not).
_LISTING = re.compile(rb',\s*"consolidated_metadata"\s*:')


class WriterStore(WrapperStore):
    """A zarr store whose root document reads without its consolidated listing.

    Parameters
    ----------
    store : zarr.abc.store.Store
        The store written to (its reads of the root document are bounded:
        :data:`HEAD_BYTES` at most unless the root's own fields are larger).
    """

    def __str__(self) -> str:
        return str(self._store)

    def __repr__(self) -> str:
        return f"WriterStore({self._store!r})"

    async def get(self, key, prototype, byte_range=None):
        if key != ROOT or byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        head = await root_head(self._store, prototype)
        return None if head is None else prototype.buffer.from_bytes(head)

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:  # through get: the root document is this store's
            yield key, await self.get(key, prototype, byte_range)


def inner(store):
    """The store a :class:`WriterStore` wraps (any other store as it is)."""
    return store._store if isinstance(store, WriterStore) else store


async def root_head(store, prototype) -> bytes | None:
    """The root document of ``store`` without its listing, as JSON bytes (None when absent).

    Reads the first :data:`HEAD_BYTES`; when the document is longer, its fields
    before the listing are parsed alone. A document that is not JSON is
    returned as read (zarr reports it as damaged, as it would the whole one).
    """
    buf = await store.get(ROOT, prototype, RangeByteRequest(0, HEAD_BYTES))
    if buf is None:
        return None
    data = buf.to_bytes()
    if len(data) >= HEAD_BYTES:
        document = _fields_before_listing(data)
        if document is None:  # not the layout chunkglm writes: read it whole
            buf = await store.get(ROOT, prototype)
            if buf is None:
                return None
            data = buf.to_bytes()
        else:
            return json.dumps(document, separators=(",", ":"), allow_nan=True).encode()
    try:
        document = json.loads(data)
    except ValueError:
        return data
    if isinstance(document, dict):
        document.pop("consolidated_metadata", None)
    return json.dumps(document, separators=(",", ":"), allow_nan=True).encode()


def _fields_before_listing(data: bytes) -> dict | None:
    """The top-level fields before the listing in a cut-off root document, or None when the
    cut-off part does not hold all of a group's own fields."""
    found = _LISTING.search(data)
    if found is None:
        return None
    try:  # a match nested inside the attributes leaves braces open: not JSON, read whole
        document = json.loads(data[:found.start()] + b"}")
    except ValueError:
        return None
    if not isinstance(document, dict) or "node_type" not in document or "zarr_format" not in document:
        return None
    return document
