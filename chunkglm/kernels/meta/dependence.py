"""Dependence groups in the meta-regression estimators, as NiMARE 0.22 / PyMARE 0.0.13 model them.

When several images of one fit share a group label (one study, several
contrasts), NiMARE hands PyMARE the labels and PyMARE changes three things,
all for the intercept-only model of an IBMA fit:

- the weights (``weight_scheme``): ``"rescale"`` gives every image of group j
  ``1 / (n_j (mean_j(v) + tau^2))`` (the correlated-effects weights of
  Hedges, Tipton & Johnson 2010 as robumeta applies them); ``"collapse"`` fits
  one row per group (mean effect, variance of a mean of effects correlated at
  ``rho``); ``"individual"`` keeps ``1 / (v + tau^2)``;
- tau^2: DerSimonian-Laird under ``"rescale"`` uses the correlated-effects
  moment estimator; Hedges and the likelihood estimators estimate tau^2 from the
  collapsed data under ``"rescale"`` and ``"collapse"``, from the rows under
  ``"individual"``;
- the standard error and the reference: the CR2 cluster-robust sandwich
  (whitened-metric adjustment ``(I - H_j)^(-1/2)``) with Satterthwaite degrees
  of freedom, instead of the model-based error and Knapp-Hartung
  (``small_sample_correction`` no longer applies).

With one predictor (the intercept) every group's hat block has rank one, with
its single non-unit eigenvalue ``mu_j = W_j / S`` (``W_j`` the group's weight
sum, ``S`` the total), so the adjustment and the Satterthwaite moments are
closed forms: score ``s_j = sum_j w e / sqrt(1 - mu_j)``, variance
``sum s_j^2 / S^2``, and, with ``a_j = W_j / (S^2 (1 - mu_j))``,
``dof = (sum a_j (1 - mu_j))^2 / ((sum mu_j a_j)^2 - 2 sum mu_j a_j^2 + sum a_j^2)``
(PyMARE's trace formula), floored at 1. ``1 - mu_j`` is floored at 1e-10 as
PyMARE floors it. Group sums are one (groups x K) @ (K x V) product per block.
Numpy only.
"""

from __future__ import annotations

import numpy as np

from chunkglm.errors import InputError
from chunkglm.kernels.meta.distributions import fe_stat_maps

WEIGHT_SCHEMES = ("individual", "rescale", "collapse")
#: PyMARE's floor on 1 - leverage (``_MIN_LEVERAGE_COMPLEMENT``).
_MIN_COMPLEMENT = 1e-10


def has_dependence(groups) -> bool:
    """Whether any label repeats (NiMARE's ``DependenceModel.has_dependence``)."""
    return groups is not None and np.unique(np.asarray(groups)).size < np.asarray(groups).size


class Groups:
    """Group membership of the K rows of a block: codes, sizes and the (m, K) indicator."""

    def __init__(self, labels):
        labels = np.asarray(labels).ravel()
        _, self.codes = np.unique(labels, return_inverse=True)
        self.codes = self.codes.ravel()
        self.n_groups = int(self.codes.max()) + 1 if self.codes.size else 0
        self.sizes = np.bincount(self.codes, minlength=self.n_groups).astype(np.float64)
        self.indicator = np.zeros((self.n_groups, self.codes.size))
        self.indicator[self.codes, np.arange(self.codes.size)] = 1.0

    def sum(self, values) -> np.ndarray:
        """(m, V) sums of the rows of each group."""
        return self.indicator @ np.asarray(values, dtype=np.float64)

    def mean(self, values) -> np.ndarray:
        return self.sum(values) / self.sizes[:, None]


def _check_scheme(weight_scheme, rho):
    if weight_scheme not in WEIGHT_SCHEMES:
        raise InputError(f"Invalid weight_scheme {weight_scheme!r}; must be one of {sorted(WEIGHT_SCHEMES)}.")
    if not 0.0 <= float(rho) <= 1.0:
        raise InputError(f"Invalid rho {rho!r}; must lie in [0, 1].")


def collapse(y, v, groups: Groups, rho):
    """One row per group: the mean effect and the variance of a mean of effects correlated at ``rho``
    (PyMARE's ``collapse_groups``): (sum v + rho ((sum sqrt v)^2 - sum v)) / n_j^2."""
    v = np.broadcast_to(v, y.shape)
    total = groups.sum(v)
    cross = groups.sum(np.sqrt(v)) ** 2 - total
    single = groups.sizes[:, None] == 1
    return groups.mean(y), np.where(single, total, (total + rho * cross) / groups.sizes[:, None] ** 2)


def collapse_by_n(y, n, groups: Groups, rho):
    """One row per group with an effective sample size (PyMARE's ``collapse_groups_by_n``):
    n_eff = n_j^2 / (sum 1/n + rho ((sum 1/sqrt n)^2 - sum 1/n))."""
    n = np.broadcast_to(n, y.shape)
    inverse = groups.sum(1.0 / n)
    cross = groups.sum(1.0 / np.sqrt(n)) ** 2 - inverse
    single = groups.sizes[:, None] == 1
    return groups.mean(y), np.where(single, groups.sum(n), groups.sizes[:, None] ** 2 / (inverse + rho * cross))


