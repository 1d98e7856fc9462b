"""The chunk planner is pure: property tests against its contract."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkglm.chunking import (
    MIN_CHUNK_BYTES_UNSHARDED,
    VOXEL_ALIGN,
    as_bytes,
    plan_row_slabs,
    plan_voxel_chunks,
)

rows = st.integers(1, 3000)
voxels = st.integers(0, 2_000_000)
# From 1 MiB (a tiny budget: up to ~10^4 blocks) to 256 MiB.
budgets = st.integers(2**20, 256 * 2**20)
planner_examples = settings(max_examples=60, deadline=None)


@planner_examples
@given(rows, voxels, budgets)
def test_time_is_never_split_and_blocks_cover_every_voxel(n_rows, n_voxels, budget):
    plan = plan_voxel_chunks(n_rows, n_voxels, 4, budget)
    assert plan.chunks[0] == n_rows
    slices = plan.block_slices()
    assert sum(s.stop - s.start for s in slices) == n_voxels
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


@planner_examples
@given(rows, voxels, budgets)
def test_chunks_respect_the_budget_up_to_alignment(n_rows, n_voxels, budget):
    plan = plan_voxel_chunks(n_rows, n_voxels, 4, budget)
    block = plan.chunks[1]
    fits = max(1, budget // (n_rows * 4))
    # Rounding up to VOXEL_ALIGN may exceed the budget by less than one unit.
    assert block <= max(fits, 1) + VOXEL_ALIGN or block <= VOXEL_ALIGN
    if n_voxels:
        assert math.ceil(n_voxels / block) <= math.ceil(n_voxels / fits) + 1


@planner_examples
@given(rows, voxels, budgets)
def test_blocks_are_balanced(n_rows, n_voxels, budget):
    plan = plan_voxel_chunks(n_rows, n_voxels, 4, budget)
    sizes = [s.stop - s.start for s in plan.block_slices()]
    if len(sizes) > 1:  # only the last block may be smaller, by < one block
        assert len(set(sizes[:-1])) == 1 and 0 < sizes[-1] <= sizes[0]


@planner_examples
@given(rows, voxels, budgets)
def test_shards_group_whole_chunks_only_when_chunks_are_small(n_rows, n_voxels, budget):
    plan = plan_voxel_chunks(n_rows, n_voxels, 4, budget)
    if plan.shards is not None:
        assert plan.shards[1] % plan.chunks[1] == 0
        assert plan.chunks[1] * n_rows * 4 < MIN_CHUNK_BYTES_UNSHARDED
    writes = plan.write_slices()
    assert sum(s.stop - s.start for s in writes) == n_voxels


def test_realistic_run_is_a_few_64mib_chunks():
    plan = plan_voxel_chunks(300, 234_873, 4, "64MiB")
    assert plan.n_blocks == 5 and plan.shards is None
    assert plan.chunks[1] * 300 * 4 <= 64 * 2**20


def test_row_slabs_fit_the_budget():
    assert plan_row_slabs(300, 234_873, 4, "128MiB") == (128 * 2**20) // (234_873 * 4)
    assert plan_row_slabs(10, 10, 4, "1GiB") == 10
    assert plan_row_slabs(300, 10**9, 4, 1) == 1  # never zero rows


def test_bad_sizes_say_what_was_received():
    with pytest.raises(ValueError, match="must be positive; received 0"):
        as_bytes(0)
    with pytest.raises(ValueError, match="0 rows"):
        plan_voxel_chunks(0, 10)
    assert as_bytes("1 KiB") == 1024
