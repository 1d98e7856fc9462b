"""Fixed-effects nodes of BIDS Stats Models (Type "meta"): one dask graph per level over voxel blocks.

chunkglm.glm.stats_models.fixed_effects against nilearn's ``compute_fixed_effects`` on the same
maps; the graph's shape (one array for every group and contrast, voxel blocks, no task holding
a whole map). The end-to-end parity with fitlins is in test_bids_stats_models_parity.py.
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pytest
from dask.callbacks import Callback
from nilearn.glm.contrasts import Contrast, compute_fixed_effects

from chunkglm.errors import InputError
from chunkglm.glm.stats_models.fixed_effects import FixedEffectsLevel
from chunkglm.graph.fixed_effects import fixed_effects_graph
from chunkglm.kernels.fixed_effects import ROWS, fixed_effects_jobs, t_z_score
from chunkglm.testing.assertions import rel_l2

SHAPE = (10, 11, 9)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
OUTPUTS = ("effect_size", "effect_variance", "stat", "z_score")


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Six runs' effect and variance maps (float32, as the run node writes them): zero outside a
    brain of two disconnected parts (one on the border), each run missing some voxels of the
    brain, one variance with a NaN (nilearn's masker counts it as 0)."""
    folder = tmp_path_factory.mktemp("ffx")
    rng = np.random.default_rng(7)
    brain = np.zeros(SHAPE, dtype=bool)
    brain[2:8, 2:9, 1:7] = True
    brain[0:1, 0:2, 8:9] = True  # a small island, touching the border
    pairs = []
    for index in range(6):
        inside = brain & (rng.uniform(size=SHAPE) > 0.4)
        effect = np.zeros(SHAPE, dtype=np.float32)
        variance = np.zeros(SHAPE, dtype=np.float32)
        effect[inside] = rng.normal(0.5, 1.0, inside.sum())
        variance[inside] = rng.uniform(0.2, 3.0, inside.sum())
        if index == 3:
            variance[4, 4, 4] = np.nan
        paths = (str(folder / f"run-{index}_effect.nii.gz"), str(folder / f"run-{index}_variance.nii.gz"))
        nib.save(nib.Nifti1Image(effect, AFFINE), paths[0])
        nib.save(nib.Nifti1Image(variance, AFFINE), paths[1])
        pairs.append(paths)
    return pairs, brain


def _jobs(pairs):
    # three subjects x one contrast, and a contrast sharing inputs with them (a job of one input too)
    return [pairs[0:2], pairs[2:4], pairs[4:6], [pairs[1], pairs[3], pairs[5]], [pairs[0]]]