def correlated_effects_weights(v, groups: Groups, tau2=0.0) -> np.ndarray:
    """(K, V) weights 1 / (n_j (mean_j v + tau^2)), constant within a group."""
    return (1.0 / (groups.sizes[:, None] * (groups.mean(v) + tau2)))[groups.codes]


def correlated_effects_tau2(y, v, groups: Groups, rho) -> np.ndarray:
    """PyMARE's ``correlated_effects_tau2`` for the intercept-only model.

    With group weights ``g_j = 1 / (n_j mean_j v)`` and ``B = 1 / sum n_j g_j``:
    Q_E = sum_rows g (y - b)^2, tau^2 = max(0, (Q_E - m + B sum g_j + rho (1 - B sum g_j))
    / (sum n_j g_j - B sum g_j^2 n_j^2)).
    """
    v = np.broadcast_to(v, y.shape)
    sizes = groups.sizes[:, None]
    group_w = 1.0 / (sizes * groups.mean(v))
    row_w = group_w[groups.codes]
    est = (row_w * y).sum(0) / row_w.sum(0)
    q_e = (row_w * (y - est) ** 2).sum(0)
    bread = 1.0 / (sizes * group_w).sum(0)
    within = bread * group_w.sum(0)
    numerator = q_e - groups.n_groups + within + rho * (1.0 - within)
    denominator = (sizes * group_w).sum(0) - bread * (group_w ** 2 * sizes ** 2).sum(0)
    return np.maximum(0.0, numerator / denominator)


def cluster_robust(y, w, groups: Groups):
    """Intercept-only WLS with weights ``w``, its CR2 variance and Satterthwaite dof (closed forms).

    Returns
    -------
    est, var, dof : ndarray of shape (V,)
    """
    w = np.broadcast_to(w, y.shape)
    total = w.sum(0)
    est = (w * y).sum(0) / total
    group_w = groups.sum(w)
    mu = group_w / total
    complement = np.maximum(1.0 - mu, _MIN_COMPLEMENT)
    scores = groups.sum(w * (y - est)) / np.sqrt(complement)
    var = (scores ** 2).sum(0) / total ** 2
    a = group_w / (total ** 2 * complement)
    with np.errstate(divide="ignore", invalid="ignore"):
        trace = (a * (1.0 - mu)).sum(0)
        trace_sq = (mu * a).sum(0) ** 2 - 2.0 * (mu * a * a).sum(0) + (a * a).sum(0)
        dof = trace ** 2 / trace_sq
    dof = np.maximum(np.where(np.isfinite(dof), dof, 1.0), 1.0)
    return est, var, dof


def robust_maps(est, var, dof, extra=None) -> dict:
    """PyMARE's ``get_fe_stats`` on the t reference with per-voxel dof, as NiMARE's maps."""
    maps = fe_stat_maps(est, np.sqrt(var), dof, extra)
    maps["dof"] = dof
    return maps


def grouped_fit(y, v, labels, weight_scheme, rho, tau2_of, tau2_rescale=None, extra=None):
    """One variance-based meta-regression with dependence groups (WLS, DL, Hedges, likelihood).

    Parameters
    ----------
    y, v : ndarray of shape (K, V)
        Effects and sampling variances (v may be a (K, 1) column).
    labels : array of shape (K,)
        Group label of each row (at least one repeated).
    weight_scheme, rho
        PyMARE's.
    tau2_of : callable (y, v) -> (V,) tau^2
        The estimator's own tau^2 rule, applied to the rows ("individual") or to the
        collapsed groups ("collapse"; and "rescale" unless ``tau2_rescale`` is given).
    tau2_rescale : callable (y, v, groups) -> (V,), optional
        The tau^2 rule under "rescale" when it is not ``tau2_of`` on the collapsed
        groups (DerSimonian-Laird's correlated-effects estimator).
    extra : callable tau2 -> dict, optional
        Extra maps (``{"tau2": tau2}``).
    """
    _check_scheme(weight_scheme, rho)
    groups = Groups(labels)
    if weight_scheme == "collapse":
        y, v = collapse(y, v, groups, rho)
        groups = Groups(np.arange(groups.n_groups))
        tau2 = tau2_of(y, v)
        w = 1.0 / (v + tau2)
    elif weight_scheme == "rescale":
        tau2 = tau2_rescale(y, v, groups) if tau2_rescale is not None else tau2_of(*collapse(y, v, groups, rho))
        w = correlated_effects_weights(v, groups, tau2)
    else:
        tau2 = tau2_of(y, v)
        w = 1.0 / (v + tau2)
    est, var, dof = cluster_robust(y, w, groups)
    return robust_maps(est, var, dof, extra(tau2) if extra is not None else None)
