"""GLM nodes above the run of BIDS Stats Models (Type "glm"): one dask graph per node over voxel blocks.

chunkglm.glm.stats_models.group_level against nilearn's ``SecondLevelModel`` on the same maps and
designs (what fitlins runs per group); the graph's shape (every group and contrast of the node in one
array, each stored chunk read once, no task holding a whole map). The end-to-end parity with fitlins
is in test_bids_stats_models_parity.py.
"""

from __future__ import annotations

import warnings
from collections import Counter

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dask.callbacks import Callback
from nilearn.glm.second_level import SecondLevelModel as NilearnModel

from chunkglm.glm.second_level.model import OUTPUT_TYPES
from chunkglm.glm.stats_models.group_level import GroupLevel
from chunkglm.io.grid import Grid
from chunkglm.io.layout import CohortLocalStore
from chunkglm.testing.assertions import rel_l2

SHAPE = (14, 15, 12)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N_SUBJECTS = 7


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two input contrasts' effect maps of 7 subjects (float32, as the nodes below write them): zero
    outside a brain of two parts (one on the border), each subject missing some of its voxels (so
    the mean, hence nilearn's mask, differs between the groups), one map with a NaN."""
    folder = tmp_path_factory.mktemp("group")
    rng = np.random.default_rng(11)
    brain = np.zeros(SHAPE, dtype=bool)
    brain[2:12, 2:13, 1:10] = True
    brain[0:1, 0:2, 10:12] = True
    groups = []
    for contrast, shift in (("a", 0.4), ("b", -0.2)):
        paths = []
        for subject in range(N_SUBJECTS):
            inside = brain & (rng.uniform(size=SHAPE) > 0.15)
            effect = np.zeros(SHAPE, dtype=np.float32)
            effect[inside] = rng.normal(shift, 1.0, inside.sum())
            if contrast == "b" and subject == 2:
                effect[4, 4, 4] = np.nan
            path = folder / f"sub-{subject}_contrast-{contrast}_effect.nii.gz"
            nib.save(nib.Nifti1Image(effect, AFFINE), path)
            paths.append(str(path))
        groups.append(paths)
    age = rng.normal(40, 10, N_SUBJECTS)
    group = np.array([1.0, 0, 1, 0, 0, 1, 0])
    return groups, brain, age, group


def _designs(age, group):
    one_sample = pd.DataFrame({"intercept": np.ones(N_SUBJECTS)})
    covariates = pd.DataFrame({"intercept": np.ones(N_SUBJECTS), "age": age - age.mean(), "patient": group})
    return one_sample, covariates


def _groups(maps):
    paths, _, age, group = maps
    one_sample, covariates = _designs(age, group)
    # a one-sample t test; an age covariate and a group difference: t contrasts and an F test of both
    return [(paths[0], one_sample, [(np.array([1.0]), "t")]),
            (paths[1], covariates, [(np.array([1.0, 0, 0]), "t"), (np.array([0, 1.0, 0]), "t"),
                                    (np.array([[0, 1.0, 0], [0, 0, 1.0]]), "F")])]


@pytest.mark.parametrize("with_grid", [False, True])
def test_every_group_and_contrast_equals_nilearns_second_level_model(maps, with_grid):
    _, brain, _, _ = maps
    groups = _groups(maps)
    grids = [Grid(AFFINE, brain)] if with_grid else ()
    # a budget of a few KiB: several voxel blocks, so block edges are crossed
    with GroupLevel(groups, grids=grids, chunk_bytes=16384) as level:
        assert len(level.lazy.chunks[1]) > 2
        for number, (paths, design, contrasts) in enumerate(groups):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs_model = NilearnModel().fit(paths, design_matrix=design)
            mask = np.asarray(level.mask_img(number).dataobj) != 0
            np.testing.assert_array_equal(mask, np.asarray(theirs_model.masker_.mask_img_.dataobj) != 0)
            for index, (weights, test) in enumerate(contrasts):
                ours = level.images(number, index)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = theirs_model.compute_contrast(weights, second_level_stat_type=test, output_type="all")
                assert set(ours) == set(OUTPUT_TYPES)
                for name in OUTPUT_TYPES:
                    a, b = ours[name].get_fdata(), theirs[name].get_fdata()
                    assert a.shape == b.shape, (number, index, name)
                    np.testing.assert_array_equal(a[~mask], 0)
                    # both in float64 on the same float32 values; only the algebra differs (our
                    # QR-basis normal equations vs nilearn's pinv, the block-wise matrix products):
                    # ~1e-12 relative, where a wrong design row, column or dof gives >= 1e-2
                    assert rel_l2(a, b) < 1e-9, (number, index, name, rel_l2(a, b))


@pytest.fixture
def chunk_reads(monkeypatch):
    """Counts the reads of every stored chunk of the staged effect maps (store key -> reads)."""
    reads = Counter()
    get = CohortLocalStore.get

    async def counted(self, key, prototype, byte_range=None):
        if "/effect/c/" in key:
            reads[key] += 1
        return await get(self, key, prototype, byte_range)

    monkeypatch.setattr(CohortLocalStore, "get", counted)
    return reads


def test_one_graph_for_the_node_each_stored_chunk_read_once_no_task_holds_a_whole_map(maps, chunk_reads):
    _, brain, _, _ = maps
    groups = _groups(maps)
    with GroupLevel(groups, grids=[Grid(AFFINE, brain)], chunk_bytes=16384) as level:
        n_voxels = level.grid.n_voxels
        lazy = level.lazy
        # every group's mean, and every contrast's effect rows and variance, in one array: one graph
        n_rows = sum(1 + sum(np.atleast_2d(w).shape[0] + 1 for w, _ in contrasts) for _, _, contrasts in groups)
        assert lazy.shape == (n_rows, n_voxels)
        blocks = lazy.chunks[1]
        assert len(blocks) > 2 and max(blocks) < n_voxels and lazy.chunks[0] == (1,) * n_rows
        stored = [node.data("effect").data.chunks[1] for node in level.nodes]
        assert all(chunks == blocks for chunks in stored)  # the groups' maps: the same voxel blocks
        chunk_reads.clear()
        pieces = lazy.to_delayed(optimize_graph=False)  # (1, block) pieces: no join of a whole map
        shapes = []  # of every array a task of the graph as built (unfused) returns
        with Callback(posttask=lambda key, result, *_: shapes.append(getattr(result, "shape", ()))):
            computed = dask.compute(pieces.tolist(), scheduler="sync", optimize_graph=False)[0]
        values = np.concatenate([np.concatenate(row, axis=-1) for row in computed])
        # each stored chunk of each group is read once, for the group's fit, contrasts and mean
        assert len(chunk_reads) == len(groups) * len(blocks) and set(chunk_reads.values()) == {1}
        # no task holds more than one voxel block
        assert max(s[-1] for s in shapes if s) == max(blocks)
        # the pieces are what compute() stores (the same reads again), and the maps come from them
        level.compute()
        assert set(chunk_reads.values()) == {2}
        np.testing.assert_array_equal(np.asarray(level._results.values), values)


def test_model_of_a_group_is_fitted_on_its_staged_maps_and_mask(maps):
    groups = _groups(maps)
    with GroupLevel(groups, chunk_bytes=16384) as level:
        model = level.model(1)
        assert model.design_matrix_.equals(groups[1][1])
        np.testing.assert_array_equal(np.asarray(model.mask_img_.dataobj), np.asarray(level.mask_img(1).dataobj))
        for index, (weights, test) in enumerate(groups[1][2]):
            theirs = model.compute_contrast(weights, second_level_stat_type=test, output_type="all")
            ours = level.images(1, index)
            for name in OUTPUT_TYPES:
                # the same fit over other voxel blocks: the float sums' order only
                assert rel_l2(ours[name].get_fdata(), theirs[name].get_fdata()) < 1e-12, name
