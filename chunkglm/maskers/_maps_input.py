"""Maps image -> sparse (voxel, region) maps on a store grid, one map at a time.

nilearn loads the whole 4-D maps image, resamples it onto the data grid
(``resample_img``, interpolation "linear"), restricts it to the mask, drops
maps left empty, and solves over the masked voxels. Here a maps file on the
data grid is streamed volume by volume (never the whole image, no copy of a
volume); maps on another grid are read in groups of ``group_size`` volumes
and each group is resampled with nilearn's own ``resample_img`` (linear
interpolation acts volume by volume and never leaves the input range, so a
group gives the same numbers as the whole image). Of each map only its
non-zero values at the store grid's voxels are kept: probabilistic maps are
sparse, so they are held in memory as a CSR (voxel, map) matrix, or, when
their non-zero values exceed ``in_memory_bytes`` (or a ``maps_store`` is
given), written densely to a zarr array whose chunks are (voxel block,
group). Peak memory: one group on the full grid, plus the non-zero values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.sparse
import zarr
from nilearn.image import resample_img

from chunkglm.chunking import MemoryBudget
from chunkglm.errors import InputError
from chunkglm.graph import maps as graph
from chunkglm.io.inputs import scratch_folder
from chunkglm.io.nifti import NiftiReader, read_info, scale_values
from chunkglm.io.layout import compressor
from chunkglm.kernels.maps import counted_in_overlap



@dataclass(frozen=True)
class MapsSource:
    """A 4-D maps image, read a group of volumes at a time.

    Attributes
    ----------
    image : str, Path or nibabel image
    affine : ndarray (4, 4)
    shape : tuple of 3 int
    n_maps : int
    dtype : numpy dtype
        The dtype nilearn would see (``np.asanyarray(img.dataobj).dtype``).
    """

    image: object
    affine: np.ndarray
    shape: tuple
    n_maps: int
    dtype: np.dtype

    def groups(self, group_size: int):
        """Yield ``(start, volumes)`` with volumes (x, y, z, g), finite (NaN/inf -> 0)."""
        if isinstance(self.image, str | Path):
            yield from self._file_groups(group_size)
            return
        for start in range(0, self.n_maps, group_size):
            stop = min(start + group_size, self.n_maps)
            volumes = np.asanyarray(self.image.dataobj[..., start:stop])
            yield start, _finite(volumes)

    def _file_groups(self, group_size):
        start, group = 0, None
        for index, volume in self.file_volumes():
            if group is None:
                # Fortran order: each volume is one contiguous slab, filled by a plain copy
                group = np.empty((*self.shape, min(group_size, self.n_maps - start)), dtype=self.dtype, order="F")
            group[..., index - start] = volume.reshape(self.shape, order="F")
            if index - start + 1 == group.shape[-1]:
                yield start, _finite(group, copy=False)
                start, group = index + 1, None

    def file_volumes(self):
        """Yield ``(index, volume)`` of a maps file: flat, Fortran order, scaled, not copied.

        ``volume`` is a view of the reader's reused buffer (unscaled files): use it
        before asking for the next one. Non-finite values are left as they are.
        """
        with NiftiReader(str(self.image)) as reader:
            info = reader.info
            unscaled = info.slope == 1 and info.inter == 0 and info.dtype.kind == "f"
            for index, raw in reader.iter_volumes():
                yield index, raw if unscaled else scale_values(raw, info.slope, info.inter)

    def any_nonzero(self) -> bool:
        """Whether some map has a non-zero value (stops at the first group that has one)."""
        return any(np.any(volumes) for _, volumes in self.groups(MemoryBudget().group_size(int(np.prod(self.shape)))))

    def image_on(self, target=None):
        """nilearn's ``maps_img_``: the maps on ``target`` ((affine, shape); None: their own grid).

        On their own grid, the input image itself (a file is opened, not read);
        on another, resampled as nilearn's fit resamples them (linear).
        """
        image = nib.load(str(self.image)) if isinstance(self.image, str | Path) else self.image
        if target is None or same_grid(self.affine, self.shape, target[0], target[1]):
            return image
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message="Resampling binary images with continuous or linear interpolation")
            return resample_img(nib.Nifti1Image(_finite(np.asanyarray(image.dataobj)), self.affine),
                                interpolation="linear", target_shape=tuple(target[1]), target_affine=target[0],
                                force_resample=True, copy_header=True)

    def volume_image(self):
        """A 3-D image of the maps' grid (for resampling a mask onto it)."""
        return nib.Nifti1Image(np.zeros(self.shape, dtype=np.uint8), self.affine)


