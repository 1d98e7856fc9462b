"""The volume grid of a cohort store: an affine, a shape and the mask that defines the voxel axis.

A value type with no store access (written and read by :func:`chunkglm.io.layout.write_grid` and
:func:`chunkglm.io.layout.read_grid`, which re-exports it as ``chunkglm.io.layout.Grid``); surface
grids are :class:`chunkglm.io.surface.SurfaceGrid`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["Grid"]


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid (affine + shape) with the mask that defines the voxel axis.

    The voxel axis holds in-mask voxels only, flattened in C order over
    (x, y, z); :attr:`ijk` maps them back to 3-D.
    """

    affine: np.ndarray
    mask: np.ndarray
    space: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (x, y, z)."""
        return tuple(int(n) for n in self.mask.shape)

    @cached_property
    def ijk(self) -> np.ndarray:
        """Voxel indices, shape (n_voxels, 3), C order."""
        return np.argwhere(self.mask).astype(np.int32)

    @cached_property
    def flat_index(self) -> np.ndarray:
        """Each voxel's flat index into the grid, C order, shape (n_voxels,) int64."""
        return np.ravel_multi_index(tuple(self.ijk.T), self.shape).astype(np.int64)

    @property
    def n_voxels(self) -> int:
        """In-mask voxels."""
        return int(self.mask.sum())

    @cached_property
    def grid_id(self) -> str:
        """Stable id from affine, shape and mask: equal grids share a node."""
        digest = hashlib.sha256()
        digest.update(np.asarray(self.affine, dtype="<f8").round(6).tobytes())
        digest.update(np.asarray(self.shape, dtype="<i8").tobytes())
        digest.update(np.packbits(self.mask, axis=None).tobytes())
        prefix = re.sub(r"[^A-Za-z0-9]", "", self.space) or "grid"
        return f"{prefix}_{digest.hexdigest()[:12]}"
