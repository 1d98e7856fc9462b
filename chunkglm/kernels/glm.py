"""First-level GLM kernels: OLS and AR(1) exactly as nilearn, from moments.

Pure numpy on one voxel block; no dask. Every statistic is computed from
*sufficient statistics* of the block, gathered in one pass over the data
(three GEMMs and a few column reductions, :func:`block_moments`). After that
pass the 4-D data are never touched again: OLS, the Yule-Walker AR(1)
estimate, the per-bin AR(1) refit and every contrast follow from the
moments, so one read of each chunk serves all outputs.

nilearn whitens with x~_0 = x_0, x~_t = x_t - rho x_{t-1} (first row kept).
Hence, with W the whitening operator,

    X~' W y = M0 - rho M1 + rho^2 M2
    M0 = X'Y,  M1 = X[1:]'Y[:-1] + X[:-1]'Y[1:],  M2 = X[:-1]'Y[:-1]

and the same for X~'X~ and ||W y||^2. Shapes: Y (time, voxel), X (time, regressor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class DesignMoments:
    """Moments of the design X (time, p) that every whitened fit needs."""

    xtx: np.ndarray  # X'X
    x_lag: np.ndarray  # X[1:]'X[:-1] + X[:-1]'X[1:]
    x_head: np.ndarray  # X[:-1]'X[:-1]
    col_sum: np.ndarray  # 1'X
    head_sum: np.ndarray  # 1'X[:-1]
    tail_sum: np.ndarray  # 1'X[1:]
    n_time: int

    @classmethod
    def from_design(cls, X: np.ndarray) -> DesignMoments:
        """Compute from a design matrix of shape (time, regressor)."""
        X = np.asarray(X, dtype=np.float64)
        lag = X[1:].T @ X[:-1]
        return cls(X.T @ X, lag + lag.T, X[:-1].T @ X[:-1], X.sum(0), X[:-1].sum(0),
                   X[1:].sum(0), X.shape[0])

    @property
    def n_regressors(self) -> int:
        """p, the number of columns."""
        return self.xtx.shape[0]

    def whitened_gram(self, rho: float) -> np.ndarray:
        """X~'X~ for AR(1) coefficient ``rho`` (rho = 0: OLS)."""
        return self.xtx - rho * self.x_lag + rho * rho * self.x_head


@dataclass(frozen=True)
class BlockMoments:
    """Sufficient statistics of one (time, voxel) block for a design X.

    All arrays have the voxel axis last; per-voxel scalars are (voxel,).
    """

    m0: np.ndarray  # X'Y                            (p, voxel)
    m1: np.ndarray  # X[1:]'Y[:-1] + X[:-1]'Y[1:]     (p, voxel)
    m2: np.ndarray  # X[:-1]'Y[:-1]                  (p, voxel)
    q0: np.ndarray  # sum_t y_t^2
    q1: np.ndarray  # sum_t y_t y_{t-1}
    q2: np.ndarray  # sum_{t<n-1} y_t^2
    y_sum: np.ndarray  # sum_t y_t
    y_head: np.ndarray  # sum_{t<n-1} y_t
    y_tail: np.ndarray  # sum_{t>0} y_t


