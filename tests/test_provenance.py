"""Provenance records of every output folder, resume rules, and no secret anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import chunkglm
from chunkglm.cli.main import build_parser, command_options
from chunkglm.provenance import REDACTED, strip_secrets

FAKE_SECRET = "fake-secret-do-not-write-4f9a1c"
PACKAGES = {"chunkglm", "dask", "distributed", "zarr", "numpy", "nibabel", "nilearn", "python"}


def _first_level(dataset, out, *extra, env=None):
    command = [sys.executable, "-m", "chunkglm.cli.main", "first-level", str(dataset.root),
               "-o", str(out), "--task", "main", "--cluster", "none", *map(str, extra)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _record(out: Path, sub: str, nilearn=False) -> dict:
    """The subject's record: in first_level/sub-XX/ (the default --layout glm), or in nilearn's
    sub-XX/ (where --layout both puts the completion marker)."""
    folder = out if nilearn else out / "first_level"
    return json.loads((folder / f"sub-{sub}" / f"sub-{sub}_task-main_provenance.json").read_text())


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "cohort.zarr" not in p.parts}


@pytest.fixture(scope="module")
def analysed(tiny_bids, tmp_path_factory):
    """``chunkglm first-level`` once on the two tiny subjects (a secret in its environment)."""
    out = tmp_path_factory.mktemp("prov") / "glm"
    done = _first_level(tiny_bids, out, "-c", "aMinusB=a - b", "-c", "a=a", "--layout", "both",
                        env={"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "CHUNKGLM_TEST_TOKEN": FAKE_SECRET})
    assert done.returncode == 0, done.stderr
    return out


def test_each_subject_folder_has_a_complete_record(tiny_bids, analysed):
    record = _record(analysed, "01")
    assert record == _record(analysed, "01", nilearn=True)  # nilearn's folder has it too (--layout both)
    assert record["operation"] == "first-level" and record["subject"] == "01"
    assert set(record["versions"]) == PACKAGES and record["versions"]["chunkglm"] == chunkglm.__version__
    assert record["cluster"]["type"] == "none"
    assert "started" not in record and "wall_time_s" not in record  # a re-run writes the same bytes
    run = tiny_bids.runs[0]
    (source,) = record["inputs"]
    assert source["sha256"] == hashlib.sha256(run.bold_path.read_bytes()).hexdigest()
    assert source["size"] == run.bold_path.stat().st_size and source["path"] == str(run.bold_path)
    assert record["analysis"]["contrasts"] == {"aMinusB": "a - b", "a": "a"}
    assert record["analysis"]["noise_model"] == "ar1" and record["options"]["cluster"] == "none"
    written = {str(p.relative_to(analysed)) for p in analysed.glob("**/sub-01/*")
               if not p.name.endswith("provenance.json")}
    assert {o["path"] for o in record["outputs"]} == written  # every file of the subject, listed
    run_record = json.loads((analysed / "task-main_provenance.json").read_text())
    assert run_record["subjects_computed"] == ["01", "02"] and len(run_record["inputs"]) == 2


def test_the_store_records_its_conversion(analysed):
    meta = chunkglm.open_cohort(analysed / "cohort.zarr").attrs
    (record,) = meta["provenance"]
    assert record["operation"] == "convert" and set(record["versions"]) == PACKAGES
    assert record["cluster"]["type"] == "none" and record["wall_time_s"] > 0
    assert all(len(i["sha256"]) == 64 for i in record["inputs"])


def test_no_secret_in_any_written_file(analysed):
    for path in analysed.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET.encode() not in path.read_bytes(), path


def test_other_options_are_refused_then_replaced_with_overwrite(tiny_bids, tmp_path):
    out = tmp_path / "glm"
    done = _first_level(tiny_bids, out, "-c", "aMinusB=a - b", "-c", "a=a")
    assert done.returncode == 0, done.stderr
    before = _mtimes(out)

    other = _first_level(tiny_bids, out, "-c", "aMinusB=a - b", "--noise-model", "ols")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert 'noise_model: "ar1" there, "ols" now' in other.stderr and "--overwrite" in other.stderr
    assert _mtimes(out) == before  # nothing touched

    replaced = _first_level(tiny_bids, out, "-c", "aMinusB=a - b", "--noise-model", "ols", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert _record(out, "01")["analysis"]["noise_model"] == "ols"
    # the contrast no longer asked for is gone: no mix of two analyses in one folder
    assert not list(out.rglob("*contrast-a_*")) and list(out.rglob("*contrast-aMinusB_*"))


def test_a_subject_without_its_record_is_recomputed(tiny_bids, tmp_path):
    out = tmp_path / "glm"
    assert _first_level(tiny_bids, out, "-c", "a=a").returncode == 0
    (out / "first_level" / "sub-02" / "sub-02_task-main_provenance.json").unlink()  # as if killed before it
    kept = _mtimes(out / "first_level" / "sub-01")
    again = _first_level(tiny_bids, out, "-c", "a=a")
    assert again.returncode == 0, again.stderr
    assert "sub-01: complete (same analysis), skipped" in again.stderr
    assert "sub-02: outputs of an interrupted run, recomputed" in again.stderr
    assert "[1/1] sub-02 written" in again.stderr and _mtimes(out / "first_level" / "sub-01") == kept
    assert _record(out, "02")["subject"] == "02"


def test_secrets_in_arguments_and_storage_options_are_redacted():
    args = build_parser().parse_args(
        ["convert", "in", "-o", f"s3://user:{FAKE_SECRET}@bucket/c.zarr",
         "--storage-option", f"secret={FAKE_SECRET}", "--storage-option", f"key={FAKE_SECRET}",
         "--storage-option", "endpoint_url=http://127.0.0.1:9000",
         "--input-storage-option", f"session_token={FAKE_SECRET}"])
    options = command_options(args)
    assert FAKE_SECRET not in json.dumps(options)
    assert options["output_dir"] == "s3://bucket/c.zarr"  # -o/--output-dir
    assert options["storage_option"]["secret"] == REDACTED
    assert options["storage_option"]["endpoint_url"] == "http://127.0.0.1:9000"
    nested = strip_secrets({"client_kwargs": {"aws_secret_access_key": FAKE_SECRET}, "password": "x",
                            "chunk_key_encoding": "default", "urls": [f"http://u:{FAKE_SECRET}@h/p"]})
    assert nested == {"client_kwargs": {"aws_secret_access_key": REDACTED}, "password": REDACTED,
                      "chunk_key_encoding": "default", "urls": ["http://h/p"]}


def test_no_secret_in_a_store_written_to_s3(tiny_bids, s3_server, s3_bucket):
    import s3fs

    url = f"s3://{s3_bucket}/cohort.zarr"
    command = [sys.executable, "-m", "chunkglm.cli.main", "convert", str(tiny_bids.root), "-o", url,
               "--cluster", "none", "--storage-option", f"key={s3_server['key']}",
               "--storage-option", f"secret={s3_server['secret']}",
               "--storage-option", f"endpoint_url={s3_server['endpoint']}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET})
    assert done.returncode == 0, done.stderr
    assert s3_server["secret"] not in done.stdout + done.stderr
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    objects = fs.find(f"{s3_bucket}/cohort.zarr")
    assert any(o.endswith("zarr.json") for o in objects)
    for name in objects:
        content = fs.cat_file(name)
        assert s3_server["secret"].encode() not in content and FAKE_SECRET.encode() not in content
        assert s3_server["key"].encode() not in content, name
    record = chunkglm.open_cohort(url, s3_server["storage_options"]).attrs["provenance"][-1]
    assert record["options"]["command"]["storage_option"]["secret"] == REDACTED


def test_first_level_on_s3_records_resumes_and_writes_no_secret(tiny_bids, s3_server, s3_bucket):
    import s3fs

    env = {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
           "AWS_ENDPOINT_URL": s3_server["endpoint"]}  # the standard chain, no option in files
    out = f"s3://{s3_bucket}/glm"
    first = _first_level(tiny_bids, out, "-c", "a=a", "--subject", "01", env=env)
    assert first.returncode == 0, first.stderr
    again = _first_level(tiny_bids, out, "-c", "a=a", "--subject", "01", env=env)
    assert again.returncode == 0 and "sub-01: complete (same analysis), skipped" in again.stderr
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    record = json.loads(fs.cat_file(f"{s3_bucket}/glm/first_level/sub-01/sub-01_task-main_provenance.json"))
    assert record["outputs"] and all(fs.size(f"{s3_bucket}/glm/{o['path']}") == o["size"]
                                      for o in record["outputs"])
    for name in fs.find(f"{s3_bucket}/glm"):
        content = fs.cat_file(name)
        assert s3_server["secret"].encode() not in content and s3_server["key"].encode() not in content
