"""FirstLevelModel against nilearn's FirstLevelModel on the same data.

Tolerances (relative L2 over the mask, every output map):
- float32 inputs: 1e-7. nilearn mean-scales the float32 data in float32 and
  fits in float64; we replicate the scaling bit for bit, and our moments and
  Gram inverses agree with its explicit whitening and pinv to ~1e-8 (measured
  2.5e-8).
- int16 inputs with scl_slope/inter: 1e-5 (the issue's target). nilearn holds
  the scaled values in float64, the store holds them in float32 (the store's
  format): that ~6e-8 relative rounding of the data, amplified by mean
  scaling, gives ~3.4e-6 on the maps.
An AR(1) voxel whose coefficient lies on a bin edge could change bins under a
different summation order; at these tolerances none did.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import FirstLevelModel as NilearnFLM

import chunkglm
from chunkglm.errors import InputError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.testing import rel_l2

REL_L2 = {"float32": 1e-7, "int16": 1e-5}
MAPS = ("z_score", "stat", "p_value", "effect_size", "effect_variance")


def _store(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("flm") / "cohort.zarr"
    chunkglm.convert(dataset.root, path, chunk_bytes=2_000)  # several voxel blocks
    return chunkglm.open_cohort(path)


@pytest.fixture(scope="module")
def store(tiny_bids_sessions, tmp_path_factory):
    return _store(tiny_bids_sessions, tmp_path_factory)


@pytest.fixture(scope="module")
def float_store(tiny_bids, tmp_path_factory):
    return _store(tiny_bids, tmp_path_factory)


def _inputs(dataset, runs):
    events = [pd.read_csv(r.events_path, sep="\t") for r in runs]
    confounds = [pd.read_csv(r.confounds_path, sep="\t", na_values="n/a")[["trans_x", "rot_z", "csf"]]
                 for r in runs]
    return events, confounds


def _compare(ours, ref, mask, con, stat_type, tolerance):
    got = ours.compute_contrast(con, stat_type=stat_type, output_type="all")
    want = ref.compute_contrast(con, stat_type=stat_type, output_type="all")
    for name in MAPS:
        assert rel_l2(got[name], want[name], mask) <= tolerance, name
        np.testing.assert_allclose(got[name].affine, want[name].affine)


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
@pytest.mark.parametrize(("data", "hrf_model", "n_runs"), [
    ("float32", "glover", 1), ("int16", "glover", 1), ("int16", "spm + derivative", 4)])
def test_matches_nilearn(request, noise_model, data, hrf_model, n_runs):
    dataset = request.getfixturevalue("tiny_bids" if data == "float32" else "tiny_bids_sessions")
    cohort = request.getfixturevalue("float_store" if data == "float32" else "store")
    runs = [r for r in dataset.runs if r.subject == "01"][:n_runs]
    nodes = [cohort.runs[r.name] for r in runs]
    grid = nodes[0].grid
    mask_img = nib.Nifti1Image(grid.mask.astype(np.uint8), grid.affine)
    events, confounds = _inputs(dataset, runs)
    params = dict(t_r=dataset.tr, slice_time_ref=0.5, hrf_model=hrf_model,
                  noise_model=noise_model, mask_img=mask_img, signal_scaling=0)
    ref = NilearnFLM(**params).fit([str(r.bold_path) for r in runs], events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(nodes, events=events, confounds=confounds)
    for design, want in zip(ours.design_matrices_, ref.design_matrices_):
        pd.testing.assert_frame_equal(design, want)
    _compare(ours, ref, grid.mask, "a - b", "t", REL_L2[data])
    f_con = np.zeros((2, ref.design_matrices_[0].shape[1]))
    f_con[0, 0] = f_con[1, 1] = 1
    _compare(ours, ref, grid.mask, f_con, "F", REL_L2[data])


def test_chunked_equals_unchunked(tiny_bids_sessions, store, tmp_path):
    one = tmp_path / "one.zarr"
    chunkglm.convert(tiny_bids_sessions.root, one)  # a single voxel block
    run = tiny_bids_sessions.runs[0]
    maps, n_blocks = [], []
    for cohort in (store, chunkglm.open_cohort(one)):
        model = FirstLevelModel(slice_time_ref=0.5).fit(cohort.runs[run.name])
        n_blocks.append(len(model._runs[0].block_sizes))
        maps.append(model.compute_contrast("a - b", output_type="all"))
    assert n_blocks[0] > 3 and n_blocks[1] == 1
    for name in MAPS:  # same moments summed in another order: ~1e-13
        np.testing.assert_allclose(maps[0][name].get_fdata(), maps[1][name].get_fdata(), rtol=1e-10, atol=1e-12)


def test_fit_is_lazy_and_contrasts_reuse_one_read(store, tiny_bids_sessions, monkeypatch):
    from chunkglm.kernels import glm as kernels

    calls = []
    original = kernels.block_moments
    monkeypatch.setattr(kernels, "block_moments", lambda X, Y: calls.append(Y.shape) or original(X, Y))
    node = store.runs[tiny_bids_sessions.runs[0].name]
    model = FirstLevelModel(slice_time_ref=0.5, minimize_memory=False).fit(node)
    assert calls == []  # fit reads nothing
    model.compute_contrast("a - b")
    model.compute_contrast("a", output_type="effect_size")
    model.compute_contrast(np.eye(2, model.design_matrices_[0].shape[1]), output_type="all")
    model.r_square_, model.predicted_  # derived from the kept moments and fits
    assert len(calls) == len(model._runs[0].block_sizes)  # each chunk read once in all


def test_bad_inputs_fail_before_any_compute(store, tiny_bids_sessions):
    node = store.runs[tiny_bids_sessions.runs[0].name]
    events = node.events
    with pytest.raises(InputError, match="lack column"):
        FirstLevelModel().fit(node, events=events.drop(columns="duration"))
    bad = events.copy()
    bad.loc[0, "duration"] = -1
    with pytest.raises(InputError, match="negative durations"):
        FirstLevelModel().fit(node, events=bad)
    with pytest.raises(InputError, match="contain NaN in"):
        FirstLevelModel().fit(node, confounds=node.confounds[["trans_x_derivative1"]])
    with pytest.raises(InputError, match="rows but the run has"):
        FirstLevelModel().fit(node, confounds=node.confounds.iloc[:-1][["csf"]])
    model = FirstLevelModel().fit(node)
    with pytest.raises(InputError, match="cannot be evaluated"):
        model.compute_contrast("a - nope")
    with pytest.raises(InputError, match="weights but the design has"):
        model.compute_contrast(np.ones((2, 3)), stat_type="F")


@pytest.mark.parametrize("given_mask", [True, False])
def test_nifti_inputs_match_nilearn(tiny_bids, given_mask):
    runs = [r for r in tiny_bids.runs if r.subject == "02"]
    events, confounds = _inputs(tiny_bids, runs)
    mask = str(runs[0].mask_path) if given_mask else None
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model="ar1", mask_img=mask)
    images = [str(runs[0].bold_path)] if given_mask else [nib.load(runs[0].bold_path)]
    ref = NilearnFLM(**params).fit([str(r.bold_path) for r in runs], events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(images, events=events, confounds=confounds)
    mask_array = ref.masker_.mask_img_.get_fdata() != 0
    np.testing.assert_array_equal(ours._grid.mask, mask_array)
    _compare(ours, ref, mask_array, "a - b", "t", REL_L2["float32"])


@pytest.mark.parametrize("noise_model", ["ols", "ar1", "ar2"])
def test_r_square_predicted_and_residuals_match_nilearn(tiny_bids, float_store, noise_model):
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    mask_img = nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine)
    events, confounds = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model=noise_model, mask_img=mask_img,
                  random_state=0)
    ref = NilearnFLM(**params, minimize_memory=False).fit(str(run.bold_path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params, minimize_memory=False).fit(node, events=events, confounds=confounds)
    mask = node.grid.mask
    # r-square is a ratio of variances taken from moments (differences of sums of
    # squares); with float32 outputs on both sides it agrees to ~1e-7 (measured
    # 1.1e-7), predicted and residuals to ~3e-8: 1e-6 bounds all three.
    for name in ("r_square_", "predicted_", "residuals_"):
        got, want = getattr(ours, name)[0], getattr(ref, name)[0]
        assert got.shape == want.shape, name
        assert rel_l2(got, want, mask) <= 1e-6, name
    lazy = ours.voxelwise("residuals")[0]
    assert lazy.shape == (tiny_bids.n_volumes, int(mask.sum()))


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_nilearn_on_nilearns_own_generated_data(tmp_path, noise_model, dtype):
    """nilearn's data_gen: random 4-D images and random design matrices, 2 runs.

    data_gen writes float64 images; the store holds float32 (its format), so
    the float64 case rounds the input once (6e-8 relative). On this pure-noise
    data (z ~ N(0, 1)) that shows as ~1e-5 relative L2: bounded at 5e-5.
    Saved as float32 first, both sides read identical numbers: 1e-7.
    """
    from nilearn._utils.data_gen import write_fake_fmri_data_and_design

    mask_path, fmri_paths, design_paths = write_fake_fmri_data_and_design(
        [(7, 8, 9, 30), (7, 8, 9, 30)], rk=4, file_path=tmp_path)
    if dtype == "float32":
        for path in fmri_paths:
            img = nib.load(path)
            nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32), img.affine), path)
    designs = [pd.read_csv(p, sep="\t") for p in design_paths]
    params = dict(mask_img=str(mask_path), noise_model=noise_model)
    ref = NilearnFLM(**params).fit(fmri_paths, design_matrices=designs)
    ours = FirstLevelModel(**params).fit(fmri_paths, design_matrices=designs)
    mask = nib.load(mask_path).get_fdata() != 0
    tolerance = REL_L2["float32"] if dtype == "float32" else 5e-5
    _compare(ours, ref, mask, np.eye(4)[0] - np.eye(4)[1], "t", tolerance)
    _compare(ours, ref, mask, np.eye(4)[:2], "F", tolerance)


@pytest.mark.parametrize("signal_scaling", [False, (0, 1)])
def test_other_signal_scalings_match_nilearn(tiny_bids, float_store, signal_scaling):
    """(0, 1): nilearn scales by the float32 grand mean; we apply the same affine
    map to float64 moments, which differs by float32 rounding of Y (~6e-8)."""
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, confounds = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model="ar1", signal_scaling=signal_scaling,
                  mask_img=nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params, minimize_memory=False).fit(str(run.bold_path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params, minimize_memory=False).fit(node, events=events, confounds=confounds)
    _compare(ours, ref, node.grid.mask, "a - b", "t", 1e-5 if signal_scaling else REL_L2["float32"])
    assert rel_l2(ours.residuals_[0], ref.residuals_[0], node.grid.mask) <= 1e-5


@pytest.mark.parametrize("noise_model", ["ar2", "ar3"])
def test_arn_matches_nilearn(tiny_bids, float_store, noise_model):
    """AR(N>1): same Yule-Walker coefficients, same k-means (random_state) clusters."""
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, confounds = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model=noise_model, random_state=0,
                  mask_img=nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(node, events=events, confounds=confounds)
    _compare(ours, ref, node.grid.mask, "a - b", "t", REL_L2["float32"])
    f_con = np.zeros((2, ref.design_matrices_[0].shape[1]))
    f_con[0, 0] = f_con[1, 1] = 1
    _compare(ours, ref, node.grid.mask, f_con, "F", REL_L2["float32"])


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_sample_masks_match_nilearn(tiny_bids, float_store, noise_model):
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, confounds = _inputs(tiny_bids, [run])
    keep = np.setdiff1d(np.arange(tiny_bids.n_volumes), [0, 1, 17, 18, 30])  # scrubbed volumes
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model=noise_model,
                  mask_img=nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events, confounds=confounds, sample_masks=keep)
    ours = FirstLevelModel(**params).fit(node, events=events, confounds=confounds, sample_masks=keep)
    assert len(ours.design_matrices_[0]) == len(keep)
    _compare(ours, ref, node.grid.mask, "a - b", "t", REL_L2["float32"])
    as_bool = np.isin(np.arange(tiny_bids.n_volumes), keep)
    same = FirstLevelModel(**params).fit(node, events=events, confounds=confounds, sample_masks=as_bool)
    np.testing.assert_array_equal(same.compute_contrast("a - b").get_fdata(),
                                  ours.compute_contrast("a - b").get_fdata())
    with pytest.raises(InputError, match="outside 0..39"):
        FirstLevelModel(**params).fit(node, events=events, sample_masks=np.array([0, 40]))


def test_signal_scaling_1_scales_each_time_point_by_its_mean_over_voxels(tiny_bids, float_store, tmp_path):
    """nilearn 0.14's mean_scaling(Y, axis=1) broadcasts along voxels and fails;
    ours is the intended Y' = 100 (Y / mean_t - 1). Reference: nilearn on data
    scaled that way beforehand (float64), with signal_scaling=False."""
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    mask = node.grid.mask
    events, confounds = _inputs(tiny_bids, [run])
    data = np.asarray(nib.load(run.bold_path).dataobj, dtype=np.float64)
    row_mean = np.maximum(data[mask].mean(axis=0), 1.0)  # (time,)
    scaled = np.zeros_like(data)
    scaled[mask] = 100 * (data[mask] / row_mean - 1)
    path = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(scaled, nib.load(run.bold_path).affine), path)
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model="ar1",
                  mask_img=nib.Nifti1Image(mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params, signal_scaling=False).fit(str(path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params, signal_scaling=1).fit(node, events=events, confounds=confounds)
    _compare(ours, ref, mask, "a - b", "t", 1e-7)


@pytest.mark.parametrize(("fwhm", "resample"), [(6.0, False), (None, True), (5.0, True)])
def test_smoothing_and_resampling_at_conversion_match_nilearn(tiny_bids, fwhm, resample):
    """nilearn resamples then smooths the 4-D image before masking; we do the
    same volume by volume with nilearn's functions while converting (clipping
    to the whole run's range, as nilearn's 4-D resample_img does). The target
    grid (5 mm) lies inside the source field of view: voxels outside it would
    be constant zeros, whose t values are 0/0 noise in nilearn and here alike."""
    run = tiny_bids.runs[0]
    events, confounds = _inputs(tiny_bids, [run])
    target_affine = np.diag([5.0, 5.0, 5.0, 1.0])
    target_affine[:3, 3] = [-15, -20, -15]
    target = dict(target_affine=target_affine, target_shape=(7, 9, 7)) if resample else {}
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model="ar1", smoothing_fwhm=fwhm,
                  mask_img=str(run.mask_path), **target)
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(str(run.bold_path), events=events, confounds=confounds)
    mask = ref.masker_.mask_img_.get_fdata() != 0
    np.testing.assert_array_equal(ours._grid.mask, mask)
    _compare(ours, ref, mask, "a - b", "t", 1e-6)


def test_store_runs_must_match_the_models_preprocessing(tiny_bids, float_store):
    node = float_store.runs[tiny_bids.runs[0].name]
    with pytest.raises(InputError, match="converted with .*smoothing_fwhm"):
        FirstLevelModel(smoothing_fwhm=6.0).fit(node)


def test_voxelwise_outputs_stream_into_a_store(tiny_bids, float_store, tmp_path):
    import dask
    import xarray as xr

    node = float_store.runs[tiny_bids.runs[0].name]
    model = FirstLevelModel(slice_time_ref=0.5).fit(node)
    out = tmp_path / "outputs.zarr"
    with dask.config.set(scheduler="synchronous"):
        paths = model.voxelwise("residuals", store=out)
    stored = xr.open_zarr(out, group=paths[0].rsplit("/", 1)[0], zarr_format=3, consolidated=False)
    assert stored["residuals"].dims == ("time", "voxel")
    expected = model.voxelwise_images("residuals")[0].get_fdata()[node.grid.mask].T
    with pytest.raises(AttributeError, match="set `minimize_memory` to `False`"):  # nilearn's rule
        model.residuals_
    np.testing.assert_allclose(stored["residuals"].values, expected, rtol=1e-6, atol=1e-4)
    assert stored["residuals"].data.chunks[1] == model._runs[0].block_sizes


def test_waves_release_each_model_after_use(tiny_bids_sessions, store):
    from chunkglm.glm.first_level import fitted_in_waves

    models = [FirstLevelModel(slice_time_ref=0.5).fit(store.runs[r.name]) for r in tiny_bids_sessions.runs[:5]]
    expected = [FirstLevelModel(slice_time_ref=0.5).fit(store.runs[r.name]).compute_contrast("a - b").get_fdata()
                for r in tiny_bids_sessions.runs[:5]]
    held = []
    for model, want in zip(fitted_in_waves(models, window=2), expected):
        held.append(sum(bool(m._persisted) for m in models))
        np.testing.assert_array_equal(model.compute_contrast("a - b").get_fdata(), want)
    assert max(held) <= 4 and not any(m._persisted for m in models)  # at most two windows


def test_null_contrast_for_one_run_and_tables_as_paths_match_nilearn(tiny_bids_sessions, tmp_path):
    """Regressions: a zero contrast for one run raised LinAlgError; design_matrices given as a
    file path was read character by character; events and confounds as Path objects failed."""
    runs = [r for r in tiny_bids_sessions.runs if r.subject == "01"][:2]
    events, confounds = _inputs(tiny_bids_sessions, runs)
    confound_paths = []
    for i, table in enumerate(confounds):
        confound_paths.append(tmp_path / f"confounds_{i}.tsv")
        table.to_csv(confound_paths[-1], sep="\t", index=False)
    mask = str(runs[0].mask_path)
    params = dict(t_r=tiny_bids_sessions.tr, slice_time_ref=0.5, noise_model="ar1", mask_img=mask)
    images = [str(r.bold_path) for r in runs]
    ref = NilearnFLM(**params).fit(images, events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(images, events=[r.events_path for r in runs],
                                         confounds=confound_paths)
    mask_array = ref.masker_.mask_img_.get_fdata() != 0
    n_columns = ref.design_matrices_[0].shape[1]
    one_run = [np.eye(n_columns)[:1], np.zeros((1, n_columns))]
    with pytest.warns(UserWarning, match="Contrast for run 1 is null"):
        _compare(ours, ref, mask_array, one_run, "t", REL_L2["int16"])
    with pytest.raises(ValueError, match="All contrasts provided were null contrasts"):
        ours.compute_contrast([np.zeros(n_columns)] * 2)

    design_path = tmp_path / "design.tsv"
    ref.design_matrices_[0].to_csv(design_path, sep="\t", index=False)
    for given in (str(design_path), design_path):
        ours = FirstLevelModel(mask_img=mask).fit(images[0], design_matrices=given)
        theirs = NilearnFLM(mask_img=mask).fit(images[0], design_matrices=given)
        pd.testing.assert_frame_equal(ours.design_matrices_[0], theirs.design_matrices_[0])
        _compare(ours, theirs, mask_array, "a", "t", REL_L2["int16"])
    with pytest.raises(ValueError, match="Tables to load can only be TSV or CSV"):
        FirstLevelModel(mask_img=mask).fit(images[0], design_matrices=tmp_path / "design.txt")
    with pytest.raises(TypeError, match="design_matrices can only be a pandas DataFrame"):
        FirstLevelModel(mask_img=mask).fit(images[0], design_matrices=3)


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_rank_deficient_design_is_fitted_as_nilearn_fits_it(tiny_bids, float_store, noise_model):
    """A duplicated confound (csf and 2 csf): nilearn fits it with pinv (minimum-norm betas,
    t/F df n - rank, dispersion SSE / (n - p)); chunkglm does the same in an SVD basis, with a
    warning. An estimable contrast and the non-estimable csf column (its minimum-norm share)
    equal nilearn's.

    Tolerance: OLS, the full-rank one (both drop the same null direction). AR(1): nilearn's
    design builder regularises the null direction to 1e-15 of the largest singular value, and
    scipy's pinv of the *whitened* design (cut-off max(n, p) eps, relative) may keep it, adding
    rounding noise amplified by up to 1e15 x eps ~ 0.2 along a direction the contrasts are
    orthogonal to within ~1e-6 (measured 1.4e-6 on z): 1e-5."""
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, confounds = _inputs(tiny_bids, [run])
    confounds = [confounds[0].assign(csf2=lambda f: f["csf"] * 2)]
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model=noise_model,
                  mask_img=nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events, confounds=confounds)
    with pytest.warns(UserWarning, match="rank deficient.*fitted as nilearn fits it"):
        ours = FirstLevelModel(**params).fit(node, events=events, confounds=confounds)
    tolerance = REL_L2["float32"] if noise_model == "ols" else 1e-5
    _compare(ours, ref, node.grid.mask, "a - b", "t", tolerance)
    _compare(ours, ref, node.grid.mask, "csf", "t", tolerance)


@pytest.mark.parametrize("standardize", [True, "psc"])
def test_standardize_as_nilearns(tiny_bids, float_store, standardize):
    """nilearn 0.14 sets standardize_ to None for every valid signal_scaling (False == 0 in its
    check), so standardize changes no map: same maps as nilearn's at the float32 tolerance."""
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, confounds = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model="ar1", signal_scaling=False,
                  standardize=standardize,
                  mask_img=nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(node, events=events, confounds=confounds)
    assert ours.standardize_ == ref.standardize_
    _compare(ours, ref, node.grid.mask, "a - b", "t", REL_L2["float32"])
    with pytest.raises(InputError, match="'standardize' must be one of"):
        FirstLevelModel(standardize="zscore").fit(node, events=events)


