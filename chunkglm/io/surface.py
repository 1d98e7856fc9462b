"""Surface grids of the cohort store: meshes (one or both hemispheres) and CIFTI brain models.

A store's element axis ("voxel" in every array's dimension names, so models
read surface runs and maps exactly as volume ones) is, for a surface grid, the
grid's elements in a fixed order, restricted to its mask:

- ``kind="mesh"``: the vertices of each part (``left``, then ``right``, as
  nilearn's ``SurfaceImage`` concatenates them), each part's geometry
  (coordinates and faces of one mesh, nilearn's pial mesh by default) stored
  once per grid;
- ``kind="cifti"``: the elements of a CIFTI-2 brain-model axis in file order
  (cortex vertices and subcortical voxels as one axis), the axis kept whole
  (structure name, vertex, voxel indices, volume affine and shape, vertices
  per surface structure) so ``nibabel.cifti2.BrainModelAxis`` comes back
  equal.

Layout of a surface grid node::

    grids/<grid-id>/
      mask (element,) bool          the stored elements of the grid
      voxel (voxel,) int64          each stored element's index into the grid
      hemi (voxel,) str             its part (mesh: left/right; CIFTI: structure)
      coordinates_<part> (vertex_<part>, xyz), faces_<part> (face_<part>, corner)   mesh
      cifti_structure / cifti_vertex (element,), cifti_ijk (element, ijk)            CIFTI
      attrs: grid_kind, parts [[name, n_elements], ...], space, n_voxels, cifti (affine,
             volume_shape, nvertices)

Volume grids (:class:`chunkglm.io.layout.Grid`) are written as before; a grid
node without ``grid_kind`` is a volume. :func:`read_grid` reads either.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from chunkglm.errors import InputError, StoreError
from chunkglm.io import consolidated, locks
from chunkglm.io import layout as st

__all__ = ["GRID_KINDS", "MESH_PARTS", "SurfaceGrid", "gifti_image", "grid_kind", "read_grid", "write_grid",
           "write_element_coordinates"]

#: What a store grid may be.
GRID_KINDS = ("volume", "mesh", "cifti")
#: The parts of a mesh grid, in element order (nilearn's ``PolyMesh`` parts).
MESH_PARTS = ("left", "right")


@dataclass(frozen=True, eq=False)
class SurfaceGrid:
    """A surface grid: mesh vertices or CIFTI grayordinates, and the mask of those stored.

    Attributes
    ----------
    kind : {"mesh", "cifti"}
    parts : tuple of (str, int)
        Each part's name and element count, in element order (mesh: ``left``
        / ``right``; CIFTI: one part per brain structure, in file order).
    mask : ndarray of bool, shape (n_elements,)
        The elements the store holds (the element axis of runs and maps).
    space : str
        The template space (``fsaverage5``, ``fsLR``), for the grid id and outputs.
    meshes : dict
        Mesh grids: part -> (coordinates (n, 3), faces (m, 3)) arrays.
    brain_models : nibabel.cifti2.BrainModelAxis or None
        CIFTI grids: the whole brain-model axis (every element, mask aside).
    """

    kind: str
    parts: tuple
    mask: np.ndarray
    space: str = ""
    meshes: dict = field(default_factory=dict)
    brain_models: object = None

    def __post_init__(self):
        if self.kind not in ("mesh", "cifti"):
            raise InputError(f"a surface grid is a 'mesh' or 'cifti' grid; received kind {self.kind!r}.")
        total = sum(n for _, n in self.parts)
        if self.mask.shape != (total,):
            raise InputError(f"the surface grid's mask has shape {self.mask.shape}; its parts "
                             f"{list(self.parts)} hold {total} elements.")
        for part, (coordinates, faces) in self.meshes.items():
            n = dict(self.parts).get(part)
            if n is None or np.shape(coordinates) != (n, 3) or np.ndim(faces) != 2:
                raise InputError(f"the {part} mesh has coordinates {np.shape(coordinates)} and faces "
                                 f"{np.shape(faces)}; the grid's {part} part has {n} vertices.")

    @property
    def shape(self) -> tuple[int]:
        """(n_elements,): every element of the grid, stored or not."""
        return (int(self.mask.shape[0]),)

    @property
    def n_voxels(self) -> int:
        """Stored elements (the length of the store's element axis)."""
        return int(self.mask.sum())

    @cached_property
    def flat_index(self) -> np.ndarray:
        """Each stored element's index into the grid, shape (n_voxels,) int64."""
        return np.flatnonzero(self.mask).astype(np.int64)

    @cached_property
    def part_of_element(self) -> np.ndarray:
        """Each element's part name, shape (n_elements,) (CIFTI: its structure)."""
        return np.repeat(np.array([p for p, _ in self.parts], dtype=object), [n for _, n in self.parts])

    def part_slices(self) -> dict[str, slice]:
        """Part -> its slice of the element axis (all elements)."""
        slices, start = {}, 0
        for part, n in self.parts:
            slices[part] = slice(start, start + n)
            start += n
        return slices

    @cached_property
    def grid_id(self) -> str:
        """Stable id from the kind, parts, geometry and mask: equal grids share a node."""
        digest = hashlib.sha256(self.kind.encode())
        digest.update(repr([(str(p), int(n)) for p, n in self.parts]).encode())
        for part in sorted(self.meshes):
            for array in self.meshes[part]:
                array = np.ascontiguousarray(array)
                digest.update(f"{part}{array.dtype.str}{array.shape}".encode() + array.tobytes())
        for array in _cifti_arrays(self.brain_models).values():
            digest.update(np.ascontiguousarray(array).astype(str).tobytes() if array.dtype == object
                          else np.ascontiguousarray(array).tobytes())
        if self.brain_models is not None:
            digest.update(repr(_cifti_attrs(self.brain_models)).encode())
        digest.update(np.packbits(self.mask).tobytes())
        prefix = re.sub(r"[^A-Za-z0-9]", "", self.space) or self.kind
        return f"{prefix}_{digest.hexdigest()[:12]}"

    def with_mask(self, mask) -> SurfaceGrid:
        """The same grid storing the elements of ``mask`` (n_elements,) bool."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise InputError(f"a mask of this grid has {self.shape[0]} elements; received shape {mask.shape}.")
        return SurfaceGrid(self.kind, self.parts, mask, self.space, self.meshes, self.brain_models)


def grid_kind(grid) -> str:
    """"volume", "mesh" or "cifti" of a :class:`~chunkglm.io.layout.Grid` or :class:`SurfaceGrid`."""
    return getattr(grid, "kind", "volume") if isinstance(grid, SurfaceGrid) else "volume"


def _cifti_arrays(axis) -> dict[str, np.ndarray]:
    if axis is None:
        return {}
    return {"cifti_structure": np.asarray(axis.name, dtype=str).astype(object),
            "cifti_vertex": np.asarray(axis.vertex, dtype=np.int64),
            "cifti_ijk": np.asarray(axis.voxel, dtype=np.int64)}


def _cifti_attrs(axis) -> dict:
    return {"affine": None if axis.affine is None else np.asarray(axis.affine, dtype=float).tolist(),
            "volume_shape": None if axis.volume_shape is None else [int(n) for n in axis.volume_shape],
            "nvertices": {str(k): int(v) for k, v in axis.nvertices.items()}}


def _brain_models(arrays: dict, attrs: dict):
    from nibabel.cifti2 import BrainModelAxis

    affine = None if attrs["affine"] is None else np.asarray(attrs["affine"])
    shape = None if attrs["volume_shape"] is None else tuple(attrs["volume_shape"])
    names = np.array([str(name) for name in arrays["cifti_structure"]])  # zarr's StringDType -> str
    return BrainModelAxis(names, voxel=arrays["cifti_ijk"],
                          vertex=arrays["cifti_vertex"], affine=affine, volume_shape=shape,
                          nvertices=dict(attrs["nvertices"]))


# -- store I/O --------------------------------------------------------------------------------


def write_element_coordinates(group, grid) -> None:
    """A node's element coordinates: ``voxel`` (index into the grid) and, for surface grids,
    ``hemi`` (each stored element's part: mesh hemisphere or CIFTI structure)."""
    if not isinstance(grid, SurfaceGrid):
        st.write_voxel_coordinate(group, grid)
        return
    st.write_array(group, "voxel", grid.flat_index, ("voxel",),
                   attrs={"long_name": f"index into the {grid.kind} grid's elements",
                          "grid_shape": list(grid.shape)})
    st.write_array(group, "hemi", grid.part_of_element[grid.mask].astype(str), ("voxel",),
                   attrs={"long_name": "hemisphere (mesh part) or CIFTI brain structure"})


def write_grid(root, grid) -> str:
    """Write a grid node (volume or surface) unless an identical complete one exists; its id."""
    if not isinstance(grid, SurfaceGrid):
        return st.write_grid(root, grid)
    name = grid.grid_id
    if st.node_status(root, "grids").get(name):
        return name
    where = st.redact_url(str(root.store))
    with locks.node_lock(root, "grids", name, where, wait=st.GRID_WAIT_SECONDS):
        if st.node_status(root, "grids").get(name):
            return name
        _write_surface_grid(root, grid)
        consolidated.merge(root, f"grids/{name}")
    return name


def _write_surface_grid(root, grid: SurfaceGrid) -> None:
    group = st.start_node(root, "grids", grid.grid_id)
    st.write_array(group, "mask", grid.mask, ("element",))
    write_element_coordinates(group, grid)
    for part, (coordinates, faces) in grid.meshes.items():
        st.write_array(group, f"coordinates_{part}", np.asarray(coordinates), (f"vertex_{part}", "xyz"))
        st.write_array(group, f"faces_{part}", np.asarray(faces), (f"face_{part}", "corner"))
    dims = {"cifti_ijk": ("element", "ijk")}
    for name, array in _cifti_arrays(grid.brain_models).items():
        st.write_array(group, name, array, dims.get(name, ("element",)))
    attrs = {"grid_kind": grid.kind, "parts": [[str(p), int(n)] for p, n in grid.parts],
             "space": grid.space, "n_voxels": grid.n_voxels, "meshes": sorted(grid.meshes),
             "shape": list(grid.shape)}
    if grid.brain_models is not None:
        attrs["cifti"] = _cifti_attrs(grid.brain_models)
    st.finish_node(group, attrs, {"kind": "grid"})


def read_grid(root, grid_id: str):
    """Load a grid node: a :class:`~chunkglm.io.layout.Grid` (volume) or a :class:`SurfaceGrid`."""
    path = f"grids/{grid_id}"
    if path not in root or not st.is_complete(root[path]):
        raise StoreError(f"the store has no complete grid {grid_id!r}; convert the inputs again")
    group = root[path]
    attrs = group.attrs.asdict()
    kind = attrs.get("grid_kind", "volume")
    if kind == "volume":
        return st.read_grid(root, grid_id)
    if kind not in GRID_KINDS:
        raise StoreError(f"grid {grid_id!r} is of kind {kind!r}, which this chunkglm does not read "
                         f"({GRID_KINDS}); use the chunkglm version that wrote the store.")
    meshes = {part: (group[f"coordinates_{part}"][...], group[f"faces_{part}"][...])
              for part in attrs.get("meshes", [])}
    models = None
    if kind == "cifti":
        arrays = {name: group[name][...] for name in ("cifti_structure", "cifti_vertex", "cifti_ijk")}
        models = _brain_models(arrays, attrs["cifti"])
    parts = tuple((str(p), int(n)) for p, n in attrs["parts"])
    return SurfaceGrid(kind, parts, np.asarray(group["mask"][...], dtype=bool), attrs.get("space", ""),
                       meshes, models)


def gifti_image(columns, intent: str = "NIFTI_INTENT_NONE", meta: dict | None = None, dtype=np.float32):
    """A GIFTI image with one data array per column (each a 1-D array over one hemisphere's
    vertices): a volume of a run (``NIFTI_INTENT_TIME_SERIES``, ``meta`` e.g. ``{"TimeStep": ms}``,
    as fMRIPrep writes) or a map."""
    from nibabel.gifti import GiftiDataArray, GiftiImage

    datatype = f"NIFTI_TYPE_{np.dtype(dtype).name.upper()}"
    return GiftiImage(darrays=[GiftiDataArray(np.ascontiguousarray(column, dtype=dtype), intent=intent,
                                              datatype=datatype, meta=dict(meta or {}))
                               for column in columns])
