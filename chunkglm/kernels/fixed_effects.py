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
  (nilearn's :class:`~nilearn.glm.contrasts.Contrast` arithmetic, :func:`t_z_score`;
  nilearn's default is 100 per input).

The z transform uses ``scipy.special`` (Student's t and normal distribution
functions) rather than nilearn's ``Contrast``: the worker running these tasks
then imports neither nilearn's GLM module nor scikit-learn nor ``scipy.stats``
(~100 MiB per worker process), with the same values (the same special functions
scipy.stats calls, in the same order).

Shapes are explicit: ``(image, voxel)`` in, ``(job, row, voxel)`` out.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from chunkglm.kernels.finite import finite_block

__all__ = ["ROWS", "TINY", "fixed_effects", "fixed_effects_jobs", "t_z_score"]

#: nilearn's floor of the variances (``_compute_fixed_effects_params``).
TINY = 1.0e-16
#: nilearn's Contrast: floor of the variance in t (``DEF_TINY``), cap of the degrees of freedom
#: (``DEF_DOFMAX``).
_CONTRAST_TINY = 1.0e-50
_DOF_MAX = 1.0e10
#: nilearn's ``z_score`` clips p and 1 - p into [1e-300, 1 - 1e-16] before inverting.
_P_RANGE = (1.0e-300, 1.0 - 1.0e-16)
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
    stat = effect / np.sqrt(np.maximum(variance, _CONTRAST_TINY))
    return effect, variance, stat, t_z_score(stat, 100.0 * n_inputs if dof is None else dof)


def t_z_score(stat: np.ndarray, dof: float) -> np.ndarray:
    """The z score of t statistics, as nilearn's ``Contrast(..., stat_type="t").z_score()``.

    nilearn takes p = ``scipy.stats.t.sf(t, min(dof, 1e10))`` and 1 - p = ``t.cdf`` (which
    scipy computes as ``special.stdtr(dof, -t)`` and ``special.stdtr(dof, t)``), clips both
    into [1e-300, 1 - 1e-16], and returns ``norm.isf(p)`` (``-special.ndtri(p)``) where it is
    >= 0, else ``norm.ppf(1 - p)`` (``special.ndtri``): the same functions are called here on
    the same values, so the results are nilearn's bit for bit.

    Parameters
    ----------
    stat : ndarray of shape (voxel,)
        t values (float64).
    dof : float
        Degrees of freedom (> 0), capped at nilearn's 1e10.

    Returns
    -------
    ndarray of shape (voxel,), float64
    """
    stat = np.asarray(stat, dtype=np.float64)
    dof = min(float(dof), _DOF_MAX)
    with np.errstate(invalid="ignore", divide="ignore"):
        # + 0.0: scipy's isf/ppf add loc (0.0) to the quantile, which turns -0.0 into 0.0
        z_sf = -special.ndtri(np.clip(special.stdtr(dof, -stat), *_P_RANGE)) + 0.0
        z_cdf = special.ndtri(np.clip(special.stdtr(dof, stat), *_P_RANGE)) + 0.0
    return np.where(z_sf < 0, z_cdf, z_sf)


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
