"""Results do not depend on how the voxel axis is cut into blocks (hypothesis draws the cuts).

Blocks are independent except for explicit global passes, and every global
pass combines per-block results in a fixed order, so a different blocking can
only move a value by summation order inside BLAS: a few ulps of the values'
scale (assert_close_to_scale, rtol 1e-12).
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkglm.graph.permutation import max_t_inference
from chunkglm.kernels import meta as km
from chunkglm.testing import assert_close_to_scale

N_SAMPLES, N_VOXELS = 12, 97


def _cuts(draw_sizes):
    """Block sizes summing to N_VOXELS from hypothesis' draws (each >= 1)."""
    sizes, left = [], N_VOXELS
    for size in draw_sizes:
        if left <= 0:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    if left > 0:
        sizes.append(left)
    return tuple(sizes)


BLOCKS = st.lists(st.integers(1, N_VOXELS), min_size=1, max_size=8).map(_cuts)


def _maps(seed=0):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((N_SAMPLES, N_VOXELS)) + 0.3
    maps[:, 5] = 0.0  # a constant voxel: NaN t, ignored by every max
    return maps


MAPS = _maps()
COVARIATE = np.random.default_rng(1).standard_normal(N_SAMPLES)


def _max_t(maps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return max_t_inference(maps, COVARIATE, None, True, n_perm=40, random_state=3,
                               two_sided_test=True)


WHOLE_MAX_T = _max_t(MAPS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BLOCKS)
def test_max_t_inference_whatever_the_voxel_blocks(blocks):
    with dask.config.set(scheduler="sync"):
        part = _max_t(da.from_array(MAPS, chunks=(N_SAMPLES, blocks)))
    for key in ("t", "h0_max_t"):
        assert_close_to_scale(part[key], WHOLE_MAX_T[key], rtol=1e-12, err_msg=key)
    np.testing.assert_array_equal(part["logp_max_t"] > 0, WHOLE_MAX_T["logp_max_t"] > 0)


def _likelihood(beta, varcope):
    return km.variance_based_likelihood(beta, varcope, method="reml")


BETA = _maps(2)
VARCOPE = np.abs(_maps(3)) + 0.1


@settings(max_examples=25, deadline=None)
@given(BLOCKS)
def test_meta_likelihood_whatever_the_voxel_blocks(blocks):
    """The tau^2 solver works on voxel tiles: any cut gives the same optimum, bit for bit."""
    whole = _likelihood(BETA, VARCOPE)
    edges = np.cumsum((0,) + blocks)
    parts = [_likelihood(BETA[:, a:b], VARCOPE[:, a:b]) for a, b in zip(edges, edges[1:])]
    for name, values in whole.items():
        joined = np.concatenate([np.broadcast_to(p[name], (b - a,)) if np.ndim(p[name]) == 0 else p[name]
                                 for p, a, b in zip(parts, edges, edges[1:])])
        np.testing.assert_array_equal(joined, np.broadcast_to(values, joined.shape), err_msg=name)
