"""NaN and +/-inf input values: every model does what its anchor does, voxel by voxel.

nilearn's maskers set non-finite values to 0 (``apply_mask_fmri`` ->
``ensure_finite_data``, silently) before any model sees the data, so a NaN
block changes the fit of its own voxels only. chunkglm keeps the values as
given in the store (checked bit for bit here) and sets them to 0 when a model
reads a block, with a ``UserWarning`` giving the number of affected voxels.
NiMARE's IBMA estimators instead drop non-finite (and zero) entries
(``nimare.meta.utils._usable``): there chunkglm matches NiMARE.

Before the fix, one NaN made chunkglm's first-level AR(1) z differ from
nilearn's at every voxel of the mask (the Yule-Walker grand mean of the
residuals is a global reduction: one NaN poisons it); the other models
refused the input or returned NaN maps.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm

WARNING = r"^{n} voxels? of {where} holds? NaN or infinite values; they were set to 0, as nilearn does"


def _poison(data, nan_box, infs):
    """A copy of ``data`` with NaN in ``nan_box`` (a tuple of slices) and +/-inf at ``infs``."""
    bad = np.array(data, dtype=np.float32, copy=True)
    bad[nan_box] = np.nan
    for sign, index in zip((1, -1, 1), infs):
        bad[index] = sign * np.inf
    return bad


def _bits(values):
    """float32 values as their bit patterns (NaN payloads and signs compared exactly)."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


# -- first level ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_run(tiny_bids, tmp_path_factory):
    """A run of tiny_bids with a NaN block over 4 volumes and +/-inf at 3 (voxel, volume)s."""
    run = tiny_bids.runs[0]
    img = nib.load(run.bold_path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    bad = _poison(data, (slice(3, 5), slice(4, 6), slice(4, 6), slice(5, 9)),
                  [(5, 5, 5, 3), (6, 5, 4, 10), (4, 6, 5, 20)])
    path = tmp_path_factory.mktemp("nan_run") / "sub-01_task-x_run-1_bold.nii.gz"
    nib.save(nib.Nifti1Image(bad, img.affine, img.header), path)
    return run, path, bad


def _first_level_pair(tiny_bids, run, images, mask_img, noise_model):
    from nilearn.glm.first_level import FirstLevelModel as NilearnFLM

    from chunkglm.glm.first_level import FirstLevelModel

    events = pd.read_csv(run.events_path, sep="\t")
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, noise_model=noise_model, mask_img=mask_img,
                  random_state=0)  # AR(N>1): the same k-means clusters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NilearnFLM(**params).fit(images[0], events=events)
    return FirstLevelModel(**params).fit(images[1], events=events), ref


@pytest.mark.parametrize("noise_model", ["ar1", "ols", "ar2"])
def test_first_level_matches_nilearn_and_the_store_keeps_the_values(tiny_bids, nan_run, tmp_path,
                                                                    noise_model):
    run, path, bad = nan_run
    store = tmp_path / "cohort.zarr"
    chunkglm.convert([path], store, mask_img=str(run.mask_path), chunk_bytes=2_000)  # several blocks
    node = chunkglm.open_cohort(store).runs["sub-01_task-x_run-1"]
    mask = node.grid.mask
    ours, ref = _first_level_pair(tiny_bids, run, (str(path), node), str(run.mask_path), noise_model)
    affected = int((~np.isfinite(bad).all(axis=3) & mask).sum())
    assert affected == 11  # 8 of the NaN block and the 3 infinite values, in the mask
    with pytest.warns(UserWarning, match=WARNING.format(n=affected, where="run sub-01_task-x_run-1")):
        got = ours.compute_contrast("a - b", output_type="all")
    want = ref.compute_contrast("a - b", output_type="all")
    # tolerances of tests/test_first_level.py (float32 data: 1e-7 relative L2 per map); every
    # voxel, the poisoned ones included, within 2e-6 of nilearn's z (float32 output images of
    # |z| < 10: ~1e-6 rounding). Before the fix the AR(1) z differed everywhere (max |dz| 0.78).
    for name in ("z_score", "effect_size", "effect_variance"):
        a, b = got[name].get_fdata()[mask], want[name].get_fdata()[mask]
        assert np.isfinite(a).all(), name
        assert np.linalg.norm(a - b) <= 1e-7 * np.linalg.norm(b), name
    assert np.abs(got["z_score"].get_fdata() - want["z_score"].get_fdata())[mask].max() <= 2e-6
    stored = node.data().data.compute()  # the store's copy: as given, bit for bit
    np.testing.assert_array_equal(_bits(stored), _bits(bad[mask].T))
    assert np.isnan(stored).sum() == 8 * 4


