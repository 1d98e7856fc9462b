"""Block kernels of region extraction: blocks and slabs add up to the whole-array answers."""

from __future__ import annotations

import numpy as np
import scipy.linalg
from nilearn.signal import high_variance_confounds

from chunkglm.kernels import maps as km


def test_moments_over_slabs_and_blocks_equal_the_whole(monkeypatch):
    rng = np.random.default_rng(0)
    maps = rng.random((50, 4)).astype(np.float32)
    data = rng.normal(size=(9, 50)).astype(np.float32)
    data[2, 7] = np.nan  # nilearn's ensure_finite: counts as 0
    monkeypatch.setattr(km, "SLAB", 7)
    blocks = [slice(0, 20), slice(20, 33), slice(33, 50)]
    total = sum(km.maps_moments(maps[b], data[:, b]) for b in blocks)
    m64, d64 = maps.astype(np.float64), np.nan_to_num(data.astype(np.float64))
    np.testing.assert_allclose(total[:, :4], m64.T @ m64, rtol=1e-12)
    np.testing.assert_allclose(total[:, 4:], m64.T @ d64.T, rtol=1e-12)
    np.testing.assert_allclose(sum(km.maps_projection(maps[b], data[:, b]) for b in blocks), total[:, 4:])
    np.testing.assert_allclose(sum(km.maps_gram(maps[b]) for b in blocks), total[:, :4])
    two_runs = sum(km.maps_moments(maps[b], [data[:, b], data[:5, b]], with_gram=False) for b in blocks)
    np.testing.assert_allclose(two_runs, np.hstack([total[:, 4:], total[:, 4:9]]))


def test_solve_is_nilearns_lstsq_even_when_maps_are_collinear():
    """lstsq on the normal equations gives lstsq(M, Y)'s minimum-norm solution."""
    rng = np.random.default_rng(1)
    maps = rng.random((60, 3))
    maps = np.column_stack([maps, maps[:, 0], np.zeros(60)])  # a duplicate and an empty map
    data = rng.normal(size=(8, 60))
    ours = km.solve_region_signals(maps.T @ maps, maps.T @ data.T)
    ref = scipy.linalg.lstsq(maps, data.T)[0].T
    np.testing.assert_allclose(ours, ref, atol=1e-10)  # conditioning squared: ~1e-13 measured


def test_high_variance_confounds_in_two_passes_over_blocks():
    rng = np.random.default_rng(2)
    series = rng.normal(size=(30, 400)) * rng.random(400) * 3
    blocks = [slice(0, 150), slice(150, 400)]
    mean_squares = np.concatenate([km.detrended_mean_squares(series[:, b]) for b in blocks])
    threshold = km.variance_threshold(mean_squares)
    gram = sum(km.selected_gram(series[:, b], mean_squares[b], threshold) for b in blocks)
    ours = km.high_variance_components(gram)
    ref = high_variance_confounds(series)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-10)  # eigenvectors up to sign
