"""Chunk integrity: a crc32c per chunk, a chunk inventory per node, checked reads.

Every array chunkglm writes ends its codec pipeline with zarr's ``crc32c``
codec (the checksum of the compressed bytes, recorded in the array's
``zarr.json``, so plain zarr readers check it too) and writes every chunk,
even one equal to the fill value (``write_empty_chunks``). A node's
completion marker lists its arrays with the number of stored objects
(chunks, or shards) and whether they carry a checksum: the *inventory*.

Reads of a node with an inventory go through :class:`CheckedStore`, which
costs no request of its own: a chunk that the store does not have (``get``
answers None, which zarr would turn into the fill value) and a chunk whose
checksum does not match raise :class:`~chunkglm.errors.StoreError` naming
the node and the chunk. Nodes written before inventories existed read as
before (zarr still checks their checksums when they have one).
"""

from __future__ import annotations

import json
import math

import numpy as np
from dask.base import tokenize
from zarr.codecs import Crc32cCodec
from zarr.storage import WrapperStore

from chunkglm.errors import StoreError

#: Sharding's "no chunk here" index entry.
_EMPTY = 2**64 - 1
REMEDY = ("the store is damaged: run `chunkglm verify STORE --repair` to re-convert it from its "
          "unchanged sources (or convert the inputs again with --overwrite)")


def crc32c(data) -> bytes:
    """crc32c of ``data`` as zarr's codec stores it (4 bytes, little endian)."""
    import google_crc32c

    return np.uint32(google_crc32c.value(bytes(data))).tobytes()


def ends_with_crc(data) -> bool:
    """True when the last 4 bytes are the crc32c of the others."""
    data = memoryview(data)
    return len(data) >= 4 and crc32c(data[:-4]) == bytes(data[-4:])


def shard_problems(data, n_inner: int) -> list[str]:
    """Checksum problems of a whole shard written with crc32c (index and inner chunks)."""
    data = memoryview(data)
    index_bytes = 16 * n_inner + 4
    if len(data) < index_bytes or not ends_with_crc(data[-index_bytes:]):
        return ["shard index fails its crc32c checksum"]
    index = np.frombuffer(data[-index_bytes:-4], dtype="<u8").reshape(n_inner, 2)
    bad = [i for i, (offset, size) in enumerate(index)
           if offset != _EMPTY and not ends_with_crc(data[int(offset):int(offset + size)])]
    return [f"inner chunk {i} fails its crc32c checksum" for i in bad]


def has_crc(array) -> bool:
    """True when the array's chunks carry a crc32c (inner chunks for shards)."""
    return any(isinstance(codec, Crc32cCodec) for codec in array.compressors)


def array_inventory(array) -> dict:
    """What was written of one array: stored objects, checksum, chunks per shard."""
    grid = array.shards or array.chunks
    objects = math.prod(math.ceil(n / c) for n, c in zip(array.shape, grid))
    inner = math.prod(s // c for s, c in zip(array.shards, array.chunks)) if array.shards else 0
    return {"objects": int(objects), "crc32c": has_crc(array), "inner": int(inner)}


def node_inventory(group) -> dict:
    """Inventory of every array of a node group (read from their metadata)."""
    return {name: array_inventory(array) for name, array in sorted(group.arrays())}


def chunk_keys(array) -> list[str]:
    """Every key a fully written array has, in its own prefix (``c/0/3`` ...)."""
    grid = array.shards or array.chunks
    counts = [math.ceil(n / c) for n, c in zip(array.shape, grid)]
    return [array.metadata.encode_chunk_key(index) for index in np.ndindex(*counts)]


def missing_message(node: str, key: str, objects: int) -> str:
    """One line for a chunk the completion marker says was written."""
    return (f"{node}: chunk {key} is missing from the store (its completion marker records "
            f"{objects} stored chunk(s) of this array); {REMEDY}.")


def corrupt_message(node: str, key: str, detail: str = "fails its crc32c checksum") -> str:
    """One line for a chunk whose bytes changed after they were written."""
    return f"{node}: chunk {key} {detail} (its bytes changed after writing); {REMEDY}."


def replaced_message(path: str) -> str:
    """One line for a read of a version that a replacement superseded and that was removed since."""
    node = "/".join(path.split("/")[:2])
    return (f"{node} was replaced by a newer conversion while this read used its previous version "
            f"({path}), which has been removed since (replaced versions stay readable for "
            "CHUNKGLM_KEEP_REPLACED_SECONDS, default 3600 s, after the switch). Open the store "
            "again to read the current version.")


class CheckedStore(WrapperStore):
    """A read-only view of one node that refuses missing and corrupt chunks.

    Parameters
    ----------
    store : zarr Store
        The cohort's store.
    node : str
        The node's path, e.g. ``runs/sub-01_task-main_run-1``.
    arrays : dict
        The node's inventory (array name -> ``objects``/``crc32c``/``inner``).
    """

    def __init__(self, store, node: str, arrays: dict):
        super().__init__(store)
        self.node = node
        self.arrays = dict(arrays)

    def __dask_tokenize__(self):
        return ("chunkglm-checked", tokenize(self._store), self.node,
                json.dumps(self.arrays, sort_keys=True))

    def __getstate__(self):
        return {"_store": self._store, "node": self.node, "arrays": self.arrays}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __eq__(self, other):
        return (isinstance(other, CheckedStore) and self._store == other._store
                and self.node == other.node and self.arrays == other.arrays)

    def __hash__(self):
        return hash((self.node, json.dumps(self.arrays, sort_keys=True)))

    def _chunk(self, key: str):
        """(array name, chunk key) when ``key`` is a chunk of an inventoried array."""
        prefix = f"{self.node}/"
        if not key.startswith(prefix):
            return None
        name, sep, chunk = key[len(prefix):].partition("/c/")
        if not sep or name not in self.arrays:
            return None
        return name, f"{name}/c/{chunk}"

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        found = self._chunk(key)
        if found is not None:
            if buf is None and await self._replaced(prototype):
                raise StoreError(replaced_message(self.node))
            self.check(found[0], found[1], buf, whole=byte_range is None)
        return buf

    async def _replaced(self, prototype) -> bool:
        """True when the node's current version is no longer the one this view reads
        (a replacement switched in, and the old version was removed after its grace time)."""
        node = "/".join(self.node.split("/")[:2])
        buf = await self._store.get(f"{node}/zarr.json", prototype)
        try:
            meta = json.loads(buf.to_bytes())["attributes"]["chunkglm"]
        except (AttributeError, ValueError, KeyError, TypeError):
            return False
        version = meta.get("version")
        return (f"{node}/{version}" if version else node) != self.node

    def check(self, name: str, key: str, buf, *, whole: bool = True) -> None:
        """Raise StoreError when ``buf`` (one object of array ``name``) is missing or corrupt."""
        check_object(self.node, key, self.arrays[name], buf, whole=whole)


def check_object(node: str, key: str, entry: dict, buf, *, whole: bool = True) -> None:
    """Raise StoreError when ``buf``, the stored object ``key`` of a node's array
    with inventory ``entry``, is missing (None) or fails its checksum."""
    if buf is None:
        raise StoreError(missing_message(node, key, entry["objects"]))
    if not entry.get("crc32c"):
        return
    data = buf.as_numpy_array()
    if entry.get("inner") and whole:
        problems = shard_problems(data, entry["inner"])
        if problems:
            raise StoreError(corrupt_message(node, key, f"({problems[0]})"))
    elif not ends_with_crc(data):  # a chunk, or one byte range of a shard: index or inner chunk
        raise StoreError(corrupt_message(node, key))