def test_first_level_nifti_input_with_nilearns_epi_mask(tiny_bids, tmp_path):
    """mask_img=None: both compute nilearn's EPI mask from the poisoned run (its own NaN handling:
    most poisoned voxels fall out of it; with this pattern one +inf voxel stays in)."""
    run = tiny_bids.runs[0]
    img = nib.load(run.bold_path)
    bad = _poison(np.asarray(img.dataobj), (slice(2, 4), slice(2, 4), slice(2, 4), slice(5, 9)),
                  [(5, 5, 5, 3), (6, 5, 4, 10)])
    path = tmp_path / "sub-01_task-x_run-1_bold.nii.gz"
    nib.save(nib.Nifti1Image(bad, img.affine, img.header), path)
    ours, ref = _first_level_pair(tiny_bids, run, (str(path), str(path)), None, "ar1")
    mask = ref.masker_.mask_img_.get_fdata() != 0
    np.testing.assert_array_equal(ours.mask_img_.get_fdata() != 0, mask)
    affected = int((~np.isfinite(bad).all(axis=3) & mask).sum())
    assert affected == 1
    with pytest.warns(UserWarning, match=WARNING.format(n=affected, where="run .*")):
        got = ours.compute_contrast("a - b").get_fdata()[mask]
    want = ref.compute_contrast("a - b").get_fdata()[mask]
    assert np.abs(got - want).max() <= 2e-6  # as above


