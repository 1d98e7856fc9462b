"""A stored (row, voxel) array read one stored chunk of voxels at a time, inside the task using it.

A model that fits maps block by block needs, per task, the block's values and nothing else. A
dask ``from_zarr`` array reads each chunk in a task of its own; a distributed scheduler may run
the next chunk's read on a worker before the current chunk's consumer, so a worker can hold two
chunks at once. :class:`StoredBlocks` is a picklable reader that the consuming task calls
itself (as :func:`chunkglm.graph.maps.moments` reads its runs): a worker then holds the blocks
of its running tasks only.

Blocks are the stored chunks along the voxel axis (the inner chunks of a sharded array, read
by zarr through the shard's index), restricted to the selected voxels; a chunk holding none of them is not read. All rows of a block
are read (rows are whole in a chunk, the store's rule). A block that is one whole stored chunk is
decoded by the array's own codec pipeline and returned as decoded, without zarr's copy into an
output array: the read holds the compressed bytes and the decoded chunk, not a third buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync

__all__ = ["StoredBlocks"]


@dataclass(frozen=True, eq=False)
class StoredBlocks:
    """Reads a stored (row, voxel) zarr array by stored chunks of voxels, the selected voxels of each.

    Parameters
    ----------
    zarray : zarr.Array
        Two dimensions, (row, voxel); read as stored (no conversion of the dtype).
    voxels : ndarray of int, optional
        Sorted, unique indices into the voxel axis to read (None: every voxel).

    Attributes
    ----------
    bounds : tuple of (int, int)
        Per block, the stored voxel range ``[start, stop)`` it reads.
    block_sizes : tuple of int
        Per block, the selected voxels it returns (all > 0).
    """

    zarray: object
    voxels: np.ndarray | None = None
    bounds: tuple = field(init=False, repr=False)
    block_sizes: tuple = field(init=False, repr=False)
    _columns: tuple = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.zarray.shape) != 2:
            raise ValueError(f"expected a (row, voxel) array; received shape {self.zarray.shape}")
        n_voxels = int(self.zarray.shape[1])
        width = int(self.zarray.chunks[1])  # inner chunks of a sharded array, as dask's from_zarr
        starts = range(0, n_voxels, width)
        edges = [(start, min(start + width, n_voxels)) for start in starts]
        if self.voxels is None:
            columns = [None] * len(edges)
        else:
            voxels = np.asarray(self.voxels, dtype=np.int64)
            if voxels.ndim != 1 or (voxels.size and (voxels[0] < 0 or voxels[-1] >= n_voxels
                                                     or np.any(np.diff(voxels) <= 0))):
                raise ValueError(f"voxels must be sorted unique indices in [0, {n_voxels}); received "
                                 f"{voxels.size} values from {voxels.min()} to {voxels.max()}: pass "
                                 "np.unique(voxels) of the stored voxel axis")
            cuts = np.searchsorted(voxels, [start for start, _ in edges] + [n_voxels])
            columns = [voxels[a:b] - start for (start, _), a, b in zip(edges, cuts[:-1], cuts[1:])]
        kept = [(edge, cols) for edge, cols in zip(edges, columns) if cols is None or cols.size]
        object.__setattr__(self, "bounds", tuple(edge for edge, _ in kept))
        object.__setattr__(self, "_columns", tuple(_as_range(cols, stop - start) for (start, stop), cols in kept))
        object.__setattr__(self, "block_sizes", tuple(
            stop - start if cols is None else int(cols.size) for (start, stop), cols in kept))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, selected voxels)."""
        return int(self.zarray.shape[0]), int(sum(self.block_sizes))

    def __len__(self) -> int:
        return len(self.bounds)

    def __call__(self, index: int) -> np.ndarray:
        """Block ``index``: (rows, ``block_sizes[index]``), the stored dtype; may be read-only."""
        start, stop = self.bounds[index]
        columns = self._columns[index]
        block = self._whole_chunk(start, stop)
        if block is None:
            block = self.zarray[:, start:stop]
        if columns is None:
            return block
        if isinstance(columns, slice):
            return block[:, columns]
        selected = np.take(block, columns, axis=1)
        del block  # the chunk goes before the caller's work starts
        return selected

    @property
    def decodes_whole_chunks(self) -> bool:
        """Whether whole chunks are decoded without zarr's output copy: zarr >= 3.1 (its
        ``Array.async_array`` and ``AsyncArray.config``), a v3 array with a regular chunk grid,
        no sharding, every row in one chunk. Otherwise blocks are read through zarr's indexing
        (the same values, one more chunk-sized buffer during the read)."""
        array = getattr(self.zarray, "async_array", None)
        return (array is not None and hasattr(array, "config") and hasattr(array, "codec_pipeline")
                and isinstance(self.zarray.metadata, ArrayV3Metadata)
                and isinstance(self.zarray.metadata.chunk_grid, RegularChunkGrid)
                and self.zarray.shards is None and self.zarray.chunks[0] >= self.zarray.shape[0])

    def _whole_chunk(self, start: int, stop: int) -> np.ndarray | None:
        """Stored chunk at ``start`` as the codec pipeline decodes it (read-only), or None where
        :attr:`decodes_whole_chunks` is False: the caller reads through zarr's indexing then."""
        if not self.decodes_whole_chunks:
            return None
        array = self.zarray.async_array
        rows = int(self.zarray.shape[0])
        coords = (0, start // self.zarray.chunks[1])
        prototype = default_buffer_prototype()
        spec = array.metadata.get_chunk_spec(coords, array.config, prototype=prototype)
        decoded = sync(_decode(array, coords, spec, prototype))
        if decoded is None:  # no object: the array's fill value, as zarr reads it
            return np.full((rows, stop - start), self.zarray.fill_value, dtype=self.zarray.dtype)
        return decoded.as_numpy_array()[:rows, :stop - start]


async def _decode(array, coords, spec, prototype):
    """The decoded chunk at ``coords`` (an NDBuffer), or None when the store has no such object."""
    raw = await (array.store_path / array.metadata.encode_chunk_key(coords)).get(prototype=prototype)
    if raw is None:
        return None
    (decoded,) = await array.codec_pipeline.decode([(raw, spec)])
    return decoded


def _as_range(columns, width):
    """Selected columns of a chunk as a slice when they are one contiguous run (a view, no copy);
    None when they are the whole chunk."""
    if columns is None:
        return None
    if columns.size == width:
        return None
    if columns[-1] - columns[0] + 1 == columns.size:
        return slice(int(columns[0]), int(columns[-1]) + 1)
    return columns
