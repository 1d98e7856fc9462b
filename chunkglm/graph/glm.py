"""dask plumbing for first-level fits: kernels mapped over voxel blocks.

No statistics here: the kernels (:mod:`chunkglm.kernels.glm`) do them. The
graph of one run is::

    chunk_i --block_moments--> moments_i --(ols)--> stats_i --\\
                                   |                          global grand mean (AR)
                                   '------------fit_whitened(rho_i)--> fit_i

Each chunk feeds exactly one ``block_moments`` task, and every output
(betas, contrasts, r-square, ...) depends on the moments only, so evaluating
any set of outputs together reads each chunk once. The run-level means (the
residuals' grand mean of AR models, mean scaling's grand or row means) are
tree reductions (:mod:`chunkglm.graph.reduce`) of per-block sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from chunkglm.chunking import MemoryBudget, tile_chunks
from chunkglm.errors import SingularContrastError
from chunkglm.graph.blocks import MIN_PART_BYTES, across_threads, local_threads, within_budget
from chunkglm.graph.finite import finite_blocks, finite_values
from chunkglm.graph.reduce import concat, tree_reduce
from chunkglm.kernels import ar
from chunkglm.kernels import glm as k
from chunkglm.kernels import group_ols
from chunkglm.kernels.ar import ar_order
from chunkglm.kernels.glm import is_grand_mean_scaling

__all__ = ["RunFit", "ar_order", "compute_contrasts", "contrast", "fit_run", "fit_stored",
           "log_likelihood", "nonfinite_counts", "predicted", "r_square", "residuals", "stored_mean"]


# -- task adapters: one kernel call per block (their names are the tasks' key prefixes) -----------


def _moments(X, block, signal_scaling, row_means=None, dtype=None):
    if is_grand_mean_scaling(signal_scaling):  # scaled afterwards, from the global mean
        return k.block_moments(X, block)
    return k.block_moments(X, k.scaled_block(block, signal_scaling, row_means, dtype))


def _row_sums(block):
    return [k.row_sums(block)]


def _row_means(parts, n_voxels):
    return k.row_means(concat(parts), n_voxels)


def _y_sum(moments):
    return [k.sum_and_count(moments.y_sum)]


def _e_sum(stats):
    return [k.sum_and_count(stats.e_sum)]


def _lag_e_sum(stats):
    return [k.sum_and_count(stats[1][0])]  # heads[0]: the sums of e over time


def _global_mean(parts, n_time):
    """The finalize of a grand mean (nilearn's grand means of the data or of the residuals)."""
    return k.grand_mean(concat(parts), n_time)


def _grand_mean(blocks, chunk, n_time):
    """Mean over every voxel and time point of a run: a tree reduction of per-block sums.

    The combine only joins the blocks' (sum, count) in block order, and the
    finalize sums them in that order: the same float operations as one task
    gathering every block's sums, without such a task.
    """
    return tree_reduce(blocks, chunk, concat, _global_mean, finalize_args=(n_time,))


def _binned_rho(stats, grand_mean, n_time, bins):
    return k.bin_ar1(k.yule_walker_ar1(stats, grand_mean, n_time), bins)


def _ols_stats(dm, bm):
    return k.ols_residual_stats(dm, bm)[1]


def _lag_block(Q, block, signal_scaling, order):
    return ar.lag_moments(Q, k.scaled_block(block, signal_scaling), order)


def _lag_stats(dmx, lagm):
    return ar.ols_lag_stats(dmx, lagm)[1:]


def _lag_rho(stats, grand, n_time):
    lags, heads, tails = stats
    return ar.yule_walker(lags, heads, tails, grand, n_time)


def _fit_ar_block(dmx, lagm, clusters, position, df_residuals, n_columns):
    levels, indices = clusters
    return ar.fit_ar(dmx, lagm, levels, indices[position], df_residuals, n_columns)


def _fit_arn(Q, blocks, order, bins, signal_scaling, random_state, df_residuals, n_columns):
    """The AR(N>1) graph: lag moments, OLS stats, global mean, global k-means, refits."""
    if is_grand_mean_scaling(signal_scaling) or (signal_scaling == 1 and not isinstance(signal_scaling, bool)):
        raise ValueError(f"signal_scaling={signal_scaling!r} is not available with AR(N>1) noise "
                         "models yet; use 0 or False.")
    dmx = ar.lag_moments(Q, None, order)
    lagms = [dask.delayed(_lag_block)(Q, b, signal_scaling, order) for b in blocks]
    stats = [dask.delayed(_lag_stats)(dmx, m) for m in lagms]
    grand = _grand_mean(stats, _lag_e_sum, Q.shape[0])
    rhos = [dask.delayed(_lag_rho)(s, grand, Q.shape[0]) for s in stats]
    # nilearn's global AR(N) step, an explicit pass over the (small) coefficient map
    clusters = dask.delayed(ar.cluster_ar)(rhos, bins, random_state)
    fits = [dask.delayed(_fit_ar_block)(dmx, m, clusters, i, df_residuals, n_columns)
            for i, m in enumerate(lagms)]
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
    dtype: object = None

    def to_basis(self, con: np.ndarray) -> np.ndarray:
        """Contrast weights on X -> weights on the fit's orthonormal basis Q
        (:func:`chunkglm.kernels.glm.contrast_on_basis`)."""
        return k.contrast_on_basis(self.r_factor, con)

    @property
    def n_voxels(self) -> int:
        """Voxels of the run."""
        return int(sum(self.block_sizes))


def fit_run(bold: da.Array, design, noise_model="ar1", bins=100, signal_scaling=0,
            random_state=None, budget=None, dtype=None) -> RunFit:
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
    budget : chunkglm.chunking.MemoryBudget, int, str or None
        The user's memory budget: stored chunks larger than it are split into
        task blocks (:func:`chunkglm.graph.blocks.within_budget`); None keeps them.
    dtype : numpy dtype, optional
        The dtype the data are scaled and fitted in, when not theirs (nilearn's
        SurfaceMasker gives float64 signals): each block is cast as it is read,
        inside its moments task (no block-sized copy of its own, nor a cast task).
    """
    per_voxel_scaling = signal_scaling == 0 and not isinstance(signal_scaling, bool)
    if dtype is not None and (not per_voxel_scaling or ar_order(noise_model) > 1):
        # only per-voxel scaling (nilearn's default, 0) casts inside the moments task: the
        # other modes' global sums would change rounding if summed from the uncast values
        bold, dtype = bold.astype(dtype), None
    # blocks sized in the dtype fitted (a cast block is the task's largest array)
    itemsize = None if dtype is None else np.dtype(dtype).itemsize
    bold = across_threads(within_budget(bold, budget, itemsize), itemsize)
    if len(bold.chunks[0]) != 1:
        bold = bold.rechunk({0: -1})  # time must be whole in each block
    # Fit in an orthonormal basis of the design (well conditioned normal equations).
    Q, R, df_residuals = k.orthonormal_design(design.to_numpy())
    dm = k.DesignMoments.from_design(Q)
    # nilearn's masker sets NaN/inf to 0: done once per block as it is read, with a count
    blocks, nonfinite = finite_blocks(bold.to_delayed().ravel())
    order = ar_order(noise_model)
    if order > 1:
        _, fits = _fit_arn(Q, blocks, order, bins, signal_scaling, random_state, df_residuals,
                           design.shape[1])
        return RunFit(design, fits, tuple(bold.chunks[1]), int(df_residuals), bold=bold,
                      signal_scaling=signal_scaling, basis=Q, r_factor=R, nonfinite=nonfinite, dtype=dtype)
    grand_mean = None
    if signal_scaling == 1 and not isinstance(signal_scaling, bool):
        # The row means need every block: dask keeps each loaded block for both
        # tasks, so this costs memory (the run), not a second read.
        grand_mean = tree_reduce(blocks, _row_sums, concat, _row_means, finalize_args=(bold.shape[1],))
    moments = [dask.delayed(_moments)(Q, b, signal_scaling, grand_mean, dtype) for b in blocks]
    if is_grand_mean_scaling(signal_scaling):  # one global mean (a reduction), then affine moments
        grand_mean = _grand_mean(moments, _y_sum, Q.shape[0])
        moments = [dask.delayed(k.scale_moments)(dm, bm, grand_mean) for bm in moments]
    if noise_model == "ols":
        rhos = [np.zeros(n) for n in bold.chunks[1]]
    else:
        stats = [dask.delayed(_ols_stats)(dm, bm) for bm in moments]
        grand = _grand_mean(stats, _e_sum, Q.shape[0])
        rhos = [dask.delayed(_binned_rho)(s, grand, Q.shape[0], bins) for s in stats]
    fits = [dask.delayed(k.fit_whitened)(dm, bm, rho, df_residuals, design.shape[1])
            for bm, rho in zip(moments, rhos)]
    return RunFit(design, fits, tuple(bold.chunks[1]), int(df_residuals), bold=bold,
                  signal_scaling=signal_scaling, grand_mean=grand_mean, basis=Q, r_factor=R,
                  nonfinite=nonfinite, dtype=dtype)


def fit_stored(read, design, budget=None, bold: da.Array | None = None) -> RunFit:
    """Build (not compute) the OLS fit of stored (image, voxel) maps: the second level's fit.

    The fit of :func:`fit_run` with ``noise_model="ols"`` and no scaling, in a graph whose tasks
    read their own data: one task per stored block calls ``read(i)`` and fits it in float64 slabs
    (:func:`chunkglm.kernels.group_ols.ols_fit`), so no read task can run ahead of its fit
    and hold a second block on a worker. On the local threaded scheduler with more threads than
    task blocks (a small group: one chunk), each block is read by one task and fitted in one
    part per thread, as :func:`chunkglm.graph.blocks.across_threads` splits runs.

    Parameters
    ----------
    read : picklable callable
        ``read(i)`` returns stored block ``i``, (n_images, ``read.block_sizes[i]``), any float
        dtype (:class:`chunkglm.io.stored_blocks.StoredBlocks`); ``read.shape`` is (n_images, n_voxels).
    design : pandas.DataFrame of shape (n_images, n_regressors)
    budget : chunkglm.chunking.MemoryBudget, int, str or None
        Stored blocks larger than the budget's block give several fits (task blocks within the
        budget) from their one read; None keeps one fit per stored block.
    bold : dask array (n_images, n_voxels), optional
        The same maps as a dask array, for :func:`residuals` (which reads them again).
    """
    n_images = read.shape[0]
    if len(design) != n_images:
        raise ValueError(f"the design has {len(design)} rows, the maps {n_images} images")
    Q, R, df_residuals = k.orthonormal_design(design.to_numpy())
    tiles, split = _stored_tiles(read, budget, 4 if bold is None else bold.dtype.itemsize)
    fits, counts, fit_args = [], [], (Q, int(df_residuals), design.shape[1])
    for index, sizes in enumerate(tiles):
        if split:  # local threads: one read task, its parts fitted in parallel
            block = dask.delayed(read)(index)
            pairs = [dask.delayed(_fit_parts, nout=2)(block, [part], *fit_args) for part in _offsets(sizes)]
            fits += [pair[0] for pair in pairs]
            counts += [pair[1] for pair in pairs]
        else:
            outputs = dask.delayed(_read_and_fit, nout=2 * len(sizes))(read, index, sizes, *fit_args)
            fits += [outputs[i] for i in range(len(sizes))]
            counts += [outputs[len(sizes) + i] for i in range(len(sizes))]
    block_sizes = tuple(size for sizes in tiles for size in sizes)
    if bold is not None:
        bold = bold.rechunk({0: -1, 1: block_sizes})
    return RunFit(design, fits, block_sizes, int(df_residuals), bold=bold, signal_scaling=False, basis=Q,
                  r_factor=R, nonfinite=counts)


def _stored_tiles(read, budget, itemsize) -> tuple[list, bool]:
    """Per stored block, its task blocks: within the budget, and split into parts of at least
    MIN_PART_BYTES for idle local threads (then True)."""
    n_images = read.shape[0]
    tiles = [(size,) for size in read.block_sizes]
    if budget is not None:
        max_block = MemoryBudget.of(budget).max_block_voxels(n_images, itemsize)
        tiles = [tile_chunks(sizes, max_block) for sizes in tiles]
    threads, n_tiles = local_threads(), sum(len(sizes) for sizes in tiles)
    if threads <= n_tiles:
        return tiles, False
    min_voxels = max(1, MIN_PART_BYTES // (itemsize * max(n_images, 1)))
    part = max(min_voxels, -(-max(max(sizes) for sizes in tiles) // -(-threads // n_tiles)))
    split = [tile_chunks(sizes, part) for sizes in tiles]
    return split, split != tiles


def _offsets(sizes):
    """(start, stop) of consecutive parts of these sizes."""
    bounds = np.cumsum((0, *sizes))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _fit_parts(block, bounds, Q, df_residuals, n_columns):
    """Fits of the parts ``bounds`` ((start, stop) voxel ranges) of one block, then their non-finite counts."""
    outputs = [group_ols.ols_fit(Q, block[:, a:b], df_residuals, n_columns) for a, b in bounds]
    return (*[fit for fit, _ in outputs], *[count for _, count in outputs])


def _read_and_fit(read, index, sizes, Q, df_residuals, n_columns):
    """One stored block read and fitted: its task blocks' fits, then their non-finite counts."""
    return _fit_parts(read(index), _offsets(sizes), Q, df_residuals, n_columns)


