"""GLM nodes above the run (BIDS Stats Models Type "glm"): every group and contrast in one graph.

fitlins 0.11 fits, for each group of such a node (one per input contrast at the Dataset level,
with the node's GroupBy), nilearn's ``SecondLevelModel`` on the inputs' effect maps with the
design pybids builds (participants.tsv covariates included), masked with nilearn's default (the
background mask of the maps' mean), and writes each contrast's maps. Here the same numbers come
from one dask graph for the whole node:

1. every group's effect maps are staged, one map at a time, into a maps node of one scratch
   store (a node per group, all on the same voxels and voxel chunks: those of the cohort store's
   grids the maps lie on, else every voxel of their grid), in ``scratch_dir``;
2. one graph over voxel blocks (:func:`chunkglm.graph.group_glm.group_glm_graph`): per group,
   the OLS fit of the block (the graph a ``SecondLevelModel`` evaluates), every contrast's
   effect and variance, and the mean of the group's maps; each stored chunk is read once, and
   the results are streamed into the scratch store piece by piece (no task holds a whole map);
3. per group, an explicit global step on its 3-D mean map: nilearn's background mask; per
   contrast, its effect and variance are read back and their values inside the mask given to
   nilearn's ``Contrast`` for the stat, z and p maps (as ``SecondLevelModel.compute_contrast``),
   zero outside.

The OLS fit is voxelwise, so fitting every staged voxel and masking afterwards gives, inside the
mask, the values of a fit on the masked maps (up to the order of the float sums in the matrix
products). The mask is restricted to the staged voxels, where the maps can be non-zero.

:meth:`GroupLevel.model` gives a fitted ``SecondLevelModel`` of one group on its staged node and
mask (nothing restaged), for what needs a model: ``chunkglm app --n-perm`` (each t contrast's
max-T permutation test, a pass of its own over the group's maps, as nilearn permutes each
contrast separately) and ``--layout glm`` (whose writer computes the contrasts from the model:
one more pass over the group's staged maps).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.glm.contrasts import Contrast

from chunkglm.chunking import MemoryBudget
from chunkglm.design.second_level import check_design
from chunkglm.errors import InputError
from chunkglm.glm.second_level import SecondLevelModel
from chunkglm.glm.second_level.model import OUTPUT_TYPES
from chunkglm.glm.stats_models.fixed_effects import background_mask, staged_mask, streamed
from chunkglm.graph.group_glm import group_glm_graph
from chunkglm.io.inputs import write_maps_node
from chunkglm.io.nifti import image_from_voxels
from chunkglm.io.scratch import TemporaryFolder

__all__ = ["GroupLevel"]

_PREFIX = "chunkglm-group-level-"


class GroupLevel:
    """Every group's GLM and contrasts of one node, computed as one graph over voxel blocks.

    Parameters
    ----------
    groups : list of (list of str, pandas.DataFrame, list of (ndarray, str))
        Per group: its effect map paths (in the design's row order), its design (one row per map)
        and its contrasts (weights over the design's columns, shape (p,) for "t" and (q, p) for
        "F"; the test).
    grids : list of chunkglm.io.layout.Grid, optional
        The cohort store's grids: the voxels staged are those of the grids the maps lie on
        (default every voxel of the maps' grid).
    chunk_bytes : int, str or None
        The memory budget of the tasks (None: 64 MiB, the package default).
    scratch_dir : str, Path or None
        Where the scratch store's folder is made: a local folder or an object-store URL (default:
        the temporary directory). The workers read and write that store: on a cluster of several
        machines, a folder they all see, or the URL.

    Attributes
    ----------
    lazy : dask.array.Array
        The (row, voxel) graph of every group's results, before :meth:`compute` writes it.
    nodes : list of chunkglm.io.cohort.Node
        Each group's staged maps.
    """

    def __init__(self, groups, *, grids=(), chunk_bytes=None, scratch_dir=None):
        if not groups:
            raise InputError("a GLM node needs at least one group of input maps; this one has none.")
        self.designs = [check_design(design, len(paths)) for paths, design, _ in groups]
        self.contrasts = [list(wanted) for _, _, wanted in groups]
        self.chunk_bytes = chunk_bytes
        n_rows = sum(len(paths) + 1 + sum(np.atleast_2d(w).shape[0] + 1 for w, _ in wanted)
                     for paths, _, wanted in groups)
        block = MemoryBudget.of(chunk_bytes).task_block_voxels(n_rows, 8)  # float64 inputs and results
        self.folder = TemporaryFolder(_PREFIX, scratch_dir)  # (and removes those killed processes left)
        try:
            mask = staged_mask(groups[0][0][0], grids)
            self.nodes = [write_maps_node(pd.DataFrame({"effect": [str(p) for p in paths]}), ("effect",),
                                          self.folder.path("inputs.zarr"), f"group-{index}", mask,
                                          chunk_bytes=block * len(paths) * 4)
                          for index, (paths, _, _) in enumerate(groups)]
        except BaseException:
            self.close()
            raise
        self.grid = self.nodes[0].grid
        stored = self.nodes[0].zarr_array("effect").chunks[1]  # the same for every group
        self.lazy, self.rows = group_glm_graph([node.data("effect").data for node in self.nodes], self.designs,
                                               self.contrasts, stored)
        self._results = None
        self._masks: dict[int, np.ndarray] = {}
        self._models: dict[int, SecondLevelModel] = {}

    def compute(self) -> None:
        """Evaluate the graph, streaming every (row, voxel block) piece into the scratch store."""
        self._results = streamed(self.lazy, ("row", "voxel"), self.folder.path("results.zarr"))

    def _rows(self, rows) -> np.ndarray:
        if self._results is None:
            self.compute()
        return np.asarray(self._results[rows].values)

    def _inside(self, group: int) -> np.ndarray:
        """(staged voxel,) bool: nilearn's background mask of the group's mean map."""
        if group not in self._masks:
            self._masks[group] = background_mask(self._rows(self.rows[group].mean), self.grid)
        return self._masks[group]

    def mask_img(self, group: int) -> nib.Nifti1Image:
        """The group's analysis mask (uint8, on the maps' grid), as ``SecondLevelModel.mask_img_``."""
        volume = np.zeros(self.grid.shape, dtype=np.uint8)
        volume[tuple(self.grid.ijk[self._inside(group)].T)] = 1
        return nib.Nifti1Image(volume, self.grid.affine)

    def images(self, group: int, index: int) -> dict:
        """One contrast's maps (``SecondLevelModel.compute_contrast(..., output_type="all")``'s keys),
        float64 images, zero outside the group's mask."""
        effect_rows, variance_row = self.rows[group].contrasts[index]
        stat_type = self.contrasts[group][index][1]
        inside = self._inside(group)
        effect = self._rows(effect_rows)[:, inside]
        variance = self._rows(variance_row)[inside]
        contrast = Contrast(effect=effect[0] if stat_type == "t" else effect, variance=variance,
                            dim=1 if stat_type == "t" else effect.shape[0], dof=self.rows[group].df_residuals,
                            stat_type=stat_type)
        ijk = self.grid.ijk[inside]
        return {name: image_from_voxels(np.array(getattr(contrast, name)(), dtype=np.float64), ijk,
                                        self.grid.shape, affine=self.grid.affine, dtype=np.float64)
                for name in OUTPUT_TYPES}

    def model(self, group: int) -> SecondLevelModel:
        """A ``SecondLevelModel`` fitted on the group's staged maps, design and mask (for permutation
        tests and writers that take a model); its contrasts read the staged maps again."""
        if group not in self._models:
            budget = {"chunk_bytes": self.chunk_bytes} if self.chunk_bytes else {}
            model = SecondLevelModel(mask_img=self.mask_img(group), **budget)  # stages nothing: a node
            self._models[group] = model.fit(self.nodes[group], design_matrix=self.designs[group])
        return self._models[group]

    def close(self) -> None:
        """Remove the scratch store."""
        getattr(self, "_models", {}).clear()
        self.folder.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
