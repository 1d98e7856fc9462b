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
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import UnstableSpecificationWarning
from zarr.storage import LocalStore

from chunkglm._version import __version__
from chunkglm.errors import IncompatibleStoreError, InputError, StoreError
from chunkglm.io.integrity import node_inventory
from chunkglm.io.backends import open_store, redact_url

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
    return LocalStore(path, read_only=read_only)


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
    zstore = zarr_store(store, storage_options, read_only=(mode == "r"))
    try:
        root = zarr.open_group(zstore, mode="r" if mode == "r" else "a", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise StoreError(
            f"no cohort store at {redact_url(str(store))}. Create one with "
            "chunkglm.convert(inputs, store) or `chunkglm convert`."
        ) from err
    except (ValueError, zarr.errors.ContainsArrayError) as err:
        raise StoreError(f"{redact_url(str(store))} is not a zarr v3 group: {err}") from err
    meta = root.attrs.get(ATTR)
    if meta is None:
        if mode == "r" or _has_members(root):
            raise StoreError(
                f"{redact_url(str(store))} is a zarr group but not a chunkglm cohort store "
                "(no 'chunkglm' attributes). Choose an empty or new location."
            )
        root.attrs[ATTR] = _new_root_attrs()
    else:
        check_format(meta, store)
    return root


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


def node_status(root, kind: str) -> dict[str, bool]:
    """Map node name -> complete? for every node under ``grids``/``runs``/``maps``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; received {kind!r}")
    if kind not in root:
        return {}
    parent = root[kind]
    status = {}
    for name in sorted(parent.group_keys()):
        try:
            status[name] = is_complete(parent[name])
        except Exception:  # unreadable metadata: treat as incomplete
            status[name] = False
    return status


def start_node(root, kind: str, name: str) -> zarr.Group:
    """Create an empty node, deleting whatever incomplete node was there."""
    check_node_name(name)
    path = f"{kind}/{name}"
    if path in root:
        del root[path]
    try:
        parent = root.require_group(kind)
    except zarr.errors.ContainsGroupError:  # another process's task created it meanwhile
        parent = root[kind]
    return parent.create_group(name, attributes={ATTR: {"complete": False}})


#: Where a new version of a complete node is written before it replaces it.
REPLACING = "_replacing"


def begin_version(root, kind: str, name: str) -> zarr.Group:
    """A group to write a new version of ``kind/name`` into; never deletes a complete node.

    Without a complete node there, the node itself (an incomplete one is
    cleared first). With one, a staging node ``_replacing/<kind>/<name>``
    that :func:`publish_version` swaps in once it is complete.
    """
    check_node_name(name)
    path = f"{kind}/{name}"
    if path not in root or not is_complete(root[path]):
        return start_node(root, kind, name)
    staging = f"{REPLACING}/{kind}/{name}"
    if staging in root:
        del root[staging]
    parent = root.require_group(f"{REPLACING}/{kind}")
    return parent.create_group(name, attributes={ATTR: {"complete": False}})


def publish_version(root, kind: str, name: str, group) -> None:
    """Make a complete version written by :func:`begin_version` the node's."""
    if group.path.strip("/") != f"{kind}/{name}":
        swap_in(root, kind, name)


def discard_version(root, group) -> None:
    """Remove what a failed attempt wrote, unless it is complete."""
    if group.path in root and not is_complete(root[group.path]):
        del root[group.path]


def swap_in(root, kind: str, name: str) -> None:
    """Copy the complete staging version over ``kind/name``, marker last.

    The node is marked incomplete first (pointing at the staging version),
    so at every moment one complete copy exists; an interrupted swap is
    finished by :func:`resume_swap`.
    """
    staging, path = f"{REPLACING}/{kind}/{name}", f"{kind}/{name}"
    root.require_group(path).attrs.put({ATTR: {"complete": False, "replacing_from": staging}})
    _copy_prefix(root.store, _key(root, staging), _key(root, path))
    del root[staging]


def resume_swap(root, kind: str, name: str) -> bool:
    """Finish a swap an earlier process started; True when there was one."""
    staging = f"{REPLACING}/{kind}/{name}"
    if staging not in root or not is_complete(root[staging]):
        return False
    swap_in(root, kind, name)
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
    """Write one labelled array (dimension names as xarray reads them)."""
    data = np.asarray(data)
    if data.dtype.kind in "OU":
        data = data.astype(str)
    codecs = checked_codecs(data.dtype)
    with warnings.catch_warnings():
        # zarr notes that its variable-length string dtype may still change
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        arr = _create(group, name, data, dims, chunks, shards, codecs, attrs)
        if data.size:
            arr[...] = data
    return arr


def _create(group, name, data, dims, chunks, shards, codecs, attrs):
    return group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
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


def add_provenance(root, record: dict) -> None:
    """Add one operation record (never credentials) as a group of its own.

    Concurrent conversions into one store each add their own group; nothing
    shared is read, changed and written back, so no record overwrites another
    (the root attributes' list, written by earlier versions, is read too:
    :func:`provenance_records`).
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        parent = root.require_group(PROVENANCE)
    except zarr.errors.ContainsGroupError:  # another process created it meanwhile
        parent = root[PROVENANCE]
    name = f"{stamp}-{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parent.create_group(re.sub(r"[^A-Za-z0-9_.-]", "", name),
                        attributes={ATTR: {"time": _now(), "chunkglm_version": __version__, **record}})


def provenance_records(root) -> list[dict]:
    """Every operation record of the store, oldest first (root list, then the groups)."""
    records = list(dict(root.attrs[ATTR]).get("provenance", []))
    if PROVENANCE in root:
        parent = root[PROVENANCE]
        records += [dict(parent[name].attrs[ATTR]) for name in sorted(parent.group_keys())]
    return records


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid (affine + shape) with the mask that defines the voxel axis.

    The voxel axis holds in-mask voxels only, flattened in C order over
    (x, y, z); :attr:`ijk` maps them back to 3-D.
    """

    affine: np.ndarray
    mask: np.ndarray
    space: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (x, y, z)."""
        return tuple(int(n) for n in self.mask.shape)

    @cached_property
    def ijk(self) -> np.ndarray:
        """Voxel indices, shape (n_voxels, 3), C order."""
        return np.argwhere(self.mask).astype(np.int32)

    @property
    def n_voxels(self) -> int:
        """In-mask voxels."""
        return int(self.mask.sum())

    @cached_property
    def grid_id(self) -> str:
        """Stable id from affine, shape and mask: equal grids share a node."""
        digest = hashlib.sha256()
        digest.update(np.asarray(self.affine, dtype="<f8").round(6).tobytes())
        digest.update(np.asarray(self.shape, dtype="<i8").tobytes())
        digest.update(np.packbits(self.mask, axis=None).tobytes())
        prefix = re.sub(r"[^A-Za-z0-9]", "", self.space) or "grid"
        return f"{prefix}_{digest.hexdigest()[:12]}"


def write_grid(root, grid: Grid) -> str:
    """Write a grid node unless an identical complete one exists; return its id."""
    name = grid.grid_id
    if node_status(root, "grids").get(name):
        return name
    group = start_node(root, "grids", name)
    write_array(group, "mask", grid.mask.astype(bool), ("x", "y", "z"))
    write_array(group, "ijk", grid.ijk, ("voxel", "axis"))
    attrs = {
        "affine": np.asarray(grid.affine, dtype=float).tolist(),
        "shape": list(grid.shape),
        "space": grid.space,
        "n_voxels": grid.n_voxels,
    }
    finish_node(group, attrs, {"kind": "grid"})
    return name


def read_grid(root, grid_id: str) -> Grid:
    """Load a grid node (small: a 3-D mask)."""
    path = f"grids/{grid_id}"
    if path not in root or not is_complete(root[path]):
        raise StoreError(f"the store has no complete grid {grid_id!r}; convert the inputs again")
    group = root[path]
    attrs = group.attrs.asdict()
    return Grid(np.asarray(attrs["affine"]), np.asarray(group["mask"][...], dtype=bool), attrs["space"])
