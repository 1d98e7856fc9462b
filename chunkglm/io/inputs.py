"""One way to stage inputs: any accepted image input -> store node(s), and one maps view.

Every model takes images as nilearn and NiMARE users give them: file paths,
nibabel images (3-D or 4-D), lists of them, a pandas DataFrame of paths, or
nodes of a cohort store. :func:`stage_inputs` turns them into store nodes:

- store nodes pass through unchanged (nothing is copied);
- ``kind="runs"``: 4-D images are linked (paths) or saved (in-memory images)
  into a scratch folder and converted with :func:`chunkglm.io.convert.convert`
  (mask, resampling and smoothing volume by volume) into ``runs/<name>`` nodes;
- ``kind="maps"``: 3-D images -- a list or one 4-D image for one map type, or a
  DataFrame with one column of paths/images per map type and per-image
  coordinates -- are stacked into one ``maps/<collection>`` node holding an
  ``(image, voxel)`` float32 array per map type. A complete node is never
  deleted when it is written again: the new version is staged beside it and
  swapped in, its completion marker last (:func:`chunkglm.io.layout.begin_version`).

The scratch folder (and its temporary store) belongs to the caller: it is
removed with ``owner`` (``weakref.finalize``), or with the returned
:class:`StagedInputs` when no owner is given.

:class:`MapsView` is what a group model or a meta-analysis reads: a maps node,
the voxels of it to analyse, the ``(image, voxel)`` arrays per map type, the
grid, and the per-image coordinates (image id, subject, contrast, sample
sizes, study id).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.image import crop_img
from nilearn.surface import SurfaceImage

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, plan_voxel_chunks
from chunkglm.errors import InputError
from chunkglm.io import consolidated, locks
from chunkglm.io import layout as st
from chunkglm.io.cohort import Node, open_cohort
from chunkglm.io.convert import convert
from chunkglm.io.nifti import (NiftiReader, fortran_indices, header_to_text, mask_from_voxels, read_info,
                               scale_values, stage_image)
from chunkglm.io.nifti import load_image as _load
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.scratch import owned_name, remove_stale
from chunkglm.io.surface_convert import convert_surface_runs, is_surface_input, smoothed_surface
from chunkglm.io.surface_maps import convert_surface_maps, is_cifti_map
from chunkglm.io.write_run import write_rows

__all__ = ["COORD_NAMES", "DERIVATIONS", "MAP_TYPES", "STORED_NAMES", "MapsView", "StagedInputs",
           "maps_table", "scratch_folder", "stage_inputs", "write_coords", "write_maps_node"]

#: Map types a maps node may hold, in the order they are listed.
MAP_TYPES = ("z", "t", "beta", "varcope", "se")
#: map type -> (map types or coordinates it can be derived from, block by block).
DERIVATIONS = {"varcope": ("se",), "se": ("varcope",), "z": ("t", "sample_sizes")}
#: Map type -> variable names it may be stored under (``chunkglm.convert`` and the
#: second level call beta "effect" and varcope "variance").
STORED_NAMES = {"beta": ("beta", "effect"), "varcope": ("varcope", "variance")}
#: Per-image coordinate -> names it may be stored under.
COORD_NAMES = {"sample_sizes": ("sample_sizes", "sample_size"), "study_id": ("study_id", "study")}
#: DataFrame columns of :func:`stage_inputs` (kind "maps") stored as per-image coordinates.
COORDINATES = ("study_id", "sample_sizes", "subject", "contrast")

_TASK_MEMORY = 2 * 2**30


# -- the maps view -------------------------------------------------------------------------


@dataclass
class MapsView:
    """A maps node as models read it: (image, voxel) arrays per map type, grid, coordinates.

    Attributes
    ----------
    node : chunkglm.io.cohort.Node
        The ``maps/<collection>`` node.
    voxels : ndarray of int or None
        Indices into the node's voxel axis to analyse (None: all).
    keep : object
        Whatever must stay alive while the node is read (a scratch folder).
    """

    node: object
    voxels: np.ndarray | None = None
    keep: object = field(default=None, repr=False)

    @property
    def variables(self) -> list[str]:
        """Map types stored in the node (``effect``/``variance`` read as ``beta``/``varcope``)."""
        stored = list(self.node.attrs.get("variables", []))
        found = [r for r in MAP_TYPES if any(n in stored for n in STORED_NAMES.get(r, (r,)))]
        return found + [v for v in stored if v not in found and not any(v in n for n in STORED_NAMES.values())]

    def _variable(self, role) -> str:
        stored = list(self.node.attrs.get("variables", []))
        return next((n for n in STORED_NAMES.get(role, (role,)) if n in stored), role)

    @property
    def n_images(self) -> int:
        """The number of images (maps, studies)."""
        return int(self._group()["image"].shape[0])

    @property
    def ids(self) -> list[str]:
        """Image ids, in row order."""
        return [str(v) for v in self._group()["image"][...]]

    def _group(self):
        return self.node.cohort.root[self.node.data_path]

    def coord(self, name) -> np.ndarray | None:
        """A per-image coordinate (``study_id``, ``sample_sizes``, ``subject``...) or None
        (read eagerly: one value per image)."""
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

    def data(self, role=None):
        """(image, voxel) float32 dask array of a stored map type (default: the first stored)."""
        array = self.node.data(None if role is None else self._variable(role)).data
        return array if self.voxels is None else array[:, self.voxels]

    def available(self) -> set[str]:
        """Map types readable as stored or derived (``sample_sizes`` included when present)."""
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


# -- what stage_inputs returns -----------------------------------------------------------------


@dataclass
class StagedInputs:
    """Store nodes for a model's inputs.

    Attributes
    ----------
    nodes : list of chunkglm.io.cohort.Node
        One per run (``kind="runs"``), or the one maps node.
    converted : bool
        False when store nodes were given (passed through unchanged).
    folder : Path or None
        The scratch folder holding staged files and the temporary store.
    paths : list of str
        The staged files (runs), in input order.
    infos : list of chunkglm.io.nifti.NiftiInfo
        Their headers.
    """

    nodes: list
    converted: bool = False
    folder: Path | None = None
    paths: list = field(default_factory=list)
    infos: list = field(default_factory=list)

    def maps(self) -> MapsView:
        """The maps node as a :class:`MapsView` (all its voxels); it keeps the scratch folder alive."""
        return MapsView(self.nodes[0], None, keep=self)

    def convert_again(self, store_name: str, **options) -> list:
        """The same staged runs converted once more into ``<folder>/<store_name>``
        (e.g. without resampling or smoothing); returns their nodes, in input order."""
        store = self.folder / store_name
        convert(self.paths, store, **options)
        cohort = open_cohort(store)
        return [cohort.runs[_stem(p)] for p in self.paths]


def scratch_folder(owner, prefix: str, parent=None) -> Path:
    """A new temporary folder in ``parent`` (default the temporary directory), removed (with
    everything in it) when ``owner`` is collected."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    remove_stale(parent, prefix)  # left by killed processes
    folder = parent / owned_name(prefix)
    folder.mkdir(mode=0o700)
    weakref.finalize(owner, shutil.rmtree, folder, True)
    return folder


