"""Cluster size / mass and TFCE permutation inference against nilearn's ``permuted_ols``.

nilearn runs on the same maps, mask (a NiftiMasker fitted on it), design and
``random_state``; every output it returns is compared.

Tolerances: t maps agree with nilearn's to a few ulps (the GEMM sums in another
order; see tests/test_permutation.py), cluster masses and TFCE values are sums
of such numbers in (nearly) nilearn's order, so 1e-10 relative leaves five
orders of margin while any error in the scheme (a wrong threshold dof, a wrong
connectivity, a missed step of TFCE, a swapped sign) changes them by far more.
Cluster sizes and everything derived from ranks (the p-values) are compared
exactly.
"""

from __future__ import annotations

import warnings

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
from nilearn.maskers import NiftiMasker
from nilearn.mass_univariate import permuted_ols
from nilearn.mass_univariate._utils import calculate_cluster_measures, calculate_tfce, null_to_p
from nilearn.mass_univariate.permuted_least_squares import _compute_t_stat_threshold
from scipy import ndimage

from chunkglm.errors import InputError
from chunkglm.graph.permutation_volumes import volume_null
from chunkglm.kernels import volume_stats as vs
from chunkglm.kernels.permutation import nilearn_permutations, prepare_design

RTOL = 1e-10  # see the module docstring
N_SUBJECTS, SHAPE, N_PERM, THRESHOLD = 15, (12, 14, 12), 20, 0.01
EXACT = {"size", "h0_max_size", "logp_max_t", "logp_max_size", "logp_max_mass", "logp_max_tfce"}


def _data():
    ii, jj, kk = np.indices(SHAPE)
    mask = ((ii - 5.5) ** 2 / 30 + (jj - 6.5) ** 2 / 40 + (kk - 5.5) ** 2 / 30) < 1
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((N_SUBJECTS, *SHAPE))
    volumes = 3 * np.stack([ndimage.gaussian_filter(v, 1.2) for v in noise])  # clusters exist
    volumes[:, 3:6, 4:8, 3:6] += 0.6  # a positive effect
    volumes[:, 7:9, 8:11, 6:9] -= 0.6  # a negative one, for two-sided clusters
    age = rng.standard_normal(N_SUBJECTS)
    volumes[:, 2:5, 8:11, 5:8] += 0.8 * age[:, None, None, None]  # an age effect
    return mask, volumes[:, mask], age, rng.standard_normal(N_SUBJECTS)


MASK, MAPS, AGE, OTHER = _data()
DESIGNS = {  # name: (tested, confounds, two_sided_test)
    "one_sample": (np.ones(N_SUBJECTS), None, False),
    "one_sample_two_sided": (np.ones(N_SUBJECTS), None, True),
    "covariate_two_sided": (AGE, OTHER[:, None], True),
    "covariate": (AGE, OTHER[:, None], False),
}


def _nilearn(name):
    tested, confounds, two_sided = DESIGNS[name]
    masker = NiftiMasker(nib.Nifti1Image(MASK.astype(np.int8), np.diag([2.0, 2, 2, 1]))).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return permuted_ols(tested[:, None], MAPS, confounds, n_perm=N_PERM,
                            two_sided_test=two_sided, random_state=0, masker=masker, tfce=True,
                            threshold=THRESHOLD)


@pytest.fixture(scope="module")
def nilearn_results():
    return {name: _nilearn(name) for name in DESIGNS}


def _ours(name, maps=MAPS, **kwargs):
    tested, confounds, two_sided = DESIGNS[name]
    options = {"n_perm": N_PERM, "random_state": 0, "threshold": THRESHOLD, "tfce": True} | kwargs
    return volume_null(maps, MASK, tested, confounds, two_sided_test=two_sided, **options)


def _assert_like_nilearn(ours, ref):
    assert set(ours) == set(ref)
    for key, expected in ref.items():
        expected = np.ravel(expected)
        assert ours[key].shape == expected.shape, key
        assert ours[key].dtype.kind == expected.dtype.kind, key
        if key in EXACT:
            np.testing.assert_array_equal(ours[key], expected, err_msg=key)
        else:
            atol = RTOL * np.abs(expected).max()  # zeros (background) next to large values
            np.testing.assert_allclose(ours[key], expected, rtol=RTOL, atol=atol, err_msg=key)