def block_moments(X: np.ndarray, Y: np.ndarray) -> BlockMoments:
    """One pass over a data block: three GEMMs and column reductions.

    Parameters
    ----------
    X : ndarray of shape (n_time, n_regressors)
    Y : ndarray of shape (n_time, n_voxels)
        Any float dtype; computed in float64 as nilearn does.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X has {X.shape[0]} rows (time points) but Y has {Y.shape[0]}: "
            f"You provided X with shape {X.shape} and Y with shape {Y.shape}."
        )
    p = X.shape[1]
    # M0 and M1 in one GEMM, one pass over the block: M1 = S'Y with S_t = x_{t+1} + x_{t-1}
    # (the rows that exist), the same sums as X[1:]'Y[:-1] + X[:-1]'Y[1:] in another order
    neighbours = np.zeros_like(X)
    neighbours[:-1] += X[1:]
    neighbours[1:] += X[:-1]
    both = np.concatenate([X, neighbours], axis=1).T @ Y
    m0, m1 = both[:p], both[p:]
    m2 = m0 - np.outer(X[-1], Y[-1])
    q0 = np.einsum("tv,tv->v", Y, Y)
    q1 = np.einsum("tv,tv->v", Y[1:], Y[:-1])
    y_sum = Y.sum(0)
    return BlockMoments(m0, m1, m2, q0, q1, q0 - Y[-1] ** 2, y_sum, y_sum - Y[-1], y_sum - Y[0])


@dataclass(frozen=True)
class OLSResiduals:
    """What Yule-Walker needs from the OLS residuals e = y - X beta, per voxel."""

    e_sum: np.ndarray  # sum_t e_t
    e_head: np.ndarray  # sum_{t<n-1} e_t
    e_tail: np.ndarray  # sum_{t>0} e_t
    ss0: np.ndarray  # sum_t e_t^2
    ss1: np.ndarray  # sum_t e_t e_{t-1}


def solve_gram(gram: np.ndarray) -> np.ndarray:
    """(X~'X~)^-1, which equals nilearn's pinv(X~) pinv(X~)' for a full-rank design.

    A singular whitened Gram matrix (e.g. as many scans left as regressors after
    sample masks, where the AR(1) coefficient of an exact fit is degenerate) gets
    the pseudo-inverse, nilearn's pinv(X~) pinv(X~)'.
    """
    try:
        return np.linalg.inv(gram)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(gram)


def ols_residual_stats(dm: DesignMoments, bm: BlockMoments) -> tuple[np.ndarray, OLSResiduals]:
    """OLS betas (p, voxel) and the residual sums Yule-Walker needs."""
    beta = solve_gram(dm.xtx) @ bm.m0
    lag_x = 0.5 * dm.x_lag  # X[1:]'X[:-1] symmetrised: b'K b is the same
    ss0 = bm.q0 - np.einsum("pv,pv->v", beta, bm.m0)
    ss1 = bm.q1 - np.einsum("pv,pv->v", beta, bm.m1) + np.einsum("pv,pq,qv->v", beta, lag_x, beta)
    stats = OLSResiduals(
        e_sum=bm.y_sum - dm.col_sum @ beta,
        e_head=bm.y_head - dm.head_sum @ beta,
        e_tail=bm.y_tail - dm.tail_sum @ beta,
        ss0=ss0,
        ss1=ss1,
    )
    return beta, stats


def yule_walker_ar1(stats: OLSResiduals, grand_mean: float, n_time: int) -> np.ndarray:
    """AR(1) coefficient per voxel, as nilearn's ``_yule_walker(e, 1)``.

    nilearn centres the residuals on the *grand* mean of the whole residual
    array (all voxels): ``grand_mean`` is that global reduction, done by the
    caller over every block (~0 when the design has an intercept).
    """
    m, n = grand_mean, n_time
    c0 = stats.ss0 - 2 * m * stats.e_sum + n * m * m
    c1 = stats.ss1 - m * (stats.e_head + stats.e_tail) + (n - 1) * m * m
    r0 = c0 / (n * n)
    r1 = c1 / ((n - 1) * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return r1 / r0


def bin_ar1(rho: np.ndarray, bins: int = 100) -> np.ndarray:
    """Truncate coefficients into ``bins`` levels, exactly as nilearn does."""
    return (rho * bins).astype(int) * 1.0 / bins


@dataclass(frozen=True)
class GLMFit:
    """A fitted block: what every contrast needs, nothing of the 4-D data.

    Attributes
    ----------
    beta : ndarray (p, voxel)
    dispersion : ndarray (voxel,)
        SSE / (n_time - p), as nilearn.
    rho : ndarray (voxel,)
        The (binned) AR(1) coefficient of each voxel; 0 for OLS.
    levels : ndarray (n_levels,)
        Distinct values of ``rho``.
    level_index : ndarray (voxel,) of int
        Index into ``levels`` / ``cov`` for each voxel.
    cov : ndarray (n_levels, p, p)
        Normalised covariance (X~'X~)^-1 of each level.
    df_residuals : int
        n_time - rank(X).
    r_square : ndarray (voxel,) or None
        nilearn's r-square, computed with the fit (it needs the moments,
        which are then not kept).
    """

    beta: np.ndarray
    dispersion: np.ndarray
    rho: np.ndarray
    levels: np.ndarray
    level_index: np.ndarray
    cov: np.ndarray
    df_residuals: int
    r_square: np.ndarray | None = None


def fit_whitened(dm: DesignMoments, bm: BlockMoments, rho: np.ndarray, df_residuals: int,
                 n_columns: int | None = None) -> GLMFit:
    """Refit every voxel under its own AR(1) coefficient, vectorised.

    ``n_columns``: the design's column count p (default the basis'): nilearn
    divides the SSE by n_time - p even for a rank-deficient design, whose
    basis has fewer columns (its t/F df stay n_time - rank).

    Voxels sharing a coefficient share one (X~'X~)^-1 (at most 2 x bins small
    matrices); the data enter only through the moments, so no voxel is
    gathered and nothing loops over voxels.
    """
    rho = np.asarray(rho, dtype=np.float64)
    levels, level_index = np.unique(rho, return_inverse=True)
    cov = np.stack([solve_gram(dm.whitened_gram(r)) for r in levels])
    xwy = bm.m0 - rho * bm.m1 + rho * rho * bm.m2  # X~' W y, (p, voxel)
    beta = per_level_products(cov, level_index, xwy)
    wyy = bm.q0 - 2 * rho * bm.q1 + rho * rho * bm.q2  # ||W y||^2
    sse = wyy - np.einsum("pv,pv->v", beta, xwy)
    dispersion = sse / (dm.n_time - (dm.n_regressors if n_columns is None else n_columns))
    fit = GLMFit(beta, dispersion, rho, levels, level_index, cov, df_residuals)
    return replace(fit, r_square=r_square(dm, bm, fit))


def per_level_products(matrices: np.ndarray, level_index: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``matrices[level_index[v]] @ columns[:, v]`` for every voxel v, level by level: (p, voxel).

    Voxels are grouped by level (one stable sort), each group takes one small GEMM; no
    (voxel, p, p) gather of the matrices (37 MB for 20,000 voxels and 15 regressors).

    Parameters
    ----------
    matrices : ndarray (n_levels, p, q)
    level_index : ndarray (voxel,) of int
    columns : ndarray (q, voxel)
    """
    order = np.argsort(level_index, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(level_index, minlength=len(matrices)))])
    grouped = columns[:, order]
    out = np.empty((matrices.shape[1], len(order)), dtype=np.result_type(matrices, columns))
    for level, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if stop > start:
            out[:, start:stop] = matrices[level] @ grouped[:, start:stop]
    result = np.empty_like(out)
    result[:, order] = out
    return result


