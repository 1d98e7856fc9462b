"""dask plumbing for first-level fits: kernels mapped over voxel blocks.

No statistics here: the kernels (:mod:`chunkglm.kernels.glm`) do them. The
graph of one run is::

    chunk_i --block_moments--> moments_i --(ols)--> stats_i --\\
                                   |                          global grand mean (AR)
                                   '------------fit_whitened(rho_i)--> fit_i

Each chunk feeds exactly one ``block_moments`` task, and every output
(betas, contrasts, r-square, ...) depends on the moments only, so evaluating
any set of outputs together reads each chunk once.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from chunkglm.graph.finite import finite_blocks, finite_values
from chunkglm.kernels import glm as k


GRAND_MEAN_SCALING = (0, 1)


def scaled_block(block: np.ndarray, signal_scaling, grand_mean=None) -> np.ndarray:
    """nilearn's ``mean_scaling`` along time, in the data's own dtype.

    Time is never split across chunks, so a block holds whole voxel time
    series and the per-voxel mean is exact. nilearn scales the masked data
    before casting to float64; doing the same keeps results identical.
    """
    if signal_scaling is False or signal_scaling is None:
        return block
    if _is_grand(signal_scaling):
        return 100 * (block / max(grand_mean, 1.0) - 1)
    if signal_scaling == 1:  # per time point, by its mean over all voxels (global)
        return 100 * (block / grand_mean[:, None] - 1)
    mean = np.maximum(block.mean(axis=0), 1)
    return 100 * (block / mean - 1)


def _is_grand(signal_scaling) -> bool:
    return isinstance(signal_scaling, tuple | list) and tuple(signal_scaling) == GRAND_MEAN_SCALING


def _moments(X, block, signal_scaling, row_means=None):
    if _is_grand(signal_scaling):  # scaled afterwards, from the global mean
        return k.block_moments(X, block)
    return k.block_moments(X, scaled_block(block, signal_scaling, row_means))


def _row_sums(block):
    return block.sum(axis=1, dtype=np.float64)


def _row_means(sums, n_voxels):
    """Mean over all voxels at each time point, floored at 1 as nilearn's scaling."""
    return np.maximum(np.sum(sums, axis=0) / n_voxels, 1.0)


def _global_mean(per_voxel_sums, n_time):
    """Mean over every voxel of every block and every time point, from per-voxel sums
    (a global reduction: nilearn's grand means of the data or of the residuals)."""
    total = sum(float(sums.sum()) for sums in per_voxel_sums)
    return total / (n_time * sum(sums.size for sums in per_voxel_sums))



def _binned_rho(stats, grand_mean, n_time, bins):
    return k.bin_ar1(k.yule_walker_ar1(stats, grand_mean, n_time), bins)


def _ols_stats(dm, bm):
    return k.ols_residual_stats(dm, bm)[1]


def ar_order(noise_model: str) -> int:
    """0 for "ols", N for "arN"; anything else is refused."""
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


def _lag_block(Q, block, signal_scaling, order):
    from chunkglm.kernels import ar

    return ar.lag_moments(Q, scaled_block(block, signal_scaling), order)


def _lag_stats(dmx, lagm):
    from chunkglm.kernels import ar

    return ar.ols_lag_stats(dmx, lagm)[1:]


def _lag_rho(stats, grand, n_time):
    from chunkglm.kernels import ar

    lags, heads, tails = stats
    return ar.yule_walker(lags, heads, tails, grand, n_time)



