"""``chunkglm app --store s3://...``: the maps staged for the workers lie under the store's URL.

A multi-node cluster's workers reach the object store, not the app process's TMPDIR: the stores
the subject (fixed effects) and dataset (GLM) nodes stage go to ``STORE/.scratch/chunkglm-app-*``
on the object store (a real moto server on 127.0.0.1), as they go to ``STORE/.scratch/`` beside
a local store, and nothing is left there after the run, nor from a killed run of this host.
Credentials and the endpoint come from the environment only, as on a cluster.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np

import chunkglm.cli.app as app_module
import chunkglm.glm.stats_models.fixed_effects as fixed_effects
import chunkglm.glm.stats_models.group_level as group_level
from chunkglm.cli.main import main
from chunkglm.io.scratch import owned_name
from chunkglm.testing import make_synthetic_bids

MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "one_sample.json"
GROUP_Z = "node-dataset/contrast-a_stat-z_statmap.nii.gz"


def _keys(server, bucket, prefix) -> list[str]:
    client = boto3.client("s3", endpoint_url=server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=server["key"], aws_secret_access_key=server["secret"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _put(server, bucket, key) -> None:
    boto3.client("s3", endpoint_url=server["endpoint"], region_name="us-east-1", aws_access_key_id=server["key"],
                 aws_secret_access_key=server["secret"]).put_object(Bucket=bucket, Key=key, Body=b"{}")


def test_object_store_run_stages_under_the_store_url_and_leaves_nothing(s3_env, s3_bucket, tmp_path, monkeypatch):
    ds = make_synthetic_bids(tmp_path / "ds", n_subjects=3, n_runs=1, size="tiny", seed=4)
    store = f"s3://{s3_bucket}/cohort.zarr"
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the app process's TMPDIR
    # a killed run's folder (this host, a pid no process holds), put there once the store is converted
    leftover = f"cohort.zarr/.scratch/{owned_name('chunkglm-app-').replace(f'-{os.getpid()}-', '-999999999-')}"

    def converting(*args, convert=app_module.convert, **kwargs):
        done = convert(*args, **kwargs)
        _put(s3_env, s3_bucket, f"{leftover}/store.zarr/zarr.json")
        return done

    monkeypatch.setattr(app_module, "convert", converting, raising=True)
    staged = []

    def spying(original):
        def write(table, roles, store_path, *args, **kwargs):
            staged.append((str(store_path), sorted(p.name for p in temp.iterdir()),
                           _keys(s3_env, s3_bucket, f"{leftover}/")))
            return original(table, roles, store_path, *args, **kwargs)
        return write

    monkeypatch.setattr(fixed_effects, "write_maps_node", spying(fixed_effects.write_maps_node))
    monkeypatch.setattr(group_level, "write_maps_node", spying(group_level.write_maps_node))
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(MODEL), "--cluster", "none",
                 "--no-progress", "--no-reports", "--store", store])
    assert code == 0
    # the subject node's fixed-effects store, and the dataset node's (one maps node per group: a, b, aMinusB)
    assert len(staged) == 4
    # the dataset node is one graph over one scratch store: its three groups are nodes of that store
    assert len({url for url, _, _ in staged if "/chunkglm-group-level-" in url}) == 1
    for url, in_temp, left in staged:
        assert url.startswith(f"{store}/.scratch/chunkglm-app-"), url
        assert not [name for name in in_temp if name.startswith("chunkglm-")]  # nothing staged in TMPDIR
        assert not left  # the killed run's folder was removed when the run made its own
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # no local "s3:" folder
    assert not _keys(s3_env, s3_bucket, "cohort.zarr/.scratch/")  # the run's folder removed at the end
    assert _keys(s3_env, s3_bucket, "cohort.zarr/zarr.json")  # the store itself is there

    # the same maps as with a local store (staged in STORE/.scratch/ beside it)
    local = tmp_path / "local"
    assert main(["app", str(ds.root), str(local), "dataset", "--model", str(MODEL), "--cluster", "none",
                 "--no-progress", "--no-reports", "--store", str(tmp_path / "cohort.zarr")]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out / GROUP_Z).dataobj),
                                  np.asarray(nib.load(local / GROUP_Z).dataobj))
