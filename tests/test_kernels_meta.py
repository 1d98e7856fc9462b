"""IBMA kernels against PyMARE 0.0.13 run as NiMARE 0.22 runs it, and closed forms.

Tolerances
----------
- Combination tests: same formulas and the same scipy special functions as
  PyMARE; only summation order differs -> rtol 1e-10.
- Closed-form meta-regressions (WLS, DerSimonian-Laird, Hedges, FE Hedges):
  PyMARE multiplies by (X'WX)^-1 inside an einsum where we divide, ~1e-14
  relative in est; p in the tail amplifies a relative error in z by ~z^2
  (z <= ~8 here), so rtol 1e-9 is ample yet catches any formula change.
- Likelihood estimators: PyMARE stops its bracketed search at xtol=1e-6 of the
  scan bracket / ftol=1e-12 of the objective, so its tau^2 is accurate to
  ~1e-6 relative only. We therefore check (1) our optimum is at least as good:
  nll(ours) <= nll(PyMARE) + 1e-9 (1 + |nll|); (2) the maps agree with
  PyMARE's to rtol 1e-4 (tau^2 with an absolute slack of 1e-5 of the total
  variance, for optima near 0); (3) everything after tau^2 equals PyMARE's
  WLS + Knapp-Hartung at *our* tau^2 to rtol 1e-9 (closed form again).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pymare
import pytest
from scipy import optimize, stats

from _meta_reference import combination_maps, hedges_g, regression_maps
from chunkglm.errors import InputError
from chunkglm.kernels import meta
from chunkglm.testing import assert_close_to_scale

CLOSED_RTOL = 1e-9
COMBINATION_RTOL = 1e-10


def _assert_maps(ours, ref, rtol, atol=0.0, names=None):
    for name in names or ref:
        np.testing.assert_array_equal(np.isnan(ours[name]), np.isnan(ref[name]), err_msg=name)
        np.testing.assert_allclose(ours[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


def _data(n_studies, n_voxels=200, seed=0):
    """Effects with per-voxel heterogeneity from none to dominant, plus 2 constant voxels."""
    rng = np.random.default_rng(seed + n_studies)
    v = rng.uniform(0.05, 1.0, (n_studies, n_voxels))
    tau2 = rng.choice([0.0, 0.05, 0.5, 3.0], n_voxels)
    mu = rng.normal(0.0, 1.0, n_voxels)
    y = mu + rng.normal(size=(n_studies, n_voxels)) * np.sqrt(v + tau2)
    y[:, :2] = 0.7  # no dispersion at all: Knapp-Hartung scale 0 -> undefined maps
    n = rng.integers(12, 90, n_studies).astype(float)
    return y, v, n


@pytest.fixture(params=[5, 12], ids=["K5", "K12"])
def data(request):
    return _data(request.param)


# --------------------------------------------------------------------------- combination tests


@pytest.mark.parametrize("name", ["Fishers", "Stouffers"])
@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("use_sample_size", [False, True])
def test_combination_tests_match_pymare(data, name, two_sided, use_sample_size):
    y, _, n = data
    z = 2.0 * y
    z[:, 2] = 40.0  # p underflows to 0; logp must stay finite as PyMARE's log-space tail
    kernel = meta.fishers if name == "Fishers" else meta.stouffers
    weights = None
    if use_sample_size:  # NiMARE: Fishers weights n, Stouffers weights sqrt(n)
        weights = n if name == "Fishers" else np.sqrt(n)
    ours = kernel(z, use_sample_size=use_sample_size, sample_sizes=n, two_sided=two_sided)
    assert tuple(ours) == ("z", "p", "logp", "dof")
    _assert_maps(ours, combination_maps(name, z, two_sided, weights), COMBINATION_RTOL)
    assert np.isfinite(ours["logp"][2]) and ours["logp"][2] > 300


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name, kernel", [("WeightedLeastSquares", meta.weighted_least_squares),
                                          ("DerSimonianLaird", meta.dersimonian_laird),
                                          ("Hedges", meta.hedges)])
def test_closed_form_regressions_match_pymare(data, name, kernel):
    y, v, _ = data
    ref, _ = regression_maps(name, pymare.Dataset(y=y, v=v))
    ours = kernel(y, v)
    assert tuple(ours) == tuple(ref)
    _assert_maps(ours, ref, CLOSED_RTOL)
    if name != "WeightedLeastSquares":  # KH: zero residual dispersion -> undefined, as PyMARE
        assert np.isnan(ours["z"][:2]).all() and np.isnan(ours["p"][:2]).all()


@pytest.mark.parametrize("correction", ["wald", "knapp-hartung", "knapp-hartung-conservative"])
def test_small_sample_corrections_match_pymare(correction):
    y, v, _ = _data(7)
    for name, kernel in [("DerSimonianLaird", meta.dersimonian_laird),
                         ("WeightedLeastSquares", meta.weighted_least_squares)]:
        ref, _ = regression_maps(name, pymare.Dataset(y=y, v=v), small_sample_correction=correction)
        _assert_maps(kernel(y, v, small_sample_correction=correction), ref, CLOSED_RTOL)


def test_weighted_least_squares_tau2_and_rescale_reduction():
    """A given tau^2 (scalar or per voxel); without groups 'rescale' (NiMARE's) = 'individual'."""
    y, v, _ = _data(6)
    tau2 = np.linspace(0.0, 2.0, y.shape[1])
    ref, _ = regression_maps("WeightedLeastSquares", pymare.Dataset(y=y, v=v), tau2=tau2)
    _assert_maps(meta.weighted_least_squares(y, v, tau2=tau2), ref, CLOSED_RTOL)
    individual, _ = regression_maps("WeightedLeastSquares", pymare.Dataset(y=y, v=v),
                                    weight_scheme="individual", tau2=0.3)
    rescale, _ = regression_maps("WeightedLeastSquares", pymare.Dataset(y=y, v=v), tau2=0.3)
    _assert_maps(rescale, individual, rtol=0.0)


def test_fixed_effects_hedges_matches_pymare(data):
    y, _, n = data
    t = 3.0 * y
    g, var_g = hedges_g(t, n)
    ref, _ = regression_maps("FixedEffectsHedges", pymare.Dataset(y=g, v=var_g))
    _assert_maps(meta.fixed_effects_hedges(t, n), ref, CLOSED_RTOL)


# --------------------------------------------------------------------------- likelihoods


def _check_likelihood(ours, ref, our_nll, ref_nll, y, v_of, rtol_maps=1e-4):
    """Optimum at least as good as PyMARE's; maps close; post-tau^2 maps exact at our tau^2."""
    assert np.all(our_nll <= ref_nll + 1e-9 * (1.0 + np.abs(ref_nll)))
    total = ours["tau2"] + ours.get("sigma2", 0.0)
    np.testing.assert_allclose(ours["tau2"], ref["tau2"], rtol=rtol_maps, atol=1e-5 * total.max())
    defined = ~np.isnan(ref["z"])
    for name in ("z", "p", "est", "se"):
        np.testing.assert_allclose(ours[name][defined], ref[name][defined], rtol=rtol_maps,
                                   atol=1e-12, err_msg=name)
    at_ours, _ = regression_maps("WeightedLeastSquares", pymare.Dataset(y=y, v=v_of(ours)),
                                 tau2=ours["tau2"], small_sample_correction="knapp-hartung")
    _assert_maps(ours, at_ours, CLOSED_RTOL, names=("z", "p", "logp", "est", "se", "dof"))


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_variance_based_likelihood_matches_pymare(data, method):
    y, v, _ = data
    ref, est = regression_maps("VarianceBasedLikelihood", pymare.Dataset(y=y, v=v), method=method)
    ours = meta.variance_based_likelihood(y, v, method=method)
    assert tuple(ours) == tuple(ref)
    ref_nll = est._nll_func(ref["tau2"], y, v, np.ones((y.shape[0], 1)))
    our_nll = meta.variance_based_nll(y, v, ours["tau2"], method)
    _check_likelihood(ours, ref, our_nll, ref_nll, y, lambda maps: v)


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_sample_size_based_likelihood_matches_pymare(data, method):
    y, _, n = data
    y = y[:, 2:]  # constant voxels leave sigma^2 and tau^2 unidentified
    n_block = np.tile(n, (y.shape[1], 1)).T  # NiMARE tiles n to (K, V)
    ref, est = regression_maps("SampleSizeBasedLikelihood", pymare.Dataset(y=y, n=n_block),
                               method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = meta.sample_size_based_likelihood(y, n, method=method)
    assert tuple(ours) == tuple(ref)
    ratio = (lambda m: m["tau2"] / (m["tau2"] + m["sigma2"]))
    ref_nll = est._nll_func(ratio(ref), y, n_block, np.ones((y.shape[0], 1)))
    our_nll = meta.sample_size_based_nll(y, n, ratio(ours), method)
    _check_likelihood(ours, ref, our_nll, ref_nll, y, lambda m: m["sigma2"] / n[:, None])
    np.testing.assert_allclose(ours["sigma2"], ref["sigma2"], rtol=1e-4,
                               atol=1e-5 * (ours["tau2"] + ours["sigma2"]).max())


def test_likelihood_tau2_is_a_stationary_point():
    """Interior optima have zero slope (finite differences); boundary optima rise from 0."""
    y, v, _ = _data(9, n_voxels=60, seed=3)
    for method in ("ml", "reml"):
        tau2 = meta.variance_based_likelihood(y, v, method=method)["tau2"]
        h = 1e-5 * (1.0 + tau2)
        up = meta.variance_based_nll(y, v, tau2 + h, method)
        here = meta.variance_based_nll(y, v, tau2, method)
        down = meta.variance_based_nll(y, v, np.maximum(tau2 - h, 0.0), method)
        assert np.all(up >= here - 1e-12) and np.all(down >= here - 1e-12)
        assert (tau2 == 0).any() and (tau2 > 0).any()


def test_reml_finds_the_global_optimum_of_a_bimodal_profile():
    """Variances over 4 decades: REML profile with a local minimum (tau^2 ~ 0.0044) inside the
    coarse scan bracket of the global one (~0.0311), from a sweep against PyMARE."""
    y = np.array([-11.772587856770716, -2.956474855147237, -3.53532590289352, -3.7548050582390626,
                  -3.652551867759, -6.285265331055507, -3.7285468240268473, -2.7827440020976377,
                  -9.881872330558526, -2.182722466574977, -3.8352391400325234, -5.725188391980511])
    v = np.array([18.001905820618486, 0.15850739754513662, 0.6708368848259023, 0.09443962557066153,
                  0.39338110733533455, 4.124234168731175, 0.004861008302287309, 0.16887862697555792,
                  35.72369299889942, 14.351986575034511, 0.006983705761637575, 2.028470072444187])
    tau2 = meta.variance_based_likelihood(y[:, None], v[:, None], method="reml")["tau2"][0]
    grid = np.linspace(0.0, 0.1, 4001)
    profile = meta.variance_based_nll(np.repeat(y[:, None], grid.size, 1),
                                      np.repeat(v[:, None], grid.size, 1), grid, "reml")
    assert meta.variance_based_nll(y[:, None], v[:, None], np.array([tau2]), "reml")[0] <= profile.min()
    assert tau2 == pytest.approx(0.0311087, rel=1e-5)


# --------------------------------------------------------------------------- PermutedOLS


def test_permuted_ols_parametric_matches_ttest(data):
    y, _, n = data
    y = y[:, 2:]
    k = y.shape[0]
    ours = meta.permuted_ols_parametric(y)
    ref_t = stats.ttest_1samp(y, 0.0, axis=0).statistic
    # scipy forms t from mean and std in its own order: ulps of the data's scale, so t (and z)
    # near 0 are compared to the maps' scale; p is well conditioned element by element
    assert_close_to_scale(ours["t"], ref_t, rtol=1e-10)
    np.testing.assert_allclose(ours["p"], 2 * stats.t.sf(np.abs(ref_t), k - 1), rtol=1e-9)
    ref_z = np.sign(ref_t) * stats.norm.isf(stats.t.sf(np.abs(ref_t), k - 1))
    assert_close_to_scale(ours["z"], ref_z, rtol=1e-9)
    np.testing.assert_allclose(ours["logp"], -np.log10(ours["p"]), rtol=1e-6)  # float32 map
    one = meta.permuted_ols_parametric(y, two_sided=False)
    np.testing.assert_allclose(one["p"], stats.t.sf(ref_t, k - 1), rtol=1e-9)
    np.testing.assert_array_equal(ours["dof"], k - 1)


def test_permuted_ols_sample_size_weights_match_pymare(data):
    y, _, n = data
    ours = meta.permuted_ols_parametric(y, use_sample_size=True, sample_sizes=n)
    suff = pymare.stats.weighted_intercept_cr2_sufficient_statistics(y, n)
    ref_t = pymare.stats.weighted_intercept_cr2(np.ones((1, y.shape[0])), suff)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref_dof = pymare.stats.satterthwaite_dof(np.ones((y.shape[0], 1)), n[:, None],
                                                 np.arange(y.shape[0]))
    np.testing.assert_array_equal(np.isnan(ours["t"]), np.isnan(ref_t))
    assert_close_to_scale(ours["t"], ref_t, rtol=1e-10)  # see above: t near 0
    np.testing.assert_allclose(ours["dof"], float(np.ravel(ref_dof)[0]), rtol=1e-10)


# --------------------------------------------------------------------------- old API


def test_ffx_glm_one_voxel_by_hand():
    con = np.array([[1.0], [2.0], [0.5], [1.5]])
    se = np.array([[0.5], [1.0], [0.25], [0.5]])
    w = 1.0 / se[:, 0] ** 2
    est = (w * con[:, 0]).sum() / w.sum()
    sd = np.sqrt(1.0 / w.sum())
    out = meta.ffx_glm(con, se)
    assert out["est"][0] == pytest.approx(est, rel=1e-14)
    assert out["se"][0] == pytest.approx(sd, rel=1e-14)
    assert out["t"][0] == pytest.approx(est / sd, rel=1e-14)
    assert out["dof"][0] == 3
    assert out["p"][0] == pytest.approx(2 * stats.t.sf(est / sd, 3), rel=1e-10)
    assert out["z"][0] == pytest.approx(stats.norm.isf(stats.t.sf(est / sd, 3)), rel=1e-10)
    with_n = meta.ffx_glm(con, se, sample_sizes=np.array([10, 20, 30, 40]))
    assert with_n["dof"][0] == 3 + (9 + 19 + 29 + 39)


def test_rfx_glm_equals_ttest(data):
    y, _, _ = data
    for two_sided in (True, False):
        out = meta.rfx_glm(y, two_sided=two_sided)
        ref = stats.ttest_1samp(y[:, 2:], 0.0, axis=0,
                                alternative="two-sided" if two_sided else "greater")
        assert_close_to_scale(out["t"][2:], ref.statistic, rtol=1e-10)  # t near 0: data scale
        np.testing.assert_allclose(out["p"][2:], ref.pvalue, rtol=1e-9)
        # Constant voxels: zero spread gives t = 0, p = 1 (old NiMARE's NaN -> 0 / 1), where
        # scipy's rounding residue of the standard deviation gives t = +-huge.
        np.testing.assert_array_equal(out["t"][:2], 0.0)
        np.testing.assert_array_equal(out["p"][:2], 1.0 if two_sided else 0.5)


def _reml_nll_scalar(tau2, y, v):
    w = 1.0 / (v + tau2)
    b = (w * y).sum() / w.sum()
    return 0.5 * (np.log(v + tau2).sum() + (w * (y - b) ** 2).sum() + np.log(w.sum()))


def test_mfx_glm_reml_tau2_against_brute_force_and_ffx_limit(data):
    y, v, _ = data
    se = np.sqrt(v)
    out = meta.mfx_glm(y, se)
    for j in range(2, 12):  # a few voxels, scipy's bounded scalar minimiser per voxel
        hi = 10.0 * (y[:, j].var() + v[:, j].max())
        res = optimize.minimize_scalar(_reml_nll_scalar, bounds=(0.0, hi), args=(y[:, j], v[:, j]),
                                       method="bounded", options={"xatol": 1e-12})
        assert _reml_nll_scalar(out["tau2"][j], y[:, j], v[:, j]) <= res.fun + 1e-10
        assert out["tau2"][j] == pytest.approx(res.x, rel=1e-4, abs=1e-6)
    zero = out["tau2"] == 0  # tau^2 = 0 reduces to fixed effects exactly
    assert zero.any()
    ffx = meta.ffx_glm(y, se)
    for name in ("est", "se", "t", "z", "p"):
        assert_close_to_scale(out[name][zero], ffx[name][zero], rtol=1e-12, err_msg=name)
    np.testing.assert_array_equal(out["dof"], y.shape[0] - 1)


# --------------------------------------------------------------------------- sign-flip nulls


def _flips(n_iters, k, seed=0):
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_iters, k))


