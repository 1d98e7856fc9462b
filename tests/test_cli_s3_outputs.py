"""``-o s3://...`` for every command that writes (issue 18 item 3): the files go to the object
store (a real moto server on 127.0.0.1), never to a local ``s3:/`` folder.

Credentials and the endpoint come from the environment only, as on a cluster.
"""

from __future__ import annotations

import json

import boto3
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.cli.commands import main
from chunkglm.testing import make_synthetic_bids

pytestmark = pytest.mark.filterwarnings("ignore:No clusters found:UserWarning")


def _keys(s3_server, bucket, prefix):
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1:]: o for page in pages for o in page.get("Contents", [])}, client


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_every_command_writes_its_outputs_to_s3(s3_env, s3_bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a local "s3:" folder would appear here
    bids = make_synthetic_bids(tmp_path / "bids", n_subjects=3, size="tiny", seed=5)
    url = f"s3://{s3_bucket}"

    _run(capsys, "convert", bids.root, "-o", f"{url}/cohort.zarr/", "--cluster", "none")
    store = tmp_path / "c.zarr"
    chunkglm.convert(bids.root, store)

    _run(capsys, "first-level", store, "-o", f"{url}/fl", "--task", "main", "-c", "aMinusB=a - b",
         "--cluster", "none", "--no-progress", "--layout", "both")
    keys, _ = _keys(s3_env, s3_bucket, "fl")
    assert "sub-02/sub-02_task-main_contrast-aminusb_stat-z_statmap.nii.gz" in keys
    assert "first_level/sub-02/sub-02_task-main_contrast-aMinusB_stat-z.nii.gz" in keys
    assert "sub-02/sub-02_task-main_provenance.json" in keys

    local_fl = tmp_path / "fl"  # second-level and meta read local first-level maps
    _run(capsys, "first-level", store, "-o", local_fl, "--task", "main", "-c", "aMinusB=a - b",
         "--cluster", "none", "--no-progress")
    out = _run(capsys, "second-level", local_fl, "-o", f"{url}/group/", "--first-level-contrast", "aMinusB",
               "--cluster", "none", "--no-progress")
    assert f"group derivatives: {url}/group/group_level" in out
    keys, client = _keys(s3_env, s3_bucket, "group")
    assert "group_level/group_contrast-mean_stat-z.nii.gz" in keys
    record = json.loads(client.get_object(Bucket=s3_bucket, Key="group/group_level/group_provenance.json")
                        ["Body"].read())
    assert "group_level/group_contrast-mean_stat-z.nii.gz" in record["outputs"]
    assert json.loads(client.get_object(Bucket=s3_bucket, Key="group/dataset_description.json")["Body"].read())[
        "DatasetType"] == "derivative"

    table = pd.DataFrame({
        "beta": [str(p) for p in sorted(local_fl.glob("first_level/sub-*/*_contrast-aMinusB_stat-effect.nii.gz"))],
        "varcope": [str(p) for p in sorted(local_fl.glob("first_level/sub-*/*_contrast-aMinusB_stat-variance.nii.gz"))]})
    table.to_csv(tmp_path / "studies.tsv", sep="\t", index=False)
    _run(capsys, "meta", "--estimator", "DerSimonianLaird", "--table", "studies.tsv", "-o", f"{url}/meta_out",
         "--cluster", "none")
    keys, client = _keys(s3_env, s3_bucket, "meta_out")
    assert {"meta/DerSimonianLaird_z.nii.gz", "meta/provenance.json", "meta/dataset_description.json"} <= set(keys)
    assert "meta.zarr/zarr.json" in keys  # the table's maps, converted into the output's store

    grid = nib.load(bids.runs[0].bold_path)
    maps = np.abs(np.random.default_rng(0).normal(size=(*grid.shape[:3], 2))).astype(np.float32)
    nib.save(nib.Nifti1Image(maps, grid.affine), tmp_path / "atlas.nii.gz")
    _run(capsys, "extract", store, "--maps", "atlas.nii.gz", "--atlas", "toy", "-o", f"{url}/ts",
         "--cluster", "none", "--no-progress")
    keys, _ = _keys(s3_env, s3_bucket, "ts")
    assert len([k for k in keys if k.endswith("_desc-toy_timeseries.tsv")]) == 3

    keys, _ = _keys(s3_env, s3_bucket, "cohort.zarr")
    assert "zarr.json" in keys
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("s3*"))
