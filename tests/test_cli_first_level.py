"""``chunkglm first-level`` as users run it: BIDS folder in, derivatives out.

The file sets (issue 17 item 6): ``--layout glm`` (default) writes the derivatives/glm layout
only, ``nilearn`` nilearn's save_glm_to_bids set only, ``both`` the two; residuals (4-D,
``stat-errorts``) only with ``--save-residuals``; ``--store`` places the converted store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd

import pytest

import chunkglm
from chunkglm.cli.commands import main
from chunkglm.glm.first_level import FirstLevelModel


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "first-level", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_all_subjects_in_one_graph_write_nilearn_style_derivatives(tiny_bids, tmp_path):
    out = tmp_path / "glm"
    done = _cli(tiny_bids.root, "-o", out, "--task", "main", "-c", "aMinusB=a - b", "-c", "effects=a; b",
                "--confounds", "trans_x,csf", "--cluster", "none", "--layout", "both")
    assert done.returncode == 0, done.stderr
    assert "fitting 2 subject(s), 2 run(s)" in done.stderr and "[2/2] sub-02 written" in done.stderr
    for sub in ("01", "02"):  # labels as nilearn cleans them: "aMinusB" -> "aminusb"
        folder = out / f"sub-{sub}"
        assert not list(folder.glob("*errorts*"))  # residuals: only with --save-residuals
        assert (folder / f"sub-{sub}_task-main_contrast-aminusb_stat-z_statmap.nii.gz").is_file()
        assert (folder / f"sub-{sub}_task-main_contrast-effects_stat-F_statmap.nii.gz").is_file()
        assert (folder / f"sub-{sub}_task-main_stat-rsquared_statmap.nii.gz").is_file()
        glm = out / "first_level" / f"sub-{sub}"  # the derivatives/glm layout
        assert (glm / f"sub-{sub}_task-main_contrast-aMinusB_stat-z.nii.gz").is_file()  # verbatim (LAION)
        meta = json.loads((glm / f"sub-{sub}_task-main_glm.json").read_text())
        assert meta["Model"]["NoiseModel"] == "ar1" and meta["Confounds"] == ["trans_x", "csf"]
        # the design's timing, for the report's model details: as nilearn's statmap.json records it
        nilearn_meta = json.loads((folder / f"sub-{sub}_task-main_statmap.json").read_text())["ModelParameters"]
        assert meta["Model"]["RepetitionTime"] == nilearn_meta["t_r"] == 2.0
        assert meta["Model"]["SliceTimingRef"] == nilearn_meta["slice_time_ref"]
        assert meta["Software"]["Name"] == "chunkglm" and meta["Contrasts"]["aMinusB"]["Description"] == "a - b"
    # the z map equals the Python API's on the same store and inputs
    cohort = chunkglm.open_cohort(out / "cohort.zarr")
    run = tiny_bids.runs[0]
    confounds = pd.read_csv(run.confounds_path, sep="\t", na_values="n/a")[["trans_x", "csf"]]
    z = FirstLevelModel(slice_time_ref=0.5).fit(cohort.runs[run.name], confounds=confounds).compute_contrast("a - b")
    written = nib.load(out / "sub-01" / "sub-01_task-main_contrast-aminusb_stat-z_statmap.nii.gz")
    np.testing.assert_allclose(written.get_fdata(), z.get_fdata(), rtol=1e-6, atol=1e-6)
    # chunkglm report: a page per subject, with the command's provenance (inputs with sha256, cluster)
    done = subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "report", str(out), "--height-control",
                           "none", "--threshold", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pages = [line for line in done.stdout.splitlines() if line.endswith("_report.html")]
    assert [p.rsplit("/", 1)[1] for p in pages] == ["sub-01_task-main_report.html", "sub-02_task-main_report.html"]
    page = (out / "first_level" / "sub-01" / "sub-01_task-main_report.html").read_text()
    record = json.loads((out / "first_level" / "sub-01" / "sub-01_task-main_provenance.json").read_text())
    assert "first-level" in page and record["inputs"][0]["sha256"] in page
    assert "Wall time" not in page and "Started" not in page  # no time: the page is the same bytes on re-run


def test_on_a_real_local_cluster(tiny_bids, tmp_path):
    env = {"CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "2", "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "127.0.0.1:0"}
    done = _cli(tiny_bids.root, "-o", tmp_path / "glm", "--task", "main", "-c", "a=a", env=env)
    assert done.returncode == 0, done.stderr
    assert "Dashboard: http://127.0.0.1:" in done.stderr and "[2/2] sub-02 written" in done.stderr
    assert (tmp_path / "glm" / "first_level" / "sub-02" / "sub-02_task-main_contrast-a_stat-z.nii.gz").is_file()


def test_a_bad_contrast_fails_before_any_glm_work(tiny_bids, tmp_path):
    out = tmp_path / "glm"
    bad = _cli(tiny_bids.root, "-o", out, "--task", "main", "-c", "x=a - nope", "--cluster", "none")
    assert bad.returncode == 2 and "cannot be evaluated" in bad.stderr and "Traceback" not in bad.stderr
    assert "fitting" not in bad.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cohort.zarr"]  # no derivative written
    malformed = _cli(tiny_bids.root, "-o", out, "--task", "main", "-c", "no-equals-sign", "--cluster", "none")
    assert malformed.returncode == 2 and "NAME=EXPRESSION" in malformed.stderr


def test_a_failed_overwrite_validates_before_deleting_anything(tiny_bids, tmp_path):
    """Issue 18 item 7: a bad contrast name with --overwrite exited 2 after deleting the subjects'
    completion records; every output name is now checked before anything is touched."""
    out = tmp_path / "glm"
    done = _cli(tiny_bids.root, "-o", out, "--task", "main", "-c", "a=a", "--cluster", "none")
    assert done.returncode == 0, done.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "cohort.zarr" not in p.parts}
    records = [p for p in before if p.name.endswith("_provenance.json") and p.name.startswith("sub-")]
    assert len(records) == 2
    for contrasts, message in ((["-c", f"{'a' * 300}=a"], "over the 255"),
                               (["-c", "aMinusB=a - b", "-c", "a-b=a"], "both become the file label")):
        bad = _cli(out / "cohort.zarr", "-o", out, "--task", "main", *contrasts, "--overwrite",
                   "--cluster", "none")
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and "fitting" not in bad.stderr
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "cohort.zarr" not in p.parts}
        assert after == before  # nothing deleted, nothing written


# -- --layout, --save-residuals, --store (issue 17 item 6) ------------------------------------------


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and "cohort.zarr" not in p.parts and "store.zarr" not in p.parts)


@pytest.fixture(scope="module")
def store(tiny_bids, tmp_path_factory):
    path = tmp_path_factory.mktemp("fl_store") / "store.zarr"
    chunkglm.convert(tiny_bids.root, path)
    return path


def _first_level(store, out, *flags):
    assert main(["first-level", str(store), "-o", str(out), "--task", "main", "-c", "aMinusB=a - b",
                 "--cluster", "none", "--no-progress", *flags]) == 0


def test_default_layout_is_the_lean_glm_one(store, tmp_path):
    """One copy of each map, no nilearn file set, no residuals."""
    _first_level(store, tmp_path)
    expected = [".bidsignore", "dataset_description.json", "task-main_provenance.json"]
    for sub in ("01", "02"):
        base = f"first_level/sub-{sub}/sub-{sub}_task-main"
        expected += [f"{base}_contrast-aMinusB_stat-{s}.nii.gz" for s in ("effect", "t", "variance", "z")]
        expected += [f"{base}_{name}" for name in ("design-matrix.png", "design-matrix.tsv", "glm.json",
                                                   "mask.nii.gz", "provenance.json")]
    assert _files(tmp_path) == sorted(expected)


def test_layout_nilearn_writes_no_glm_layout_and_residuals_only_when_asked(store, tmp_path):
    _first_level(store, tmp_path / "plain", "--layout", "nilearn")
    _first_level(store, tmp_path / "res", "--layout", "nilearn", "--save-residuals")
    for name in ("plain", "res"):
        files = _files(tmp_path / name)
        assert not [f for f in files if f.startswith("first_level")]
        assert "sub-01/sub-01_task-main_contrast-aminusb_stat-z_statmap.nii.gz" in files
        assert "sub-01/sub-01_task-main_provenance.json" in files  # the record, beside its files
        assert "sub-01/sub-01_task-main_stat-rsquared_statmap.nii.gz" in files
    errorts = "sub-01/sub-01_task-main_stat-errorts_statmap.nii.gz"
    assert errorts not in _files(tmp_path / "plain")
    assert set(_files(tmp_path / "res")) - set(_files(tmp_path / "plain")) == {
        errorts, "sub-02/sub-02_task-main_stat-errorts_statmap.nii.gz"}
    assert nib.load(tmp_path / "res" / errorts).ndim == 4


def test_save_residuals_with_the_glm_layout_writes_them_there_and_reads_the_data_again(
        store, tmp_path, monkeypatch):
    """Without --save-residuals each chunk is read once (the fit); with it, once more."""
    from chunkglm.kernels import glm as kernels

    reads = {"fit": 0, "residuals": 0}
    fit, residual = kernels.block_moments, kernels.residual_block

    def counted(key, function):
        def wrapper(*args, **kwargs):
            reads[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kernels, "block_moments", counted("fit", fit))
    monkeypatch.setattr(kernels, "residual_block", counted("residuals", residual))
    _first_level(store, tmp_path / "lean")
    assert reads["fit"] > 0 and reads["residuals"] == 0
    n_blocks = reads["fit"]
    _first_level(store, tmp_path / "res", "--save-residuals")
    assert reads == {"fit": 2 * n_blocks, "residuals": n_blocks}
    added = set(_files(tmp_path / "res")) - set(_files(tmp_path / "lean"))
    assert added == {f"first_level/sub-{s}/sub-{s}_task-main_stat-errorts.nii.gz" for s in ("01", "02")}
    cohort = chunkglm.open_cohort(store)
    node = cohort.runs[[name for name in cohort.runs if name.startswith("sub-01")][0]]
    residuals = nib.load(tmp_path / "res" / "first_level" / "sub-01" / "sub-01_task-main_stat-errorts.nii.gz")
    assert residuals.shape == (*node.grid.shape, node.data().shape[0])  # one volume per scan


def test_layout_both_writes_each_map_in_both_and_a_change_of_file_set_needs_overwrite(store, tmp_path):
    _first_level(store, tmp_path, "--layout", "both")
    both = _files(tmp_path)
    assert "first_level/sub-02/sub-02_task-main_contrast-aMinusB_stat-z.nii.gz" in both
    assert "sub-02/sub-02_task-main_contrast-aminusb_stat-z_statmap.nii.gz" in both
    assert {"sub-02/sub-02_task-main_provenance.json",
            "first_level/sub-02/sub-02_task-main_provenance.json"} <= set(both)
    status = main(["first-level", str(store), "-o", str(tmp_path), "--task", "main", "-c", "aMinusB=a - b",
                   "--cluster", "none", "--no-progress"])
    assert status == 2 and _files(tmp_path) == both  # other file sets than those there: refused, untouched
    _first_level(store, tmp_path, "--overwrite")  # replaced: the nilearn files listed in the record go
    assert not [f for f in _files(tmp_path) if f.startswith("sub-")]
    _first_level(store, tmp_path)  # same analysis and file set: skipped
    record = json.loads((tmp_path / "first_level" / "sub-01" / "sub-01_task-main_provenance.json").read_text())
    assert record["analysis"]["outputs"] == {"layout": "glm", "residuals": False}


def test_records_of_before_layout_count_as_both_with_residuals(store, tmp_path):
    """Outputs written before --layout existed (both file sets and residuals, records without
    "outputs") are resumed by --layout both --save-residuals and not mistaken for another analysis."""
    _first_level(store, tmp_path, "--layout", "both", "--save-residuals")
    for record_path in tmp_path.rglob("sub-*_provenance.json"):
        record = json.loads(record_path.read_text())
        del record["analysis"]["outputs"]
        record_path.write_text(json.dumps(record))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz") if "store.zarr" not in p.parts}
    _first_level(store, tmp_path, "--layout", "both", "--save-residuals")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # skipped: nothing rewritten


def test_store_places_the_conversion_and_is_refused_for_a_store_input(tiny_bids, store, tmp_path):
    elsewhere = tmp_path / "stores" / "mine.zarr"
    done = _cli(tiny_bids.root, "-o", tmp_path / "out", "--task", "main", "-c", "a=a", "--cluster", "none",
                "--store", elsewhere)
    assert done.returncode == 0, done.stderr
    assert chunkglm.open_cohort(elsewhere).runs and not (tmp_path / "out" / "cohort.zarr").exists()
    bad = _cli(store, "-o", tmp_path / "out2", "--task", "main", "-c", "a=a", "--cluster", "none",
               "--store", tmp_path / "x.zarr")
    assert bad.returncode == 2 and "already a cohort store" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out2").exists() and not (tmp_path / "x.zarr").exists()
