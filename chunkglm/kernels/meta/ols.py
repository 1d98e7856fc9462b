"""One-sample t over studies and NiMARE 0.22 ``PermutedOLS``'s parametric maps."""

from __future__ import annotations

import numpy as np

from chunkglm.errors import InputError
from chunkglm.kernels.meta._arrays import _block, _ksum, _sample_sizes
from chunkglm.kernels.meta.dependence import Groups, has_dependence
from chunkglm.kernels.meta.distributions import nimare_logp, t_to_nlogp, t_to_z


def one_sample_t(sums, sum_squares, n_studies) -> np.ndarray:
    """PyMARE's ``one_sample_t_from_sufficient_statistics``: t = S sqrt(K-1) / sqrt(K SS - S^2).

    NaN where the values are constant over studies (zero spread), as PyMARE.
    """
    spread = np.maximum(n_studies * np.asarray(sum_squares, dtype=np.float64) - np.square(sums), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(spread)
        t = sums / root * np.sqrt(n_studies - 1)
    return np.where(root == 0, np.nan, t)


def _weighted_cr2_t(values, weights):
    """PyMARE's ``weighted_intercept_cr2`` (all signs +1): CR2 t of the weighted mean."""
    total = weights.sum()
    adjusted = np.square(weights) / (1.0 - weights / total)
    weighted_sums = _ksum(weights[:, None] * values)
    mean = weighted_sums / total
    adjusted = adjusted[:, None]
    meat = (_ksum(adjusted * np.square(values)) - 2.0 * mean * _ksum(adjusted * values)
            + mean**2 * adjusted.sum())
    meat = np.maximum(meat, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = weighted_sums / np.sqrt(meat)
    return np.where(meat == 0, np.nan, t)


def weighted_mean_satterthwaite_dof(weights) -> float:
    """PyMARE's ``satterthwaite_dof`` for an intercept, one cluster per study, weights ``w``.

    With W = sum w, h_i = w_i / W: b_i^2 = w_i / (W^2 (1 - h_i)), d_i = w_i^2 / (W^3 (1 - h_i)),
    dof = (sum b^2 - sum d)^2 / ((sum d)^2 - 2 sum b^2 d + sum b^4), floored at 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    complement = np.maximum(1.0 - w / total, 1e-10)
    nb = w / (total**2 * complement)
    diag = w**2 / (total**3 * complement)
    trace = nb.sum() - diag.sum()
    trace_sq = diag.sum() ** 2 - 2.0 * (nb * diag).sum() + (nb**2).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = trace**2 / trace_sq
    return float(max(dof, 1.0)) if np.isfinite(dof) else 1.0


def collapse_blocks(beta, groups, sample_sizes=None):
    """NiMARE 0.22 ``PermutedOLS``'s exchangeability blocks: each dependence group's mean map and,
    with sample sizes, its mean sample size (one weight per group). Groups in sorted-label order."""
    grouping = Groups(groups)
    y = grouping.mean(beta)
    n = None if sample_sizes is None else grouping.mean(np.asarray(sample_sizes, dtype=np.float64)[:, None])[:, 0]
    return y, n


def permuted_ols_parametric(beta, two_sided=True, use_sample_size=False, sample_sizes=None, groups=None) -> dict:
    """NiMARE 0.22 ``PermutedOLS`` maps: intercept-only OLS t, its z and p.

    With dependence groups (``groups``, a label per study, one repeated) the test
    runs on each group's mean map (:func:`collapse_blocks`), K becoming the number
    of groups, as NiMARE's exchangeability blocks.

    Parameters
    ----------
    beta : ndarray of shape (K, V)
    two_sided : bool
    use_sample_size : bool
        Weight each study by its sample size: CR2 t of the weighted mean with
        Satterthwaite dof (NiMARE 0.22); otherwise the ordinary one-sample t, dof K - 1.
    sample_sizes : ndarray of shape (K,), optional

    Returns
    -------
    dict
        ``t``, ``z``, ``p``, ``logp``, ``dof``. The max-T FWE maps are not here
        (sign-flip null over all bags).
    """
    y = _block("beta", beta)
    if has_dependence(groups):
        if use_sample_size:
            sample_sizes = _sample_sizes(sample_sizes, y.shape)[:, 0]
        y, sample_sizes = collapse_blocks(y, groups, sample_sizes if use_sample_size else None)
    k = y.shape[0]
    if use_sample_size:
        w = _sample_sizes(sample_sizes, y.shape)
        if w.shape[1] != 1:
            raise InputError("PermutedOLS takes one sample size per study, shape (K,); received "
                             f"{np.shape(sample_sizes)}.")
        t = _weighted_cr2_t(y, w[:, 0])
        dof = weighted_mean_satterthwaite_dof(w[:, 0])
    else:
        t = one_sample_t(_ksum(y), _ksum(y * y), k)
        dof = float(k - 1)
    nlogp = t_to_nlogp(t, dof, two_sided)
    return {"t": t, "z": t_to_z(t, dof), "p": np.exp(nlogp), "logp": nimare_logp(nlogp),
            "dof": np.full(y.shape[1], dof)}