def contrast_t(fit: GLMFit, con: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Effect (voxel,) and effect variance (voxel,) of a t contrast (p,)."""
    con = np.asarray(con, dtype=np.float64).ravel()
    effect = con @ fit.beta
    per_level = np.einsum("p,lpq,q->l", con, fit.cov, con)
    return effect, per_level[fit.level_index] * fit.dispersion


def contrast_f(fit: GLMFit, con: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An F contrast (q, p) as nilearn defines it.

    Returns
    -------
    effect : ndarray (q, voxel)
        The *whitened* effect ``sqrtm(inv(C cov C')) C beta`` of nilearn.
    variance : ndarray (voxel,)
        The dispersion (nilearn stores it as the F contrast's variance).
    f_stat : ndarray (voxel,)
        ``|effect|^2 / (q * dispersion)``.
    """
    con = np.atleast_2d(np.asarray(con, dtype=np.float64))
    per_level = np.einsum("ip,lpq,jq->lij", con, fit.cov, con)
    whiten = np.stack([_inverse_sqrt(c) for c in per_level])  # (level, q, q)
    effect = np.einsum("vij,jv->iv", whiten[fit.level_index], con @ fit.beta)
    f_stat = (effect**2).sum(0) / (con.shape[0] * fit.dispersion)
    return effect, fit.dispersion, f_stat


def _inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of inv(matrix), for symmetric positive definite input."""
    values, vectors = np.linalg.eigh(np.linalg.inv(matrix))
    return (vectors * np.sqrt(values)) @ vectors.T


def r_square(dm: DesignMoments, bm: BlockMoments, fit: GLMFit) -> np.ndarray:
    """nilearn's r-square, var(X~ beta) / var(W y) over time, from moments (voxel,)."""
    n, rho = dm.n_time, fit.rho
    grams = np.stack([dm.whitened_gram(r) for r in fit.levels])
    gram_beta = per_level_products(grams, fit.level_index, fit.beta)
    pred_sq = np.einsum("pv,pv->v", fit.beta, gram_beta)
    pred_sum = dm.col_sum @ fit.beta - rho * (dm.head_sum @ fit.beta)
    wy_sq = bm.q0 - 2 * rho * bm.q1 + rho * rho * bm.q2
    wy_sum = bm.y_sum - rho * bm.y_head
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pred_sq / n - (pred_sum / n) ** 2) / (wy_sq / n - (wy_sum / n) ** 2)


