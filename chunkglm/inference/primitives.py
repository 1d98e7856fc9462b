"""Per-map primitives shared by the volume and the surface passes of :mod:`chunkglm.inference`.

Pure numpy on the in-mask values of one statistic map, with nilearn 0.14's
semantics: the vertex/voxel-level cut (nilearn's ``threshold_img``), its
warning for a threshold no value reaches, and the Hommel value and
true-discovery bound of All-Resolution Inference.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import norm

from chunkglm.kernels.finite import _stack_level


def apply_height_threshold(data, threshold, two_sided):
    """Zero the voxels that do not pass a voxel-level threshold.

    Parameters
    ----------
    data : ndarray
        Statistic map (modified copy returned).
    threshold : float
        Two-sided: keep ``|z| >= threshold``. One-sided, threshold >= 0: keep
        ``z >= threshold``; threshold < 0: keep ``z <= threshold`` (nilearn's
        ``threshold_img``).
    two_sided : bool

    Returns
    -------
    ndarray
    """
    data = np.array(data, copy=True)
    if two_sided:
        drop = (-threshold < data) & (data < threshold)
    elif threshold >= 0:
        drop = data < threshold
    else:
        drop = data > threshold
    data[drop] = 0
    return data


def hommel_value(z_vals, alpha, verbose=0):
    """The Hommel value of a set of z values (nilearn's ``_compute_hommel_value``).

    Parameters
    ----------
    z_vals : ndarray of shape (n_voxels,)
    alpha : float
    verbose : int, default=0
        Above 0, draw nilearn's figure of the sorted p-values and the Hommel
        line (only when the value is not trivial, as nilearn).

    Returns
    -------
    int
        nilearn's quirk kept: with a single value, ``p > alpha`` as a bool.
    """
    p_vals = norm.sf(-np.sort(-z_vals))
    n_samples = len(p_vals)
    if n_samples == 1:
        return p_vals[0] > alpha
    if p_vals[0] > alpha:
        return n_samples
    if p_vals[-1] < alpha:
        return 0
    slope = np.max((alpha - p_vals[:-1]) / np.arange(n_samples - 1, 0, -1))
    hommel = np.trunc(alpha / slope)
    if verbose > 0:
        _plot_hommel(p_vals, hommel, alpha)
    return int(np.minimum(hommel, n_samples))


def _plot_hommel(p_vals, hommel, alpha):
    """nilearn's verbose figure: sorted p-values, the Hommel line, the zero line."""
    try:
        from matplotlib import pyplot as plt
    except ImportError:
        warnings.warn('"verbose" option requires the package Matplotlib. Please install it using '
                      "`pip install matplotlib`.", UserWarning, stacklevel=_stack_level())
        return
    n_samples = len(p_vals)
    plt.figure()
    plt.plot(np.arange(1, 1 + n_samples), p_vals, "o")
    plt.plot([n_samples - hommel, n_samples], [0, alpha])
    plt.plot([0, n_samples], [0, 0], "k")
    plt.show(block=False)


def true_positive_fraction(z_vals, hommel, alpha):
    """Lower bound on the proportion of true discoveries among ``z_vals``.

    Parameters
    ----------
    z_vals : ndarray of shape (n_voxels,)
        The z values of one cluster.
    hommel : int
        :func:`hommel_value` of the whole map.
    alpha : float

    Returns
    -------
    float
    """
    p_vals = norm.sf(-np.sort(-z_vals))
    unique_c, counts = np.unique(np.ceil((hommel * p_vals) / alpha), return_counts=True)
    criterion = 1 - unique_c + np.cumsum(counts)
    return np.maximum(0, criterion.max() / len(p_vals))


def warn_threshold_beyond_values(values, threshold, two_sided) -> None:
    """nilearn's warning (``check_threshold``) for a threshold that no value reaches.

    A threshold >= 0 is compared with the largest value (absolute value when
    ``two_sided``, non-negative values otherwise); a negative one with the
    smallest non-positive value.
    """
    values = np.asarray(values)
    if threshold >= 0:
        values = np.abs(values) if two_sided else values[values >= 0]
        if values.size and threshold > values.max():
            warnings.warn(f"The given float value must not exceed {values.max()}. But, you have given "
                          f"threshold={float(threshold)}.", UserWarning, stacklevel=_stack_level())
    else:
        values = values[values <= 0]
        if values.size and threshold < values.min():
            warnings.warn(f"The given float value must not be less than {values.min()}. But, you have "
                          f"given threshold={float(threshold)}.", UserWarning, stacklevel=_stack_level())