def test_fitted_attributes_as_nilearns(tiny_bids):
    """masker_ (a fitted NiftiMasker on the model's mask, or the given fitted masker), n_elements_,
    fir_delays_, standardize_ and memory_ as nilearn sets them; an unfitted masker is refused
    with sklearn's NotFittedError, as nilearn's."""
    from nilearn.maskers import NiftiMasker
    from sklearn.exceptions import NotFittedError

    run = tiny_bids.runs[0]
    events, confounds = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5)
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events)
    ours = FirstLevelModel(**params).fit(str(run.bold_path), events=events)
    assert isinstance(ours.masker_, NiftiMasker)
    np.testing.assert_array_equal(ours.masker_.mask_img_.get_fdata(), ref.masker_.mask_img_.get_fdata())
    assert ours.n_elements_ == ref.n_elements_
    assert ours.fir_delays_ == ref.fir_delays_ and ours.standardize_ == ref.standardize_
    assert ours.memory_.location == ref.memory_.location
    masker = NiftiMasker(run.mask_path).fit()
    model = FirstLevelModel(mask_img=masker, **params).fit(str(run.bold_path), events=events)
    assert model.masker_ is masker
    assert model.n_elements_ == int((nib.load(run.mask_path).get_fdata() != 0).sum())
    with pytest.raises(NotFittedError, match="NiftiMasker instance is not fitted yet"):
        FirstLevelModel(mask_img=NiftiMasker(run.mask_path), **params).fit(str(run.bold_path), events=events)


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_labels_and_results_as_nilearns(tiny_bids, float_store, noise_model):
    """labels_ and results_ (theta, cov, dispersion, df) equal nilearn's per label; theta to the
    float32 parity tolerance (relative), the rest likewise."""
    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, confounds = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model=noise_model,
                  mask_img=nib.Nifti1Image(node.grid.mask.astype(np.uint8), node.grid.affine))
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events, confounds=confounds)
    ours = FirstLevelModel(**params).fit(node, events=events, confounds=confounds)
    assert FirstLevelModel().__sklearn_is_fitted__() is False and not hasattr(FirstLevelModel(), "labels_")
    labels, results = ours.labels_[0], ours.results_[0]
    np.testing.assert_array_equal(labels, ref.labels_[0])
    assert results.keys() == ref.results_[0].keys()
    for key, theirs in ref.results_[0].items():
        mine = results[key]
        for name in ("theta", "cov", "dispersion"):
            got, want = getattr(mine, name), getattr(theirs, name)
            assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want), (key, name)
        assert mine.df_residuals == theirs.df_residuals


