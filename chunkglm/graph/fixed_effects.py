"""dask plumbing of fixed effects over a maps collection: one graph for every job of a level.

No statistics here: :func:`chunkglm.kernels.fixed_effects.fixed_effects_jobs` does them. The graph::

    stored (image, voxel) effects, variances --task blocks within the budget-->
    block_i of both --fixed_effects_jobs--> (job, row, block_i) float32     one task per voxel block
    --split per job, regular voxel blocks--> (1, row, block) pieces, written by the caller chunk by chunk

Every stored chunk is read once for all jobs (a subject's runs of one contrast, for every
subject and contrast of a BIDS Stats Models node); no task holds more than one voxel block of
the inputs, and no task holds a whole map.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from chunkglm.chunking import MemoryBudget
from chunkglm.kernels.fixed_effects import ROWS, fixed_effects_jobs

__all__ = ["fixed_effects_graph"]


def fixed_effects_graph(effects: da.Array, variances: da.Array, jobs, *, precision_weighted=False, dofs=None,
                        budget=None) -> da.Array:
    """Lazy (job, row, voxel) fixed effects of every job, rows as :data:`~chunkglm.kernels.fixed_effects.ROWS`:
    computed in float64, kept as float32 (the maps' type; the mean row is float32 already).

    Parameters
    ----------
    effects, variances : dask.array.Array of shape (image, voxel)
        The stacked inputs, as stored (same shape and voxel chunks).
    jobs : list of int arrays
        Rows each job combines.
    precision_weighted : bool
    dofs : list of float or None, optional
        Each job's degrees of freedom (None: nilearn's default, 100 per input).
    budget : MemoryBudget, int, str or None
        Voxel blocks: the float64 copies of both inputs and the block's results within half
        of it (:meth:`~chunkglm.chunking.MemoryBudget.task_blocks`); each stored chunk is split,
        never straddled. None: the stored chunks as they are (inputs staged for this graph).

    Returns
    -------
    dask.array.Array
        Chunked ``(1, len(ROWS), block)``: one piece per job and voxel block, as a store
        chunked by job writes it without a task holding two jobs' values.
    """
    if effects.shape != variances.shape:
        raise ValueError(f"effects {effects.shape} and variances {variances.shape} differ")
    jobs = [np.asarray(rows, dtype=np.intp) for rows in jobs]
    rows_held = 2 * effects.shape[0] + len(ROWS) * len(jobs)
    blocks = (tuple(effects.chunks[1]) if budget is None
              else MemoryBudget.of(budget).task_blocks(effects.chunks[1], rows_held))
    effects = effects.rechunk((-1, blocks))
    variances = variances.rechunk((-1, blocks))
    result = da.map_blocks(_block, effects, variances, jobs=jobs, precision_weighted=precision_weighted,
                           dofs=dofs, new_axis=1, chunks=((len(jobs),), (len(ROWS),), blocks),
                           dtype=np.float32, token="fixed-effects")
    return result.rechunk((1, len(ROWS), _regular(blocks)))


def _regular(blocks) -> tuple[int, ...]:
    """The voxel axis in blocks of the largest task block, the last one shorter: the regular
    chunks a zarr array needs (the stored inputs' blocks may end on a longer one); a piece then
    joins the parts of at most two neighbouring task blocks."""
    size, total = max(blocks), sum(blocks)
    return (size,) * (total // size) + ((total % size,) if total % size else ())


def _block(effects, variances, *, jobs, precision_weighted, dofs):
    return fixed_effects_jobs(effects, variances, jobs, precision_weighted, dofs).astype(np.float32)
