"""SecondLevelModel against nilearn 0.14's on the same inputs.

Tolerance: the maps are float32 files, so the store holds exactly the values
nilearn reads. What differs is (a) our output images are float32 (nilearn's
float64): ~6e-8 relative rounding, and (b) the algebra (our QR-basis normal
equations vs nilearn's pinv): ~1e-12. So 1e-5 relative L2 (the issue's
target) leaves a wide margin while any real error (a wrong dof, a missing
column, a mis-ordered map: >= 1e-2) fails.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.design.second_level import make_second_level_design_matrix
from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.second_level import OUTPUT_TYPES, SecondLevelModel

SHAPE = (20, 24, 20)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N = 20
RTOL = 1e-5


def _maps(rng, n, effect=0.5):
    """n float32 maps: noise plus an effect inside a box, zeros around (a background)."""
    out = []
    for _ in range(n):
        data = np.zeros(SHAPE, np.float32)
        data[3:-3, 3:-3, 3:-3] = rng.normal(effect, 1.0, (14, 18, 14))
        out.append(data)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    paths = []
    for i, data in enumerate(_maps(rng, N)):
        path = folder / f"sub-{i:02d}_effect.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), path)
        paths.append(str(path))
    covariates = pd.DataFrame({"subject_label": [f"{i:02d}" for i in range(N)],
                               "age": rng.normal(40, 10, N), "group": np.repeat([0.0, 1.0], N // 2)})
    return paths, covariates


def _nilearn(images, design=None, confounds=None, contrast=None, first_level_contrast=None,
             stat_type=None, **params):
    from nilearn.glm.second_level import SecondLevelModel as NilearnModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NilearnModel(**params).fit(images, confounds=confounds, design_matrix=design)
        return model, model.compute_contrast(contrast, first_level_contrast=first_level_contrast,
                                             second_level_stat_type=stat_type, output_type="all")


def _assert_parity(ours, theirs, rtol=RTOL):
    assert set(ours) == set(theirs) == set(OUTPUT_TYPES)
    for name in OUTPUT_TYPES:
        a, b = ours[name].get_fdata(), theirs[name].get_fdata()
        assert a.shape == b.shape, name
        assert np.allclose(ours[name].affine, theirs[name].affine)
        error = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert error <= rtol, (name, error)


def _covariate_design(covariates):
    return pd.DataFrame({"intercept": np.ones(N), "age": covariates["age"].to_numpy()})


# -- parametric parity, each design and input form -------------------------------------


def test_one_sample_list_of_paths(files):
    paths, _ = files
    design = pd.DataFrame({"intercept": np.ones(N)})
    model = SecondLevelModel().fit(paths, design_matrix=design)
    ours = model.compute_contrast(output_type="all")
    nilearn_model, theirs = _nilearn(paths, design)
    _assert_parity(ours, theirs)
    assert np.array_equal(model.mask_img_.get_fdata(), nilearn_model.masker_.mask_img_.get_fdata())
    assert model.n_elements_ == nilearn_model.n_elements_
    assert "of contrast" in str(ours["z_score"].header["descrip"])


def test_covariate_t_and_f_from_a_4d_image(files):
    paths, covariates = files
    four_d = nib.concat_images([nib.load(p) for p in paths])
    design = _covariate_design(covariates)
    model = SecondLevelModel().fit(four_d, design_matrix=design)
    for contrast, stat_type in (("age", None), ([0.0, 1.0], "F"), (np.eye(2), None)):
        ours = model.compute_contrast(contrast, second_level_stat_type=stat_type, output_type="all")
        _, theirs = _nilearn(nib.funcs.four_to_three(four_d), design, contrast=contrast, stat_type=stat_type)
        _assert_parity(ours, theirs)
    assert ours["effect_size"].shape == (*SHAPE, 2)  # F effect: one volume per row, as nilearn


def test_two_sample_unpaired_with_in_memory_images(files):
    paths, covariates = files
    images = [nib.load(p) for p in paths]
    group = covariates["group"].to_numpy()
    design = pd.DataFrame({"patients": group, "controls": 1 - group})
    ours = SecondLevelModel().fit(images, design_matrix=design).compute_contrast(
        "patients - controls", output_type="all")
    _, theirs = _nilearn(images, design, contrast="patients - controls")
    _assert_parity(ours, theirs)


def test_paired_design(files):
    paths, _ = files
    n_pairs = N // 2  # maps 0..9: condition A of subjects 0..9; 10..19: condition B
    subjects = np.vstack([np.eye(n_pairs), np.eye(n_pairs)])
    design = pd.DataFrame(subjects, columns=[f"sub{i}" for i in range(n_pairs)])
    design.insert(0, "condition", np.repeat([1.0, -1.0], n_pairs))
    contrast = [1.0] + [0.0] * n_pairs
    ours = SecondLevelModel().fit(paths, design_matrix=design).compute_contrast(contrast, output_type="all")
    _, theirs = _nilearn(paths, design, contrast=contrast)
    _assert_parity(ours, theirs)


def test_dataframe_input_with_confounds_selects_map_name(files):
    paths, covariates = files
    order = np.random.default_rng(1).permutation(N)  # nilearn sorts rows by subject_label
    frame = pd.DataFrame({"subject_label": covariates["subject_label"].to_numpy()[order],
                          "map_name": "faces", "effects_map_path": np.asarray(paths)[order]})
    confounds = covariates[["subject_label", "age"]]
    model = SecondLevelModel().fit(frame, confounds=confounds)
    assert list(model.design_matrix_.columns) == ["age", "intercept"]  # nilearn sorts them
    ours = model.compute_contrast("age", first_level_contrast="faces", output_type="all")
    _, theirs = _nilearn(frame, confounds=confounds, contrast="age", first_level_contrast="faces")
    _assert_parity(ours, theirs)
    with pytest.raises(InputError, match="map_name values are \\['faces'\\]"):
        model.compute_contrast("age", first_level_contrast="houses")


def test_maps_node_equal_for_two_chunkings_and_nilearn(files, tmp_path):
    paths, covariates = files
    design = _covariate_design(covariates)
    nilearn_model, theirs = _nilearn(paths, design, contrast="intercept + age")
    results = []
    for chunk_bytes in (N * 4 * 256, 64 * 2**20):  # 256-voxel blocks (many) vs one block
        store = tmp_path / f"c{chunk_bytes}.zarr"
        chunkglm.convert(paths, store, collection="effects", chunk_bytes=chunk_bytes)
        node = chunkglm.open_cohort(store).maps["effects"]
        n_blocks = len(node.data().data.chunks[1])
        assert n_blocks > 10 if chunk_bytes < 2**20 else n_blocks == 1
        model = SecondLevelModel().fit(node, design_matrix=design)
        results.append(model.compute_contrast("intercept + age", output_type="all"))
        _assert_parity(results[-1], theirs)
        # nilearn's default mask, from the mean of the stored maps (an explicit pass)
        assert np.array_equal(model.mask_img_.get_fdata(), nilearn_model.masker_.mask_img_.get_fdata())
    for name in OUTPUT_TYPES:  # chunked == unchunked, to float64 summation order
        assert np.allclose(results[0][name].get_fdata(), results[1][name].get_fdata(), rtol=1e-6, atol=1e-7)


def test_maps_node_with_subject_coords_and_mask(files, tmp_path):
    paths, covariates = files
    chunkglm.convert(paths, tmp_path / "s.zarr", collection="effects", chunk_bytes=N * 4 * 512)
    node = chunkglm.open_cohort(tmp_path / "s.zarr").maps["effects"]
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:15, 6:18, 5:15] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    model = SecondLevelModel(mask_img=mask_img).fit(node, confounds=covariates[["subject_label", "age"]])
    ours = model.compute_contrast("age", output_type="all")
    _, theirs = _nilearn(paths, _covariate_design(covariates), contrast="age", mask_img=mask_img)
    _assert_parity(ours, theirs)
    assert model.n_elements_ == mask.sum()


_SHIFTED = np.diag([4.0, 4.0, 4.0, 1.0])
_SHIFTED[:3, 3] = [1.0, 2.0, 0.5]


@pytest.mark.parametrize("params, shape", [
    ({"target_affine": _SHIFTED, "target_shape": (15, 18, 15), "smoothing_fwhm": 6.0}, (15, 18, 15)),
    ({"target_affine": np.diag([4.0, 4.0, 4.0])}, (16, 19, 16)),  # 3x3: nilearn picks the shape
])
def test_resampling_and_smoothing_as_nilearn(files, params, shape):
    paths, covariates = files
    design = _covariate_design(covariates)
    ours = SecondLevelModel(**params).fit(paths, design_matrix=design).compute_contrast("age", output_type="all")
    _, theirs = _nilearn(paths, design, contrast="age", **params)
    # Resampled and smoothed maps are stored as float32 (nilearn keeps float64):
    # rounding of ~6e-8 relative per value, still far under 1e-5.
    _assert_parity(ours, theirs)
    assert ours["z_score"].shape == shape


def test_voxelwise_attributes_as_nilearn(files):
    paths, covariates = files
    design = _covariate_design(covariates)
    model = SecondLevelModel(minimize_memory=False).fit(paths, design_matrix=design)
    model.compute_contrast("age")
    theirs, _ = _nilearn(paths, design, contrast="age", minimize_memory=False)
    for name in ("r_square_", "predicted_", "residuals_"):
        a, b = getattr(model, name).get_fdata(), getattr(theirs, name).get_fdata()
        assert a.shape == b.shape, name
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= RTOL, name
    with pytest.raises(AttributeError, match="set `minimize_memory` to `False`"):  # nilearn's class
        SecondLevelModel().fit(paths, design_matrix=design).r_square_


def _runs(folder, rng, n_subjects=3, n_scans=40):
    """Small 4-D runs with a block design: (paths, events, mask image)."""
    shape = (8, 8, 6)
    events = pd.DataFrame({"onset": [0.0, 20.0, 40.0, 60.0], "duration": [10.0] * 4,
                           "trial_type": ["a", "b", "a", "b"]})
    mask = np.zeros(shape, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    paths = []
    for s in range(n_subjects):
        data = (100 + rng.normal(0, 1, (*shape, n_scans))).astype(np.float32)
        path = folder / f"sub-{s:02d}_bold.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), path)
        paths.append(str(path))
    return paths, events, nib.Nifti1Image(mask, np.diag([3.0, 3.0, 3.0, 1.0]))


def test_first_level_models_as_input(tmp_path):
    from nilearn.glm.first_level import FirstLevelModel as NilearnFirstLevel

    from chunkglm.glm.first_level import FirstLevelModel

    paths, events, mask = _runs(tmp_path, np.random.default_rng(3), n_subjects=6)
    labels = [f"{s:02d}" for s in range(len(paths))]
    confounds = pd.DataFrame({"subject_label": labels, "age": [30.0, 41.0, 25.0, 52.0, 37.0, 44.0]})
    params = {"t_r": 2.0, "noise_model": "ols", "mask_img": mask}
    ours_first = [FirstLevelModel(subject_label=label, **params).fit(p, events) for label, p in zip(labels, paths)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_first = [NilearnFirstLevel(subject_label=label, **params).fit(p, events)
                        for label, p in zip(labels, paths)]
    model = SecondLevelModel().fit(ours_first, confounds=confounds)
    with pytest.raises(InputError, match="first_level_contrast is required"):
        model.compute_contrast("age")
    ours = model.compute_contrast("age", first_level_contrast="a - b", output_type="all")
    _, theirs = _nilearn(theirs_first, confounds=confounds, contrast="age", first_level_contrast="a - b")
    # The two first levels' effect maps agree to ~3e-8 relative (ours are float32);
    # with 4 residual degrees of freedom that stays far under 1e-5 here.
    _assert_parity(ours, theirs)
    # And nilearn fed our first levels' own effect maps: the second level alone.
    maps = [m.compute_contrast("a - b", output_type="effect_size") for m in ours_first]
    _, same_maps = _nilearn(maps, model.design_matrix_, contrast="age", mask_img=model.mask_img_)
    _assert_parity(ours, same_maps)
    for first_level in ours_first:
        first_level.subject_label = None
    with pytest.raises(InputError, match="need to provide the attribute 'subject_label'"):
        SecondLevelModel().fit(ours_first, confounds=confounds)
    # nilearn's own fitted models are accepted too: their effect maps are nilearn's
    from_nilearns = SecondLevelModel().fit(theirs_first, confounds=confounds)
    _assert_parity(from_nilearns.compute_contrast("age", first_level_contrast="a - b", output_type="all"),
                   theirs)
    one_sample = SecondLevelModel().fit(ours_first)  # no confounds: labels are not needed
    assert list(one_sample.design_matrix_.columns) == ["intercept"]
    _, theirs = _nilearn(maps, one_sample.design_matrix_, mask_img=model.mask_img_)
    _assert_parity(one_sample.compute_contrast(first_level_contrast="a - b", output_type="all"), theirs)


def test_make_second_level_design_matrix_is_nilearns(files):
    from nilearn.glm.first_level.design_matrix import make_second_level_design_matrix as nilearn_design

    _, covariates = files
    labels = list(covariates["subject_label"][::-1])
    ours = make_second_level_design_matrix(labels, covariates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's cond(X) > X.size heuristic, on ages ~40
        pd.testing.assert_frame_equal(ours, nilearn_design(labels, covariates))
    with pytest.raises(InputError, match="no row for subject"):
        make_second_level_design_matrix(labels + ["99"], covariates)
    with pytest.raises(InputError, match="strings"):
        make_second_level_design_matrix(list(range(3)), covariates)
    # without confounds the labels only count rows (nilearn's FirstLevelModels default to None)
    assert make_second_level_design_matrix([None] * 3).shape == (3, 1)


# -- bad input: clear errors, before any data are read -------------------------------------------


def test_design_errors(files):
    paths, covariates = files
    with pytest.raises(InputError, match="19 rows in design matrix do not match with 20 maps"):
        SecondLevelModel().fit(paths, design_matrix=pd.DataFrame({"intercept": np.ones(N - 1)}))
    with pytest.raises(InputError, match="require a design matrix to be provided"):
        SecondLevelModel().fit(paths)
    model = SecondLevelModel().fit(paths, design_matrix=_covariate_design(covariates))
    with pytest.raises(InputError, match="cannot be evaluated on the design columns"):
        model.compute_contrast("weight")
    with pytest.raises(InputError, match="F contrasts should have 2 columns, but it has 3"):
        model.compute_contrast([[1.0, 0.0, 0.0]], second_level_stat_type="F")
    with pytest.raises(InputError, match="No second-level contrast is specified"):
        model.compute_contrast()
    with pytest.raises(InputError, match="null"):
        model.compute_contrast([0.0, 0.0])
    with pytest.raises(InputError, match="output_type"):
        model.compute_contrast("age", output_type="t_map")


def test_image_errors(files, tmp_path):
    paths, _ = files
    design = pd.DataFrame({"intercept": np.ones(N)})
    other = tmp_path / "other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 12, 10), np.float32), np.diag([6.0, 6.0, 6.0, 1.0])), other)
    with pytest.raises(InputError, match="(?s)another grid.*target_affine"):
        SecondLevelModel().fit([*paths[:-1], str(other)], design_matrix=design)
    with pytest.raises(InputTypeError, match="requires a list with at least two"):  # nilearn: TypeError
        SecondLevelModel().fit(paths[:1], design_matrix=design[:1])
    with pytest.raises(InputError, match="must be 4-D"):
        SecondLevelModel().fit(paths[0], design_matrix=design[:1])
    with pytest.raises(InputTypeError, match="(?s)'second_level_input' must be either.*maps node"):
        SecondLevelModel().fit(np.zeros((3, 4)))  # nilearn's class and wording, chunkglm's forms added
    nan_maps = [nib.load(p) for p in paths]
    nan_maps[4] = nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), AFFINE)
    mask = nib.Nifti1Image((nib.load(paths[0]).get_fdata() != 0).astype(np.uint8), AFFINE)
    model = SecondLevelModel(mask_img=mask).fit(nan_maps, design_matrix=design)
    # nilearn's masker sets NaN to 0: the map counts as zeros (tests/test_nonfinite.py)
    n_voxels = int(np.asarray(mask.dataobj).sum())
    with pytest.warns(UserWarning, match=f"^{n_voxels} voxels of the second-level input maps hold NaN"):
        assert np.isfinite(model.compute_contrast().get_fdata()).all()
    with pytest.raises(InputError, match="background mask .* is empty"):
        SecondLevelModel().fit(nan_maps, design_matrix=design)


def test_maps_loaded_into_the_users_store(files, tmp_path):
    paths, covariates = files
    store = tmp_path / "cohort.zarr"
    model = SecondLevelModel(store=store).fit(paths, design_matrix=_covariate_design(covariates))
    collections = list(chunkglm.open_cohort(store).maps)
    assert len(collections) == 1 and collections[0].startswith("second_level_")
    node = chunkglm.open_cohort(store).maps[collections[0]]
    assert node.data().shape == (N, model.n_elements_)  # only the mask's voxels are stored


def test_scratch_dir_holds_the_temporary_store_and_is_emptied_with_the_model(files, tmp_path):
    """scratch_dir (a folder a multi-node cluster's workers share) holds the model's temporary
    store instead of TMPDIR, with the same maps; the folder is removed with the model."""
    import gc

    paths, covariates = files
    design = _covariate_design(covariates)
    model = SecondLevelModel(scratch_dir=tmp_path).fit([nib.load(p) for p in paths], design_matrix=design)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("chunkglm-second-level-")]
    assert (folder / "store.zarr" / "zarr.json").is_file()
    ours = model.compute_contrast([0, 1], output_type="z_score")
    default = SecondLevelModel().fit(paths, design_matrix=design).compute_contrast([0, 1], output_type="z_score")
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(default.dataobj))  # same staged values
    del model
    gc.collect()
    assert not folder.exists()


def test_fit_is_lazy_and_contrasts_reuse_one_read(files, tmp_path, monkeypatch):
    from chunkglm.kernels import glm as kernels

    paths, covariates = files
    chunkglm.convert(paths, tmp_path / "r.zarr", collection="effects", chunk_bytes=N * 4 * 1024)
    node = chunkglm.open_cohort(tmp_path / "r.zarr").maps["effects"]
    calls = []
    original = kernels.block_moments
    monkeypatch.setattr(kernels, "block_moments", lambda X, Y: calls.append(Y.shape) or original(X, Y))
    mask = nib.Nifti1Image((nib.load(paths[0]).get_fdata() != 0).astype(np.uint8), AFFINE)
    model = SecondLevelModel(mask_img=mask, minimize_memory=False).fit(node, design_matrix=_covariate_design(covariates))
    assert calls == []  # fit reads no map
    model.compute_contrast("age")
    model.compute_contrast("intercept", output_type="all")
    model.compute_contrast(np.eye(2), output_type="effect_size")
    model.r_square_, model.predicted_  # from the kept fits
    blocks = model._last_run[1].block_sizes  # the masked voxels, in blocks
    assert len(blocks) > 3 and len(calls) == len(blocks)  # each block read once in all
    assert sum(shape[1] for shape in calls) == model.n_elements_


def test_rank_deficient_design_is_fitted_as_nilearn_fits_it(files):
    """Two constant columns: nilearn fits with pinv (minimum-norm betas, t df n - rank,
    dispersion SSE / (n - p)); chunkglm the same in an SVD basis, with a warning naming them.
    An estimable contrast (age) and the non-estimable intercept share: the parity tolerance."""
    paths, covariates = files
    design = _covariate_design(covariates).assign(site=2.0)
    with pytest.warns(UserWarning, match="rank deficient.*Constant columns: \\['intercept', 'site'\\]"):
        model = SecondLevelModel().fit(paths, design_matrix=design)
    for contrast in ("age", "intercept"):
        _, theirs = _nilearn(paths, design=design, contrast=contrast)
        _assert_parity(model.compute_contrast(contrast, output_type="all"), theirs)


def test_fitted_attributes_as_nilearns(files, tmp_path):
    """masker_, n_elements_, labels_ and results_ (after compute_contrast) as nilearn's; a
    fitted NiftiMasker as mask_img is used as is, an unfitted one raises NotFittedError."""
    from nilearn.maskers import NiftiMasker
    from sklearn.exceptions import NotFittedError

    paths, covariates = files
    design = _covariate_design(covariates)
    theirs, _ = _nilearn(paths, design=design, contrast="age")
    ours = SecondLevelModel().fit(paths, design_matrix=design)
    assert not hasattr(ours, "labels_")
    ours.compute_contrast("age")
    assert isinstance(ours.masker_, NiftiMasker) and ours.n_elements_ == theirs.n_elements_
    np.testing.assert_array_equal(ours.masker_.mask_img_.get_fdata(), theirs.masker_.mask_img_.get_fdata())
    np.testing.assert_array_equal(ours.labels_, theirs.labels_)
    mine, want = ours.results_[0.0], theirs.results_[0.0]
    # float32 maps on both sides, float64 fits: the parity tolerance
    assert np.linalg.norm(mine.theta - want.theta) <= RTOL * np.linalg.norm(want.theta)
    assert np.allclose(mine.cov, want.cov, rtol=1e-10) and mine.df_residuals == want.df_residuals
    masker = NiftiMasker(theirs.masker_.mask_img_).fit()
    model = SecondLevelModel(mask_img=masker).fit(paths, design_matrix=design)
    assert model.masker_ is masker and model.n_elements_ == theirs.n_elements_
    with pytest.raises(NotFittedError, match="NiftiMasker instance is not fitted yet"):
        SecondLevelModel(mask_img=NiftiMasker(theirs.masker_.mask_img_)).fit(paths, design_matrix=design)


def test_parameter_errors_as_nilearns(files):
    """nilearn's classes and wording: confounds not a DataFrame -> TypeError; an empty or
    non-string stat type -> "'stat_type' must be one of" (an empty string is not the default)."""
    paths, covariates = files
    design = _covariate_design(covariates)
    with pytest.raises(TypeError, match="confounds must be a pandas DataFrame"):
        SecondLevelModel().fit(paths, confounds=[], design_matrix=design)
    model = SecondLevelModel().fit(paths, design_matrix=design)
    for bad in ("", [], "z"):
        with pytest.raises(InputError, match="'stat_type' must be one of"):
            model.compute_contrast("age", second_level_stat_type=bad)