def test_nifti_inputs_need_t_r_and_events_as_nilearns(tiny_bids):
    """NIfTI inputs: t_r must be given (nilearn does not read it from the header) and events or
    design matrices are required; an empty contrast is refused with nilearn's wording."""
    run = tiny_bids.runs[0]
    events, _ = _inputs(tiny_bids, [run])
    with pytest.raises(InputError, match="t_r not given to FirstLevelModel object"):
        FirstLevelModel(slice_time_ref=0.5).fit(str(run.bold_path), events=events)
    with pytest.raises(InputError, match="events or design matrices must be provided"):
        FirstLevelModel(t_r=tiny_bids.tr).fit(str(run.bold_path))
    model = FirstLevelModel(t_r=tiny_bids.tr, slice_time_ref=0.5).fit(str(run.bold_path), events=events)
    with pytest.raises(InputError, match="t contrasts cannot be empty"):
        model.compute_contrast(np.array([]))


def test_maps_are_float64_as_nilearns_and_derivatives_float32(tiny_bids, float_store, tmp_path):
    """compute_contrast hands out float64 images as nilearn's (fixed effects of float32 images
    would differ from the float64 computation by float32 rounding); derivative files stay float32."""
    from chunkglm.glm.io import save_glm_to_bids

    run = tiny_bids.runs[0]
    node = float_store.runs[run.name]
    events, _ = _inputs(tiny_bids, [run])
    model = FirstLevelModel(t_r=tiny_bids.tr, slice_time_ref=0.5).fit(node, events=events)
    maps = model.compute_contrast("a - b", output_type="all")
    assert {img.get_data_dtype() for img in maps.values()} == {np.dtype(np.float64)}
    save_glm_to_bids(model, "a - b", out_dir=tmp_path / "out")
    written = list((tmp_path / "out").rglob("*_statmap.nii.gz"))
    assert written and {nib.load(p).get_data_dtype() for p in written} == {np.dtype(np.float32)}