# -- the one entry point --------------------------------------------------------------------------


def stage_inputs(items, kind: str = "runs", *, mask_img=None, target_affine=None, target_shape=None,
                 smoothing_fwhm=None, map_types=("effect",), chunk_bytes=DEFAULT_CHUNK_BYTES,
                 folder=None, owner=None, store=None, collection=None, argument=None,
                 resample_to_mask=False, task_memory=_TASK_MEMORY, storage_options=None) -> StagedInputs:
    """Any accepted image input -> store node(s).

    Parameters
    ----------
    items : store node, path, nibabel image, list of them, or pandas DataFrame
        Store nodes (all of them, of ``kind``) pass through unchanged. For
        ``"runs"``: 4-D images, or surface runs (nilearn SurfaceImages, GIFTI
        pairs, CIFTI series: :mod:`chunkglm.io.surface_convert`). For ``"maps"``: surface maps
        (SurfaceImages, GIFTI pairs, CIFTI dscalars: :mod:`chunkglm.io.surface_maps`; ``mask_img`` then a
        (n_vertices,) bool array), or 3-D images (or one 4-D image,
        one map per volume) of the first of ``map_types``, or a DataFrame with
        one column of paths/images per map type, optional per-image
        coordinates (``study_id``, ``sample_sizes``, ``subject``, ``contrast``)
        and image ids (``id``).
    kind : {"runs", "maps"}
    mask_img : path, nibabel image, callable or ndarray, optional
        The voxels stored (surface runs: a (n_vertices,) bool array over the
        runs' parts). A callable receives the staged files' headers
        (:class:`chunkglm.io.nifti.NiftiInfo`, with ``.path``) and returns a
        mask image or None (runs only: e.g. nilearn's EPI mask of the runs).
        Default: every voxel of the grid.
    target_affine, target_shape : optional
        Runs: resample every volume onto this grid while converting (a callable
        of the headers may return ``(affine, shape)`` as ``target_affine``).
    smoothing_fwhm : float, optional
        Smooth every volume (runs) or map (maps, with nilearn's masker's
        cropping to the mask: see ``resample_to_mask``).
    map_types : tuple of str
        Maps: the variables written (DataFrame columns), or the one name of a
        list of images.
    chunk_bytes : int or str
        Target uncompressed bytes per chunk.
    folder : Path, optional
        Scratch folder for staged files (and the store); default a new one,
        removed with ``owner`` (or with the returned object).
    owner : object, optional
        The model the scratch folder lives as long as.
    store : str or Path, optional
        Where the nodes are written; default ``<folder>/store.zarr``.
    task_memory, storage_options : optional
        As :func:`chunkglm.io.convert.convert`'s (memory of one writing task;
        fsspec options of ``store``).
    collection : str, optional
        Maps node name; default a new unique one.
    argument : str, optional
        The caller's parameter name, for error messages.
    resample_to_mask : bool
        Maps: images not on the mask's grid are resampled onto it as nilearn's
        NiftiMasker does (continuous, onto the mask's bounding box, clipped to
        the inputs' range), then smoothed; False refuses them.

    Returns
    -------
    StagedInputs

    Raises
    ------
    InputError
        Naming what was received and what to give instead.
    """
    if kind not in ("runs", "maps"):
        raise InputError(f"kind must be 'runs' or 'maps'; received {kind!r}.")
    argument = argument or ("run_imgs" if kind == "runs" else "maps")
    sizes = {"chunk_bytes": chunk_bytes, "task_memory": task_memory, "storage_options": storage_options}
    if kind == "runs" and _surface_items(items):
        return _stage_surface_runs(list(items) if isinstance(items, list | tuple) else [items], mask_img,
                                   smoothing_fwhm, folder, owner, store, sizes)
    if kind == "maps" and _surface_map_items(items):
        return _stage_surface_maps(list(items) if isinstance(items, list | tuple) else [items], mask_img,
                                   smoothing_fwhm, map_types[0], folder, owner, store, collection, sizes)
    given = _as_items(items, kind, argument)
    if not isinstance(given, pd.DataFrame) and isinstance(given[0], Node):
        return StagedInputs(_store_nodes(given, kind, argument))
    if kind == "maps":
        table = given if isinstance(given, pd.DataFrame) else pd.DataFrame({map_types[0]: _map_images(given)})
        types = tuple(map_types) if isinstance(given, pd.DataFrame) else (map_types[0],)
        return _stage_maps(table, mask_img, smoothing_fwhm, types, folder, owner, store, collection,
                           resample_to_mask, sizes)
    return _stage_runs(given, mask_img, target_affine, target_shape, smoothing_fwhm, folder, owner, store,
                       argument, sizes)


