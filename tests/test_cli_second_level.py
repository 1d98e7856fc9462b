"""``chunkglm second-level`` as users run it: first-level derivatives (or a store) in,
the derivatives/glm group layout out, equal to nilearn on the same maps.

Tolerances: maps are float32 files; z maps compared with relative L2 <= 1e-6 over the mask
(float32 rounding ~6e-8, see tests/test_save_glm_to_bids_second_level.py). Permutation
-log10 p-values are k/(n_perm+1) fractions, identical given nilearn's seed: atol 1e-6 covers
their float32 storage.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm.testing import rel_l2

pytestmark = [pytest.mark.filterwarnings("ignore:No clusters found:UserWarning"),
              pytest.mark.filterwarnings("ignore:Attention. Design matrix is singular:UserWarning")]

SHAPE = (10, 11, 9)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N = 10


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "second-level", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory):
    """first-level-style folders: sub-XX/sub-XX_task-main_contrast-aminusb_stat-effect_statmap.nii.gz
    (and another contrast as a distractor), a participants.tsv with age."""
    root = tmp_path_factory.mktemp("first_level")
    rng = np.random.default_rng(11)
    ages = rng.normal(30, 8, N)
    paths = []
    for i in range(N):
        sub = f"{i + 1:02d}"
        folder = root / f"sub-{sub}"
        folder.mkdir()
        data = np.zeros(SHAPE, np.float32)
        data[1:-1, 1:-1, 1:-1] = rng.normal(0.2, 1.0, (8, 9, 7))
        data[2:5, 2:5, 2:5] += 3.0 + 0.05 * (ages[i] - 30)
        path = folder / f"sub-{sub}_task-main_contrast-aminusb_stat-effect_statmap.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), path)
        nib.save(nib.Nifti1Image(-data, AFFINE),
                 folder / f"sub-{sub}_task-main_contrast-b_stat-effect_statmap.nii.gz")
        paths.append(str(path))
    table = pd.DataFrame({"participant_id": [f"sub-{i + 1:02d}" for i in range(N)], "age": ages})
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    return {"root": root, "paths": paths, "table": table}


def _nilearn_model(paths, design):
    from nilearn.glm.second_level import SecondLevelModel

    return SecondLevelModel().fit(paths, design_matrix=design)


def test_derivatives_in_group_layout_out_equal_to_nilearn(derivatives, tmp_path):
    from nilearn.glm.second_level import make_second_level_design_matrix, non_parametric_inference

    out = tmp_path / "group"
    done = _cli(derivatives["root"], "-o", out, "--first-level-contrast", "a - b",
                "--design", derivatives["root"] / "participants.tsv",
                "-c", "mean=intercept", "-c", "age=age", "--n-perm", 100, "--tfce",
                "--random-state", 3, "--cluster", "none")
    assert done.returncode == 0, done.stderr
    assert "10 effect maps" in done.stderr and "[" in done.stderr  # permutation progress lines
    for name in ("mean", "age"):  # each contrast's permutations named (issue 17 item 4)
        assert f"] contrast {name}: permutation blocks" in done.stderr, done.stderr
    folder = out / "group_level"
    confounds = derivatives["table"].rename(columns={"participant_id": "subject_label"})
    confounds["subject_label"] = confounds["subject_label"].str.removeprefix("sub-")
    design = make_second_level_design_matrix([f"{i + 1:02d}" for i in range(N)], confounds)
    ref = _nilearn_model(derivatives["paths"], design)
    inside = ref.masker_.mask_img_.get_fdata() > 0
    for name in ("mean", "age"):
        z = nib.load(folder / f"group_contrast-{name}_stat-z.nii.gz").get_fdata()
        expected = ref.compute_contrast(name if name == "age" else "intercept",
                                        output_type="z_score").get_fdata()
        assert rel_l2(z, expected, inside) <= 1e-6
    npi = non_parametric_inference(derivatives["paths"], design_matrix=design,
                                   second_level_contrast="intercept", mask=ref.masker_.mask_img_,
                                   n_perm=100, two_sided_test=True, random_state=3, tfce=True, n_jobs=1)
    for stat, key in (("logpmaxt", "logp_max_t"), ("logpmaxtfce", "logp_max_tfce")):
        ours = nib.load(folder / f"group_contrast-mean_stat-{stat}.nii.gz").get_fdata()
        np.testing.assert_allclose(ours[inside], npi[key].get_fdata()[inside], rtol=0, atol=1e-6)
    provenance = json.loads((folder / "group_provenance.json").read_text())
    assert provenance["operation"] == "second-level"
    assert provenance["design"]["columns"] == ["age", "intercept"]  # nilearn: covariates first
    assert len(provenance["inputs"]) == N and all(len(e["sha256"]) == 64 for e in provenance["inputs"])
    assert "group_level/group_contrast-age_fwe-corrected.nii.gz" in provenance["outputs"]
    sidecar = json.loads((folder / "group_glm.json").read_text())
    assert sidecar["Corrections"]["FWE"]["Method"] == {"mean": "permutation max-T",
                                                       "age": "permutation max-T"}


def test_store_collection_one_sample_on_a_local_cluster(derivatives, tmp_path):
    import chunkglm

    store = tmp_path / "maps.zarr"
    chunkglm.convert(derivatives["paths"], store, collection="aminusb")
    out = tmp_path / "group"
    done = _cli(store, "-o", out, "--n-perm", 50, "--random-state", 0, "-c", "effects=intercept",
                "--no-progress")  # default --cluster local: a real LocalCluster
    assert done.returncode == 0, done.stderr
    folder = out / "group_level"
    from nilearn.glm.second_level import SecondLevelModel

    ref = SecondLevelModel().fit(derivatives["paths"], design_matrix=pd.DataFrame({"intercept": np.ones(N)}))
    inside = ref.masker_.mask_img_.get_fdata() > 0
    z = nib.load(folder / "group_contrast-effects_stat-z.nii.gz").get_fdata()
    assert rel_l2(z, ref.compute_contrast("intercept", output_type="z_score").get_fdata(), inside) <= 1e-6
    assert (folder / "group_contrast-effects_stat-logpmaxt.nii.gz").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--first-level-contrast", "nope"], "contrasts found: \\['aminusb', 'b'\\]"),
    (["--first-level-contrast", "aMinusB", "-c", "x=height"], "height"),
    (["--first-level-contrast", "aMinusB", "--tfce"], "give --n-perm"),
    (["--first-level-contrast", "aMinusB", "--n-perm", "-3"], "--n-perm must be >= 0"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(derivatives, tmp_path, extra, message):
    out = tmp_path / "group"
    done = _cli(derivatives["root"], "-o", out, "--cluster", "none", *extra)
    assert done.returncode != 0
    assert re.search(message, done.stderr), done.stderr
    assert not (out / "group_level").exists()


def test_design_tsv_must_cover_every_subject(derivatives, tmp_path):
    partial = tmp_path / "participants.tsv"
    derivatives["table"].iloc[:5].to_csv(partial, sep="\t", index=False)
    done = _cli(derivatives["root"], "-o", tmp_path / "g", "--first-level-contrast", "aminusb",
                "--design", partial, "--cluster", "none")
    assert done.returncode != 0 and "no row for subject(s) ['06'" in done.stderr, done.stderr


def _participants(derivatives, tmp_path):
    """participants.tsv as BIDS writes them: text columns, n/a values, a column not to model."""
    table = derivatives["table"].copy()
    table["sex"] = ["M", "F"] * (N // 2)
    table["site"] = ["b", "a", "c-2", "a", "b"] * (N // 5)
    table["handedness"] = ["R"] * (N - 1) + ["n/a"]  # unusable: a missing value
    table["species"] = "homo sapiens"  # unusable: one value
    path = tmp_path / "participants.tsv"
    table.to_csv(path, sep="\t", index=False)
    return table, path


def test_categorical_covariates_are_dummy_coded_with_the_reference_level_stated(derivatives, tmp_path):
    from nilearn.glm.second_level import make_second_level_design_matrix

    table, path = _participants(derivatives, tmp_path)
    out = tmp_path / "group"
    done = _cli(derivatives["root"], "-o", out, "--first-level-contrast", "aminusb", "--design", path,
                "--covariates", "age", "sex", "site", "--center-covariates", "--reference", "site=b",
                "-c", "mean=intercept", "-c", "male=sex_M", "--cluster", "none")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "group_level" / "group_provenance.json").read_text())
    covariates = record["design"]["covariates"]
    assert covariates["sex"] == {"Type": "categorical", "Levels": ["F", "M"], "ReferenceLevel": "F",
                                 "Columns": ["sex_M"]}
    assert covariates["site"]["ReferenceLevel"] == "b" and covariates["site"]["Columns"] == ["site_a", "site_c_2"]
    assert covariates["age"]["MeanCentered"] is True
    assert covariates["age"]["Mean"] == pytest.approx(table["age"].mean())
    # the same design by hand, through nilearn
    manual = pd.DataFrame({"subject_label": [f"{i + 1:02d}" for i in range(N)],
                           "age": table["age"] - table["age"].mean(),
                           "sex_M": (table["sex"] == "M").astype(float),
                           "site_a": (table["site"] == "a").astype(float),
                           "site_c_2": (table["site"] == "c-2").astype(float)})
    design = make_second_level_design_matrix(list(manual["subject_label"]), manual)
    assert record["design"]["columns"] == list(design.columns)
    ref = _nilearn_model(derivatives["paths"], design)
    inside = ref.masker_.mask_img_.get_fdata() > 0
    for name, expression in (("mean", "intercept"), ("male", "sex_M")):
        z = nib.load(out / "group_level" / f"group_contrast-{name}_stat-z.nii.gz").get_fdata()
        assert rel_l2(z, ref.compute_contrast(expression, output_type="z_score").get_fdata(), inside) <= 1e-6


@pytest.mark.parametrize("extra, message", [
    (["--covariates", "age", "handedness"], "covariate 'handedness' of the design TSV .* has no value \\(n/a\\) "
                                            "for subject\\(s\\) \\['10'\\]"),
    (["--covariates", "species"], "'species' .* is 'homo sapiens' for every modelled subject"),
    (["--covariates", "weight"], "covariate\\(s\\) \\['weight'\\] are not columns of .* its columns are"),
    (["--covariates", "sex", "--reference", "sex=X"], "reference level 'X' of covariate 'sex' is not one of"),
])
def test_only_chosen_unusable_covariates_are_refused_with_the_reason(derivatives, tmp_path, extra, message):
    _, path = _participants(derivatives, tmp_path)
    done = _cli(derivatives["root"], "-o", tmp_path / "g", "--first-level-contrast", "aminusb",
                "--design", path, "--cluster", "none", *extra)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2 and "Traceback" not in done.stderr  # maps: line + error
    assert not (tmp_path / "g" / "group_level").exists()


def test_reads_the_glm_layout_first_level_writes_by_default(tmp_path):
    """first_level/sub-XX/..._contrast-aMinusB_stat-effect.nii.gz (chunkglm first-level's default
    --layout glm) is read; with both layouts (--layout both, the same maps twice) the glm copy
    is taken once, not reported as two maps per subject; nilearn's set alone still works."""
    from chunkglm.cli.second_level import effect_maps

    image = nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE)
    for sub in ("01", "02"):
        glm = tmp_path / "first_level" / f"sub-{sub}" / f"sub-{sub}_task-main_contrast-aMinusB_stat-effect.nii.gz"
        for path in (glm, tmp_path / f"sub-{sub}" / f"sub-{sub}_task-main_contrast-aminusb_stat-effect_statmap.nii.gz"):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(image, path)
    for name in ("aMinusB", "a - b", "aminusb"):
        subjects, paths = effect_maps(tmp_path, name)
        assert subjects == ["01", "02"] and all("/first_level/" in p and p.endswith("_stat-effect.nii.gz")
                                                for p in paths), paths
    for sub in ("01", "02"):
        (tmp_path / "first_level" / f"sub-{sub}" / f"sub-{sub}_task-main_contrast-aMinusB_stat-effect.nii.gz").unlink()
    subjects, paths = effect_maps(tmp_path, "aMinusB")
    assert subjects == ["01", "02"] and all(p.endswith("_statmap.nii.gz") for p in paths)


