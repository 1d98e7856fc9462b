"""Missing-data patterns ("bags") inside one voxel block, as NiMARE 0.22 fits them.

NiMARE (``IBMAEstimator._preprocess_input`` / ``_fit_over_bags``) marks an
entry usable when it is finite and non-zero (``nimare.meta.utils._usable``;
a varcope at or below ``1 / sqrt(finfo(dtype).max)`` is also unusable), and
an entry counts only where *every* image input of the estimator is usable.
Then either

- ``aggressive_mask=True``: only voxels usable in every study are fitted,
  all K studies at once; every other voxel is NaN; or
- default: voxels are grouped by their pattern of usable studies and each
  pattern is fitted on its own studies (its own K); patterns with fewer than
  two studies are not fitted (NaN).

Every voxel's fit depends only on its own column and its pattern's rows, so
the grouping can be done block by block: the union over blocks of
"pattern p, voxels of this block" is NiMARE's bag p. Numpy only (no dask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chunkglm.errors import InputError

#: NiMARE's MIN_STUDY_THRESH / MIN_INDEPENDENT_UNITS: fewest studies a bag is fitted with.
MIN_STUDIES = 2

#: Image inputs that are sampling variances or standard errors (NiMARE blanks tiny varcopes).
VARIANCE_INPUTS = ("varcope", "se")


def usable(values: np.ndarray) -> np.ndarray:
    """NiMARE's ``_usable``: finite and non-zero (0 is NeuroVault's "no coverage")."""
    return np.isfinite(values) & (values != 0)


def min_variance(dtype) -> float:
    """NiMARE's floor on varcope values, ``1 / sqrt(finfo(dtype).max)`` of the masked data."""
    return 1.0 / np.sqrt(np.finfo(np.dtype(dtype)).max)


def validity(images: dict[str, np.ndarray], stored_dtype="float32") -> np.ndarray:
    """Which (study, voxel) entries every image input holds a usable value for.

    Parameters
    ----------
    images : dict of name -> ndarray of shape (K, V)
        The estimator's image inputs (``z``, ``beta``, ``varcope``, ``t``).
    stored_dtype : dtype
        dtype the maps were stored in (NiMARE's varcope floor depends on it).

    Returns
    -------
    ndarray of bool, shape (K, V)

    Raises
    ------
    InputError
        A varcope holds a negative value: a variance cannot be negative.
    """
    valid = None
    for name, values in images.items():
        ok = usable(values)
        if name in VARIANCE_INPUTS:
            check_variances(values, name)
            ok &= values > min_variance(stored_dtype)
        valid = ok if valid is None else valid & ok
    return valid


def check_variances(values: np.ndarray, name: str = "varcope") -> None:
    """Refuse negative variances (NiMARE silently drops them; here it is an input error).
    -inf is not one: like NaN and +inf it is non-finite, which NiMARE drops and so do we."""
    with np.errstate(invalid="ignore"):
        bad = (values < 0) & np.isfinite(values)
    if bad.any():
        studies = np.flatnonzero(bad.any(axis=1))
        raise InputError(
            f"the {name} maps hold {int(bad.sum())} negative value(s) (studies at rows "
            f"{studies[:10].tolist()} of the collection): a sampling variance cannot be negative. "
            f"Check that these are variances (se**2), not contrasts; 0 and NaN mark missing voxels.")