def cluster_ar(rhos, bins, random_state):
    """nilearn's global AR(N) step: k-means over every voxel's coefficients.

    Returns (levels, per-block level indices). As in nilearn, voxels are
    grouped by their centre rounded to 2 decimals, and each group is refit
    with the centre of its first voxel.
    """
    from sklearn.cluster import KMeans

    coefs = np.concatenate(rhos)
    kmeans = KMeans(n_clusters=min(bins, len(coefs)), n_init=10, random_state=random_state).fit(coefs)
    centres = kmeans.cluster_centers_[kmeans.labels_]
    names = np.array(["_".join(map(str, np.round(c, 2))) for c in kmeans.cluster_centers_])[kmeans.labels_]
    unique, first, index = np.unique(names, return_index=True, return_inverse=True)
    levels = centres[first]
    bounds = np.cumsum([0] + [len(r) for r in rhos])
    return levels, [index[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _fit_ar_block(dmx, lagm, clusters, position, df_residuals):
    from chunkglm.kernels import ar

    levels, indices = clusters
    return ar.fit_ar(dmx, lagm, levels, indices[position], df_residuals)


def _fit_arn(Q, blocks, order, bins, signal_scaling, random_state, df_residuals):
    """The AR(N>1) graph: lag moments, OLS stats, global mean, global k-means, refits."""
    from chunkglm.kernels import ar

    if _is_grand(signal_scaling) or (signal_scaling == 1 and not isinstance(signal_scaling, bool)):
        raise ValueError(f"signal_scaling={signal_scaling!r} is not available with AR(N>1) noise "
                         "models yet; use 0 or False.")
    dmx = ar.lag_moments(Q, None, order)
    lagms = [dask.delayed(_lag_block)(Q, b, signal_scaling, order) for b in blocks]
    stats = [dask.delayed(_lag_stats)(dmx, m) for m in lagms]
    grand = dask.delayed(_global_mean)([s[1][0] for s in stats], Q.shape[0])  # sums of e
    rhos = [dask.delayed(_lag_rho)(s, grand, Q.shape[0]) for s in stats]
    clusters = dask.delayed(cluster_ar)(rhos, bins, random_state)
    fits = [dask.delayed(_fit_ar_block)(dmx, m, clusters, i, df_residuals) for i, m in enumerate(lagms)]
    return lagms, fits


@dataclass
class RunFit:
    """The lazy fit of one run: one delayed :class:`GLMFit` per voxel block.

    Attributes
    ----------
    design : pandas.DataFrame
    fits : list of dask.delayed.Delayed
        GLMFit per block, in voxel order.
    block_sizes : tuple of int
        Voxels per block.
    df_residuals : int
        n_time - rank(design).
    """

    design: object
    fits: list
    block_sizes: tuple
    df_residuals: int
    bold: da.Array = None
    signal_scaling: object = 0
    grand_mean: object = None
    basis: np.ndarray = None
    r_factor: np.ndarray = None
    lazy_fits: list = None
    nonfinite: list = None

    def to_basis(self, con: np.ndarray) -> np.ndarray:
        """Contrast weights on X -> weights on the fit's orthonormal basis Q.

        With X = QR and beta = R^-1 beta_Q: c beta = (R^-T c')' beta_Q, and the
        covariance maps the same way, so contrasts need no other change.
        """
        con = np.asarray(con, dtype=np.float64)
        return np.linalg.solve(self.r_factor.T, np.atleast_2d(con).T).T.reshape(con.shape)

    @property
    def n_voxels(self) -> int:
        """Voxels of the run."""
        return int(sum(self.block_sizes))


def fit_run(bold: da.Array, design, noise_model="ar1", bins=100, signal_scaling=0,
            random_state=None) -> RunFit:
    """Build (not compute) the fit of one run.

    Parameters
    ----------
    bold : dask array of shape (n_time, n_voxels)
        Chunked along voxels only.
    design : pandas.DataFrame of shape (n_time, n_regressors)
    noise_model : {"ols", "ar1", "arN"}
    bins : int
        AR(1) coefficient bins / AR(N>1) k-means clusters (nilearn's default 100).
    signal_scaling : False, 0 or (0, 1)
        nilearn's mean scaling: 0 along time per voxel (exact within a
        block); (0, 1) by the grand mean of the run (a global reduction,
        applied to the moments).
    random_state : int, optional
        Seed of the AR(N>1) k-means, as nilearn's.
    """
    if len(bold.chunks[0]) != 1:
        bold = bold.rechunk({0: -1})  # time must be whole in each block
    X = np.asarray(design.to_numpy(), dtype=np.float64)
    df_residuals = X.shape[0] - np.linalg.matrix_rank(X, np.abs(X).sum() * np.finfo(float).eps)
    # Fit in an orthonormal basis of the design: its Gram matrix is ~identity,
    # so normal equations do not square the design's condition number.
    Q, R = np.linalg.qr(X)
    dm = k.DesignMoments.from_design(Q)
    # nilearn's masker sets NaN/inf to 0: done once per block as it is read, with a count
    blocks, nonfinite = finite_blocks(bold.to_delayed().ravel())
    order = ar_order(noise_model)
    if order > 1:
        _, fits = _fit_arn(Q, blocks, order, bins, signal_scaling, random_state, df_residuals)
        return RunFit(design, fits, tuple(bold.chunks[1]), int(df_residuals), bold=bold,
                      signal_scaling=signal_scaling, basis=Q, r_factor=R, nonfinite=nonfinite)
    grand_mean = None
    if signal_scaling == 1 and not isinstance(signal_scaling, bool):
        # The row means need every block: dask keeps each loaded block for both
        # tasks, so this costs memory (the run), not a second read.
        grand_mean = dask.delayed(_row_means)([dask.delayed(_row_sums)(b) for b in blocks],
                                               bold.shape[1])
    moments = [dask.delayed(_moments)(Q, b, signal_scaling, grand_mean) for b in blocks]
    if _is_grand(signal_scaling):  # one global mean (a reduction), then affine moments
        grand_mean = dask.delayed(_global_mean)([bm.y_sum for bm in moments], Q.shape[0])
        moments = [dask.delayed(k.scale_moments)(dm, bm, grand_mean) for bm in moments]
    if noise_model == "ols":
        rhos = [np.zeros(n) for n in bold.chunks[1]]
    else:
        stats = [dask.delayed(_ols_stats)(dm, bm) for bm in moments]
        grand = dask.delayed(_global_mean)([s.e_sum for s in stats], Q.shape[0])
        rhos = [dask.delayed(_binned_rho)(s, grand, Q.shape[0], bins) for s in stats]
    fits = [dask.delayed(k.fit_whitened)(dm, bm, rho, df_residuals) for bm, rho in zip(moments, rhos)]
    return RunFit(design, fits, tuple(bold.chunks[1]), int(df_residuals), bold=bold,
                  signal_scaling=signal_scaling, grand_mean=grand_mean, basis=Q, r_factor=R,
                  nonfinite=nonfinite)


def _t_block(fit, con):
    effect, variance = k.contrast_t(fit, con)
    return np.stack([effect, variance])


def _f_block(fit, con):
    effect, variance, _ = k.contrast_f(fit, con)
    return np.concatenate([effect, variance[None]])


def contrast(run: RunFit, con: np.ndarray, stat_type: str) -> tuple[da.Array, da.Array]:
    """Lazy effect ((q,) voxel) and variance (voxel,) of a contrast on one run."""
    q = 1 if stat_type == "t" else np.atleast_2d(con).shape[0]
    fn = _t_block if stat_type == "t" else _f_block
    con = run.to_basis(con)
    parts = [da.from_delayed(dask.delayed(fn)(fit, con), shape=(q + 1, n), dtype=np.float64)
             for fit, n in zip(run.fits, run.block_sizes)]
    stacked = da.concatenate(parts, axis=1)
    return stacked[:q], stacked[q]


def _fit_r_square(fit):
    return fit.r_square


def r_square(run: RunFit) -> da.Array:
    """Lazy r-square (voxel,): computed with each block's fit, no second read."""
    parts = [da.from_delayed(dask.delayed(_fit_r_square)(fit), shape=(n,), dtype=np.float64)
             for fit, n in zip(run.fits, run.block_sizes)]
    return da.concatenate(parts)


def predicted(run: RunFit) -> da.Array:
    """Lazy predicted values (time, voxel): from the fits, no read of the data."""
    X = run.basis  # X beta = Q beta_Q
    parts = [da.from_delayed(dask.delayed(k.predicted)(X, fit), shape=(len(X), n), dtype=np.float64)
             for fit, n in zip(run.fits, run.block_sizes)]
    return da.concatenate(parts, axis=1)


def _residual_block(X, block, fit, signal_scaling, grand_mean):
    return scaled_block(block, signal_scaling, grand_mean).astype(np.float64) - k.predicted(X, fit)


def residuals(run: RunFit) -> da.Array:
    """Lazy residuals Y - X~ beta (time, voxel), as nilearn: reads the data again."""
    X = run.basis
    blocks = finite_values(run.bold).to_delayed().ravel()
    parts = [da.from_delayed(dask.delayed(_residual_block)(X, b, fit, run.signal_scaling, run.grand_mean),
                             shape=(len(X), n), dtype=np.float64)
             for b, fit, n in zip(blocks, run.fits, run.block_sizes)]
    return da.concatenate(parts, axis=1)