def _as_items(items, kind, argument):
    if isinstance(items, pd.DataFrame):
        if kind != "maps":
            raise InputError(f"{argument} was a DataFrame: a table of map paths stacks maps; runs are "
                             "4-D images (paths, nibabel images or store runs).")
        return items
    if isinstance(items, pd.Series):
        items = items.to_list()
    values = list(items) if isinstance(items, list | tuple) else [items]
    if not values:
        raise InputError(f"{argument} is empty: give at least one image (path, nibabel image or store node).")
    bad = [type(v).__name__ for v in values
           if not isinstance(v, Node | str | Path | nib.spatialimages.SpatialImage)]
    if bad:
        raise InputError(f"{argument} entries must be NIfTI paths, nibabel images or store nodes "
                         f"(chunkglm.open_cohort(store).{kind}[name]); received {sorted(set(bad))}.")
    if any(isinstance(v, Node) for v in values) and not all(isinstance(v, Node) for v in values):
        what = "runs" if kind == "runs" else "maps"
        raise InputError(f"{argument} mixes store {what} and NIfTI images: give one kind.")
    return values


def _store_nodes(nodes, kind, argument):
    wrong = [node for node in nodes if node.kind != kind]
    if wrong:
        raise InputError(f"{argument} must be {kind} of a cohort store (chunkglm.open_cohort(store)."
                         f"{kind}[name]); received the {wrong[0].kind} node {wrong[0].name!r}.")
    return list(nodes)


