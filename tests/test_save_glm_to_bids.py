"""save_glm_to_bids / save_glm_derivatives against nilearn's save_glm_to_bids.

Both models fit the same float32 run, mask and confounds; nilearn's with
minimize_memory=False (it cannot write stat-errorts/rsquared otherwise).

Tolerance on saved maps: relative L2 over the mask <= 1e-7, as for the fits
(tests/test_first_level.py); measured <= 3e-8 on every map, including the
float32 storage of ours (nilearn stores float64).

Both save with two_sided=True: nilearn's save_glm_to_bids thresholds
two-sided whatever two_sided says, ours follows two_sided (as nilearn's
report does), so the clusters.json parameters can be compared.
"""

from __future__ import annotations

import functools
import json
import os
import types
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.errors import InputError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.io import bids as bids_module
from chunkglm.glm.io._bids_names import plan_bids_names
from chunkglm.glm.io import save_glm_derivatives, save_glm_to_bids, write_glm_to_bids
from chunkglm.io import derivatives
from chunkglm.io.derivatives import StagedOutput, contrast_label, software
from chunkglm.testing import make_synthetic_bids, rel_l2

pytestmark = pytest.mark.filterwarnings("ignore:No clusters found:UserWarning")

REL_L2 = 1e-7
CONFOUNDS = ["trans_x", "rot_z", "csf"]
PREFIX = "sub-01_task-main"
SPACE = "space-MNI152NLin2009cAsym"


