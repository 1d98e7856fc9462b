"""The cohort store: a zarr v3 group that plain xarray can open.

Layout (see ARCHITECTURE.md)::

    cohort.zarr/            attrs["chunkglm"]: format, version, provenance
      grids/<grid-id>/      mask (x, y, z) bool, ijk (voxel, 3) int32
      runs/<bids-name>/     bold (time, voxel) float32, confounds, events
      maps/<collection>/    <map type> (image, voxel) float32

A node (grid, run or map collection) counts as present only when its
``attrs["chunkglm"]["complete"]`` is true; that attribute is written last, in
one metadata write (atomic on local disk and on object stores), so a node cut
off half-way is recognised and rewritten, never read.

The root ``zarr.json`` inlines every node's documents (zarr v3 consolidated
metadata, :mod:`chunkglm.io.consolidated`): opening and listing a store is
one read; each node's completion or version switch merges its documents in.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
import warnings

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.dtype import VariableLengthUTF8
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.core.sync import sync
from zarr.errors import UnstableSpecificationWarning
from zarr.storage import LocalStore, StorePath

from chunkglm._version import __version__
from chunkglm.errors import IncompatibleStoreError, InputError, StoreError
from chunkglm.io import consolidated, locks
from chunkglm.io.integrity import node_inventory
from chunkglm.io.backends import open_store, redact_url
from chunkglm.io.grid import Grid  # the volume grid value type, re-exported (st.Grid)
from chunkglm.io.writer_store import WriterStore

FORMAT_NAME = "chunkglm-cohort"
#: Major.minor of the store format. Readers accept any minor of their major.
FORMAT_VERSION = "1.0"
ATTR = "chunkglm"
KINDS = ("grids", "runs", "maps")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def compressor():
    """Blosc/zstd with byte shuffle: fast to decode, good on float32 images."""
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def checked_codecs(dtype) -> tuple:
    """The compressors of every array chunkglm writes: compression, then a
    crc32c of the compressed bytes (checked on every read, before decoding)."""
    if np.dtype(dtype).kind in "OUT":  # variable-length strings: zarr's default compressor
        return (ZstdCodec(level=0, checksum=False), Crc32cCodec())
    return (compressor(), Crc32cCodec())


def fill_value(dtype):
    """NaN for floats (a chunk read as the fill value cannot pass as data), 0 for
    numbers, none for strings. Every chunk is written anyway (see ARRAY_CONFIG)."""
    kind = np.dtype(dtype).kind
    return None if kind in "OUT" else np.nan if kind in "fc" else 0


#: Write every chunk, even one equal to the fill value: a chunk the store does
#: not have is then always a damage, never an "empty" chunk.
ARRAY_CONFIG = {"write_empty_chunks": True}


def is_url(store) -> bool:
    """True for fsspec URLs other than plain local paths."""
    return isinstance(store, str) and "://" in store and not store.startswith("file://")


def zarr_store(store, storage_options=None, *, read_only=False):
    """A zarr Store for a local path, an object-store URL or an existing Store.

    Parameters
    ----------
    store : str, Path or zarr Store
    storage_options : dict or chunkglm.io.backends.StorageSettings, optional
        s3fs-style options, or backend ("auto", "obstore", "fsspec") +
        options + retries; see :mod:`chunkglm.io.backends`.
    read_only : bool
    """
    if isinstance(store, zarr.abc.store.Store):
        return store
    if is_url(store):
        return open_store(store, storage_options, read_only=read_only)
    path = str(store).removeprefix("file://")
    return CohortLocalStore(path, read_only=read_only)


def writer_store(store, storage_options=None):
    """:func:`zarr_store` for a writer: the root document reads without its consolidated
    listing, in a bounded read (:class:`~chunkglm.io.writer_store.WriterStore`), so writing a
    group into a store of thousands of runs does not read the whole listing at each array."""
    zstore = zarr_store(store, storage_options)
    return zstore if isinstance(zstore, WriterStore) else WriterStore(zstore)


class CohortLocalStore(LocalStore):
    """zarr's LocalStore, writing nothing for ``set_if_not_exists`` of a key that exists.

    zarr writes the ``zarr.json`` of every parent group with ``set_if_not_exists``
    at each array or group creation; LocalStore does that by writing a temporary
    file (``zarr.<hex>.partial``) and linking it into place, which fails and is
    unlinked when the document exists: each array of a run wrote (and removed)
    a temporary file in the store's root and in ``runs/``, and a worker killed
    between the two left it there (seen in the distributed kill test). Looking
    first writes nothing when the key exists; a key created meanwhile by another
    process still makes the write a no-op, as before.
    """

    async def set_if_not_exists(self, key, value) -> None:
        if await self.exists(key):
            return
        await super().set_if_not_exists(key, value)


def open_root(store, storage_options=None, *, mode="r") -> zarr.Group:
    """Open (mode "r") or open-or-create (mode "a") a cohort store's root.

    Raises
    ------
    StoreError
        The location holds something that is not a chunkglm store, or (mode
        "r") nothing at all.
    IncompatibleStoreError
        The store's format major version differs from this chunkglm's.
    """
    if mode == "r":
        return open_root_listing(zarr_store(store, storage_options, read_only=True), store)[0]
    # writers read the root's own fields, never its listing (bounded: a task's open and
    # zarr's parent checks at each array it creates do not grow with the store)
    zstore = writer_store(store, storage_options)
    if _holds_other_files(zstore):
        raise StoreError(
            f"{redact_url(str(store))} is not empty and not a chunkglm cohort store (it has files "
            "but no zarr.json). Choose an empty or new location for the store; nothing was written."
        )
    try:
        # writers see the store's own documents, never the consolidated listing of before
        root = zarr.open_group(zstore, mode="a", zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise _no_store(store) from err
    except (ValueError, zarr.errors.ContainsArrayError) as err:
        raise _damaged_root(store, err) from err
    meta = root.attrs.get(ATTR)
    if meta is None:
        if _has_members(root):
            raise StoreError(
                f"{redact_url(str(store))} is not a chunkglm cohort store (a folder with other "
                "files, or a zarr group without 'chunkglm' attributes). Choose an empty or new "
                "location for the store."
            )
        root.attrs[ATTR] = _new_root_attrs()
    else:
        check_format(meta, store)
    return root


def list_written(store, path: str, storage_options=None) -> None:
    """After a group was written into a cohort store by other means than this module's
    (xarray's ``to_zarr``: time series, streamed voxelwise maps), list it in the root's
    consolidated metadata (readers that trust the listing would not see it otherwise).
    Nothing is done for a zarr store that is not a chunkglm store."""
    try:
        root = open_root(store, storage_options, mode="a")
    except StoreError:
        return
    consolidated.merge(root, path)


def open_root_listing(zstore, store=None) -> tuple[zarr.Group, dict[str, dict] | None]:
    """Open a store's root for reading in one request: the root group and its consolidated
    listing (node path -> its ``zarr.json`` document; None in a store without one).

    The group reads its members from the store itself (never from the listing).
    Raises StoreError / IncompatibleStoreError as :func:`open_root`.
    """
    store = zstore if store is None else store
    try:
        document = consolidated.read_root(zstore)
    except FileNotFoundError as err:
        raise _no_store(store) from err
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged_root(store, err) from err
    if document is None:
        raise _no_store(store)
    if not isinstance(document, dict) or document.get("zarr_format") != 3 or document.get("node_type") != "group":
        found = document.get("node_type") if isinstance(document, dict) else type(document).__name__
        raise _damaged_root(store, ValueError(f"its root zarr.json is not a zarr v3 group (node_type {found!r})"))
    listing = consolidated.listing(document)
    try:
        metadata = GroupMetadata.from_dict({k: v for k, v in document.items() if k != consolidated.KEY})
    except (ValueError, TypeError, KeyError) as err:
        raise _damaged_root(store, err) from err
    root = zarr.Group(AsyncGroup(metadata=metadata, store_path=StorePath(zstore, "")))
    meta = root.attrs.get(ATTR)
    if meta is None:
        raise StoreError(
            f"{redact_url(str(store))} is not a chunkglm cohort store (a folder with other "
            "files, or a zarr group without 'chunkglm' attributes). Choose an empty or new "
            "location for the store."
        )
    check_format(meta, store)
    return root, listing


def _no_store(store) -> StoreError:
    return StoreError(f"no cohort store at {redact_url(str(store))}. Create one with "
                      "chunkglm.convert(inputs, store) or `chunkglm convert`.")


def _damaged_root(store, err) -> StoreError:
    where = redact_url(str(store)).removeprefix("file://")
    return StoreError(
        f"{where} is not a readable zarr v3 group ({type(err).__name__}: {err}). If it is a cohort "
        "store, its root zarr.json is damaged: convert the inputs again into a new store."
    )


def _holds_other_files(zstore) -> bool:
    """True when the location has no root document but other files (not a store)."""
    async def listing():
        if await zstore.get("zarr.json", default_buffer_prototype()) is not None:
            return []
        try:
            # zarr's temporary files (a writer killed before its first rename) are not a store's
            return [key async for key in zstore.list_dir("") if not key.endswith(".partial")]
        except Exception:  # nothing there, or unreachable: opening the group says which
            return []

    return bool(sync(listing()))


def _has_members(group) -> bool:
    return any(True for _ in group.keys())


def _new_root_attrs() -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "chunkglm_version": __version__,
        "created": _now(),
        "provenance": [],
    }


def check_format(meta: dict, store) -> None:
    """Refuse stores of another format or another major format version."""
    found = str(meta.get("format_version", "?"))
    if meta.get("format") != FORMAT_NAME or found.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise IncompatibleStoreError(
            f"{redact_url(str(store))} has store format {meta.get('format')!r} version "
            f"{found} (written by chunkglm {meta.get('chunkglm_version', '?')}); this "
            f"chunkglm {__version__} reads {FORMAT_NAME} {FORMAT_VERSION.split('.')[0]}.x. "
            "Convert the inputs again into a new store, or use the chunkglm version "
            "that wrote it."
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_node_name(name: str) -> str:
    """Node names are BIDS-like labels; they can never address another path."""
    if not _NODE_NAME.match(name) or ".." in name:
        raise InputError(
            f"{name!r} cannot name a store node: use letters, digits and _ . + - "
            "(BIDS entity strings like sub-01_task-rest_run-1), no slashes."
        )
    return name


def node_meta(group) -> dict:
    """The node's chunkglm attributes ({} when absent or unreadable)."""
    try:
        return dict(group.attrs.get(ATTR, {}))
    except Exception:  # a metadata document cut off mid-write reads as absent
        return {}


def is_complete(group) -> bool:
    """True when the node's completion marker was written."""
    return bool(node_meta(group).get("complete"))


def node_status(root, kind: str, listing: dict | None = None) -> dict[str, bool]:
    """Map node name -> complete? for every node under ``grids``/``runs``/``maps``
    (from ``listing``, the root's consolidated documents, when given)."""
    return {name: bool(attrs) for name, attrs in node_attributes(root, kind, listing).items()}


def node_attributes(root, kind: str, listing: dict | None = None) -> dict[str, dict]:
    """Map node name -> its attributes, read once ({} for an incomplete or unreadable node).

    A complete node's attributes name its current version (:func:`data_path`):
    a reader that keeps them reads that version, whatever is switched in later.
    With ``listing`` (the root's consolidated documents, :func:`open_root_listing`)
    only the nodes it lists incomplete are read (a node is listed incomplete
    before it is created and complete after its completion is merged: one whose
    writer was cut off in between is complete in the store; one listed but not
    in the store, never started, is left out); without it, one read per node.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; received {kind!r}")
    if listing is not None:
        found = {name: attrs or _stored_attributes(root, f"{kind}/{name}")
                 for name, attrs in _listed_attributes(listing, kind).items()}
        return {name: attrs for name, attrs in found.items() if attrs is not None}
    if kind not in root:
        return {}
    return {name: _read_attributes(root, f"{kind}/{name}") for name in sorted(root[kind].group_keys())}


def _read_attributes(root, path: str) -> dict:
    """A node's attributes when it is complete, else {} (also when absent or unreadable)."""
    try:
        attrs = root[path].attrs.asdict()
    except Exception:  # absent, or unreadable metadata: treat as incomplete
        return {}
    return attrs if dict(attrs.get(ATTR) or {}).get("complete") else {}


def _stored_attributes(root, path: str) -> dict | None:
    """:func:`_read_attributes`, or None when the store has no node at ``path``."""
    try:
        attrs = root[path].attrs.asdict()
    except KeyError:
        return None
    except Exception:  # unreadable metadata: a node there, incomplete
        return {}
    return attrs if dict(attrs.get(ATTR) or {}).get("complete") else {}


def _listed_attributes(listing: dict, kind: str) -> dict[str, dict]:
    found = {}
    for path in sorted(listing):
        parent, _, name = path.partition("/")
        if parent != kind or not name or "/" in name or listing[path].get("node_type") != "group":
            continue
        attrs = listing[path].get("attributes")
        complete = isinstance(attrs, dict) and dict(attrs.get(ATTR) or {}).get("complete")
        found[name] = dict(attrs) if complete else {}
    return found


#: How a node about to be written is listed in the root's consolidated metadata until its
#: completion is merged: an incomplete group (readers of chunkglm read its marker from the store).
INCOMPLETE = {"zarr_format": 3, "node_type": "group", "attributes": {ATTR: {"complete": False}}}


def start_node(root, kind: str, name: str, *, listed: bool = True) -> zarr.Group:
    """Create an empty node, deleting whatever incomplete node was there.

    ``listed``: list it incomplete in the root's consolidated metadata first
    (False: the caller did, :func:`list_incomplete`, and merges it when done).
    """
    check_node_name(name)
    path = f"{kind}/{name}"
    if path in root:
        del root[path]
    parent = _require_group(root, kind)
    if listed:  # listed incomplete before it exists, until its completion is merged
        consolidated.merge(root, path, INCOMPLETE)
    return parent.create_group(name, attributes={ATTR: {"complete": False}})


def _require_group(root, path: str) -> zarr.Group:
    try:
        return root.require_group(path)
    except zarr.errors.ContainsGroupError:  # another process's task created it meanwhile
        return root[path]


def list_incomplete(root, kind: str, names) -> None:
    """List the nodes ``kind/<name>`` of ``names`` incomplete in the root's consolidated metadata,
    in one rewrite of the root: before a conversion's tasks write them with ``listed=False``
    (:class:`chunkglm.io.consolidated.Batch` merges them once written)."""
    names = [check_node_name(name) for name in names]
    if names:
        _require_group(root, kind)
        consolidated.merge_many(root, [f"{kind}/{name}" for name in names], INCOMPLETE)


#: Where chunkglm before versioned nodes staged a replacement (still finished or removed).
REPLACING = "_replacing"
#: A version folder inside a node: ``runs/<name>/v-2`` ... (the node's own arrays are version 1).
VERSION = re.compile(r"^v-([0-9]+)$")
#: Seconds a replaced version stays readable for readers that opened it before the switch
#: (environment: ``CHUNKGLM_KEEP_REPLACED_SECONDS``).
KEEP_REPLACED_SECONDS = 3600.0


def keep_replaced() -> float:
    """Seconds a superseded version is kept (see :data:`KEEP_REPLACED_SECONDS`)."""
    try:
        return max(0.0, float(os.environ.get("CHUNKGLM_KEEP_REPLACED_SECONDS", KEEP_REPLACED_SECONDS)))
    except ValueError:
        return KEEP_REPLACED_SECONDS


def data_path(path: str, meta: dict) -> str:
    """Where the arrays of node ``path`` are, from its marker ``meta`` (read once by a reader):
    the node itself, or its current version folder after a replacement."""
    version = meta.get("version")
    return f"{path}/{version}" if version else path


def begin_version(root, kind: str, name: str, *, listed: bool = True) -> zarr.Group:
    """A group to write a new version of ``kind/name`` into; never deletes a complete node.

    Takes the node's lock (:mod:`chunkglm.io.locks`; NodeBusyError when another
    conversion holds it), released by :func:`publish_version` or
    :func:`discard_version`. Without a complete node, the node itself (an
    incomplete one is cleared first). With one, a new version folder
    ``kind/name/v-<n>`` beside the current version, which readers never see
    until :func:`publish_version` switches the node's marker to it.
    ``listed``: as :func:`start_node`'s (the node of a conversion's batch).
    """
    check_node_name(name)
    locks.acquire(root, kind, name, redact_url(str(root.store)))
    try:
        path = f"{kind}/{name}"
        if path not in root or not is_complete(root[path]):
            return start_node(root, kind, name, listed=listed)
        node = root[path]
        meta = node_meta(node)
        drop_unpublished(node, meta)
        numbers = [1, _number(meta.get("version", ""))]
        numbers += [_number(v) for v in _version_folders(node)]
        return node.create_group(f"v-{max(numbers) + 1}", attributes={ATTR: {"complete": False}})
    except BaseException:
        locks.release(root, kind, name)
        raise


def _number(version: str) -> int:
    found = VERSION.match(version or "")
    return int(found.group(1)) if found else 1


def publish_version(root, kind: str, name: str, group, *, listed: bool = True) -> None:
    """Make a complete version written by :func:`begin_version` the node's, and release the lock.

    The switch is one write of the node's ``zarr.json`` (its attributes, its
    completion marker and the current version's name): atomic on local disk
    (written beside, then renamed) and on object stores (one PUT). Readers
    resolve the version once when they open the node, so each reads the old
    version or the new one, never a mix. The old version is kept for
    :func:`keep_replaced` seconds (readers that opened it keep reading it),
    then removed by the next write of the node or ``chunkglm verify --repair``.

    The node's documents are merged into the root's consolidated metadata,
    unless ``listed`` is False and the node is new (not a switch): its caller
    listed it incomplete and merges it in a batch. A switch is always merged
    at once (a listing naming the superseded version would send readers to
    data removed once :func:`keep_replaced` has passed).
    """
    try:
        path = f"{kind}/{name}"
        switched = group.path.strip("/") != path
        if switched:
            _switch(root, path, group)
        if switched or listed:
            consolidated.merge(root, path)
    finally:
        locks.release(root, kind, name)


def _switch(root, path: str, group) -> None:
    node = root[path]
    old = node_meta(node)
    attrs = group.attrs.asdict()
    superseded = {**old.get("superseded", {}), old.get("version", ""): time.time()}
    superseded.pop(group.basename, None)
    attrs[ATTR] = {**attrs[ATTR], "version": group.basename, "superseded": superseded}
    node.attrs.put(attrs)
    remove_superseded(root, path)


def remove_superseded(root, path: str, keep: float | None = None) -> list[str]:
    """Delete the versions of ``path`` superseded at least ``keep`` seconds ago; return them."""
    node = root[path]
    meta = node_meta(node)
    keep = keep_replaced() if keep is None else keep
    now = time.time()
    due = sorted(v for v, when in meta.get("superseded", {}).items() if now - float(when) >= keep)
    if not due:
        return []
    for version in due:  # data first: a cut-off removal leaves an entry whose data is gone
        _delete_version(node, version)
    attrs = node.attrs.asdict()
    attrs[ATTR] = {**meta, "superseded": {v: t for v, t in meta["superseded"].items() if v not in due}}
    node.attrs.put(attrs)
    consolidated.merge(root, path)
    return due


def _delete_version(node, version: str) -> None:
    if version:
        if version in node:
            del node[version]
        return
    async def delete_own_arrays():  # version 1: the node's own arrays (listed, never parsed)
        names = [key async for key in node.store.list_dir(node.path)]
        for name in names:
            if name != "zarr.json" and not VERSION.match(name):
                await node.store.delete_dir(f"{node.path}/{name}")

    sync(delete_own_arrays())


def unpublished(node, meta: dict) -> list[str]:
    """Version folders of a complete node that are neither current nor superseded
    (left by a replacement cut off before its switch)."""
    known = {meta.get("version", "")} | set(meta.get("superseded", {}))
    return sorted(v for v in _version_folders(node) if v not in known)


def _version_folders(node) -> list[str]:
    """Names of the node's version folders, from a listing (no member's metadata is parsed,
    so a damaged array document of the node does not stop a repair)."""
    async def listing():
        return [key async for key in node.store.list_dir(node.path)]

    return sorted(v for v in sync(listing()) if VERSION.match(v))


def drop_unpublished(node, meta: dict) -> list[str]:
    """Delete :func:`unpublished` versions (the caller holds the node's lock); return them."""
    found = unpublished(node, meta)
    for version in found:
        del node[version]
    return found


def discard_version(root, group, *, listed: bool = True) -> None:
    """Remove what a failed attempt wrote, unless it is complete, and release the lock
    (``listed`` False: the caller merges the node's listing, as :func:`publish_version`'s)."""
    kind, name = group.path.strip("/").split("/")[:2]
    try:
        if group.path in root and not is_complete(root[group.path]):
            del root[group.path]
            if listed:
                consolidated.merge(root, f"{kind}/{name}")
    finally:
        locks.release(root, kind, name)


def resume_swap(root, kind: str, name: str) -> bool:
    """Finish a replacement an earlier process wrote completely but did not switch to;
    True when there was one (a complete unpublished version, or an older chunkglm's
    ``_replacing`` staging node)."""
    path = f"{kind}/{name}"
    with locks.node_lock(root, kind, name, redact_url(str(root.store))):
        if _finish_legacy_swap(root, kind, name):
            return True
        if path not in root or not is_complete(root[path]):
            return False
        node = root[path]
        meta = node_meta(node)
        ready = [v for v in unpublished(node, meta) if is_complete(node[v])]
        if not ready:
            return False
        newest = max(ready, key=_number)
        _switch(root, path, node[newest])
        consolidated.merge(root, path)
        return True


def _finish_legacy_swap(root, kind: str, name: str) -> bool:
    """An older chunkglm staged a replacement in ``_replacing/kind/name``: copy it over the node."""
    staging, path = f"{REPLACING}/{kind}/{name}", f"{kind}/{name}"
    if staging not in root or not is_complete(root[staging]):
        return False
    root.require_group(path).attrs.put({ATTR: {"complete": False, "replacing_from": staging}})
    _copy_prefix(root.store, _key(root, staging), _key(root, path))
    del root[staging]
    consolidated.merge(root, path)
    consolidated.merge(root, REPLACING)
    return True


def _key(root, path: str) -> str:
    return "/".join(p for p in (root.path, path) if p)


def _copy_prefix(store, source: str, target: str) -> None:
    """Make the keys under ``target`` those under ``source``; the group document last."""
    async def copy():
        proto = default_buffer_prototype()
        new = [k async for k in store.list_prefix(f"{source}/")]
        old = [k async for k in store.list_prefix(f"{target}/")]
        relative = {k[len(source) + 1:] for k in new}
        for key in sorted(relative - {"zarr.json"}):
            await store.set(f"{target}/{key}", await store.get(f"{source}/{key}", proto))
        for key in old:
            if key[len(target) + 1:] not in relative:
                await store.delete(key)
        await store.set(f"{target}/zarr.json", await store.get(f"{source}/zarr.json", proto))

    sync(copy())


def finish_node(group, attrs: dict, meta: dict) -> None:
    """Write the node's attributes and its completion marker, in one write.

    The marker records the node's arrays (stored chunks, checksum): the
    inventory readers and ``chunkglm verify`` check the store against.
    """
    full = dict(attrs)
    full[ATTR] = {**meta, "arrays": node_inventory(group), "complete": True, "written": _now(),
                  "chunkglm_version": __version__}
    group.attrs.put(full)


def write_array(group, name, data, dims, *, chunks=None, shards=None, attrs=None):
    """Write one labelled array (dimension names as xarray reads them).

    Text is stored as zarr v3's ``string`` data type (variable-length UTF-8,
    ``vlen-utf8`` codec; zarr-extensions), which zarr-python writes and reads
    without its unstable-data-type warning and other zarr v3 readers know.
    Stores written before keep their ``fixed_length_utf32`` arrays, still read.
    """
    data = np.asarray(data)
    dtype = data.dtype
    if data.dtype.kind in "OUT":
        data, dtype = data.astype(str).astype(object), VariableLengthUTF8()
    codecs = checked_codecs(data.dtype)
    with warnings.catch_warnings():
        # a store written before (fixed-width text): zarr warns while re-encoding its documents
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        arr = _create(group, name, data, dtype, dims, chunks, shards, codecs, attrs)
        if data.size:
            arr[...] = data
    return arr


def _create(group, name, data, dtype, dims, chunks, shards, codecs, attrs):
    return group.create_array(
        name,
        shape=data.shape,
        dtype=dtype,
        chunks=chunks or data.shape or (1,),
        shards=shards,
        compressors=codecs,
        dimension_names=dims,
        attributes=attrs or {},
        fill_value=fill_value(data.dtype),
        config=ARRAY_CONFIG,
    )


#: Where each operation's provenance record is kept: one group per record, never rewritten.
PROVENANCE = "_provenance"


def add_provenance(root, record: dict, *, listed: bool = True) -> str:
    """Add one operation record (never credentials) as a group of its own; return its path.

    Concurrent conversions into one store each add their own group; nothing
    shared is read, changed and written back, so no record overwrites another
    (the root attributes' list, written by earlier versions, is read too:
    :func:`provenance_records`). ``listed`` False: the caller merges the
    record into the root's consolidated metadata (with a batch of nodes).
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    parent = _require_group(root, PROVENANCE)
    name = f"{stamp}-{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    group = parent.create_group(re.sub(r"[^A-Za-z0-9_.-]", "", name),
                                attributes={ATTR: {"time": _now(), "chunkglm_version": __version__, **record}})
    if listed:
        consolidated.merge(root, group.path)
    return group.path


def provenance_records(root) -> list[dict]:
    """Every operation record of the store, oldest first (root list, then the groups)."""
    records = list(dict(root.attrs[ATTR]).get("provenance", []))
    if PROVENANCE in root:
        parent = root[PROVENANCE]
        records += [dict(parent[name].attrs[ATTR]) for name in sorted(parent.group_keys())]
    return records


#: Seconds a conversion waits for another one writing the same grid (grids are small).
GRID_WAIT_SECONDS = 120.0


def write_grid(root, grid: Grid) -> str:
    """Write a grid node unless an identical complete one exists; return its id.

    Conversions sharing a grid write it one at a time (the node's lock; the
    others wait, then find it complete)."""
    name = grid.grid_id
    if node_status(root, "grids").get(name):
        return name
    with locks.node_lock(root, "grids", name, redact_url(str(root.store)), wait=GRID_WAIT_SECONDS):
        if node_status(root, "grids").get(name):
            return name
        _write_grid(root, grid)
        consolidated.merge(root, f"grids/{name}")
    return name


def _write_grid(root, grid: Grid) -> None:
    group = start_node(root, "grids", grid.grid_id)
    write_array(group, "mask", grid.mask.astype(bool), ("x", "y", "z"))
    write_array(group, "ijk", grid.ijk, ("voxel", "axis"))
    write_voxel_coordinate(group, grid)
    attrs = {
        "affine": np.asarray(grid.affine, dtype=float).tolist(),
        "shape": list(grid.shape),
        "space": grid.space,
        "n_voxels": grid.n_voxels,
    }
    finish_node(group, attrs, {"kind": "grid"})


def write_voxel_coordinate(group, grid: Grid) -> None:
    """The ``voxel`` coordinate of a node: each in-mask voxel's flat index into the grid
    (C order over x, y, z; ``numpy.unravel_index(voxel, shape)`` gives its i, j, k)."""
    write_array(group, "voxel", grid.flat_index, ("voxel",),
                attrs={"long_name": "flat index into the grid (C order over x, y, z)",
                       "grid_shape": list(grid.shape)})


def read_grid(root, grid_id: str) -> Grid:
    """Load a grid node (small: a 3-D mask)."""
    path = f"grids/{grid_id}"
    if path not in root or not is_complete(root[path]):
        raise StoreError(f"the store has no complete grid {grid_id!r}; convert the inputs again")
    group = root[path]
    attrs = group.attrs.asdict()
    return Grid(np.asarray(attrs["affine"]), np.asarray(group["mask"][...], dtype=bool), attrs["space"])