@pytest.mark.parametrize("name", list(DESIGNS))
def test_every_output_equals_nilearn(name, nilearn_results):
    ref = nilearn_results[name]
    assert ref["size"].max() > 0 and np.ptp(ref["logp_max_size"]) > 0  # clusters were tested
    assert np.ptp(ref["logp_max_tfce"]) > 0
    _assert_like_nilearn(_ours(name), ref)


def test_explicit_permutations(nilearn_results):
    tested, _, _ = DESIGNS["covariate_two_sided"]
    perms = nilearn_permutations(N_SUBJECTS, N_PERM, sign_flip=False, random_state=0)
    ours = _ours("covariate_two_sided", permutations=perms, random_state=None)
    _assert_like_nilearn(ours, nilearn_results["covariate_two_sided"])
    reverse = _ours("covariate_two_sided", permutations=perms[::-1], random_state=None)
    for key in ("h0_max_t", "h0_max_size", "h0_max_mass", "h0_max_tfce"):
        np.testing.assert_array_equal(reverse[key], ours[key][::-1], err_msg=key)


def test_batch_size_does_not_change_results():
    results = [_ours("one_sample_two_sided", n_perm=9, batch_size=b) for b in (1, 4, None)]
    for other in results[1:]:
        for key, value in results[0].items():
            np.testing.assert_array_equal(other[key], value, err_msg=key)


def test_dask_maps_chunked_over_voxels(nilearn_results):
    maps = da.from_array(MAPS, chunks=(5, 150))  # sample axis split too: joined
    _assert_like_nilearn(_ours("covariate", maps=maps), nilearn_results["covariate"])


def test_distributed_local_cluster(nilearn_results):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        ours = _ours("one_sample_two_sided", batch_size=5)
    _assert_like_nilearn(ours, nilearn_results["one_sample_two_sided"])


@pytest.mark.parametrize("two_sided", [False, True])
def test_kernels_on_a_volume_with_nan_and_background(two_sided):
    rng = np.random.default_rng(3)
    volume = ndimage.gaussian_filter(rng.standard_normal((9, 10, 8)), 1.0) * 6
    volume[4, 5, 3] = np.nan  # an all-zero voxel's t
    padded = np.pad(volume, 2)  # nilearn's full volume: zeros around the mask's box
    expected = calculate_tfce(padded[..., None], vs.FACE_CONNECTIVITY, two_sided_test=two_sided)
    ours = vs.tfce_volume(volume, two_sided, has_background=True)
    np.testing.assert_allclose(ours, expected[2:-2, 2:-2, 2:-2, 0], rtol=1e-13)
    # The sparse TFCE (connected components per height; boxes of >= 32768 voxels) on an
    # irregular mask, NaN included: same numbers summed in the same order, equal to the bit.
    big = ndimage.gaussian_filter(rng.standard_normal((36, 38, 34)), 1.5) * 8
    big[17, 18, 16] = np.nan
    ii, jj, kk = np.indices(big.shape)
    mask = ((ii - 17.5) ** 2 / 18**2 + (jj - 18.5) ** 2 / 19**2 + (kk - 16.5) ** 2 / 17**2) < 1
    geometry = vs.volume_geometry(mask)
    assert geometry.box_mask.size >= vs._SPARSE_TFCE_MIN_BOX
    masked = np.where(mask, big, 0.0)
    expected = calculate_tfce(masked[..., None], vs.FACE_CONNECTIVITY, two_sided_test=two_sided)
    np.testing.assert_array_equal(vs.tfce_voxels(masked[mask], geometry, two_sided),
                                  expected[mask, 0])
    full = -np.abs(volume) - 0.1  # no background and all negative: nilearn's heights go negative
    np.testing.assert_allclose(vs.tfce_volume(full, two_sided, has_background=False),
                               calculate_tfce(full[..., None], vs.FACE_CONNECTIVITY,
                                              two_sided_test=two_sided)[..., 0], rtol=1e-13)
    full_geometry = vs.volume_geometry(np.ones(full.shape, dtype=bool))
    np.testing.assert_allclose(vs.tfce_voxels(full.ravel(), full_geometry, two_sided),
                               vs.tfce_volume(full, two_sided, has_background=False).ravel())
    sizes, masses = calculate_cluster_measures(padded[..., None], 0.8, vs.FACE_CONNECTIVITY,
                                               two_sided_test=two_sided)
    size, mass = vs.max_cluster_measures(volume, 0.8, two_sided)
    assert size == sizes[0] > 0
    np.testing.assert_allclose(mass, masses[0], rtol=1e-13)
    sizes, masses = calculate_cluster_measures(masked[..., None], 2.5, vs.FACE_CONNECTIVITY,
                                               two_sided_test=two_sided)
    size, mass = vs.max_cluster_measures_voxels(masked[mask], geometry, 2.5, two_sided)
    assert size == sizes[0] > 1
    np.testing.assert_allclose(mass, masses[0], rtol=1e-13)
    assert vs.max_cluster_measures_voxels(masked[mask], geometry, 1e3, two_sided) == (0, 0.0)


