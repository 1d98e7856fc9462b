"""Block kernels of region extraction: blocks and slabs add up to the whole-array answers."""

from __future__ import annotations

import numpy as np
import scipy.linalg
from nilearn.signal import high_variance_confounds

from chunkglm.kernels import maps as km
from chunkglm.testing import assert_close_to_scale


def test_moments_over_slabs_and_blocks_equal_the_whole(monkeypatch):
    rng = np.random.default_rng(0)
    maps = rng.random((50, 4)).astype(np.float32)
    data = rng.normal(size=(9, 50)).astype(np.float32)
    data[2, 7] = np.nan  # nilearn's ensure_finite: counts as 0
    monkeypatch.setattr(km, "SLAB", 7)
    blocks = [slice(0, 20), slice(20, 33), slice(33, 50)]
    total = sum(km.maps_moments(maps[b], data[:, b]) for b in blocks)
    m64, d64 = maps.astype(np.float64), np.nan_to_num(data.astype(np.float64))
    # summation order only (slabs, blocks, BLAS): ulps of the products' scale
    assert_close_to_scale(total[:, :4], m64.T @ m64, rtol=1e-12)
    assert_close_to_scale(total[:, 4:], m64.T @ d64.T, rtol=1e-12)
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


def _sparse_maps(rng, n_voxels=40, n_regions=5):
    """Mostly-zero maps: a few voxels per map, voxels 0-4 in no map, region 3 empty."""
    maps = np.where(rng.random((n_voxels, n_regions)) < 0.15, rng.random((n_voxels, n_regions)), 0)
    maps[:5] = 0
    maps[:, 3] = 0
    return maps.astype(np.float32)


def test_sparse_maps_blocks_equal_dense_products(monkeypatch):
    """CSR blocks, dense blocks taking the sparse path, and the dense path agree: float64 sums of
    the same products, so to rounding (measured ~1e-16 relative); NaN/inf data count as 0."""
    import scipy.sparse

    rng = np.random.default_rng(3)
    maps = _sparse_maps(rng)
    data = rng.normal(size=(7, 40)).astype(np.float32)
    data[1, 2], data[3, 20], data[4, 21] = np.nan, np.inf, -np.inf  # voxel 2 is in no map
    monkeypatch.setattr(km, "SPARSE_SLAB", 3)  # several slabs per block, gathers and slices
    blocks = [slice(0, 5), slice(5, 17), slice(17, 40)]  # the first block is in no map at all
    m64, d64 = maps.astype(np.float64), np.nan_to_num(data.astype(np.float64), posinf=0, neginf=0)
    expected = np.hstack([m64.T @ m64, m64.T @ d64.T, m64.T @ d64[:4].T])
    for as_block in (scipy.sparse.csr_matrix, scipy.sparse.csc_matrix, np.asarray):
        parts = [km.maps_moments(as_block(maps[b]), [data[:, b], data[:4, b]]) for b in blocks]
        assert all(p.shape == (5, 5 + 7 + 4) for p in parts)
        np.testing.assert_array_equal(parts[0], 0)  # a block no map touches adds nothing
        np.testing.assert_allclose(sum(parts), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(km, "SPARSE_DENSITY", -1.0)  # the dense (BLAS) path on the same blocks
    dense = sum(km.maps_moments(maps[b], [data[:, b], data[:4, b]]) for b in blocks)
    np.testing.assert_allclose(dense, expected, rtol=1e-12, atol=1e-12)


def test_sparse_moments_of_empty_blocks():
    import scipy.sparse

    empty = scipy.sparse.csr_matrix((6, 3), dtype=np.float32)
    out = km.maps_moments(empty, np.ones((4, 6), dtype=np.float32))
    assert out.shape == (3, 3 + 4) and not out.any()
    assert km.maps_moments(empty, None, with_gram=False).shape == (3, 0)


def test_counted_in_overlap_uses_nilearns_eps_cut():
    eps = np.finfo(np.float32).eps
    values = np.array([eps / 2, eps, 0.5, -1.0], dtype=np.float32)
    assert km.counted_in_overlap(values).tolist() == [False, True, True, False]
    assert km.counted_in_overlap(np.array([0, 2, -1], dtype=np.int16)).tolist() == [False, True, False]


def test_volume_products_equal_the_block_products():
    """A run given volume by volume (a NIfTI file): the same float64 products, NaN/inf as 0."""
    import scipy.sparse

    rng = np.random.default_rng(4)
    maps = _sparse_maps(rng)
    data = rng.normal(size=(6, 40)).astype(np.float32)
    data[2, 9], data[5, 30] = np.nan, np.inf
    expected = km.maps_moments(maps, data, with_gram=False)
    for as_maps in (scipy.sparse.csr_matrix, np.asarray):
        ours = km.volume_products(as_maps(maps), iter(data))
        assert ours.shape == (5, 6)
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)  # summation order only
    assert km.volume_products(maps, iter([])).shape == (5, 0)