def _owned_folder(folder, owner, staged_prefix):
    """(folder, holder): a given folder, or a new one removed with ``owner`` (or the holder)."""
    if folder is not None:
        return Path(folder), None
    holder = StagedInputs([])
    return scratch_folder(owner if owner is not None else holder, staged_prefix), holder


def _stem(path) -> str:
    return Path(path).name.split(".")[0]


# -- runs --------------------------------------------------------------------------------------


def _stage_runs(images, mask_img, target_affine, target_shape, smoothing_fwhm, folder, owner, store,
                argument, sizes) -> StagedInputs:
    folder, staged = _owned_folder(folder, owner, "chunkglm-inputs-")
    staged = staged or StagedInputs([])
    paths = [stage_image(image, folder, index, argument) for index, image in enumerate(images)]
    infos = [read_info(path) for path in paths]
    bad = [(image, info.shape) for image, info in zip(images, infos) if len(info.shape) != 4 or 0 in info.shape]
    if bad:
        name = str(bad[0][0]) if isinstance(bad[0][0], str | Path) else type(bad[0][0]).__name__
        empty = "the image is empty: " if 0 in bad[0][1] else ""  # nilearn's word for it
        raise InputError(f"{argument} must be 4-D images (runs); {empty}received shape {bad[0][1]} for {name}.")
    if callable(target_affine):
        target = target_affine(infos)
        target_affine, target_shape = (None, None) if target is None else target
    mask = mask_img(infos) if callable(mask_img) else mask_img
    store = _store_location(store, folder)
    convert(paths, store, mask_img=_mask_path(mask, folder), target_affine=target_affine,
            target_shape=target_shape, smoothing_fwhm=smoothing_fwhm, **sizes)
    cohort = open_cohort(store, sizes["storage_options"])
    staged.nodes, staged.converted, staged.folder = [cohort.runs[_stem(p)] for p in paths], True, folder
    staged.paths, staged.infos = paths, infos
    return staged


def _surface_items(items) -> bool:
    """True for surface runs (SurfaceImages, GIFTI pairs, CIFTI series), one or a list of them."""
    values = list(items) if isinstance(items, list | tuple) else [items]
    return bool(values) and all(is_surface_input(v) for v in values)


def _stage_surface_runs(items, mask, smoothing_fwhm, folder, owner, store, sizes) -> StagedInputs:
    """Surface runs -> ``runs/surface-run-<i>`` nodes of the scratch store, on ``mask`` (elements)."""
    folder, staged = _owned_folder(folder, owner, "chunkglm-inputs-")
    staged = staged or StagedInputs([])
    store = _store_location(store, folder)
    names = convert_surface_runs(items, store, mask=mask, smoothing_fwhm=smoothing_fwhm, **sizes)
    cohort = open_cohort(store, sizes["storage_options"])
    staged.nodes, staged.converted, staged.folder = [cohort.runs[name] for name in names], True, folder
    return staged


def _surface_map_items(items) -> bool:
    """True for surface maps: SurfaceImages, GIFTI pairs ({"left": ..., "right": ...}), CIFTI dscalars (paths, images)."""
    values = list(items) if isinstance(items, list | tuple) else [items]
    return bool(values) and all(
        isinstance(v, SurfaceImage) or (isinstance(v, dict) and v and set(v) <= {"left", "right"})
        or is_cifti_map(v) for v in values)


