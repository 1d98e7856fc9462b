"""The second level's block path: stored chunks read inside the fit tasks, fitted in float64 slabs.

- :class:`chunkglm.io.stored_blocks.StoredBlocks` returns zarr's values for every selection and
  store layout, and decodes a whole chunk without zarr's copy into an output array;
- :func:`chunkglm.kernels.group_ols.ols_fit` equals the whole-block fit and holds a slab, not a
  float64 copy of the block;
- :func:`chunkglm.graph.glm.fit_stored` reads each stored block once, in its fit task, and equals
  :func:`chunkglm.graph.glm.fit_run` (the first-level OLS graph it replaces for the second level).

Worker memory at scale is the benchmark's (``surface_second_level_scale``); here, tracemalloc
peaks of one read and one block fit, on blocks of a few MB.
"""

from __future__ import annotations

import pickle
import tracemalloc

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

from chunkglm.graph import glm as graph
from chunkglm.graph.evaluate import persist_runs
from chunkglm.io.stored_blocks import StoredBlocks
from chunkglm.kernels import finite as kf
from chunkglm.kernels import glm as k
from chunkglm.kernels import group_ols
from chunkglm.testing.assertions import assert_close_to_scale

BLOSC = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def _array(path, values, chunks, shards=None, written=slice(None)):
    array = zarr.create_array(path, shape=values.shape, chunks=chunks, shards=shards, dtype=values.dtype,
                              fill_value=np.nan, compressors=BLOSC)
    array[:, written] = values[:, written]
    return zarr.open_array(path, mode="r")


def _read_all(reader):
    return np.concatenate([reader(i) for i in range(len(reader))], axis=1)


def _peak(function):
    """(result, tracemalloc peak in bytes of the call)."""
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- reading -------------------------------------------------------------------------------


def test_stored_blocks_return_zarrs_values_for_every_selection(tmp_path):
    values = np.random.default_rng(0).standard_normal((7, 1000)).astype(np.float32)
    array = _array(tmp_path / "a.zarr", values, (7, 256))
    everything = StoredBlocks(array)
    assert everything.decodes_whole_chunks
    assert everything.bounds == ((0, 256), (256, 512), (512, 768), (768, 1000))
    assert everything.block_sizes == (256, 256, 256, 232) and everything.shape == (7, 1000)
    assert np.array_equal(_read_all(everything), values)
    # chunk 0 whole, a contiguous run in chunk 1, nothing in chunk 2 (not read), scattered in chunk 3
    voxels = np.concatenate([np.arange(0, 256), np.arange(300, 340), [770, 771, 900, 999]])
    selected = StoredBlocks(array, voxels)
    assert selected.bounds == ((0, 256), (256, 512), (768, 1000)) and selected.block_sizes == (256, 40, 4)
    assert np.array_equal(_read_all(selected), values[:, voxels])
    assert np.array_equal(_read_all(pickle.loads(pickle.dumps(selected))), values[:, voxels])
    with pytest.raises(ValueError, match=r"sorted unique indices in \[0, 1000\); received 2 values from 5 to 1000"):
        StoredBlocks(array, np.array([5, 1000]))


def test_stored_blocks_read_other_layouts_through_zarr(tmp_path):
    """Sharded arrays (by inner chunk), rows over several chunks, a chunk never written (fill value)."""
    values = np.random.default_rng(1).standard_normal((6, 600)).astype(np.float32)
    sharded = StoredBlocks(_array(tmp_path / "s.zarr", values, (6, 100), shards=(6, 300)))
    split_rows = StoredBlocks(_array(tmp_path / "r.zarr", values, (4, 200)))
    for reader in (sharded, split_rows):
        assert not reader.decodes_whole_chunks
        assert np.array_equal(_read_all(reader), values)
    assert sharded.block_sizes == (100,) * 6
    reader = StoredBlocks(_array(tmp_path / "p.zarr", values, (6, 200), written=slice(0, 200)))
    expected = np.where(np.arange(600) < 200, values, np.nan)
    assert reader.decodes_whole_chunks and np.array_equal(_read_all(reader), expected, equal_nan=True)


