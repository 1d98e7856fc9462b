"""dask plumbing of a group GLM node: every group's OLS fit and every contrast in one graph.

No statistics here: :func:`chunkglm.graph.glm.fit_run` (``noise_model="ols"``, no scaling: the
fit a :class:`~chunkglm.glm.second_level.SecondLevelModel` evaluates) and
:func:`chunkglm.graph.glm.contrast` do them. The graph of a node of ``G`` groups::

    group g's stored (image, voxel) maps, block_i --fit_run (OLS)--> fit_g,i --contrast c--> effect rows, variance
                                              '--mean over the images--> mean row (for the group's mask)
    all rows of all groups stacked: (row, voxel) float64, one (1, block) piece per row and block

Each stored chunk of each group is read by one task, for the group's fit (shared by all of its
contrasts) and its mean; no task holds more than one voxel block. The caller streams the pieces
into a store (a zarr array chunked ``(1, block)``), so no task joins a whole map either.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from chunkglm.graph.glm import contrast, fit_run

__all__ = ["GroupRows", "group_glm_graph"]


@dataclass(frozen=True)
class GroupRows:
    """Where one group's results lie on the row axis of :func:`group_glm_graph`'s array.

    Attributes
    ----------
    mean : int
        The row of the mean of the group's maps (NaN where one of them is NaN, as nilearn's ``mean_img``).
    contrasts : tuple of (slice, int)
        Per contrast, in the order given: its effect rows (one for t, ``q`` for F) and its variance row.
    df_residuals : int
        The fit's degrees of freedom: maps minus the design's rank.
    """

    mean: int
    contrasts: tuple
    df_residuals: int


def group_glm_graph(arrays, designs, contrasts, block: int) -> tuple[da.Array, list[GroupRows]]:
    """Lazy results of every group of a node, as one (row, voxel) float64 array.

    Parameters
    ----------
    arrays : list of dask.array.Array of shape (image, voxel)
        Each group's maps, as stored (the same voxels for every group; rows in design order).
    designs : list of pandas.DataFrame
        Each group's design, one row per map.
    contrasts : list of list of (weights, stat_type)
        Each group's contrasts: weights over its design's columns (shape (p,) for "t", (q, p) for "F").
    block : int
        Voxels per task block (the stored chunks are split into blocks of this size, each read once).

    Returns
    -------
    (dask.array.Array, list of GroupRows)
        Chunked ``(1, block)`` (the last block shorter): regular, as a zarr array needs.
    """
    n_voxels = arrays[0].shape[1]
    if any(array.shape[1] != n_voxels for array in arrays):
        raise ValueError(f"the groups' maps hold different voxels: {[a.shape for a in arrays]}")
    blocks = (block,) * (n_voxels // block) + ((n_voxels % block,) if n_voxels % block else ())
    rows, layout = [], []
    for array, design, wanted in zip(arrays, designs, contrasts):
        array = array.rechunk((-1, blocks))
        run = fit_run(array, design, noise_model="ols", signal_scaling=False)
        start = sum(r.shape[0] for r in rows)
        rows.append(_means(array))
        places, at = [], start + 1
        for weights, stat_type in wanted:
            effect, variance = contrast(run, np.asarray(weights, dtype=np.float64), stat_type)
            rows += [effect, variance[None]]
            places.append((slice(at, at + effect.shape[0]), at + effect.shape[0]))
            at += effect.shape[0] + 1
        layout.append(GroupRows(start, tuple(places), run.df_residuals))
    stacked = da.concatenate(rows, axis=0).astype(np.float64)
    return stacked.rechunk((1, blocks)), layout


def _means(array: da.Array) -> da.Array:
    """(1, voxel) mean of the maps, from the same block keys the fit reads (``to_delayed``, as
    :func:`~chunkglm.graph.glm.fit_run` takes them): one read of each block for both."""
    parts = [da.from_delayed(dask.delayed(_mean_block, pure=True)(block), shape=(1, size), dtype=np.float64)
             for block, size in zip(array.to_delayed().ravel(), array.chunks[1])]
    return da.concatenate(parts, axis=1)


def _mean_block(block):
    return np.mean(block, axis=0, dtype=np.float64)[None]