def test_target_affine_without_target_shape_matches_nilearn(tiny_bids):
    """nilearn resamples onto a target_affine given alone with the shape holding the reference
    field of view (the mask's, else the runs'); the same grid and maps here. Tolerance: the
    resampled float32 data on both sides, as test_smoothing_and_resampling_at_conversion_match_nilearn.
    (Without a mask image nilearn's EPI mask of these tiny resampled runs is empty: it fails.)"""
    given_mask = True
    run = tiny_bids.runs[0]
    events, _ = _inputs(tiny_bids, [run])
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model="ols",
                  target_affine=np.diag([5.0, 5.0, 5.0, 1.0]),
                  mask_img=str(run.mask_path) if given_mask else None)
    ref = NilearnFLM(**params).fit(str(run.bold_path), events=events)
    ours = FirstLevelModel(**params).fit(str(run.bold_path), events=events)
    assert ours.mask_img_.shape == ref.masker_.mask_img_.shape
    np.testing.assert_allclose(ours.mask_img_.affine, ref.masker_.mask_img_.affine)
    mask = ref.masker_.mask_img_.get_fdata() != 0
    np.testing.assert_array_equal(ours.mask_img_.get_fdata() != 0, mask)
    _compare(ours, ref, mask, "a - b", "t", 1e-5)
