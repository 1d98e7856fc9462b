"""Max-T permutation engine against nilearn's ``permuted_ols`` on the same inputs.

Tolerances: the engine computes nilearn's formulas on the same float64 values
but sums in a different order (one GEMM per batch of permutations instead of
one dot product per permutation), so t-scores and the max-T null agree to a
few ulps; 1e-10 relative leaves five orders of margin and still catches any
error in the scheme (a wrong dof, a missing confound term or a permutation
applied to the wrong side change t by far more than 1e-10).
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from nilearn.mass_univariate import permuted_ols
from nilearn.mass_univariate._utils import t_score_with_covars_and_normalized_design

from chunkglm.errors import InputError
from chunkglm.graph.permutation import max_t_inference, max_t_null
from chunkglm.kernels import permutation as kp
from chunkglm.testing import assert_close_to_scale, raise_if_dask_computes

RTOL = 1e-10  # see the module docstring
N_SAMPLES, N_VOXELS = 20, 240


def _maps(seed=0, dtype=np.float64, zero_voxel=True, tested=None):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((N_SAMPLES, N_VOXELS)) + 0.2
    signal = np.ones(N_SAMPLES) if tested is None else tested
    maps[:, :30] += 1.5 * signal[:, None]  # an effect of the tested variable: p spans (0, 1]
    if zero_voxel:
        maps[:, 7] = 0.0  # nilearn: NaN t there, ignored by the max
    return maps.astype(dtype)


def _designs():
    rng = np.random.default_rng(42)
    ones = np.ones(N_SAMPLES)
    age = rng.standard_normal(N_SAMPLES)
    group = np.r_[np.ones(N_SAMPLES // 2), np.zeros(N_SAMPLES // 2)]
    other = rng.standard_normal((N_SAMPLES, 2))
    return {  # name: (tested, confounds, model_intercept, sign_flip expected from nilearn's rules)
        "one_sample": (ones, None, True, True),
        "one_sample_confounds": (ones, age[:, None], True, True),
        "covariate_intercept_column": (age, ones[:, None], True, True),  # nilearn flips signs here
        "covariate_added_intercept": (age, None, True, False),
        "covariate_no_intercept": (age, None, False, False),
        "two_sample_confounds": (group, other, True, False),
        "two_sample_confounds_no_intercept": (group - 0.5, other, False, False),
    }


DESIGNS = _designs()


def _nilearn(tested, maps, confounds, model_intercept, n_perm, two_sided, random_state, n_jobs=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-zero voxel, constant columns
        out = permuted_ols(tested, maps, confounding_vars=confounds,
                           model_intercept=model_intercept, n_perm=n_perm,
                           two_sided_test=two_sided, random_state=random_state, n_jobs=n_jobs)
    return {key: np.ravel(value) for key, value in out.items()}


def _ours(tested, maps, confounds, model_intercept, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's constant-columns warning, replicated
        return max_t_inference(maps, tested, confounds, model_intercept, **kwargs)


def _assert_same(ours, ref):
    np.testing.assert_allclose(ours["t"], ref["t"], rtol=RTOL, atol=0, equal_nan=True)
    np.testing.assert_allclose(ours["h0_max_t"], ref["h0_max_t"], rtol=RTOL, atol=0)
    # p-values are ranks: equal as long as no null value ties a t within 1e-10
    np.testing.assert_array_equal(ours["logp_max_t"], ref["logp_max_t"])


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_same_as_nilearn_with_same_random_state(name, two_sided):
    tested, confounds, intercept, sign_flip = DESIGNS[name]
    maps = da.from_array(_maps(tested=tested), chunks=(N_SAMPLES, 70))
    ref = _nilearn(tested, _maps(tested=tested), confounds, intercept, 60, two_sided, random_state=3)
    ours = _ours(tested, maps, confounds, intercept, n_perm=60, two_sided_test=two_sided,
                 random_state=3, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert kp.prepare_design(tested, confounds, intercept).sign_flip is sign_flip
    assert np.isnan(ours["t"][7]) and np.isnan(ref["t"][7])
    assert ref["logp_max_t"].max() > 1.0  # the signal voxels are detected: the test is not trivial
    _assert_same(ours, ref)


def _reference_null(tested, maps, confounds, intercept, perms, two_sided):
    """nilearn's own per-permutation t-score helper on explicitly permuted inputs.

    nilearn cannot take explicit permutations, so this replays its loop
    (``_permuted_ols_on_chunk``) with nilearn's ``t_score_with_covars_and_normalized_design``
    on the residualised pieces, whose t-scores the random-state test checks against
    ``permuted_ols`` itself.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        design = kp.prepare_design(tested, confounds, intercept)
    resid = kp.residualise_block(maps, design)
    rows = []
    for perm in perms:
        if design.sign_flip:
            scores = t_score_with_covars_and_normalized_design(
                design.tested[:, None], resid * perm[:, None], design.covars)
        else:
            covars = None if design.covars is None else design.covars[perm]
            scores = t_score_with_covars_and_normalized_design(
                design.tested[perm][:, None], resid, covars)
        rows.append(np.nanmax(np.abs(scores) if two_sided else scores))
    return np.asarray(rows)


