"""The first-level fit's shortcuts give the results of the expressions they replace.

- ``block_moments``: M0 and M1 from one GEMM equal X'Y and X[1:]'Y[:-1] + X[:-1]'Y[1:];
- ``per_level_products``: the level-grouped products equal the per-voxel gather
  ``einsum("vpq,qv->pv", matrices[level_index], columns)``;
- ``scaled_block(..., dtype=)``: the cast and in-place scaling give the bits of a float64
  copy scaled as before, and leave the caller's block untouched;
- ``across_threads``: a run of one stored chunk is fitted in one part per idle thread of the
  local scheduler, the chunk read once, with the results of the unsplit fit; nothing is
  split with the synchronous scheduler or when there are blocks enough.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

from chunkglm.graph import blocks
from chunkglm.graph import glm as graph
from chunkglm.kernels import glm as k
from chunkglm.testing.assertions import assert_close_to_scale

# Sums of the same products in another order (BLAS blocking, one GEMM for two): a few ulps of
# the largest terms, i.e. ~1e-15 of the scale; 1e-12 leaves room for any BLAS kernel.
RTOL = 1e-12


def _design(n_time=60):
    t = np.arange(n_time)
    return pd.DataFrame({"a": np.sin(t / 5.0), "b": np.cos(t / 7.0), "drift": t / n_time, "constant": 1.0})


def _data(n_time=60, n_voxels=900, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n_time, n_voxels))
    for t in range(1, n_time):  # AR(1) noise, so that the fit has many levels
        noise[t] += rng.uniform(-0.5, 0.8, n_voxels) * noise[t - 1]
    return (600 + 30 * noise + 5 * _design(n_time)[["a"]].to_numpy()).astype(np.float32)


def test_block_moments_one_gemm_equals_the_sums_it_replaces():
    X = np.linalg.qr(_design().to_numpy())[0]
    Y = _data().astype(np.float64)
    bm = k.block_moments(X, Y)
    assert_close_to_scale(bm.m0, X.T @ Y, RTOL)
    assert_close_to_scale(bm.m1, X[1:].T @ Y[:-1] + X[:-1].T @ Y[1:], RTOL)
    assert_close_to_scale(bm.m2, X[:-1].T @ Y[:-1], RTOL)


def test_per_level_products_equal_the_gather():
    rng = np.random.default_rng(1)
    matrices = rng.standard_normal((7, 4, 4))
    level_index = rng.integers(0, 7, 500)
    level_index[level_index == 3] = 2  # a level no voxel has
    columns = rng.standard_normal((4, 500))
    got = k.per_level_products(matrices, level_index, columns)
    assert_close_to_scale(got, np.einsum("vpq,qv->pv", matrices[level_index], columns), RTOL)


def test_fit_whitened_as_the_gathered_einsum():
    """beta and r-square of the grouped products equal the per-voxel forms they replace."""
    X = np.linalg.qr(_design().to_numpy())[0]
    dm = k.DesignMoments.from_design(X)
    bm = k.block_moments(X, k.scaled_block(_data(), 0, dtype=np.float64))
    _, stats = k.ols_residual_stats(dm, bm)
    rho = k.bin_ar1(k.yule_walker_ar1(stats, 0.0, len(X)))
    fit = k.fit_whitened(dm, bm, rho, len(X) - 4)
    assert len(fit.levels) > 10
    xwy = bm.m0 - rho * bm.m1 + rho * rho * bm.m2
    assert_close_to_scale(fit.beta, np.einsum("vpq,qv->pv", fit.cov[fit.level_index], xwy), RTOL)
    grams = np.stack([dm.whitened_gram(r) for r in fit.levels])[fit.level_index]
    pred_sq = np.einsum("pv,pv->v", fit.beta, np.einsum("vpq,qv->pv", grams, fit.beta))
    n = len(X)
    pred_sum = dm.col_sum @ fit.beta - rho * (dm.head_sum @ fit.beta)
    wy_sq = bm.q0 - 2 * rho * bm.q1 + rho * rho * bm.q2
    wy_sum = bm.y_sum - rho * bm.y_head
    want = (pred_sq / n - (pred_sum / n) ** 2) / (wy_sq / n - (wy_sum / n) ** 2)
    assert_close_to_scale(fit.r_square, want, RTOL)


@pytest.mark.parametrize("signal_scaling", [0, False])
@pytest.mark.parametrize("order", ["C", "F"])
def test_scaled_block_cast_in_place_gives_the_bits_of_the_copy(signal_scaling, order):
    block = np.asarray(_data(), order=order)
    block[:, 5] = 0.3  # a mean below 1: nilearn divides by 1
    before = block.copy()
    got = k.scaled_block(block, signal_scaling, dtype=np.float64)
    want = k.scaled_block(block.astype(np.float64), signal_scaling)
    assert got.dtype == np.float64 and np.array_equal(got, want)
    assert np.array_equal(block, before) and block.dtype == np.float32
    float64 = block.astype(np.float64)  # already in the dtype: scaled into a new array, never in place
    kept = float64.copy()
    assert np.array_equal(k.scaled_block(float64, signal_scaling, dtype=np.float64), want)
    assert np.array_equal(float64, kept)


class _CountingSource:
    """An array whose reads are counted (what a stored chunk read costs)."""

    def __init__(self, values):
        self.values, self.reads = values, 0
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim

    def __getitem__(self, key):
        if self.values[key].size > 1:  # dask's meta probe reads an empty slice
            self.reads += 1
        return self.values[key]


def _fit(array, design):
    run = graph.fit_run(array, design, "ar1", dtype=np.float64)
    con = np.array([1.0, -1.0, 0.0, 0.0])
    effect, variance = graph.compute_contrasts([(run, con)], "t")[0]
    return run, effect, variance


def test_one_chunk_run_fitted_in_a_part_per_thread(monkeypatch):
    monkeypatch.setattr(blocks, "MIN_PART_BYTES", 1000)  # the small test run is split too
    design, values = _design(), _data()
    with dask.config.set(scheduler="sync"):  # one thread: the stored chunk as it is
        whole, effect, variance = _fit(da.from_array(values, chunks=values.shape), design)
    assert whole.block_sizes == (values.shape[1],)
    source = _CountingSource(values)
    with dask.config.set(scheduler="threads", num_workers=3):
        run, split_effect, split_variance = _fit(da.from_array(source, chunks=values.shape, asarray=False), design)
    assert run.block_sizes == (300, 300, 300)
    assert source.reads == 1  # the parts slice one read of the chunk
    # the AR(1) grand mean is summed per part: the same terms in another order
    assert_close_to_scale(split_effect, effect, RTOL)
    assert_close_to_scale(split_variance, variance, RTOL)


def test_runs_with_blocks_enough_are_not_split(monkeypatch):
    monkeypatch.setattr(blocks, "MIN_PART_BYTES", 1000)
    array = da.zeros((60, 900), chunks=(60, 300), dtype=np.float32)
    with dask.config.set(scheduler="threads", num_workers=3):
        assert blocks.across_threads(array) is array
    with dask.config.set(scheduler="threads", num_workers=2):
        small = da.zeros((60, 3), chunks=(60, 3), dtype=np.float32)  # parts would be under MIN_PART_BYTES
        assert blocks.across_threads(small) is small
        monkeypatch.setattr(blocks, "MIN_PART_BYTES", 4 * 2**20)
        assert blocks.across_threads(array[:, :300]).chunks[1] == (300,)


def test_compute_contrast_all_computes_p_values_once(monkeypatch):
    """output_type="all": the p-value map is the one z_score computed (nilearn's Contrast keeps it),
    equal to a fresh p_value(), and the t survival function runs once, not twice."""
    import scipy.stats
    from nilearn.glm.contrasts import Contrast

    from chunkglm.glm.first_level import FirstLevelModel

    rng = np.random.default_rng(4)
    effect, variance = rng.standard_normal((1, 500)), rng.uniform(0.5, 2.0, 500)

    def contrast(*_):
        return Contrast(effect=effect, variance=variance, dof=40, stat_type="t")

    model = FirstLevelModel()
    model.design_matrices_, model._runs = [_design()], [None]  # one run (its fit is not used)
    monkeypatch.setattr(model, "_fixed_effects", contrast)
    monkeypatch.setattr(model, "_to_image", lambda values: values)
    calls = []
    survival = scipy.stats.t.sf
    monkeypatch.setattr(scipy.stats.t, "sf", lambda *a, **kw: calls.append(1) or survival(*a, **kw))
    maps = model.compute_contrast("a - b", output_type="all")
    assert len(calls) == 1
    assert list(maps) == ["z_score", "stat", "p_value", "effect_size", "effect_variance"]  # nilearn's order
    assert np.array_equal(maps["p_value"], contrast().p_value())


def test_node_dask_array_is_its_data_and_refuses_an_incomplete_node(tmp_path):
    """Node.dask_array (what FirstLevelModel fits): the values and chunks of Node.data(), read
    without xarray; a node no longer complete is refused as to_dataset refuses it."""
    import chunkglm
    from chunkglm.errors import StoreError
    from chunkglm.io import layout as st
    from chunkglm.io.cohort import open_cohort
    from chunkglm.testing import make_synthetic_bids

    bids = make_synthetic_bids(tmp_path / "bids", n_subjects=1, size="tiny", seed=3)
    store = str(tmp_path / "cohort.zarr")
    chunkglm.convert(bids.root, store, client=None)
    (node,) = open_cohort(store).runs.values()
    values, reference = node.dask_array(), node.data()
    assert values.chunks == reference.data.chunks and values.dtype == reference.dtype
    assert np.array_equal(values.compute(), reference.values, equal_nan=True)
    root = st.open_root(store, mode="a")
    root[node.data_path].attrs.put({st.ATTR: {"complete": False}})
    with pytest.raises(StoreError, match="incomplete"):
        node.dask_array()
