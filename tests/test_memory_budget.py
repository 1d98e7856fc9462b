"""One memory budget (chunkglm.chunking.MemoryBudget) plans every block and batch.

- the default budget gives exactly the sizes of the constants it replaced
  (TASK_BLOCK_BYTES = 32 MiB in graph/meta, BATCH_BYTES = IN_MEMORY_BYTES = 256 MiB
  and GROUP_BYTES = 128 MiB in maskers, 64 MiB stored chunks), and a store
  written with a budget is not split again by a model given the same budget;
- a smaller budget gives proportionally smaller blocks in each model's graph
  (read from the dask chunks, nothing computed);
- results are equal for a small and the default budget (first level, second
  level, IBMA, masker);
- the cluster config lowers a budget over a quarter of a worker's memory.
"""

from __future__ import annotations

import math

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkglm
from chunkglm.chunking import (
    DEFAULT_CHUNK_BYTES,
    VOXEL_ALIGN,
    MemoryBudget,
    plan_voxel_chunks,
    tile_chunks,
)
from chunkglm.cluster.config import chunk_budget, load_config
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.second_level import SecondLevelModel
from chunkglm.graph import meta as meta_graph
from chunkglm.graph.blocks import within_budget
from chunkglm.maskers import MultiMapsMasker, _helpers
from chunkglm.meta import convert_meta_maps, ibma
from chunkglm.testing import assert_close_to_scale

MiB = 2**20
SHAPES = [(1, 1), (40, 1_000), (200, 250_000), (300, 902_629), (8, 5_000_000), (1_000, 123_457)]


# -- the default budget: today's sizes --------------------------------------------------