def _finite(volumes, copy=True):
    """NaN and infinite values set to 0 (a copy unless ``copy=False``; untouched when all finite)."""
    volumes = np.array(volumes, copy=copy)
    if volumes.dtype.kind == "f" and not np.isfinite(volumes).all():
        volumes[~np.isfinite(volumes)] = 0
    return volumes


def maps_source(maps_img) -> MapsSource:
    """Validate a maps image (path or nibabel image) without reading its data."""
    if maps_img is None:
        raise InputError("maps_img is None: give a 4-D image of probabilistic maps (path or nibabel image).")
    maps_img = _one_map_as_4d(maps_img)
    if isinstance(maps_img, str | Path):
        if not Path(maps_img).is_file():
            raise InputError(f"maps_img not found: {maps_img}")
        info = read_info(str(maps_img))
        shape, affine = info.shape, info.affine
        scaled = info.slope != 1 or info.inter != 0
        dtype = np.dtype(np.float64) if (info.dtype.itemsize == 8 and info.dtype.kind == "f") else np.dtype(np.float32)
        if not scaled and info.dtype.kind == "f":
            dtype = info.dtype.newbyteorder("=")
    elif isinstance(maps_img, nib.spatialimages.SpatialImage):
        shape, affine = maps_img.shape, maps_img.affine
        dtype = (np.asarray(maps_img.dataobj).dtype if isinstance(maps_img.dataobj, np.ndarray)
                 else np.dtype(np.float64) if _is_scaled(maps_img) else np.dtype(maps_img.get_data_dtype()))
    else:
        raise InputError(f"maps_img must be a NIfTI path or a nibabel image; received {type(maps_img).__name__}.")
    if len(shape) != 4:
        raise InputError(
            f"maps_img has shape {tuple(shape)}: probabilistic maps are a 4-D image, one volume per "
            "map (a 3-D image is one map)."
        )
    return MapsSource(maps_img, np.asarray(affine, dtype=float), tuple(int(n) for n in shape[:3]),
                      int(shape[3]), np.dtype(dtype))


def _one_map_as_4d(maps_img):
    """A 3-D maps image (path or image) as a 4-D image of one map, as nilearn reads it."""
    if isinstance(maps_img, str | Path):
        if not Path(maps_img).is_file() or len(read_info(str(maps_img)).shape) != 3:
            return maps_img
        maps_img = nib.load(str(maps_img))
    if isinstance(maps_img, nib.spatialimages.SpatialImage) and len(maps_img.shape) == 3:
        return nib.Nifti1Image(np.asanyarray(maps_img.dataobj)[..., None], maps_img.affine)
    return maps_img


def _is_scaled(img):
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return slope != 1 or inter != 0