def test_a_whole_chunk_read_holds_the_compressed_and_decoded_chunk_only(tmp_path):
    """zarr's indexing holds three chunk-sized buffers at its peak (compressed bytes, decoded chunk,
    output array): ~2.9x the chunk for noise that blosc barely compresses (0.93x). The reader
    decodes into nothing else: <= 2.4x (1.93x measured; the margin is for allocator
    bookkeeping, far below the third buffer)."""
    values = np.random.default_rng(2).standard_normal((50, 60000)).astype(np.float32)
    array = _array(tmp_path / "n.zarr", values, (50, 30000))
    reader, chunk_bytes = StoredBlocks(array), 50 * 30000 * 4
    reader(1)  # codec set-up outside the measure
    block, peak = _peak(lambda: reader(0))
    assert np.array_equal(block, values[:, :30000])
    assert peak <= 2.4 * chunk_bytes, f"read peak {peak / chunk_bytes:.2f}x the chunk"


# -- the slab fit --------------------------------------------------------------------------


def _design(n, seed=3):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(40, 10, n), "intercept": np.ones(n)})


def _whole_block_fit(Q, block, df, n_columns):
    """The fit as fit_run's OLS graph computes it: the whole block's float64 moments."""
    finite, count = kf.finite_block(block)
    fit = k.fit_whitened(k.DesignMoments.from_design(Q), k.block_moments(Q, finite),
                         np.zeros(block.shape[1]), df, n_columns)
    return fit, count


def _assert_same_fit(actual, desired):
    # The same operations voxel by voxel; only the BLAS products X'Y run on other column
    # counts, which may reorder float64 sums of n_images terms: ~n * eps of their scale.
    for name in ("beta", "dispersion", "r_square"):
        assert_close_to_scale(getattr(actual, name), getattr(desired, name), 1e-12, name)
    assert np.array_equal(actual.rho, desired.rho) and np.array_equal(actual.level_index, desired.level_index)
    assert np.array_equal(actual.levels, desired.levels) and np.array_equal(actual.cov, desired.cov)


def test_ols_fit_in_slabs_equals_the_whole_block_fit_with_nonfinite_values():
    rng = np.random.default_rng(4)
    design = _design(30)
    block = (rng.standard_normal((30, 5000)) + 2.0).astype(np.float32)
    block[3, [10, 4000]] = np.nan
    block[7, 2500] = np.inf
    Q, _, df = k.orthonormal_design(design.to_numpy())
    fit, count = group_ols.ols_fit(Q, block, df, 2, slab_bytes=64 * 1024)  # 229-voxel slabs
    whole, whole_count = _whole_block_fit(Q, block, df, 2)
    assert count == whole_count == 3
    _assert_same_fit(fit, whole)
    with pytest.raises(ValueError, match="the design has 30 rows but the block 29 images"):
        group_ols.ols_fit(Q, block[:29], df, 2)


def test_ols_fit_holds_one_float64_slab_not_a_copy_of_the_block():
    """Before, the block's float64 copy (2x the float32 block) and the fit's temporaries over the
    whole block; now one slab (1 MiB here) and the fit's outputs (48 bytes a voxel)."""
    rng = np.random.default_rng(5)
    block = rng.standard_normal((400, 20000)).astype(np.float32)  # 32 MB
    Q, _, df = k.orthonormal_design(_design(400).to_numpy())
    (fit, _), peak = _peak(lambda: group_ols.ols_fit(Q, block, df, 2, slab_bytes=2**20))
    assert peak <= 0.25 * block.nbytes, f"fit peak {peak / block.nbytes:.2f}x the float32 block"
    _assert_same_fit(fit, _whole_block_fit(Q, block, df, 2)[0])


def test_join_fits_refuses_fits_of_other_ar_levels():
    Q, _, df = k.orthonormal_design(_design(12).to_numpy())
    dm, bm = k.DesignMoments.from_design(Q), k.block_moments(Q, np.ones((12, 4)))
    fits = [k.fit_whitened(dm, bm, np.full(4, rho), df, 2) for rho in (0.0, 0.2)]
    with pytest.raises(ValueError, match="same AR levels"):
        group_ols.join_fits(fits)


# -- the graph -----------------------------------------------------------------------------


class _CountingReader:
    """StoredBlocks that counts its reads (threaded scheduler: one process)."""

    def __init__(self, reader):
        self.reader, self.reads = reader, []
        self.block_sizes, self.shape = reader.block_sizes, reader.shape

    def __call__(self, index):
        self.reads.append(index)
        return self.reader(index)