def stored_mean(read) -> np.ndarray:
    """Mean over the images of stored (image, voxel) maps, in float64: (voxel,). One task per
    stored block reads it and averages it (:func:`chunkglm.kernels.group_ols.column_means`)."""
    parts = [dask.delayed(_read_and_average)(read, index) for index in range(len(read.block_sizes))]
    return np.concatenate(dask.compute(*parts)) if parts else np.zeros(0)


def _read_and_average(read, index):
    return group_ols.column_means(read(index))


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
    if stat_type == "F":
        rank = np.linalg.matrix_rank(np.atleast_2d(con))
        if rank < q:  # c cov c' is singular at every voxel
            raise SingularContrastError(
                f"Singular matrix: the F contrast's {q} rows span {rank} dimension(s) of the design "
                f"(its rows, on the design's estimable part, are linearly dependent). Drop the dependent "
                "rows.")
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


def log_likelihood(run: RunFit) -> da.Array:
    """Lazy log-likelihood (voxel,) of each voxel's whitened fit: from the fits, no second read."""
    n_time, n_columns = len(run.basis), run.design.shape[1]
    parts = [da.from_delayed(dask.delayed(k.log_likelihood)(fit, n_time, n_columns), shape=(n,), dtype=np.float64)
             for fit, n in zip(run.fits, run.block_sizes)]
    return da.concatenate(parts)


