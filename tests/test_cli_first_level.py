"""``chunkglm first-level`` as users run it: BIDS folder in, derivatives out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd

import chunkglm
from chunkglm.glm.first_level import FirstLevelModel


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "first-level", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_all_subjects_in_one_graph_write_nilearn_style_derivatives(tiny_bids, tmp_path):
    out = tmp_path / "glm"
    done = _cli(tiny_bids.root, "-o", out, "--task", "main", "-c", "aMinusB=a - b", "-c", "effects=a; b",
                "--confounds", "trans_x,csf", "--cluster", "none")
    assert done.returncode == 0, done.stderr
    assert "fitting 2 subject(s), 2 run(s)" in done.stderr and "[2/2] sub-02 written" in done.stderr
    for sub in ("01", "02"):  # labels as nilearn cleans them: "aMinusB" -> "aminusb"
        folder = out / f"sub-{sub}"
        assert (folder / f"sub-{sub}_task-main_contrast-aminusb_stat-z_statmap.nii.gz").is_file()
        assert (folder / f"sub-{sub}_task-main_contrast-effects_stat-F_statmap.nii.gz").is_file()
        assert (folder / f"sub-{sub}_task-main_stat-rsquared_statmap.nii.gz").is_file()
        glm = out / "first_level" / f"sub-{sub}"  # the derivatives/glm layout
        assert (glm / f"sub-{sub}_task-main_contrast-aMinusB_stat-z.nii.gz").is_file()  # verbatim (LAION)
        meta = json.loads((glm / f"sub-{sub}_task-main_glm.json").read_text())
        assert meta["Model"]["NoiseModel"] == "ar1" and meta["Confounds"] == ["trans_x", "csf"]
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
    assert "first-level" in page and record["inputs"][0]["sha256"] in page and f"{record['wall_time_s']}" in page


def test_on_a_real_local_cluster(tiny_bids, tmp_path):
    env = {"CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "2", "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "127.0.0.1:0"}
    done = _cli(tiny_bids.root, "-o", tmp_path / "glm", "--task", "main", "-c", "a=a", env=env)
    assert done.returncode == 0, done.stderr
    assert "Dashboard: http://127.0.0.1:" in done.stderr and "[2/2] sub-02 written" in done.stderr
    assert (tmp_path / "glm" / "sub-02" / "sub-02_task-main_contrast-a_stat-z_statmap.nii.gz").is_file()


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
    records = [p for p in before if p.name.endswith("_provenance.json") and p.parent.parent == out]
    assert len(records) == 2
    for contrasts, message in ((["-c", f"{'a' * 300}=a"], "over the 255"),
                               (["-c", "aMinusB=a - b", "-c", "a-b=a"], "both become the file label")):
        bad = _cli(out / "cohort.zarr", "-o", out, "--task", "main", *contrasts, "--overwrite",
                   "--cluster", "none")
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and "fitting" not in bad.stderr
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "cohort.zarr" not in p.parts}
        assert after == before  # nothing deleted, nothing written