def log_likelihood(fit: GLMFit, n_time: int, n_columns: int) -> np.ndarray:
    """The maximised log-likelihood of each voxel's whitened fit (voxel,), as nilearn's
    ``RegressionResults.logL`` (what fitlins writes as ``stat-logLikelihood``).

    ``-n/2 log(2 pi sigma^2) - SSE / (2 sigma^2)`` with sigma^2 = SSE / n, n the time points,
    SSE the whitened residual sum of squares, here ``dispersion * (n - n_columns)`` (the
    fit's dispersion divides it by ``n - n_columns``: :func:`fit_whitened`).
    """
    sse = np.asarray(fit.dispersion, dtype=np.float64) * (n_time - n_columns)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_sq = sse / n_time
        return -0.5 * n_time * np.log(2 * np.pi * sigma_sq) - sse / (2 * sigma_sq)


def predicted(X: np.ndarray, fit: GLMFit) -> np.ndarray:
    """nilearn's predicted values X~ beta (whitened design), shape (time, voxel).

    ``fit.rho`` is (voxel,) for AR(1)/OLS or (voxel, N) for AR(N).
    """
    fitted = np.asarray(X, dtype=np.float64) @ fit.beta
    rho = fit.rho.reshape(len(fit.rho), -1)
    out = fitted.copy()
    for lag in range(rho.shape[1]):
        out[lag + 1:] -= rho[:, lag] * fitted[: len(fitted) - lag - 1]
    return out


def scale_moments(dm: DesignMoments, bm: BlockMoments, grand_mean: float) -> BlockMoments:
    """Moments of nilearn's ``mean_scaling(Y, axis=(0, 1))`` from those of Y.

    With one grand mean m over all voxels and time points, the scaled data
    are Y' = s Y - 100 with s = 100 / max(m, 1): an affine map, so the
    moments of Y' follow from those of Y and of X without a second pass.
    """
    s, c, n = 100.0 / max(grand_mean, 1.0), 100.0, dm.n_time
    return BlockMoments(
        m0=s * bm.m0 - c * dm.col_sum[:, None],
        m1=s * bm.m1 - c * (dm.head_sum + dm.tail_sum)[:, None],
        m2=s * bm.m2 - c * dm.head_sum[:, None],
        q0=s * s * bm.q0 - 2 * c * s * bm.y_sum + c * c * n,
        q1=s * s * bm.q1 - c * s * (bm.y_head + bm.y_tail) + c * c * (n - 1),
        q2=s * s * bm.q2 - 2 * c * s * bm.y_head + c * c * (n - 1),
        y_sum=s * bm.y_sum - c * n,
        y_head=s * bm.y_head - c * (n - 1),
        y_tail=s * bm.y_tail - c * (n - 1),
    )


# -- design basis, mean scaling and the global means of a run ----------------------------------

#: nilearn's ``signal_scaling`` value for scaling by the grand mean of the run.
GRAND_MEAN_SCALING = (0, 1)