def predicted(run: RunFit) -> da.Array:
    """Lazy predicted values (time, voxel): from the fits, no read of the data."""
    X = run.basis  # X beta = Q beta_Q
    parts = [da.from_delayed(dask.delayed(k.predicted)(X, fit), shape=(len(X), n), dtype=np.float64)
             for fit, n in zip(run.fits, run.block_sizes)]
    return da.concatenate(parts, axis=1)


def residuals(run: RunFit) -> da.Array:
    """Lazy residuals Y - X~ beta (time, voxel), as nilearn: reads the data again."""
    X = run.basis
    blocks = finite_values(run.bold).to_delayed().ravel()
    parts = [da.from_delayed(dask.delayed(k.residual_block)(X, b, fit, run.signal_scaling, run.grand_mean,
                                                            run.dtype), shape=(len(X), n), dtype=np.float64)
             for b, fit, n in zip(blocks, run.fits, run.block_sizes)]
    return da.concatenate(parts, axis=1)


# -- evaluation: what the models hold are numpy results ---------------------------------------


def compute_contrasts(runs_and_contrasts: list, stat_type: str) -> list:
    """Effect ((q,) voxel) and variance (voxel,) of a contrast on each run, in one evaluation.

    Parameters
    ----------
    runs_and_contrasts : list of (RunFit, ndarray)
    stat_type : {"t", "F"}

    Returns
    -------
    list of (ndarray, ndarray), one per run
    """
    return list(dask.compute(*[contrast(run, con, stat_type) for run, con in runs_and_contrasts]))


def nonfinite_counts(runs: list) -> list:
    """Per run, the per-block numbers of voxels that held NaN/inf (from the fits' own reads
    once the fits are persisted)."""
    return dask.compute([run.nonfinite for run in runs])[0]


def gathered_fits(run: RunFit) -> list:
    """The per-block :class:`~chunkglm.kernels.glm.GLMFit` of a (persisted) run, here.

    Small per block (betas, dispersions, AR levels): what nilearn's ``labels_``
    and ``results_`` hold for the whole run.
    """
    return list(dask.compute(*run.fits))