def same_grid(affine_a, shape_a, affine_b, shape_b) -> bool:
    """nilearn's check_same_fov: same 3-D shape and ``np.allclose`` affines."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b)


@dataclass
class PreparedMaps:
    """Maps on a store grid, ready for extraction: a CSR matrix in memory, or a zarr array.

    Attributes
    ----------
    kept : ndarray of int
        Indices (into maps_img) of the maps kept, nilearn's ``labels``.
    dropped : list of int
        Maps empty inside the mask (nilearn drops them, with a warning).
    n_maps : int
    dtype : numpy dtype
        Maps dtype after resampling (for nilearn's output dtype).
    overlap : bool
        True when two maps are > eps at a voxel of the grid.
    n_outside_maps : int
        Maps with non-zero values (in the mask) at voxels the store does not hold.
    """

    writer: object
    kept: np.ndarray
    dropped: list
    n_maps: int
    dtype: np.dtype
    overlap: bool
    n_outside_maps: int = 0
    _blocks: dict = field(default_factory=dict, repr=False)

    @property
    def location(self) -> str | None:
        """The zarr array holding the maps, or None when they are in memory."""
        return self.writer.location

    @property
    def sparse(self):
        """The kept maps as a scipy CSR matrix (voxel, n_kept) when held in memory, else None."""
        return self.writer.matrix

    def blocks(self, chunks) -> list | None:
        """In-memory maps cut into the CSR blocks of voxel ``chunks`` (the data's), else None.

        The same block objects for the same chunks (cached): graphs built from
        them share one key per block (see :func:`chunkglm.graph.maps.moments`).
        """
        matrix = self.sparse
        if matrix is None:
            return None
        chunks = tuple(int(c) for c in chunks)
        if chunks not in self._blocks:
            bounds = np.cumsum((0, *chunks))
            self._blocks[chunks] = [matrix[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return self._blocks[chunks]

    def reader(self):
        """A picklable ``read(start, stop)`` of the kept maps' voxel rows (zarr-backed maps), or None."""
        if self.writer.memory:
            return None
        return ZarrMapsReader(self.writer.zarray, None if len(self.kept) == self.n_maps else self.kept)

    def array(self, tag: str = "maps"):
        """Zarr-backed maps: the kept maps as a dask array (voxel, n_kept), chunked by voxel blocks.

        Task names are unique to ``tag``: each consumer reads its own blocks
        and frees them at once, instead of the scheduler holding shared blocks.
        """
        array = self.writer.dask_array(tag)
        return array if len(self.kept) == self.n_maps else array[:, self.kept]


def prepare_maps(source: MapsSource, grid, mask=None, voxel_chunk: int | None = None,
                 resample: bool = True, maps_store=None, group_size: int | None = None,
                 in_memory_bytes: int | None = None, keep_empty: bool = False,
                 check_overlap: bool = True, budget=None) -> PreparedMaps:
    """Resample (if needed), mask, and chunk the maps on ``grid``'s stored voxels.

    Parameters
    ----------
    source : MapsSource
    grid : chunkglm.io.layout.Grid
        The data grid: affine, shape and stored voxels (``grid.ijk``).
    mask : ndarray of bool on the grid's shape, or None
        nilearn's ``mask_img_`` on this grid; maps are zeroed outside it and
        maps empty inside it are dropped.
    voxel_chunk : int, optional
        Voxels per chunk (the data's); default the whole axis.
    resample : bool
        Resample onto ``grid`` when the maps are on another grid.
    maps_store : str or Path, optional
        Where large maps are written (a zarr array); default a temporary folder.
    group_size : int, optional
        Maps resampled per step; default ``budget.group_size`` (128 MiB of float64 by default).
    in_memory_bytes : int, optional
        Maps whose non-zero values (and indices) take up to this stay in memory
        (sparse); larger ones go to zarr. Default ``budget.in_memory_limit()`` (256 MiB by default).
    keep_empty : bool
        nilearn's ``keep_masked_maps``: keep maps left empty by the mask.
    check_overlap : bool
        Count maps per voxel (for ``allow_overlap=False``); else ``overlap`` is False.
    budget : chunkglm.chunking.MemoryBudget, int, str or None
        The memory budget the defaults above derive from (None: the package default).
    """
    budget = MemoryBudget.of(budget)
    needs_resampling = not same_grid(source.affine, source.shape, grid.affine, grid.shape)
    if needs_resampling and not resample:
        raise InputError(_grid_mismatch(source, grid))
    n_voxels, n_maps = grid.n_voxels, source.n_maps
    group_size = group_size or budget.group_size(int(np.prod(grid.shape)))
    in_memory_bytes = budget.in_memory_limit() if in_memory_bytes is None else in_memory_bytes
    voxel_chunk = voxel_chunk or max(n_voxels, 1)
    writer = _Writer(n_voxels, n_maps, voxel_chunk, group_size, maps_store, in_memory_bytes)
    stats = _Stats(grid, mask, check_overlap)
    dtype = None
    for index, volume, volume_dtype in _flat_volumes(source, grid, group_size, needs_resampling):
        dtype = dtype or volume_dtype
        writer.add(index, *stats.add(volume))
    stats.check(needs_resampling)
    kept = np.flatnonzero(stats.nonempty) if mask is not None and not keep_empty else np.arange(n_maps)
    dropped = [int(i) for i in np.setdiff1d(np.arange(n_maps), kept)]
    dtype = dtype or source.dtype
    writer.finish(dtype, kept)
    return PreparedMaps(writer, kept, dropped, n_maps, np.dtype(dtype), stats.overlap, stats.n_outside_maps)


def _flat_volumes(source, grid, group_size, resample):
    """Yield ``(index, volume, dtype)``: each map on ``grid``, flat in Fortran order.

    A maps file on the grid is streamed volume by volume without copies;
    otherwise groups of ``group_size`` maps are read (and resampled). ``dtype``
    is the maps' dtype as nilearn would hold them.
    """
    if not resample and isinstance(source.image, str | Path):
        for index, volume in source.file_volumes():
            yield index, volume, source.dtype
        return
    for start, volumes in source.groups(group_size):
        if resample:
            volumes = _resample(volumes, source.affine, grid)
        for offset in range(volumes.shape[-1]):
            yield start + offset, np.ravel(volumes[..., offset], order="F"), volumes.dtype


def _grid_mismatch(source, grid):
    return (f"maps_img has shape {source.shape} and affine\n{source.affine}\nbut the data grid has "
            f"shape {tuple(grid.shape)} and affine\n{grid.affine}\nWith resampling_target=None they "
            "must match: resample the maps (nilearn.image.resample_to_img) or set "
            "resampling_target='data'.")


def _resample(volumes, affine, grid):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message="Resampling binary images")
        img = resample_img(nib.Nifti1Image(volumes, affine), interpolation="linear",
                           target_shape=grid.shape, target_affine=grid.affine,
                           force_resample=True, copy_header=True)
    return np.asanyarray(img.dataobj)


@dataclass(frozen=True)
class ZarrMapsReader:
    """Reads voxel rows ``[start, stop)`` of the kept maps from their zarr array."""

    zarray: object
    kept: np.ndarray | None

    @property
    def n_regions(self) -> int:
        return self.zarray.shape[1] if self.kept is None else len(self.kept)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        block = self.zarray[start:stop]
        return block if self.kept is None else block[:, self.kept]


@dataclass(frozen=True)
class ZarrRunReader:
    """Reads voxel columns ``[start, stop)`` of a run's stored (time, voxel) array.

    ``chunks`` are the store's, as the run's dask array has them.
    """

    zarray: object
    chunks: tuple

    @property
    def shape(self) -> tuple:
        return tuple(self.zarray.shape)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return self.zarray[:, start:stop]


@dataclass(frozen=True)
class NiftiVolumeReader:
    """Reads a 4-D NIfTI run volume by volume: each volume's values at ``positions``.

    ``positions`` are flat (Fortran-order) positions in a volume; the values
    are scaled as nibabel does, in float32 (as a store holds them).
    """

    path: str
    positions: np.ndarray

    def __call__(self):
        with NiftiReader(self.path) as reader:
            info = reader.info
            for _, raw in reader.iter_volumes():
                yield scale_values(raw[self.positions], info.slope, info.inter)


class _Stats:
    """What nilearn checks on the whole maps image, accumulated map by map.

    Each map is one flat (Fortran-order) volume on the grid; only its
    non-zero entries are looked at after one comparison pass.
    """

    def __init__(self, grid, mask, check_overlap=True):
        self.mask = mask
        n_flat = int(np.prod(grid.shape))
        self.counts = np.zeros(n_flat, dtype=np.int32) if check_overlap else None
        self.nonempty: list = []
        self.any_value = False
        self.n_outside_maps = 0
        region = np.ones(grid.shape, dtype=bool) if mask is None else mask
        outside = (region & ~grid.mask).ravel(order="F")  # voxels nilearn uses that the store lacks
        self.outside = outside if outside.any() else None
        self.in_mask = None if mask is None else mask.ravel(order="F")
        # flat position -> stored voxel (row of the maps), -1 where not stored or outside the mask
        flat_ijk = np.ravel_multi_index(tuple(grid.ijk.T), grid.shape, order="F")
        rows = np.arange(grid.n_voxels, dtype=np.int32)
        if mask is not None:
            inside = mask.ravel(order="F")[flat_ijk]
            flat_ijk, rows = flat_ijk[inside], rows[inside]
        self.row_of = np.full(n_flat, -1, dtype=np.int32)
        self.row_of[flat_ijk] = rows

    def add(self, volume):
        """Record one map (flat, Fortran order); return its (rows, values) at the stored voxels."""
        where = np.flatnonzero(volume != 0)  # NaN and inf included: dropped just below
        values = volume[where]
        if values.dtype.kind == "f":
            finite = np.isfinite(values)
            if not finite.all():  # nilearn: non-finite map values are 0
                where, values = where[finite], values[finite]
        self.any_value = self.any_value or bool(where.size)
        if self.counts is not None:
            self.counts[where[counted_in_overlap(values)]] += 1
        if self.in_mask is not None:
            self.nonempty.append(bool(self.in_mask[where].any()))
        if self.outside is not None:
            self.n_outside_maps += bool(self.outside[where].any())
        rows = self.row_of[where]
        stored = rows >= 0
        return rows[stored], values[stored]

    def check(self, resampled):
        if not self.any_value:
            raise InputError("No map left after resampling maps_img." if resampled else "maps_img contains no map.")
        if self.mask is not None and not any(self.nonempty):
            raise InputError("No map left after applying mask to the maps image.")

    @property
    def overlap(self) -> bool:
        return self.counts is not None and bool((self.counts > 1).any())


class _Writer:
    """Holds the maps' non-zero values in memory (sparse), or writes them to a zarr array.

    Maps are added one at a time and kept as sparse (row, value) lists while
    their bytes stay within ``in_memory_bytes``; past it (or with a
    ``maps_store``), every group of ``group_size`` maps is written densely to
    a zarr array chunked (voxel block, group).
    """

    def __init__(self, n_voxels, n_maps, voxel_chunk, group_size, maps_store, in_memory_bytes):
        self.shape, self.chunk, self.group_size = (n_voxels, n_maps), voxel_chunk, group_size
        self.location = None
        self.budget = in_memory_bytes
        self.memory = maps_store is None
        self.parts: list = []  # in memory: (map, rows, values) of every map added
        self.pending: list = []  # zarr: the maps of the group being filled
        self.nbytes = 0
        self.matrix = None
        if not self.memory:
            self._open(maps_store)

    def _open(self, maps_store):
        if maps_store is None:
            # removed with the PreparedMaps; a killed process's folder by the next one
            maps_store = scratch_folder(self, "chunkglm-maps-") / "maps.zarr"
        self.memory, self.location = False, str(maps_store)
        chunks = (min(self.chunk, max(self.shape[0], 1)), self.group_size)
        self.zarray = zarr.create_array(store=str(maps_store), shape=self.shape, chunks=chunks, dtype="float32",
                                        compressors=[compressor()], zarr_format=3, overwrite=True,
                                        fill_value=0.0)

    def add(self, index, rows, values):
        """Map ``index``'s non-zero values at stored voxel ``rows`` (maps come in order)."""
        if self.memory:
            self.parts.append((index, rows, values))
            self.nbytes += rows.nbytes + values.nbytes
            if self.nbytes > self.budget:  # too large for memory: to zarr, the groups done so far included
                parts, self.parts = self.parts, []
                self._open(None)
                for part in parts:
                    self._add_dense(*part)
            return
        self._add_dense(index, rows, values)

    def _add_dense(self, index, rows, values):
        self.pending.append((rows, values))
        if (index + 1) % self.group_size == 0 or index + 1 == self.shape[1]:
            start = index + 1 - len(self.pending)
            group = np.zeros((self.shape[0], len(self.pending)), dtype=np.float32)
            for column, (rows_, values_) in enumerate(self.pending):
                group[rows_, column] = values_
            self.zarray[:, start:start + group.shape[1]] = group
            self.pending = []

    def finish(self, dtype, kept):
        """All maps added: join the in-memory parts into a CSR (voxel, kept map) matrix of ``dtype``."""
        if self.memory:
            parts, self.parts = self.parts, []
            rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int32)
            columns = np.repeat([p[0] for p in parts], [p[1].size for p in parts]).astype(np.int32)
            dtype = np.result_type(dtype, np.float32)  # scipy.sparse has no float16; ints as floats
            values = (np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)).astype(dtype, copy=False)
            matrix = scipy.sparse.csr_matrix((values, (rows, columns)), shape=self.shape, dtype=dtype)
            self.matrix = matrix if len(kept) == self.shape[1] else matrix[:, kept].tocsr()

    def dask_array(self, tag="maps"):
        return graph.zarr_maps(self.zarray, self.chunk, self.location, tag)