def _old_task_blocks(store_chunks, n_images):  # graph/meta.py before the budget
    target = max(256, (32 * MiB) // (8 * max(n_images, 1)))
    blocks = []
    for size in store_chunks:
        parts = max(1, -(-size // target))
        base, extra = divmod(size, parts)
        blocks += [base + 1] * extra + [base] * (parts - extra)
    return tuple(b for b in blocks if b)


@pytest.mark.parametrize("n_rows, n_voxels", SHAPES)
def test_default_budget_gives_the_old_sizes(n_rows, n_voxels):
    budget = MemoryBudget()
    assert budget == MemoryBudget.of(None) == MemoryBudget.of(DEFAULT_CHUNK_BYTES) == MemoryBudget("64MiB")
    assert budget.plan(n_rows, n_voxels) == plan_voxel_chunks(n_rows, n_voxels, 4, 64 * MiB)
    stored = budget.plan(n_rows, n_voxels).chunks[1]
    store_chunks = [stored] * (n_voxels // stored) + ([n_voxels % stored] if n_voxels % stored else [])
    assert budget.task_blocks(store_chunks, n_rows) == _old_task_blocks(store_chunks, n_rows)
    assert meta_graph.task_blocks(store_chunks, n_rows) == _old_task_blocks(store_chunks, n_rows)
    # GLM fits: a store written with the default keeps its chunks as task blocks
    assert budget.tile(store_chunks, n_rows) == tuple(store_chunks)
    assert budget.run_batch_bytes() == budget.in_memory_limit() == 256 * MiB
    assert budget.group_size(n_voxels) == max(1, (128 * MiB) // (8 * n_voxels))


def test_default_masker_batches_are_the_old_ones():
    class Run:
        def __init__(self, n_time, chunks):
            self.shape, self.chunks = (n_time, sum(chunks)), ((n_time,), chunks)

    # 256 MiB of float32 per voxel block of a batch: 1000 x 16384 x 4 = 62.5 MiB per run
    datas = [Run(1000, (16384, 16384))] * 9 + [Run(500, (100,))]
    assert _helpers.batches(datas) == [[0, 1, 2, 3], [4, 5, 6, 7], [8], [9]]
    assert _helpers.batches(datas, MemoryBudget(32 * MiB)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9]]


# -- the planner's properties ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n_rows=st.integers(1, 2_000), itemsize=st.sampled_from([1, 4, 8]), chunk_bytes=st.integers(1, 2**28),
       data=st.data())
def test_planned_sizes_are_positive_within_the_budget_and_cover_the_axis(n_rows, itemsize, chunk_bytes, data):
    # up to 3 million voxels, and at most ~4,000 blocks of the budget's size: a tiny budget with
    # millions of voxels made millions of one-voxel blocks to list (minutes per example) and
    # checks nothing more than a few thousand do
    per_block = max(1, chunk_bytes // (n_rows * itemsize))
    n_voxels = data.draw(st.integers(0, min(3_000_000, 4_000 * per_block)), label="n_voxels")
    budget = MemoryBudget(chunk_bytes)
    plan = budget.plan(n_rows, n_voxels, itemsize)
    block = plan.chunks[1]
    assert block >= 1
    assert sum(s.stop - s.start for s in plan.block_slices()) == n_voxels
    cap = budget.max_block_voxels(n_rows, itemsize)
    assert block <= max(cap, 1)
    # within the budget, up to the alignment of blocks larger than VOXEL_ALIGN
    raw = max(1, chunk_bytes // (n_rows * itemsize))
    assert cap == raw or (raw > VOXEL_ALIGN and cap - raw < VOXEL_ALIGN)
    # tiles of any stored chunks: positive, within the cap, covering each chunk
    chunks = [block] * plan.n_blocks if n_voxels else []
    if chunks:
        chunks[-1] = n_voxels - block * (plan.n_blocks - 1)
    for tiles, limit in ((budget.tile(chunks, n_rows, itemsize), cap),
                         (budget.task_blocks(chunks, n_rows, itemsize), budget.task_block_voxels(n_rows, itemsize))):
        assert all(t >= 1 for t in tiles) and sum(tiles) == n_voxels
        assert all(t <= limit for t in tiles)
    assert budget.tile(chunks, n_rows, itemsize) == tuple(chunks)  # written with this budget: kept whole
    group = budget.group_size(max(n_voxels, 1), itemsize)
    assert group >= 1 and (group == 1 or group * itemsize * max(n_voxels, 1) <= 2 * chunk_bytes)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.integers(1, 10_000), max_size=20), max_block=st.integers(1, 5_000))
def test_tiles_cover_each_chunk_and_never_straddle(chunks, max_block):
    tiles = tile_chunks(chunks, max_block)
    assert all(1 <= t <= max_block for t in tiles)
    edges = set(np.cumsum(chunks).tolist())
    assert edges <= set(np.cumsum(tiles).tolist())  # every chunk boundary is a tile boundary
    assert sum(tiles) == sum(chunks)


def test_budget_parses_and_refuses_nonsense():
    assert MemoryBudget("1 MiB").chunk_bytes == MiB
    assert MemoryBudget.of(MemoryBudget(5)).chunk_bytes == 5
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


def test_cluster_config_lowers_a_budget_over_a_quarter_of_a_worker():
    small = load_config(None, overrides={"memory_limit": "100MiB"})
    budget, note = chunk_budget(small)  # the default 64 MiB > 25 MiB
    assert budget.chunk_bytes == 25 * MiB and "25 MiB" in note and "memory_limit" in note
    assert chunk_budget(small, 8 * MiB) == (MemoryBudget(8 * MiB), None)
    assert chunk_budget(load_config(None, overrides={"memory_limit": "4GiB"})) == (MemoryBudget(), None)
    assert chunk_budget(load_config(None)) == (MemoryBudget(), None)  # memory_limit null: not known here


# -- smaller budget, smaller blocks, same results --------------------------------------------


def test_within_budget_tiles_stored_chunks_and_keeps_them_without_a_budget():
    array = dask.array.zeros((40, 1000), chunks=(40, 500), dtype=np.float32)
    assert within_budget(array, None) is array
    assert within_budget(array, MemoryBudget()) is array
    assert within_budget(array, 40 * 4 * 100).chunks[1] == (100,) * 10
    assert within_budget(array, 40 * 4 * 250).chunks[1] == (250,) * 4
    assert within_budget(array, 40 * 4 * 300).chunks[1] == (500, 500)  # 300 aligns up to 512: fits


@pytest.fixture(scope="module")
def flm_store(tiny_bids, tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "one.zarr"
    chunkglm.convert(tiny_bids.root, path)  # one voxel block per run
    return chunkglm.open_cohort(path)


def test_first_level_blocks_follow_the_budget_and_results_do_not(tiny_bids, flm_store):
    node = flm_store.runs[tiny_bids.runs[0].name]
    n_time, n_voxels = node.data().shape
    maps, sizes = [], []
    for chunk_bytes in (None, n_time * 4 * 512, n_time * 4 * 256):
        model = FirstLevelModel(slice_time_ref=0.5, chunk_bytes=chunk_bytes).fit(node)
        sizes.append(model._runs[0].block_sizes)
        maps.append(model.compute_contrast("a - b", output_type="all"))
    assert sizes[0] == (n_voxels,)
    assert max(sizes[1]) <= 512 and sum(sizes[1]) == n_voxels
    assert max(sizes[2]) <= 256 and len(sizes[2]) >= 2 * len(sizes[1]) - 1  # half the budget, half the block
    for other in maps[1:]:
        for name, image in other.items():
            assert_close_to_scale(image.get_fdata(), maps[0][name].get_fdata(), 1e-12, name)


def test_first_level_nifti_inputs_are_converted_with_the_budget(tiny_bids):
    run = tiny_bids.runs[0]
    events = pd.read_csv(run.events_path, sep="\t")
    small = FirstLevelModel(t_r=2.0, mask_img=str(run.mask_path), chunk_bytes="40KiB").fit(str(run.bold_path),
                                                                                         events=events)
    n_time = small.design_matrices_[0].shape[0]
    assert max(small._runs[0].block_sizes) * n_time * 4 <= 40 * 1024 + VOXEL_ALIGN * n_time * 4
    assert len(small._runs[0].block_sizes) > 1


def _group_maps(folder, n=10, shape=(9, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    paths = []
    for i in range(n):
        path = folder / f"map_{i}.nii.gz"
        nib.save(nib.Nifti1Image((rng.normal(0.5, 1, shape)).astype(np.float32), affine), path)
        paths.append(str(path))
    mask = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, dtype=np.uint8), affine), mask)
    return paths, str(mask)


def test_second_level_blocks_follow_the_budget_and_results_do_not(tmp_path):
    paths, mask = _group_maps(tmp_path)
    design = pd.DataFrame({"intercept": np.ones(len(paths))})
    store = tmp_path / "maps.zarr"
    chunkglm.convert(paths, store, collection="effects", mask_img=mask)  # one block
    node = chunkglm.open_cohort(store).maps["effects"]
    n_voxels = node.data().shape[1]
    results, sizes = [], []
    for chunk_bytes in (None, len(paths) * 4 * 256):
        kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        model = SecondLevelModel(**kwargs).fit(node, design_matrix=design)
        results.append(model.compute_contrast("intercept", output_type="all"))
        sizes.append(next(iter(model._fits.values())).block_sizes)
    assert sizes[0] == (n_voxels,) and max(sizes[1]) <= 256 and len(sizes[1]) == math.ceil(n_voxels / 256)
    for name, image in results[1].items():
        assert_close_to_scale(image.get_fdata(), results[0][name].get_fdata(), 1e-12, name)
    # loaded images are converted with the budget's chunks
    small = SecondLevelModel(mask_img=mask, chunk_bytes=len(paths) * 4 * 256).fit(paths, design_matrix=design)
    assert max(small._maps[None].data().chunks[1]) <= 256


def _meta_table(folder, k=6, shape=(12, 12, 12), seed=3):
    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    rows = []
    for i in range(k):
        varcope = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        beta = (0.3 + rng.normal(0, 1, shape) * np.sqrt(varcope)).astype(np.float32)
        row = {"id": f"c{i}", "study_id": f"s{i}", "sample_sizes": [20 + i]}
        for role, values in (("beta", beta), ("varcope", varcope)):
            path = folder / f"{role}_{i}.nii.gz"
            nib.save(nib.Nifti1Image(values, affine), path)
            row[role] = str(path)
        rows.append(row)
    mask = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, dtype=np.uint8), affine), mask)
    return pd.DataFrame(rows), str(mask)


