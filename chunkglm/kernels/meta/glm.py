"""The old NiMARE API's GLMs in closed form: FFX_GLM, MFX_GLM (FLAME1-style) and RFX_GLM."""

from __future__ import annotations

import numpy as np

from chunkglm.kernels.meta._arrays import _block, _ksum, _same_shape, _sample_sizes
from chunkglm.kernels.meta.distributions import _z_from_nlogp, nimare_logp, t_to_nlogp, t_to_z
from chunkglm.kernels.meta.likelihood import _vbl_tau2
from chunkglm.kernels.meta.ols import one_sample_t
from chunkglm.kernels.meta.sign_flip import empirical_p, sign_flip_counts
from chunkglm.kernels.meta.wls import _wls


def _t_maps(est, se, dof, two_sided, extra=None) -> dict:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = est / se
    dof_map = np.broadcast_to(np.asarray(dof, dtype=np.float64), t.shape).copy()
    nlogp = t_to_nlogp(t, dof_map, two_sided)
    maps = {"z": t_to_z(t, dof_map), "p": np.exp(nlogp), "logp": nimare_logp(nlogp),
            "est": est, "se": se}
    maps.update(extra or {})
    maps.update({"t": t, "dof": dof_map})
    return maps


def _con_se(con, se):
    y = _block("con", con)
    s = _block("se", se, y.shape[0])
    _same_shape(y, s, ("con", "se"))
    return y, s * s


def ffx_glm(con, se, sample_sizes=None, two_sided=True) -> dict:
    """Old NiMARE ``FFX_GLM`` (FSL ``flameo --runmode=fe``) in closed form, without FSL.

    Parameters
    ----------
    con, se : ndarray of shape (K, V)
        Contrast estimates and their standard errors (old NiMARE squared the
        ``se`` maps into flameo's varcope).
    sample_sizes : ndarray of shape (K,), optional
        Old NiMARE passed ``n_i - 1`` to flameo as the varcope dof; fixed
        effects then add them to the model's K - 1.
    two_sided : bool

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``t``, ``dof``.

    Notes
    -----
    Inverse-variance weighted mean: est = sum(c / s^2) / sum(1 / s^2),
    var = 1 / sum(1 / s^2), t = est / sqrt(var), referred to t with
    dof = K - 1 (+ sum(n_i - 1) with sample sizes); z matched on the tail.
    """
    y, v = _con_se(con, se)
    est, w_sum, _ = _wls(y, 1.0 / v)
    dof = float(y.shape[0] - 1)
    if sample_sizes is not None:
        dof += float((_sample_sizes(sample_sizes, y.shape)[:, 0] - 1).sum())
    return _t_maps(est, np.sqrt(1.0 / w_sum), dof, two_sided)


def mfx_glm(con, se, sample_sizes=None, two_sided=True) -> dict:
    """Old NiMARE ``MFX_GLM`` (FSL FLAME1) in closed form: REML tau^2, weights 1 / (s^2 + tau^2).

    Parameters
    ----------
    con, se : ndarray of shape (K, V)
    sample_sizes : ndarray of shape (K,), optional
        Checked for shape only: FLAME1's mixed-effects dof is K - 1 whatever
        the lower-level dof.
    two_sided : bool

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``t``, ``dof``.

    Notes
    -----
    tau^2 >= 0 maximises the REML likelihood of the intercept model
    (vectorised scan + safeguarded Newton, see module notes); est and
    var = 1 / sum w with w = 1 / (s^2 + tau^2); t = est / sqrt(var) with K - 1 dof.
    """
    y, v = _con_se(con, se)
    if sample_sizes is not None:
        _sample_sizes(sample_sizes, y.shape)
    tau2 = _vbl_tau2(y, v, "reml")
    est, w_sum, _ = _wls(y, 1.0 / (v + tau2))
    return _t_maps(est, np.sqrt(1.0 / w_sum), float(y.shape[0] - 1), two_sided, {"tau2": tau2})


def rfx_glm(con, two_sided=True, sign_flips=None) -> dict:
    """Old NiMARE ``RFX_GLM`` / ``Stouffers(inference='rfx')``: one-sample t over studies.

    Parameters
    ----------
    con : ndarray of shape (K, V)
        Contrast maps (z maps for old ``Stouffers`` rfx). Old NiMARE first
        divided each map by its standard deviation over *all* voxels, a global
        step the caller must do.
    two_sided : bool
    sign_flips : ndarray of shape (n_iters, K), optional
        With flips, p is the old empirical sign-flip p (:func:`empirical_p`,
        always two-tailed as old NiMARE) and z = two-tailed z of p, sign of t.

    Returns
    -------
    dict
        ``t``, ``z``, ``p``, ``logp``, ``dof``. Constant voxels have t = 0, p = 1.
    """
    y = _block("con", con)
    k = y.shape[0]
    t = np.nan_to_num(one_sample_t(_ksum(y), _ksum(y * y), k), nan=0.0)
    dof = float(k - 1)
    if sign_flips is None:
        nlogp = t_to_nlogp(t, dof, two_sided)
        z = t_to_z(t, dof)
    else:
        below, equal = sign_flip_counts(y, sign_flips, t)
        nlogp = np.log(empirical_p(below, equal, np.shape(sign_flips)[0]))
        z = _z_from_nlogp(nlogp, t, two_sided=True)
    return {"t": t, "z": z, "p": np.exp(nlogp), "logp": nimare_logp(nlogp),
            "dof": np.full(y.shape[1], dof)}
