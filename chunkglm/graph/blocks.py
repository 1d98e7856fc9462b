"""Task blocks within the user's memory budget: stored voxel chunks tiled, never straddled.

A store's chunks were sized when it was written. A model given a smaller
budget (``chunk_bytes=`` or ``--chunk-mb``) splits each stored chunk that
exceeds it into balanced task blocks (:meth:`chunkglm.chunking.MemoryBudget.tile`);
each stored chunk is still read once, by one task that its blocks slice. A
model given no budget keeps the store's chunks: the array is returned as it is.
"""

from __future__ import annotations

import dask.array as da

from chunkglm.chunking import MemoryBudget

__all__ = ["within_budget"]


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
