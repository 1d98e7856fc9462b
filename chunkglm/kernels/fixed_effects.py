"""Fixed effects of effect and variance maps: pure numpy on one voxel block.

nilearn's ``compute_fixed_effects`` combines the masked ``(image, voxel)``
effects and variances of its inputs voxel by voxel: nothing in it couples two
voxels but the mask (nilearn's background mask of the inputs' mean effect,
a global step done on the 3-D mean map by the caller). So a voxel block of the
stacked inputs gives that block of every output, and one task can serve many
combinations ("jobs": a subject's runs of one contrast) of the images it holds.

- not precision-weighted: effect = mean of the effects, variance = mean of the
  variances / n;
- precision-weighted: weights 1 / variance, variance = 1 / sum of weights,
  effect = sum(weight * effect) * variance;
- variances below 1e-16 count as 1e-16 (nilearn's ``tiny``); NaN and inf count
  as 0, as nilearn's masker sets them;
- t = effect / sqrt(variance) and its z with ``dof`` degrees of freedom
  (nilearn's :class:`~nilearn.glm.contrasts.Contrast`; nilearn's default is 100
  per input).

Shapes are explicit: ``(image, voxel)`` in, ``(job, row, voxel)`` out.
"""

from __future__ import annotations

import warnings

import numpy as np
from nilearn.glm.contrasts import Contrast

from chunkglm.kernels.finite import finite_block

__all__ = ["ROWS", "TINY", "fixed_effects", "fixed_effects_jobs"]

#: nilearn's floor of the variances (``_compute_fixed_effects_params``).
TINY = 1.0e-16
#: Rows of each job's block result: the inputs' mean effect in their own dtype (for the
#: background mask), then nilearn's four maps.
ROWS = ("mean", "effect_size", "effect_variance", "stat", "z_score")


def fixed_effects(effects: np.ndarray, variances: np.ndarray, precision_weighted: bool = False,
                  dof: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed effects of ``n`` inputs at each voxel of a block, float64.

    Parameters
    ----------
    effects, variances : ndarray of shape (n, voxel)
        The inputs' effect and variance values (any float dtype).
    precision_weighted : bool
        Weight each input by its inverse variance (nilearn's ``precision_weighted``).
    dof : float, optional
        Degrees of freedom of the t statistic's z transform; default nilearn's, 100 per input.

    Returns
    -------
    effect, variance, stat, z_score : ndarray of shape (voxel,)
    """
    effects = np.asarray(finite_block(np.asarray(effects))[0], dtype=np.float64)
    variances = np.maximum(np.asarray(finite_block(np.asarray(variances))[0], dtype=np.float64), TINY)
    if effects.shape != variances.shape or effects.ndim != 2 or effects.shape[0] == 0:
        raise ValueError(f"effects and variances must be (n >= 1, voxel) arrays of one shape; received "
                         f"{effects.shape} and {variances.shape}")
    n_inputs = effects.shape[0]
    if precision_weighted:
        weights = 1.0 / variances
        variance = 1.0 / weights.sum(axis=0)
        effect = (effects * weights).sum(axis=0) * variance
    else:
        variance = variances.mean(axis=0) / n_inputs
        effect = effects.mean(axis=0)
    contrast = Contrast(effect=effect, variance=variance, dim=1, dof=100.0 * n_inputs if dof is None else dof,
                        stat_type="t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # z of voxels with no signal: nilearn's values
        z_score = contrast.z_score()
    return effect, variance, contrast.stat_, z_score


def fixed_effects_jobs(effects: np.ndarray, variances: np.ndarray, jobs, precision_weighted: bool = False,
                       dofs=None) -> np.ndarray:
    """Every job's fixed effects over one voxel block of the stacked inputs.

    Parameters
    ----------
    effects, variances : ndarray of shape (image, voxel)
        One voxel block of all inputs of the level.
    jobs : sequence of int arrays
        Rows (images) each job combines.
    precision_weighted : bool
    dofs : sequence of float or None, optional
        Each job's degrees of freedom (None: nilearn's default for every job).

    Returns
    -------
    ndarray of shape (job, len(ROWS), voxel), float64
        Per job the rows of :data:`ROWS`. The mean is computed in the inputs' dtype with
        NaN as given, as nilearn's ``compute_mean`` does before its background mask.
    """
    out = np.empty((len(jobs), len(ROWS), effects.shape[1]), dtype=np.float64)
    for index, rows in enumerate(jobs):
        rows = np.asarray(rows, dtype=np.intp)
        chosen = effects[rows]
        out[index, 0] = chosen.mean(axis=0, dtype=chosen.dtype)
        dof = None if dofs is None or dofs[index] is None else dofs[index]
        out[index, 1:] = fixed_effects(chosen, variances[rows], precision_weighted, dof)
    return out
