"""Fixed effects of a BIDS Stats Models node (Type "meta"), every group at once over voxel blocks.

fitlins 0.11 combines, for each group of a Subject or Session node and each contrast, the effect
and variance maps of the inputs the contrast involves with nilearn's ``compute_fixed_effects``
(not precision-weighted, nilearn's default 100 degrees of freedom per input), masked with
nilearn's background mask of the inputs' mean effect. Here the same numbers come from one dask
graph for the whole node:

1. the inputs of all groups (the maps the node before wrote) are stacked into one maps node of a
   scratch store (:func:`chunkglm.io.inputs.write_maps_node`, one map at a time; in
   ``scratch_dir``, which ``chunkglm app`` makes inside the cohort store's folder, where the
   workers read), chunked so that
   a task's inputs and results fit the memory budget (one task per stored chunk);
2. one task per voxel block computes every job's (group x contrast) fixed effects and the mean
   effect its mask needs (:func:`chunkglm.graph.fixed_effects.fixed_effects_graph`); the results
   are streamed into the scratch store chunk by chunk (one job's voxel block each): no task
   holds a subject's maps whole;
3. per job, an explicit global step on its 3-D mean map: nilearn's
   ``compute_background_mask`` (as its ``NiftiMasker`` calls it), then the job's four maps are
   read back from the scratch store, masked (zero outside, as nilearn's ``inverse_transform``)
   and returned as images, one job at a time.

The staged voxels are those of the cohort store's grids the maps lie on (the run fits never
leave them, so the maps are zero outside, as the files say), else every voxel of the maps' grid.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr

from chunkglm.chunking import MemoryBudget
from chunkglm.errors import InputError
from chunkglm.graph.fixed_effects import fixed_effects_graph
from chunkglm.io.inputs import write_maps_node
from chunkglm.io.layout import zarr_store
from chunkglm.io.nifti import image_from_voxels
from chunkglm.io.scratch import TemporaryFolder
from chunkglm.kernels.fixed_effects import ROWS

__all__ = ["FixedEffectsLevel", "background_mask", "staged_mask", "streamed"]

_PREFIX = "chunkglm-fixed-effects-"
_RESULTS = "fixed_effects"


class FixedEffectsLevel:
    """Every job's fixed effects of one node, computed as one graph over voxel blocks.

    Parameters
    ----------
    jobs : list of list of (effect path, variance path)
        The inputs each job (one group's contrast) combines, in the order nilearn is given them.
    grids : list of chunkglm.io.layout.Grid, optional
        The cohort store's grids: the voxels staged are those of the grids the maps lie on
        (the union of their masks; default every voxel of the maps' grid).
    precision_weighted : bool
        nilearn's ``precision_weighted`` (fitlins: False).
    dofs : list of float or None, optional
        Each job's degrees of freedom for its z map (None: nilearn's default, 100 per input).
    chunk_bytes : int, str or None
        The memory budget (None: the package default, 64 MiB).
    scratch_dir : str, Path or None
        The local folder or object-store URL the scratch store is made in (default the temporary
        directory); the cluster's workers read and write that store, so on several machines a
        folder they share (or the URL).

    Attributes
    ----------
    lazy : dask.array.Array
        The (job, row, voxel) graph (rows :data:`~chunkglm.kernels.fixed_effects.ROWS`), before
        :meth:`compute` writes it.
    """

    def __init__(self, jobs, *, grids=(), precision_weighted=False, dofs=None, chunk_bytes=None, scratch_dir=None):
        if not jobs or any(not inputs for inputs in jobs):
            raise InputError("fixed effects need at least one input map per contrast; a contrast of this "
                             "node involves none (check the node's Model.X and the contrast's conditions).")
        self.n_jobs = len(jobs)
        paths = list(dict.fromkeys(pair for inputs in jobs for pair in inputs))
        row_of = {pair: index for index, pair in enumerate(paths)}
        budget = MemoryBudget.of(chunk_bytes)
        rows_held = 2 * len(paths) + len(ROWS) * len(jobs)  # float64 inputs and results of a task (at most)
        block = budget.task_block_voxels(rows_held, 8)
        self.folder = TemporaryFolder(_PREFIX, scratch_dir)  # (and removes those killed processes left)
        table = pd.DataFrame({"effect": [e for e, _ in paths], "variance": [v for _, v in paths]})
        try:
            node = write_maps_node(table, ("effect", "variance"), self.folder.path("inputs.zarr"), "inputs",
                                   staged_mask(paths[0][0], grids), chunk_bytes=block * len(paths) * 4)
        except BaseException:
            self.close()
            raise
        self.grid = node.grid
        self.lazy = fixed_effects_graph(node.data("effect").data, node.data("variance").data,
                                        [[row_of[pair] for pair in inputs] for inputs in jobs],
                                        precision_weighted=precision_weighted, dofs=dofs)
        self._results = None

    def compute(self) -> None:
        """Evaluate the graph, streaming every (job, voxel block) result into the scratch store."""
        self._results = streamed(self.lazy, ("job", "row", "voxel"), self.folder.path("results.zarr"))

    def images(self, job: int) -> dict:
        """One job's maps (nilearn's output keys: effect_size, effect_variance, stat, z_score) as
        float32 images, zero outside the job's background mask."""
        if self._results is None:
            self.compute()
        values = np.asarray(self._results[job].values)
        inside = background_mask(values[0], self.grid)
        return {name: image_from_voxels(np.where(inside, values[row], 0.0), self.grid.ijk, self.grid.shape,
                                        affine=self.grid.affine)
                for row, name in enumerate(ROWS) if name != "mean"}

    def close(self) -> None:
        """Remove the scratch store."""
        self.folder.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def streamed(lazy, dims, store) -> xr.DataArray:
    """Evaluate ``lazy``, each piece written into a zarr array at ``store`` (a path or URL) as its
    task ends, and the array read back without dask (``chunks=None``: a row is a few chunk reads,
    no graph per row)."""
    xr.Dataset({_RESULTS: (dims, lazy)}).to_zarr(zarr_store(store), mode="w", zarr_format=3, consolidated=False)
    return xr.open_zarr(zarr_store(store, read_only=True), chunks=None, zarr_format=3,
                        consolidated=False)[_RESULTS]


