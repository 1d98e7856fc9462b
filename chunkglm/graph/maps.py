"""dask plumbing for region signals from probabilistic maps.

No statistics here: :mod:`chunkglm.kernels.maps` does them. The graph::

    (maps block_i, block_i of runs 1..k)  --maps_moments-->  [G_i | B1_i | ... | Bk_i]
    tree-sum over blocks -> G (region, region), once per atlas; Bj (region, time) per run
    signals_j = solve(G, Bj)             (time, region), small

Maps and data are chunked along voxels only; the maps are rechunked to each
run's voxel blocks (never the data), so every data chunk is read once and
combined with the matching maps block. :func:`moments` computes G and the
B of a batch of runs in one task per voxel block, so each maps block is read
and converted once per batch. Runs still in NIfTI files (time-major) are
read volume by volume instead, one task per run (:func:`volume_moments`). High-variance confounds are a second, explicit
pass over the data (variances, then a global threshold, then the
time x time Gram matrix of the selected voxels).
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

from chunkglm.graph.evaluate import active_client
from chunkglm.graph.reduce import SPLIT_EVERY, tree_reduce
from chunkglm.kernels import maps as km


def align_maps(maps: da.Array, data: da.Array) -> da.Array:
    """The (voxel, region) maps chunked as the (time, voxel) data's voxel blocks.

    The region axis is one chunk: each block task needs every region.
    """
    if maps.shape[0] != data.shape[1]:
        raise ValueError(f"maps have {maps.shape[0]} voxels, the data {data.shape[1]}")
    target = (data.chunks[1], (maps.shape[1],))
    return maps if maps.chunks == target else maps.rechunk(target)


def moments(maps, datas: list, with_gram: bool = True) -> dask.delayed:
    """Lazy ``[maps.T @ maps | maps.T @ data_1.T | ...]`` (region, region * with_gram + total time).

    A ``Delayed``, not a dask array: its column slices (``moments[:, a:b]``)
    are then tasks on the one summed result, never a second copy of the
    block tasks (slices of a ``from_delayed`` array each recompute them).

    One task per voxel block takes the maps block and that block of every
    run of the batch, and converts the maps block once for all products.

    Parameters
    ----------
    maps : dask array (voxel, region), a reader, or a list of blocks
        A reader is a picklable callable ``read(start, stop) -> (stop - start,
        region)``. A list holds one in-memory
        (voxel, region) block per voxel block of the data (dense or scipy
        sparse); each becomes a graph input of its own (:func:`graph_inputs`),
        so batches given the same block objects share it.
    datas : list of dask arrays (time, voxel), or of readers
        Runs with the same voxel blocks (their lengths may differ). A reader
        is a picklable callable ``read(start, stop) -> (time, stop - start)``
        with ``shape`` and ``chunks`` attributes like an array's.

    Readers are read inside the block task itself: no separate read task
    that the scheduler could run ahead of its consumer, so memory holds the
    blocks of the running tasks only, however many runs a batch has.
    """
    datas = [data if callable(data) else data.rechunk({0: data.shape[0]}) for data in datas]
    chunks = datas[0].chunks[1]
    if any(data.chunks[1] != chunks for data in datas):
        raise ValueError("the runs of one batch must have the same voxel blocks")
    bounds = np.cumsum((0, *chunks))
    if isinstance(maps, list):
        if [block.shape[0] for block in maps] != list(chunks):
            raise ValueError("the maps blocks must match the data's voxel blocks")
        maps_blocks = graph_inputs(maps)
    elif callable(maps):
        maps_blocks = [maps] * len(chunks)
    else:
        maps_blocks = list(align_maps(maps, datas[0]).to_delayed().ravel())
    runs = [[data] * len(chunks) if callable(data) else list(data.to_delayed().ravel()) for data in datas]
    parts = [dask.delayed(_block_moments, pure=True)(maps_blocks[i], int(bounds[i]), int(bounds[i + 1]),
                                                     [blocks[i] for blocks in runs], with_gram)
             for i in range(len(chunks))]
    return tree_sum(parts)


def graph_inputs(blocks: list) -> list:
    """In-memory arrays as graph inputs, one key per object (the same object, the same key).

    With an active distributed client they are persisted on the workers at
    once (the graph then carries their keys, not megabytes of maps). They
    are persisted, not scattered: the scheduler keeps each block's task (the
    block itself), so a block lost with a worker is sent again, where
    scattered data would be gone for good and every task needing it
    cancelled (found by killing a worker during ``extract``,
    tests/test_worker_loss.py).
    """
    nodes = [dask.delayed(block, pure=True) for block in blocks]
    client = active_client()
    if client is not None:
        return client.compute(nodes)
    return nodes


def _block_moments(maps, start, stop, data_blocks, with_gram):
    block = maps(start, stop) if callable(maps) else maps
    data = [run(start, stop) if callable(run) else run for run in data_blocks]
    return km.maps_moments(block, data, with_gram)


def volume_moments(maps, readers: list) -> tuple:
    """Lazy ``maps.T @ maps`` and, per run, ``maps.T @ data.T`` for runs read volume by volume.

    Parameters
    ----------
    maps : scipy sparse matrix (voxel, region)
        In memory; one graph key shared by every run's task.
    readers : list of picklable callables
        ``read()`` yields a run's volumes, each its values at the maps' voxels
        (in the maps' row order). One task per run streams its file.

    Returns
    -------
    (Delayed, list of Delayed)
        The Gram matrix (region, region) and each run's (region, time) products.
    """
    maps = graph_inputs([maps])[0]
    gram = dask.delayed(km.maps_gram, pure=True)(maps)
    return gram, [dask.delayed(_volume_products, pure=True)(maps, reader) for reader in readers]


def _volume_products(maps, reader):
    return km.volume_products(maps, reader())


def tree_sum(parts: list, split_every: int = SPLIT_EVERY):
    """Sum delayed arrays by groups of ``split_every``: the shared tree reduction
    (:func:`chunkglm.graph.reduce.tree_reduce`), of depth log(n) / log(split_every)."""
    if len(parts) == 1:
        return parts[0]
    return tree_reduce(parts, None, _add, split_every=split_every)


def _add(arrays):
    total = np.array(arrays[0], copy=True)
    for array in arrays[1:]:
        total += array
    return total


def region_signals(gram_matrix, projection_matrix, dtype) -> dask.delayed:
    """Lazy (time, region) signals: the small solve, one task."""
    return dask.delayed(km.solve_region_signals, pure=True)(gram_matrix, projection_matrix, dtype)


def cleaned_signals(spec: km.CleanSpec, gram, projections: list, hvs: list, dtypes: list, t_rs: list,
                    confounds: list, sample_masks: list) -> list:
    """Every run's (time, region) signals, solved and cleaned (:func:`~chunkglm.kernels.maps.clean_signals`).

    One dask computation for all runs: the Gram matrix and the block
    products they share are computed once.
    """
    lazy = [dask.delayed(km.clean_signals)(spec, region_signals(gram, projection, np.float64),
                                           conf, hv, mask, t_r, dtype)
            for projection, hv, dtype, t_r, conf, mask in zip(projections, hvs, dtypes, t_rs, confounds,
                                                              sample_masks)]
    return list(dask.compute(*lazy))


def high_variance_confounds(data: da.Array, n_outside: int = 0, n_confounds: int = 5,
                            percentile: float = 2.0, reread: da.Array | None = None) -> dask.delayed:
    """Lazy (time, n_confounds) high-variance confounds of a run, nilearn's definition.

    Two passes over the data blocks: per-voxel mean squares of the detrended
    series (a (voxel,) vector), the global percentile threshold, then the
    (time, time) Gram matrix of the selected voxels summed over blocks.

    Parameters
    ----------
    data : dask array (time, voxel)
    n_outside : int
        Voxels of the image that the store does not hold (zero in nilearn's view).
    reread : dask array, optional
        The same data under other task names, for the second pass: the data
        blocks are then read again rather than held across the global
        threshold (which would keep the whole run in memory).
    """
    data = data.rechunk({0: data.shape[0]})
    second = data if reread is None else reread.rechunk(data.chunks)
    mean_squares = data.map_blocks(_mean_squares, drop_axis=0, dtype=data.dtype)
    threshold = dask.delayed(km.variance_threshold, pure=True)(mean_squares, n_outside, percentile)
    n_time = data.shape[0]
    parts = da.blockwise(_selected_gram_part, "vts", second, "tv", mean_squares, "v", threshold, None,
                         adjust_chunks={"v": 1}, new_axes={"s": n_time}, dtype=np.float64,
                         align_arrays=False)
    total = parts.sum(axis=0, split_every=SPLIT_EVERY)
    return dask.delayed(km.high_variance_components, pure=True)(total, n_confounds)


def _mean_squares(block):
    return km.detrended_mean_squares(block)


def _selected_gram_part(data_block, mean_squares, threshold):
    return km.selected_gram(data_block, mean_squares, threshold)[None]


def reconstruct(region_signals: np.ndarray, maps: da.Array) -> da.Array:
    """Lazy (time, voxel) voxel signals ``signals @ maps.T``, blockwise over voxels."""
    signals = np.asarray(region_signals)
    maps = maps.rechunk({1: maps.shape[1]})
    dtype = np.result_type(signals.dtype, maps.dtype)
    return da.blockwise(_reconstruct_block, "tv", maps, "vr", signals, None,
                        new_axes={"t": signals.shape[0]}, concatenate=True, dtype=dtype)


def _reconstruct_block(maps_block, signals):
    return km.reconstruct(signals, maps_block)


def voxel_signals(region_signals: np.ndarray, maps: da.Array) -> np.ndarray:
    """(time, voxel) voxel signals ``signals @ maps.T`` (:func:`reconstruct`, computed)."""
    return dask.compute(reconstruct(region_signals, maps))[0]


def zarr_maps(zarray, voxel_chunk: int, location: str, tag: str = "maps") -> da.Array:
    """A (voxel, map) zarr array of prepared maps as a dask array chunked by voxel blocks.

    Task names are unique to ``tag`` (and the array's ``location``).
    """
    name = f"{tag}-{tokenize(location, tag)}"
    return da.from_zarr(zarray, chunks=(voxel_chunk, zarray.shape[1]), name=name)


def reread_run(zarray, chunks, location: str, path: str) -> da.Array:
    """A run's stored (time, voxel) array under new task names, for a second pass over it."""
    return da.from_zarr(zarray, chunks=chunks, name=f"bold-reread-{tokenize(location, path)}")
