"""Every derivatives dataset chunkglm writes passes the BIDS validator (issue 17, item 9).

The validator is ``bids-validator-deno`` from PyPI (the test extra): the BIDS
project's TypeScript validator bundled with its schema, run by the ``deno``
wheel. It runs here with the network denied (``--deny-net``): it needs none.

The datasets are those of the command line on the tiny synthetic BIDS data
(first-level with its default derivatives/glm layout, and with both layouts
and residuals, the cohort store and the reports inside its output folder;
second-level, also with both layouts and residuals; meta; extract) and of the Python API
(nilearn's ``save_glm_to_bids`` file set of a second-level model, and of a
first-level model saved with a prefix that is not BIDS). Errors fail the
test; warnings (no README, no Authors, recommended mask keys) are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.cli.commands import main
from chunkglm.errors import InputError
from chunkglm.glm import save_glm_to_bids
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.second_level import SecondLevelModel
from chunkglm.io.derivatives import BIDSIGNORE, StagedOutput, code_url, container, software

validator = pytest.importorskip("bids_validator_deno", reason="bids-validator-deno (test extra) not installed")

pytestmark = pytest.mark.filterwarnings("ignore:No clusters found:UserWarning",
                                        "ignore:The given float value must not exceed:UserWarning")


def validate(folder) -> list[dict]:
    """The validator's issues on ``folder`` (offline); its warnings are printed."""
    from deno import find_deno_bin

    bundle = os.path.join(os.path.dirname(validator.__file__), "bids-validator.js")
    done = subprocess.run(
        [os.fsdecode(find_deno_bin()), "run", "--no-prompt", "--deny-net", "--allow-read", "--allow-env",
         bundle, str(folder), "--format", "json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DENO_NO_UPDATE_CHECK": "1"})
    assert done.stdout.startswith("{"), done.stderr
    issues = json.loads(done.stdout)["issues"]["issues"]
    assert done.returncode == (16 if any(i["severity"] == "error" for i in issues) else 0), done.stderr
    warned = Counter((i["code"], i.get("location", "")) for i in issues if i["severity"] != "error")
    for (code, location), count in sorted(warned.items()):
        print(f"{folder.name}: warning {code} {location}" + (f" (x{count})" if count > 1 else ""))
    return issues


def _errors(issues) -> list[str]:
    return [f"{i['code']} {i.get('location', '')} {i.get('issueMessage', '')}".strip()
            for i in issues if i["severity"] == "error"]


def _run(*argv):
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def datasets(tiny_bids, tmp_path_factory):
    """Folder of each derivatives dataset chunkglm wrote from tiny_bids."""
    tmp = tmp_path_factory.mktemp("bids_validator")
    fl, group, meta, ts = tmp / "fl", tmp / "group", tmp / "meta_out", tmp / "ts"
    _run("first-level", tiny_bids.root, "-o", fl, "--task", "main", "-c", "aMinusB=a - b", "effects=a; b",
         "--confounds", "trans_x", "csf", "--cluster", "none", "--no-progress")
    _run("first-level", fl / "cohort.zarr", "-o", tmp / "fl_both", "--task", "main", "-c", "aMinusB=a - b",
         "--layout", "both", "--save-residuals", "--cluster", "none", "--no-progress")
    _run("second-level", fl, "-o", group, "--first-level-contrast", "aMinusB", "--cluster", "none",
         "--no-progress")
    _run("second-level", fl, "-o", tmp / "group_both", "--first-level-contrast", "aMinusB", "--layout", "both",
         "--save-residuals", "--cluster", "none", "--no-progress")
    effects = sorted(fl.glob("first_level/sub-*/*_contrast-aMinusB_stat-effect.nii.gz"))
    table = pd.DataFrame({"beta": [str(p) for p in effects],
                          "varcope": [str(p).replace("stat-effect", "stat-variance") for p in effects]})
    table.to_csv(tmp / "studies.tsv", sep="\t", index=False)
    _run("meta", "--estimator", "DerSimonianLaird", "--table", tmp / "studies.tsv", "-o", meta,
         "--cluster", "none")
    store = fl / "cohort.zarr"
    grid = chunkglm.open_cohort(store).runs[tiny_bids.runs[0].name].grid  # two maps inside its mask
    maps = np.abs(np.random.default_rng(0).normal(size=(*grid.shape, 2))) * grid.mask[..., None]
    atlas = tmp / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(maps.astype(np.float32), grid.affine), atlas)
    _run("extract", store, "--maps", atlas, "--atlas", "toy", "-o", ts, "--cluster", "none", "--no-progress")

    run = tiny_bids.runs[0]  # the Python API: nilearn's file sets, a prefix that is not BIDS
    model = FirstLevelModel().fit(chunkglm.open_cohort(store).runs[run.name],
                                  events=pd.read_csv(run.events_path, sep="\t"))
    save_glm_to_bids(model, {"aMinusB": "a - b"}, out_dir=tmp / "api_first", prefix="study1")
    second = SecondLevelModel(minimize_memory=False).fit([str(p) for p in effects] * 2,
                                    design_matrix=pd.DataFrame({"intercept": np.ones(2 * len(effects))}))
    save_glm_to_bids(second, "intercept", out_dir=tmp / "api_group")
    return {"first-level": fl, "first-level-both": tmp / "fl_both", "second-level": group,
            "second-level-both": tmp / "group_both", "meta": meta / "meta", "extract": ts,
            "api-first-level-prefix": tmp / "api_first", "api-second-level": tmp / "api_group"}


@pytest.mark.parametrize("name", ["first-level", "first-level-both", "second-level", "second-level-both", "meta",
                                  "extract", "api-first-level-prefix", "api-second-level"])
