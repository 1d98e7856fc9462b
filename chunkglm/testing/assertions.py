"""Assertions for comparing chunkglm's numbers with a reference.

Tolerances in chunkglm's tests come from the arithmetic, not from one
machine's output. Two kinds recur:

- Summation order (BLAS blocking, voxel blocks, tree reductions): each result
  moves by a few ulps *of the terms summed*, so an element that cancels to
  nearly zero keeps an absolute error of the array's own scale. Compare with
  :func:`assert_close_to_scale`, never with a bare ``rtol`` per element.
- Maps against an anchor that stores or computes in float32: compare the
  relative L2 norm over the mask (:func:`rel_l2`, :func:`assert_maps_close`).
"""

from __future__ import annotations

from contextlib import contextmanager

import dask
import numpy as np

__all__ = ["assert_close_to_scale", "assert_maps_close", "raise_if_dask_computes", "rel_l2"]


def assert_close_to_scale(actual, desired, rtol, err_msg=""):
    """|actual - desired| <= rtol * max|desired| everywhere; NaN where, and only where, desired is.

    Parameters
    ----------
    actual, desired : array-like of the same shape
    rtol : float
        Relative to the largest finite magnitude of ``desired``: the scale of
        the terms whose summation order may differ.
    err_msg : str
    """
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"shapes differ: {actual.shape} vs {desired.shape}. {err_msg}"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(desired), err_msg=f"NaN positions. {err_msg}")
    finite = np.isfinite(desired)
    scale = float(np.max(np.abs(desired[finite]), initial=0.0))
    np.testing.assert_allclose(actual[finite], desired[finite], rtol=0, atol=rtol * scale, err_msg=err_msg)
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(desired)], desired[~finite & ~np.isnan(desired)])


def rel_l2(ours, reference, mask=None) -> float:
    """||ours - reference|| / ||reference|| over ``mask`` (arrays or nibabel images)."""
    a, b = _values(ours), _values(reference)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    if mask is not None:
        mask = _values(mask).astype(bool)
        a, b = a[mask], b[mask]
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_maps_close(ours, reference, mask=None, rel_l2_max=1e-7, err_msg=""):
    """Relative L2 difference over ``mask`` at most ``rel_l2_max`` (images or arrays)."""
    value = rel_l2(ours, reference, mask)
    assert value <= rel_l2_max, f"relative L2 {value:.3g} > {rel_l2_max:.3g}. {err_msg}"


def _values(x):
    return np.asarray(x.get_fdata() if hasattr(x, "get_fdata") else x, dtype=np.float64)


@contextmanager
def raise_if_dask_computes(max_computes=0):
    """Fail when more than ``max_computes`` dask computations run inside the block (flox's check).

    Building a graph must stay lazy: wrap the building code with this and any
    ``compute``/``persist`` in it raises, naming how many ran.
    """
    count = [0]

    def scheduler(dsk, keys, **kwargs):
        count[0] += 1
        if count[0] > max_computes:
            raise RuntimeError(f"Too many dask computations: {count[0]} > {max_computes} allowed.")
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield
