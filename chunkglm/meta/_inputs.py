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

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, plan_voxel_chunks
from chunkglm.errors import InputError
from chunkglm.io import layout as st
from chunkglm.io.cohort import Node, open_cohort
from chunkglm.io.inputs import (
    COORD_NAMES,
    DERIVATIONS,
    MAP_TYPES,
    STORED_NAMES,
    MapsView,
    check_map_paths,
    stage_inputs,
    write_coords,
)
from chunkglm.io.scratch import TemporaryFolder
from chunkglm.io.write_run import write_rows
from chunkglm.meta import _nimare_inputs as nm

#: Map types a meta-analysis collection may hold.
ROLES = MAP_TYPES

_TASK_MEMORY = 2 * 2**30

#: The one maps view of the store's collections (:class:`chunkglm.io.inputs.MapsView`): image ids,
#: study ids, sample sizes, the (image, voxel) array of each map type and what can be derived.
MetaMaps = MapsView


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
            keep = TemporaryFolder("chunkglm-meta-")  # removed with the MetaMaps
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
    """Validate a table of map paths; return it with ``id``, ``study_id``, ``sample_sizes`` settled
    (a ``con`` column, NiMARE 0.0.x's name, is the ``beta`` maps)."""
    table = nm.with_new_image_types(table)
    roles = [r for r in ROLES if r in table.columns]
    if not roles:
        raise InputError(f"the table has no map column: give paths in columns among {list(ROLES)}; "
                         f"it has {list(table.columns)}.")
    if len(table) < 2:
        raise InputError(f"a meta-analysis needs at least 2 images; the table has {len(table)} row(s).")
    check_map_paths(table, roles)
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
    staged = stage_inputs(table, "maps", mask_img=mask_img, map_types=roles, store=store, collection=collection,
                          chunk_bytes=chunk_bytes, task_memory=task_memory, storage_options=storage_options)
    return staged.nodes[0]


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
    st.resume_swap(root, "maps", collection)
    node = st.begin_version(root, "maps", collection)  # a complete node is replaced, never deleted first
    plan = plan_voxel_chunks(len(table), grid.n_voxels, 4, chunk_bytes)
    try:
        for role in roles:
            def fill(out, start, stop, values=arrays[role]):
                out[:] = values[start:stop]
                return bool(np.isfinite(out).any())

            write_rows(node, role, ("image", "voxel"), plan, fill, task_memory, f"{role} maps")
        write_coords(node, table)
    except BaseException:
        st.discard_version(root, node)
        raise
    st.finish_node(node, {"grid_id": grid_id, "variables": roles, "masker": type(masker).__name__},
                   {"kind": "maps", "sources": [{"role": r, "id": str(i), "path": str(p)} for r in roles
                                                for i, p in zip(table["id"], table[r])]})
    st.publish_version(root, "maps", collection, node)
    return open_cohort(store, storage_options).maps[collection]
