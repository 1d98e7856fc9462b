"""dask plumbing for nilearn's treatment of non-finite inputs (NaN/inf -> 0).

Each voxel block read by a model goes through one task of
:func:`chunkglm.kernels.finite.finite_block`, which returns the block with
non-finite values set to 0 *and* the number of voxels that held one. Every
consumer of the block takes the first, and the model computes the counts
with its other outputs: the data are read once, and the warning's count
costs a few integers.
"""

from __future__ import annotations

from typing import NamedTuple

import dask
import dask.array as da

from chunkglm.kernels import finite as kf


class FiniteBlocks(NamedTuple):
    """Per voxel block, the delayed finite block and its delayed count of affected voxels."""

    blocks: list
    counts: list


def finite_blocks(blocks) -> FiniteBlocks:
    """Wrap delayed (n, voxel) blocks: one task each, giving the zeroed block and the count."""
    pairs = [dask.delayed(kf.finite_block, pure=True, nout=2)(block) for block in blocks]
    return FiniteBlocks([pair[0] for pair in pairs], [pair[1] for pair in pairs])


def finite_array(array: da.Array) -> tuple[da.Array, list]:
    """A (n, voxel) dask array with NaN/inf set to 0, and the per-block delayed counts.

    Axis 0 is joined into one chunk (every model works along it). Compute the
    counts in the same ``dask.compute`` as the array's consumers, so that
    each block is read once.
    """
    if array.numblocks[0] != 1:
        array = array.rechunk({0: -1})
    wrapped = finite_blocks(array.to_delayed().ravel())
    parts = [da.from_delayed(block, shape=(array.shape[0], size), dtype=array.dtype)
             for block, size in zip(wrapped.blocks, array.chunks[1])]
    return da.concatenate(parts, axis=1), wrapped.counts


def finite_values(array: da.Array) -> da.Array:
    """The array with NaN/inf set to 0, without counts (a re-read of counted data)."""
    return array.map_blocks(kf.finite_values, dtype=array.dtype)