def test_sign_flip_null_equals_naive_loop():
    y = _data(8, n_voxels=42)[0][:, 2:]  # no constant voxel: scipy's t there is rounding noise
    flips = _flips(300, 8)
    flips[0] = 1.0  # the identity flip ties with the observed t: counted as equal, as scipy's
    t_obs = meta.rfx_glm(y)["t"]
    naive = np.array([np.nan_to_num(stats.ttest_1samp(y * f[:, None], 0.0, axis=0).statistic, nan=0.0)
                      for f in flips])
    np.testing.assert_allclose(meta.sign_flip_t(y, flips), naive, rtol=1e-10, atol=1e-12)
    max_null = meta.sign_flip_max_null(y, flips, two_sided=True)
    np.testing.assert_allclose(max_null, np.abs(naive).max(axis=1), rtol=1e-10)
    # Old NiMARE's per-voxel p: null_to_p(t, null) = percentileofscore (kind="rank"),
    # two-tailed, clipped to [1e-16, 1 - 1e-16]; t and the null both from ttest_1samp.
    naive_p = np.empty(y.shape[1])
    scipy_t = stats.ttest_1samp(y, 0.0, axis=0).statistic
    for j in range(y.shape[1]):
        pct = stats.percentileofscore(naive[:, j], scipy_t[j], kind="rank")
        naive_p[j] = (50 - np.abs(pct - 50.0)) * 2.0 / 100.0
    naive_p = np.clip(naive_p, 1e-16, 1 - 1e-16)
    out = meta.rfx_glm(y, sign_flips=flips)
    np.testing.assert_allclose(out["p"], naive_p, rtol=1e-12)
    assert (out["p"] < 0.05).any() or (out["p"] > 0.05).any()
    np.testing.assert_allclose(np.abs(out["z"]), stats.norm.isf(naive_p / 2), rtol=1e-9)
    assert np.all(np.sign(out["z"]) == np.where(t_obs == 0, 1, np.sign(t_obs)))


