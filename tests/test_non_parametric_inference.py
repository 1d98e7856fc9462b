"""non_parametric_inference (max-T) against nilearn 0.14's on the same inputs.

Tolerances: the maps are float32 files, so both sides permute the same
values. The -log10 FWE p-values are ranks of the original t among the max-T
null (engine and nilearn agree to ~1e-16, tests/test_permutation.py), so with
the same permutations they are the same float64 numbers (our images are
float64, as nilearn's); compared after a cast to float32 they must be *equal*. With
independent random permutations the FWE p-values differ by Monte Carlo
error only: |p1 - p2| has standard deviation sqrt(2 p (1 - p) / n_perm);
5 of those plus 2/(n_perm+1) (the rank grid) bounds it.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.maskers import NiftiMasker

import chunkglm
from chunkglm.errors import InputError
from chunkglm.glm.second_level import non_parametric_inference
from chunkglm.io.inputs import MapsView
from chunkglm.kernels.permutation import nilearn_permutations

SHAPE = (12, 14, 12)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N = 20
N_PERM = 100


def _maps(rng, n, effect):
    """n float32 maps: noise plus an effect in a corner of a box, zeros around it."""
    out = []
    for i in range(n):
        data = np.zeros(SHAPE, np.float32)
        data[2:-2, 2:-2, 2:-2] = rng.normal(0.0, 1.0, (8, 10, 8))
        data[2:6, 2:6, 2:6] += effect[i]
        out.append(data)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    age = rng.normal(40, 10, N)
    group = np.repeat([0.0, 1.0], N // 2)
    effect = 1.0 + 0.2 * (age - 40) + 3.0 * group  # an intercept, an age and a group effect
    paths = []
    for i, data in enumerate(_maps(rng, N, effect)):
        path = folder / f"sub-{i:02d}_effect.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), path)
        paths.append(str(path))
    covariates = pd.DataFrame({"subject_label": [f"{i:02d}" for i in range(N)], "age": age, "group": group})
    return paths, covariates


def _nilearn(images, design, **params):
    from nilearn.glm.second_level import non_parametric_inference as nilearn_npi

    params.setdefault("n_perm", N_PERM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nilearn_npi(images, design_matrix=design, **params)


def _ours(images, design, **params):
    params.setdefault("n_perm", N_PERM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine replicates nilearn's constant-column warning
        return non_parametric_inference(images, design_matrix=design, **params)


def _assert_equal(ours, theirs):
    """Same permutations: the same -log10 p values (see the module docstring)."""
    assert ours.shape == theirs.shape
    assert np.allclose(ours.affine, theirs.affine)
    expected = theirs.get_fdata(dtype=np.float64).astype(np.float32)
    got = ours.get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert got.max() > 1.0  # the effect is detected: the comparison is not between empty maps


def _one_sample():
    return pd.DataFrame({"intercept": np.ones(N)})


def _covariate_design(covariates):
    return pd.DataFrame({"intercept": np.ones(N), "age": covariates["age"].to_numpy(),
                         "group": covariates["group"].to_numpy()})


# -- parity with nilearn, same random_state ---------------------------------------------------------


@pytest.mark.parametrize("two_sided", [False, True])
def test_one_sample_sign_flips_list_of_paths(files, two_sided):
    paths, _ = files
    ours = _ours(paths, _one_sample(), two_sided_test=two_sided, random_state=0)
    theirs = _nilearn(paths, _one_sample(), two_sided_test=two_sided, random_state=0)
    _assert_equal(ours, theirs)
    assert ours.get_data_dtype() == np.float64  # as nilearn's images


def test_two_sample_from_a_4d_image(files):
    paths, covariates = files
    four_d = nib.concat_images([nib.load(p) for p in paths])
    group = covariates["group"].to_numpy()
    design = pd.DataFrame({"patients": group, "controls": 1 - group, "age": covariates["age"].to_numpy()})
    ours = _ours(four_d, design, second_level_contrast="patients - controls", random_state=3,
                 two_sided_test=True)
    # nilearn 0.14's non_parametric_inference fails on a 4-D image (it iterates over the
    # image object), so it reads the same maps as a list of 3-D images
    theirs = _nilearn(nib.funcs.four_to_three(four_d), design, second_level_contrast="patients - controls",
                      random_state=3, two_sided_test=True)
    _assert_equal(ours, theirs)


def test_covariate_with_confounds_from_a_dataframe(files):
    paths, covariates = files
    order = np.random.default_rng(1).permutation(N)  # both sort the rows by subject_label
    frame = pd.DataFrame({"subject_label": covariates["subject_label"].to_numpy()[order],
                          "map_name": "faces", "effects_map_path": np.asarray(paths)[order]})
    confounds = covariates[["subject_label", "age"]]
    design = pd.DataFrame({"age": covariates["age"].to_numpy(), "group": covariates["group"].to_numpy(),
                           "intercept": np.ones(N)})
    params = {"confounds": confounds, "second_level_contrast": [1.0, 0.0, 0.0],
              "first_level_contrast": "faces", "random_state": 5}
    _assert_equal(_ours(frame, design, **params), _nilearn(frame, design, **params))


def test_maps_node_in_many_blocks_with_a_mask_and_jobs(files, tmp_path):
    paths, covariates = files
    store = tmp_path / "s.zarr"
    chunkglm.convert(paths, store, collection="effects", chunk_bytes=N * 4 * 64)  # 64-voxel blocks
    node = chunkglm.open_cohort(store).maps["effects"]
    assert len(node.data().data.chunks[1]) > 10
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:8, 2:10, 2:9] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    design = _covariate_design(covariates)
    # n_jobs=2: nilearn draws each job's permutations from its own seed; the stream must follow
    params = {"second_level_contrast": "age", "mask": mask_img, "random_state": 7, "n_jobs": 2}
    ours = _ours(node, design, **params)
    theirs = _nilearn(paths, design, **params)
    _assert_equal(ours, theirs)
    assert np.array_equal(ours.get_fdata() != 0, (theirs.get_fdata() != 0))


def test_smoothing_as_nilearn(files):
    paths, covariates = files
    design = _covariate_design(covariates)
    params = {"second_level_contrast": "age", "smoothing_fwhm": 5.0, "random_state": 2}
    _assert_equal(_ours(paths, design, **params), _nilearn(paths, design, **params))


def test_each_block_is_read_once(files, tmp_path, monkeypatch):
    paths, covariates = files
    chunkglm.convert(paths, tmp_path / "r.zarr", collection="effects", chunk_bytes=N * 4 * 128)
    node = chunkglm.open_cohort(tmp_path / "r.zarr").maps["effects"]
    reads, n_blocks = [], []
    original = MapsView.data

    def counted(self, role=None):
        def read(block, block_info=None):
            reads.append(block_info[0]["chunk-location"])
            return block
        array = original(self, role)
        n_blocks.append(array.numblocks[1])
        return array.map_blocks(read, dtype=np.float32)

    monkeypatch.setattr(MapsView, "data", counted)
    _ours(node, _covariate_design(covariates), second_level_contrast="age", random_state=0, n_perm=20)
    assert len(n_blocks) == 1 and n_blocks[0] > 3  # the masked voxels, in blocks
    assert sorted(reads) == [(0, i) for i in range(n_blocks[0])]  # t, null and the NaN check: one read


# -- explicit permutations -----------------------------------------------------------------------------


def test_explicit_sign_flips_give_nilearn_result_and_naive_max_t(files):
    paths, _ = files
    flips = nilearn_permutations(N, N_PERM, True, random_state=11)
    ours = _ours(paths, _one_sample(), permutations=flips, n_perm=1)  # n_perm ignored
    _assert_equal(ours, _nilearn(paths, _one_sample(), random_state=11))
    # an independent check: one-sample t of the flipped maps, max over voxels, rank of the t map
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True  # nilearn's background mask of these maps: the noise box
    y = np.stack([nib.load(p).get_fdata()[mask] for p in paths])

    def t_map(data):
        return data.mean(0) / (data.std(0, ddof=1) / np.sqrt(N))

    t = t_map(y)
    null = np.array([t_map(s[:, None] * y).max() for s in flips])
    naive = -np.log10((1 + (null[None, :] >= t[:, None]).sum(1)) / (N_PERM + 1))
    # float64 t's from two formulas: equal to ~1e-13, no null value sits that close to a t
    np.testing.assert_allclose(ours.get_fdata()[mask], naive.astype(np.float32), rtol=1e-6)


def test_explicit_permutations_two_sample(files):
    paths, covariates = files
    # no constant column: nilearn permutes samples (and adds the intercept as a confound)
    design = pd.DataFrame({"group": covariates["group"].to_numpy(), "age": covariates["age"].to_numpy()})
    orders = nilearn_permutations(N, N_PERM, False, random_state=4)
    ours = _ours(paths, design, second_level_contrast="group", permutations=orders)
    _assert_equal(ours, _nilearn(paths, design, second_level_contrast="group", random_state=4))
    with pytest.raises(InputError, match="permuting samples"):
        _ours(paths, design, second_level_contrast="group", permutations=np.ones((5, N)))


def test_random_permutations_within_monte_carlo_error(files):
    paths, _ = files
    n_perm = 400
    ours = _ours(paths, _one_sample(), n_perm=n_perm, random_state=123)
    theirs = _nilearn(paths, _one_sample(), n_perm=n_perm, random_state=999)
    mask = theirs.get_fdata() != 0
    p1, p2 = 10 ** -ours.get_fdata()[mask], 10 ** -theirs.get_fdata()[mask]
    bound = 5 * np.sqrt(2 * p2 * (1 - p2) / n_perm) + 2 / (n_perm + 1)  # see the module docstring
    assert np.all(np.abs(p1 - p2) <= bound)
    assert not np.array_equal(p1, p2)  # different streams really were drawn


@pytest.mark.parametrize("design_kind, two_sided", [("one_sample", True), ("covariate", False)])
def test_cluster_size_mass_and_tfce_equal_nilearns(files, design_kind, two_sided):
    """threshold + tfce: nilearn's dict, every map equal with the same permutations
    (sizes exactly, t/mass/tfce to float32 rounding of equal float64 values)."""
    paths, covariates = files
    design = _one_sample() if design_kind == "one_sample" else _covariate_design(covariates)
    contrast = "intercept" if design_kind == "one_sample" else "age"
    params = dict(second_level_contrast=contrast, two_sided_test=two_sided, random_state=0, n_perm=30,
                  threshold=0.01, tfce=True)
    ours, theirs = _ours(paths, design, **params), _nilearn(paths, design, **params)
    assert sorted(ours) == sorted(theirs) == sorted(
        ["t", "logp_max_t", "tfce", "logp_max_tfce", "size", "logp_max_size", "mass", "logp_max_mass"])
    assert theirs["size"].get_fdata().max() > 1  # clusters were formed, the comparison means something
    for key in theirs:
        expected = theirs[key].get_fdata().astype(np.float32)
        np.testing.assert_allclose(ours[key].get_fdata(), expected, rtol=1e-6, atol=0, err_msg=key)


# -- bad input, before any map is loaded ------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ({"n_perm": 0}, "n_perm must be an integer >= 1; received 0"),
    ({"threshold": 3.0}, "strictly between 0 and 1 .e.g. 0.001., or None; received 3.0"),
    ({"tfce": "yes"}, "tfce must be True or False"),
    ({"n_jobs": 0}, "n_jobs must be a non-zero integer"),
    ({"mask": NiftiMasker(standardize="zscore_sample")}, "which chunkglm does not apply"),
    ({"mask": NiftiMasker(mask_strategy="epi")}, "chunkglm computes nilearn's background mask only"),
    ({"mask": 3}, "mask must be a 3-D image .path or nibabel image. or a NiftiMasker"),
    ({"second_level_contrast": "intercept - weight"}, "cannot be evaluated on the design columns"),
    ({"second_level_contrast": [1.0, 0.0]}, "2 weights but the design has 3 columns"),
    ({"second_level_contrast": np.eye(3)}, "F contrasts are not supported"),
    ({"second_level_contrast": [0.0, 0.0, 0.0]}, "is null"),
    ({"second_level_contrast": None}, "No second-level contrast is specified"),
])
def test_bad_options(files, params, message):
    paths, covariates = files
    with pytest.raises(InputError, match=message):
        non_parametric_inference(paths, design_matrix=_covariate_design(covariates), **params)


def test_bad_designs(files):
    paths, covariates = files
    with pytest.raises(InputError, match="List of niimgs as 'second_level_input' require a design matrix"):
        non_parametric_inference(paths)
    with pytest.raises(InputError, match="19 rows in design matrix do not match with 20 maps"):
        non_parametric_inference(paths, design_matrix=_one_sample().iloc[:19])
    constant = pd.DataFrame({"intercept": np.ones(N), "ones": np.ones(N) * 2.0})
    with pytest.raises(InputError, match="rank deficient.*Constant columns: \\['intercept', 'ones'\\]"):
        non_parametric_inference(paths, design_matrix=constant, second_level_contrast=[1.0, 0.0])
    frame = pd.DataFrame({"subject_label": covariates["subject_label"], "map_name": "faces",
                          "effects_map_path": paths})
    with pytest.raises(InputError, match="map_name values are \\['faces'\\]"):
        non_parametric_inference(frame, design_matrix=_one_sample(), first_level_contrast="houses")


def test_bad_maps(files, tmp_path):
    paths, _ = files
    other = tmp_path / "other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), AFFINE), other)
    with pytest.raises(InputError, match="(?s)on another grid.*resample_to_img"):
        non_parametric_inference([*paths[:-1], str(other)], design_matrix=_one_sample())
    nan_maps = [nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), AFFINE) for _ in range(N)]
    with pytest.raises(InputError, match="the mask has no voxel"):
        non_parametric_inference(nan_maps, design_matrix=_one_sample())
    one_nan = [nib.load(p) for p in paths]
    data = one_nan[3].get_fdata(dtype=np.float32)
    data[5, 5, 5] = np.nan
    one_nan[3] = nib.Nifti1Image(data, AFFINE)
    mask = nib.Nifti1Image((np.asarray(nib.load(paths[0]).dataobj) != 0).astype(np.uint8), AFFINE)
    # nilearn's masker sets NaN to 0 (tests/test_nonfinite.py compares with nilearn)
    with pytest.warns(UserWarning, match="^1 voxel of the second-level input maps holds NaN"):
        non_parametric_inference(one_nan, design_matrix=_one_sample(), mask=mask, n_perm=10)


# -- fitted first-level models as input --------------------------------------------------------------------


def _runs(folder, n_subjects, n_scans=40):
    """Small 4-D runs, condition "a" active in a corner of the mask: (paths, events, mask image)."""
    rng = np.random.default_rng(3)
    shape, affine = (8, 8, 6), np.diag([3.0, 3.0, 3.0, 1.0])
    events = pd.DataFrame({"onset": [0.0, 20.0, 40.0, 60.0], "duration": [10.0] * 4,
                           "trial_type": ["a", "b", "a", "b"]})
    active = np.zeros(n_scans)
    for onset in (0, 40):  # the "a" blocks (10 s each), in scans of t_r = 2 s
        active[onset // 2:onset // 2 + 5] = 1.0
    mask = np.zeros(shape, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    paths = []
    for s in range(n_subjects):
        data = 100 + rng.normal(0, 1, (*shape, n_scans))
        data[1:4, 1:4, 1:3] += 2.0 * active
        path = folder / f"sub-{s:02d}_bold.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
        paths.append(str(path))
    return paths, events, nib.Nifti1Image(mask, affine)


def test_first_level_models_as_input(tmp_path):
    from chunkglm.glm.first_level import FirstLevelModel

    paths, events, mask = _runs(tmp_path, n_subjects=10)
    # with few subjects nilearn may draw the identity flip: the null then holds the largest t
    # itself and the rank of that voxel is decided by an ulp; this seed draws no identity
    assert not (nilearn_permutations(10, N_PERM, True, random_state=0) == 1).all(axis=1).any()
    labels = [f"{s:02d}" for s in range(len(paths))]
    models = [FirstLevelModel(subject_label=label, t_r=2.0, noise_model="ols", mask_img=mask).fit(p, events)
              for label, p in zip(labels, paths)]
    design = pd.DataFrame({"intercept": np.ones(len(models))})
    with pytest.raises(InputError, match="first_level_contrast is\\s+required"):
        non_parametric_inference(models, design_matrix=design)
    ours = _ours(models, design, first_level_contrast="a - b", mask=mask, random_state=0)
    # nilearn fed our first levels' own effect maps (the second level alone; nilearn's own
    # first levels differ from ours by ~3e-8, which could move a rank)
    maps = [m.compute_contrast("a - b", output_type="effect_size") for m in models]
    _assert_equal(ours, _nilearn(maps, design, mask=mask, random_state=0))


# -- ties of the permutation null (identity and mirror sign-flips recur among 2^n patterns) -------------


def _few_maps(n, seed):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        data = np.zeros((8, 8, 8), np.float32)
        data[2:6, 2:6, 2:6] = rng.normal(0.5, 1.0, (4, 4, 4))
        images.append(nib.Nifti1Image(data, np.eye(4)))
    return images, pd.DataFrame({"intercept": np.ones(n)})


@pytest.mark.parametrize("n, seed, n_perm", [(6, 0, 200), (8, 6, 1000), (8, 6, 5000), (10, 0, 3000)])
@pytest.mark.parametrize("two_sided", [True, False])
def test_null_maxima_tie_with_the_observed_peak_as_nilearns(n, seed, n_perm, two_sided):
    """With n maps there are 2^n sign patterns: at n_perm >> 2^n the identity (and, two-sided,
    the mirror) recurs, and nilearn's null then holds maxima *equal* to the observed peak,
    which count as reaching it. The peak's p can never go below 1/2^n of an exact test
    (seed 6 of 8 maps: chunkglm gave -log10 p = 3.0 at n_perm=1000, nilearn 2.05)."""
    images, design = _few_maps(n, seed)
    params = dict(two_sided_test=two_sided, random_state=0, n_perm=n_perm)
    ours = _ours(images, design, **params).get_fdata(dtype=np.float32)
    theirs = _nilearn(images, design, **params).get_fdata(dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)  # same permutations: the same ranks (module docstring)
    flips = nilearn_permutations(n, n_perm, sign_flip=True, random_state=0)
    ties = np.sum(np.all(flips == 1, axis=1)) + (np.sum(np.all(flips == -1, axis=1)) if two_sided else 0)
    assert ties > 0  # the case really has recurring identity flips
    # p >= (1 + ties) / (n_perm + 1): other flips may exceed the peak too; 1e-6: float32 logp
    assert 10.0 ** -ours.max() >= (1 + ties) / (n_perm + 1) * (1 - 1e-6)


@pytest.mark.parametrize("two_sided", [True, False])
def test_tfce_and_cluster_null_maxima_tie_as_nilearns(two_sided):
    """The identity's TFCE, cluster size and mass maps are the observed ones, bit for bit."""
    images, design = _few_maps(6, 0)
    params = dict(two_sided_test=two_sided, random_state=0, n_perm=300, threshold=0.05, tfce=True)
    ours, theirs = _ours(images, design, **params), _nilearn(images, design, **params)
    for key in ("logp_max_t", "logp_max_tfce", "logp_max_size", "logp_max_mass"):
        np.testing.assert_array_equal(ours[key].get_fdata(dtype=np.float32),
                                      theirs[key].get_fdata().astype(np.float32), err_msg=key)


