"""Sign-flip nulls: one-sample t of flipped copies, per-voxel counts, max-statistic null.

The nulls use one matrix product per batch of flips (BLAS order), not the
study-order sums of the other kernels, which is why their ties with the
observed statistic are taken within sqrt(eps).
"""

from __future__ import annotations

import math

import numpy as np

from chunkglm.errors import InputError
from chunkglm.kernels.meta._arrays import _block, _ksum
from chunkglm.kernels.meta.ols import one_sample_t

_TIE_RTOL = math.sqrt(np.finfo(np.float64).eps)


def _check_flips(flips, n_studies) -> np.ndarray:
    flips = np.asarray(flips, dtype=np.float64)
    if flips.ndim != 2 or flips.shape[1] != n_studies or not np.all(np.abs(flips) == 1):
        raise InputError(f"sign flips must be an (n_iters, n_studies={n_studies}) array of +1/-1; "
                         f"received shape {flips.shape}.")
    return flips


def sign_flip_t(values, flips, constant_as_zero=True) -> np.ndarray:
    """One-sample t of every sign-flipped copy of the block: one matrix product.

    Parameters
    ----------
    values : ndarray of shape (K, V)
    flips : ndarray of shape (n_iters, K)
        +1/-1 per study and iteration (the same flips at every voxel).
    constant_as_zero : bool
        Constant voxels give t = 0 (old NiMARE's NaN -> 0) instead of NaN.

    Returns
    -------
    ndarray of shape (n_iters, V)
    """
    y = _block("values", values)
    flips = _check_flips(flips, y.shape[0])
    t = one_sample_t(flips @ y, _ksum(y * y)[None, :], y.shape[0])
    return np.nan_to_num(t, nan=0.0) if constant_as_zero else t


def _flip_batches(n_iters, n_voxels):
    size = max(1, min(n_iters, (8 * 2**20) // (8 * max(n_voxels, 1))))
    return range(0, n_iters, size), size


def sign_flip_counts(values, flips, observed_t) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, how many sign-flip t values fall below / equal the observed t.

    Batches of flips are summable, so a large null can be split across tasks.
    Values within ``sqrt(eps)`` (relative) of the observed t count as equal:
    old NiMARE computed both with ``ttest_1samp``, so the identity flip tied
    exactly; here the null comes from a matrix product, the observed t from a
    sum, which may differ in the last bits.

    Returns
    -------
    below, equal : ndarray of shape (V,), int64
    """
    y = _block("values", values)
    flips = _check_flips(flips, y.shape[0])
    observed = np.asarray(observed_t, dtype=np.float64)
    below = np.zeros(y.shape[1], dtype=np.int64)
    equal = np.zeros(y.shape[1], dtype=np.int64)
    starts, size = _flip_batches(flips.shape[0], y.shape[1])
    for start in starts:
        null = sign_flip_t(y, flips[start:start + size])
        tie = np.abs(null - observed) <= _TIE_RTOL * np.abs(observed)
        below += ((null < observed) & ~tie).sum(0)
        equal += tie.sum(0)
    return below, equal


def empirical_p(below, equal, n_iters, tail="two") -> np.ndarray:
    """Old NiMARE ``null_to_p`` (``scipy.stats.percentileofscore``, kind="rank"), clipped.

    pct = (2 below + equal + [equal > 0]) * 50 / n_iters; two: (50 - |pct - 50|) * 2 / 100,
    upper: 1 - pct / 100, lower: pct / 100; then clipped to [1e-16, 1 - 1e-16].
    """
    below = np.asarray(below, dtype=np.float64)
    equal = np.asarray(equal, dtype=np.float64)
    pct = (2.0 * below + equal + (equal > 0)) * (50.0 / n_iters)
    if tail == "two":
        p = (50.0 - np.abs(pct - 50.0)) * 2.0 / 100.0
    elif tail == "upper":
        p = 1.0 - pct / 100.0
    elif tail == "lower":
        p = pct / 100.0
    else:
        raise InputError(f"tail must be 'two', 'upper' or 'lower'; received {tail!r}.")
    return np.clip(p, 1e-16, 1.0 - 1e-16)


def sign_flip_max_null(values, flips, two_sided=True) -> np.ndarray:
    """Max over this block's voxels of each sign-flipped t (|t| when two-sided).

    NiMARE 0.22 ``PermutedOLS``'s null (``_permutation_maxima``): flipped sums
    by one matrix product, constant voxels (NaN t) ignored as by ``nanmax``.

    Returns
    -------
    ndarray of shape (n_iters,)
        Combine blocks with ``np.fmax``; -inf for an empty block, NaN where
        every voxel is constant.
    """
    return _max_null(values, flips, two_sided, lambda y, batch: sign_flip_t(y, batch, constant_as_zero=False))


def _max_null(values, flips, two_sided, t_of) -> np.ndarray:
    """Max over the block's voxels of ``t_of(y, flips batch)`` (|t| when two-sided), flips in
    batches sized to the block; -inf for an empty block, NaN ignored as by ``np.fmax``."""
    y = _block("values", values)
    flips = _check_flips(flips, y.shape[0])
    out = np.full(flips.shape[0], -np.inf)
    if not y.shape[1]:
        return out
    starts, size = _flip_batches(flips.shape[0], y.shape[1])
    for start in starts:
        t = t_of(y, flips[start:start + size])
        out[start:start + size] = np.fmax.reduce(np.abs(t) if two_sided else t, axis=1)
    return out


def weighted_sign_flip_t(values, weights, signs) -> np.ndarray:
    """(n_signs, V) signed weighted CR2 t (PyMARE's ``weighted_intercept_cr2``; all +1: the observed t).

    With W = sum w, h = w / W, q = w^2 / (1 - h) and signed values s x: mean m = s w x / W,
    meat = sum q x^2 - 2 m (s q x) + m^2 sum q, t = (s w x) / sqrt(meat) (NaN where meat is 0).
    """
    y = np.asarray(values, dtype=np.float64)
    signs = np.asarray(signs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    q = np.square(w) / (1.0 - w / total)
    sums = signs @ (w[:, None] * y)
    means = sums / total
    meat = (q[:, None] * np.square(y)).sum(axis=0)[None, :] - 2.0 * means * (signs @ (q[:, None] * y))
    meat = np.maximum(meat + np.square(means) * q.sum(), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(meat == 0, np.nan, sums / np.sqrt(meat))


def weighted_sign_flip_max_null(values, weights, flips, two_sided=True) -> np.ndarray:
    """Max over this block's voxels of each sign-flipped weighted CR2 t (|t| when two-sided);
    combine blocks with ``np.fmax`` (NiMARE 0.22 ``PermutedOLS(use_sample_size=True)``'s null)."""
    return _max_null(values, flips, two_sided, lambda y, batch: weighted_sign_flip_t(y, weights, batch))
