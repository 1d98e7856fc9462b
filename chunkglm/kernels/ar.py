"""AR(N) first-level kernels (N >= 1) from lag moments, exactly as nilearn.

nilearn whitens with x~_t = x_t - sum_i rho_i x_{t-i-1} (each lag only where
t-i-1 >= 0). Writing a = (1, -rho_0, ..., -rho_{N-1}),

    X~'W y = sum_{j,k} a_j a_k C_jk,   C_jk = sum_{t >= max(j,k)} x_{t-j} y_{t-k}'

C_j0 and C_0k take 2N+1 GEMMs per block; the others follow by removing one
outer product each (C_{j+1,k+1} = C_jk - x_{n-1-j} y_{n-1-k}'). The same holds
for X'X (D_jk) and, per voxel, for y'y (S_jk). Shapes: (time, voxel) data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from chunkglm.kernels.glm import GLMFit, solve_gram


def ar_order(noise_model: str) -> int:
    """0 for "ols", N for "arN"; anything else is refused (ValueError)."""
    if noise_model == "ols":
        return 0
    try:
        order = int(noise_model[2:]) if noise_model.startswith("ar") else -1
    except ValueError:
        order = -1
    if order < 1:
        raise ValueError(f"noise_model must be 'ols' or 'arN' with N >= 1 (e.g. 'ar1', 'ar3'); "
                         f"received {noise_model!r}.")
    return order


@dataclass(frozen=True)
class LagMoments:
    """Lag moments of X with Y (or X with X), orders 0..N, and partial sums.

    ``cross[j][k]`` is C_jk (p, voxel) -- or D_jk (p, p) for the design;
    ``auto[j][k]`` is S_jk (voxel,) for data (None for the design);
    ``head[k]`` = sum_{t < n-k} y_t and ``tail[k]`` = sum_{t >= k} y_t;
    ``x_head[k]`` / ``x_tail[k]`` the same for X (p,).
    """

    cross: list
    auto: list | None
    head: list
    tail: list
    x_head: list
    x_tail: list
    n_time: int
    order: int


def lag_moments(X: np.ndarray, Y: np.ndarray | None, order: int) -> LagMoments:
    """One pass over a block (Y) or over the design itself (Y None)."""
    X = np.asarray(X, dtype=np.float64)
    Z = X if Y is None else np.asarray(Y, dtype=np.float64)
    n, size = X.shape[0], order + 1
    cross = [[None] * size for _ in range(size)]
    for d in range(size):
        cross[d][0] = X[: n - d].T @ Z[d:]
        cross[0][d] = X[d:].T @ Z[: n - d]
    for j in range(size - 1):
        for k in range(size - 1):
            if j == 0 or k == 0:
                _fill_diagonal(cross, X, Z, j, k, n)
    auto = None if Y is None else _auto(Z, size, n)
    head = [Z[: n - k].sum(0) for k in range(size)]
    tail = [Z[k:].sum(0) for k in range(size)]
    x_head = [X[: n - k].sum(0) for k in range(size)]
    x_tail = [X[k:].sum(0) for k in range(size)]
    return LagMoments(cross, auto, head, tail, x_head, x_tail, n, order)


def _fill_diagonal(cross, X, Z, j, k, n):
    """C_{j+m,k+m} from C_jk by removing the last outer products."""
    while j + 1 < len(cross) and k + 1 < len(cross):
        cross[j + 1][k + 1] = cross[j][k] - np.outer(X[n - 1 - j], Z[n - 1 - k])
        j, k = j + 1, k + 1


def _auto(Y, size, n):
    auto = [[None] * size for _ in range(size)]
    for d in range(size):
        auto[d][0] = auto[0][d] = np.einsum("tv,tv->v", Y[: n - d], Y[d:])
    for d in range(size):
        j, k = d, 0
        while j + 1 < size:
            auto[j + 1][k + 1] = auto[j][k] - Y[n - 1 - j] * Y[n - 1 - k]
            auto[k + 1][j + 1] = auto[j + 1][k + 1]
            j, k = j + 1, k + 1
    return auto


def ols_lag_stats(dmx: LagMoments, dmy: LagMoments):
    """OLS betas and, per lag k, sum_t e_t e_{t+k} and the partial sums of e."""
    beta = solve_gram(dmx.cross[0][0]) @ dmy.cross[0][0]
    lags = []
    for k in range(dmy.order + 1):
        xy = np.einsum("pv,pv->v", beta, dmy.cross[k][0] + dmy.cross[0][k])
        xx = np.einsum("pv,pq,qv->v", beta, dmx.cross[k][0], beta)
        lags.append(dmy.auto[0][k] - xy + xx)
    heads = [dmy.head[k] - dmx.x_head[k] @ beta for k in range(dmy.order + 1)]
    tails = [dmy.tail[k] - dmx.x_tail[k] @ beta for k in range(dmy.order + 1)]
    return beta, lags, heads, tails


def yule_walker(lags, heads, tails, grand_mean: float, n: int) -> np.ndarray:
    """nilearn's ``_yule_walker(e, order)`` per voxel: rho of shape (voxel, order)."""
    order = len(lags) - 1
    r = np.stack([(lags[k] - grand_mean * (heads[k] + tails[k]) + (n - k) * grand_mean**2)
                  / ((n - k) * n) for k in range(order + 1)], axis=1)
    toeplitz = r[:, np.abs(np.arange(order)[:, None] - np.arange(order)[None, :])]
    return np.linalg.solve(toeplitz, r[:, 1:, None])[..., 0]


