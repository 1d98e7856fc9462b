"""The volume grid value type (chunkglm.io.grid.Grid, moved out of chunkglm.io.layout, which re-exports it):
same object under both names, and the same grid id, voxel order and flat indices as before the move (the id
names grid nodes of stores already written)."""

from __future__ import annotations

import pickle

import numpy as np

from chunkglm.io import layout
from chunkglm.io.grid import Grid


def _grid():
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 1:3, 2:4] = True
    return Grid(np.diag([2.0, 2.0, 2.0, 1.0]), mask, "MNI152NLin2009cAsym")


def test_layout_reexports_the_grid():
    assert layout.Grid is Grid


def test_grid_id_and_voxel_order_are_those_of_stores_written_before():
    grid = _grid()
    # computed with chunkglm.io.layout.Grid before the move (commit 4a1e549)
    assert grid.grid_id == "MNI152NLin2009cAsym_292ac5758264"
    assert grid.ijk.tolist() == [[1, 1, 2], [1, 1, 3], [1, 2, 2], [1, 2, 3]] and grid.ijk.dtype == np.int32
    assert grid.flat_index.tolist() == [27, 28, 32, 33] and grid.n_voxels == 4 and grid.shape == (3, 4, 5)
    again = pickle.loads(pickle.dumps(grid))
    assert again.grid_id == grid.grid_id and np.array_equal(again.mask, grid.mask)
