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
  equal. It is held as arrays (:class:`BrainModels`): nibabel's axis, whose
  constructor checks each of ~10^5 structure names one by one, is built only
  where asked for, and CIFTI headers are built from the arrays
  (:func:`cifti_header`, :func:`cifti_image`).

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

import gc
import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from chunkglm.errors import InputError, StoreError
from chunkglm.io import consolidated, locks
from chunkglm.io import layout as st

__all__ = ["GRID_KINDS", "MESH_PARTS", "BrainModels", "SurfaceGrid", "cifti_header", "cifti_image", "gifti_image",
           "grid_kind", "read_grid", "write_grid", "write_element_coordinates"]

#: What a store grid may be.
GRID_KINDS = ("volume", "mesh", "cifti")
#: The parts of a mesh grid, in element order (nilearn's ``PolyMesh`` parts).
MESH_PARTS = ("left", "right")


@dataclass(frozen=True, eq=False)
class BrainModels:
    """A CIFTI-2 brain-model axis as arrays, every element (a grid's mask aside).

    ``nibabel.cifti2.BrainModelAxis`` checks its structure names one by one
    (~0.15 s on a 91k axis), and its ``to_mapping`` fills the header's index
    lists one element at a time (~0.3 s): both are left to where they are
    needed (:attr:`axis`), the store and the headers use the arrays.

    Attributes
    ----------
    structure : ndarray of str, shape (n_elements,)
        Each element's CIFTI brain structure (``CIFTI_STRUCTURE_CORTEX_LEFT``...), as nibabel
        names them.
    vertex : ndarray of int64, shape (n_elements,)
        Surface elements: the vertex index (-1 for voxels).
    ijk : ndarray of int64, shape (n_elements, 3)
        Voxel elements: the voxel indices (-1 for vertices).
    affine : ndarray, shape (4, 4), or None
        Voxel indices to mm (None without voxels).
    volume_shape : tuple of 3 int, or None
    nvertices : dict
        Surface structure -> vertices of its surface.
    """

    structure: np.ndarray
    vertex: np.ndarray
    ijk: np.ndarray
    affine: np.ndarray | None
    volume_shape: tuple | None
    nvertices: dict

    @classmethod
    def from_axis(cls, axis) -> BrainModels:
        """The arrays of a ``BrainModelAxis``, which :attr:`axis` then returns (the same object)."""
        models = cls(np.asarray(axis.name, dtype=str), np.asarray(axis.vertex, dtype=np.int64),
                     np.asarray(axis.voxel, dtype=np.int64), axis.affine, axis.volume_shape,
                     dict(axis.nvertices))
        models.__dict__["axis"] = axis  # cached_property's slot: no rebuild
        return models

    @classmethod
    def from_xml(cls, element: bytes) -> BrainModels:
        """The brain models of a CIFTI-2 ``<MatrixIndicesMap>`` element of type
        ``CIFTI_INDEX_TYPE_BRAIN_MODELS`` (its XML bytes), as nibabel's parser and
        ``BrainModelAxis.from_index_mapping`` read them, with the checks of nibabel's
        ``BrainModelAxis`` (valid structure and model type names, voxels with a volume, indices
        defined); ~0.03 s for a 91k element where nibabel's parser and axis take ~0.5 s (one
        Python call per index). ``ValueError`` (or ``xml.etree.ElementTree.ParseError``) when the
        element is not one nibabel would read this way."""
        from xml.etree import ElementTree

        from nibabel.cifti2 import BrainModelAxis
        from nibabel.cifti2.cifti2 import CIFTI_BRAIN_STRUCTURES, CIFTI_MODEL_TYPES

        root = ElementTree.fromstring(element)
        models = root.findall("BrainModel")
        n = sum(int(model.attrib["IndexCount"]) for model in models)
        vertex, ijk = np.full(n, -1, dtype=np.int64), np.full((n, 3), -1, dtype=np.int64)
        names, counts, nvertices, volume = [], [], {}, None
        for model in models:
            name, kind = model.attrib["BrainStructure"], model.attrib["ModelType"]
            if name not in CIFTI_BRAIN_STRUCTURES or kind not in CIFTI_MODEL_TYPES:
                raise ValueError(f"BrainModel of structure {name!r}, model type {kind!r}: not CIFTI-2 names")
            start, count = int(model.attrib["IndexOffset"]), int(model.attrib["IndexCount"])
            names.append(BrainModelAxis.to_cifti_brain_structure_name(name))
            counts.append(count)
            if kind == "CIFTI_MODEL_TYPE_SURFACE":
                vertex[start:start + count] = _indices(model, "VertexIndices")
                nvertices[names[-1]] = int(model.attrib["SurfaceNumberOfVertices"])
            else:
                ijk[start:start + count] = _indices(model, "VoxelIndicesIJK").reshape(-1, 3)
                volume = volume or _volume(root)
        structure = np.repeat(np.array(names, dtype=str), counts)  # in element order, as nibabel's
        surface = np.isin(structure, list(nvertices))
        if volume is None and not surface.all():
            raise ValueError("a brain-model element with voxels and no Volume element")
        if (vertex[surface] < 0).any() or (ijk[~surface] < 0).any():
            raise ValueError("a brain-model element with undefined vertex or voxel indices")
        affine, shape = (None, None) if surface.all() else volume
        return cls(structure, vertex, ijk, affine, shape, nvertices)

    def __len__(self) -> int:
        return int(self.structure.shape[0])

    @cached_property
    def axis(self):
        """nibabel's ``BrainModelAxis`` of these arrays (built on first use)."""
        from nibabel.cifti2 import BrainModelAxis

        affine = None if self.affine is None else np.asarray(self.affine)
        shape = None if self.volume_shape is None else tuple(int(n) for n in self.volume_shape)
        return BrainModelAxis(self.structure, voxel=self.ijk, vertex=self.vertex, affine=affine,
                              volume_shape=shape, nvertices=dict(self.nvertices))

    @cached_property
    def structures(self) -> tuple:
        """(name, start, stop) of each run of one structure, in element order (nibabel's
        ``iter_structures``)."""
        names = self.structure
        starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]]) if len(names) else np.array([], int)
        stops = np.r_[starts[1:], len(names)]
        return tuple((str(names[a]), int(a), int(b)) for a, b in zip(starts, stops))

    def to_mapping(self, dim: int):
        """The brain-model ``Cifti2MatrixIndicesMap`` of dimension ``dim``, equal to nibabel's
        ``BrainModelAxis.to_mapping`` (one BrainModel per run of one structure: a surface one when
        the structure has a vertex count, else voxels), each index list filled in one go."""
        from nibabel import cifti2

        mim = cifti2.Cifti2MatrixIndicesMap([dim], "CIFTI_INDEX_TYPE_BRAIN_MODELS")
        with _gc_paused():  # a list per voxel: ~10x the time with the collector on (scans of all objects)
            self._fill(mim)
        return mim

    def _fill(self, mim) -> None:
        from nibabel import cifti2

        for name, start, stop in self.structures:
            surface = name in self.nvertices
            if not surface and mim.volume is None:
                transform = cifti2.Cifti2TransformationMatrixVoxelIndicesIJKtoXYZ(-3, np.asarray(self.affine))
                mim.volume = cifti2.Cifti2Volume(tuple(int(n) for n in self.volume_shape), transform)
            mim.append(cifti2.Cifti2BrainModel(
                start, stop - start, "CIFTI_MODEL_TYPE_SURFACE" if surface else "CIFTI_MODEL_TYPE_VOXELS",
                name, self.nvertices[name] if surface else None,
                None if surface else _filled(cifti2.Cifti2VoxelIndicesIJK, self.ijk[start:stop].tolist()),
                _filled(cifti2.Cifti2VertexIndices, self.vertex[start:stop].tolist()) if surface else None))


@contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off inside (restored as it was after).

    Building ~10^5 small lists (a CIFTI header's voxel indices) triggers collections that each
    scan every object of the process (~4*10^5 in a fit): 0.04 s per 91k header with the
    collector on, 0.004 s without. The lists hold no cycles: nothing is left for it to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _indices(model, tag: str) -> np.ndarray:
    """The integers of a BrainModel's ``VertexIndices`` or ``VoxelIndicesIJK`` text."""
    found = model.find(tag)
    if found is None or not (found.text or "").strip():
        raise ValueError(f"a BrainModel of {model.attrib['IndexCount']} elements has no {tag}")
    return np.array(found.text.split(), dtype=np.int64)


def _volume(root):
    """(affine (4, 4), shape) of a parsed brain-model element's ``Volume`` (nibabel's reading: the
    matrix as written, its MeterExponent not applied), or None."""
    volume = root.find("Volume")
    transform = None if volume is None else volume.find("TransformationMatrixVoxelIndicesIJKtoXYZ")
    if transform is None:
        return None
    shape = tuple(int(n) for n in volume.attrib["VolumeDimensions"].split(","))
    return np.array((transform.text or "").split(), dtype=np.float64).reshape(4, 4), shape


def _filled(kind, values: list):
    """A nibabel index list (``Cifti2VertexIndices``, ``Cifti2VoxelIndicesIJK``) holding ``values``,
    Python ints as its ``insert`` stores them: set in one go, where its constructor inserts and
    checks one element at a time (~4 µs each). nibabel 5 keeps them in ``_indices``; the headers
    built so are compared with nibabel's own in tests/test_surface_fast_paths.py."""
    indices = kind()
    indices._indices = values
    return indices


def cifti_header(axis, models: BrainModels):
    """``Cifti2Header.from_axes((axis, models.axis))``, the brain models built from the arrays: a
    new header, its own index lists. ``axis``: the first dimension's nibabel axis (``ScalarAxis``,
    ``SeriesAxis``)."""
    from nibabel.cifti2 import Cifti2Header, Cifti2Matrix

    matrix = Cifti2Matrix()
    matrix.append(axis.to_mapping(0))
    matrix.append(models.to_mapping(1))
    return Cifti2Header(matrix)


def cifti_image(rows: np.ndarray, header):
    """``nibabel.cifti2.Cifti2Image(rows, header)`` without its costs on a large brain-model axis,
    ``header`` (a ``Cifti2Header`` made for this image, e.g. by :func:`cifti_header`) handed to
    the image as it is, not copied.

    nibabel's constructor deep-copies the header (~0.25 s on a 91k axis) and checks that its axes
    fit the data by rebuilding the brain-model axis (``get_data_shape``, ~0.5 s): the image is
    made on a small stand-in header of the same shape (two series axes, cheap to build, copy and
    check) whose place ``header`` then takes. Equal to nibabel's image, values, headers and
    written file (tests/test_surface_fast_paths.py)."""
    from nibabel.cifti2 import Cifti2Image, SeriesAxis

    stand_in = (SeriesAxis(0.0, 1.0, rows.shape[0]), SeriesAxis(0.0, 1.0, rows.shape[1]))
    img = Cifti2Image(rows, stand_in)
    img._header = header
    img.update_headers()
    return img


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
    cifti : BrainModels or None
        CIFTI grids: the whole brain-model axis as arrays (every element, mask aside);
        :attr:`brain_models` is nibabel's axis of it.
    """

    kind: str
    parts: tuple
    mask: np.ndarray
    space: str = ""
    meshes: dict = field(default_factory=dict)
    cifti: BrainModels | None = None

    def __post_init__(self):
        if self.kind not in ("mesh", "cifti"):
            raise InputError(f"a surface grid is a 'mesh' or 'cifti' grid; received kind {self.kind!r}.")
        if self.cifti is not None and not isinstance(self.cifti, BrainModels):
            raise InputError(f"a CIFTI grid's brain models are a chunkglm.io.surface.BrainModels (from a "
                             f"nibabel axis: BrainModels.from_axis(axis)); received {type(self.cifti).__name__}.")
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
    def brain_models(self):
        """CIFTI grids: nibabel's ``BrainModelAxis`` of every element (built on first use); else None."""
        return None if self.cifti is None else self.cifti.axis

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
        for array in _cifti_arrays(self.cifti).values():
            digest.update(np.ascontiguousarray(array).astype(str).tobytes() if array.dtype == object
                          else np.ascontiguousarray(array).tobytes())
        if self.cifti is not None:
            digest.update(repr(_cifti_attrs(self.cifti)).encode())
        digest.update(np.packbits(self.mask).tobytes())
        prefix = re.sub(r"[^A-Za-z0-9]", "", self.space) or self.kind
        return f"{prefix}_{digest.hexdigest()[:12]}"

    def with_mask(self, mask) -> SurfaceGrid:
        """The same grid storing the elements of ``mask`` (n_elements,) bool."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise InputError(f"a mask of this grid has {self.shape[0]} elements; received shape {mask.shape}.")
        return SurfaceGrid(self.kind, self.parts, mask, self.space, self.meshes, self.cifti)


def grid_kind(grid) -> str:
    """"volume", "mesh" or "cifti" of a :class:`~chunkglm.io.layout.Grid` or :class:`SurfaceGrid`."""
    return getattr(grid, "kind", "volume") if isinstance(grid, SurfaceGrid) else "volume"


def _cifti_arrays(models: BrainModels | None) -> dict[str, np.ndarray]:
    if models is None:
        return {}
    return {"cifti_structure": models.structure.astype(object), "cifti_vertex": models.vertex,
            "cifti_ijk": models.ijk}


def _cifti_attrs(models: BrainModels) -> dict:
    return {"affine": None if models.affine is None else np.asarray(models.affine, dtype=float).tolist(),
            "volume_shape": None if models.volume_shape is None else [int(n) for n in models.volume_shape],
            "nvertices": {str(k): int(v) for k, v in models.nvertices.items()}}


def _brain_models(group, attrs: dict, parts: tuple) -> BrainModels:
    """A CIFTI grid node's brain models. The structure names are the grid's ``parts`` (the runs of
    one structure, in element order, as written: :func:`from_cifti` counts them off the names),
    not its ``cifti_structure`` array, whose ~10^5 strings take longer to decode than the rest."""
    affine = None if attrs["affine"] is None else np.asarray(attrs["affine"])
    shape = None if attrs["volume_shape"] is None else tuple(attrs["volume_shape"])
    names = np.repeat(np.array([name for name, _ in parts], dtype=str), [n for _, n in parts])
    vertex, ijk = (np.asarray(group[name][...], dtype=np.int64) for name in ("cifti_vertex", "cifti_ijk"))
    if len(names) != len(vertex):
        raise StoreError(f"the CIFTI grid's parts hold {len(names)} elements, its cifti_vertex {len(vertex)}: "
                         "the grid node is damaged; convert the inputs again.")
    return BrainModels(names, vertex, ijk, affine, shape, dict(attrs["nvertices"]))


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
    for name, array in _cifti_arrays(grid.cifti).items():
        st.write_array(group, name, array, dims.get(name, ("element",)))
    attrs = {"grid_kind": grid.kind, "parts": [[str(p), int(n)] for p, n in grid.parts],
             "space": grid.space, "n_voxels": grid.n_voxels, "meshes": sorted(grid.meshes),
             "shape": list(grid.shape)}
    if grid.cifti is not None:
        attrs["cifti"] = _cifti_attrs(grid.cifti)
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
    parts = tuple((str(p), int(n)) for p, n in attrs["parts"])
    models = _brain_models(group, attrs["cifti"], parts) if kind == "cifti" else None
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