def test_sign_flip_max_null_ignores_constant_voxels_as_nimare():
    """NiMARE's _permutation_maxima takes nanmax: a constant voxel (NaN t) never sets the max."""
    y = _data(6, n_voxels=30, seed=8)[0]
    y[:, :2] = 0.5  # binary-exact: under a uniform flip K SS - S^2 is exactly 0, so t is NaN
    flips = _flips(50, 6, seed=3)
    flips[0], flips[1] = 1.0, -1.0
    k = y.shape[0]
    naive = np.array([np.nanmax(meta.one_sample_t((f[:, None] * y).sum(0), (y * y).sum(0), k))
                      for f in flips])
    assert np.isnan(meta.sign_flip_t(y, flips[:2], constant_as_zero=False)[:, :2]).all()
    # rtol: BLAS sums the flipped values in its own order (~1e-16 relative on t)
    np.testing.assert_allclose(meta.sign_flip_max_null(y, flips, two_sided=False), naive, rtol=1e-12)
    assert np.isnan(meta.sign_flip_max_null(y[:, :2], flips[:2])).all()


def test_sign_flip_counts_add_up_over_flip_batches():
    y, _, _ = _data(6, n_voxels=30, seed=5)
    flips = _flips(100, 6, seed=2)
    t_obs = meta.rfx_glm(y)["t"]
    whole = meta.sign_flip_counts(y, flips, t_obs)
    parts = [meta.sign_flip_counts(y, f, t_obs) for f in (flips[:37], flips[37:])]
    np.testing.assert_array_equal(whole[0], parts[0][0] + parts[1][0])
    np.testing.assert_array_equal(whole[1], parts[0][1] + parts[1][1])


