"""Max-T permutation kernels: nilearn's ``permuted_ols`` on one voxel block.

Pure numpy on one (sample, voxel) block; no dask. nilearn (Freedman & Lane
scheme) residualises the data and the tested variable on the orthonormalised
confounds C once, normalises both to unit norm, and for each permutation
computes, per voxel,

    b  = x_p' y            (x_p: tested variable, permuted or sign-flipped)
    a2 = ||C_p' y||^2      (C_p: confounds, permuted with x or sign-flipped)
    t  = b sqrt((n - k - 1) / (1 - a2 - b^2))

with n samples and k confound columns. A batch of P permutations is therefore
one matrix W of shape ((1 + k) P, n) times the block (n, V): one GEMM per
batch, then a max over voxels per permutation.

nilearn draws its permutations *cumulatively*: each sign-flip multiplies the
already flipped data, each shuffle re-shuffles the already shuffled design.
:func:`nilearn_permutations` returns the effective sign-flips / sample orders
of nilearn's random stream, so ``random_state`` gives nilearn's permutations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from chunkglm.errors import InputError
from chunkglm.kernels.finite import _stack_level

# Cache-sized work units (the hot loop is memory-bound otherwise): bytes of the
# (1 + k) P x V products of one GEMM batch, and of one residualised voxel tile.
_BATCH_BYTES = 4 * 2**20
_TILE_BYTES = 2 * 2**20


@dataclass(frozen=True)
class PermutationDesign:
    """The design pieces every block needs, prepared once as nilearn does.

    Attributes
    ----------
    tested : ndarray of shape (n_samples,)
        Tested variable residualised on the confounds, unit norm.
    covars : ndarray of shape (n_samples, k) or None
        Orthonormalised confounds (nilearn's ``covars_orthonormalized``).
    sign_flip : bool
        True when nilearn flips signs (its ``intercept_test``), False when it
        permutes the rows of the tested variable and confounds jointly.
    """

    tested: np.ndarray
    covars: np.ndarray | None
    sign_flip: bool

    @property
    def n_samples(self) -> int:
        """n, the number of samples (images)."""
        return self.tested.shape[0]

    @property
    def n_covars(self) -> int:
        """k, the number of orthonormal confound columns."""
        return 0 if self.covars is None else self.covars.shape[1]

    @property
    def dof_factor(self) -> float:
        """n - k - 1, the residual degrees of freedom of the t-score."""
        return float(self.n_samples - self.n_covars - 1)

    @property
    def rows(self) -> np.ndarray:
        """(1 + k, n_samples): the tested variable then the confound columns."""
        if self.covars is None:
            return self.tested[None, :]
        return np.vstack([self.tested[None, :], self.covars.T])


def prepare_design(tested_vars, confounding_vars=None, model_intercept=True) -> PermutationDesign:
    """nilearn's design handling in ``permuted_ols``, for one tested variable.

    Parameters
    ----------
    tested_vars : array-like of shape (n_samples,) or (n_samples, 1)
        The tested variable (design matrix times the contrast).
    confounding_vars : array-like of shape (n_samples, n_covars) or None
        Other design columns, fitted but not tested.
    model_intercept : bool
        Add a constant confound unless the test is already an intercept test.

    Returns
    -------
    PermutationDesign

    Notes
    -----
    As in nilearn 0.14: the test is a sign-flip ("intercept") test when the
    tested variable is constant, *or* when the confounds hold exactly one
    constant column (nilearn then keeps that column as a confound and flips
    signs). Constant confounds are all dropped when the tested variable is
    constant or when several confounds are constant.
    """
    tested = _tested_column(tested_vars)
    n_samples = tested.shape[0]
    covars = _confound_matrix(confounding_vars, n_samples)
    sign_flip = np.unique(tested).size == 1
    if covars is not None:
        constants = [j for j in range(covars.shape[1]) if np.unique(covars[:, j]).size == 1]
        if (sign_flip and len(constants) == 1) or len(constants) > 1:
            warnings.warn('Multiple columns across "confounding_vars" and/or "target_vars" are '
                          "constant. Only one will be used as intercept.", UserWarning, stacklevel=2)
            covars = np.delete(covars, constants, axis=1)
            model_intercept = True
            covars = covars if covars.size else None
        if not sign_flip and len(constants) == 1:  # nilearn: intercept only in the confounds
            sign_flip = True
    if model_intercept and not sign_flip:
        ones = np.ones((n_samples, 1))
        covars = ones if covars is None else np.hstack([covars, ones])
    covars = None if covars is None else _orthonormalize(covars)
    design = PermutationDesign(_residualise_tested(tested, covars), covars, sign_flip)
    if design.dof_factor < 0:
        raise InputError(f"The design leaves no degrees of freedom: {n_samples} samples for the "
                         f"tested variable and {design.n_covars} independent confound column(s). "
                         "Give more samples or fewer confounds.")
    if design.dof_factor == 0:  # nilearn computes on: t = b sqrt(0 / rss) is 0 (NaN where rss is 0)
        warnings.warn(f"The design leaves no residual degrees of freedom ({n_samples} samples: the "
                      f"tested variable and {design.n_covars} independent confound column(s)), so "
                      "every t-score is 0 (or NaN, as rounding falls) and every p-value 1, as "
                      "nilearn's permuted_ols computes them. Give more samples or fewer confounds "
                      "for a usable test.", UserWarning, stacklevel=_stack_level())
    return design


def _tested_column(tested_vars) -> np.ndarray:
    tested = np.asarray(tested_vars)
    if not (np.issubdtype(tested.dtype, np.number) or np.issubdtype(tested.dtype, np.bool_)):
        raise InputError(f"tested_vars must be numeric or boolean; received dtype {tested.dtype}.")
    if tested.ndim == 2 and tested.shape[1] == 1:
        tested = tested[:, 0]
    if tested.ndim != 1:
        raise InputError(f"tested_vars must be one variable of shape (n_samples,) or "
                         f"(n_samples, 1); received shape {tested.shape}. Test one contrast "
                         "at a time.")
    return tested.astype(np.float64)


def _confound_matrix(confounding_vars, n_samples):
    if confounding_vars is None:
        return None
    covars = np.asarray(confounding_vars, dtype=np.float64)
    covars = covars[:, None] if covars.ndim == 1 else covars
    if covars.ndim != 2 or covars.shape[0] != n_samples:
        raise InputError(f"confounding_vars must have shape (n_samples={n_samples}, n_covars); "
                         f"received shape {np.shape(confounding_vars)}. Give one row per image.")
    return covars if covars.shape[1] else None


def _orthonormalize(matrix, tol=1.0e-12):
    """nilearn's ``orthonormalize_matrix``: left singular vectors of non-null values."""
    u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    return np.ascontiguousarray(u[:, : np.count_nonzero(s > tol)])


def _residualise_tested(tested, covars):
    x = tested / np.sqrt(np.sum(tested**2))
    if covars is not None:
        x = x - covars @ (covars.T @ x)
        x = x / np.sqrt(np.sum(x**2))
    return x


def residualise_block(block, design: PermutationDesign) -> np.ndarray:
    """Normalise a data block, remove the confounds, normalise again (nilearn's step 1).

    Parameters
    ----------
    block : ndarray of shape (n_samples, n_voxels)
        The maps, any float dtype. As nilearn, the first normalisation is done
        in the data's own dtype; everything after it in float64.
    design : PermutationDesign

    Returns
    -------
    ndarray of shape (n_samples, n_voxels), float64
        Unit-norm columns orthogonal to the confounds. All-zero voxels give
        NaN columns, which every max below ignores (as nilearn's ``nanmax``).
    """
    block = np.asfortranarray(block)  # nilearn reduces F-ordered data: same summation order
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = (block / np.sqrt(np.sum(block**2, axis=0))).astype(np.float64, order="C")
        if design.covars is None:
            return normalised
        resid = normalised - design.covars @ (design.covars.T @ normalised)
        resid /= np.sqrt(np.sum(resid**2, axis=0))
    return resid


def _t_from_moments(b, a2, dof_factor):
    """t = b sqrt(dof / (1 - a2 - b^2)), in place on ``b`` where possible."""
    rss = 1.0 - b * b
    if a2 is not None:
        rss -= a2
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(dof_factor, rss, out=rss)
        np.sqrt(rss, out=rss)
    return np.multiply(b, rss, out=rss)


def original_t(resid, design: PermutationDesign) -> np.ndarray:
    """t-scores of the tested variable on unpermuted data.

    Parameters
    ----------
    resid : ndarray of shape (n_samples, n_voxels)
        Output of :func:`residualise_block`.
    design : PermutationDesign

    Returns
    -------
    ndarray of shape (n_voxels,)
    """
    moments = design.rows @ resid
    a2 = np.sum(moments[1:] ** 2, axis=0) if design.n_covars else None
    return _t_from_moments(moments[0], a2, design.dof_factor)


def _batch_weights(design: PermutationDesign, permutations) -> np.ndarray:
    """(1 + k, P, n) weights: rows of the design, sign-flipped or reordered per permutation."""
    rows = design.rows
    if design.sign_flip:
        return rows[:, None, :] * permutations[None, :, :]
    return rows[:, permutations]


def batch_max_t(resid, design: PermutationDesign, permutations, two_sided_test) -> np.ndarray:
    """Max over voxels of the t-score (|t| when two-sided) for a batch of permutations.

    Parameters
    ----------
    resid : ndarray of shape (n_samples, n_voxels)
        Output of :func:`residualise_block`.
    design : PermutationDesign
    permutations : ndarray of shape (n_batch, n_samples)
        Effective sign-flips (+1/-1) when ``design.sign_flip``, otherwise
        sample orders: row p makes sample i take the design row ``perm[p, i]``.
    two_sided_test : bool

    Returns
    -------
    ndarray of shape (n_batch,)
        NaN for a permutation only if every voxel of the block is NaN.

    Notes
    -----
    t is never formed voxel by voxel: it increases with q = b|b| / (1 - a2 - b^2)
    (with b^2 for |t|), so max t = sign(q) sqrt(dof |q|) at the voxel of max q;
    without confounds (a2 = 0) it increases with b itself. That leaves one GEMM
    and about four passes over the (permutation, voxel) products.
    """
    weights = _batch_weights(design, permutations)
    k1, n_batch, n_samples = weights.shape
    moments = (weights.reshape(k1 * n_batch, n_samples) @ resid).reshape(k1, n_batch, -1)
    b = moments[0]
    if k1 == 1:
        top = _nanmax_rows(b)
        if two_sided_test:
            top = np.fmax(top, -np.fmin.reduce(b, axis=1)) if b.shape[1] else top
        t = _t_from_moments(top, None, design.dof_factor)
    else:
        t = _t_from_q(_nanmax_rows(_q_scores(moments, two_sided_test)), design.dof_factor)
    bad = np.flatnonzero(np.isnan(t))
    if bad.size:  # all-NaN voxels, or 1 - a2 - b^2 < 0 by rounding (nilearn: NaN, skipped)
        t[bad] = _nanmax_rows(_elementwise_t(moments[:, bad], design, two_sided_test))
    return t


def _q_scores(moments, two_sided_test):
    """b|b| / rss (b^2 / rss when two-sided), rss = 1 - a2 - b^2: t = sign(q) sqrt(dof |q|)."""
    b = moments[0]
    rss = np.square(moments[1])
    for extra in moments[2:]:
        rss += np.square(extra)
    q = np.square(b)
    np.subtract(1.0, rss, out=rss)
    rss -= q
    if not two_sided_test:
        np.copysign(q, b, out=q)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(q, rss, out=q)
    if rss.min(initial=0.0) < 0:  # rounding: nilearn's sqrt gives NaN there
        q[rss < 0] = np.nan
    return q


def _t_from_q(q, dof_factor):
    return np.sign(q) * np.sqrt(dof_factor * np.abs(q))


def _elementwise_t(moments, design, two_sided_test):
    a2 = np.sum(moments[1:] ** 2, axis=0) if moments.shape[0] > 1 else None
    t = _t_from_moments(moments[0].copy(), a2, design.dof_factor)
    return np.abs(t) if two_sided_test else t


def _nanmax_rows(values):
    if values.shape[1] == 0:
        return np.full(values.shape[0], np.nan)
    return np.fmax.reduce(values, axis=1)  # ignores NaN; all-NaN rows stay NaN


def auto_batch_size(design: PermutationDesign, n_voxels: int, n_perm: int) -> int:
    """Permutations per GEMM so that one batch's product stays cache-sized (~4 MiB)."""
    per_perm = 8 * (1 + design.n_covars) * max(n_voxels, 1)
    return int(max(1, min(n_perm, _BATCH_BYTES // per_perm)))


def _voxel_tiles(n_samples, n_voxels):
    """Voxel ranges whose residualised data (float64) stay cache-sized (~2 MiB)."""
    size = max(64, _TILE_BYTES // (8 * max(n_samples, 1)))
    return [(a, min(a + size, n_voxels)) for a in range(0, n_voxels, size)]


def original_equivalents(design: PermutationDesign, permutations) -> np.ndarray:
    """Which permutations leave the t map unchanged, or exactly negate it.

    nilearn flips the signs of the data (or shuffles the design) and computes
    each permuted t with the same arithmetic as the original one, so a
    permutation whose effective weights equal the original ones (the identity
    flips, a shuffle within equal design rows) gives the original t map *bit
    for bit*, and the mirror flips give its exact negative. Those null maxima
    then tie with the observed peak and count as reaching it. Computed through
    batched products, they would land a rounding error off and the peak's FWE
    p-value would drop below what an exact test allows (1/256 for 8 maps).

    Parameters
    ----------
    design : PermutationDesign
    permutations : ndarray of shape (n_perm, n_samples)
        As in :func:`batch_max_t`.

    Returns
    -------
    ndarray of shape (n_perm,), int8
        +1 where the permuted t map equals the original, -1 where it equals
        its negative (tested row negated; confound rows only enter squared, so
        each may have either sign), 0 elsewhere.
    """
    weights = _batch_weights(design, permutations)
    rows = design.rows[:, None, :]
    plus = np.all(weights == rows, axis=2)
    minus = np.all(weights == -rows, axis=2)
    confounds_kept = np.all(plus[1:] | minus[1:], axis=0)
    sign = np.zeros(permutations.shape[0], dtype=np.int8)
    sign[plus[0] & confounds_kept] = 1
    sign[minus[0] & ~plus[0] & confounds_kept] = -1
    return sign


def tie_exact_maxima(null, equivalents, t, two_sided_test) -> np.ndarray:
    """Set the null maxima of :func:`original_equivalents` permutations from ``t`` itself.

    Parameters
    ----------
    null : ndarray of shape (n_perm,)
        Per-permutation maxima over the voxels of ``t``; updated in place.
    equivalents : ndarray of shape (n_perm,)
        Output of :func:`original_equivalents`.
    t : ndarray of shape (n_voxels,)
        The original t-scores of the same voxels.
    two_sided_test : bool

    Returns
    -------
    ndarray, ``null``
    """
    if not equivalents.any() or t.size == 0:
        return null
    for sign in (1, -1):
        score = sign * t
        score = np.abs(score) if two_sided_test else score
        null[equivalents == sign] = np.fmax.reduce(score)
    return null


def block_max_t(block, design: PermutationDesign, permutations, two_sided_test=False,
                batch_size=None):
    """Original t and the per-permutation max over the voxels of one block.

    Parameters
    ----------
    block : ndarray of shape (n_samples, n_voxels)
        The maps of this voxel block.
    design : PermutationDesign
    permutations : ndarray of shape (n_perm, n_samples)
        See :func:`batch_max_t`.
    two_sided_test : bool
    batch_size : int or None
        Permutations per GEMM; None sizes batches to stay in cache.

    Returns
    -------
    t : ndarray of shape (n_voxels,)
    block_null : ndarray of shape (n_perm,)
        Max of t (or |t|) over this block's voxels, per permutation.

    Notes
    -----
    The block is residualised once, then swept in cache-sized voxel tiles;
    every permutation batch runs on a tile while it is in cache.
    """
    resid = residualise_block(block, design)
    n_perm = permutations.shape[0]
    null = np.full(n_perm, np.nan)
    for start, stop in _voxel_tiles(*resid.shape):
        tile = np.ascontiguousarray(resid[:, start:stop])
        size = batch_size or auto_batch_size(design, stop - start, n_perm)
        for i in range(0, n_perm, size):
            part = batch_max_t(tile, design, permutations[i:i + size], two_sided_test)
            np.fmax(null[i:i + size], part, out=null[i:i + size])
    t = original_t(resid, design)
    return t, tie_exact_maxima(null, original_equivalents(design, permutations), t, two_sided_test)


def fwe_logp(t, h0_max_t, two_sided_test=False) -> np.ndarray:
    """-log10 of the max-T family-wise p-values, as nilearn's ``logp_max_t``.

    Parameters
    ----------
    t : ndarray of shape (n_voxels,)
        Original t-scores.
    h0_max_t : ndarray of shape (n_perm,)
        Null distribution of the max statistic (max |t| when two-sided).
    two_sided_test : bool
        Compare |t| instead of t.

    Returns
    -------
    ndarray of shape (n_voxels,)
        -log10((n_perm + 1 - #{h0 < t}) / (n_perm + 1)); NaN t-scores count no
        exceedance (p = 1), as nilearn's comparisons do.
    """
    t = np.asarray(t, dtype=np.float64)
    null = np.sort(np.asarray(h0_max_t, dtype=np.float64))  # NaN sorts last: never "< t"
    score = np.abs(t) if two_sided_test else t
    below = np.searchsorted(null, score, side="left")
    below[np.isnan(score)] = 0
    n_perm = null.size
    return -np.log10((n_perm + 1 - below) / float(n_perm + 1))


def nilearn_permutations(n_samples, n_perm, sign_flip, random_state=None, n_jobs=1) -> np.ndarray:
    """The permutations nilearn's ``permuted_ols`` draws for this ``random_state``.

    Parameters
    ----------
    n_samples : int
    n_perm : int
        At least 1.
    sign_flip : bool
        ``PermutationDesign.sign_flip``.
    random_state : None, int or numpy.random.RandomState
        As nilearn's (``sklearn.utils.check_random_state`` semantics). A
        RandomState instance is advanced, as nilearn advances it.
    n_jobs : int
        nilearn's number of permutation jobs *after* its capping to the CPU
        count: each job draws from its own seed, in order.

    Returns
    -------
    ndarray of shape (n_perm, n_samples)
        Effective sign-flips (float64, +1/-1) or sample orders (intp).
    """
    check_n_perm(n_perm)
    if int(n_jobs) < 1:
        raise InputError(f"n_jobs must be >= 1 to reproduce nilearn's stream; received {n_jobs}.")
    rng = _random_state(random_state)
    chunks = _nilearn_job_sizes(n_perm, int(n_jobs))
    seeds = [rng.randint(1, np.iinfo(np.int32).max - 1) for _ in chunks]
    draw = _cumulative_flips if sign_flip else _cumulative_orders
    return np.concatenate([draw(np.random.RandomState(s), n_samples, c) for s, c in zip(seeds, chunks)])


def _nilearn_job_sizes(n_perm, n_jobs):
    if n_perm > n_jobs:
        sizes = np.asarray([n_perm / n_jobs] * n_jobs, dtype=int)
        sizes[-1] += n_perm % n_jobs
        return [int(s) for s in sizes]
    return [1] * n_perm


def _random_state(random_state):
    if random_state is None or random_state is np.random:
        return np.random.mtrand._rand
    if isinstance(random_state, np.random.RandomState):
        return random_state
    if isinstance(random_state, (int, np.integer)):
        return np.random.RandomState(random_state)
    raise InputError(f"random_state must be None, an int or a numpy.random.RandomState; received "
                     f"{type(random_state).__name__}.")


def _cumulative_flips(rng, n_samples, n_perm):
    signs = np.ones(n_samples)
    out = np.empty((n_perm, n_samples))
    for i in range(n_perm):
        signs = signs * (rng.randint(2, size=(n_samples, 1)) * 2 - 1)[:, 0]
        out[i] = signs
    return out


def _cumulative_orders(rng, n_samples, n_perm):
    order = np.arange(n_samples)
    out = np.empty((n_perm, n_samples), dtype=np.intp)
    for i in range(n_perm):
        order = order[rng.permutation(n_samples)]
        out[i] = order
    return out


def check_n_perm(n_perm) -> int:
    """n_perm as an int >= 1, or an InputError saying what was received."""
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise InputError(f"n_perm must be an integer >= 1; received {n_perm!r}. Max-T inference "
                         "needs at least one permutation (nilearn's default is 10000).")
    return int(n_perm)


def check_permutations(permutations, design: PermutationDesign) -> np.ndarray:
    """Validate explicit permutations for this design; returns them as an array.

    Sign-flip designs need +1/-1 values; permutation designs need each row to
    be an ordering of ``range(n_samples)``.
    """
    perms = np.asarray(permutations)
    n = design.n_samples
    if perms.ndim != 2 or perms.shape[1] != n or perms.shape[0] < 1:
        raise InputError(f"permutations must have shape (n_perm >= 1, n_samples={n}); received "
                         f"shape {perms.shape}.")
    if design.sign_flip:
        if not np.all(np.abs(perms) == 1):
            raise InputError("This design is tested by sign-flipping (the tested variable is an "
                             "intercept), so permutations must hold only +1 and -1; received "
                             f"values {np.unique(perms)[:5]}...")
        return perms.astype(np.float64)
    if not np.array_equal(np.sort(perms, axis=1), np.broadcast_to(np.arange(n), perms.shape)):
        raise InputError("This design is tested by permuting samples, so each row of "
                         f"permutations must be an ordering of 0..{n - 1}; received rows that "
                         "are not.")
    return perms.astype(np.intp)