def test_images_are_float64_as_nilearns_and_the_top_rank_stays_within_its_bound():
    """Regression (nilearn's test_with_paths, failing at random): a float32 -log10 p of the top
    rank, -log10(1 / 6) for n_perm=5, rounds *above* nilearn's float64 bound."""
    images, design = _few_maps(8, 6)
    params = dict(n_perm=5, random_state=0, two_sided_test=True)
    ours, theirs = _ours(images, design, **params), _nilearn(images, design, **params)
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.float64
    logp = ours.get_fdata()
    assert logp.max() == -np.log10(1.0 / 6)  # the top rank is reached ...
    assert np.all(logp <= -np.log10(1.0 / (5 + 1)))  # ... and not exceeded
    np.testing.assert_array_equal(logp, theirs.get_fdata())


# -- nilearn's mask=NiftiMasker, input errors and zero-df designs (issue 15, items 2 and 6) ----------


def _box_mask():
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:9, 2:11, 2:9] = 1
    return nib.Nifti1Image(mask, AFFINE)


@pytest.mark.parametrize("masker_params, smoothing_fwhm, warning", [
    ({"mask_img": "box"}, None, None),
    ({"mask_img": "box", "smoothing_fwhm": 4.0}, None, None),  # the masker's smoothing
    ({"mask_img": "box", "smoothing_fwhm": 4.0}, 6.0, "Parameter 'smoothing_fwhm' of the masker overridden"),
    ({"mask_img": "box"}, 6.0, "smoothing_fwhm=6.0 is not used"),  # nilearn keeps the masker's None
    ({}, None, None),  # no mask image: nilearn's background mask of the maps
    ({"mask_img": "box", "target_affine": np.diag([4.0, 4.0, 4.0])}, None, None),  # resampled mask
])
def test_niftimasker_as_mask_as_nilearn(files, masker_params, smoothing_fwhm, warning):
    # nilearn clones the masker and uses its mask, resampling and smoothing (smoothing_fwhm
    # overrides the masker's only when both are set); same permutations: the same -log10 p
    paths, covariates = files
    masker_params = {**masker_params, "standardize": None}
    if masker_params.get("mask_img") == "box":
        masker_params["mask_img"] = _box_mask()
    design = _covariate_design(covariates)
    params = {"second_level_contrast": "age", "random_state": 4, "smoothing_fwhm": smoothing_fwhm}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = non_parametric_inference(paths, design_matrix=design, n_perm=N_PERM,
                                        mask=NiftiMasker(**masker_params), **params)
    messages = [str(w.message) for w in caught]
    if warning is not None:
        assert any(warning in m for m in messages), messages
    theirs = _nilearn(paths, design, mask=NiftiMasker(**masker_params), **params)
    _assert_equal(ours, theirs)
    fitted = NiftiMasker(**masker_params).fit(paths[0])  # a fitted masker is cloned, as nilearn
    _assert_equal(_ours(paths, design, mask=fitted, **params), theirs)