def _contrasts(n_columns):
    return {"a - b": "a - b", "a": "a", "effects": np.eye(n_columns)[:2]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Our model (on the store run) and nilearn's (on the NIfTI run), same inputs."""
    from nilearn.glm.first_level import FirstLevelModel as NilearnFLM

    tmp = tmp_path_factory.mktemp("save_glm")
    dataset = make_synthetic_bids(tmp / "bids", n_subjects=1, size="tiny", seed=0)
    run = dataset.runs[0]
    chunkglm.convert(dataset.root, tmp / "store.zarr")
    node = chunkglm.open_cohort(tmp / "store.zarr").runs[run.name]
    confounds = pd.read_csv(run.confounds_path, sep="\t", na_values="n/a")[CONFOUNDS]
    ours = FirstLevelModel(slice_time_ref=0.5).fit(node, confounds=confounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NilearnFLM(t_r=dataset.tr, slice_time_ref=0.5, mask_img=str(run.mask_path),
                         minimize_memory=False).fit(
            str(run.bold_path), events=pd.read_csv(run.events_path, sep="\t"), confounds=confounds)
    return {"ours": ours, "ref": ref, "tmp": tmp, "run": run, "node": node}


def _without_html_report(model):
    """nilearn's model, its HTML report (not compared; most of nilearn's time) left empty."""
    real = model.generate_report

    @functools.wraps(real)  # nilearn reads the signature for the keyword defaults
    def generate_report(*args, **kwargs):
        return types.SimpleNamespace(save_as_html=lambda path: Path(path).write_text(""))

    model.generate_report = generate_report
    return model


def _nilearn_save(fitted, out_dir, prefix):
    from nilearn.glm import save_glm_to_bids as nilearn_save

    ref = _without_html_report(fitted["ref"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nilearn_save(ref, _contrasts(ref.design_matrices_[0].shape[1]), out_dir=out_dir,
                     prefix=prefix, two_sided=True)
    return out_dir


@pytest.fixture(scope="module")
def saved(fitted):
    """nilearn's and our outputs with a prefix (works whatever the model records)."""
    tmp, ours = fitted["tmp"], fitted["ours"]
    ref_dir = _nilearn_save(fitted, tmp / "nilearn_prefix", PREFIX)
    paths = write_glm_to_bids(ours, _contrasts(ours.design_matrices_[0].shape[1]),
                             out_dir=tmp / "ours_prefix", prefix=PREFIX, two_sided=True)
    return {"ref": ref_dir, "ours": tmp / "ours_prefix", "paths": paths}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _expected_from_nilearn(ref_files):
    """nilearn's set (its report.html included), plus an SVG beside every PNG and the
    .bidsignore of the names BIDS does not define (tests/test_bids_validator.py)."""
    return set(ref_files) | {f[:-4] + ".svg" for f in ref_files if f.endswith(".png")} | {".bidsignore"}


def _snapshot(root: Path) -> dict:
    return {f: (root / f).read_bytes() for f in _files(root)} if root.exists() else None


# -- nilearn's file set, values and metadata ------------------------------------------


def test_file_set_matches_nilearn_with_prefix(saved):
    ref_files, our_files = _files(saved["ref"]), _files(saved["ours"])
    assert our_files == _expected_from_nilearn(ref_files)
    assert sorted(p.relative_to(saved["ours"]).as_posix() for p in saved["paths"]) == sorted(our_files)
    assert "sub-01/sub-01_task-main_contrast-aMinusB_stat-t_statmap.nii.gz" in our_files
    assert "sub-01/sub-01_task-main_contrast-effects_stat-F_statmap.nii.gz" in our_files
    assert "sub-01/sub-01_task-main_design.svg" in our_files


def test_file_set_matches_nilearn_with_bids_names(fitted):
    ours = fitted["ours"]
    if not hasattr(ours, "run_entities_"):
        pytest.xfail("FirstLevelModel does not record its inputs' BIDS entities (run_entities_) yet")
    ref_dir = _nilearn_save(fitted, fitted["tmp"] / "nilearn_bids", None)
    out = fitted["tmp"] / "ours_bids"
    save_glm_to_bids(ours, _contrasts(ours.design_matrices_[0].shape[1]), out_dir=out, two_sided=True)
    assert _files(out) == _expected_from_nilearn(_files(ref_dir))
    assert f"sub-01/sub-01_task-main_run-1_{SPACE}_stat-errorts_statmap.nii.gz" in _files(out)


def test_statmaps_match_nilearn(saved):
    folder = saved["ours"] / "sub-01"
    mask = nib.load(folder / "sub-01_task-main_mask.nii.gz").get_fdata() > 0
    ref_mask = nib.load(saved["ref"] / "sub-01" / "sub-01_task-main_mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(mask, ref_mask)
    maps = sorted(f for f in _files(saved["ref"]) if f.endswith("statmap.nii.gz"))
    assert len(maps) == 3 * 5 + 2
    for name in maps:
        ours, ref = nib.load(saved["ours"] / name), nib.load(saved["ref"] / name)
        assert ours.shape == ref.shape, name
        np.testing.assert_allclose(ours.affine, ref.affine, err_msg=name)
        assert rel_l2(ours.get_fdata(), ref.get_fdata(), mask) <= REL_L2, name
        assert ours.get_data_dtype() == np.float32


def test_tables_and_json_match_nilearn(saved):
    ours, ref = saved["ours"] / "sub-01", saved["ref"] / "sub-01"
    design, ref_design = (pd.read_csv(d / "sub-01_task-main_design.tsv", sep="\t") for d in (ours, ref))
    assert list(design.columns) == list(ref_design.columns)
    np.testing.assert_allclose(design.to_numpy(), ref_design.to_numpy(), rtol=1e-6, atol=1e-9)

    def load(folder, name):
        return json.loads((folder / name).read_text())

    assert load(ours, "sub-01_task-main_design.json") == load(ref, "sub-01_task-main_design.json")
    statmap, ref_statmap = (load(d, "sub-01_task-main_statmap.json") for d in (ours, ref))
    assert statmap["ModelParameters"] == ref_statmap["ModelParameters"]
    assert statmap["Description"] == "A statistical map generated by chunkglm."
    for label in ("aMinusB", "a", "effects"):
        name = f"sub-01_task-main_contrast-{label}_clusters.json"
        assert load(ours, name) == load(ref, name)
    description = load(saved["ours"], "dataset_description.json")
    ref_description = load(saved["ref"], "dataset_description.json")
    assert {k: v for k, v in description.items() if k != "GeneratedBy"} == \
        {k: v for k, v in ref_description.items() if k != "GeneratedBy"}
    assert [g["Name"] for g in description["GeneratedBy"]] == ["chunkglm"]
    assert description["GeneratedBy"][0]["Version"] == chunkglm.__version__


def test_model_parameters_match_nilearn_for_other_settings():
    from nilearn.glm.first_level import FirstLevelModel as NilearnFLM

    from chunkglm.glm.io._bids_files import model_parameters

    settings = dict(t_r=2.0, hrf_model="fir", fir_delays=[0, 1], drift_model="polynomial",
                    drift_order=2, subject_label="01", noise_model="ols", signal_scaling=False)
    extra = dict(smoothing_fwhm=6.0, target_affine=np.diag([4.0, 4, 4, 1]), target_shape=(10, 12, 10))
    if "smoothing_fwhm" in FirstLevelModel.__init__.__code__.co_varnames:
        settings.update(extra)
    ref = json.loads(json.dumps(NilearnFLM(**settings)._attributes_to_dict(), default=list))
    assert model_parameters(FirstLevelModel(**settings), 2.0) == ref


def test_figures_are_png_and_svg(saved):
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # drawn outside pyplot: no figure left open
    folder = saved["ours"] / "sub-01"
    for base in ("sub-01_task-main_design", "sub-01_task-main_corrdesign",
                 "sub-01_task-main_contrast-aMinusB_design"):
        assert (folder / f"{base}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (folder / f"{base}.svg").read_bytes()[:2000]


def test_clusters_come_from_the_z_map(saved):
    from nilearn.glm import threshold_stats_img
    from nilearn.reporting import get_clusters_table

    folder = saved["ours"] / "sub-01"
    z_img = nib.load(folder / "sub-01_task-main_contrast-a_stat-z_statmap.nii.gz")
    table = pd.read_csv(folder / "sub-01_task-main_contrast-a_clusters.tsv", sep="\t")
    assert len(table) > 0
    inverse = np.linalg.inv(z_img.affine)
    for _, row in table.iterrows():
        i, j, k = np.rint(inverse @ [row["X"], row["Y"], row["Z"], 1])[:3].astype(int)
        assert row["Peak Stat"] == pytest.approx(z_img.get_fdata()[i, j, k], rel=1e-6)
    mask = nib.load(folder / "sub-01_task-main_mask.nii.gz")
    thresholded, threshold = threshold_stats_img(z_img, mask_img=mask, alpha=0.001, two_sided=True)
    expected = get_clusters_table(thresholded, stat_threshold=threshold, two_sided=True)
    np.testing.assert_allclose(table["Peak Stat"], expected["Peak Stat"].astype(float), rtol=1e-6)
    # nilearn's own table (from the variance map) has other peaks
    ref = pd.read_csv(saved["ref"] / "sub-01" / "sub-01_task-main_contrast-a_clusters.tsv", sep="\t")
    assert not np.array_equal(ref["Peak Stat"].to_numpy(float), table["Peak Stat"].to_numpy(float))


def test_contrast_labels_match_nilearn():
    from nilearn.glm._base import _clean_contrast_name

    names = ["a - b", "a", "face_vs_house", "a+b", "a>b", "B<a", "WinMinusNeutral", "Win - Neutral",
             "[ 1 -1  0]", "[1, 0, 0]", "2*a - b", "(a + b) * 0.5", "effects of interest"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [contrast_label(n) for n in names] == [_clean_contrast_name(n) for n in names]
    assert contrast_label("été - b") == "tMinusB"  # non-ASCII dropped (nilearn keeps it)


def test_model_maps_written_with_minimize_memory(fitted, tmp_path):
    ours = fitted["ours"]
    assert ours.minimize_memory is True  # nilearn 0.14 would raise half-way
    paths = write_glm_to_bids(ours, "a", out_dir=tmp_path / "out", prefix="")
    names = {p.name for p in paths}
    assert {"stat-errorts_statmap.nii.gz", "stat-rsquared_statmap.nii.gz", "statmap.json",
            "mask.nii.gz", "contrast-a_stat-t_statmap.nii.gz", "design.png"} <= names
    assert nib.load(tmp_path / "out" / "stat-errorts_statmap.nii.gz").shape == (10, 12, 10, 40)


def test_two_runs_match_nilearn(tmp_path):
    from nilearn.glm import save_glm_to_bids as nilearn_save
    from nilearn.glm.first_level import FirstLevelModel as NilearnFLM

    dataset = make_synthetic_bids(tmp_path / "bids", n_subjects=1, n_runs=2, size="tiny", seed=3)
    chunkglm.convert(dataset.root, tmp_path / "store.zarr")
    cohort = chunkglm.open_cohort(tmp_path / "store.zarr")
    runs, mask = dataset.runs, str(dataset.runs[0].mask_path)
    confounds = [pd.read_csv(r.confounds_path, sep="\t", na_values="n/a")[["csf"]] for r in runs]
    ours = FirstLevelModel(slice_time_ref=0.5, mask_img=mask).fit(
        [cohort.runs[r.name] for r in runs], confounds=confounds)
    save_glm_to_bids(ours, ["a - b"], out_dir=tmp_path / "ours", prefix="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NilearnFLM(t_r=dataset.tr, slice_time_ref=0.5, mask_img=mask, minimize_memory=False).fit(
            [str(r.bold_path) for r in runs], confounds=confounds,
            events=[pd.read_csv(r.events_path, sep="\t") for r in runs])
        nilearn_save(_without_html_report(ref), ["a - b"], out_dir=tmp_path / "ref", prefix="")
    files = _files(tmp_path / "ours")
    assert files == _expected_from_nilearn(_files(tmp_path / "ref"))
    assert {"run-1_stat-errorts_statmap.nii.gz", "run-2_design.svg",
            "run-2_contrast-aMinusB_design.png", "contrast-aMinusB_stat-t_statmap.nii.gz"} <= files
    in_mask = nib.load(mask).get_fdata() > 0
    for name in sorted(f for f in files if f.endswith("statmap.nii.gz")):
        got, want = (nib.load(tmp_path / d / name).get_fdata() for d in ("ours", "ref"))
        assert rel_l2(got, want, in_mask) <= REL_L2, name
    paths = save_glm_derivatives(ours, "a - b", tmp_path / "glm", subject_label="01", task_label="main",
                                 confounds=[["csf"], ["csf"]])
    designs = sorted(p.name for p in paths if p.name.endswith("design-matrix.png"))
    assert designs == ["sub-01_task-main_run-1_design-matrix.png", "sub-01_task-main_run-2_design-matrix.png"]
    meta = json.loads(paths[-1].read_text())
    assert meta["Confounds"] == ["csf"]
    assert meta["Contrasts"]["aMinusB"]["Weights"] == [1, -1] + [0] * (ours.design_matrices_[0].shape[1] - 2)


def test_multi_run_names_without_bids_entities():
    spec = type("Spec", (), {"label": "aMinusB", "stat_type": "t"})()
    names = plan_bids_names([spec], None, 2, None)
    assert names.folder == ""
    assert [r["design_tsv"] for r in names.runs] == ["run-1_design.tsv", "run-2_design.tsv"]
    assert [r["errorts"] for r in names.runs] == ["run-1_stat-errorts_statmap.nii.gz",
                                                   "run-2_stat-errorts_statmap.nii.gz"]
    assert names.contrasts["aMinusB"]["z_score"] == "contrast-aMinusB_stat-z_statmap.nii.gz"
    assert names.contrasts["aMinusB"]["design"] == ["run-1_contrast-aMinusB_design",
                                                    "run-2_contrast-aMinusB_design"]
    bids = plan_bids_names([spec], [{"sub": "01", "task": "x", "run": "1"},
                                    {"sub": "01", "task": "x", "run": "2"}], 2, None)
    assert bids.folder == "sub-01"
    assert bids.mask == "sub-01_task-x_mask.nii.gz"
    assert bids.runs[1]["design_tsv"] == "sub-01_task-x_run-2_design.tsv"


# -- all or nothing ------------------------------------------------------------------------


@pytest.fixture
def existing_out(tmp_path):
    """An output folder that already holds a dataset description and another file."""
    out = tmp_path / "parent" / "out"
    (out / "sub-02").mkdir(parents=True)
    (out / "sub-02" / "keep.txt").write_text("other subject")
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "study", "BIDSVersion": "1.9.0", "GeneratedBy": [{"Name": "fmriprep"}]}))
    return out


def _assert_untouched(out, before):
    assert _snapshot(out) == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folder left


def test_invalid_contrast_fails_before_writing(fitted, existing_out):
    before = _snapshot(existing_out)
    with pytest.raises(InputError, match="nonexistent"):
        save_glm_to_bids(fitted["ours"], {"ok": "a", "bad": "a - nonexistent"}, out_dir=existing_out)
    with pytest.raises(InputError, match="weights"):
        save_glm_to_bids(fitted["ours"], [np.ones(3)], out_dir=existing_out)
    with pytest.raises(InputError, match="null"):
        save_glm_to_bids(fitted["ours"], {"zero": np.zeros(7)}, out_dir=existing_out)
    _assert_untouched(existing_out, before)


@pytest.mark.parametrize("where", ["existing", "new"])
def test_failure_midway_leaves_nothing(fitted, existing_out, monkeypatch, where):
    out = existing_out if where == "existing" else existing_out.parent / "new"
    before = _snapshot(out)
    calls = []
    real = bids_module.save_image

    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 4:  # mask and three contrast maps written, then a failure
            raise OSError("disk full")
        return real(img, path)

    monkeypatch.setattr(bids_module, "save_image", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_glm_to_bids(fitted["ours"], {"a": "a"}, out_dir=out)
    assert len(calls) == 4
    assert _snapshot(out) == before
    assert sorted(p.name for p in existing_out.parent.iterdir()) == ["out"]


def test_failure_while_moving_into_place_is_undone(fitted, existing_out, monkeypatch):
    old = write_glm_to_bids(fitted["ours"], {"a": "a"}, out_dir=existing_out, prefix="sub-02_x")
    for path in old[1:]:  # mark the previous outputs, to see that they come back
        path.write_bytes(b"previous version")
    before = _snapshot(existing_out)
    real, moves = os.replace, []

    def failing_replace(src, dst):
        moves.append(dst)
        if len(moves) == 24:  # some files replaced (contrast a), some new ones (contrast b) moved in
            raise OSError("device gone")
        return real(src, dst)

    monkeypatch.setattr(derivatives.os, "replace", failing_replace)
    with pytest.raises(OSError, match="device gone"):
        save_glm_to_bids(fitted["ours"], ["a", "b"], out_dir=existing_out, prefix="sub-02_x")
    monkeypatch.undo()
    assert any("contrast-a_" in str(m) for m in moves[:23])
    assert any("contrast-b_" in str(m) for m in moves[:23])
    assert len(moves) > 24  # the undo moved files back
    _assert_untouched(existing_out, before)


def test_existing_folder_is_merged_and_files_replaced(fitted, existing_out):
    for _ in range(2):
        paths = write_glm_to_bids(fitted["ours"], {"a": "a"}, out_dir=existing_out)
    assert (existing_out / "sub-02" / "keep.txt").read_text() == "other subject"
    description = json.loads((existing_out / "dataset_description.json").read_text())
    assert description["Name"] == "study"
    assert [g["Name"] for g in description["GeneratedBy"]] == ["fmriprep", "chunkglm"]
    assert all(p.is_file() and existing_out in p.parents for p in paths)


@pytest.mark.parametrize("name", ["../../evil", "a/b", "/abs", "..\\evil", "", "  ", "!!!", ".."])
def test_unsafe_contrast_names_are_refused(fitted, tmp_path, name):
    out = tmp_path / "deep" / "out"
    with pytest.raises(InputError, match="contrast name"):
        save_glm_to_bids(fitted["ours"], {name: "a"}, out_dir=out)
    with pytest.raises(InputError, match="contrast name"):
        save_glm_derivatives(fitted["ours"], {name: "a"}, out, task_label="main", subject_label="01",
                             confounds=CONFOUNDS)
    assert list(tmp_path.rglob("*")) == []


def test_unsafe_prefix_colliding_names_and_options_are_refused(fitted, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="prefix"):
        save_glm_to_bids(fitted["ours"], "a", out_dir=out, prefix="../x")
    with pytest.raises(InputError, match="contrast-aMinusB"):
        save_glm_to_bids(fitted["ours"], {"a - b": "a - b", "a-b": "a - b"}, out_dir=out)
    with pytest.raises(InputError, match="contrast_types"):
        save_glm_to_bids(fitted["ours"], "a", contrast_types={"b": "t"}, out_dir=out)
    with pytest.raises(InputError, match="unknown keyword"):
        save_glm_to_bids(fitted["ours"], "a", out_dir=out, thresold=3)
    with pytest.raises(InputError, match="height_control"):
        save_glm_to_bids(fitted["ours"], "a", out_dir=out, height_control="fwe")
    assert not out.exists()


def test_staging_renames_a_new_folder_and_refuses_file_folder_clashes(tmp_path):
    with StagedOutput(tmp_path / "a" / "b") as out:
        out.path("x/y.txt").write_text("y")
        assert out.root.parent.parent == tmp_path  # beside the nearest existing folder
    assert out.written == [tmp_path / "a" / "b" / "x" / "y.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "a" / "b" / "z").write_text("a file where a folder is needed")
    before = _snapshot(tmp_path)
    with pytest.raises(InputError, match="is a file"), StagedOutput(tmp_path / "a" / "b") as out:
        out.path("x/y.txt").write_text("new")
        out.path("z/w.txt").write_text("new")
    assert _snapshot(tmp_path) == before


def test_staging_inside_out_dir_when_its_parent_is_read_only(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == tmp_path and self.name.startswith(".out.chunkglm-"):
            raise PermissionError(f"read-only: {tmp_path}")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with StagedOutput(out) as staged:
        assert staged.root.parent.parent == out
        staged.path("a/b.txt").write_text("x")
    assert _files(tmp_path) == {"out/a/b.txt"}


# -- derivatives/glm layout --------------------------------------------------------------------


def test_derivatives_layout_and_metadata(fitted, saved, tmp_path):
    ours = fitted["ours"]
    contrasts = {"a - b": "a - b", "effects": np.eye(ours.design_matrices_[0].shape[1])[:2]}
    out = tmp_path / "derivatives" / "glm"
    paths = save_glm_derivatives(ours, contrasts, out, task_label="main", subject_label="sub-01",
                                 confounds=CONFOUNDS, descriptions={"a - b": "a versus b"})
    base = "first_level/sub-01/sub-01_task-main"
    assert _files(out) == {p.relative_to(out).as_posix() for p in paths} == {
        ".bidsignore", "dataset_description.json", f"{base}_design-matrix.png", f"{base}_design-matrix.tsv",
        f"{base}_mask.nii.gz", f"{base}_glm.json",
        *(f"{base}_contrast-aMinusB_stat-{s}.nii.gz" for s in ("t", "z", "effect", "variance")),
        *(f"{base}_contrast-effects_stat-{s}.nii.gz" for s in ("F", "z", "effect", "variance"))}
    meta = json.loads((out / f"{base}_glm.json").read_text())
    assert meta["AnalysisLevel"] == "first_level"
    assert meta["Model"] == {"Type": "GLM", "HRF": "glover", "DriftModel": "cosine",
                             "HighPassFilter": 0.01, "NoiseModel": "ar1",
                             # the runs' TR (the spacing of the design's frame times) and slice_time_ref
                             "RepetitionTime": float(np.diff(ours.design_matrices_[0].index)[0]),
                             "SliceTimingRef": float(ours.slice_time_ref)}
    assert meta["Software"] == software()  # with "Container" when run in one
    assert meta["Confounds"] == CONFOUNDS
    assert meta["Regressors"] == list(ours.design_matrices_[0].columns)
    assert meta["Contrasts"]["aMinusB"] == {"Description": "a versus b",
                                            "Weights": [1, -1, 0, 0, 0, 0, 0]}
    assert meta["Contrasts"]["effects"]["Weights"] == np.eye(7)[:2].astype(int).tolist()
    # the design (read back for reports) and the mask, as the model has them
    design = pd.read_csv(out / f"{base}_design-matrix.tsv", sep="\t")
    pd.testing.assert_frame_equal(design, ours.design_matrices_[0].reset_index(drop=True), check_exact=True)
    np.testing.assert_array_equal(nib.load(out / f"{base}_mask.nii.gz").get_fdata(), ours.mask_img_.get_fdata())
    variance = saved["ours"] / "sub-01" / "sub-01_task-main_contrast-aMinusB_stat-variance_statmap.nii.gz"
    np.testing.assert_array_equal(nib.load(out / f"{base}_contrast-aMinusB_stat-variance.nii.gz").get_fdata(),
                                  nib.load(variance).get_fdata())
    bids_name = saved["ours"] / "sub-01" / "sub-01_task-main_contrast-aMinusB_stat-z_statmap.nii.gz"
    np.testing.assert_array_equal(nib.load(out / f"{base}_contrast-aMinusB_stat-z.nii.gz").get_fdata(),
                                  nib.load(bids_name).get_fdata())


def test_derivatives_layout_keeps_contrast_names_verbatim(fitted, tmp_path):
    """The LAION layout's page: contrast faceVsBaseline is file label contrast-faceVsBaseline
    (issue 17 item 10); nilearn's file set folds it (facevsbaseline), as nilearn does."""
    ours = fitted["ours"]
    contrasts = {"aVsBaseline": "a", "aMinusB": "a - b", "b_vs_a": "b - a"}
    out = tmp_path / "glm"
    save_glm_derivatives(ours, contrasts, out, task_label="main", subject_label="01")
    base = "first_level/sub-01/sub-01_task-main"
    for label in ("aVsBaseline", "aMinusB", "bVsA"):
        for stat in ("t", "z", "effect", "variance"):
            assert (out / f"{base}_contrast-{label}_stat-{stat}.nii.gz").is_file(), (label, stat)
    assert sorted(json.loads((out / f"{base}_glm.json").read_text())["Contrasts"]) == ["aMinusB", "aVsBaseline",
                                                                                       "bVsA"]
    assert not list(out.rglob("*contrast-avsbaseline*"))
    nilearn_set = write_glm_to_bids(ours, {"aVsBaseline": "a"}, out_dir=tmp_path / "nl", prefix=PREFIX)
    assert any("contrast-avsbaseline_stat-z_statmap" in p.name for p in nilearn_set)  # nilearn's rule
    assert derivatives.glm_label("Face - House") == "FaceMinusHouse"  # the user's capitals kept


def test_names_one_file_apart_by_case_are_refused(fitted, tmp_path):
    """"a - b" and "aMinusB" are both contrast-aMinusB in the derivatives/glm layout (and one
    file on a case-insensitive file system in nilearn's): refused before writing."""
    with pytest.raises(InputError, match="rename one"):
        save_glm_derivatives(fitted["ours"], {"a - b": "a - b", "aMinusB": "a - b"}, tmp_path / "glm",
                             task_label="main", subject_label="01")
    assert not (tmp_path / "glm").exists()


def test_derivatives_need_subject_and_task_labels(fitted, tmp_path):
    ours = fitted["ours"]
    if getattr(ours, "run_entities_", None) is None:
        with pytest.raises(InputError, match="task_label"):
            save_glm_derivatives(ours, "a", tmp_path / "glm", subject_label="01", confounds=[])
    with pytest.raises(InputError, match="letters and digits"):
        save_glm_derivatives(ours, "a", tmp_path / "glm", subject_label="0_1", task_label="main",
                             confounds=[])
    assert not (tmp_path / "glm").exists()


# -- nilearn 0.14's save_glm_to_bids: returns the model, writes the report page, its warnings --------------


def _said(record, words) -> int:
    return sum(words in str(w.message) for w in record)


def test_save_returns_the_model_and_writes_the_report_page_on_the_files_written(fitted, tmp_path):
    model = fitted["ours"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # nilearn 0.14's positional order: model, contrasts, first_level_contrast, contrast_types, out_dir
        returned = save_glm_to_bids(model, {"a minus b": "a - b"}, None, {"a minus b": "t"}, tmp_path / "out",
                                    "sub-01_task-main", threshold=1.0)
    assert returned is model
    assert _said(record, "'threshold' was set to 'None'") == 1  # said once, as nilearn (by the report)
    folder = tmp_path / "out" / "sub-01"
    page = (folder / "sub-01_task-main_report.html").read_text()
    assert "a minus b" in page and "No contrast passed" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    files = [s for s in sources if not s.startswith("data:")]
    # the design, its correlations and the contrast weights are the PNG files beside the page
    assert sorted(files) == ["sub-01_task-main_contrast-aMinusB_design.png", "sub-01_task-main_corrdesign.png",
                             "sub-01_task-main_design.png"]
    assert all((folder / f).is_file() for f in files)


def test_save_options_and_prefix_as_nilearn(fitted, tmp_path):
    model = fitted["ours"]
    with pytest.raises(ValueError, match="must be one of"):
        save_glm_to_bids(model, "a", out_dir=tmp_path / "x", foo="bar")
    with pytest.raises(TypeError, match="contrast definitions must be strings or array_likes"):
        save_glm_to_bids(model, {"effects of interest": 5}, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="'min_distance' must be > 0"):
        save_glm_to_bids(model, "a", out_dir=tmp_path / "x", min_distance=-1)
    assert not (tmp_path / "x").exists()
    with pytest.warns(UserWarning, match="prefix=1 is not a string"):
        write_glm_to_bids(model, "a", out_dir=tmp_path / "int", prefix=1, height_control=None, threshold=1.0)
    assert (tmp_path / "int" / "report.html").is_file() and (tmp_path / "int" / "design.tsv").is_file()
    with pytest.warns(FutureWarning, match="the default 'threshold' will be set to"):
        save_glm_to_bids(model, "a", out_dir=tmp_path / "future", prefix="", height_control=None)
    with pytest.warns(UserWarning, match="'first_level_contrast' is ignored"):
        save_glm_to_bids(model, "a", "a", out_dir=tmp_path / "flc", prefix="")


def test_report_after_save_shows_the_saved_contrasts_from_their_files(tmp_path):
    """nilearn: generate_report() without contrasts after save_glm_to_bids shows what was saved."""
    from nilearn._utils.data_gen import generate_fake_fmri_data_and_design

    _, imgs, designs = generate_fake_fmri_data_and_design([(7, 8, 9, 10), (7, 8, 9, 10)], rk=3)
    model = FirstLevelModel(minimize_memory=False).fit(imgs, design_matrices=designs)
    assert save_glm_to_bids(model, {"BBB-AAA": np.array([-1, 1, 0])}, out_dir=tmp_path, height_control=None,
                            threshold=1.0) is model
    with pytest.warns(UserWarning, match="No contrast passed during report generation."):  # said, as nilearn
        page = str(model.generate_report(height_control=None, threshold=1.0))
    assert "BBB-AAA" in page
    linked = [src for src in re.findall(r'<img src="([^"]+)"', page) if not src.startswith("data:")]
    assert f"{tmp_path / 'run-1_design.png'}" in linked and f"{tmp_path / 'run-1_corrdesign.png'}" in linked
    assert f"{tmp_path / 'run-2_contrast-bbbMinusAaa_design.png'}" in linked
    assert all(Path(src).is_file() for src in linked)
    other = str(model.generate_report(contrasts={"AAA-BBB": np.array([1, -1, 0])}))
    assert "AAA-BBB" in other and "BBB-AAA" not in other and str(tmp_path) not in other
    model.fit(imgs, design_matrices=designs)  # a new fit: the saved results are no longer its own
    with pytest.warns(UserWarning, match="No contrast passed"):
        assert "BBB-AAA" not in str(model.generate_report())