# --------------------------------------------------------------------------- blocking


def _kernel_args(name, y, v, n):
    arrays = {"z": 2.0 * y, "beta": y, "con": y, "t": 3.0 * y, "varcope": v, "se": np.sqrt(v),
              "sample_sizes": n}
    return [arrays[a] for a in meta.INPUTS[name]]


@pytest.mark.parametrize("name", sorted(meta.KERNELS))
def test_chunked_equals_unchunked(name):
    """Each voxel's result depends only on that voxel: 4 blocks give the whole bit for bit."""
    y, v, n = _data(12, n_voxels=150, seed=11)  # K >= 8: numpy would sum a lone column pairwise
    if name == "SampleSizeBasedLikelihood":
        y, v = y[:, 2:], v[:, 2:]
    kernel = meta.KERNELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        whole = kernel(*_kernel_args(name, y, v, n))
        cuts = [0, 1, 41, 97, y.shape[1]]  # incl. a one-voxel block
        parts = [kernel(*_kernel_args(name, y[:, a:b], v[:, a:b], n)) for a, b in zip(cuts, cuts[1:])]
    assert tuple(whole) == meta.OUTPUTS[name]
    for key, values in whole.items():
        assert values.shape == (y.shape[1],) and values.dtype == np.float64
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), values, err_msg=key)