def _weights(rho: np.ndarray) -> np.ndarray:
    """a = (1, -rho_0, ..., -rho_{N-1}) for each row of rho (levels, N)."""
    return np.concatenate([np.ones((rho.shape[0], 1)), -rho], axis=1)


def fit_ar(dmx: LagMoments, dmy: LagMoments, levels: np.ndarray, level_index: np.ndarray,
           df_residuals: int, n_columns: int | None = None) -> GLMFit:
    """Refit every voxel under its AR(N) level (cluster centre), vectorised.

    ``n_columns``: the design's column count (see :func:`chunkglm.kernels.glm.fit_whitened`)."""
    a = _weights(np.atleast_2d(levels))  # (level, N+1)
    size = a.shape[1]
    grams = np.stack([sum(a[l, j] * a[l, k] * dmx.cross[j][k] for j in range(size) for k in range(size))
                      for l in range(len(a))])
    cov = np.stack([solve_gram(g) for g in grams])
    av = a[level_index]  # (voxel, N+1)
    xwy = sum(av[:, j] * av[:, k] * dmy.cross[j][k] for j in range(size) for k in range(size))
    wyy = sum(av[:, j] * av[:, k] * dmy.auto[j][k] for j in range(size) for k in range(size))
    beta = np.einsum("vpq,qv->pv", cov[level_index], xwy)
    sse = wyy - np.einsum("pv,pv->v", beta, xwy)
    dispersion = sse / (dmx.n_time - (dmx.cross[0][0].shape[0] if n_columns is None else n_columns))
    fit = GLMFit(beta, dispersion, np.asarray(levels)[level_index], np.asarray(levels), level_index,
                 cov, df_residuals)
    return replace(fit, r_square=r_square(dmx, dmy, fit))


def r_square(dmx: LagMoments, dmy: LagMoments, fit: GLMFit) -> np.ndarray:
    """nilearn's var(X~ beta) / var(W y) for AR(N) fits, from lag moments (voxel,)."""
    n, size = dmx.n_time, dmx.order + 1
    a = _weights(np.atleast_2d(fit.levels))[fit.level_index]  # (voxel, N+1)
    grams = np.linalg.inv(fit.cov)  # X~'X~ per level (fit.cov holds their inverses)
    gram_beta = np.einsum("vpq,qv->pv", grams[fit.level_index], fit.beta)
    pred_sq = np.einsum("pv,pv->v", fit.beta, gram_beta)
    pred_sum = sum(a[:, k] * (dmx.x_head[k] @ fit.beta) for k in range(size))
    wyy = sum(a[:, j] * a[:, k] * dmy.auto[j][k] for j in range(size) for k in range(size))
    wy_sum = sum(a[:, k] * dmy.head[k] for k in range(size))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pred_sq / n - (pred_sum / n) ** 2) / (wyy / n - (wy_sum / n) ** 2)


def cluster_ar(rhos: list, bins: int, random_state) -> tuple[np.ndarray, list]:
    """nilearn's global AR(N) step: k-means over every voxel's coefficients.

    Parameters
    ----------
    rhos : list of ndarray (voxel, N)
        Each voxel block's Yule-Walker coefficients, in voxel order.
    bins : int
        Clusters (nilearn's ``bins``), at most one per voxel.
    random_state : int, RandomState or None
        KMeans' seed, as nilearn's.

    Returns
    -------
    levels : ndarray (n_levels, N)
    indices : list of ndarray of int
        Per block, each voxel's level. As in nilearn, voxels are grouped by
        their centre rounded to 2 decimals, and each group is refit with the
        centre of its first voxel.
    """
    # scikit-learn is imported here, not with the module: it is heavy (~70 MiB) and only this
    # global pass of AR(N>1) models needs it, while every worker imports these kernels.
    from sklearn.cluster import KMeans

    coefs = np.concatenate(rhos)
    kmeans = KMeans(n_clusters=min(bins, len(coefs)), n_init=10, random_state=random_state).fit(coefs)
    centres = kmeans.cluster_centers_[kmeans.labels_]
    names = np.array(["_".join(map(str, np.round(c, 2))) for c in kmeans.cluster_centers_])[kmeans.labels_]
    unique, first, index = np.unique(names, return_index=True, return_inverse=True)
    levels = centres[first]
    bounds = np.cumsum([0] + [len(r) for r in rhos])
    return levels, [index[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
