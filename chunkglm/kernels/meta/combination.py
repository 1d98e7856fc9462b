"""Combination tests on z maps: Fisher's and Stouffer's (NiMARE 0.22, PyMARE without groups)."""

from __future__ import annotations

import numpy as np
from scipy import special

from chunkglm.kernels.meta._arrays import _block, _dof_map, _ksum, _sample_sizes
from chunkglm.kernels.meta.distributions import _LOG2, log_chi2_sf, nimare_logp


def _concordant(log_p_directed, z):
    """PyMARE's two-sided ("concordant") combination from a directed log-p function."""
    log_p1, log_p2 = log_p_directed(z), log_p_directed(-z)
    log_p = np.minimum(0.0, _LOG2 + np.minimum(log_p1, log_p2))
    z_calc = -special.ndtri_exp(log_p - _LOG2)
    return np.where(log_p2 < log_p1, -z_calc, z_calc), log_p


def _combination_maps(log_p_directed, z, two_sided):
    if two_sided:
        z_map, log_p = _concordant(log_p_directed, z)
    else:
        log_p = log_p_directed(z)
        z_map = -special.ndtri_exp(log_p)
    return {"z": z_map, "p": np.exp(log_p), "logp": nimare_logp(log_p),
            "dof": _dof_map(z.shape[0], z.shape[1])}


def fishers(z, use_sample_size=False, sample_sizes=None, two_sided=True) -> dict:
    """NiMARE 0.22 ``Fishers``: PyMARE's FisherCombinationTest without groups.

    Parameters
    ----------
    z : ndarray of shape (K, V)
        z-statistic maps.
    use_sample_size : bool
        Weighted Fisher with weights = sample sizes (Brown's scaled chi^2).
    sample_sizes : ndarray of shape (K,) or (K, V), optional
        Required with ``use_sample_size``.
    two_sided : bool
        "concordant" mode when True, "directed" otherwise.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``dof`` (each (V,)).

    Notes
    -----
    X = -2 sum_i w_i log Phi(-z_i); with weights, X / s ~ chi2(nu) with
    s = sum w^2 / sum w and nu = 2 (sum w)^2 / sum w^2 (w = 1: chi2(2K)).
    """
    z = _block("z", z)
    if use_sample_size:
        w = _sample_sizes(sample_sizes, z.shape)
        scale = _ksum(w * w) / _ksum(w)
        df = 2.0 * _ksum(w) ** 2 / _ksum(w * w)

        def log_p_directed(values):
            return log_chi2_sf(-2.0 * _ksum(w * special.log_ndtr(-values)) / scale, df)
    else:
        def log_p_directed(values):
            return log_chi2_sf(-2.0 * _ksum(special.log_ndtr(-values)), 2.0 * values.shape[0])
    return _combination_maps(log_p_directed, z, two_sided)


def stouffers(z, use_sample_size=False, sample_sizes=None, two_sided=True) -> dict:
    """NiMARE 0.22 ``Stouffers`` (and the old ``WeightedStouffers``) without groups.

    Parameters
    ----------
    z : ndarray of shape (K, V)
        z-statistic maps.
    use_sample_size : bool
        Weights sqrt(n) (Zaykin's weighted Stouffer) instead of 1.
    sample_sizes : ndarray of shape (K,) or (K, V), optional
        Required with ``use_sample_size``.
    two_sided : bool
        "concordant" mode when True, "directed" otherwise.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``dof``.

    Notes
    -----
    Z = sum w_i z_i / sqrt(sum w_i^2), p from the normal tail in log space.
    NiMARE 0.22 removed ``normalize_contrast_weights``; it is not accepted.
    """
    z = _block("z", z)
    w = np.sqrt(_sample_sizes(sample_sizes, z.shape)) if use_sample_size else np.ones((z.shape[0], 1))
    norm = np.sqrt(_ksum(w * w))

    def log_p_directed(values):
        return special.log_ndtr(-(_ksum(values * w) / norm))
    return _combination_maps(log_p_directed, z, two_sided)


def _weighted_stouffers(z, sample_sizes, two_sided=True) -> dict:
    return stouffers(z, use_sample_size=True, sample_sizes=sample_sizes, two_sided=two_sided)
