"""BIDS Stats Models (chunkglm.glm.stats_models, `chunkglm app`): validation, designs, names.

The end-to-end parity with fitlins is in test_bids_stats_models_parity.py.
"""

from __future__ import annotations

import copy
import json
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import FirstLevelModel as NilearnFirstLevelModel
from nilearn.glm.first_level.first_level import mean_scaling

from chunkglm.cli.main import main
from chunkglm.errors import InputError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.stats_models import read_model, validate_model
from chunkglm.glm.stats_models.design import run_design
from chunkglm.glm.stats_models.outputs import design_path, fitlins_label, map_path
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.kernels.glm import scaled_block
from chunkglm.testing import make_synthetic_bids
from chunkglm.testing.assertions import rel_l2

MODEL = {
    "Name": "tiny", "BIDSModelVersion": "1.0.0", "Input": {"task": ["main"]},
    "Nodes": [
        {"Level": "Run", "Name": "run", "GroupBy": ["run", "subject"],
         "Transformations": {"Transformer": "pybids-transforms-v1", "Instructions": [
             {"Name": "Factor", "Input": ["trial_type"]},
             {"Name": "Convolve", "Input": ["trial_type.a", "trial_type.b"], "Model": "spm"}]},
         "Model": {"X": ["trial_type.a", "trial_type.b", "trans_x", 1], "Type": "glm"},
         "Contrasts": [{"Name": "a", "ConditionList": ["trial_type.a"], "Weights": [1], "Test": "t"}]},
        {"Level": "Subject", "Name": "subject", "GroupBy": ["subject", "contrast"],
         "Model": {"X": [1], "Type": "meta"}, "DummyContrasts": {"Test": "t"}},
    ],
}


def _broken(change):
    model = copy.deepcopy(MODEL)
    change(model)
    return model