def test_layout_and_save_residuals(derivatives, tmp_path):
    """--layout glm (default) writes group_level/ only and no residuals; nilearn writes nilearn's
    group/ file set only (the record beside it); --save-residuals adds the residuals, one volume
    per map, in the layout written; --layout nilearn refuses --n-perm, whose maps it cannot hold."""
    from chunkglm.cli.commands import main

    def run(out, *flags):
        return main(["second-level", str(derivatives["root"]), "-o", str(out), "--first-level-contrast",
                     "aMinusB", "--cluster", "none", "--no-progress", *flags])

    def files(out):
        return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())

    assert run(tmp_path / "glm") == 0
    assert {f.split("/")[0] for f in files(tmp_path / "glm")} == {".bidsignore", "dataset_description.json",
                                                                  "group_level"}
    assert not [f for f in files(tmp_path / "glm") if "errorts" in f]
    assert run(tmp_path / "glm_res", "--save-residuals") == 0
    assert set(files(tmp_path / "glm_res")) - set(files(tmp_path / "glm")) == {"group_level/group_stat-errorts.nii.gz"}
    residuals = nib.load(tmp_path / "glm_res" / "group_level" / "group_stat-errorts.nii.gz")
    assert residuals.shape == (*SHAPE, N)
    assert run(tmp_path / "nl", "--layout", "nilearn") == 0
    nilearn_files = files(tmp_path / "nl")
    assert "group/contrast-mean_stat-z_statmap.nii.gz" in nilearn_files
    assert "group/group_provenance.json" in nilearn_files and "group/stat-rsquared_statmap.nii.gz" in nilearn_files
    assert not [f for f in nilearn_files if f.startswith("group_level") or "errorts" in f]
    assert run(tmp_path / "nl_res", "--layout", "nilearn", "--save-residuals") == 0
    assert set(files(tmp_path / "nl_res")) - set(nilearn_files) == {"group/stat-errorts_statmap.nii.gz"}
    np.testing.assert_array_equal(nib.load(tmp_path / "nl_res" / "group" / "stat-errorts_statmap.nii.gz").get_fdata(),
                                  residuals.get_fdata())
    assert run(tmp_path / "refused", "--layout", "nilearn", "--n-perm", "10") == 2
    assert not (tmp_path / "refused").exists()


