"""Combination tests on z maps: Fisher's and Stouffer's (NiMARE 0.22 / PyMARE 0.0.13).

With dependence groups (``groups``, several images of one study) NiMARE hands
PyMARE the labels and the null correlation between the images
(:mod:`.correlation`): Stouffer's test combines one variance-standardised mean
per group (``mean_g(z) / sqrt(sum_g R / b_g^2)``, one weight per group),
Fisher's test becomes Brown's scaled chi^2 (weights divided by the group size;
Var adds ``2 sum_{i<j in a group} w_i w_j (3.263 r + 0.710 r^2 + 0.027 r^3)``,
Kost & McDermott's fit). A group whose aggregated z has variance <= 1e-12 (its
images cancel) is left out of the pattern, as NiMARE leaves it out; with
``use_sample_size`` each image's weight is its group's mean sample size within
the pattern. The ``dof`` map is the number of groups less one.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from chunkglm.errors import InputError
from chunkglm.kernels.meta._arrays import _block, _dof_map, _ksum, _sample_sizes
from chunkglm.kernels.meta.dependence import Groups, has_dependence
from chunkglm.kernels.meta.distributions import _LOG2, log_chi2_sf, nimare_logp

#: NiMARE's ``_CANCELLATION_FLOOR``: a group's aggregated-z variance at or below it means its images cancel.
CANCELLATION_FLOOR = 1e-12


def _concordant(log_p_directed, z):
    """PyMARE's two-sided ("concordant") combination from a directed log-p function."""
    log_p1, log_p2 = log_p_directed(z), log_p_directed(-z)
    log_p = np.minimum(0.0, _LOG2 + np.minimum(log_p1, log_p2))
    z_calc = -special.ndtri_exp(log_p - _LOG2)
    return np.where(log_p2 < log_p1, -z_calc, z_calc), log_p


def _combination_maps(log_p_directed, z, two_sided, n_units=None):
    if two_sided:
        z_map, log_p = _concordant(log_p_directed, z)
    else:
        log_p = log_p_directed(z)
        z_map = -special.ndtri_exp(log_p)
    return {"z": z_map, "p": np.exp(log_p), "logp": nimare_logp(log_p),
            "dof": _dof_map(z.shape[0] if n_units is None else n_units, z.shape[1])}


def _nan_maps(n_voxels):
    return {name: np.full(n_voxels, np.nan) for name in ("z", "p", "logp", "dof")}


def _grouped_inputs(z, groups, corr, image_index, sample_sizes):
    """The pattern's rows less the groups whose images cancel; their labels, (K', K') correlation
    and per-image group-mean sample sizes (None without sample sizes)."""
    if corr is None:
        raise InputError("Images share dependence groups but no null correlation between them could be "
                         "estimated (no two images share two usable voxels); pass groupby=False to treat "
                         "the images as independent.")
    index = np.arange(z.shape[0]) if image_index is None else np.asarray(image_index)
    sub = np.asarray(corr, dtype=np.float64)[np.ix_(index, index)]
    labels = np.asarray(groups)
    grouping = Groups(labels)
    variance = (grouping.indicator @ sub @ grouping.indicator.T).diagonal() / grouping.sizes ** 2
    cancels = (grouping.sizes > 1) & ~(np.isfinite(variance) & (variance > CANCELLATION_FLOOR))
    keep = ~cancels[grouping.codes]
    n = None if sample_sizes is None else np.asarray(sample_sizes, dtype=np.float64).reshape(labels.size, -1)
    z, labels, sub = z[keep], labels[keep], sub[np.ix_(keep, keep)]
    if n is not None:
        n = n[keep]
        n = Groups(labels).mean(n)[Groups(labels).codes]
    return z, labels, sub, n