def _stage_surface_maps(items, mask, smoothing_fwhm, map_type, folder, owner, store, collection,
                        sizes) -> StagedInputs:
    """Surface maps -> one ``maps/<collection>`` node, on ``mask`` (elements); SurfaceImages smoothed
    along the mesh first (nilearn's ``smooth_img``, as its SurfaceMasker smooths)."""
    folder, staged = _owned_folder(folder, owner, "chunkglm-inputs-")
    staged = staged or StagedInputs([])
    store = _store_location(store, folder)
    collection = collection or f"maps_{uuid.uuid4().hex[:12]}"
    items = [smoothed_surface(item, smoothing_fwhm) for item in items]
    convert_surface_maps(items, store, collection, map_type=map_type, mask=mask, **sizes)
    cohort = open_cohort(store, sizes["storage_options"])
    staged.nodes, staged.converted, staged.folder = [cohort.maps[collection]], True, folder
    return staged


def _mask_path(mask, folder: Path) -> str | None:
    if mask is None or isinstance(mask, str | Path):
        return None if mask is None else str(mask)
    path = folder / "mask.nii"
    nib.save(_load(mask), path)
    return str(path)


# -- maps --------------------------------------------------------------------------------------


def _map_images(images) -> list:
    """3-D images of a list, or the volumes of one 4-D image."""
    if len(images) == 1:
        img = _load(images[0])
        if img.ndim == 4 and img.shape[3] > 1:
            return [img.slicer[..., i] for i in range(img.shape[3])]
    return list(images)


def maps_table(table: pd.DataFrame, map_types) -> pd.DataFrame:
    """The map columns present and the ids of a maps table (an ``id`` per row by default)."""
    present = [m for m in map_types if m in table.columns]
    if not present:
        raise InputError(f"the table has no map column: give paths in columns among {list(map_types)}; "
                         f"it has {list(table.columns)}.")
    table = table.reset_index(drop=True).copy()
    if "id" not in table.columns:
        table["id"] = [f"image-{i:05d}" for i in range(len(table))]
    return table


def check_map_paths(table, roles) -> None:
    """Every row of ``table`` has a path in each of the map columns ``roles``, or an InputError."""
    for role in roles:
        missing = table[role].isna()
        if missing.any():
            raise InputError(
                f"column {role!r} has no path in rows {np.flatnonzero(missing)[:10].tolist()}: every row "
                f"needs every map column it has ({len(table)} rows). Drop those rows, or the column.")


def _stage_maps(table, mask_img, smoothing_fwhm, map_types, folder, owner, store, collection,
                resample_to_mask, sizes) -> StagedInputs:
    table = maps_table(table, map_types)
    roles = [m for m in map_types if m in table.columns]
    check_map_paths(table, roles)
    mask = None if mask_img is None else _load(mask_img)
    folder, staged = _owned_folder(folder, owner, "chunkglm-inputs-")
    staged = staged or StagedInputs([])
    work = folder / f"maps-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    table = _staged_files(table, roles, mask, smoothing_fwhm, resample_to_mask, work)
    store = _store_location(store, folder)
    collection = collection or f"maps_{uuid.uuid4().hex[:12]}"
    node = write_maps_node(table, roles, store, collection, mask, **sizes)
    staged.nodes, staged.converted, staged.folder = [node], True, folder
    return staged


def _store_location(store, folder: Path):
    """The store inputs are staged into: as given (a local path, or an object-store URL kept as a
    string), else ``folder/store.zarr``."""
    if store is None:
        return folder / "store.zarr"
    return str(store) if st.is_url(str(store)) else Path(store)


def _staged_files(table, roles, mask, smoothing_fwhm, resample_to_mask, work):
    """Paths for every map: paths as given; in-memory images saved; processed maps saved."""
    images = {role: list(table[role]) for role in roles}
    prep, box = SpatialPreprocessing(None, None, smoothing_fwhm), None
    if mask is not None and resample_to_mask and not all(
            _same_grid(_load(img), mask) for role in roles for img in images[role]):
        # nilearn's masker resamples onto the mask *cropped* to its bounding box
        # (plus one voxel) and smooths there: the crop changes smoothing's edges.
        cropped, box = crop_img(mask, copy=False, return_offset=True)
        prep = SpatialPreprocessing(cropped.affine, cropped.shape[:3], smoothing_fwhm)
    table = table.copy()
    for role in roles:
        clip = _clip_range(images[role]) if prep.needs_range() else None
        table[role] = [_stage_map(img, work / f"{role}_{i:05d}", prep, clip, mask, box)
                       for i, img in enumerate(images[role])]
    return table


