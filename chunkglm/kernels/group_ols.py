"""Second-level (group) OLS on one (image, voxel) block, in float64 slabs of voxels.

The fit is the first level's (:func:`chunkglm.kernels.glm.block_moments` and
:func:`chunkglm.kernels.glm.fit_whitened` with every coefficient 0), applied to slabs of the
block's voxels one after the other: an OLS fit of one voxel does not involve its neighbours,
and the design is the same for every voxel, so the slabs' fits joined along the voxels are the
fit of the block. What changes is the working memory: the float64 copy of the data and the
per-voxel temporaries of the fit exist for one slab (:data:`SLAB_BYTES`) at a time, not for the
whole block (which was twice the float32 block, plus the block itself).

Non-finite values are set to 0 slab by slab (:func:`chunkglm.kernels.finite.finite_block`),
with the count of voxels that held one, as nilearn's masker does. Pure numpy; no dask.
"""

from __future__ import annotations

import numpy as np

from chunkglm.kernels import finite as kf
from chunkglm.kernels import glm as k

__all__ = ["SLAB_BYTES", "column_means", "join_fits", "ols_fit", "slab_width"]

#: float64 working bytes of one slab (the data's float64 copy and the fit's per-voxel
#: temporaries): small next to any stored chunk. With single-threaded BLAS (dask workers),
#: 2 MiB slabs fit a block in 0.7x the CPU time of the whole-block fit (1,000 x 15,360 float32:
#: 47 vs 66 ms); smaller slabs pay Python's per-slab overhead.
SLAB_BYTES = 2 * 2**20


def slab_width(n_rows: int, n_columns: int, slab_bytes: int = SLAB_BYTES) -> int:
    """Voxels per slab: float64 values per voxel are the data's ``n_rows``, the fit's gathered
    (p, p) covariance and Gram matrices and its (p,) moments (p = ``n_columns``)."""
    per_voxel = 8 * (int(n_rows) + 2 * int(n_columns) ** 2 + 3 * int(n_columns) + 9)
    return max(1, int(slab_bytes) // per_voxel)


def ols_fit(Q: np.ndarray, block: np.ndarray, df_residuals: int, n_columns: int,
            slab_bytes: int = SLAB_BYTES) -> tuple[k.GLMFit, int]:
    """OLS fit of a (image, voxel) block on the orthonormal design basis ``Q``, slab by slab.

    Parameters
    ----------
    Q : ndarray of shape (n_images, rank)
        Orthonormal basis of the design (:func:`chunkglm.kernels.glm.orthonormal_design`).
    block : ndarray of shape (n_images, n_voxels)
        Any float dtype (float32 as stored); read only, never modified or copied whole.
    df_residuals : int
        n_images - rank(design).
    n_columns : int
        The design's column count p (nilearn's dispersion divides the SSE by n_images - p).
    slab_bytes : int
        float64 working bytes per slab (:func:`slab_width`).

    Returns
    -------
    (GLMFit, int)
        The fit of every voxel (rho 0, one level) and the number of voxels that held NaN/inf.
    """
    n_rows, n_voxels = block.shape
    if Q.shape[0] != n_rows:
        raise ValueError(f"the design has {Q.shape[0]} rows but the block {n_rows} images: "
                         f"received a block of shape {block.shape}")
    dm = k.DesignMoments.from_design(Q)
    width = slab_width(n_rows, Q.shape[1], slab_bytes)
    fits, n_nonfinite = [], 0
    for start in range(0, n_voxels, width):
        slab, count = kf.finite_block(block[:, start:start + width])
        n_nonfinite += count
        moments = k.block_moments(Q, slab)  # the slab's float64 copy lives in here only
        fits.append(k.fit_whitened(dm, moments, np.zeros(slab.shape[1]), df_residuals, n_columns))
    return join_fits(fits), n_nonfinite


def join_fits(fits: list) -> k.GLMFit:
    """Fits of consecutive voxel slabs with the same levels (OLS: rho 0) as one fit of all their voxels."""
    first = fits[0]
    if len(fits) == 1:
        return first
    if any(not np.array_equal(fit.levels, first.levels) for fit in fits[1:]):
        raise ValueError("only fits with the same AR levels (OLS fits: one level, 0) can be joined")
    return k.GLMFit(
        beta=np.concatenate([fit.beta for fit in fits], axis=1),
        dispersion=np.concatenate([fit.dispersion for fit in fits]),
        rho=np.concatenate([fit.rho for fit in fits]),
        levels=first.levels,
        level_index=np.concatenate([fit.level_index for fit in fits]),
        cov=first.cov,
        df_residuals=first.df_residuals,
        r_square=np.concatenate([fit.r_square for fit in fits]),
    )


def column_means(block: np.ndarray) -> np.ndarray:
    """Mean of each voxel over the images (voxel,), accumulated in float64 without a float64
    copy of the block; NaN/inf propagate (the callers look for them)."""
    return np.mean(block, axis=0, dtype=np.float64)
