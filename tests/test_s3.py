"""Stores and inputs on S3-compatible object storage (a real moto server on 127.0.0.1)."""

from __future__ import annotations

import logging
import subprocess
import sys

import boto3
import numpy as np
import pytest

import chunkglm


def _bucket_bytes(s3_server, bucket) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in objects}


def _assert_no_secret(blobs, s3_server):
    for key, blob in blobs.items():
        assert s3_server["secret"].encode() not in blob, key
        assert s3_server["key"].encode() not in blob, key


def test_convert_to_s3_equals_local_and_never_stores_credentials(tiny_bids, s3_server, s3_bucket,
                                                                  tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    url = f"s3://{s3_bucket}/cohort.zarr"
    options = s3_server["storage_options"]
    report = chunkglm.convert(tiny_bids.root, url, storage_options=options)
    assert len(report.converted) == len(tiny_bids.runs)

    local = tmp_path / "local.zarr"
    chunkglm.convert(tiny_bids.root, local)
    remote, ref = chunkglm.open_cohort(url, storage_options=options), chunkglm.open_cohort(local)
    assert sorted(remote.runs) == sorted(ref.runs)
    for name, node in ref.runs.items():
        np.testing.assert_array_equal(remote.runs[name].data().values, node.data().values)
    np.testing.assert_array_equal(remote.runs[name].grid.mask, node.grid.mask)

    blobs = _bucket_bytes(s3_server, s3_bucket)
    assert any(k.endswith("bold/zarr.json") for k in blobs)
    _assert_no_secret(blobs, s3_server)
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, repr(remote), repr(report)):
        assert s3_server["secret"] not in text

    again = chunkglm.convert(tiny_bids.root, url, storage_options=options)
    assert again.converted == [] and len(again.skipped) == len(tiny_bids.runs)


def test_inputs_on_s3_and_round_trip(real_images, s3_server, s3_bucket, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    client.upload_file(str(real_images[1]), s3_bucket, "in/functional.nii.gz")
    store = tmp_path / "from_s3.zarr"
    chunkglm.convert([f"s3://{s3_bucket}/in/functional.nii.gz"], store,
                     input_storage_options=s3_server["storage_options"])
    node = chunkglm.open_cohort(store).runs["functional"]
    import nibabel as nib

    expected = np.asarray(nib.load(real_images[1]).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(node.to_nifti().get_fdata(dtype=np.float32), expected)
    assert node.attrs["chunkglm"]["source"]["path"] == f"s3://{s3_bucket}/in/functional.nii.gz"


def test_cli_to_s3_on_a_local_cluster_with_credentials_from_the_environment(tiny_bids, s3_server,
                                                                            s3_bucket, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
           "AWS_DEFAULT_REGION": "us-east-1", "CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "2",
           "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "127.0.0.1:0"}
    import os

    url = f"s3://{s3_bucket}/cli.zarr"
    cmd = [sys.executable, "-m", "chunkglm.cli.main", "convert", str(tiny_bids.root), "-o", url,
           "--storage-option", f"endpoint_url={s3_server['endpoint']}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Dashboard: http://127.0.0.1:" in result.stderr
    assert s3_server["secret"] not in result.stdout + result.stderr
    cohort = chunkglm.open_cohort(url, storage_options=s3_server["storage_options"])
    assert len(cohort.runs) == len(tiny_bids.runs)
    _assert_no_secret(_bucket_bytes(s3_server, s3_bucket), s3_server)


@pytest.mark.parametrize("url", ["s3://user:pa55word@bucket/x.zarr"])
def test_credentials_in_urls_are_redacted(url):
    from chunkglm.io.layout import redact_url

    assert "pa55word" not in redact_url(url) and redact_url(url) == "s3://bucket/x.zarr"


def test_cli_takes_the_storage_section_of_the_cluster_config(tiny_bids, s3_server, s3_bucket, tmp_path):
    """No --storage-option: the endpoint and backend come from the config's storage: section,
    credentials from the environment; convert, info and first-level all reach the S3 store."""
    import os

    import yaml

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "version": 1, "type": "local",
        "local": {"n_workers": 1, "dashboard_address": None},
        "storage": {"backend": "obstore", "options": {"endpoint_url": s3_server["endpoint"],
                                                      "region": "us-east-1"}, "retries": 2}}))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server["key"],
           "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": "us-east-1"}
    url = f"s3://{s3_bucket}/from-config.zarr"

    def chunkglm_cli(*args):
        result = subprocess.run([sys.executable, "-m", "chunkglm.cli.main", *args, "--cluster", str(config)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert s3_server["secret"] not in result.stdout + result.stderr
        return result

    chunkglm_cli("convert", str(tiny_bids.root), "-o", url)
    info = chunkglm_cli("info", url)
    assert f"runs: {len(tiny_bids.runs)}" in info.stdout
    out = tmp_path / "derivatives"
    chunkglm_cli("first-level", url, "-o", str(out), "--task", "main", "-c", "aMinusB=a - b",
                 "--no-progress")
    assert sorted(p.name for p in out.rglob("*stat-z*.nii.gz"))
    _assert_no_secret(_bucket_bytes(s3_server, s3_bucket), s3_server)
