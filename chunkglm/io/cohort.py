"""``chunkglm.open_cohort``: a lazy, labelled view of a cohort store.

Only complete nodes can be read. Selecting runs or map collections that
include incomplete nodes (a conversion cut off, or still running) raises
StoreError naming them, unless the cohort is opened with
``allow_incomplete=True``, which skips them with a warning. Node data come
back as xarray Datasets backed by dask arrays whose chunks are the store's
chunks, so nothing is read until a computation asks for it; reads check each
chunk's presence and checksum (:mod:`chunkglm.io.integrity`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property

import dask.array as da
import pandas as pd
import xarray as xr
import zarr

from chunkglm.errors import InputError, StoreError
from chunkglm.io import layout as st
from chunkglm.io.bids import parse_entities
from chunkglm.io.integrity import CheckedStore, replaced_message
from chunkglm.io.nifti import header_from_bytes, header_from_text, image_from_voxels, save_image
from chunkglm.io import surface, surface_convert
from chunkglm.io.write_run import RESERVED_EVENT_COLUMNS


@dataclass(frozen=True)
class Node:
    """One run or map collection of a store.

    Attributes
    ----------
    cohort : Cohort
        The store it belongs to.
    kind : str
        ``"runs"`` or ``"maps"``.
    name : str
        Node name, e.g. ``sub-01_task-main_run-1``.
    """

    cohort: Cohort
    kind: str
    name: str

    @property
    def path(self) -> str:
        """Path inside the store, e.g. ``runs/sub-01_task-main_run-1``."""
        return f"{self.kind}/{self.name}"

    @cached_property
    def attrs(self) -> dict:
        """The node's attributes (entities, RepetitionTime, sidecar, ...), read once
        (when the cohort lists its nodes): they name the version this node reads."""
        return self.cohort.root[self.path].attrs.asdict()

    @property
    def entities(self) -> dict:
        """BIDS entities of a run ({} for map collections)."""
        return dict(self.attrs.get("entities", {}))

    @property
    def grid(self):
        """The grid: a voxel grid (:class:`~chunkglm.io.layout.Grid`: affine, shape, mask) or a
        surface grid (:class:`~chunkglm.io.surface.SurfaceGrid`: mesh or CIFTI, mask)."""
        return self.cohort.grid(self.attrs["grid_id"])

    @property
    def data_path(self) -> str:
        """Where the node's arrays are: its current version when :attr:`attrs` were read
        (resolved once: a replacement switched in later is not mixed into this node's reads)."""
        return st.data_path(self.path, dict(self.attrs.get(st.ATTR, {})))

    @property
    def zarr_store(self):
        """The store as this node's reads see it: missing or corrupt chunks raise
        StoreError naming the node and the chunk (nodes with an inventory)."""
        arrays = dict(self.attrs.get(st.ATTR, {})).get("arrays")
        if not arrays:
            return self.cohort.zarr_store
        return CheckedStore(self.cohort.zarr_store, self.data_path, arrays)

    def zarr_array(self, name: str):
        """One of the node's zarr arrays, read through :attr:`zarr_store`."""
        try:
            return zarr.open_array(self.zarr_store, path=f"{self.data_path}/{name}", mode="r", zarr_format=3)
        except DAMAGED_METADATA as err:
            raise StoreError(damaged_metadata_message(self.path, err)) from err

    def to_dataset(self) -> xr.Dataset:
        """The node as a lazy xarray Dataset (dask arrays, store chunks).

        Raises StoreError when the node is no longer complete (its marker is
        read with the dataset: no extra request).
        """
        ds = self._checked_open(lambda: xr.open_zarr(self.zarr_store, group=self.data_path, zarr_format=3,
                                                     consolidated=False, chunks={}))
        if not set(dict(self.attrs.get(st.ATTR, {})).get("arrays") or {}) <= set(ds.variables):
            self._refuse_if_replaced()
        return ds

    def _checked_open(self, open_node):
        """``open_node()`` (the node's group or dataset, its attrs holding the completion marker):
        a node missing since it was listed is named as replaced when it was, damaged metadata is
        one StoreError, and a node no longer complete is refused."""
        try:
            opened = open_node()
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            self._refuse_if_replaced()
            raise
        except DAMAGED_METADATA as err:
            raise StoreError(damaged_metadata_message(self.path, err)) from err
        if not dict(opened.attrs.get(st.ATTR, {})).get("complete"):
            raise StoreError(incomplete_message([self.path], self.cohort.location, selected=True))
        return opened

    def _refuse_if_replaced(self) -> None:
        """StoreError when the version this node reads was replaced and removed since."""
        current = st.data_path(self.path, st.node_meta(self.cohort.root[self.path]))
        if current != self.data_path:
            raise StoreError(replaced_message(self.data_path))

    def data(self, variable: str | None = None) -> xr.DataArray:
        """The (time|image, voxel) array: ``bold`` for runs, the map type for maps."""
        variable = variable or ("bold" if self.kind == "runs" else self.attrs["variables"][0])
        return self.to_dataset()[variable]

    def dask_array(self, variable: str | None = None):
        """The (time|image, voxel) values of :meth:`data` as a dask array read straight from zarr
        (store chunks, reads checked as :attr:`zarr_store`'s), with :meth:`to_dataset`'s checks
        (complete node, version not replaced), without building the xarray Dataset: models fit
        the values only, and xarray's coordinate reads, indexes and chunk-manager lookup cost a
        first fit ~12 ms of a ~150 ms surface run."""
        variable = variable or ("bold" if self.kind == "runs" else self.attrs["variables"][0])
        group = self._checked_open(lambda: zarr.open_group(self.zarr_store, path=self.data_path, mode="r",
                                                           zarr_format=3))
        try:
            values = group[variable]
        except KeyError:
            self._refuse_if_replaced()
            raise
        return da.from_zarr(values)

    @property
    def events(self):
        """The events table (pandas DataFrame) of a run, or None."""
        ds = self.to_dataset()
        if "event" not in ds.dims:
            return None
        columns = {}
        for name in ds.data_vars:
            if ds[name].dims == ("event",):
                bare = name.removeprefix("event_")
                columns[bare if bare in RESERVED_EVENT_COLUMNS else name] = ds[name].values
        return pd.DataFrame(columns)

    @property
    def confounds(self):
        """The confounds table (pandas DataFrame, NaN kept) of a run, or None."""
        ds = self.to_dataset()
        if "confounds" not in ds:
            return None
        return pd.DataFrame(ds["confounds"].values, columns=[str(c) for c in ds["confound"].values])

    def confound_columns(self, columns) -> pd.DataFrame:
        """The stored confounds table restricted to ``columns``; an InputError names what is missing."""
        table = self.confounds
        if table is None:
            raise InputError(f"{self.name} has no stored confounds; convert it with its confounds TSV.")
        missing = [c for c in columns if c not in table]
        if missing:
            raise InputError(f"{self.name} has no confound column(s) {missing}; it has {list(table.columns)}.")
        return table[list(columns)]

    def to_nifti(self, path=None, variable: str | None = None):
        """Rebuild the NIfTI image: float32 on the original grid and header.

        Values inside the mask equal the input's scaled values; voxels outside
        are 0. The original header's qform/sform, zooms (incl. TR) and units
        are restored. Writes ``path`` when given; returns the nibabel image.
        """
        grid = self.grid
        if isinstance(grid, surface.SurfaceGrid):
            raise InputError(f"{self.name} is on a {grid.kind} grid, not a voxel grid: write it back with "
                             "to_surface_image(), to_gifti() or to_cifti().")
        values = self.data(variable).values
        header_text = dict(self.attrs.get(st.ATTR, {})).get("nifti_header")
        header = header_from_text(header_text) if header_text else None
        if self.kind == "maps" and header is not None:
            header = _as_4d_header(header, len(values))
        img = image_from_voxels(values, grid.ijk, grid.shape, header, grid.affine)
        if path is not None:
            save_image(img, path, units=False)  # the source's header, units included
        return img


    def to_surface_image(self):
        """A surface run as nilearn's SurfaceImage (vertices x time, float32; 0 outside the mask)."""
        return surface_convert.to_surface_image(self)

    def to_gifti(self, folder=None, stem=None) -> dict:
        """A mesh-grid run as GIFTI images per hemisphere (see :func:`chunkglm.io.surface_convert.to_gifti`)."""
        return surface_convert.to_gifti(self, folder, stem)

    def to_cifti(self, path=None):
        """A CIFTI-grid run as a CIFTI-2 dense series (see :func:`chunkglm.io.surface_convert.to_cifti`)."""
        return surface_convert.to_cifti(self, path)


def _as_4d_header(header_bytes, n_images):
    """Maps keep their first image's header; stacked they are a 4-D image."""
    header = header_from_bytes(header_bytes)
    zooms = header.get_zooms()[:3]
    header.set_data_shape((*header.get_data_shape()[:3], n_images))
    header.set_zooms((*zooms, 1.0))
    return header.binaryblock


class Cohort:
    """A cohort store opened for reading.

    Parameters
    ----------
    store : str, Path or zarr Store
        Local path or fsspec URL.
    storage_options : dict, optional
        fsspec options (endpoint, credentials) for URLs; never stored.
    allow_incomplete : bool
        Skip incomplete nodes that a selection matches (with a warning; they
        are listed in :attr:`skipped`) instead of raising StoreError.
    """

    def __init__(self, store, storage_options=None, *, allow_incomplete=False):
        self.location = st.redact_url(str(store))
        self.zarr_store = st.zarr_store(store, storage_options, read_only=True)
        # one read: the root document with every node's (consolidated metadata); None in
        # stores written before it, whose nodes are then read one by one
        self.root, self._listing = st.open_root_listing(self.zarr_store, store)
        self.allow_incomplete = bool(allow_incomplete)
        #: Incomplete node paths that selections skipped (``allow_incomplete=True``).
        self.skipped: list[str] = []
        self._grids: dict[str, st.Grid] = {}

    def __repr__(self):
        return (f"<Cohort {self.location}: {len(self.runs)} runs, "
                f"{len(self.maps)} map collections, {len(self.grids)} grids>")

    @property
    def attrs(self) -> dict:
        """Root attributes: format, versions, and ``provenance``, every operation's record
        (:func:`chunkglm.io.layout.provenance_records`), oldest first."""
        return {**dict(self.root.attrs[st.ATTR]), "provenance": st.provenance_records(self.root)}

    @cached_property
    def runs(self) -> dict[str, Node]:
        """Complete run nodes by name (an incomplete one's name raises StoreError)."""
        return self._nodes("runs")

    @cached_property
    def maps(self) -> dict[str, Node]:
        """Complete map collections by name (an incomplete one's name raises StoreError)."""
        return self._nodes("maps")

    @cached_property
    def grids(self) -> list[str]:
        """Complete grid ids."""
        return [n for n, ok in st.node_status(self.root, "grids", self._listing).items() if ok]

    @property
    def incomplete(self) -> list[str]:
        """Nodes whose writing was interrupted (re-run the conversion)."""
        return [f"{kind}/{n}" for kind in st.KINDS
                for n, ok in st.node_status(self.root, kind, self._listing).items() if not ok]

    def _nodes(self, kind):
        found = st.node_attributes(self.root, kind, self._listing)
        nodes = {}
        for name, attrs in found.items():
            if attrs:
                node = nodes[name] = Node(self, kind, name)
                node.__dict__["attrs"] = attrs  # read once, here: the version this cohort reads
        return _Nodes(self, kind, nodes, sorted(n for n, attrs in found.items() if not attrs))

    def check_selection(self, incomplete: list[str]) -> None:
        """Refuse (StoreError) or, with ``allow_incomplete``, skip and warn about
        the incomplete node paths a selection matched."""
        if not incomplete:
            return
        if not self.allow_incomplete:
            raise StoreError(incomplete_message(incomplete, self.location))
        new = [path for path in incomplete if path not in self.skipped]
        self.skipped.extend(new)
        if new:
            warnings.warn(f"skipping incomplete node(s) of {self.location}: {', '.join(new)}", stacklevel=3)

    def grid(self, grid_id: str):
        """Load one grid (volume: affine, shape, mask; surface: parts, geometry, mask)."""
        if grid_id not in self._grids:
            self._grids[grid_id] = surface.read_grid(self.root, grid_id)
        return self._grids[grid_id]

    def node(self, path: str) -> Node:
        """A node by path (``runs/<name>``, ``maps/<name>``) or bare run name."""
        kind, _, name = path.partition("/") if "/" in path else ("runs", "", path)
        nodes = {"runs": self.runs, "maps": self.maps}.get(kind, {})
        if name in getattr(nodes, "incomplete", ()):
            raise StoreError(incomplete_message([f"{kind}/{name}"], self.location, selected=True))
        if name not in nodes:
            raise StoreError(
                f"{self.location} has no complete node {path!r}. It has runs "
                f"{sorted(self.runs)[:5]}... and maps {sorted(self.maps)[:5]}."
            )
        return nodes[name]

    def select(self, **entities) -> list[Node]:
        """Runs whose BIDS entities match, e.g. ``select(sub=["01", "02"], task="main")``.

        Values may be a label or a list of labels, with or without prefix.
        Incomplete runs that match (by the entities of their name) raise
        StoreError, or are skipped when the cohort allows incomplete nodes.
        """
        wanted = {key: _labels(value, key) for key, value in entities.items() if value is not None}
        unknown = set(wanted) - {"sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "space"}
        if unknown:
            raise InputError(f"unknown BIDS entities {sorted(unknown)}; use sub, ses, task, run, acq, ...")

        def matches(found):
            return all(str(found.get(k)) in v for k, v in wanted.items())

        self.check_selection([f"runs/{name}" for name in self.runs.incomplete if matches(parse_entities(name))])
        return [node for node in self.runs.values() if matches(node.entities)]

    def to_datatree(self) -> xr.DataTree:
        """The whole store as a lazy xarray DataTree (from its consolidated metadata where it has it)."""
        return xr.open_datatree(self.zarr_store, engine="zarr", zarr_format=3,
                                consolidated=self._listing is not None, chunks={})

    def to_nifti(self, path: str, out=None, variable=None):
        """Shortcut for ``self.node(path).to_nifti(out)``."""
        return self.node(path).to_nifti(out, variable)


class _Nodes(dict):
    """Complete nodes by name; the name of an incomplete one raises StoreError (not KeyError)."""

    def __init__(self, cohort, kind, nodes, incomplete):
        super().__init__(nodes)
        self.cohort, self.kind, self.incomplete = cohort, kind, list(incomplete)

    def __missing__(self, name):
        if name in self.incomplete:
            raise StoreError(incomplete_message([f"{self.kind}/{name}"], self.cohort.location, selected=True))
        raise KeyError(name)


#: What reading a damaged metadata document (zarr.json) raises.
DAMAGED_METADATA = (json.JSONDecodeError, UnicodeDecodeError, zarr.errors.MetadataValidationError, TypeError)


def damaged_metadata_message(path: str, err: Exception) -> str:
    """One line for a node whose arrays' metadata documents cannot be read."""
    return (f"{path}: a metadata document (zarr.json) of its arrays is damaged "
            f"({type(err).__name__}: {err}); run `chunkglm verify STORE --repair` to re-convert the "
            "node from its unchanged sources (or convert the inputs again with --overwrite).")


def incomplete_message(paths, location, selected=False) -> str:
    """One message for incomplete nodes a selection hit: which, why, what to do."""
    skip = ("" if selected else ", or pass allow_incomplete=True (--allow-incomplete) to skip them")
    return (f"{location} has {len(paths)} incomplete node(s) among those selected: {', '.join(paths)} "
            "(a conversion was cut off or is still running; an incomplete node is never read). "
            f"Re-run `chunkglm convert` on the same inputs to complete them{skip}.")


def _labels(value, key):
    values = [value] if isinstance(value, str | int) else list(value)
    return {str(v).removeprefix(f"{key}-") for v in values}


def open_cohort(store, storage_options=None, *, allow_incomplete=False) -> Cohort:
    """Open a cohort store lazily.

    Parameters
    ----------
    store : str or Path
        Local path or fsspec URL, e.g. ``s3://bucket/cohort.zarr``.
    storage_options : dict, optional
        fsspec options for URLs (endpoint, credentials); used only to connect.
    allow_incomplete : bool
        Selections skip incomplete nodes (with a warning) instead of raising.

    Returns
    -------
    Cohort
        ``.runs`` / ``.maps`` (complete nodes), ``.select(sub=..., task=...)``,
        ``.node(path).to_dataset()`` (lazy xarray), ``.to_nifti(path)``,
        ``.to_datatree()``.

    Examples
    --------
    >>> cohort = chunkglm.open_cohort("cohort.zarr")  # doctest: +SKIP
    >>> run = cohort.select(sub="01", task="main")[0]  # doctest: +SKIP
    >>> run.to_dataset().bold  # (time, voxel) dask-backed  # doctest: +SKIP
    """
    return Cohort(store, storage_options, allow_incomplete=allow_incomplete)

