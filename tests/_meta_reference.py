"""PyMARE 0.0.13 run the way NiMARE 0.22 runs it (no dependence groups), for kernel tests.

NiMARE's ``_PyMARERegressionEstimator._fit_model`` builds ``pymare.Dataset(y, v|n,
g=None)`` (``DependenceModel.labels`` is None when every group holds one image),
constructs the estimator with ``weight_scheme="rescale"`` and no
``small_sample_correction`` (so PyMARE's per-estimator default), and reads
``summary().get_fe_stats()``; ``logp`` goes through ``_nlogp_to_logp_values``
(float32 ``-log10``), reproduced by :func:`chunkglm.kernels.meta.nimare_logp`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymare

from chunkglm.kernels.meta import nimare_logp

REGRESSION_CLASSES = {
    "WeightedLeastSquares": pymare.estimators.WeightedLeastSquares,
    "DerSimonianLaird": pymare.estimators.DerSimonianLaird,
    "Hedges": pymare.estimators.Hedges,
    "VarianceBasedLikelihood": pymare.estimators.VarianceBasedLikelihoodEstimator,
    "SampleSizeBasedLikelihood": pymare.estimators.SampleSizeBasedLikelihoodEstimator,
    "FixedEffectsHedges": pymare.estimators.WeightedLeastSquares,
}


def regression_maps(name, dataset, weight_scheme="rescale", **kwargs):
    """NiMARE's maps from a PyMARE meta-regression fit; also returns the fitted estimator."""
    est = REGRESSION_CLASSES[name](weight_scheme=weight_scheme, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyMARE's "sample sizes too close"
        est.fit_dataset(dataset)
    summary = est.summary()
    fe = summary.get_fe_stats()
    n_voxels = dataset.y.shape[1]
    maps = {"z": fe["z"].squeeze(), "p": fe["p"].squeeze(),
            "logp": nimare_logp(fe["logp"].squeeze()), "est": fe["est"].squeeze(),
            "se": fe["se"].squeeze()}
    if name in ("DerSimonianLaird", "Hedges", "VarianceBasedLikelihood", "SampleSizeBasedLikelihood"):
        maps["tau2"] = np.broadcast_to(np.asarray(summary.tau2, dtype=float).squeeze(), (n_voxels,))
    if name == "SampleSizeBasedLikelihood":
        maps["sigma2"] = est.params_["sigma2"].squeeze()
    fe_dof = summary.fe_dof
    k = dataset.y.shape[0]
    maps["dof"] = np.full(n_voxels, float(k - 1)) if fe_dof is None else fe_dof.reshape(n_voxels)
    return maps, est


def combination_maps(name, z, two_sided, weights=None):
    """NiMARE 0.22 ``Fishers`` / ``Stouffers`` maps via PyMARE's combination tests."""
    mode = "concordant" if two_sided else "directed"
    if name == "Fishers":
        est = pymare.estimators.FisherCombinationTest(mode=mode)
    else:
        est = pymare.estimators.StoufferCombinationTest(mode=mode, group_level=False)
    n = None if weights is None else np.asarray(weights, dtype=float)[:, None]
    est.fit_dataset(pymare.Dataset(y=z, n=n))
    summary = est.summary()
    k, v = z.shape
    return {"z": np.asarray(summary.z).squeeze(), "p": np.asarray(summary.p).squeeze(),
            "logp": nimare_logp(np.asarray(summary.logp).squeeze()), "dof": np.full(v, float(k - 1))}


def hedges_g(t, sample_sizes):
    """NiMARE's ``t_to_d`` then ``d_to_g(return_variance=True)``, as FixedEffectsHedges does."""
    n = np.asarray(sample_sizes, dtype=float)[:, None]
    d = t / np.sqrt(n)
    h = 1 - (3 / (4 * (n - 1) - 1))
    return d * h, ((n - 1) * (1 + n * d**2) * (h**2) / (n * (n - 3))) - d**2
