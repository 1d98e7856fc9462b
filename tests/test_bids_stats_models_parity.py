"""`chunkglm app` against fitlins 0.11 (run once per module in .venv-fitlins) on the same model.

The dataset: 5 synthetic subjects x 2 runs (10x12x10 grid, ~900 brain voxels, 40 volumes), each
subject with its own brain mask. The model, examples/models/group_comparisons.json: run nodes with
a Factor transformation and SPM-HRF convolution of the two conditions, three confounds (one with
fMRIPrep's missing first value), the high-pass option, t contrasts per condition and their
difference and an F test (terminal: the edge passes the t contrasts on); fixed effects per subject;
then three dataset nodes: a one-sample GLM per contrast, an age covariate from participants.tsv
(a t and an F test) and a two-group comparison (a Factor of participants.tsv's group).

A second, smaller run (one subject x 2 runs) checks examples/models/parametric_modulation.json
(Scale and Product transformations: a trial-by-trial modulator of condition a).

fitlins gets the same model with two spellings of its own: the subject node's type "Meta" (fitlins
0.11 compares with "Meta"; the specification's "meta", which bsmschema requires, makes fitlins run
a GLM), and ``--drift-model cosine`` for the model's ``HighPassFilterCutoffHz`` of 0.01 Hz
(fitlins 0.11 reads no Options; its cosine drift is nilearn's default 0.01 Hz cut-off).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm.cli.main import main
from chunkglm.testing import make_synthetic_bids
from chunkglm.testing.assertions import rel_l2

ROOT = Path(__file__).resolve().parents[1]
SPACE = "MNI152NLin2009cAsym"

EXAMPLES = ROOT / "examples" / "models"
#: The subjects' table the group models read (age covariate, two groups).
PARTICIPANTS = ("participant_id\tage\tgroup\nsub-01\t45\tcontrol\nsub-02\t53\tpatient\nsub-03\t37\tpatient\n"
                "sub-04\t29\tcontrol\nsub-05\t61\tpatient\n")

#: fitlins on the tiny data takes a few minutes on an idle 2-core machine, 9+ under a load of 10
#: (nipype's nodes run one after the other): room for a loaded machine, and pytest-timeout's
#: limit (pyproject: 600 s) raised to match for the tests that run it
FITLINS_SECONDS = 1500
pytestmark = pytest.mark.timeout(FITLINS_SECONDS + 300)

#: fitlins' figures of each run (its harness writes them empty: their names are compared).
RUN_FIGURES = ("design", "corr", "contrasts")


def _fitlins_python() -> str:
    python = os.environ.get("CHUNKGLM_FITLINS_PYTHON") or str(ROOT / ".venv-fitlins" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"no fitlins reference interpreter at {python}: run `make test` (it creates .venv-fitlins) "
                    "or set CHUNKGLM_FITLINS_PYTHON")
    return python


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bsm")
    ds = make_synthetic_bids(root / "ds", n_subjects=5, n_runs=2, size="tiny", seed=3)
    (ds.root / "participants.tsv").write_text(PARTICIPANTS)
    model = json.loads((EXAMPLES / "group_comparisons.json").read_text())
    (root / "model.json").write_text(json.dumps(model))
    fitlins_model = copy.deepcopy(model)
    fitlins_model["Nodes"][1]["Model"]["Type"] = "Meta"
    (root / "fitlins_model.json").write_text(json.dumps(fitlins_model))
    return root, ds


@pytest.fixture(scope="module")
def fitlins_out(dataset):
    root, ds = dataset
    out = root / "fitlins"
    command = [_fitlins_python(), str(ROOT / "tests" / "_fitlins_reference.py"), str(ds.root), str(out), "dataset",
               "-m", str(root / "fitlins_model.json"), "-d", str(ds.derivatives), "-w", str(root / "fitlins_work"),
               "--space", SPACE, "--drift-model", "cosine", "-q", "-q"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=FITLINS_SECONDS)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def chunkglm_out(dataset):
    root, ds = dataset
    out = root / "chunkglm"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(root / "model.json"),
                 "--workers", "2", "--no-progress"])
    assert code == 0
    return out


def _maps(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*_statmap.nii.gz")}


def test_same_map_files_as_fitlins(fitlins_out, chunkglm_out):
    theirs = set(_maps(fitlins_out))
    ours = set(_maps(chunkglm_out))
    assert ours == theirs
    # 10 runs x (3 t contrasts x 5 maps + the F test's 5 + r-square + log-likelihood), 5 subjects x 3
    # contrasts x (effect, variance, t), 3 one-sample contrasts, 2 age contrasts and 1 group contrast x 5 maps
    assert len(ours) == 10 * 22 + 5 * 3 * 3 + 6 * 5
    assert sum("_stat-logLikelihood_" in name for name in ours) == 10
    assert {name.split("/")[0] for name in ours} == {"node-run", "node-subject", "node-dataset", "node-age",
                                                      "node-groups"}
    assert (chunkglm_out / "dataset_description.json").is_file()
    for kind in RUN_FIGURES:  # fitlins' run figures (empty in the harness) and chunkglm's, same names
        figures = sorted(p.relative_to(fitlins_out).as_posix() for p in fitlins_out.rglob(f"*_{kind}.svg"))
        assert len(figures) == 10, kind
        assert figures == sorted(p.relative_to(chunkglm_out).as_posix() for p in chunkglm_out.rglob(f"*_{kind}.svg"))
        for figure in figures:
            assert (chunkglm_out / figure).read_text().lstrip().startswith("<?xml"), figure
    assert (chunkglm_out / "app_provenance.json").is_file()


def test_every_map_equals_fitlins(fitlins_out, chunkglm_out):
    theirs, ours = _maps(fitlins_out), _maps(chunkglm_out)
    worst = {}
    for name, path in ours.items():
        a = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        b = np.asarray(nib.load(theirs[name]).dataobj, dtype=np.float64)
        assert nib.load(path).get_data_dtype() == np.float32
        np.testing.assert_allclose(nib.load(path).affine, nib.load(theirs[name]).affine)
        if a.ndim == 4 and b.ndim == 3:  # an F test's effect: chunkglm writes a row per volume, fitlins row 1
            assert name.split("contrast-")[1].split("_")[0] in ("task", "aMeanandage"), name
            assert "_stat-effect_" in name and a.shape[3] == 2
            a = a[..., 0]
        # chunkglm writes float32 maps (fitlins float64): 6e-8 relative per value, and each
        # level reads the float32 maps of the one before, so rounding compounds over three
        # levels; the fits themselves agree to ~1e-13 (same data, same design, float64). An
        # AR(1) coefficient on a bin edge could land in the neighbour bin under another
        # summation order (none does here); 1e-5 bounds all of it with a wide margin.
        worst[name] = rel_l2(a, b)
        assert worst[name] <= 1e-5, (name, worst[name])
    assert max(worst.values()) < 1e-5


def test_design_matrices_equal_fitlins(fitlins_out, chunkglm_out):
    designs = sorted(p.relative_to(fitlins_out).as_posix() for p in fitlins_out.rglob("*_design.tsv"))
    assert len(designs) == 10
    for name in designs:
        theirs = pd.read_csv(fitlins_out / name, sep="\t")
        ours = pd.read_csv(chunkglm_out / name, sep="\t")
        assert list(ours.columns) == list(theirs.columns)
        # pybids 0.22 (chunkglm) and 0.15 (fitlins) convolve with the same SPM HRF; they differ
        # in the last digits only (2e-12 seen on regressors of amplitude ~0.5)
        np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=0, atol=1e-9, err_msg=name)


def test_participant_level_stops_after_the_subject_nodes(dataset, tmp_path):
    root, ds = dataset
    out = tmp_path / "participant"
    code = main(["app", str(ds.root), str(out), "participant", "--model", str(EXAMPLES / "one_sample.json"),
                 "--participant-label", "sub-01", "02", "--cluster", "none", "--no-progress",
                 "--store", str(tmp_path / "store.zarr")])
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["node-run", "node-subject", "reports"]
    assert sorted(p.name for p in (out / "node-subject").iterdir()) == ["sub-01", "sub-02"]


def test_auto_model_runs_pybids_model_from_the_events(dataset, tmp_path):
    # pybids' auto model: each trial type against the others per run, fixed effects per subject,
    # a one-sample test per contrast; the group effect is the mean of the subject effects and
    # each subject's effect the mean of its runs' (no precision weighting, as fitlins)
    root, ds = dataset
    out = tmp_path / "auto"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", "auto", "--cluster", "none",
                 "--no-progress", "--store", str(tmp_path / "store.zarr")])
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["node-Dataset", "node-Run", "node-Subject", "reports"]
    load = lambda relative: np.asarray(nib.load(out / relative).dataobj, dtype=np.float64)  # noqa: E731
    subjects = [load(f"node-Subject/sub-{run.subject}/sub-{run.subject}_contrast-runAVsOthers_stat-effect_statmap.nii.gz")
                for run in ds.runs if run.run == 1]
    assert len(subjects) == 5
    runs = [load(f"node-Run/sub-01/sub-01_run-{r}_contrast-runAVsOthers_stat-effect_statmap.nii.gz") for r in (1, 2)]
    group = load("node-Dataset/contrast-runAVsOthers_stat-effect_statmap.nii.gz")
    inside = group != 0
    # float32 maps averaged in float64: 1e-6 relative is float32 rounding with margin
    np.testing.assert_allclose(group[inside], np.mean(subjects, axis=0)[inside], rtol=1e-6, atol=1e-6)
    inside = subjects[0] != 0
    np.testing.assert_allclose(subjects[0][inside], np.mean(runs, axis=0)[inside], rtol=1e-6, atol=1e-6)


def test_bids_validator_accepts_the_output(chunkglm_out):
    # bids-validator-deno (the test extra), offline, as tests/test_bids_validator.py runs it: fitlins'
    # node-* folders are listed in the .bidsignore (BIDS defines no model derivatives yet)
    validator = pytest.importorskip("bids_validator_deno")
    from deno import find_deno_bin

    bundle = os.path.join(os.path.dirname(validator.__file__), "bids-validator.js")
    done = subprocess.run([os.fsdecode(find_deno_bin()), "run", "--no-prompt", "--deny-net", "--allow-read",
                           "--allow-env", bundle, str(chunkglm_out), "--format", "json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DENO_NO_UPDATE_CHECK": "1"})
    assert done.stdout.startswith("{"), done.stderr
    issues = json.loads(done.stdout)["issues"]["issues"]
    errors = [f"{i['code']} {i.get('location', '')}" for i in issues if i["severity"] == "error"]
    print(errors, file=sys.stderr)
    assert errors == [] and done.returncode == 0
    assert "node-*" in (chunkglm_out / ".bidsignore").read_text().splitlines()


@pytest.fixture(scope="module")
def modulated(tmp_path_factory):
    """One subject x 2 runs whose events carry a modulation value per trial, both tools' outputs of
    examples/models/parametric_modulation.json at the participant level."""
    root = tmp_path_factory.mktemp("bsm_pmod")
    ds = make_synthetic_bids(root / "ds", n_subjects=1, n_runs=2, size="tiny", seed=5)
    rng = np.random.default_rng(0)
    for run in ds.runs:
        events = pd.read_csv(run.events_path, sep="\t")
        events["modulation"] = np.round(rng.uniform(0.5, 2.0, len(events)), 3)
        events.to_csv(run.events_path, sep="\t", index=False, na_rep="n/a")
    model = json.loads((EXAMPLES / "parametric_modulation.json").read_text())
    model["Nodes"][1]["Model"]["Type"] = "Meta"  # fitlins' spelling, see the module docstring
    (root / "fitlins_model.json").write_text(json.dumps(model))
    command = [_fitlins_python(), str(ROOT / "tests" / "_fitlins_reference.py"), str(ds.root), str(root / "fitlins"),
               "participant", "-m", str(root / "fitlins_model.json"), "-d", str(ds.derivatives),
               "-w", str(root / "fitlins_work"), "--space", SPACE, "-q", "-q"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=FITLINS_SECONDS)
    assert run.returncode == 0, run.stderr[-3000:]
    code = main(["app", str(ds.root), str(root / "chunkglm"), "participant", "--model",
                 str(EXAMPLES / "parametric_modulation.json"), "--cluster", "none", "--no-progress"])
    assert code == 0
    return root / "fitlins", root / "chunkglm"


def test_parametric_modulation_equals_fitlins(modulated):
    fitlins, ours = modulated
    theirs = set(_maps(fitlins))
    assert set(_maps(ours)) == theirs
    assert any("contrast-modulation_stat-t" in name for name in theirs)
    for name, path in _maps(ours).items():
        # float32 maps, two levels: see test_every_map_equals_fitlins
        assert rel_l2(np.asarray(nib.load(path).dataobj, dtype=np.float64),
                      np.asarray(nib.load(fitlins / name).dataobj, dtype=np.float64)) <= 1e-5, name
    for design in fitlins.rglob("*_design.tsv"):
        np.testing.assert_allclose(pd.read_csv(ours / design.relative_to(fitlins), sep="\t").to_numpy(),
                                   pd.read_csv(design, sep="\t").to_numpy(), rtol=0, atol=1e-9)