def test_store_is_refused_with_a_store_input(derivatives, tmp_path):
    """--store names where a derivatives folder's maps are loaded; with a store input it was
    silently ignored."""
    import chunkglm
    from chunkglm.cli.commands import main

    store = tmp_path / "maps.zarr"
    chunkglm.convert(derivatives["paths"], store, collection="aminusb")
    assert main(["second-level", str(store), "-o", str(tmp_path / "g"), "--store", str(tmp_path / "other.zarr"),
                 "--cluster", "none", "--no-progress"]) == 2
    assert not (tmp_path / "g").exists() and not (tmp_path / "other.zarr").exists()


def test_another_analysis_in_the_folder_is_refused_and_overwrite_replaces_it(derivatives, tmp_path):
    """A second analysis into a folder holding another (here age + mean with permutations, then a
    one-sample test) is one line, exit 2, nothing touched; the same analysis again is allowed;
    --overwrite leaves only the new analysis's files, the provenance listing exactly them. Before,
    the one-sample run left the age maps and the old permutation maps beside its own record."""
    from chunkglm.cli.commands import main

    out = tmp_path / "g"
    base = ["second-level", str(derivatives["root"]), "-o", str(out), "--first-level-contrast", "aMinusB",
            "--cluster", "none", "--no-progress"]
    first = [*base, "--design", str(derivatives["root"] / "participants.tsv"), "-c", "mean=intercept",
             "-c", "age=age", "--n-perm", "20", "--tfce", "--random-state", "0"]

    def files():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert main(first) == 0
    before = files()
    assert "group_level/group_contrast-age_stat-z.nii.gz" in before
    assert main(first) == 0 and files() == before  # the same analysis: rewritten, the same bytes
    code = main(base)  # one-sample, Bonferroni
    assert code == 2 and files() == before
    assert main([*base, "--overwrite"]) == 0
    after = files()
    record = json.loads(after["group_level/group_provenance.json"])
    listed = set(record["outputs"]) | {"group_level/group_provenance.json"}
    assert set(after) == listed, set(after) ^ listed
    assert not [f for f in after if "age" in f or "logpmax" in f or "tfce" in f]
    assert record["options"]["contrast"] is None and record["design"]["columns"] == ["intercept"]
    assert main(base) == 0  # now the one-sample analysis is the folder's


def test_another_analysis_message_and_layout_change(derivatives, tmp_path, capsys):
    """The refusal names the folder, what differs and --overwrite on one line; a layout change is
    another analysis too, and --overwrite removes the old layout's files and record."""
    from chunkglm.cli.commands import main

    out = tmp_path / "g"
    base = ["second-level", str(derivatives["root"]), "-o", str(out), "--first-level-contrast", "aMinusB",
            "--cluster", "none", "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--smoothing-fwhm", "4"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "already holds another second-level analysis" in errors[0]
    err = errors[0]
    assert "options.smoothing_fwhm: null there, 4.0 now" in err and "--overwrite" in err
    assert main([*base, "--layout", "nilearn"]) == 2
    assert main([*base, "--layout", "nilearn", "--overwrite"]) == 0
    assert not (out / "group_level").exists() or not any((out / "group_level").rglob("*"))
    assert (out / "group" / "group_provenance.json").is_file()