def test_ibma_blocks_follow_the_budget_and_results_do_not(tmp_path):
    table, mask = _meta_table(tmp_path)
    node = convert_meta_maps(table, tmp_path / "meta.zarr", "studies", mask_img=mask)
    k, n_voxels = len(table), 12**3
    with dask.config.set(scheduler="threads"):
        default = ibma.DerSimonianLaird().fit(node)
        small_budget = k * 8 * 2 * 256  # float64 copies within half the budget: 256-voxel blocks
        small = ibma.DerSimonianLaird(chunk_bytes=small_budget).fit(node)
    blocks = meta_graph.task_array(dask.array.zeros((k, n_voxels), chunks=(k, n_voxels)), None, small_budget)
    assert max(blocks.chunks[1]) <= 256 and sum(blocks.chunks[1]) == n_voxels
    assert meta_graph.task_array(dask.array.zeros((k, n_voxels), chunks=(k, n_voxels))).chunks[1] == (n_voxels,)
    for name in default.maps:
        assert_close_to_scale(small.maps[name], default.maps[name], 1e-12, name)


def test_ibma_estimator_builds_its_graph_in_the_budgets_blocks(tmp_path, monkeypatch):
    table, mask = _meta_table(tmp_path)
    node = convert_meta_maps(table, tmp_path / "meta.zarr", "studies", mask_img=mask)
    seen = []
    original = meta_graph.task_array
    monkeypatch.setattr(meta_graph, "task_array",
                        lambda *a, **kw: seen.append(original(*a, **kw).chunks[1]) or original(*a, **kw))
    with dask.config.set(scheduler="threads"):
        ibma.DerSimonianLaird(chunk_bytes=len(table) * 8 * 2 * 256).fit(node)
    assert seen and all(max(chunks) <= 256 and len(chunks) >= 7 for chunks in seen)


