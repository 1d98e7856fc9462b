"""dask plumbing of image-based meta-analysis: voxel-block graphs over a maps collection.

No statistics here: the estimators (:mod:`chunkglm.meta.ibma`) pass the block
functions (:mod:`chunkglm.meta._blocks`, the kernels of :mod:`chunkglm.kernels.meta`)
and hold what these functions return. The graphs::

    stored (image, voxel) maps --task_array--> voxel blocks within the memory budget
    blocks_1..n of one voxel range --block_maps(fit)--> (n_outputs + 1, block) float64   lazy, one pass
    blocks --rows_with_any(test)--> which images hold a usable voxel                     computed
    one map --row_nanstd--> each image's std over voxels (tree reduction)                computed
    blocks --per_block(fn)--> fn(block) for every voxel block                            computed
    windows of one map --window_sums(fn)--> fn(window, ...) summed over blocks           lazy (with the maps)
    numpy (image, voxel) array --from_numpy--> the same in task blocks                   (in-memory old API)

Every store chunk is read once per graph: task blocks tile store chunks, never straddle them.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from chunkglm.chunking import MemoryBudget

__all__ = ["block_maps", "block_windows", "compute", "compute_together", "from_numpy", "per_block", "row_nanstd",
           "rows_with_any", "select_images", "task_array", "task_blocks", "window_sums"]


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


def compute_together(*lazy) -> tuple:
    """Several lazy results (arrays, ``window_sums``) computed in one graph: the input chunks
    they share are read once."""
    return dask.compute(*lazy)


def from_numpy(values, chunk_voxels=None, budget=None) -> da.Array:
    """An in-memory (image, voxel) array in the voxel blocks of the tasks (as :func:`task_array`)."""
    values = np.asarray(values)
    array = da.from_array(values, chunks=(values.shape[0], values.shape[1] or 1))
    return task_array(array, chunk_voxels, budget)


def block_windows(array: da.Array, back) -> list[tuple[int, int, int, int]]:
    """For every voxel block ``[start, stop)`` of ``array``: ``(start, stop, lo, stop)`` where
    ``lo`` is the first voxel any voxel of the block reaches through ``back`` ((voxel, n) indices
    of other voxels, -1 for none), so that ``array[:, lo:stop]`` holds the block and those voxels."""
    back = np.asarray(back)
    bounds = np.concatenate(([0], np.cumsum(array.chunks[1])))
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        reached = back[start:stop]
        reached = reached[reached >= 0]
        lo = int(min(start, reached.min())) if reached.size else int(start)
        out.append((int(start), int(stop), lo, int(stop)))
    return out


def window_sums(fn, array: da.Array, back, n_out: int) -> da.Array:
    """Lazy (n_out,) sum over voxel blocks of ``fn(array[:, lo:stop], here, back_local)``.

    ``here`` are the window positions of the block's voxels, ``back_local`` the window positions
    of the voxels ``back`` names for them (-1 kept): a block reads its own chunk and the tail of
    the chunks before it that its neighbours lie in. A dask array, so that computed with the
    maps (:func:`compute_together`) it is optimised in one graph with them: the chunks both
    read are read once.
    """
    back = np.asarray(back)
    parts = []
    for start, stop, lo, hi in block_windows(array, back):
        window = array[:, lo:hi]
        window = window.rechunk((window.shape[0], window.shape[1]))
        local = np.where(back[start:stop] >= 0, back[start:stop] - lo, -1)
        parts.append(da.map_blocks(_window_part, window, fn=fn, here=np.arange(start - lo, stop - lo), back=local,
                                   drop_axis=1, chunks=((n_out,),), dtype=np.float64))
    return da.stack(parts).sum(axis=0)


def _window_part(window, *, fn, here, back):
    return np.asarray(fn(window, here, back), dtype=np.float64)
