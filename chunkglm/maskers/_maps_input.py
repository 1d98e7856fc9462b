"""Maps image -> (voxel, region) dask array on a store grid, a group of maps at a time.

nilearn loads the whole 4-D maps image, resamples it onto the data grid
(``resample_img``, interpolation "linear"), restricts it to the mask, drops
maps left empty, and solves over the masked voxels. Here the maps are read
in groups of ``group_size`` volumes (streamed from the file, never the whole
image), each group is resampled with nilearn's own ``resample_img`` (linear
interpolation acts volume by volume and never leaves the input range, so a
group gives the same numbers as the whole image), gathered at the store
grid's voxels and either kept in memory or written to a zarr array whose
chunks are (voxel block, group). Peak memory: one group on the full grid.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from chunkglm.errors import InputError
from chunkglm.kernels.maps import overlap_counts

#: Maps whose (voxel, region) float32 array is at most this are held in memory.
IN_MEMORY_BYTES = 256 * 2**20
#: Bytes of one group of resampled maps on the full grid (float64).
GROUP_BYTES = 128 * 2**20


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
        from chunkglm.io.nifti import NiftiReader, scale_values

        with NiftiReader(str(self.image)) as reader:
            info = reader.info
            start, group = 0, None
            for index, raw in reader.iter_volumes():
                if group is None:
                    # Fortran order: each volume is one contiguous slab, filled by a plain copy
                    group = np.empty((*self.shape, min(group_size, self.n_maps - start)), dtype=self.dtype,
                                     order="F")
                # raw is a view of the reader's reused buffer: this assignment is the one copy out of it
                group[..., index - start] = scale_values(raw, info.slope, info.inter).reshape(self.shape, order="F")
                if index - start + 1 == group.shape[-1]:
                    yield start, _finite(group, copy=False)
                    start, group = index + 1, None

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
    if isinstance(maps_img, str | Path):
        from chunkglm.io.nifti import read_info

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
            "map. For a single map, add a 4th axis of length 1 "
            "(nilearn.image.new_img_like(img, data[..., None]))."
        )
    return MapsSource(maps_img, np.asarray(affine, dtype=float), tuple(int(n) for n in shape[:3]),
                      int(shape[3]), np.dtype(dtype))


def _is_scaled(img):
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return slope != 1 or inter != 0


def same_grid(affine_a, shape_a, affine_b, shape_b) -> bool:
    """nilearn's check_same_fov: same 3-D shape and ``np.allclose`` affines."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b)


@dataclass
class PreparedMaps:
    """Maps on a store grid, ready for extraction.

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

    @property
    def location(self) -> str | None:
        """The zarr array holding the maps, or None when they are in memory."""
        return self.writer.location

    def reader(self):
        """A picklable ``read(start, stop)`` of the kept maps' voxel rows (zarr-backed maps), or None."""
        if self.writer.memory:
            return None
        return ZarrMapsReader(self.writer.zarray, None if len(self.kept) == self.n_maps else self.kept)

    def array(self, tag: str = "maps"):
        """The kept maps as a dask array (voxel, n_kept), voxel chunks as the data's.

        Zarr-backed maps get task names unique to ``tag``: each consumer
        (the Gram matrix, each run) then reads its own blocks and frees them
        at once, instead of the scheduler holding blocks shared by many runs.
        """
        array = self.writer.dask_array(tag)
        return array if len(self.kept) == self.n_maps else array[:, self.kept]