def fishers(z, use_sample_size=False, sample_sizes=None, two_sided=True, groups=None, corr=None,
            image_index=None) -> dict:
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

    groups : array of shape (K,), optional
        Dependence-group labels; where one repeats, Brown's method with ``corr``.
    corr : ndarray of shape (N, N), optional
        Null correlation of all the fitted images (:mod:`.correlation`).
    image_index : array of shape (K,), optional
        Rows and columns of ``corr`` of these K studies.

    Notes
    -----
    X = -2 sum_i w_i log Phi(-z_i); with weights, X / s ~ chi2(nu) with
    s = sum w^2 / sum w and nu = 2 (sum w)^2 / sum w^2 (w = 1: chi2(2K)).
    """
    z = _block("z", z)
    if has_dependence(groups):
        return _brown(z, use_sample_size, sample_sizes, two_sided, groups, corr, image_index)
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


def _brown(z, use_sample_size, sample_sizes, two_sided, groups, corr, image_index):
    """Fisher's test on grouped images: Brown's scaled chi^2 with the null correlation."""
    z, labels, sub, n = _grouped_inputs(z, groups, corr, image_index,
                                        _sample_sizes(sample_sizes, z.shape)[:, 0] if use_sample_size else None)
    grouping = Groups(labels)
    if grouping.n_groups < 2:
        return _nan_maps(z.shape[1])
    if grouping.n_groups == labels.size:  # the cancelling groups gone, nothing repeats
        return fishers(z, use_sample_size, n, two_sided)
    external = n[:, 0] if n is not None else np.ones(labels.size)
    w = external / grouping.sizes[grouping.codes]
    same = (grouping.codes[:, None] == grouping.codes[None, :]) & ~np.eye(labels.size, dtype=bool)
    kost = sub * (3.263 + sub * (0.710 + sub * 0.027))
    expectation = 2.0 * w.sum()
    variance = 4.0 * (w * w).sum() + w @ (kost * same) @ w  # each unordered pair twice = 2 sum_{i<j}
    scale, df = variance / (2.0 * expectation), 2.0 * expectation ** 2 / variance

    def log_p_directed(values):
        return log_chi2_sf(-2.0 * (w[:, None] * special.log_ndtr(-values)).sum(0) / scale, df)
    return _combination_maps(log_p_directed, z, two_sided, grouping.n_groups)


def stouffers(z, use_sample_size=False, sample_sizes=None, two_sided=True, groups=None, corr=None,
              image_index=None) -> dict:
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
    ``groups``, ``corr``, ``image_index``: as :func:`fishers` (group-level Stouffer).
    """
    z = _block("z", z)
    if has_dependence(groups):
        return _group_level_stouffers(z, use_sample_size, sample_sizes, two_sided, groups, corr, image_index)
    w = np.sqrt(_sample_sizes(sample_sizes, z.shape)) if use_sample_size else np.ones((z.shape[0], 1))
    norm = np.sqrt(_ksum(w * w))

    def log_p_directed(values):
        return special.log_ndtr(-(_ksum(values * w) / norm))
    return _combination_maps(log_p_directed, z, two_sided)


def _group_level_stouffers(z, use_sample_size, sample_sizes, two_sided, groups, corr, image_index):
    """Stouffer's test on one variance-standardised mean z per group, one weight per group."""
    z, labels, sub, n = _grouped_inputs(z, groups, corr, image_index,
                                        _sample_sizes(sample_sizes, z.shape)[:, 0] if use_sample_size else None)
    grouping = Groups(labels)
    if grouping.n_groups < 2:
        return _nan_maps(z.shape[1])
    if grouping.n_groups == labels.size:
        return stouffers(z, use_sample_size, n, two_sided)
    block_sums = (grouping.indicator @ sub @ grouping.indicator.T).diagonal()
    variance = np.where(grouping.sizes == 1, 1.0, block_sums / grouping.sizes ** 2)
    group_w = np.sqrt(grouping.mean(n)[:, 0]) if n is not None else np.ones(grouping.n_groups)
    norm = np.sqrt((group_w * group_w).sum())

    def log_p_directed(values):
        group_z = grouping.mean(values) / np.sqrt(variance)[:, None]
        return special.log_ndtr(-((group_z * group_w[:, None]).sum(0) / norm))
    return _combination_maps(log_p_directed, z, two_sided, grouping.n_groups)


def _weighted_stouffers(z, sample_sizes, two_sided=True) -> dict:
    return stouffers(z, use_sample_size=True, sample_sizes=sample_sizes, two_sided=two_sided)