def test_fortran_ordered_blocks_give_the_same_bits():
    """Dask may hand a kernel F-ordered blocks; the layout must not change a single bit."""
    y, v, n = _data(12, n_voxels=60, seed=4)
    y, v = y[:, 2:], v[:, 2:]
    for name, kernel in meta.KERNELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            c_order = kernel(*_kernel_args(name, y, v, n))
            f_order = kernel(*_kernel_args(name, np.asfortranarray(y), np.asfortranarray(v), n))
        for key in c_order:
            np.testing.assert_array_equal(f_order[key], c_order[key], err_msg=f"{name} {key}")


# --------------------------------------------------------------------------- errors, speed


def test_bad_inputs_raise_input_error():
    y, v, n = _data(5, n_voxels=10)
    with pytest.raises(InputError, match="same shape"):
        meta.dersimonian_laird(y, v[:, :5])
    with pytest.raises(InputError, match="one row per study"):
        meta.weighted_least_squares(y, v[:4])
    with pytest.raises(InputError, match="n_studies >= 2"):
        meta.stouffers(y[0])
    with pytest.raises(InputError, match="same sample size"):
        meta.sample_size_based_likelihood(y, np.full(5, 20.0))
    with pytest.raises(InputError, match="sample_sizes must have shape"):
        meta.fishers(y, use_sample_size=True, sample_sizes=n[:3])
    with pytest.raises(InputError, match="small_sample_correction"):
        meta.hedges(y, v, small_sample_correction="none")
    with pytest.raises(InputError, match="method"):
        meta.variance_based_likelihood(y, v, method="mle")
    with pytest.raises(InputError, match=r"\+1/-1"):
        meta.sign_flip_t(y, np.zeros((3, 5)))


