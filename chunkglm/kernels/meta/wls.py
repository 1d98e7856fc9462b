"""Weighted least squares meta-regression (intercept only) and the closed-form tau^2 estimators.

PyMARE's ``WeightedLeastSquares``, ``DerSimonianLaird`` and ``Hedges``, and
NiMARE's ``FixedEffectsHedges``, followed by PyMARE's ``get_fe_stats``
(:func:`_fe_maps`): Knapp-Hartung scales the covariance by
``q = sum w e^2 / (K - 1)`` (0 when ``sum w e^2 <= eps``; floored at 1 for
"knapp-hartung-conservative"), the statistic referred to t with ``K - 1`` dof
and ``z`` matched on the log tail. A zero or non-finite ``se`` gives NaN
``z``/``p``/``logp``, as PyMARE.
"""

from __future__ import annotations

import numpy as np

from chunkglm.errors import InputError
from chunkglm.kernels.meta import dependence as dep
from chunkglm.kernels.meta._arrays import _block, _check_correction, _dof_map, _ksum, _same_shape, _sample_sizes
from chunkglm.kernels.meta.distributions import _EPS, fe_stat_maps


def _wls(y, w):
    """Intercept-only WLS: estimate, sum of weights (1 / model variance), residuals."""
    w_sum = _ksum(w)
    est = _ksum(w * y) / w_sum
    return est, w_sum, y - est


def _fe_maps(y, w, small_sample_correction, extra=None) -> dict:
    """PyMARE's ``get_fe_stats`` after a WLS fit with weights ``w``, as NiMARE's maps."""
    _check_correction(small_sample_correction)
    n_studies, n_voxels = y.shape
    est, w_sum, resid = _wls(y, w)
    var = 1.0 / w_sum
    dof = None
    if small_sample_correction != "wald":
        dof = float(n_studies - 1)
        rss = _ksum(w * resid * resid)
        scale = np.where(rss <= _EPS, 0.0, rss / dof)
        if small_sample_correction == "knapp-hartung-conservative":
            scale = np.maximum(scale, 1.0)
        var = var * scale
    maps = fe_stat_maps(est, np.sqrt(var), dof, extra)
    maps["dof"] = _dof_map(n_studies, n_voxels)
    return maps


def _variances(beta, varcope):
    y = _block("beta", beta)
    v = _block("varcope", varcope, y.shape[0])
    _same_shape(y, v, ("beta", "varcope"))
    return y, v


def weighted_least_squares(beta, varcope, tau2=0.0, small_sample_correction="wald", groups=None,
                           weight_scheme="rescale", rho=0.8) -> dict:
    """NiMARE 0.22 ``WeightedLeastSquares``: PyMARE WLS at a given tau^2.

    Parameters
    ----------
    beta, varcope : ndarray of shape (K, V)
        Effect estimates and their sampling variances.
    tau2 : float or ndarray of shape (V,)
        Assumed between-study variance, >= 0.
    small_sample_correction : str
        PyMARE's default for this estimator is "wald" (tau^2 is not estimated).
    groups : array of shape (K,), optional
        Dependence-group label of each study. Where a label repeats, PyMARE's
        grouped model applies (:mod:`.dependence`: ``weight_scheme``, ``rho``, CR2
        errors, Satterthwaite dof; ``small_sample_correction`` then has no effect).
    weight_scheme : {"rescale", "individual", "collapse"}
    rho : float
        Assumed within-group correlation, in [0, 1].

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    tau2 = np.asarray(tau2, dtype=np.float64)
    if np.any(tau2 < 0) or tau2.shape not in ((), (y.shape[1],)):
        raise InputError(f"tau2 must be >= 0, a float or one value per voxel ({y.shape[1]},); "
                         f"received shape {tau2.shape}, min {tau2.min() if tau2.size else None}.")
    if dep.has_dependence(groups):
        return dep.grouped_fit(y, v, groups, weight_scheme, rho, lambda *_: tau2)
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction)


def _dersimonian_laird_tau2(y, v):
    """PyMARE's method-of-moments tau^2 (intercept-only): max(0, (Q - (K-1)) / A)."""
    w = 1.0 / v
    _, w_sum, resid = _wls(y, w)
    q = _ksum(w * resid * resid)
    a = w_sum - _ksum(w * w) / w_sum
    return np.maximum(0.0, (q - (y.shape[0] - 1)) / a)


def dersimonian_laird(beta, varcope, small_sample_correction="knapp-hartung", groups=None,
                      weight_scheme="rescale", rho=0.8) -> dict:
    """NiMARE 0.22 ``DerSimonianLaird``: moment tau^2, then WLS with 1 / (v + tau^2).

    With dependence groups (``groups``, ``weight_scheme``, ``rho``: see
    :func:`weighted_least_squares`) and ``"rescale"``, tau^2 is the correlated-effects
    moment estimator.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    if dep.has_dependence(groups):
        return dep.grouped_fit(y, v, groups, weight_scheme, rho, _dersimonian_laird_tau2,
                               lambda yy, vv, g: dep.correlated_effects_tau2(yy, vv, g, rho),
                               extra=lambda tau2: {"tau2": tau2})
    tau2 = _dersimonian_laird_tau2(y, v)
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction, {"tau2": tau2})


def _hedges_tau2(y, v):
    """Hedges' tau^2 (intercept only): max(0, (OLS RSS - (K-1)/K sum v) / (K-1))."""
    k = y.shape[0]
    resid = y - _ksum(y) / k
    expected = _ksum((1.0 - 1.0 / k) * v)
    return np.maximum(0.0, (_ksum(resid * resid) - expected) / (k - 1))


def hedges(beta, varcope, small_sample_correction="knapp-hartung", groups=None, weight_scheme="rescale",
           rho=0.8) -> dict:
    """NiMARE 0.22 ``Hedges``: tau^2 = max(0, (OLS RSS - (K-1)/K sum v) / (K-1)), then WLS.

    With dependence groups (``groups``, ``weight_scheme``, ``rho``: see
    :func:`weighted_least_squares`), tau^2 comes from the collapsed groups under
    "rescale" and "collapse".

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    if dep.has_dependence(groups):
        return dep.grouped_fit(y, v, groups, weight_scheme, rho, _hedges_tau2, extra=lambda tau2: {"tau2": tau2})
    tau2 = _hedges_tau2(y, v)
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction, {"tau2": tau2})


def fixed_effects_hedges(t, sample_sizes, tau2=0.0, small_sample_correction="wald", groups=None,
                         weight_scheme="rescale", rho=0.8) -> dict:
    """NiMARE 0.22 ``FixedEffectsHedges``: Hedges' g from t maps, then WLS at ``tau2``.

    Notes
    -----
    d = t / sqrt(n); h = 1 - 3 / (4 (n - 1) - 1); g = d h;
    var(g) = (n - 1)(1 + n d^2) h^2 / (n (n - 3)) - d^2 (NiMARE's ``d_to_g``).

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``dof``.
    """
    t = _block("t", t)
    n = _sample_sizes(sample_sizes, t.shape)
    d = t / np.sqrt(n)
    h = 1 - (3 / (4 * (n - 1) - 1))
    g = d * h
    var_g = ((n - 1) * (1 + n * d**2) * (h**2) / (n * (n - 3))) - d**2
    return weighted_least_squares(g, var_g, tau2=tau2, small_sample_correction=small_sample_correction,
                                  groups=groups, weight_scheme=weight_scheme, rho=rho)