def voxel_patterns(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group voxels by their column of ``valid`` (one sort over packed bits).

    Parameters
    ----------
    valid : ndarray of bool, shape (K, V)

    Returns
    -------
    patterns : ndarray of bool, shape (P, K)
        The distinct patterns (which studies are usable).
    inverse : ndarray of int, shape (V,)
        Pattern index of each voxel.
    """
    n_studies, n_voxels = valid.shape
    if valid.all():  # the usual case inside the brain: one pattern, no sort
        return np.ones((1, n_studies), dtype=bool), np.zeros(n_voxels, dtype=np.intp)
    keys = np.ascontiguousarray(np.packbits(valid, axis=0).T)  # (V, bytes)
    # each voxel's bytes as one opaque (void) value: a 1-D sort comparing whole keys,
    # much faster than np.unique(axis=0)'s row-structured sort
    void = keys.view(np.dtype((np.void, keys.shape[1]))).reshape(-1)
    unique, inverse = np.unique(void, return_inverse=True)
    unique = np.frombuffer(unique.tobytes(), dtype=np.uint8).reshape(-1, keys.shape[1])
    patterns = np.unpackbits(unique, axis=1, count=n_studies).astype(bool)
    return patterns, np.reshape(inverse, -1)


def fit_patterns(
    kernel: Callable[..., dict],
    arrays: dict[str, np.ndarray],
    valid: np.ndarray,
    outputs: Sequence[str],
    params: dict,
    *,
    aggressive_mask: bool = False,
    per_study: dict[str, np.ndarray] | None = None,
    skipped: np.ndarray | None = None,
) -> np.ndarray:
    """Fit ``kernel`` once per missing-data pattern of one voxel block.

    Parameters
    ----------
    kernel : callable
        ``kernel(**arrays, **params) -> {name: (V,) ndarray}``.
    arrays : dict of name -> ndarray of shape (K, V), or (K,) for per-study values
        Kernel inputs by keyword (``z``, ``beta``, ``varcope``, ``t``,
        ``sample_sizes``), all K rows; each pattern's rows and voxels are
        taken from them.
    valid : ndarray of bool, shape (K, V)
    outputs : sequence of str
        Map names, in the order of the returned rows.
    params : dict
        Keyword arguments of the kernel; values listed in ``per_study`` are
        instead sliced per pattern along their last axis (e.g. sign flips
        ``(n_perm, K)``).
    aggressive_mask : bool
        Fit only voxels usable in every study.
    per_study : dict of name -> ndarray (..., K), optional
        Keyword arguments with one entry per study. ``groups`` (dependence-group
        codes) also leaves unfitted (NaN) a pattern whose studies are all of one group.
    skipped : ndarray of bool, shape (V,), optional
        Set True here for the voxels of such one-group patterns (NiMARE warns about them).

    Returns
    -------
    ndarray of shape (len(outputs), V), float64
        NaN where no pattern with at least :data:`MIN_STUDIES` studies (and groups) covers a voxel.
    """
    n_voxels = valid.shape[1]
    out = np.full((len(outputs), n_voxels), np.nan)
    groups = (per_study or {}).get("groups")
    for rows, voxels in pattern_groups(valid, aggressive_mask):
        if voxels.size == 0 or rows.sum() < MIN_STUDIES:
            continue
        if groups is not None and np.unique(groups[rows]).size < MIN_STUDIES:
            if skipped is not None:
                skipped[voxels] = True
            continue  # one dependence group: no independent replication (NiMARE leaves it NaN)
        result = _call(kernel, arrays, rows, voxels, params, per_study or {}, n_voxels)
        for i, name in enumerate(outputs):
            out[i, voxels] = result[name]
    return out


def pattern_groups(valid: np.ndarray, aggressive_mask: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(study rows as bool (K,), voxel indices) of each missing-data pattern of a block.

    With ``aggressive_mask`` there is one group: all studies, the voxels
    usable in every study.
    """
    n_studies, n_voxels = valid.shape
    if n_voxels == 0:
        return []
    if aggressive_mask:
        return [(np.ones(n_studies, dtype=bool), np.flatnonzero(valid.all(axis=0)))]
    patterns, inverse = voxel_patterns(valid)
    if len(patterns) == 1:
        return [(patterns[0], np.arange(n_voxels))]
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(patterns) + 1))
    return [(patterns[p], order[bounds[p]:bounds[p + 1]]) for p in range(len(patterns))]


def _call(kernel, arrays, rows, voxels, params, per_study, n_voxels):
    whole = rows.all() and voxels.size == n_voxels  # the whole block: no copy
    kwargs = {name: a if whole else (a[rows] if a.ndim == 1 else a[np.ix_(rows, voxels)])
              for name, a in arrays.items()}
    kwargs.update(params)
    for name, values in per_study.items():
        kwargs[name] = values[..., rows]
    return kernel(**kwargs)