# Each broken model, and what the one-line error must name: the field's path and the schema's words.
BROKEN = {
    "level": (lambda m: m["Nodes"][1].__setitem__("Level", "Participant"),
              ["Nodes[1].Level", "'Run', 'Session', 'Subject' or 'Dataset'", "'Participant'"]),
    "test": (lambda m: m["Nodes"][0]["Contrasts"][0].__setitem__("Test", "z"),
             ["Nodes[0].Contrasts[0].Test", "'pass', 't' or 'F'", "'z'"]),
    "missing_x": (lambda m: m["Nodes"][0]["Model"].pop("X"), ["Nodes[0].Model.X", "Field required"]),
    "unknown_field": (lambda m: m["Nodes"][0].__setitem__("Contrast", []),
                      ["Nodes[0].Contrast", "not a field of Node"]),
    "type": (lambda m: m["Nodes"][1]["Model"].__setitem__("Type", "Meta"),
             ["Nodes[1].Model.Type", "'glm' or 'meta'", "'Meta'"]),
    "edge": (lambda m: m.__setitem__("Edges", [{"Source": "run", "Destination": "subjects"}]),
             ["Edges[0].Destination", "'subjects'"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_invalid_model_is_one_line_error_naming_the_field_before_anything_is_read(case, tmp_path, capsys):
    change, words = BROKEN[case]
    model = tmp_path / "model.json"
    model.write_text(json.dumps(_broken(change)))
    out = tmp_path / "out"
    # BIDS_DIR does not exist: the model is checked before any data is looked at
    code = main(["app", str(tmp_path / "no_dataset"), str(out), "dataset", "--model", str(model),
                 "--cluster", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("chunkglm app: error: the model ") and "is not a valid BIDS Stats Model" in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_model_file_problems_are_one_line_errors(tmp_path, capsys):
    bad_json = tmp_path / "model.json"
    bad_json.write_text('{"Name": "x",')
    for model, words in ((bad_json, ["not valid JSON", "line 1"]), (tmp_path / "none.json", ["no such file"])):
        code = main(["app", str(tmp_path), str(tmp_path / "out"), "run", "--model", str(model), "--cluster", "none"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def test_validate_model_accepts_the_specification_and_lists_several_problems():
    assert validate_model(copy.deepcopy(MODEL)).Nodes[1].Model.Type == "meta"
    model = _broken(lambda m: (m["Nodes"][0].__setitem__("Level", "run"), m["Nodes"][1].__setitem__("GroupBy", "subject")))
    with pytest.raises(InputError, match=r"Nodes\[0\]\.Level: .*'run'.*; Nodes\[1\]\.GroupBy: "):
        validate_model(model)
    twice = _broken(lambda m: m["Nodes"][1].__setitem__("Name", "run"))
    with pytest.raises(InputError, match="'run' is used by more than one node"):
        validate_model(twice)
    with pytest.raises(InputError, match="must be a JSON object"):
        validate_model([MODEL])


def test_read_model_returns_the_file_as_written(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(MODEL))
    assert read_model(path) == MODEL


# -- run-level designs ---------------------------------------------------------------------------


def _dense():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"trial_type.a": rng.normal(size=6), "framewise_displacement": [np.nan, 0.0, 0.2, 0.4, 0.0, 0.6],
                         "trans_x_derivative1": [np.nan, 1.0, 2.0, 3.0, 4.0, 5.0], "intercept": 1.0})


def test_run_design_fills_fmriprep_first_volume_gaps_as_fitlins():
    design = run_design(_dense(), 6, 2.0)
    assert list(design.columns) == ["trial_type.a", "framewise_displacement", "trans_x_derivative1", "intercept"]
    # framewise_displacement: the mean of the column's non-zero values; a derivative: 0
    assert design["framewise_displacement"].iloc[0] == pytest.approx(0.4)
    assert design["trans_x_derivative1"].iloc[0] == 0.0
    assert (design["intercept"] == 1.0).all()
    np.testing.assert_array_equal(design["trial_type.a"], _dense()["trial_type.a"])


def test_run_design_cosine_drift_from_the_high_pass_option():
    dense = pd.DataFrame({"trial_type.a": np.random.default_rng(0).normal(size=40), "intercept": 1.0})
    design = run_design(dense, 40, 2.0, high_pass=0.01)
    # nilearn's cosine basis below 0.01 Hz over 80 s: one regressor, then the intercept
    assert list(design.columns[-2:]) == ["drift_1", "intercept"]
    expected = np.sqrt(2.0 / 40) * np.cos(np.pi / 40 * (np.arange(40) + 0.5))
    np.testing.assert_allclose(design["drift_1"], expected, atol=1e-12)
    assert run_design(dense, 40, 2.0).columns.tolist() == ["trial_type.a", "intercept"]  # no option: no drift


def test_run_design_refuses_other_missing_values_and_wrong_lengths():
    dense = _dense()
    dense.loc[3, "trial_type.a"] = np.nan
    with pytest.raises(InputError, match=r"run x: the design column 'trial_type.a' has 1 missing value"):
        run_design(dense, 6, 2.0, where="run x")
    with pytest.raises(InputError, match="7 design rows for 6 volumes"):
        run_design(pd.concat([_dense(), _dense().iloc[:1]]), 6, 2.0)
    extra = pd.concat([_dense(), pd.DataFrame([[np.nan] * 4], columns=_dense().columns)], ignore_index=True)
    assert len(run_design(extra, 6, 2.0)) == 6  # pybids' extra last row (TR x volumes rounded up)


# -- names -----------------------------------------------------------------------------------------


def test_labels_and_paths_are_fitlins_names():
    assert fitlins_label("trial_type.a") == "trialTypeA"
    assert fitlins_label("a four word phrase") == "aFourWordPhrase"
    assert fitlins_label("../../etc") == "Etc"  # never a path
    with pytest.raises(InputError, match="no ASCII letter or digit"):
        fitlins_label("--", "contrast")
    entities = {"subject": "01", "run": 1, "task": ["main"], "contrast": "a - b"}
    assert map_path("run", entities, "t") == "node-run/sub-01/sub-01_run-1_contrast-aB_stat-t_statmap.nii.gz"
    assert map_path("dataset", {"contrast": "a"}, "z") == "node-dataset/contrast-a_stat-z_statmap.nii.gz"
    assert design_path("run", {"subject": "01", "task": "main", "run": 2}) == \
        "node-run/sub-01/sub-01_task-main_run-2_design.tsv"
    with pytest.raises(InputError, match="not a BIDS label"):
        map_path("run", {"subject": "0/1", "contrast": "a"}, "t")


# -- the run-level fit in a run's own mask, on a store holding the union of masks ----------------


def test_scaled_block_is_nilearns_whatever_the_memory_order():
    rng = np.random.default_rng(1)
    block = (1000 + 30 * rng.standard_normal((40, 300))).astype(np.float32)
    expected, _ = mean_scaling(block.copy())
    for layout in (block, np.asfortranarray(block)):
        np.testing.assert_array_equal(scaled_block(layout, 0), expected)


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("bsm_unit")
    ds = make_synthetic_bids(root / "ds", n_subjects=2, n_runs=1, size="tiny")
    convert(ds.root, root / "cohort.zarr", client=None)
    return ds, open_cohort(root / "cohort.zarr")


def test_run_fitted_in_its_own_mask_on_the_union_store_equals_nilearn(two_subjects):
    # the store's voxels are the union of both subjects' masks; each run is fitted in its own
    # mask, a subset: nilearn's numbers (it scaled the subset's data in another memory order
    # before: 1.7e-6 apart)
    ds, cohort = two_subjects
    run = ds.runs[0]
    mask = np.asarray(nib.load(run.mask_path).dataobj) != 0
    assert mask.sum() < cohort.runs[run.name].grid.mask.sum()
    rng = np.random.default_rng(0)
    design = pd.DataFrame({"x": rng.normal(size=ds.n_volumes), "y": rng.normal(size=ds.n_volumes),
                           "intercept": 1.0})
    ours = FirstLevelModel(mask_img=str(run.mask_path)).fit(cohort.runs[run.name], design_matrices=design)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = NilearnFirstLevelModel(mask_img=str(run.mask_path)).fit(str(run.bold_path), design_matrices=design)
    for output in ("effect_size", "z_score"):
        a = ours.compute_contrast("x - y", output_type=output).get_fdata()
        b = theirs.compute_contrast("x - y", output_type=output).get_fdata()
        # same float32 data, float64 fits: only the summation order of BLAS differs (~1e-14)
        assert rel_l2(a, b) < 1e-10, output


def test_log_likelihood_map_is_nilearns_logL(two_subjects):
    # fitlins' stat-logLikelihood map: nilearn's RegressionResults.logL of each voxel's (AR(1)
    # whitened) fit, from chunkglm's persisted fits (no second read of the data)
    ds, cohort = two_subjects
    run = ds.runs[0]
    rng = np.random.default_rng(1)
    design = pd.DataFrame({"x": rng.normal(size=ds.n_volumes), "intercept": 1.0})
    ours = FirstLevelModel(mask_img=str(run.mask_path)).fit(cohort.runs[run.name], design_matrices=design)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = NilearnFirstLevelModel(mask_img=str(run.mask_path), minimize_memory=False).fit(
            str(run.bold_path), design_matrices=design)
    labels, results = theirs.labels_[0], theirs.results_[0]
    values = np.zeros(len(labels))
    for label, result in results.items():
        values[labels == label] = result.logL
    expected = theirs.masker_.inverse_transform(values).get_fdata()
    image = ours.voxelwise_images("log_likelihood")[0]
    assert image.shape[3] == 1
    # float64 fits of the same float32 data; the SSE comes from moments (X'Y, Y'Y) here and from
    # the residuals there: summation order only (1e-16 seen), 1e-10 is a wide margin
    assert rel_l2(image.get_fdata()[..., 0], expected) < 1e-10


# -- sessions, subjects, levels -------------------------------------------------------------------

SESSION_MODEL = {
    "Name": "sessions", "BIDSModelVersion": "1.0.0", "Input": {"task": ["main"]},
    "Nodes": [
        {**MODEL["Nodes"][0], "GroupBy": ["run", "session", "subject"]},
        {"Level": "Session", "Name": "session", "GroupBy": ["subject", "session", "contrast"],
         "Model": {"X": [1], "Type": "meta"}, "DummyContrasts": {"Test": "t"}},
        {"Level": "Subject", "Name": "subject", "GroupBy": ["subject", "contrast"],
         "Model": {"X": [1], "Type": "meta"}, "DummyContrasts": {"Test": "t"}},
    ],
}


def test_session_nodes_combine_the_runs_of_each_session(tmp_path):
    ds = make_synthetic_bids(tmp_path / "ds", n_subjects=1, n_sessions=2, n_runs=2, size="tiny", seed=2)
    model = tmp_path / "model.json"
    model.write_text(json.dumps(SESSION_MODEL))
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "session", "--model", str(model), "--cluster", "none", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["cohort.zarr", "node-run", "node-session", "reports"]
    load = lambda relative: np.asarray(nib.load(out / relative).dataobj, dtype=np.float64)  # noqa: E731
    for session in ("1", "2"):
        runs = [load(f"node-run/sub-01/ses-{session}/sub-01_ses-{session}_run-{r}_contrast-a_stat-effect_statmap.nii.gz")
                for r in (1, 2)]
        fixed = load(f"node-session/sub-01/ses-{session}/sub-01_ses-{session}_contrast-a_stat-effect_statmap.nii.gz")
        inside = fixed != 0
        # nilearn's fixed effects (not precision-weighted): the mean of the runs' float32 effects
        np.testing.assert_allclose(fixed[inside], np.mean(runs, axis=0)[inside], rtol=1e-6, atol=1e-7)
    assert not (out / "node-subject").exists()  # the analysis level stops at the session nodes


def test_unknown_participant_label_is_named(tmp_path, capsys):
    ds = make_synthetic_bids(tmp_path / "ds", n_subjects=1, n_runs=1, size="tiny")
    model = tmp_path / "model.json"
    model.write_text(json.dumps(MODEL))
    code = main(["app", str(ds.root), str(tmp_path / "out"), "run", "--model", str(model), "--participant-label",
                 "sub-07", "--cluster", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "07" in err and "subjects ['01']" in err  # the conversion's message: what there is


def _app(ds, tmp_path, model, level="participant"):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return main(["app", str(ds.root), str(tmp_path / "out"), level, "--model", str(path), "--cluster", "none",
                 "--no-progress", "--store", str(tmp_path / "store.zarr")])


def test_pass_contrasts_write_effect_and_variance_only(two_subjects, tmp_path):
    ds, _ = two_subjects
    model = copy.deepcopy(MODEL)
    model["Nodes"] = model["Nodes"][:1]
    model["Nodes"][0]["Contrasts"][0]["Test"] = "pass"
    assert _app(ds, tmp_path, model, "run") == 0
    names = sorted(p.name for p in (tmp_path / "out" / "node-run" / "sub-01").glob("*contrast-a_*"))
    assert names == ["sub-01_run-1_contrast-a_stat-effect_statmap.nii.gz",
                     "sub-01_run-1_contrast-a_stat-variance_statmap.nii.gz"]


def test_freed_heap_is_handed_back_after_each_run_is_written(two_subjects, tmp_path, monkeypatch):
    # with worker threads in the app's process, each run's maps, figures and report page free their
    # buffers here: glibc's heap is trimmed once per run written (not only at the level's end)
    import chunkglm.glm.stats_models.execute as execute

    written_then_trimmed = []
    monkeypatch.setattr(execute, "release_free_memory", lambda: written_then_trimmed.append(
        len(list((tmp_path / "out" / "node-run").rglob("*_design.tsv")))))
    model = copy.deepcopy(MODEL)
    model["Nodes"] = model["Nodes"][:1]
    ds, _ = two_subjects
    assert _app(ds, tmp_path, model, "run") == 0
    assert len(ds.runs) == 2 and written_then_trimmed == [1, 2]


def test_group_glm_needs_two_inputs_and_the_first_node_fits_runs(two_subjects, tmp_path, capsys):
    ds, _ = two_subjects
    one_run_glm = _broken(lambda m: m["Nodes"][1]["Model"].__setitem__("Type", "glm"))
    assert _app(ds, tmp_path, one_run_glm) == 2  # each subject has one run
    err = capsys.readouterr().err
    assert "node 'subject': a GLM needs at least 2 input maps; this group has 1" in err
    subject_first = _broken(lambda m: m.__setitem__("Nodes", m["Nodes"][1:]))
    assert _app(ds, tmp_path, subject_first) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "must be at the Run level" in err