def test_masker_budget_sets_batches_and_maps_and_keeps_the_signals(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    shape, n_time, affine = (10, 11, 9), 30, np.eye(4)
    runs = []
    for i in range(3):
        path = tmp_path / f"run_{i}.nii.gz"
        nib.save(nib.Nifti1Image((rng.normal(size=(*shape, n_time)) + 2).astype(np.float32), affine), path)
        runs.append(str(path))
    store = tmp_path / "runs.zarr"
    chunkglm.convert(runs, store, chunk_bytes=n_time * 4 * 64)  # 64-voxel blocks
    nodes = list(chunkglm.open_cohort(store).runs.values())
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    centres = [(2, 3, 2), (7, 7, 6), (5, 2, 7)]
    maps = np.stack([np.exp(-((grid - c) ** 2).sum(-1) / 6.0) for c in centres], axis=-1).astype(np.float32)
    maps_img = nib.Nifti1Image(maps, affine)
    seen = []
    original = _helpers.batches
    monkeypatch.setattr(_helpers, "batches", lambda datas, budget=None: seen.append(original(datas, budget))
                        or seen[-1])
    default = MultiMapsMasker(maps_img, dtype="float64").fit_transform(nodes)
    small = MultiMapsMasker(maps_img, dtype="float64", chunk_bytes=n_time * 4 * 32)  # batches of 2 runs
    signals = small.fit_transform(nodes)
    assert seen == [[[0, 1, 2]], [[0, 1], [2]]]
    assert small._maps_on(nodes[0].grid).sparse is None  # over 4 x 3840 bytes of maps: kept in zarr
    assert MultiMapsMasker(maps_img).fit(nodes)._maps_on(nodes[0].grid).sparse is not None
    for got, want in zip(signals, default):
        assert_close_to_scale(got, want, 1e-12)