@pytest.mark.parametrize("name", ["one_sample_confounds", "two_sample_confounds"])
def test_explicit_permutations_give_nilearns_statistics(name):
    tested, confounds, intercept, sign_flip = DESIGNS[name]
    rng = np.random.default_rng(7)  # a stream nilearn never draws: only the explicit set matters
    if sign_flip:
        perms = rng.choice([-1.0, 1.0], size=(25, N_SAMPLES))
    else:
        perms = np.stack([rng.permutation(N_SAMPLES) for _ in range(25)])
    maps = _maps()
    ours = _ours(tested, maps, confounds, intercept, permutations=perms, two_sided_test=True)
    ref = _reference_null(tested, maps, confounds, intercept, perms, two_sided=True)
    np.testing.assert_allclose(ours["h0_max_t"], ref, rtol=RTOL, atol=0)
    ref_logp = -np.log10((1 + (ref[None, :] >= np.abs(ours["t"])[:, None]).sum(1)) / 26.0)
    ref_logp[np.isnan(ours["t"])] = 0.0
    np.testing.assert_array_equal(ours["logp_max_t"], ref_logp)


@pytest.mark.parametrize("two_sided", [False, True])
def test_degenerate_voxels_as_nilearn(two_sided):
    """Voxels lying in the design's span and all-NaN voxels.

    Under the identity flip such a voxel has 1 - a2 - b^2 = 0 up to rounding, so
    its t is +-inf, huge, or NaN depending on the last bit of a sum: no two
    summation orders agree there, and both must only say "t is infinite". Under
    other flips the batch max equals nilearn's nanmax of its own t-scores.
    """
    tested, confounds, intercept, _ = DESIGNS["one_sample_confounds"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        design = kp.prepare_design(tested, confounds, intercept)
    resid = kp.residualise_block(_maps(), design)
    resid[:, 0] = design.tested  # exactly the tested variable: |b| = 1 for the identity flip
    resid[:, 1] = -design.tested
    rng = np.random.default_rng(3)
    perms = np.vstack([np.ones(N_SAMPLES), rng.choice([-1.0, 1.0], size=(5, N_SAMPLES))])
    ours = kp.batch_max_t(resid, design, perms, two_sided)
    ref = []
    for perm in perms:
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = t_score_with_covars_and_normalized_design(
                design.tested[:, None], resid * perm[:, None], design.covars)
        ref.append(np.nanmax(np.abs(scores) if two_sided else scores))
    assert ours[0] > 1e6 and ref[0] > 1e6
    np.testing.assert_allclose(ours[1:], ref[1:], rtol=RTOL, atol=0)
    only_nan = kp.batch_max_t(resid[:, 7:8], design, perms, two_sided)  # the all-zero voxel
    assert np.all(np.isnan(only_nan))


def test_explicit_nilearn_stream_equals_random_state():
    tested, confounds, intercept, _ = DESIGNS["covariate_added_intercept"]
    perms = kp.nilearn_permutations(N_SAMPLES, 40, sign_flip=False, random_state=11)
    ref = _nilearn(tested, _maps(), confounds, intercept, 40, False, random_state=11)
    ours = _ours(tested, _maps(), confounds, intercept, permutations=perms)
    _assert_same(ours, ref)


def test_float32_maps_as_nilearn():
    """nilearn normalises float32 maps in float32 first; the engine does the same."""
    tested, confounds, intercept, _ = DESIGNS["one_sample"]
    maps = _maps(dtype=np.float32)
    ref = _nilearn(tested, maps, confounds, intercept, 30, True, random_state=0)
    ours = _ours(tested, da.from_array(maps, chunks=(N_SAMPLES, 100)), confounds, intercept,
                 n_perm=30, two_sided_test=True, random_state=0)
    _assert_same(ours, ref)


def test_n_jobs_stream_as_nilearn():
    """nilearn seeds one stream per job; n_jobs reproduces it (after nilearn's CPU cap)."""
    import joblib

    n_jobs = min(2, joblib.cpu_count())
    tested, confounds, intercept, _ = DESIGNS["one_sample_confounds"]
    ref = _nilearn(tested, _maps(), confounds, intercept, 21, False, random_state=5, n_jobs=n_jobs)
    ours = _ours(tested, _maps(), confounds, intercept, n_perm=21, random_state=5, n_jobs=n_jobs)
    _assert_same(ours, ref)


@pytest.mark.parametrize("name", ["one_sample", "two_sample_confounds"])
def test_chunked_equals_unchunked(name):
    tested, confounds, intercept, _ = DESIGNS[name]
    maps = _maps(seed=4)
    whole = _ours(tested, maps, confounds, intercept, n_perm=50, random_state=2,
                  two_sided_test=True)
    for chunk, batch in [(1, 7), (37, None), (100, 50), (N_VOXELS, 1)]:
        part = _ours(tested, da.from_array(maps, chunks=(N_SAMPLES, chunk)), confounds, intercept,
                     n_perm=50, random_state=2, two_sided_test=True, batch_size=batch)
        # only BLAS blocking can differ between chunkings: a few ulps
        assert_close_to_scale(part["t"], whole["t"], rtol=1e-12)
        assert_close_to_scale(part["h0_max_t"], whole["h0_max_t"], rtol=1e-12)


def test_samples_split_in_chunks_are_joined():
    tested, confounds, intercept, _ = DESIGNS["covariate_added_intercept"]
    maps = da.from_array(_maps(), chunks=(7, 50))
    ours = _ours(tested, maps, confounds, intercept, n_perm=20, random_state=1)
    ref = _nilearn(tested, _maps(), confounds, intercept, 20, False, random_state=1)
    _assert_same(ours, ref)


def test_random_permutations_within_monte_carlo_error_of_nilearn():
    """Different seeds: FWE p-values differ only by Monte Carlo error.

    Each p is a binomial proportion over n_perm permutations; the difference of
    two independent estimates has SE sqrt(2 p (1 - p) / n_perm). 5 SE (floored
    at p = 1/n_perm) plus the 1/(n_perm + 1) step of the (count + 1)/(n_perm + 1)
    convention bounds every voxel; a wrong scheme (e.g. permuting where nilearn
    flips signs, or a missing confound) shifts the null far beyond that.
    """
    tested, confounds, intercept, _ = DESIGNS["covariate_added_intercept"]
    n_perm = 1000
    maps = _maps(seed=9)
    ref = _nilearn(tested, maps, confounds, intercept, n_perm, True, random_state=100)
    ours = _ours(tested, maps, confounds, intercept, n_perm=n_perm, two_sided_test=True,
                 random_state=200)
    assert not np.allclose(ours["h0_max_t"], ref["h0_max_t"])  # really different permutations
    p_ours, p_ref = 10 ** -ours["logp_max_t"], 10 ** -ref["logp_max_t"]
    p_bar = np.clip((p_ours + p_ref) / 2, 1 / n_perm, 1 - 1 / n_perm)
    bound = 5 * np.sqrt(2 * p_bar * (1 - p_bar) / n_perm) + 1 / (n_perm + 1)
    assert np.all(np.abs(p_ours - p_ref) <= bound)


def test_graph_is_lazy_and_reads_each_block_once():
    tested, confounds, intercept, _ = DESIGNS["two_sample_confounds"]
    reads = []

    def counted(block, block_info=None):
        reads.append(block_info[0]["chunk-location"])
        return block

    maps = da.from_array(_maps(), chunks=(N_SAMPLES, 60)).map_blocks(counted, dtype=np.float64)
    with raise_if_dask_computes():
        lazy = max_t_null(maps, tested, confounds, intercept, n_perm=10, random_state=0)
    assert reads == []
    dask.compute(lazy.t, lazy.h0_max_t, scheduler="sync")
    assert sorted(reads) == [(0, i) for i in range(4)]


def test_distributed_client_gives_the_same_numbers():
    from distributed import Client, LocalCluster

    tested, confounds, intercept, _ = DESIGNS["one_sample_confounds"]
    ref = _nilearn(tested, _maps(), confounds, intercept, 30, True, random_state=4)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        ours = _ours(tested, da.from_array(_maps(), chunks=(N_SAMPLES, 80)), confounds, intercept,
                     n_perm=30, two_sided_test=True, random_state=4)
    _assert_same(ours, ref)


def test_fwe_logp_convention():
    null = np.array([1.0, 3.0, 2.0, np.nan])
    logp = kp.fwe_logp(np.array([0.5, 2.0, 2.5, 10.0, np.nan, -5.0]), null, two_sided_test=False)
    # p = (n_perm + 1 - #{null < t}) / (n_perm + 1), n_perm = 4; NaN t -> p = 1
    np.testing.assert_allclose(10 ** -logp, np.array([5, 4, 3, 2, 5, 5]) / 5)
    two = kp.fwe_logp(np.array([-5.0]), null, two_sided_test=True)
    np.testing.assert_allclose(10 ** -two, [2 / 5])


@pytest.mark.parametrize("n_perm", [0, -3, 2.5, True, None])
def test_n_perm_below_one_is_refused(n_perm):
    tested, confounds, intercept, _ = DESIGNS["one_sample"]
    with pytest.raises(InputError, match=r"n_perm must be an integer >= 1; received"):
        max_t_null(_maps(), tested, confounds, intercept, n_perm=n_perm)


def test_bad_inputs_are_explained():
    tested, confounds, intercept, _ = DESIGNS["one_sample"]
    with pytest.raises(InputError, match=r"n_samples=20, n_voxels.*received shape \(19, 240\)"):
        max_t_null(_maps()[:19], tested, confounds, intercept, n_perm=5)
    with pytest.raises(InputError, match=r"only \+1 and -1"):
        max_t_null(_maps(), tested, permutations=np.full((3, N_SAMPLES), 2.0))
    with pytest.raises(InputError, match=r"shape \(n_perm >= 1, n_samples=20\)"):
        max_t_null(_maps(), tested, permutations=np.ones((3, 5)))
    age = DESIGNS["covariate_added_intercept"][0]
    with pytest.raises(InputError, match=r"ordering of 0\.\.19"):
        max_t_null(_maps(), age, permutations=np.zeros((2, N_SAMPLES), dtype=int))
    with pytest.raises(InputError, match=r"one variable .* received shape \(20, 2\)"):
        max_t_null(_maps(), np.ones((N_SAMPLES, 2)), n_perm=5)
    with pytest.raises(InputError, match=r"no degrees of freedom"):  # 3 confound columns, 3 samples
        max_t_null(_maps()[:3], age[:3], np.random.default_rng(0).standard_normal((3, 2)),
                   n_perm=5)
    with pytest.raises(InputError, match=r"batch_size must be a positive integer"):
        max_t_null(_maps(), tested, n_perm=5, batch_size=0)


def test_permutations_equivalent_to_the_original_are_found():
    """Identity and mirror flips, shuffles within equal design rows: +1 / -1; others 0."""
    one_sample = kp.prepare_design(np.ones(4))
    flips = np.array([[1, 1, 1, 1], [-1, -1, -1, -1], [1, -1, 1, 1]], dtype=float)
    np.testing.assert_array_equal(kp.original_equivalents(one_sample, flips), [1, -1, 0])
    two_groups = kp.prepare_design(np.array([0.0, 0.0, 1.0, 1.0]))
    orders = np.array([[1, 0, 3, 2], [2, 3, 0, 1], [0, 2, 1, 3]])
    np.testing.assert_array_equal(kp.original_equivalents(two_groups, orders), [1, -1, 0])


def test_tied_null_maxima_are_the_observed_peak_itself():
    rng = np.random.default_rng(3)
    design = kp.prepare_design(np.ones(6))
    block = rng.normal(0.3, 1.0, (6, 50))
    flips = np.vstack([np.ones(6), -np.ones(6), rng.choice([-1.0, 1.0], (20, 6))])
    for two_sided in (True, False):
        t, null = kp.block_max_t(block, design, flips, two_sided, batch_size=7)
        score = np.abs(t) if two_sided else t
        assert null[0] == score.max()
        assert null[1] == (np.abs(t).max() if two_sided else (-t).max())