def prepare_maps(source: MapsSource, grid, mask=None, voxel_chunk: int | None = None,
                 resample: bool = True, maps_store=None, group_size: int | None = None,
                 in_memory_bytes: int = IN_MEMORY_BYTES, keep_empty: bool = False,
                 check_overlap: bool = True) -> PreparedMaps:
    """Resample (if needed), mask, and chunk the maps on ``grid``'s stored voxels.

    Parameters
    ----------
    source : MapsSource
    grid : chunkglm.io.store.Grid
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
        Maps resampled per step; default from :data:`GROUP_BYTES`.
    in_memory_bytes : int
        Maps up to this size (float32) stay in memory; larger ones go to zarr.
    keep_empty : bool
        nilearn's ``keep_masked_maps``: keep maps left empty by the mask.
    check_overlap : bool
        Count maps per voxel (for ``allow_overlap=False``); else ``overlap`` is False.
    """
    needs_resampling = not same_grid(source.affine, source.shape, grid.affine, grid.shape)
    if needs_resampling and not resample:
        raise InputError(_grid_mismatch(source, grid))
    n_voxels, n_maps = grid.n_voxels, source.n_maps
    group_size = group_size or max(1, GROUP_BYTES // (8 * int(np.prod(grid.shape))))
    voxel_chunk = voxel_chunk or max(n_voxels, 1)
    writer = _Writer(n_voxels, n_maps, voxel_chunk, group_size, maps_store, in_memory_bytes)
    stats = _Stats(grid, mask, check_overlap)
    for start, volumes in source.groups(group_size):
        if needs_resampling:
            volumes = _resample(volumes, source.affine, grid)
        values = stats.add(volumes)
        writer.write(start, values)
    stats.check(needs_resampling)
    kept = np.flatnonzero(stats.nonempty) if mask is not None and not keep_empty else np.arange(n_maps)
    dropped = [int(i) for i in np.setdiff1d(np.arange(n_maps), kept)]
    dtype = stats.dtype or source.dtype
    writer.finish()
    return PreparedMaps(writer, kept, dropped, n_maps, np.dtype(dtype), stats.overlap, stats.n_outside_maps)


def _grid_mismatch(source, grid):
    return (f"maps_img has shape {source.shape} and affine\n{source.affine}\nbut the data grid has "
            f"shape {tuple(grid.shape)} and affine\n{grid.affine}\nWith resampling_target=None they "
            "must match: resample the maps (nilearn.image.resample_to_img) or set "
            "resampling_target='data'.")


def _resample(volumes, affine, grid):
    from nilearn.image import resample_img

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


class _Stats:
    """What nilearn checks on the whole maps image, accumulated group by group."""

    def __init__(self, grid, mask, check_overlap=True):
        self.grid, self.mask, self.check_overlap = grid, mask, check_overlap
        self.ijk = tuple(grid.ijk.T)
        self.counts = np.zeros(grid.shape, dtype=np.int32)
        self.nonempty: list = []
        self.any_value = False
        self.n_outside_maps = 0
        self.dtype = None
        region = np.ones(grid.shape, dtype=bool) if mask is None else mask
        self.outside = region & ~grid.mask  # voxels nilearn uses that the store lacks
        self.mask_stored = None if mask is None else mask[self.ijk]
        # positions in the Fortran-flattened volume: a group is gathered as (map, voxel) rows
        self.flat_ijk = np.ravel_multi_index(self.ijk, grid.shape, order="F")
        self.flat_mask = None if mask is None else np.flatnonzero(mask.ravel(order="F"))
        self.flat_outside = np.flatnonzero(self.outside.ravel(order="F"))

    def add(self, volumes):
        """Record a group (x, y, z, g) on the grid; return its (voxel, g) stored values."""
        self.dtype = self.dtype or volumes.dtype
        if self.check_overlap:
            self.counts += overlap_counts(volumes)
        self.any_value = self.any_value or bool(np.any(volumes != 0))
        # (map, voxel) rows: a free view of a Fortran-ordered group, a copy otherwise
        rows = np.asarray(volumes).reshape(-1, volumes.shape[-1], order="F").T
        if self.mask is not None:
            self.nonempty.extend(np.abs(rows[:, self.flat_mask]).sum(axis=1) > 0)
        if self.flat_outside.size:
            self.n_outside_maps += int(np.any(rows[:, self.flat_outside] != 0, axis=1).sum())
        values = rows[:, self.flat_ijk].T
        if self.mask_stored is not None:
            values = np.where(self.mask_stored[:, None], values, 0).astype(values.dtype, copy=False)
        return values

    def check(self, resampled):
        if not self.any_value:
            raise InputError("No map left after resampling maps_img." if resampled else "maps_img contains no map.")
        if self.mask is not None and not any(self.nonempty):
            raise InputError("No map left after applying mask to the maps image.")

    @property
    def overlap(self) -> bool:
        return bool((self.counts > 1).any())


class _Writer:
    """Holds the (voxel, map) values in memory, or writes them to a zarr array."""

    def __init__(self, n_voxels, n_maps, voxel_chunk, group_size, maps_store, in_memory_bytes):
        self.shape, self.chunk = (n_voxels, n_maps), voxel_chunk
        self.cleanup, self.location = [], None
        self.memory = maps_store is None and n_voxels * n_maps * 4 <= in_memory_bytes
        self.parts: list = []
        if not self.memory:
            self.zarray = self._open(maps_store, (min(voxel_chunk, max(n_voxels, 1)), group_size))

    def _open(self, maps_store, chunks):
        import zarr

        from chunkglm.io.store import compressor

        if maps_store is None:
            folder = tempfile.TemporaryDirectory(prefix="chunkglm-maps-")
            self.cleanup.append(folder)  # removed with the PreparedMaps
            maps_store = Path(folder.name) / "maps.zarr"
        self.location = str(maps_store)
        return zarr.create_array(store=str(maps_store), shape=self.shape, chunks=chunks, dtype="float32",
                                 compressors=[compressor()], zarr_format=3, overwrite=True, fill_value=0.0)

    def write(self, start, values):
        if self.memory:
            self.parts.append(values)
        else:
            self.zarray[:, start:start + values.shape[1]] = values.astype(np.float32, copy=False)

    def finish(self):
        """All groups written: join the in-memory parts."""
        if self.memory:
            import uuid

            import dask.array as da

            data = np.concatenate(self.parts, axis=1) if self.parts else np.zeros(self.shape)
            self.parts = []
            # one dask array, shared by every consumer (small: it is in memory anyway)
            self.in_memory = da.from_array(data, chunks=(self.chunk, self.shape[1]),
                                           name=f"maps-{uuid.uuid4().hex}")

    def dask_array(self, tag="maps"):
        import dask.array as da
        from dask.base import tokenize

        if self.memory:
            return self.in_memory
        name = f"{tag}-{tokenize(self.location, tag)}"
        return da.from_zarr(self.zarray, chunks=(self.chunk, self.shape[1]), name=name)
