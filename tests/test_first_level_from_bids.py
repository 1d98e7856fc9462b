"""first_level_from_bids on a BIDS folder (nilearn underneath) and on a store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import first_level_from_bids as nilearn_from_bids

import chunkglm
from chunkglm.errors import InputError
from chunkglm.glm.first_level import FirstLevelModel, first_level_from_bids

SPACE = "MNI152NLin2009cAsym"


def test_bids_folder_gives_nilearn_inputs_and_our_models(tiny_bids):
    args = dict(task_label="main", space_label=SPACE, derivatives_folder="derivatives/fmriprep",
                confounds_strategy=("motion",), confounds_motion="basic")
    models, imgs, events, confounds = first_level_from_bids(tiny_bids.root, **args)
    ref_models, ref_imgs, ref_events, ref_confounds = nilearn_from_bids(str(tiny_bids.root), **args)
    assert all(isinstance(m, FirstLevelModel) for m in models)
    assert [m.subject_label for m in models] == [m.subject_label for m in ref_models] == ["01", "02"]
    assert [m.t_r for m in models] == [m.t_r for m in ref_models]
    assert [m.slice_time_ref for m in models] == [m.slice_time_ref for m in ref_models] == [0.5, 0.5]
    assert imgs == ref_imgs
    for ours, ref in zip(confounds, ref_confounds):  # one run each: nilearn gives a DataFrame
        pd.testing.assert_frame_equal(ours, ref)
    # the models fit the NIfTI runs (converted on the way) to nilearn's numbers
    mask = str(tiny_bids.runs[0].mask_path)
    models[0].mask_img = ref_models[0].mask_img = mask
    z = models[0].fit(imgs[0], events=events[0], confounds=confounds[0]).compute_contrast("a - b")
    z_ref = ref_models[0].fit(imgs[0], events=events[0], confounds=confounds[0]).compute_contrast("a - b")
    np.testing.assert_allclose(z.get_fdata(), z_ref.get_fdata(), rtol=1e-5, atol=1e-6)


def test_store_gives_one_model_per_subject_with_stored_timing(tiny_bids_sessions, tmp_path):
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids_sessions.root, store)
    models, runs, events, confounds = first_level_from_bids(
        store, "main", space_label=SPACE, sub_labels=["02"], confounds_columns=["csf", "trans_x"])
    assert [m.subject_label for m in models] == ["02"]
    assert models[0].t_r == tiny_bids_sessions.tr and models[0].slice_time_ref == 0.5
    assert len(runs[0]) == 4 and list(confounds[0][0].columns) == ["csf", "trans_x"]
    expected = [pd.read_csv(r.events_path, sep="\t") for r in tiny_bids_sessions.runs if r.subject == "02"]
    for got, want in zip(events[0], expected):
        pd.testing.assert_frame_equal(got[want.columns.tolist()], want, check_dtype=False)
    z = models[0].fit(runs[0], events=events[0], confounds=confounds[0]).compute_contrast("a - b")
    assert np.isfinite(z.get_fdata()).all()


def test_store_errors(tiny_bids, tmp_path):
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids.root, store)
    with pytest.raises(InputError, match="no run of"):
        first_level_from_bids(store, "rest")
    with pytest.raises(InputError, match=r"no confound column\(s\) \['nope'\]"):
        first_level_from_bids(store, "main", confounds_columns=["nope"])
    with pytest.raises(RuntimeError, match="confounds_columns=\\[...\\]"):
        first_level_from_bids(store, "main", confounds_strategy=("motion",))


SETTINGS = dict(smoothing_fwhm=6.0, target_affine=np.diag([4.0, 4.0, 4.0, 1.0]), target_shape=(10, 11, 9),
                hrf_model="spm + derivative", drift_model="polynomial", drift_order=2, high_pass=0.02,
                min_onset=-12, signal_scaling=(0, 1), noise_model="ols", minimize_memory=False,
                fir_delays=[0, 1], n_jobs=2, memory_level=0, standardize="psc")


def _assert_settings(models, reference=None):
    for model in models:
        for name, value in SETTINGS.items():
            got = getattr(model, name)
            np.testing.assert_array_equal(np.asarray(got, dtype=object), np.asarray(value, dtype=object),
                                          err_msg=name)
            if reference is not None:  # nilearn's own model got the same value
                np.testing.assert_array_equal(np.asarray(getattr(reference, name), dtype=object),
                                              np.asarray(value, dtype=object), err_msg=name)


def test_every_model_setting_reaches_the_models_from_a_folder(tiny_bids):
    """Regression: smoothing_fwhm, target_affine and target_shape were silently dropped."""
    args = dict(task_label="main", space_label=SPACE, derivatives_folder="derivatives/fmriprep", **SETTINGS)
    models, *_ = first_level_from_bids(tiny_bids.root, exclude_subjects=["02"], **args)
    ref_models, *_ = nilearn_from_bids(str(tiny_bids.root), exclude_subjects=["02"], **args)
    assert [m.subject_label for m in models] == [m.subject_label for m in ref_models] == ["01"]
    _assert_settings(models, ref_models[0])


def test_every_model_setting_reaches_the_models_from_a_store(tiny_bids, tmp_path):
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids.root, store)
    models, *_ = first_level_from_bids(store, "main", exclude_subjects=["01"], **SETTINGS)
    assert [m.subject_label for m in models] == ["02"]
    _assert_settings(models)


def test_unknown_settings_are_refused(tiny_bids, tmp_path):
    with pytest.raises(RuntimeError, match="Unknown keyword arguments"):
        first_level_from_bids(tiny_bids.root, "main", space_label=SPACE, smoothing=5.0,
                              derivatives_folder="derivatives/fmriprep")
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids.root, store)
    with pytest.raises(RuntimeError, match="Unknown keyword arguments.*smoothing"):
        first_level_from_bids(store, "main", smoothing=5.0)


def test_mask_from_derivatives_and_dataset_path_type(tiny_bids, tmp_path):
    """mask_img="derivatives": each model gets its subject's brain mask as an image (nilearn's
    from the fMRIPrep folder; a store's stored mask); a dataset_path of another type is a
    TypeError naming the types accepted, as nilearn's."""
    import nibabel as nib

    models, *_ = first_level_from_bids(tiny_bids.root, "main", space_label=SPACE,
                                       derivatives_folder="derivatives/fmriprep", mask_img="derivatives")
    assert models and all(isinstance(m.mask_img, nib.Nifti1Image) for m in models)
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids.root, store)
    models, *_ = first_level_from_bids(store, "main", mask_img="derivatives")
    assert models and all(isinstance(m.mask_img, nib.Nifti1Image) for m in models)
    with pytest.raises(TypeError, match="'dataset_path' must be of type"):
        first_level_from_bids(2, "main")
