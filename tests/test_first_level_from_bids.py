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
    with pytest.raises(InputError, match="confounds_columns=\\[...\\]"):
        first_level_from_bids(store, "main", confounds_strategy=("motion",))
