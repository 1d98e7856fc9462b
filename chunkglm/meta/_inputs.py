"""Meta-analysis inputs -> one ``maps/<collection>`` node holding several variables.

A collection for meta-analysis stacks, over the same images (studies), any
of the map types ``z, t, beta, varcope, se`` as (image, voxel) float32
arrays with the same chunking, and per-image coordinates ``image`` (the
image id), ``study_id`` and ``sample_sizes``. Its attrs carry ``grid_id``
and ``variables`` (the map types present), as every maps node.

Inputs are a pandas table of NIfTI paths (one row per image, columns among
``z, t, beta, varcope, se, sample_sizes, study_id, id``) or a NiMARE
``Dataset`` (its ``images``/``metadata`` tables and its mask). They are read
once into a store (a temporary one unless the caller gives a store);
everything after that is a dask graph over voxel blocks of the store.

Derived inputs (NiMARE's ``nimare.transforms``; NiMARE's estimators never
derive them themselves, its ``ImageTransformer`` must be run first): when a
role is absent, ``varcope = se**2``, ``se = sqrt(varcope)`` (old API) and
``z = t_to_z(t, sample_size - 1)``
are computed on the fly from the stored maps (see :data:`DERIVATIONS`).
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, plan_voxel_chunks
from chunkglm.errors import InputError
from chunkglm.io import store as st
from chunkglm.io.cohort import Node, open_cohort
from chunkglm.io.nifti import NiftiReader, fortran_indices, header_to_text, mask_from_voxels, scale_values
from chunkglm.io.nifti import load_image as _load
from chunkglm.io.write_run import write_rows
from chunkglm.meta import _nimare_inputs as nm

#: Map types a meta-analysis collection may hold.
ROLES = ("z", "t", "beta", "varcope", "se")

#: role -> (stored roles it is derived from). Applied per voxel block.
DERIVATIONS = {"varcope": ("se",), "se": ("varcope",), "z": ("t", "sample_sizes")}

_TASK_MEMORY = 2 * 2**30

#: Map type -> variable names it may be stored under (``chunkglm.convert`` and the
#: second level call beta "effect" and varcope "variance").
STORED_NAMES = {"beta": ("beta", "effect"), "varcope": ("varcope", "variance")}
#: Per-image coordinate -> names it may be stored under.
COORD_NAMES = {"sample_sizes": ("sample_sizes", "sample_size"), "study_id": ("study_id", "study")}


@dataclass
class MetaMaps:
    """A meta-analysis collection as the estimators read it.

    Attributes
    ----------
    node : chunkglm.io.cohort.Node
        The ``maps/<collection>`` node.
    voxels : ndarray of int or None
        Indices into the node's voxel axis to analyse (None: all).
    keep : object
        Whatever must stay alive while the node is read (a temporary folder).
    """

    node: object
    voxels: np.ndarray | None = None
    keep: object = field(default=None, repr=False)

    @property
    def variables(self) -> list[str]:
        """Map types stored in the node (``effect``/``variance`` read as ``beta``/``varcope``)."""
        stored = list(self.node.attrs.get("variables", []))
        found = [r for r in ROLES if any(n in stored for n in STORED_NAMES.get(r, (r,)))]
        return found + [v for v in stored if v not in found and not any(v in n for n in STORED_NAMES.values())]

    def _variable(self, role) -> str:
        stored = list(self.node.attrs.get("variables", []))
        return next((n for n in STORED_NAMES.get(role, (role,)) if n in stored), role)

    @property
    def n_images(self) -> int:
        """K, the number of images (studies)."""
        return int(self._group()["image"].shape[0])

    @property
    def ids(self) -> list[str]:
        """Image ids, in row order."""
        return [str(v) for v in self._group()["image"][...]]

    def _group(self):
        return self.node.cohort.root[self.node.path]

    def coord(self, name) -> np.ndarray | None:
        """A per-image coordinate (``study_id``, ``sample_sizes``) or None (read eagerly: K values)."""
        group = self._group()
        keys = set(group.array_keys())
        found = next((n for n in COORD_NAMES.get(name, (name,)) if n in keys), None)
        return None if found is None else np.asarray(group[found][...])

    @property
    def sample_sizes(self) -> np.ndarray | None:
        """Sample size per image (NiMARE: mean of the image's ``sample_sizes`` list)."""
        values = self.coord("sample_sizes")
        return None if values is None else values.astype(np.float64)

    @property
    def grid(self):
        """The node's grid (affine, shape, mask, ijk)."""
        return self.node.grid

    @property
    def ijk(self) -> np.ndarray:
        """(n_voxels, 3) indices of the analysed voxels."""
        ijk = self.grid.ijk
        return ijk if self.voxels is None else ijk[self.voxels]

    def data(self, role):
        """(K, V) float32 dask array of a stored map type."""
        array = self.node.data(self._variable(role)).data
        return array if self.voxels is None else array[:, self.voxels]

    def available(self) -> set[str]:
        """Roles readable as stored or derived (``sample_sizes`` included when present)."""
        roles = set(self.variables) | ({"sample_sizes"} if self.sample_sizes is not None else set())
        for role, sources in DERIVATIONS.items():
            if all(s in roles for s in sources):
                roles.add(role)
        return roles

    def mask_img(self) -> nib.Nifti1Image:
        """The analysed voxels as a uint8 mask on the node's grid."""
        return mask_from_voxels(self.ijk, self.grid.shape, self.grid.affine)

    def describe(self) -> dict:
        """Inputs for provenance: the store and collection."""
        return {"store": self.node.cohort.location, "collection": self.node.name,
                "n_images": self.n_images, "variables": self.variables}


# -- what was given ----------------------------------------------------------------


def resolve(inputs, mask=None, *, store=None, chunk_bytes=DEFAULT_CHUNK_BYTES, resample=None) -> MetaMaps:
    """Any accepted input -> :class:`MetaMaps`.

    Parameters
    ----------
    inputs : MetaMaps, maps Node, pandas.DataFrame or nimare.dataset.Dataset
    mask : str, Path or nibabel image, optional
        Restricts the analysed voxels (must lie on the collection's grid); for
        NIfTI inputs it is the conversion's mask (default: a Dataset's own mask,
        else every voxel of the grid).
    store : str or Path, optional
        Where NIfTI inputs are converted (default: a temporary store).
    chunk_bytes : int or str
        Chunk size of a conversion.
    resample : dict, optional
        ``nilearn.image.resample_to_img`` options: NIfTI maps not on the mask's grid
        are resampled onto it at conversion (NiMARE's way); None refuses them.
    """
    if isinstance(inputs, MetaMaps):
        maps = inputs
    elif isinstance(inputs, Node):
        if inputs.kind != "maps":
            raise InputError(f"a store node given to a meta-analysis must be a maps collection "
                             f"(open_cohort(store).maps[name]); received the run {inputs.name!r}.")
        maps = MetaMaps(inputs)
    elif isinstance(inputs, pd.DataFrame) or _is_nimare_dataset(inputs):
        keep = None
        if store is None:
            keep = tempfile.TemporaryDirectory(prefix="chunkglm-meta-")
            store = Path(keep.name) / "meta.zarr"
        collection = f"meta_{uuid.uuid4().hex[:12]}"
        if nm.is_masker(mask) and not nm.is_voxel_masker(mask):
            node = convert_masked(inputs, mask, store, collection, resample or nm.RESAMPLE_DEFAULTS, chunk_bytes)
        else:
            node = convert_meta_maps(inputs, store, collection, mask_img=nm.mask_image(mask), chunk_bytes=chunk_bytes,
                                     resample_kwargs=resample)
        return MetaMaps(node, keep=keep)  # the mask defined the voxel axis
    else:
        raise InputError(
            "a meta-analysis takes a maps collection of a cohort store (open_cohort(store).maps[name]), "
            "a pandas DataFrame of NIfTI paths (columns among z, t, beta, varcope, se, sample_sizes, "
            f"study_id) or a NiMARE Dataset; received {type(inputs).__name__}.")
    return maps if mask is None else _restrict(maps, mask)


def _is_nimare_dataset(obj) -> bool:
    return nm.is_collection(obj)


def _restrict(maps: MetaMaps, mask) -> MetaMaps:
    if nm.is_masker(mask) and not nm.is_voxel_masker(mask):
        raise InputError(f"a {type(mask).__name__} averages across voxels: it applies to NIfTI inputs (converted "
                         "through it), not to a stored collection; give a mask image or a NiftiMasker.")
    img = nm.mask_image(mask)
    grid = maps.grid
    if img.shape[:3] != grid.shape or not np.allclose(img.affine, grid.affine, atol=1e-4):
        raise InputError(f"mask (shape {img.shape[:3]}) is not on the grid of the collection "
                         f"{maps.node.name!r} (shape {grid.shape}); resample it onto that grid.")
    selected = np.asarray(img.dataobj).reshape(grid.shape) != 0
    if (selected & ~grid.mask).any():
        raise InputError(f"mask selects voxels that the collection {maps.node.name!r} does not hold; "
                         "convert the maps with this mask, or a larger one.")
    inside = selected[grid.mask]
    if not inside.any():
        raise InputError("mask selects no voxel of the collection.")
    voxels = None if inside.all() else np.flatnonzero(inside)
    if maps.voxels is not None and voxels is not None:
        voxels = np.intersect1d(maps.voxels, voxels)
    return MetaMaps(maps.node, voxels if voxels is not None else maps.voxels, maps.keep)


# -- the table ----------------------------------------------------------------------


def table_from_dataset(dataset) -> tuple[pd.DataFrame, object]:
    """A NiMARE Dataset's (or Studyset's) images + sample sizes as a table, and its mask image."""
    table, masker = nm.table_from_collection(dataset, ROLES)
    roles = [r for r in ROLES if r in table.columns and table[r].notna().any()]
    table = table.drop(columns=[r for r in ROLES if r in table.columns and r not in roles])
    return table, nm.mask_image(masker)


def check_table(table: pd.DataFrame) -> pd.DataFrame:
    """Validate a table of map paths; return it with ``id``, ``study_id``, ``sample_sizes`` settled."""
    roles = [r for r in ROLES if r in table.columns]
    if not roles:
        raise InputError(f"the table has no map column: give paths in columns among {list(ROLES)}; "
                         f"it has {list(table.columns)}.")
    if len(table) < 2:
        raise InputError(f"a meta-analysis needs at least 2 images; the table has {len(table)} row(s).")
    for role in roles:
        missing = table[role].isna()
        if missing.any():
            raise InputError(
                f"column {role!r} has no path in rows {np.flatnonzero(missing)[:10].tolist()}: every row "
                f"needs every map column it has ({len(table)} rows). Drop those rows, or the column.")
    table = table.reset_index(drop=True).copy()
    if "id" not in table.columns:
        table["id"] = [f"image-{i:05d}" for i in range(len(table))]
    if "study_id" not in table.columns:
        table["study_id"] = table["id"].astype(str)
    if "sample_sizes" in table.columns:
        table["sample_sizes"] = [_mean_sample_size(v, i) for i, v in enumerate(table["sample_sizes"])]
    return table


def _mean_sample_size(value, row) -> float:
    """NiMARE keeps a list per image and uses its mean."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    if values.size == 0 or not np.isfinite(values).all() or (values <= 0).any():
        raise InputError(f"sample_sizes of row {row} is {value!r}: give a positive number (or a list "
                         "of them) for every image.")
    return float(values.mean())


# -- conversion ---------------------------------------------------------------------


def convert_meta_maps(table_or_dataset, store, collection, mask_img=None, *,
                      chunk_bytes=DEFAULT_CHUNK_BYTES, task_memory=_TASK_MEMORY, storage_options=None,
                      resample_kwargs=None):
    """Write ``maps/<collection>`` with one (image, voxel) variable per map type.

    Parameters
    ----------
    table_or_dataset : pandas.DataFrame or nimare.dataset.Dataset
        One row per image: NIfTI paths in columns among ``z, t, beta,
        varcope, se``; optional ``sample_sizes`` (number or list), ``study_id``
        and ``id``.
    store : str or Path
        Cohort store (created if needed).
    collection : str
        Node name.
    mask_img : str, Path or nibabel image, optional
        Defines the voxel axis; default the Dataset's mask, else every voxel
        of the first image's grid.
    chunk_bytes : int or str
        Target uncompressed bytes per chunk (per variable).
    resample_kwargs : dict, optional
        Maps not on the mask's grid are resampled onto it with
        ``nilearn.image.resample_to_img(img, mask, **resample_kwargs)`` (NiMARE's
        way, once, here); None (default) refuses them.

    Returns
    -------
    chunkglm.io.cohort.Node
        The complete node.
    """
    if _is_nimare_dataset(table_or_dataset):
        table, dataset_mask = table_from_dataset(table_or_dataset)
        mask_img = dataset_mask if mask_img is None else mask_img
    elif isinstance(table_or_dataset, pd.DataFrame):
        table = table_or_dataset
    else:
        raise InputError(f"convert_meta_maps takes a DataFrame of NIfTI paths or a NiMARE Dataset; "
                         f"received {type(table_or_dataset).__name__}.")
    table = check_table(table)
    roles = [r for r in ROLES if r in table.columns]
    if resample_kwargs is not None and mask_img is not None:
        with nm.temporary_folder() as folder:
            resampled = nm.resample_paths(table, roles, mask_img, resample_kwargs, folder)
            return _convert(resampled, roles, store, collection, mask_img, chunk_bytes, task_memory, storage_options)
    return _convert(table, roles, store, collection, mask_img, chunk_bytes, task_memory, storage_options)


def _convert(table, roles, store, collection, mask_img, chunk_bytes, task_memory, storage_options):
    grid = _grid(table, roles, mask_img)
    root = st.open_root(store, storage_options, mode="a")
    grid_id = st.write_grid(root, grid)
    node = st.start_node(root, "maps", collection)
    try:
        sources, header = _write_variables(node, table, roles, grid, chunk_bytes, task_memory)
    except BaseException:
        del root[f"maps/{collection}"]
        raise
    _write_coords(node, table)
    st.finish_node(node, {"grid_id": grid_id, "variables": roles},
                   {"kind": "maps", "sources": sources, "nifti_header": header})
    return open_cohort(store, storage_options).maps[collection]


def _grid(table, roles, mask_img) -> st.Grid:
    """The voxel grid: the mask's, after checking every image lies on it."""
    first = _load(table[roles[0]].iloc[0])
    if mask_img is None:
        mask = np.ones(first.shape[:3], dtype=bool)
        affine = first.affine
    else:
        img = _load(mask_img)
        mask = np.asarray(img.dataobj).reshape(img.shape[:3]) != 0
        affine = img.affine
    for role in roles:
        for row, path in enumerate(table[role]):
            img = _load(path)
            if img.shape[:3] != mask.shape or not np.allclose(img.affine, affine, atol=1e-4):
                raise InputError(
                    f"the {role} map of row {row} ({path}) is on another grid (shape {img.shape[:3]}, "
                    f"affine\n{img.affine}) than the mask/first map (shape {mask.shape}, affine\n{affine}). "
                    "Resample all maps onto one grid first (e.g. nilearn.image.resample_to_img).")
            if len(img.shape) == 4 and img.shape[3] != 1:
                raise InputError(f"the {role} map of row {row} ({path}) is 4-D {img.shape}: give one 3-D map per row.")
    if not mask.any():
        raise InputError("the mask holds no voxel.")
    return st.Grid(np.asarray(affine, dtype=float), mask)


def _write_variables(node, table, roles, grid, chunk_bytes, task_memory):
    fidx = fortran_indices(grid.ijk, grid.shape)
    plan = plan_voxel_chunks(len(table), grid.n_voxels, 4, chunk_bytes)
    sources, headers = [], []
    for role in roles:
        paths = [str(p) for p in table[role]]

        def fill(out, start, stop, paths=paths, role=role):
            finite = False
            for row, path in enumerate(paths[start:stop], start=start):
                with NiftiReader(path) as reader:
                    info = reader.info
                    (_, raw), = reader.iter_volumes(0, 1)
                    out[row - start] = scale_values(raw[fidx], info.slope, info.inter)
                    sha, size = reader.finish()
                    headers.append(info.header_bytes)
                sources.append({"role": role, "id": str(table["id"].iloc[row]), "path": path,
                                "sha256": sha, "size": size})
                finite = finite or bool(np.isfinite(out[row - start]).any())
            return finite

        write_rows(node, role, ("image", "voxel"), plan, fill, task_memory, f"{role} maps")
    return sources, header_to_text(headers[0])


def _write_coords(node, table):
    st.write_array(node, "image", np.array(table["id"].astype(str)), ("image",))
    st.write_array(node, "study_id", np.array(table["study_id"].astype(str)), ("image",))
    if "sample_sizes" in table.columns:
        st.write_array(node, "sample_sizes", np.asarray(table["sample_sizes"], dtype=np.float64), ("image",))


def convert_masked(table, masker, store, collection, resample_kwargs, chunk_bytes=DEFAULT_CHUNK_BYTES, *,
                   task_memory=_TASK_MEMORY, storage_options=None):
    """Write ``maps/<collection>`` from NIfTI maps transformed by a masker that does more than
    select voxels (e.g. a NiftiLabelsMasker: one feature per label), as NiMARE masks them.

    The node's voxel axis is the masker's features, on a (n_features, 1, 1) grid; results
    come back as images through the masker's ``inverse_transform``.
    """
    table = check_table(table)
    roles = [r for r in ROLES if r in table.columns]
    arrays = nm.masked_arrays(table, roles, masker, resample_kwargs)
    n_features = next(iter(arrays.values())).shape[1]
    grid = st.Grid(np.eye(4), np.ones((n_features, 1, 1), dtype=bool))
    root = st.open_root(store, storage_options, mode="a")
    grid_id = st.write_grid(root, grid)
    node = st.start_node(root, "maps", collection)
    plan = plan_voxel_chunks(len(table), grid.n_voxels, 4, chunk_bytes)
    for role in roles:
        def fill(out, start, stop, values=arrays[role]):
            out[:] = values[start:stop]
            return bool(np.isfinite(out).any())

        write_rows(node, role, ("image", "voxel"), plan, fill, task_memory, f"{role} maps")
    _write_coords(node, table)
    st.finish_node(node, {"grid_id": grid_id, "variables": roles, "masker": type(masker).__name__},
                   {"kind": "maps", "sources": [{"role": r, "id": str(i), "path": str(p)} for r in roles
                                                for i, p in zip(table["id"], table[r])]})
    return open_cohort(store, storage_options).maps[collection]
