"""Task blocks within the user's memory budget: stored voxel chunks tiled, never straddled.

A store's chunks were sized when it was written. A model given a smaller
budget (``chunk_bytes=`` or ``--chunk-mb``) splits each stored chunk that
exceeds it into balanced task blocks (:meth:`chunkglm.chunking.MemoryBudget.tile`);
each stored chunk is still read once, by one task that its blocks slice. A
model given no budget keeps the store's chunks: the array is returned as it is.
"""

from __future__ import annotations

import dask
import dask.array as da
from dask.system import CPU_COUNT
from distributed import default_client

from chunkglm.chunking import MemoryBudget, tile_chunks

__all__ = ["across_threads", "local_threads", "within_budget"]

#: A block is split for idle threads only into parts of at least this many bytes (of the
#: dtype fitted): smaller parts would cost more in task overhead than they save.
MIN_PART_BYTES = 4 * 2**20


def within_budget(array: da.Array, budget=None, itemsize: int | None = None) -> da.Array:
    """The (rows, voxel) ``array`` with voxel blocks of at most the budget's block.

    Parameters
    ----------
    array : dask.array.Array
        (time|image, voxel), as stored (rows whole or not).
    budget : MemoryBudget, int, str or None
        None: the stored chunks as they are (the same array object).
    itemsize : int, optional
        Bytes per value the budget counts; default the array's (4 for float32 stores).
    """
    if budget is None:
        return array
    itemsize = array.dtype.itemsize if itemsize is None else itemsize
    blocks = MemoryBudget.of(budget).tile(array.chunks[1], array.shape[0], itemsize)
    return array if blocks == tuple(array.chunks[1]) else array.rechunk({1: blocks})


def across_threads(array: da.Array, itemsize: int | None = None) -> da.Array:
    """The (rows, voxel) ``array`` with at least one voxel block per thread of the local scheduler.

    A run of fewer stored chunks than threads (one fsaverage5 run is one chunk)
    would leave threads idle through its whole fit: its chunks are split into
    balanced parts (each still read once, by one task that the parts slice) of
    at least :data:`MIN_PART_BYTES`. Nothing changes with a ``distributed``
    client (its workers share the blocks of many runs), with the synchronous
    scheduler, or when there are already as many blocks as threads: large runs
    keep their blocks and their memory.

    Parameters
    ----------
    array : dask.array.Array
        (time|image, voxel), rows whole in each chunk.
    itemsize : int, optional
        Bytes per value the task holds; default the array's.
    """
    threads = local_threads()
    n_blocks = len(array.chunks[1])
    if threads <= n_blocks:
        return array
    itemsize = array.dtype.itemsize if itemsize is None else itemsize
    min_voxels = max(1, MIN_PART_BYTES // (itemsize * max(array.shape[0], 1)))
    largest = max(array.chunks[1], default=0)
    part = max(min_voxels, -(-largest // -(-threads // n_blocks)))
    blocks = tile_chunks(array.chunks[1], part)
    if blocks == tuple(array.chunks[1]):
        return array
    # the parts slice one task's chunk: dask would otherwise fuse each part's slice into a read
    # of its own, and a compressed chunk is decoded whole for any part of it
    return array.map_blocks(_read_whole, dtype=array.dtype).rechunk({1: blocks})


def _read_whole(block):
    """A stored chunk, as read (the task whose result the parts of the chunk slice)."""
    return block


def local_threads() -> int:
    """Threads of dask's local threaded scheduler; 1 with a ``distributed`` client or the
    synchronous scheduler."""
    try:
        default_client()
        return 1
    except ValueError:  # no client: the local scheduler
        pass
    scheduler = dask.config.get("scheduler", None)
    if scheduler not in (None, "threads", "threading"):
        return 1
    return int(dask.config.get("num_workers", None) or CPU_COUNT)