def staged_mask(first_map, grids):
    """The union of the masks of the cohort grids the maps lie on, as an image; None (every voxel)
    when they lie on none."""
    img = nib.load(first_map)
    masks = [grid.mask for grid in grids
             if getattr(grid, "affine", None) is not None and getattr(grid, "mask", None) is not None
             and np.ndim(grid.mask) == 3 and grid.mask.shape == img.shape[:3]
             and np.allclose(grid.affine, img.affine, atol=1e-4)]
    if not masks:
        return None
    return nib.Nifti1Image(np.logical_or.reduce(masks).astype(np.uint8), img.affine)


def background_mask(mean: np.ndarray, grid) -> np.ndarray:
    """(voxel,) bool: nilearn's background mask of the job's mean effect (the global step).

    The mean is nilearn's (``compute_mean``: the float32 mean of the stacked maps) up to the
    summation order of its last bits; voxels outside the staged grid are 0, as in the maps.
    The mask only asks whether a voxel's mean equals the border's median (or is NaN): with the
    zero background of model maps, whether the inputs are all zero there, which summation
    order cannot change unless non-zero values cancel exactly.
    """
    from nilearn.masking import compute_background_mask

    volume = np.zeros(grid.shape, dtype=np.float32)
    volume[tuple(grid.ijk.T)] = mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's note on masks of one component
        mask = compute_background_mask(nib.Nifti1Image(volume, grid.affine))
    return np.asarray(mask.dataobj)[tuple(grid.ijk.T)] != 0
