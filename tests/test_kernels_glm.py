"""GLM kernels against nilearn's run_glm / compute_contrast on the same arrays.

Tolerances: both sides compute in float64; nilearn uses pinv and explicit
whitening, the kernels inverse Gram matrices and moments. For well-conditioned
designs these agree to ~1e-10 relative; 1e-8 leaves room for BLAS order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.contrasts import compute_contrast
from nilearn.glm.first_level import make_first_level_design_matrix, run_glm

from chunkglm.kernels import glm as k
from chunkglm.testing import assert_close_to_scale

RTOL = 1e-8


def _design(n_time=150, tr=2.0, with_confounds=False, hrf="glover"):
    rng = np.random.default_rng(0)
    onsets = np.arange(10, n_time * tr - 20, 12.0)
    events = pd.DataFrame({"onset": onsets, "duration": 2.0,
                           "trial_type": np.where(np.arange(len(onsets)) % 2, "a", "b")})
    frame_times = np.arange(n_time) * tr + tr / 2
    confounds = pd.DataFrame(rng.normal(size=(n_time, 3)), columns=["m1", "m2", "m3"]) if with_confounds else None
    X = make_first_level_design_matrix(frame_times, events, hrf_model=hrf, drift_model="cosine",
                                       high_pass=0.01, add_regs=confounds)
    return X


def _data(X, n_vox=400, rho=0.4, seed=1):
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=(X.shape[1], n_vox)) * 5
    beta[-1] = 1000 + rng.normal(size=n_vox) * 50  # constant column
    noise = rng.normal(size=(X.shape[0], n_vox)) * 10
    rhos = rng.uniform(-0.2, 0.8, n_vox) if rho is None else np.full(n_vox, rho)
    for t in range(1, X.shape[0]):
        noise[t] += rhos * noise[t - 1]
    return (X.to_numpy() @ beta + noise).astype(np.float32)


def _fit(X, Y, noise_model):
    dm = k.DesignMoments.from_design(X.to_numpy())
    bm = k.block_moments(X.to_numpy(), Y)
    df = X.shape[0] - np.linalg.matrix_rank(X.to_numpy())
    if noise_model == "ols":
        return k.fit_whitened(dm, bm, np.zeros(Y.shape[1]), df)
    beta, stats = k.ols_residual_stats(dm, bm)
    grand_mean = stats.e_sum.sum() / (X.shape[0] * Y.shape[1])
    rho = k.bin_ar1(k.yule_walker_ar1(stats, grand_mean, X.shape[0]))
    return k.fit_whitened(dm, bm, rho, df)


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
@pytest.mark.parametrize(("hrf", "confounds"), [("glover", False), ("spm + derivative", True)])
def test_t_contrasts_match_nilearn(noise_model, hrf, confounds):
    X = _design(hrf=hrf, with_confounds=confounds)
    Y = _data(X, rho=None)
    labels, results = run_glm(Y.astype(np.float64), X.to_numpy(), noise_model=noise_model)
    fit = _fit(X, Y, noise_model)
    con = np.zeros(X.shape[1])
    con[list(X.columns).index("a")], con[list(X.columns).index("b")] = 1, -1
    ref = compute_contrast(labels, results, con, stat_type="t")
    effect, variance = k.contrast_t(fit, con)
    np.testing.assert_allclose(effect, ref.effect_size(), rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(variance, ref.effect_variance(), rtol=RTOL)
    assert fit.df_residuals == ref.dof


def test_ar1_coefficients_and_bins_match_nilearn():
    from nilearn.glm.first_level.first_level import _yule_walker
    from nilearn.glm.regression import OLSModel

    X = _design()
    Y = _data(X, rho=None).astype(np.float64)
    resid = OLSModel(X.to_numpy()).fit(Y).residuals
    ref = _yule_walker(resid.T, 1)[:, 0]
    dm, bm = k.DesignMoments.from_design(X.to_numpy()), k.block_moments(X.to_numpy(), Y)
    _, stats = k.ols_residual_stats(dm, bm)
    rho = k.yule_walker_ar1(stats, resid.mean(), X.shape[0])
    # rho is in [-1, 1]; moments cancel to ~1e-11 absolute, bins are 1e-2 wide.
    np.testing.assert_allclose(rho, ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(np.abs(k.bin_ar1(rho) - k.bin_ar1(ref)) > 0, np.zeros_like(rho, bool))


def test_grand_mean_matters_without_an_intercept():
    """nilearn centres residuals on the grand mean: not zero without a constant column."""
    from nilearn.glm.first_level.first_level import _yule_walker
    from nilearn.glm.regression import OLSModel

    X = _design().drop(columns="constant")
    Y = _data(X, rho=0.3).astype(np.float64) + 50.0
    resid = OLSModel(X.to_numpy()).fit(Y).residuals
    assert abs(resid.mean()) > 1
    dm, bm = k.DesignMoments.from_design(X.to_numpy()), k.block_moments(X.to_numpy(), Y)
    _, stats = k.ols_residual_stats(dm, bm)
    grand_mean = stats.e_sum.sum() / Y.size
    np.testing.assert_allclose(grand_mean, resid.mean(), rtol=1e-9)
    np.testing.assert_allclose(k.yule_walker_ar1(stats, grand_mean, X.shape[0]),
                               _yule_walker(resid.T, 1)[:, 0], rtol=1e-8)


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_f_contrast_matches_nilearn(noise_model):
    X = _design()
    Y = _data(X, rho=None)
    labels, results = run_glm(Y.astype(np.float64), X.to_numpy(), noise_model=noise_model)
    fit = _fit(X, Y, noise_model)
    con = np.zeros((2, X.shape[1]))
    con[0, list(X.columns).index("a")] = con[1, list(X.columns).index("b")] = 1
    ref = compute_contrast(labels, results, con, stat_type="F")
    effect, variance, f_stat = k.contrast_f(fit, con)
    # nilearn's sqrtm (Schur) and our eigh square root agree to ~1e-12.
    np.testing.assert_allclose(effect, ref.effect_size(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(variance, ref.effect_variance(), rtol=RTOL)
    np.testing.assert_allclose(f_stat, ref.stat(), rtol=1e-7)


def test_moments_of_blocks_equal_moments_of_the_whole():
    """Voxel blocks are independent: any split gives the same fit."""
    X = _design()
    Y = _data(X, n_vox=300, rho=None)
    whole = _fit(X, Y, "ols")
    dm = k.DesignMoments.from_design(X.to_numpy())
    for edges in ([0, 100, 300], [0, 1, 7, 300]):
        betas = [k.fit_whitened(dm, k.block_moments(X.to_numpy(), Y[:, a:b]), np.zeros(b - a), 0).beta
                 for a, b in zip(edges, edges[1:])]
        # BLAS may block each split differently: a few ulps of the products summed, i.e. of the
        # betas' scale; a beta near 0 (0.009 here) keeps that absolute error (seen failing at an
        # element-wise rtol of 1e-12 on a fresh machine)
        assert_close_to_scale(np.concatenate(betas, axis=1), whole.beta, rtol=1e-12)