def test_fit_stored_reads_each_stored_block_once_and_equals_fit_run(tmp_path):
    rng = np.random.default_rng(6)
    values = (rng.standard_normal((20, 1200)) + 1.0).astype(np.float32)
    voxels = np.flatnonzero(rng.random(1200) < 0.8)
    reader = _CountingReader(StoredBlocks(_array(tmp_path / "m.zarr", values, (20, 512)), voxels))
    design = _design(20)
    bold = da.from_array(values[:, voxels], chunks=(20, reader.block_sizes))
    budget = 20 * 4 * 150  # task blocks of <= 150 voxels: each stored block gives several fits
    run = graph.fit_stored(reader, design, budget, bold=bold)
    assert len(run.block_sizes) > 2 * len(reader.block_sizes) and max(run.block_sizes) <= 150
    assert sum(run.block_sizes) == voxels.size and run.bold.chunks[1] == run.block_sizes
    con = np.array([1.0, 0.0])
    with dask.config.set(scheduler="threads"):
        (effect, variance), r2, counts = dask.compute(graph.contrast(run, con, "t"), graph.r_square(run),
                                                      run.nonfinite)
        assert sorted(reader.reads) == list(range(len(reader.block_sizes)))  # once each, for every output
        persist_runs([run])  # as the model keeps its fit; residuals read the maps again, as nilearn's
        residuals = graph.residuals(run).compute()
    old = graph.fit_run(bold, design, noise_model="ols", signal_scaling=False, budget=budget)
    (old_effect, old_variance), old_r2, old_residuals = dask.compute(
        graph.contrast(old, con, "t"), graph.r_square(old), graph.residuals(old), scheduler="threads")
    for name, new, before in (("effect", effect, old_effect), ("variance", variance, old_variance),
                              ("r_square", r2, old_r2), ("residuals", residuals, old_residuals)):
        assert_close_to_scale(new, before, 1e-12, name)  # as _assert_same_fit
    assert sum(counts) == 0


def test_stored_mean_is_the_float64_mean_of_the_maps(tmp_path):
    values = np.random.default_rng(7).standard_normal((9, 700)).astype(np.float32)
    values[4, 650] = np.nan
    reader = StoredBlocks(_array(tmp_path / "m.zarr", values, (9, 256)))
    expected = values.astype(np.float64).mean(axis=0)
    assert_close_to_scale(graph.stored_mean(reader), expected, 1e-15, "mean")  # float64 sums of 9 values


def test_fit_stored_splits_a_block_for_idle_local_threads_reading_it_once(tmp_path):
    """One stored chunk (a small group) on the local threaded scheduler: one read task, parts of
    >= 4 MiB fitted in parallel (as across_threads splits runs); the synchronous scheduler keeps
    one task reading and fitting it. Both fits are the same."""
    values = np.random.default_rng(8).standard_normal((20, 120000)).astype(np.float32)  # 9.6 MB
    reader = _CountingReader(StoredBlocks(_array(tmp_path / "one.zarr", values, (20, 120000))))
    design, con = _design(20), np.array([0.0, 1.0])
    results = {}
    for scheduler, workers in (("threads", 4), ("sync", None)):
        with dask.config.set(scheduler=scheduler, num_workers=workers):
            run = graph.fit_stored(reader, design, budget=None)
            reader.reads.clear()
            results[scheduler] = (run.block_sizes, dask.compute(graph.contrast(run, con, "t"))[0])
            assert reader.reads == [0]
    assert results["threads"][0] == (40000, 40000, 40000) and results["sync"][0] == (120000,)
    for new, before in zip(results["threads"][1], results["sync"][1]):
        assert_close_to_scale(new, before, 1e-12, "t contrast")  # as _assert_same_fit


def test_stored_blocks_decode_chunks_of_an_object_store(s3_server, s3_bucket):
    """The whole-chunk decode goes through the array's store (here S3 on a local server), as
    zarr's own reads do; a chunk never written reads as the fill value there too."""
    values = np.random.default_rng(9).standard_normal((5, 700)).astype(np.float32)
    url, options = f"s3://{s3_bucket}/maps.zarr", s3_server["storage_options"]
    array = zarr.create_array(url, storage_options=options, shape=values.shape, chunks=(5, 256),
                              dtype=values.dtype, fill_value=np.nan, compressors=BLOSC)
    array[:, :512] = values[:, :512]
    reader = StoredBlocks(zarr.open_array(url, storage_options=options, mode="r"))
    expected = np.where(np.arange(700) < 512, values, np.nan)
    assert reader.decodes_whole_chunks and np.array_equal(_read_all(reader), expected, equal_nan=True)