def test_variance_based_likelihood_speed_is_printed():
    """Vectorisation sanity (printed, not asserted): 5,000 voxels x K=30, REML."""
    rng = np.random.default_rng(0)
    v = rng.uniform(0.1, 1.0, (30, 5000))
    y = rng.normal(size=(30, 5000)) * np.sqrt(v + rng.choice([0.0, 0.5], 5000))
    start = time.perf_counter()
    meta.variance_based_likelihood(y, v, method="reml")
    elapsed = time.perf_counter() - start
    print(f"\nVarianceBasedLikelihood REML, 5000 voxels x 30 studies: {elapsed:.3f} s")


def test_log_ksum_matches_the_sum_of_logs_and_ignores_the_layout():
    from chunkglm.kernels.meta import _ksum, _log_ksum

    rng = np.random.default_rng(5)
    for n_studies in (1, 3, 8, 9, 30, 301):
        values = rng.uniform(1e-3, 1e3, (n_studies, 400))
        values[:, 7] = 1e-200  # partial products underflow: this voxel takes the plain sum
        values[:, 9] = 1e200
        plain = _ksum(np.log(values))
        grouped = _log_ksum(values)
        # the grouped products round once per multiplication: a few ulps of the total
        np.testing.assert_allclose(grouped, plain, rtol=1e-13, atol=1e-12 * n_studies)
        np.testing.assert_array_equal(grouped[[7, 9]], plain[[7, 9]])
        # a voxel alone, or in a Fortran-ordered block, gives the same bits
        np.testing.assert_array_equal(_log_ksum(values[:, 3:4]), grouped[3:4])
        np.testing.assert_array_equal(_log_ksum(np.asfortranarray(values)), grouped)