def _nilearn(job, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_fixed_effects([e for e, _ in job], [v for _, v in job], **kwargs)


@pytest.mark.parametrize("precision_weighted", [False, True])
def test_fixed_effects_level_equals_nilearn(maps, precision_weighted):
    pairs, brain = maps
    jobs = _jobs(pairs)
    dofs = [30.0 * len(job) + 7 for job in jobs]
    # a budget of a few KiB: several voxel blocks, so block edges are crossed
    with FixedEffectsLevel(jobs, precision_weighted=precision_weighted, dofs=dofs, chunk_bytes=8192) as level:
        assert level.lazy.numblocks[2] > 2
        for index, job in enumerate(jobs):
            ours = level.images(index)
            theirs = _nilearn(job, precision_weighted=precision_weighted, dofs=_split_dof(dofs[index], len(job)))
            for name, img in zip(OUTPUTS, theirs):
                a, b = ours[name].get_fdata(), img.get_fdata()
                # the same mask: nilearn's background mask of the mean effect
                np.testing.assert_array_equal(a != 0, b != 0, err_msg=f"job {index} {name}")
                assert 100 < (a != 0).sum() < brain.sum()  # the voxels no input of the job holds are out
                # nilearn works in float32 on the float32 maps, chunkglm in float64 on the same
                # values: each output differs by the float32 rounding of nilearn's sums and
                # quotients (a few ulp, 6e-8 each, per value: < 1e-6 of the map's norm; z
                # follows t through a smooth map of slope ~1)
                assert rel_l2(a, b) < 1e-6, (index, name, rel_l2(a, b))


def _split_dof(total, n):
    """nilearn takes one dof per input and sums them; the level takes the sum."""
    return [total / n] * n


def test_default_dof_is_nilearns_100_per_input(maps):
    pairs, _ = maps
    job = pairs[0:3]
    with FixedEffectsLevel([job], chunk_bytes=8192) as level:
        ours = level.images(0)["z_score"].get_fdata()
    theirs = _nilearn(job)[3].get_fdata()
    assert rel_l2(ours, theirs) < 1e-6


class _TaskShapes(Callback):
    """Records the shape of every array a task returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, np.ndarray):
            self.shapes.append(result.shape)


def test_one_graph_for_the_level_in_voxel_blocks_no_task_holds_a_whole_map(maps):
    pairs, _ = maps
    jobs = _jobs(pairs)
    with FixedEffectsLevel(jobs, chunk_bytes=8192) as level:
        n_voxels = level.grid.n_voxels
        lazy = level.lazy
        # every job of the level (group x contrast) in one array, one graph
        assert lazy.shape == (len(jobs), len(ROWS), n_voxels)
        blocks = lazy.chunks[2]
        assert len(blocks) > 2 and max(blocks) < n_voxels
        pieces = lazy.to_delayed(optimize_graph=False)  # (job, 1, block) pieces: no final join of the whole array
        with _TaskShapes() as shapes:  # the graph as built (unfused), so each task is seen
            computed = dask.compute(pieces.tolist(), scheduler="sync", optimize_graph=False)[0]
        values = np.concatenate([np.concatenate(row[0], axis=-1) for row in computed])
        n_images = len({pair for job in jobs for pair in job})
        # each stored chunk of each map type is read once, by one task, for all jobs
        reads = [s for s in shapes.shapes if len(s) == 2]
        assert sorted(reads) == sorted([(n_images, b) for b in blocks] * 2)
        # one task per voxel block computes every job of the level
        fits = [s for s in shapes.shapes if len(s) == 3 and s[0] == len(jobs)]
        assert sorted(fits) == sorted((len(jobs), len(ROWS), b) for b in blocks)
        # no task holds more than one voxel block: no whole map anywhere in the graph
        assert max(s[-1] for s in shapes.shapes if s) == max(blocks)
        # the computed graph gives the maps images() returns (mean row aside)
        level.compute()
        for index in range(len(jobs)):
            stored = np.asarray(level._results[index].values)
            np.testing.assert_array_equal(stored, values[index])


def test_irregular_input_blocks_give_regular_result_chunks():
    # zarr needs regular chunks (the last one shorter); task blocks tiling stored chunks may end
    # on a longer one (found: 16 x 3968 voxels then 6072, and to_zarr refused the results)
    rng = np.random.default_rng(3)
    effects, variances = rng.normal(size=(4, 150)), rng.uniform(0.5, 2.0, size=(4, 150))
    jobs = [[0, 1], [2, 3], [1, 2, 3]]
    lazy = fixed_effects_graph(da.from_array(effects, chunks=(4, (40, 40, 70))),
                               da.from_array(variances, chunks=(4, (40, 40, 70))), jobs)
    assert lazy.chunks == ((1, 1, 1), (len(ROWS),), (70, 70, 10))
    np.testing.assert_array_equal(lazy.compute(scheduler="sync"),
                                  fixed_effects_jobs(effects, variances, jobs).astype(np.float32))


def test_a_contrast_with_no_input_is_refused():
    with pytest.raises(InputError, match="at least one input map"):
        FixedEffectsLevel([[("a", "b")], []])


@pytest.mark.parametrize("dof", [1e-3, 0.5, 1.0, 3.0, 100.0, 1234.5, 1e6, 1e10, 1e12, 1e300, np.inf])
def test_t_z_score_is_nilearns_contrast_bit_for_bit(dof):
    """The kernel's z of t values (scipy.special, no nilearn in the worker) is nilearn's
    Contrast.z_score() exactly: ordinary and extreme t (where p or 1 - p is clipped, the sf and cdf
    branches meet, t is +-0, +-inf or NaN), from tiny to capped (1e10) degrees of freedom."""
    t = np.concatenate([np.random.default_rng(3).normal(scale=6.0, size=400),
                        [0.0, -0.0, 1e-300, -1e-300, 1e-8, 8.2, -8.2, 37.5, -37.5, 40.0, -40.0, 1e3, -1e3,
                         1e8, -1e8, 1e300, -1e300, np.inf, -np.inf, np.nan]])
    contrast = Contrast(effect=t.copy(), variance=np.ones_like(t), dim=1, dof=dof, stat_type="t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = contrast.z_score()
    ours = t_z_score(t, dof)
    # the same scipy.special calls on the same float64 values: equal bytes (sign of zero, NaN included)
    assert ours.dtype == expected.dtype and ours.tobytes() == expected.tobytes()