def orthonormal_design(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """An orthonormal basis Q of the design's columns, its R factor (X = QR) and nilearn's df.

    Fitting in Q keeps the Gram matrix ~identity, so normal equations do not
    square the design's condition number.

    A full-rank design gets its QR factors (Q: time x p, R: p x p). A
    rank-deficient one (rank r < p at numpy's tolerance ``sum|X| * eps``, the
    rank nilearn's df uses) gets Q = U_r and R = S_r V_r' (r x p) from its
    SVD: betas mapped back with pinv(R) are then the minimum-norm solution,
    nilearn's pinv solution (the whitened design has the same null space).

    Returns
    -------
    Q : ndarray (time, rank)
    R : ndarray (rank, p)
    df_residuals : int
        n_time - rank(X).
    """
    X = np.asarray(X, dtype=np.float64)
    rank = design_rank(X)
    if rank == X.shape[1]:
        Q, R = np.linalg.qr(X)
    else:
        U, S, Vt = np.linalg.svd(X, full_matrices=False)
        Q, R = U[:, :rank], S[:rank, None] * Vt[:rank]
    return Q, R, int(X.shape[0] - rank)


def design_rank(X: np.ndarray) -> int:
    """numpy's rank of a design at nilearn's tolerance ``sum|X| * eps`` (its OLS df)."""
    X = np.asarray(X, dtype=np.float64)
    return int(np.linalg.matrix_rank(X, np.abs(X).sum() * np.finfo(float).eps))


def contrast_on_basis(r_factor: np.ndarray, con: np.ndarray) -> np.ndarray:
    """Contrast weights on X -> weights on the orthonormal basis Q (X = QR).

    With beta = R^-1 beta_Q: c beta = (R^-T c')' beta_Q, and the covariance
    maps the same way, so contrasts need no other change.
    """
    con = np.asarray(con, dtype=np.float64)
    if r_factor.shape[0] == r_factor.shape[1]:
        return np.linalg.solve(r_factor.T, np.atleast_2d(con).T).T.reshape(con.shape)
    # rank deficient (R: rank x p): c beta = c pinv(R) beta_Q, nilearn's pinv estimate
    weights = np.atleast_2d(con) @ np.linalg.pinv(r_factor)
    return weights[0] if con.ndim == 1 else weights


def is_grand_mean_scaling(signal_scaling) -> bool:
    """Whether ``signal_scaling`` asks for scaling by the grand mean, nilearn's (0, 1)."""
    return isinstance(signal_scaling, tuple | list) and tuple(signal_scaling) == GRAND_MEAN_SCALING


def scaled_block(block: np.ndarray, signal_scaling, grand_mean=None, dtype=None) -> np.ndarray:
    """nilearn's ``mean_scaling`` along time, in the data's own dtype or in ``dtype``.

    Time is never split across chunks, so a block holds whole voxel time
    series and the per-voxel mean is exact. nilearn scales the masked data
    before casting to float64; doing the same keeps results identical.
    ``grand_mean`` is the run's grand mean (``(0, 1)``) or its per time
    point means over voxels (``1``), global reductions done by the caller.
    ``dtype``: the data are first cast to it (nilearn's SurfaceMasker gives
    float64 signals, scaled in float64); the cast is the one new array, scaled
    in place.
    """
    copied = dtype is not None and np.dtype(dtype) != block.dtype
    if copied:
        # nilearn's masked data are C-ordered (time, voxel): its mean over time adds the rows one
        # by one. A block in Fortran order (dask's fancy indexing along voxels gives one) would be
        # summed pairwise instead, a different rounding of the mean that the percent-signal
        # scaling magnifies to ~1e-6 relative in every map.
        block = np.array(block, dtype=dtype, order="C")
    if signal_scaling is False or signal_scaling is None:
        return block
    out = block if copied else None  # never the caller's array
    block = np.ascontiguousarray(block)
    if is_grand_mean_scaling(signal_scaling):
        return _percent_of(block, max(grand_mean, 1.0), out)
    if signal_scaling == 1:  # per time point, by its mean over all voxels (global)
        return _percent_of(block, grand_mean[:, None], out)
    return _percent_of(block, np.maximum(block.mean(axis=0), 1), out)


def _percent_of(block: np.ndarray, divisor, out=None) -> np.ndarray:
    """``100 * (block / divisor - 1)``, the same operations and dtypes, in one new array (or in
    ``out``, the block itself when it is a copy of the caller's): the expression's two
    block-sized temporaries cost more than its arithmetic (page faults)."""
    out = np.divide(block, divisor, out=out)
    out -= 1
    out *= 100
    return out


def residual_block(X: np.ndarray, block: np.ndarray, fit: GLMFit, signal_scaling, grand_mean,
                   dtype=None) -> np.ndarray:
    """nilearn's residuals Y - X~ beta of one (time, voxel) block (the data scaled as the fit's,
    in ``dtype`` when given: :func:`scaled_block`)."""
    return scaled_block(block, signal_scaling, grand_mean, dtype).astype(np.float64) - predicted(X, fit)


def row_sums(block: np.ndarray) -> np.ndarray:
    """Sum over the voxels of a (time, voxel) block at each time point, in float64 (time,)."""
    return block.sum(axis=1, dtype=np.float64)


def row_means(sums: list, n_voxels: int) -> np.ndarray:
    """Mean over all voxels at each time point from the blocks' :func:`row_sums`, in block
    order, floored at 1 as nilearn's scaling."""
    return np.maximum(np.sum(sums, axis=0) / n_voxels, 1.0)


def sum_and_count(per_voxel_sums: np.ndarray) -> tuple[float, int]:
    """One block's part of a grand mean: the total of its per-voxel sums, and its voxels."""
    return float(per_voxel_sums.sum()), int(per_voxel_sums.size)


def grand_mean(parts: list, n_time: int) -> float:
    """Mean over every voxel of every block and every time point, from the blocks'
    :func:`sum_and_count` in block order (nilearn's grand means of the data or residuals)."""
    total = sum(part_sum for part_sum, _ in parts)
    return total / (n_time * sum(count for _, count in parts))