def _outcome(function, *args, **kwargs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the class and message are compared
        return exc
    return None


@pytest.mark.parametrize("case", ["single_model", "none", "one_image", "mixed", "missing_file",
                                  "no_design", "null_contrast", "empty_contrast", "no_contrast"])
def test_input_errors_as_nilearn(files, case):
    """The exception class nilearn raises, with nilearn's message inside ours, checked in nilearn's
    order (the input before the design)."""
    from nilearn.glm.first_level import FirstLevelModel as NilearnFirstLevelModel
    from nilearn.glm.second_level import non_parametric_inference as nilearn_npi

    paths, covariates = files
    images = [nib.load(p) for p in paths[:3]]
    three = pd.DataFrame({"intercept": np.ones(3)})
    calls = {
        "single_model": ((NilearnFirstLevelModel(),), {}),
        "none": ((None,), {"second_level_contrast": "intercept"}),
        "one_image": (([images[0]],), {}),
        "mixed": (([*images, []],), {}),
        "missing_file": (("random string object",), {}),
        "no_design": ((images,), {}),
        "null_contrast": ((images,), {"design_matrix": three, "second_level_contrast": [0.0]}),
        "empty_contrast": ((images,), {"design_matrix": three, "second_level_contrast": []}),
        "no_contrast": ((images,), {"design_matrix": pd.DataFrame(np.eye(3), columns=list("abc"))}),
    }
    args, kwargs = calls[case]
    ours = _outcome(non_parametric_inference, *args, n_perm=5, **kwargs)
    theirs = _outcome(nilearn_npi, *args, n_perm=5, **kwargs)
    assert theirs is not None
    assert isinstance(ours, type(theirs)), (ours, theirs)
    # nilearn's first line, less what names surface images (chunkglm has none yet) and its end
    expected = str(theirs).split("\n")[0].split(" instead")[0].replace(" or surface images", "").rstrip(".")
    assert expected in str(ours), (str(ours), str(theirs))


def test_no_residual_degrees_of_freedom_as_nilearn():
    # nilearn's test_cluster_level_with_covariates: 3 maps, a tested intercept and 2 covariates
    # leave 0 residual degrees of freedom; nilearn computes on (t = 0 or NaN, p = 1, no cluster)
    rng = np.random.default_rng(0)
    maps = [nib.Nifti1Image(d, AFFINE) for d in _maps(rng, 3, np.array([1.0, 2.0, 3.0]))]
    design = pd.DataFrame({"cov1": rng.random(3), "cov2": rng.random(3), "intercept": 1.0})
    for params in ({"model_intercept": False, "second_level_contrast": "intercept", "threshold": 0.1},
                   {"second_level_contrast": "cov1", "tfce": True, "threshold": 0.1, "two_sided_test": True}):
        params = {**params, "mask": _box_mask(), "random_state": 0, "n_perm": 20}
        with pytest.warns(UserWarning, match="no residual degrees of freedom"):
            ours = non_parametric_inference(maps, design_matrix=design, **params)
        theirs = _nilearn(maps, design, **params)
        assert set(ours) == set(theirs)
        for key in theirs:
            # t is 0 or NaN on both sides (NaN where rounding leaves exactly no residual,
            # which differs with the summation order), so NaN counts as 0 here; the rest is exact
            np.testing.assert_array_equal(np.nan_to_num(ours[key].get_fdata()),
                                          np.nan_to_num(theirs[key].get_fdata()), err_msg=key)
        assert np.all(np.nan_to_num(ours["t"].get_fdata()) == 0)
