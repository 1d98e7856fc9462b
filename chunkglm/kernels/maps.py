"""Region signals from probabilistic maps: pure numpy kernels on voxel blocks.

nilearn's ``img_to_signals_maps`` solves the least-squares problem
``maps @ X.T ~= data`` over the masked voxels (``scipy.linalg.lstsq``).
Summed over voxel blocks, the normal equations need only
``G = maps.T @ maps`` (regions x regions, once per atlas) and
``B = maps.T @ data.T`` (regions x time, per run); the solve then happens on
these small matrices. Shapes are explicit: data blocks are ``(time, voxel)``,
maps blocks ``(voxel, region)``, dense or scipy sparse (probabilistic maps
are mostly zero: sparse blocks cost their non-zero values only). Products
are accumulated in float64.
Also here: nilearn's high-variance confounds in two passes over blocks, and
the cleaning of the small (time, region) signals with nilearn's ``clean``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse


#: Voxels converted to float64 at a time inside a block (bounds the temporaries:
#: 8192 voxels x 1,024 maps x 8 bytes = 64 MiB).
SLAB = 8192
#: Dense maps blocks with at most this fraction of non-zero values take the sparse path.
SPARSE_DENSITY = 0.1
#: Voxels of data converted at a time on the sparse path (a cache-sized (voxel, time) slab).
SPARSE_SLAB = 1024


def maps_gram(maps_block: np.ndarray) -> np.ndarray:
    """``maps.T @ maps`` of one block, float64, shape (region, region)."""
    return maps_moments(maps_block, None, with_gram=True)


def maps_projection(maps_block: np.ndarray, data_block: np.ndarray) -> np.ndarray:
    """``maps.T @ data.T`` of one block, float64, shape (region, time)."""
    return maps_moments(maps_block, data_block, with_gram=False)


def maps_moments(maps_block: np.ndarray, data_block, with_gram: bool = True) -> np.ndarray:
    """``[maps.T @ maps | maps.T @ data.T]`` of one block, float64.

    Probabilistic maps are mostly zero: a sparse block (or a dense one with at
    most :data:`SPARSE_DENSITY` non-zero values) costs only its non-zero
    values, and the data of voxels no map covers are never converted (they
    add 0). Dense blocks are converted to float64 one slab of voxels at a
    time, once for all products (the Gram matrix by a symmetric rank-k
    update: half the flops of a general product). Sums are float64 either
    way. Non-finite data count as 0 (nilearn's ``ensure_finite``).

    Parameters
    ----------
    maps_block : ndarray or scipy sparse matrix of shape (voxel, region)
    data_block : ndarray of shape (time, voxel), a list of them (several runs'
        blocks of the same voxels; their products are joined along time), or None
    with_gram : bool

    Returns
    -------
    ndarray of shape (region, region * with_gram + total time)
    """
    runs = [] if data_block is None else list(data_block) if isinstance(data_block, list | tuple) else [data_block]
    if not scipy.sparse.issparse(maps_block):
        maps_block = np.asarray(maps_block)
        if np.count_nonzero(maps_block) <= SPARSE_DENSITY * maps_block.size:
            maps_block = scipy.sparse.csr_matrix(maps_block)
    if scipy.sparse.issparse(maps_block):
        return _sparse_moments(scipy.sparse.csr_matrix(maps_block), runs, with_gram)
    n_regions = maps_block.shape[1]
    gram = np.zeros((n_regions, n_regions), order="F") if with_gram else None
    products = [np.zeros((n_regions, run.shape[0])) for run in runs]
    for start in range(0, maps_block.shape[0], SLAB):
        maps = np.asarray(maps_block[start:start + SLAB], dtype=np.float64)
        if with_gram:
            gram = scipy.linalg.blas.dsyrk(1.0, maps, beta=1.0, c=gram, trans=1, overwrite_c=1)
        for run, product in zip(runs, products):
            data = np.asarray(run[:, start:start + SLAB], dtype=np.float64)
            if not np.isfinite(data).all():
                data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
            product += (data @ maps).T  # (time, voxel) @ (voxel, region): one plain GEMM
    if with_gram:
        products.insert(0, np.triu(gram) + np.triu(gram, 1).T)  # dsyrk fills the upper triangle
    return np.hstack(products) if products else np.zeros((n_regions, 0))


def _sparse_moments(maps, runs: list, with_gram: bool) -> np.ndarray:
    """:func:`maps_moments` of a CSR (voxel, region) block: float64 sums over its non-zeros."""
    maps = maps.astype(np.float64)
    n_regions = maps.shape[1]
    parts = [(maps.T @ maps).toarray()] if with_gram else []
    covered = np.flatnonzero(np.diff(maps.indptr))  # voxels of some map: the others add 0
    for run in runs:
        product = np.zeros((n_regions, run.shape[0]))
        for start in range(0, covered.size, SPARSE_SLAB):
            voxels = covered[start:start + SPARSE_SLAB]
            # (voxel, time) float64 rows: each voxel's series contiguous for the sparse product
            data = np.asarray(_columns(run, voxels).T, dtype=np.float64, order="C")
            if not np.isfinite(data).all():
                data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
            product += maps[voxels].T @ data  # (region, voxel) sparse @ (voxel, time)
        parts.append(product)
    return np.hstack(parts) if parts else np.zeros((n_regions, 0))


def _columns(run: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """``run[:, voxels]``: a view when the (sorted) voxels are one contiguous range."""
    if voxels.size and voxels[-1] - voxels[0] + 1 == voxels.size:
        return run[:, voxels[0]:voxels[-1] + 1]
    return np.take(run, voxels, axis=1)


def volume_products(maps, volumes) -> np.ndarray:
    """``maps.T @ data.T`` (region, time), float64, of a run given volume by volume.

    For runs read in time order (a NIfTI file): each volume's values at the
    maps' voxels give one column. Non-finite data count as 0.

    Parameters
    ----------
    maps : scipy sparse matrix or ndarray (voxel, region)
    volumes : iterable of ndarray (voxel,)
    """
    maps_t = (scipy.sparse.csr_matrix(maps.T, dtype=np.float64) if scipy.sparse.issparse(maps)
              else np.asarray(maps, dtype=np.float64).T)
    columns = []
    for values in volumes:
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        columns.append(maps_t @ values)
    return np.column_stack(columns) if columns else np.zeros((maps.shape[1], 0))


def solve_region_signals(gram: np.ndarray, projection: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Region signals (time, region) from the summed normal equations.

    ``scipy.linalg.lstsq(G, B)`` returns the minimum-norm solution of
    ``G X = B``. Because ``B = M.T Y`` lies in the range of ``G = M.T M``, it
    equals ``pinv(M) Y``: nilearn's ``lstsq(M, Y)`` solution, including its
    minimum-norm answer when maps are collinear or empty (an all-zero map
    gives a zero signal, as in nilearn).

    Parameters
    ----------
    gram : ndarray (region, region)
    projection : ndarray (region, time)
    dtype : numpy dtype
        nilearn solves in the common type of maps and data (float32 for
        float32 inputs); the result is cast to it so that the cleaning that
        follows runs in the same precision.
    """
    if gram.shape[0] == 0:
        return np.zeros((projection.shape[1], 0), dtype=dtype)
    solution = scipy.linalg.lstsq(gram, projection)[0]
    return np.ascontiguousarray(solution.T).astype(dtype, copy=False)


def reconstruct(region_signals: np.ndarray, maps_block: np.ndarray) -> np.ndarray:
    """Voxel signals (time, voxel) of one block: ``signals @ maps.T`` (nilearn's inverse)."""
    return np.dot(region_signals, np.asarray(maps_block).T)


# -- high-variance confounds (nilearn.signal.high_variance_confounds, in two passes) -----


def detrended_mean_squares(data_block: np.ndarray) -> np.ndarray:
    """Per voxel, the mean of squares of the linearly detrended series (voxel,).

    nilearn's own ``_detrend`` and ``_mean_of_squares`` on the block: both act
    column by column, so a block gives the same numbers as the whole image.
    """
    from nilearn.signal import _detrend, _mean_of_squares

    return _mean_of_squares(_detrend(np.asarray(data_block)))


def selected_gram(data_block: np.ndarray, mean_squares: np.ndarray, threshold: float) -> np.ndarray:
    """``S @ S.T`` (time, time) over the block's voxels above ``threshold``, float64.

    ``S`` holds the detrended series of the selected voxels, as nilearn's.
    """
    from nilearn.signal import _detrend

    keep = np.asarray(mean_squares) > threshold
    if not keep.any():
        n = data_block.shape[0]
        return np.zeros((n, n))
    series = np.asarray(_detrend(np.asarray(data_block)[:, keep]), dtype=np.float64)
    return series @ series.T


def variance_threshold(mean_squares: np.ndarray, n_outside: int = 0, percentile: float = 2.0) -> float:
    """nilearn's threshold: the ``100 - percentile`` percentile of all voxels' values.

    ``n_outside`` voxels of the image that are not stored (outside the
    store's mask) count as constant series (value 0), as zero voxels do in
    nilearn's image.
    """
    values = np.asarray(mean_squares)
    if n_outside:
        values = np.concatenate([values, np.zeros(n_outside, dtype=values.dtype)])
    return float(np.nanpercentile(values, 100.0 - percentile))


def high_variance_components(gram: np.ndarray, n_confounds: int = 5) -> np.ndarray:
    """The ``n_confounds`` leading eigenvectors of ``gram / n_time`` (time, n_confounds).

    As nilearn: ``eigh`` of the (time x time) matrix, columns sorted by
    decreasing eigenvalue. Eigenvectors are defined up to sign; regressing
    them out (what the maskers do) does not depend on it.
    """
    values, vectors = scipy.linalg.eigh(gram / gram.shape[0])
    order = np.argsort(values)[::-1]
    return vectors[:, order[:n_confounds]].copy()


# -- maps preparation ------------------------------------------------------------------


def counted_in_overlap(values: np.ndarray) -> np.ndarray:
    """Which map values count for nilearn's ``allow_overlap=False`` check (bool, same shape).

    nilearn zeroes float values below the dtype's eps, then counts the maps
    > 0 at each voxel; a voxel overlaps when two maps count there.
    """
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return values >= np.finfo(values.dtype.newbyteorder("=")).eps
    return values > 0


# -- signal cleaning (nilearn's own, with its masker's arguments) -------------------------


@dataclass(frozen=True)
class CleanSpec:
    """The arguments of nilearn's ``signal.clean`` that a masker passes (picklable).

    ``hv_first``: NiftiMapsMasker puts the high-variance confounds before the
    user's confounds, MultiNiftiMapsMasker after them.
    """

    detrend: bool
    standardize: object
    standardize_confounds: bool
    low_pass: float | None
    high_pass: float | None
    use_t_r: bool
    clean_args: dict
    hv_first: bool = False


def clean_signals(spec: CleanSpec, signals, confounds, hv, sample_mask, t_r, dtype):
    """nilearn's cleaning of the (time, region) signals, with its arguments and order.

    The signals are solved and cleaned in float64, then cast to nilearn's
    output dtype: nilearn works in float32 for float32 inputs, which costs it
    ~1e-4 relative when the baseline dwarfs the fluctuations (see the tests);
    in float64 the result equals nilearn's on float64 copies of the values.
    """
    from nilearn.signal import clean

    confounds = _with_hv(confounds, hv, spec.hv_first)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message="boolean values for 'standardize'")
        cleaned = clean(signals, detrend=spec.detrend, standardize=spec.standardize,
                        standardize_confounds=spec.standardize_confounds,
                        t_r=t_r if spec.use_t_r else None, low_pass=spec.low_pass,
                        high_pass=spec.high_pass, confounds=confounds, sample_mask=sample_mask,
                        runs=None, **spec.clean_args)
    return cleaned.astype(dtype, copy=False)


def _with_hv(confounds, hv, hv_first):
    """Where nilearn puts the high-variance confounds among the user's."""
    import pandas as pd

    if hv is None:
        return confounds
    if hv_first:  # BaseMasker.transform: [hv, *confounds]
        if confounds is None:
            return [hv]
        return [hv, *confounds] if isinstance(confounds, list) else [hv, confounds]
    if confounds is None:  # _MultiMixin._prepare_confounds: appended
        return hv
    if isinstance(confounds, pd.DataFrame):
        return np.hstack([confounds.to_numpy(), hv])
    if isinstance(confounds, np.ndarray):
        return np.hstack([confounds, hv])
    if isinstance(confounds, list):
        return [*confounds, hv]
    return [confounds, hv]
