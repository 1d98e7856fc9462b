"""Derivatives written to s3:// (a real moto server on 127.0.0.1): the same files and
bytes as a local out_dir, a completion marker written last, never a key outside
out_dir, and nothing counted complete after a cut-off upload."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pandas as pd
import pytest

import chunkglm
from chunkglm.errors import InputError, StoreError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.interfaces.bids import write_glm_to_bids
from chunkglm.io import derivatives
from chunkglm.io.derivatives import StagedOutput, check_relative, output_complete
from chunkglm.io.backends import StorageSettings
from chunkglm.testing import make_synthetic_bids

pytestmark = pytest.mark.filterwarnings("ignore:No clusters found:UserWarning")

MARKER = ".chunkglm/complete.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3_derivs")
    dataset = make_synthetic_bids(tmp / "bids", n_subjects=1, size="tiny", seed=0)
    run = dataset.runs[0]
    chunkglm.convert(dataset.root, tmp / "store.zarr")
    node = chunkglm.open_cohort(tmp / "store.zarr").runs[run.name]
    confounds = pd.read_csv(run.confounds_path, sep="\t", na_values="n/a")[["trans_x", "csf"]]
    return FirstLevelModel(slice_time_ref=0.5).fit(node, confounds=confounds)


def _objects(s3_server, bucket, prefix) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert all(k.startswith(prefix + "/") for k in keys), keys  # nothing outside out_dir
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _local(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("backend", ["auto", "fsspec"])
def test_save_glm_to_bids_on_s3_gives_the_local_files_and_bytes(backend, model, s3_env, s3_bucket,
                                                                 tmp_path, monkeypatch):
    if backend == "fsspec":  # the standard botocore chain, through s3fs
        monkeypatch.setattr(StagedOutput, "__init__", _with_storage(StorageSettings("fsspec")))
    contrasts = {"a - b": "a - b", "a": "a"}
    local = write_glm_to_bids(model, contrasts, out_dir=tmp_path / "derivs", prefix="sub-01_task-main")
    urls = write_glm_to_bids(model, contrasts, out_dir=f"s3://{s3_bucket}/derivs", prefix="sub-01_task-main")
    assert urls == [f"s3://{s3_bucket}/derivs/{p.relative_to(tmp_path / 'derivs').as_posix()}" for p in local]
    remote, expected = _objects(s3_env, s3_bucket, "derivs"), _local(tmp_path / "derivs")
    assert sorted(remote) == sorted(expected) and len(remote) > 20
    differing = sorted(name for name in expected if _content(name, remote[name]) != _content(name, expected[name]))
    assert differing == [], differing
    for blob in remote.values():
        assert s3_env["secret"].encode() not in blob


def _content(name: str, blob: bytes) -> bytes:
    """What two writes of the same result share, byte for byte. The writers are not
    byte-reproducible even locally: gzip stores its write time in the header of every
    .nii.gz, matplotlib gives SVG elements random ids, the report page holds its own id,
    the time it was made and its provenance record (wall time). So: .nii.gz compared
    decompressed, SVG ids blanked, the report page by its figures; every other file
    compared as written."""
    import gzip
    import re

    if name.endswith(".gz"):
        return gzip.decompress(blob)
    if name.endswith(".svg"):
        return re.sub(rb'(id="|#)[a-z]+[0-9a-f]{10}\b', rb"\1ID", blob)
    if name.endswith("report.html"):
        return b"\n".join(re.findall(rb'<img src="[^"]*"', blob))
    return blob


def _with_storage(settings):
    real = StagedOutput.__init__

    def init(self, out_dir, *, marker=None, storage_options=None):
        real(self, out_dir, marker=marker, storage_options=storage_options or settings)

    return init


def test_marker_is_written_last_and_an_existing_set_is_merged(s3_env, s3_bucket, s3_proxy):
    proxy = s3_proxy()
    url = f"s3://{s3_bucket}/out"
    settings = StorageSettings(options={"endpoint_url": proxy.endpoint})
    with StagedOutput(url, marker=MARKER, storage_options=settings) as out:
        for name in ("a.txt", "sub-01/b.txt", "sub-01/c/d.txt"):
            out.path(name).write_text(name)
        assert out.existing("dataset_description.json") is None
    puts = [path for method, path in proxy.requests if method == "PUT"]
    assert puts[-1] == f"/{s3_bucket}/out/{MARKER}" and len(puts) == 4
    record = json.loads(_objects(s3_env, s3_bucket, "out")[MARKER])
    assert record["complete"] and record["files"] == ["a.txt", "sub-01/b.txt", "sub-01/c/d.txt"]
    assert out.written == [f"{url}/a.txt", f"{url}/sub-01/b.txt", f"{url}/sub-01/c/d.txt", f"{url}/{MARKER}"]

    with StagedOutput(url, marker=MARKER, storage_options=settings) as out:
        previous = out.existing("a.txt")
        out.path("a.txt").write_text(previous.read_text() + "+new")
    objects = _objects(s3_env, s3_bucket, "out")
    assert objects["a.txt"] == b"a.txt+new" and objects["sub-01/b.txt"] == b"sub-01/b.txt"
    assert output_complete(url, MARKER, settings)


def test_an_upload_cut_off_leaves_the_set_incomplete_and_a_rerun_completes_it(s3_env, s3_bucket, s3_proxy):
    url = f"s3://{s3_bucket}/cut"
    with StagedOutput(url, marker=MARKER) as out:  # a complete earlier version
        for i in range(6):
            out.path(f"f{i}.txt").write_text("old")
    assert output_complete(url, MARKER)
    # the network goes down during the third upload of the new version
    proxy = s3_proxy(cut_on=rb"PUT /[^ ]*/cut/f\d\.txt", cut_after=3)
    settings = StorageSettings(options={"endpoint_url": proxy.endpoint}, retries=1)
    with pytest.raises(StoreError, match=rf"could not write s3://{s3_bucket}/cut/f\d\.txt after 1 retries"
                       r".*run the same command again") as err:
        with StagedOutput(url, marker=MARKER, storage_options=settings) as out:
            for i in range(6):
                out.path(f"f{i}.txt").write_text("new")
    assert proxy.cut_done.is_set() and s3_env["secret"] not in str(err.value)
    assert not output_complete(url, MARKER)  # the old marker went first, the new never came
    assert not list(Path(out.root).parent.parent.glob(out.root.parent.name))  # staging removed

    with StagedOutput(url, marker=MARKER) as out:
        for i in range(6):
            out.path(f"f{i}.txt").write_text("new")
    objects = _objects(s3_env, s3_bucket, "cut")
    assert output_complete(url, MARKER) and all(objects[f"f{i}.txt"] == b"new" for i in range(6))


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b", "..\\evil", "", "  ", "s3://x/y", "."])
def test_no_path_can_leave_out_dir(name, s3_bucket):
    with pytest.raises(InputError, match="cannot name a file inside the output folder"):
        check_relative(name)
    with pytest.raises(InputError), StagedOutput(f"s3://{s3_bucket}/out") as out:
        out.path(name)
    with pytest.raises(InputError):
        StagedOutput(f"s3://{s3_bucket}/out", marker=name)


def test_local_marker_is_moved_last_and_an_old_one_restored_when_a_move_fails(tmp_path, monkeypatch):
    import os

    out_dir = tmp_path / "out"
    with StagedOutput(out_dir, marker=MARKER) as out:
        out.path("a.txt").write_text("old")
    old_marker = (out_dir / MARKER).read_bytes()
    real, targets = os.replace, []

    def failing_replace(src, dst):
        targets.append(Path(dst))
        if len(targets) == 3:  # marker set aside, a.txt set aside, then the move of a.txt fails
            raise OSError("device gone")
        return real(src, dst)

    monkeypatch.setattr(derivatives.os, "replace", failing_replace)
    with pytest.raises(OSError, match="device gone"), StagedOutput(out_dir, marker=MARKER) as out:
        out.path("a.txt").write_text("new")
    assert targets[0].name == "complete.json" and (out_dir / MARKER).read_bytes() == old_marker
    assert (out_dir / "a.txt").read_text() == "old"
    monkeypatch.undo()
    with StagedOutput(out_dir, marker=MARKER) as out:
        out.path("a.txt").write_text("new")
        out.path("b.txt").write_text("new")
    assert json.loads((out_dir / MARKER).read_text())["files"] == ["a.txt", "b.txt"]
    assert output_complete(out_dir, MARKER)