@pytest.mark.parametrize("two_sided", [False, True])
def test_tfce_labels_a_volume_only_at_heights_that_change_its_voxels(two_sided, monkeypatch):
    # A t map of 1 degree of freedom (heavy tails: a few voxels far above the rest) leaves
    # the same supra-threshold voxels over most of the 100 heights; those reuse the labels
    # of the height below, and the values stay nilearn's.
    rng = np.random.default_rng(5)
    volume = rng.standard_t(1, size=(8, 9, 7))
    volume[3, 4, 2] = np.nan
    expected = calculate_tfce(np.pad(volume, 2)[..., None], vs.FACE_CONNECTIVITY,
                              two_sided_test=two_sided)[2:-2, 2:-2, 2:-2, 0]
    calls = []
    label = vs.ndimage.label
    monkeypatch.setattr(vs.ndimage, "label", lambda *a, **k: calls.append(1) or label(*a, **k))
    ours = vs.tfce_volume(volume, two_sided, has_background=True)
    np.testing.assert_allclose(ours, expected, rtol=1e-13)
    assert 0 < len(calls) < 50 * (1 + two_sided)  # was one labelling per height and sign


def test_null_to_p_and_cluster_threshold_as_nilearn():
    rng = np.random.default_rng(1)
    null = rng.integers(0, 30, 50).astype(float)
    values = np.r_[0.0, rng.integers(0, 40, 30), 100.0]
    np.testing.assert_array_equal(vs.null_to_p_larger(values, null),
                                  null_to_p(values, null, "larger"))
    # nilearn's own threshold, given the confounds it builds (OTHER plus its added intercept)
    for two_sided in (False, True):
        expected = _compute_t_stat_threshold(0.01, two_sided, AGE[:, None],
                                             np.c_[OTHER, np.ones(15)])
        n_columns = vs.nilearn_confound_columns(AGE, OTHER)
        assert vs.cluster_forming_t(0.01, two_sided, 15, n_columns) == expected
    # one-sample test with an intercept column: nilearn drops it, keeps OTHER
    assert vs.nilearn_confound_columns(np.ones(15), np.c_[np.ones(15), OTHER]) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": MASK.astype(int)}, "3-D boolean"),
    ({"mask": MASK[:, :, :5]}, "n_voxels="),
    ({"threshold": 1.5}, "must lie in \\(0, 1\\)"),
    ({"threshold": 0.0}, "must lie in \\(0, 1\\)"),
    ({"threshold": 0.7}, "cluster-forming t of .* <= 0"),
    ({"n_perm": 0}, "n_perm must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"permutations": np.ones((3, N_SUBJECTS)) * 2}, "only \\+1 and -1"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    options = {"n_perm": 5, "threshold": 0.01} | kwargs
    mask = options.pop("mask", MASK)
    with pytest.raises(InputError, match=message):
        volume_null(MAPS, mask, np.ones(N_SUBJECTS), **options)


def test_design_is_nilearns_sign_flip_for_one_sample():
    assert prepare_design(np.ones(N_SUBJECTS)).sign_flip
    assert not prepare_design(AGE, OTHER[:, None]).sign_flip
