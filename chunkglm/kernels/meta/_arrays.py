"""Input checks and study-order sums shared by the IBMA kernels.

Every kernel gives bit-identical maps however voxels are blocked and whatever
the memory layout: sums over studies always run in study order (:func:`_ksum`).
"""

from __future__ import annotations

import numpy as np

from chunkglm.errors import InputError

SMALL_SAMPLE_CORRECTIONS = ("knapp-hartung", "knapp-hartung-conservative", "wald")


def _block(name, values, n_studies=None) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.float64)  # C order: see _ksum
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise InputError(f"{name} must be a (n_studies >= 2, n_voxels) array; received shape "
                         f"{np.shape(values)}. Stack one masked map per study as a row.")
    if n_studies is not None and arr.shape[0] != n_studies:
        raise InputError(f"{name} has {arr.shape[0]} rows but the first input has {n_studies}; "
                         "give one row per study in every input.")
    return arr


def _same_shape(first, second, names):
    if first.shape != second.shape:
        raise InputError(f"{names[0]} and {names[1]} must have the same shape; received "
                         f"{first.shape} and {second.shape}.")


def _sample_sizes(sample_sizes, shape) -> np.ndarray:
    """Sample sizes as a (K, 1) column or a (K, V) block."""
    if sample_sizes is None:
        raise InputError("sample_sizes is required here; give one sample size per study.")
    n = np.asarray(sample_sizes, dtype=np.float64)
    if n.ndim == 1 and n.shape[0] == shape[0]:
        n = n[:, None]
    if n.ndim != 2 or n.shape[0] != shape[0] or n.shape[1] not in (1, shape[1]):
        raise InputError(f"sample_sizes must have shape ({shape[0]},) or {shape}; received "
                         f"{np.shape(sample_sizes)}.")
    if not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise InputError("sample_sizes must be finite and positive; received "
                         f"min {np.nanmin(n)!r}.")
    return n


def _check_correction(small_sample_correction):
    if small_sample_correction not in SMALL_SAMPLE_CORRECTIONS:
        raise InputError(f"small_sample_correction must be one of {SMALL_SAMPLE_CORRECTIONS}; "
                         f"received {small_sample_correction!r}.")


def _dof_map(n_studies, n_voxels) -> np.ndarray:
    """NiMARE's ``_dof_map`` without dependence groups: K - 1 at every voxel."""
    return np.full(n_voxels, float(n_studies - 1))


def _ksum(values) -> np.ndarray:
    """Sum over studies (axis 0) in study order at every voxel, whatever the block layout.

    numpy sums along a contiguous axis pairwise but across rows of a C-ordered
    block one row at a time, so a one-voxel or Fortran-ordered block would round
    differently from the same voxel inside a wide C-ordered block. C order, and
    two copies of a lone column, keep the row-by-row order everywhere.
    """
    values = np.ascontiguousarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        return np.add.reduce(np.repeat(values, 2, axis=1), axis=0)[:1]
    return values.sum(0)


#: Studies multiplied together before one log in :func:`_log_ksum`.
_LOG_GROUP = 8
#: Partial products outside [1/_SAFE_PRODUCT, _SAFE_PRODUCT] send their voxel to the plain sum of logs.
_SAFE_PRODUCT = 1e300


def _log_ksum(values) -> np.ndarray:
    """``sum_k log(values[k])`` over studies for positive values, with 8x fewer logs.

    The log is most of the likelihood solver's time: studies ``k, k + n, k +
    2n, ...`` (n = ceil(K / 8)) are multiplied first, then the n partial
    products are logged and summed in study order. A voxel whose partial
    products leave [1e-300, 1e300] (values beyond about 1e±37) takes the
    plain sum of logs instead; the choice is per voxel, so results do not
    depend on the block layout. Differs from the plain sum by a few ulps.
    """
    values = np.ascontiguousarray(values)
    n_studies = values.shape[0]
    n_rows = -(-n_studies // _LOG_GROUP)
    if n_rows == n_studies:
        return _ksum(np.log(values))
    products = values[:n_rows].copy()
    for start in range(n_rows, n_studies, n_rows):
        rows = values[start:start + n_rows]
        products[:len(rows)] *= rows
    safe = (products.min(axis=0) >= 1.0 / _SAFE_PRODUCT) & (products.max(axis=0) <= _SAFE_PRODUCT)
    out = _ksum(np.log(products, out=products))
    if not safe.all():
        unsafe = np.flatnonzero(~safe)
        out[unsafe] = _ksum(np.log(values[:, unsafe]))
    return out