def _same_grid(img, mask) -> bool:
    return img.shape[:3] == mask.shape[:3] and np.allclose(img.affine, mask.affine, atol=1e-4)


def _volume(image) -> np.ndarray:
    data = np.asanyarray(_load(image).dataobj)
    return data.reshape(data.shape[:3]) if data.ndim == 4 else data


def _clip_range(images) -> tuple[float, float]:
    """nilearn clips resampled data to [min(data, 0), max(data, 0)] over all maps."""
    low, high = 0.0, 0.0
    for img in images:
        data = _volume(img)
        low, high = min(low, float(np.nanmin(data))), max(high, float(np.nanmax(data)))
    return low, high


def _stage_map(image, stem: Path, prep, clip, mask, box) -> str:
    """A 3-D NIfTI file for one map: the path as given, or its values saved (in-memory
    images, resampled or smoothed maps) as a float NIfTI file.

    With ``box`` (the mask's crop) the processed map is put back into the
    mask's full grid (zeros outside the box).
    """
    if not prep.active and isinstance(image, str | Path):
        if not Path(image).is_file():
            raise InputError(f"File not found: '{image}' (no such map image).")
        return str(image)
    img = _load(image)
    data = _volume(img)
    affine = img.affine
    if prep.active:
        data = prep.apply(np.asarray(data, dtype=np.float64 if data.dtype == np.float64 else np.float32),
                          img.affine, clip)
    if box is not None:
        full = np.zeros(mask.shape[:3], dtype=data.dtype)
        full[box] = data
        data, affine = full, mask.affine
    target = stem.with_name(stem.name + ".nii")
    nib.save(nib.Nifti1Image(np.asarray(data), affine), target)
    return str(target)


def write_maps_node(table: pd.DataFrame, roles, store, collection, mask_img=None, *,
                    chunk_bytes=DEFAULT_CHUNK_BYTES, task_memory=_TASK_MEMORY, storage_options=None):
    """Write ``maps/<collection>``: one (image, voxel) float32 variable per map type of ``roles``.

    ``table`` has one row per image: NIfTI paths in the ``roles`` columns, an
    optional ``id`` column (default ``image-00000``...) and optional
    coordinates (:data:`COORDINATES`). The grid is
    the mask's (default every voxel of the first map's grid); every map must
    lie on it. A complete node of that name is replaced without being deleted
    first (staged beside it and swapped in, marker last).

    Returns
    -------
    chunkglm.io.cohort.Node
        The complete node.
    """
    table = maps_table(table, roles)
    grid = _maps_grid(table, roles, mask_img)
    root = st.open_root(store, storage_options, mode="a")
    locks.remove_leftovers(root)  # of writers killed before (their locks, temporary files)
    grid_id = st.write_grid(root, grid)
    st.resume_swap(root, "maps", collection)
    node = st.begin_version(root, "maps", collection)
    try:
        sources, header = _write_variables(node, table, roles, grid, chunk_bytes, task_memory)
        write_coords(node, table)
    except BaseException:
        st.discard_version(root, node)
        raise
    st.finish_node(node, {"grid_id": grid_id, "variables": list(roles)},
                   {"kind": "maps", "sources": sources, "nifti_header": header})
    st.publish_version(root, "maps", collection, node)
    # a grid a writer killed before its merge completed is listed again (as convert does)
    consolidated.mend(root, [f"grids/{grid_id}", f"maps/{collection}"])
    return open_cohort(store, storage_options).maps[collection]


def _maps_grid(table, roles, mask_img) -> st.Grid:
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
                sources.append({"role": role, "id": str(table["id"].iloc[row]), "path": st.redact_url(path),
                                "sha256": sha, "size": size})
                finite = finite or bool(np.isfinite(out[row - start]).any())
            return finite

        write_rows(node, role, ("image", "voxel"), plan, fill, task_memory, f"{role} maps")
    return sources, header_to_text(headers[0])


def write_coords(node, table):
    st.write_array(node, "image", np.array(table["id"].astype(str)), ("image",))
    for name in COORDINATES:
        if name not in table.columns:
            continue
        values = table[name]
        data = (np.asarray(values, dtype=np.float64) if name == "sample_sizes"
                else np.array(values.astype(str)))
        st.write_array(node, name, data, ("image",))

