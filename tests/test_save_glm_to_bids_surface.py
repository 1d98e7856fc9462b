"""save_glm_to_bids on surface models against nilearn 0.14.1's on the same inputs.

Both write float32 GIFTI values of float64 maps that agree to ~1e-15 relative
(tests/test_first_level_surface.py, tests/test_second_level_surface.py), so the
files agree to one float32 rounding: relative 1e-6 of each map's largest
value (measured 0: the same float32 values).
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_fsaverage
from nilearn.glm import save_glm_to_bids as nilearn_save
from nilearn.glm.first_level import FirstLevelModel as NilearnFLM
from nilearn.glm.second_level import SecondLevelModel as NilearnSLM
from nilearn.surface import SurfaceImage

from chunkglm.glm import save_glm_to_bids
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.io._surface_files import surface_file_name
from chunkglm.glm.second_level import SecondLevelModel

MESH = load_fsaverage("fsaverage5")["pial"]
RTOL = 1e-6  # one float32 rounding: see the module docstring


def _run(seed=0):
    rng = np.random.default_rng(seed)
    return SurfaceImage(MESH, {p: rng.standard_normal((10242, 40)).astype(np.float32) for p in ("left", "right")})


EVENTS = pd.DataFrame({"onset": [0, 20, 40, 60], "duration": [5] * 4, "trial_type": ["a", "b", "a", "b"]})


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _compare_outputs(ours, theirs):
    """Every GIFTI and JSON nilearn wrote, ours equal; the files only chunkglm writes are its SVG
    figures (and its report.html where nilearn's failed to draw its own)."""
    mine, nilearns = _files(ours), _files(theirs)
    assert nilearns <= mine
    assert {f for f in mine - nilearns if not f.endswith((".svg", "report.html"))} == {".bidsignore"}
    assert any(f.endswith("report.html") for f in mine)
    giftis = sorted(f for f in nilearns if f.endswith(".gii"))
    assert any("hemi-L_den-10242" in f for f in giftis) and any("hemi-R_den-10242" in f for f in giftis)
    for name in giftis:
        got, want = (nib.load(folder / name).darrays for folder in (ours, theirs))
        assert len(got) == len(want) == 1, name
        assert got[0].data.dtype == want[0].data.dtype, name
        assert got[0].data.shape == want[0].data.shape, name
        scale = float(np.nanmax(np.abs(want[0].data))) or 1.0
        np.testing.assert_allclose(got[0].data, want[0].data, rtol=RTOL, atol=RTOL * scale, equal_nan=True,
                                   err_msg=name)
    return giftis


def test_first_level_surface_files_as_nilearn(tmp_path):
    ours = FirstLevelModel(t_r=2.0).fit(_run(), events=EVENTS)
    theirs = NilearnFLM(t_r=2.0, minimize_memory=False).fit(_run(), events=EVENTS)
    save_glm_to_bids(ours, ["a - b"], out_dir=tmp_path / "ours", prefix="sub-01", two_sided=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nilearn_save(theirs, ["a - b"], out_dir=tmp_path / "nilearn", prefix="sub-01")
    giftis = _compare_outputs(tmp_path / "ours", tmp_path / "nilearn")
    assert "sub-01/sub-01_hemi-L_den-10242_contrast-aMinusB_stat-z_statmap.gii" in giftis
    assert "sub-01/sub-01_hemi-R_den-10242_stat-rsquared_statmap.gii" in giftis
    sidecars = [json.loads((tmp_path / f / "sub-01/sub-01_statmap.json").read_text()) for f in ("ours", "nilearn")]
    assert sidecars[0]["Density"] == sidecars[1]["Density"] == {"10242": "10242 vertices per hemisphere"}
    details = [json.loads((tmp_path / f / "sub-01/sub-01_contrast-aMinusB_clusters.json").read_text())
               for f in ("ours", "nilearn")]
    assert set(details[0]) == set(details[1])  # nilearn's surface entries (no cluster size, no distance)
    assert details[0]["Threshold (computed)"] == details[1]["Threshold (computed)"]  # two-sided 3.291


def test_second_level_surface_files_as_nilearn(tmp_path):
    rng = np.random.default_rng(3)
    maps = [SurfaceImage(MESH, {p: rng.standard_normal(10242).astype(np.float32) for p in ("left", "right")})
            for _ in range(6)]
    design = pd.DataFrame({"intercept": np.ones(6), "age": rng.standard_normal(6)})
    ours = SecondLevelModel(minimize_memory=False).fit(maps, design_matrix=design)
    save_glm_to_bids(ours, ["age"], out_dir=tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # nilearn 0.14.1 writes every map before its report; drawing the report of a surface second
        # level can fail on some masks ("Levels, labels, and colors argument need to be either the same
        # length or None", with a vertex masked out): the maps are compared either way
        try:
            nilearn_save(NilearnSLM(minimize_memory=False).fit(maps, design_matrix=design), ["age"],
                         out_dir=tmp_path / "nilearn")
        except ValueError as err:
            assert "Levels, labels, and colors" in str(err)
    giftis = _compare_outputs(tmp_path / "ours", tmp_path / "nilearn")
    assert "group/hemi-L_den-10242_contrast-age_stat-t_statmap.gii" in giftis
    assert "group/hemi-R_den-10242_stat-errorts_statmap.gii" in giftis


def test_surface_file_names():
    assert surface_file_name("sub-01/sub-01_task-main_run-2_contrast-aMinusB_stat-z_statmap.nii.gz", "L", 10242) \
        == "sub-01/sub-01_task-main_run-2_hemi-L_den-10242_contrast-aMinusB_stat-z_statmap.gii"
    assert surface_file_name("sub-01_ses-1_space-fsaverage5_mask.nii.gz", "R", 2562) \
        == "sub-01_ses-1_hemi-R_space-fsaverage5_den-2562_mask.gii"
    assert surface_file_name("group/mystudy_contrast-age_stat-t_statmap.nii.gz", "L", 7) \
        == "group/mystudy_hemi-L_den-7_contrast-age_stat-t_statmap.gii"


def test_cifti_model_dense_scalar_files(tmp_path):
    """CIFTI models (nilearn has none): each map a dense scalar file on the runs' brain-model axis,
    equal to compute_contrast's as float32; no cluster table, with a warning; a report.html listing the
    subcortical structures."""
    from nibabel.cifti2 import Cifti2Image

    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.surface_convert import convert_surface_bids
    from chunkglm.testing import make_synthetic_bids

    dataset = make_synthetic_bids(tmp_path / "bids", n_subjects=1, n_runs=1, surface=True)
    convert_surface_bids(dataset.root, tmp_path / "c.zarr", space="fsaverage5", cifti=True)
    model = FirstLevelModel(slice_time_ref=0.5).fit(list(open_cohort(tmp_path / "c.zarr").runs.values()))
    with pytest.warns(UserWarning, match="no cluster table for this CIFTI contrast"):
        save_glm_to_bids(model, ["a - b"], out_dir=tmp_path / "out", prefix="sub-01")
    files = _files(tmp_path / "out")
    assert not any(f.endswith(("clusters.tsv", "clusters.json", ".nii.gz", ".gii")) for f in files)
    assert "THALAMUS_LEFT (8 voxels)" in (tmp_path / "out" / "sub-01" / "sub-01_report.html").read_text()
    z_file = "sub-01/sub-01_contrast-aMinusB_stat-z_statmap.dscalar.nii"
    assert {z_file, "sub-01/sub-01_mask.dscalar.nii", "sub-01/sub-01_stat-rsquared_statmap.dscalar.nii"} <= files
    written = nib.load(tmp_path / "out" / z_file)
    expected = model.compute_contrast("a - b")
    assert isinstance(written, Cifti2Image) and written.header.get_axis(1) == dataset.surface.brain_models
    assert written.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(written.dataobj, dtype=np.float64),
                               np.asarray(expected.dataobj, dtype=np.float64), rtol=RTOL)
    mask = nib.load(tmp_path / "out" / "sub-01/sub-01_mask.dscalar.nii")
    assert np.asarray(mask.dataobj).all() and mask.shape == (1, len(dataset.surface.brain_models))
