"""nilearn's ``labels_`` and ``results_`` of a fitted GLM, from chunkglm's per-block fits.

nilearn keeps, per run, one label per voxel (0.0 for OLS, the binned AR(1)
coefficient as text, or the AR(N) cluster centre's rounded coefficients) and a
dict {label: regression results of that label's voxels}. chunkglm keeps the
fits per voxel block in the design's orthonormal basis; these functions map
them back to the design's columns (``theta = pinv(R) beta_Q``, nilearn's
pinv estimate) and group them by label, when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chunkglm.kernels.ar import ar_order


@dataclass
class RegressionSummary:
    """The fields of nilearn's ``SimpleRegressionResults`` for one label's voxels.

    theta : (p, n) betas on the design's columns; cov : (p, p) normalised
    covariance ``pinv(X~) pinv(X~)'``; dispersion : (n,) SSE / (n_time - p);
    df_residuals : n_time - rank(X); df_model : rank(X).
    """

    theta: np.ndarray
    cov: np.ndarray
    dispersion: np.ndarray
    df_residuals: int
    df_model: int

    def vcov(self, matrix=None, dispersion=None):
        """nilearn's ``vcov``: ``matrix cov matrix' x dispersion`` (per voxel when it varies)."""
        dispersion = self.dispersion if dispersion is None else dispersion
        if matrix is None:
            return self.cov[..., None] * dispersion
        matrix = np.atleast_2d(matrix)
        tmp = matrix @ self.cov @ matrix.T
        return tmp * dispersion if np.isscalar(dispersion) else tmp[:, :, None] * dispersion


def labels_and_results(fits: list, r_factor: np.ndarray, noise_model: str, n_time: int):
    """(labels (voxel,), {label: RegressionSummary}) of one run, as nilearn's ``run_glm``."""
    to_columns = np.linalg.pinv(r_factor)  # basis -> design columns (R^-1 when full rank)
    order = ar_order(noise_model)
    beta = np.concatenate([fit.beta for fit in fits], axis=1)
    dispersion = np.concatenate([fit.dispersion for fit in fits])
    labels = np.concatenate([_labels(fit, order) for fit in fits])
    # each voxel's normalised covariance: its block's level (its AR coefficient's), on the columns
    covariance = [(fit, index) for fit in fits for index in fit.level_index]
    df_residuals = int(fits[0].df_residuals)
    results = {}
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        fit, level = covariance[where[0]]
        results[float(label) if order == 0 else label] = RegressionSummary(
            theta=to_columns @ beta[:, where], cov=to_columns @ fit.cov[level] @ to_columns.T,
            dispersion=dispersion[where], df_residuals=df_residuals, df_model=n_time - df_residuals)
    return labels, results


def _labels(fit, order: int) -> np.ndarray:
    n = fit.beta.shape[1]
    if order == 0:
        return np.zeros(n)
    if order == 1:
        return np.array([str(value) for value in np.asarray(fit.rho, dtype=float).ravel()])
    centres = np.atleast_2d(fit.levels)
    names = np.array(["_".join(map(str, np.round(c, 2))) for c in centres])
    return names[fit.level_index]