def test_first_level_residuals_read_the_zeroed_values(tiny_bids, nan_run, tmp_path):
    """residuals_ reads the data a second time: with the same zeros as the fit (nilearn's)."""
    from nilearn.glm.first_level import FirstLevelModel as NilearnFLM

    from chunkglm.glm.first_level import FirstLevelModel

    run, path, _ = nan_run
    events = pd.read_csv(run.events_path, sep="\t")
    params = dict(t_r=tiny_bids.tr, slice_time_ref=0.5, mask_img=str(run.mask_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NilearnFLM(**params, minimize_memory=False).fit(str(path), events=events)
        ours = FirstLevelModel(**params, minimize_memory=False).fit(str(path), events=events)
        got, want = ours.residuals_[0].get_fdata(), ref.residuals_[0].get_fdata()
    mask = nib.load(run.mask_path).get_fdata() != 0
    # tests/test_first_level.py: residuals agree to ~3e-8 relative L2, bounded at 1e-6
    assert np.isfinite(got[mask]).all()
    assert np.linalg.norm(got[mask] - want[mask]) <= 1e-6 * np.linalg.norm(want[mask])


# -- second level and non_parametric_inference ----------------------------------------------------

SHAPE = (12, 14, 12)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N = 12


@pytest.fixture(scope="module")
def group_maps(tmp_path_factory):
    """N float32 effect maps (noise + effect in a box); map 3 has a NaN block, maps 5, 7 and 8
    an infinite value; the mask is the box."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("group")
    maps = []
    for _ in range(N):
        data = np.zeros(SHAPE, np.float32)
        data[2:-2, 2:-2, 2:-2] = rng.normal(0.8, 1.0, (8, 10, 8))
        maps.append(data)
    maps[3] = _poison(maps[3], (slice(3, 5), slice(3, 6), slice(3, 5)), [])
    maps[5][6, 6, 6], maps[7][4, 8, 6], maps[8][6, 6, 6] = np.inf, -np.inf, np.inf
    paths = []
    for index, data in enumerate(maps):
        paths.append(str(folder / f"sub-{index:02d}_effect.nii.gz"))
        nib.save(nib.Nifti1Image(data, AFFINE), paths[-1])
    box = np.zeros(SHAPE, np.uint8)
    box[2:-2, 2:-2, 2:-2] = 1
    mask_path = str(folder / "mask.nii.gz")
    nib.save(nib.Nifti1Image(box, AFFINE), mask_path)
    return paths, mask_path, np.stack(maps)


def _affected(stack, mask):
    return int((~np.isfinite(stack).all(axis=0) & mask).sum())  # 12 (NaN block) + 2 (infs)


def test_second_level_matches_nilearn_and_the_store_keeps_the_values(group_maps, tmp_path):
    from nilearn.glm.second_level import SecondLevelModel as NilearnModel

    from chunkglm.glm.second_level import OUTPUT_TYPES, SecondLevelModel

    paths, mask_path, stack = group_maps
    store = tmp_path / "cohort.zarr"
    chunkglm.convert(paths, store, mask_img=mask_path, collection="effects", chunk_bytes=N * 4 * 128)
    node = chunkglm.open_cohort(store).maps["effects"]
    mask = node.grid.mask
    rng = np.random.default_rng(0)
    design = pd.DataFrame({"intercept": np.ones(N), "age": rng.normal(40, 10, N)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NilearnModel(mask_img=mask_path).fit(paths, design_matrix=design)
        want = ref.compute_contrast("intercept", output_type="all")
    model = SecondLevelModel(mask_img=mask_path, minimize_memory=False).fit(node, design_matrix=design)
    affected = _affected(stack, mask)
    assert affected == 14
    with pytest.warns(UserWarning, match=WARNING.format(n=affected, where="the second-level input maps")):
        got = model.compute_contrast("intercept", output_type="all")
    # tests/test_second_level.py's tolerance: float32 outputs and QR vs pinv algebra, 1e-5
    # relative L2 per map; every voxel finite (before the fix: NaN at the 14 voxels).
    for name in OUTPUT_TYPES:
        a, b = got[name].get_fdata()[mask], want[name].get_fdata()[mask]
        assert np.isfinite(a).all(), name
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
    assert np.abs(got["z_score"].get_fdata() - want["z_score"].get_fdata())[mask].max() <= 1e-5
    residuals = model.residuals_.get_fdata()[mask]  # a second read: the same zeros
    assert np.isfinite(residuals).all()
    stored = node.data().data.compute()
    np.testing.assert_array_equal(_bits(stored), _bits(stack[:, mask]))


@pytest.mark.parametrize("volumes", [False, True])
def test_non_parametric_inference_matches_nilearn(group_maps, volumes):
    from nilearn.glm.second_level import non_parametric_inference as nilearn_npi

    from chunkglm.glm.second_level import non_parametric_inference

    paths, mask_path, stack = group_maps
    mask = nib.load(mask_path).get_fdata() != 0
    design = pd.DataFrame({"intercept": np.ones(N)})
    params = dict(design_matrix=design, mask=mask_path, n_perm=50, random_state=0)
    if volumes:
        params.update(threshold=0.01, tfce=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nilearn_npi(paths, **params)
    with pytest.warns(UserWarning, match=WARNING.format(n=_affected(stack, mask),
                                                        where="the second-level input maps")):
        ours = non_parametric_inference(paths, **params)
    if not volumes:
        ours, theirs = {"logp_max_t": ours}, {"logp_max_t": theirs}
    # same permutations: the same ranks, so nilearn's float64 values cast to float32 must be
    # *equal* (tests/test_non_parametric_inference.py); t to float32 rounding
    for key, image in ours.items():
        got = image.get_fdata(dtype=np.float32)
        want = theirs[key].get_fdata(dtype=np.float64).astype(np.float32)
        if key == "t":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got, want, err_msg=key)
    assert ours["logp_max_t"].get_fdata().max() > 1.0  # an effect is found: not empty maps


# -- IBMA meta-analysis (NiMARE's rule, not nilearn's) -------------------------------------------

IBMA_FITS = {"dsl": ("DerSimonianLaird", {}), "dsl_aggr": ("DerSimonianLaird", {"aggressive_mask": True}),
             "stouffers": ("Stouffers", {}), "wls": ("WeightedLeastSquares", {}),
             "vbl_ml": ("VarianceBasedLikelihood", {"method": "ml"})}


@pytest.fixture(scope="module")
def poisoned_studies(tmp_path_factory):
    """tests/_nimare_reference.py's studies, with a NaN block in study 5's beta and +/-inf in
    study 6's varcope and study 7's z; NiMARE 0.22 fitted on them once (in .venv-nimare)."""
    import json
    import subprocess

    import _nimare_reference as reference
    from test_meta_parity import ROOT, _python

    folder = tmp_path_factory.mktemp("meta_nonfinite")
    spec = reference.write_maps_folder(folder / "maps")
    poison = {(5, "beta"): ((slice(1, 3), slice(2, 4), slice(1, 3)), []),
              (6, "varcope"): ((slice(0, 0),) * 3, [(4, 2, 2), (2, 5, 3)]),
              (7, "z"): ((slice(0, 0),) * 3, [(1, 1, 1), (4, 5, 0), (3, 3, 3)])}
    for (study, role), (box, infs) in poison.items():
        path = spec["images"][study][role]
        img = nib.load(path)
        nib.save(nib.Nifti1Image(_poison(np.asarray(img.dataobj), box, infs), img.affine), path)
    spec["fits"] = [{"name": n, "class": c, "params": p, "corrections": []} for n, (c, p) in IBMA_FITS.items()]
    spec_path, out = folder / "spec.json", folder / "nimare.npz"
    spec_path.write_text(json.dumps(spec))
    run = subprocess.run([_python(), str(ROOT / "tests" / "_nimare_reference.py"), str(spec_path), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    theirs = {}
    for key in data.files:
        if "/" in key:
            fit, name = key.split("/", 1)
            theirs.setdefault(fit, {})[name] = data[key]
    return folder, spec, theirs


@pytest.mark.parametrize("name", sorted(IBMA_FITS))
def test_ibma_matches_nimare_and_the_store_keeps_the_values(poisoned_studies, name):
    from test_meta_parity import OPTIMISED, assert_maps_equal

    from chunkglm.meta import convert_meta_maps, ibma

    folder, spec, theirs = poisoned_studies
    table = pd.DataFrame(spec["images"])
    node = convert_meta_maps(table, folder / f"{name}.zarr", "studies", mask_img=spec["mask"])
    klass, params = IBMA_FITS[name]
    estimator = getattr(ibma, klass)(**params)
    mask = node.grid.mask
    roles = ("z",) if klass == "Stouffers" else ("beta", "varcope")
    stacks = {role: np.stack([np.asarray(nib.load(image[role]).dataobj) for image in spec["images"]])
              for role in roles}
    affected = int(np.logical_or.reduce([~np.isfinite(s).all(axis=0) for s in stacks.values()])[mask].sum())
    assert affected > 5  # NaN/inf in the mask (with study 2's NaN slab of write_maps_folder)
    with pytest.warns(UserWarning, match=WARNING.format(n=affected, where="the meta-analysis inputs")
                      .replace("they were set to 0, as nilearn does", "those values were left out")):
        maps = estimator.fit(node).maps
    # tolerances of tests/test_meta_parity.py: closed forms to float32 rounding, likelihood
    # estimators to their solvers' tolerance; NaN exactly where NiMARE's are
    if name in OPTIMISED:
        assert_maps_equal(maps, theirs[name], rtol=1e-4, atol=1e-6)
    else:
        assert_maps_equal(maps, theirs[name], rtol=1e-6, atol=1e-7)
    group = chunkglm.open_cohort(folder / f"{name}.zarr").root[node.path]
    for role, stack in stacks.items():  # the store's copy: as given, bit for bit
        stored = np.asarray(group[{"beta": "beta", "varcope": "varcope", "z": "z"}[role]][...])
        np.testing.assert_array_equal(_bits(stored), _bits(stack[:, mask]))