def test_every_derivatives_dataset_passes_the_bids_validator(datasets, name):
    folder = datasets[name]
    issues = validate(folder)
    assert _errors(issues) == []
    description = json.loads((folder / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    generated = description["GeneratedBy"][-1]
    assert generated["Name"] == "chunkglm" and generated["Version"] == chunkglm.__version__
    assert generated.get("CodeURL") == code_url()  # none while the package declares no URL
    assert generated.get("Container") == container()  # the validator checks it where there is one
    if not name.startswith("api"):  # the command line says what it read
        assert description["SourceDatasets"] and all(s["URL"].startswith("file://")
                                                      for s in description["SourceDatasets"])
    assert (folder / ".bidsignore").read_text().splitlines()[1:len(BIDSIGNORE) + 1] == list(BIDSIGNORE)


def test_without_bidsignore_the_validator_refuses_the_names_and_with_it_still_checks_bids_names(
        datasets, tmp_path):
    """The check is not vacuous: nilearn's names, the glm layout and the store are errors without the
    .bidsignore; with it, a file that claims a BIDS name (sub-*_mask) is still checked."""
    copy = tmp_path / "fl"
    shutil.copytree(datasets["first-level-both"], copy)
    (copy / ".bidsignore").unlink()
    errors = _errors(validate(copy))
    for name in ("_stat-z_statmap.nii.gz", "_stat-errorts_statmap.nii.gz", "/first_level/", "_provenance.json",
                 "_report.html"):
        assert any(name in e for e in errors), (name, errors)
    lean = tmp_path / "fl_glm"  # the default layout, with the store converted into the output folder
    shutil.copytree(datasets["first-level"], lean)
    (lean / ".bidsignore").unlink()
    errors = _errors(validate(lean))
    for name in ("/first_level/", "/cohort.zarr/", "_provenance.json"):
        assert any(name in e for e in errors), (name, errors)
    shutil.copy(datasets["first-level-both"] / ".bidsignore", copy / ".bidsignore")
    mask = copy / "sub-01" / "sub-01_task-main_mask.nii.gz"
    mask.rename(mask.with_name("sub-01_task-main_bad-_mask.nii.gz"))
    errors = _errors(validate(copy))
    assert errors and all("sub-01_task-main_bad-_mask.nii.gz" in e for e in errors), errors


def test_bidsignore_keeps_its_lines_and_is_written_beside_each_dataset_description(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".bidsignore").write_text("my_notes.txt\n*statmap.nii.gz\n")
    with StagedOutput(out) as staged:
        staged.path("dataset_description.json").write_text("{}")
        staged.path("sub/dataset_description.json").write_text("{}")
        staged.ignore("Fishers_*", "sub")
        with pytest.raises(InputError, match="not a .bidsignore pattern"):
            staged.ignore(["a\nb"])
    lines = (out / ".bidsignore").read_text().splitlines()
    assert lines[:2] == ["my_notes.txt", "*statmap.nii.gz"]  # kept, not repeated
    assert lines[2:] == [p for p in BIDSIGNORE if p != "*statmap.nii.gz"]
    assert (out / "sub" / ".bidsignore").read_text().splitlines()[1:] == [*BIDSIGNORE, "Fishers_*"]
    before = (out / ".bidsignore").read_bytes()
    with StagedOutput(out) as staged:  # nothing missing: the same lines, listed with the outputs
        staged.path("dataset_description.json").write_text("{}")
    assert (out / ".bidsignore").read_bytes() == before
    assert sorted(staged.written) == [out / ".bidsignore", out / "dataset_description.json"]
    with StagedOutput(out) as staged:  # no dataset here: no .bidsignore
        staged.path("maps/a.nii.gz").write_bytes(b"")
    assert not (out / "maps" / ".bidsignore").exists()


def test_the_container_is_named_where_there_is_one(tmp_path, monkeypatch):
    """GeneratedBy.Container (BIDS: Type, Tag) and the glm layout's Software.Container (the image,
    as the LAION layout's page shows "nilearn/nilearn:0.10.0"; issue 17 item 10)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    assert container({}, bare) is None
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / ".dockerenv").touch()
    assert container({}, docker) == {"Type": "docker"}
    assert container({"CHUNKGLM_CONTAINER": "chunkglm/chunkglm:0.1.0"}, docker) == {
        "Type": "docker", "Tag": "chunkglm/chunkglm:0.1.0"}
    podman = tmp_path / "podman"
    (podman / "run").mkdir(parents=True)
    (podman / "run" / ".containerenv").write_text('engine="podman-4.9"\nimage="docker.io/lab/glm:2"\n')
    assert container({}, podman) == {"Type": "podman", "Tag": "docker.io/lab/glm:2"}
    assert container({"APPTAINER_CONTAINER": "/images/glm.sif", "APPTAINER_NAME": "glm.sif"}, docker) == {
        "Type": "apptainer", "Tag": "glm.sif"}
    assert container({"SINGULARITY_CONTAINER": "/images/old.simg"}, bare) == {"Type": "singularity",
                                                                              "Tag": "old.simg"}
    assert container({"container": "oci"}, bare) == {"Type": "oci"}

    import chunkglm.io.derivatives as derivatives

    monkeypatch.setattr(derivatives, "container", lambda: {"Type": "docker", "Tag": "lab/chunkglm:1"})
    assert software() == {"Name": "chunkglm", "Version": chunkglm.__version__, "Container": "lab/chunkglm:1"}
    assert derivatives.dataset_description("x")["GeneratedBy"][0]["Container"] == {"Type": "docker",
                                                                                 "Tag": "lab/chunkglm:1"}
    monkeypatch.setattr(derivatives, "container", lambda: None)
    assert software() == {"Name": "chunkglm", "Version": chunkglm.__version__}
