"""dask plumbing of image-based meta-analysis: voxel-block graphs over a maps collection.

No statistics here: the estimators (:mod:`chunkglm.meta.ibma`) pass the block
functions (:mod:`chunkglm.meta._blocks`, the kernels of :mod:`chunkglm.kernels.meta`)
and hold what these functions return. The graphs::

    stored (image, voxel) maps --task_array--> voxel blocks within the memory budget
    blocks_1..n of one voxel range --block_maps(fit)--> (n_outputs + 1, block) float64   lazy, one pass
    blocks --rows_with_any(test)--> which images hold a usable voxel                     computed
    one map --row_nanstd--> each image's std over voxels (tree reduction)                computed
    blocks --per_block(fn)--> fn(block) for every voxel block                            computed

Every store chunk is read once per graph: task blocks tile store chunks, never straddle them.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from chunkglm.chunking import MemoryBudget

__all__ = ["block_maps", "compute", "per_block", "row_nanstd", "rows_with_any",
           "select_images", "task_array", "task_blocks"]

def task_blocks(store_chunks, n_images, budget=None) -> tuple[int, ...]:
    """Voxel blocks that tile each store chunk (each chunk is still read once) within the budget:
    the float64 copy of a (K, voxel) input block within half of it
    (:meth:`chunkglm.chunking.MemoryBudget.task_blocks`; 32 MiB by default)."""
    return MemoryBudget.of(budget).task_blocks(store_chunks, n_images, itemsize=8)


def task_array(array: da.Array, chunk_voxels=None, budget=None) -> da.Array:
    """A stored (image, voxel) array in the voxel blocks of the tasks, every image in one block.

    ``chunk_voxels`` fixes the block size; by default each store chunk is split by
    :func:`task_blocks` for ``budget`` (a :class:`~chunkglm.chunking.MemoryBudget`, bytes, or
    None: the package default).
    """
    if chunk_voxels:
        return array.rechunk((-1, int(chunk_voxels)))
    return array.rechunk((-1, task_blocks(array.chunks[1], array.shape[0], budget)))


def select_images(array: da.Array, rows) -> da.Array:
    """The rows ``rows`` (image indices) of an (image, voxel) array; all of it when ``rows`` is None."""
    return array if rows is None else array[rows]


def block_maps(fit_block, blocks, n_rows, token, **kwargs) -> da.Array:
    """Lazy (n_rows, voxel) float64 array: ``fit_block(*blocks_i, **kwargs)`` on every voxel block.

    Parameters
    ----------
    fit_block : callable
        Numpy function of the aligned (image, voxel) blocks of ``blocks``; returns (n_rows, block).
    blocks : list of dask.array.Array
        (image, voxel) arrays with the same voxel chunks (one per stored input).
    n_rows : int
        Rows of each block's result.
    token : str
        Name prefix of the tasks.
    **kwargs
        Keyword arguments of ``fit_block`` (the same for every block).
    """
    return da.map_blocks(fit_block, *blocks, chunks=((n_rows,), blocks[0].chunks[1]), dtype=np.float64,
                         token=token, **kwargs)


def rows_with_any(test_block, blocks, **kwargs) -> np.ndarray:
    """(image,) bool: ``test_block(*blocks_i, **kwargs)`` ((image, 1) bool per block) any over blocks.

    One global pass over the inputs, computed here.
    """
    flags = da.map_blocks(test_block, *blocks, chunks=(blocks[0].chunks[0], (1,) * blocks[0].numblocks[1]),
                          dtype=bool, **kwargs)
    return np.asarray(flags.any(axis=1).compute())


def row_nanstd(array: da.Array) -> np.ndarray:
    """(image,) standard deviation of each row over voxels, NaN ignored (one pass, computed here)."""
    values = array.astype(np.float64)
    return np.asarray(da.nanstd(values, axis=1).compute())


def per_block(fn, array: da.Array, *args) -> tuple:
    """``fn(block, *args)`` for every voxel block of ``array``, computed together; results in block order."""
    parts = [dask.delayed(fn)(block, *args) for block in array.to_delayed().ravel()]
    return dask.compute(*parts)


def compute(lazy) -> np.ndarray:
    """The values of a lazy array as numpy."""
    return np.asarray(lazy.compute())
