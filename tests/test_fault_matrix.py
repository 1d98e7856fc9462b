"""A kill at every write point of every command, resumed to the same outputs (issue 18 item 11).

Each command runs once undisturbed, counting its write points (``tests/infra/faults.py``: file
opens for writing, renames, links, deletions, zarr store and s3fs writes). Then, for a write
point k, the same command runs and dies (``os._exit(137)``, as after SIGKILL) just before its
k-th write, is run again unchanged, and what it leaves must equal the undisturbed output:

- every file byte for byte (NIfTI maps, TSVs, zarr chunks, PNGs), with the same names: no
  ``.partial`` file, staging folder or lock left behind;
- JSON files (zarr metadata, provenance, sidecars) equal once the times they record
  (``created``, ``written``, ``started``, ``wall_time_s``, ``time``) and the output folder's own
  path are set aside; a store's ``_provenance/`` records are named after their time, host and
  process: their number may differ (a killed run may have written its own), never their content
  otherwise.

Which k: ``make test`` runs, for each command, the first point of each kind of write (so every
kind is hit once: the first file written, the first rename, deletion, store write...) plus
``STRIDE_POINTS`` evenly spaced points including the first and the last (the same list on
every machine, for the same count). ``CHUNKGLM_FAULT_MATRIX=all`` runs every k (a few minutes
per command; ``convert`` on two tiny runs has ~430 points, most of them zarr's
``require_group`` re-writing a group's ``zarr.json`` that exists: the same state again).
Commands run in processes forked from one that imported chunkglm (no interpreter start per
run), two at a time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from infra import faults  # noqa: E402

import chunkglm  # noqa: E402
from chunkglm.testing import make_synthetic_bids  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:No clusters found:UserWarning")]

EVERY_POINT = os.environ.get("CHUNKGLM_FAULT_MATRIX", "") == "all"
STRIDE_POINTS = 6
normalised, local_files, differences = faults.normalised, faults.local_files, faults.differences
def kill_points(points: list[list[str]]) -> list[int]:
    """Every k, or the first point of each kind plus evenly spaced ones (see the docstring)."""
    if EVERY_POINT:
        return list(range(1, len(points) + 1))
    first = {}
    for k, point in enumerate(points, 1):
        first.setdefault(point[0], k)
    return sorted(set(first.values()) | set(faults.strided(len(points), STRIDE_POINTS)))


def _leftovers(root: Path) -> list[str]:
    """Staging folders beside the output (first-level's .OUT.chunkglm-*)."""
    return sorted(p.name for p in root.parent.glob(f".{root.name}.chunkglm-*"))


def check_matrix(name: str, argv_for, work: Path, snapshot, *, env=None) -> dict:
    """Reference run, then kill at each chosen k and resume; return figures for the report.

    The re-runs treat a killed writer's temporary files as stale at once (in real use: after
    CHUNKGLM_PARTIAL_STALE_SECONDS, a minute; nothing else writes these stores meanwhile).
    """
    env = {"CHUNKGLM_PARTIAL_STALE_SECONDS": "0", **(env or {})}
    reference_out = argv_for("ref")
    reference = faults.run_command(reference_out[0], work / "ref", env=env)
    assert reference.code == 0, reference.output
    want = snapshot(reference_out[1])
    ks = kill_points(reference.points)
    killed = faults.run_many([(argv_for(f"k{k}")[0], work / f"k{k}", k, env) for k in ks])
    resumed = faults.run_many([(argv_for(f"k{k}")[0], work / f"k{k}" / "resume", None, env) for k in ks])
    failures = []
    for k, kill, again in zip(ks, killed, resumed):
        where = f"{name}: killed before write {k}/{len(reference.points)} ({kill.killed_at or 'not reached'})"
        if kill.code not in (faults.KILLED, 0):
            failures.append(f"{where}: the killed run exited {kill.code}: {kill.output[-800:]}")
        if again.code != 0:
            failures.append(f"{where}: the re-run exited {again.code}: {again.output[-1500:]}")
            continue
        diff = differences(snapshot(argv_for(f"k{k}")[1]), want)
        if diff:
            failures.append(f"{where}: the re-run's output differs: {diff[:8]}")
    assert not failures, "\n".join(failures)
    return {"points": len(reference.points), "killed": sum(r.code == faults.KILLED for r in killed),
            "kinds": sorted(reference.kinds)}


# -- local ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny subjects: BIDS, their store, first-level maps, a meta table and an atlas."""
    root = tmp_path_factory.mktemp("faults")
    bids = make_synthetic_bids(root / "bids", n_subjects=2, size="tiny", seed=1)
    store = root / "store.zarr"
    chunkglm.convert(bids.root, store)
    fl = root / "fl"
    done = faults.run_command(["first-level", store, "-o", fl, "--task", "main", "-c", "a=a",
                               "--cluster", "none", "--no-progress"], root / "fl-work")
    assert done.code == 0, done.output
    maps = {stat: [str(fl / f"first_level/sub-{s}/sub-{s}_task-main_contrast-a_stat-{stat}.nii.gz")
                   for s in ("01", "02")] for stat in ("effect", "variance")}
    pd.DataFrame({"beta": maps["effect"], "varcope": maps["variance"]}).to_csv(
        root / "studies.tsv", sep="\t", index=False)
    grid = nib.load(bids.runs[0].bold_path)
    atlas = np.abs(np.random.default_rng(0).normal(size=(*grid.shape[:3], 2))).astype(np.float32)
    nib.save(nib.Nifti1Image(atlas, grid.affine), root / "atlas.nii.gz")
    return {"root": root, "bids": bids, "store": store, "fl": fl}


def _local_commands(world) -> dict:
    root, store = world["root"], world["store"]
    common = ["--cluster", "none"]
    return {
        "convert": lambda out: ["convert", world["bids"].root, "-o", out, *common],
        "first-level": lambda out: ["first-level", store, "-o", out, "--task", "main", "-c", "a=a", *common,
                                    "--no-progress"],
        "second-level": lambda out: ["second-level", world["fl"], "-o", out, "--first-level-contrast", "a",
                                     *common, "--no-progress"],
        "meta": lambda out: ["meta", "--estimator", "DerSimonianLaird", "--table", root / "studies.tsv",
                             "-o", out, *common],
        "extract": lambda out: ["extract", store, "--maps", root / "atlas.nii.gz", "--atlas", "toy",
                                "-o", out, *common, "--no-progress"],
    }


@pytest.mark.parametrize("command", ["convert", "first-level", "second-level", "meta", "extract"])
def test_a_kill_at_each_write_point_resumes_to_the_same_outputs(world, command, tmp_path):
    make = _local_commands(world)[command]

    def argv_for(tag):
        out = tmp_path / tag / ("store.zarr" if command == "convert" else "out")
        return make(out), out

    def snapshot(out: Path):
        assert not _leftovers(out), _leftovers(out)
        return normalised(local_files(out), str(out))

    figures = check_matrix(command, argv_for, tmp_path, snapshot)
    assert figures["killed"] >= 1 and figures["points"] >= 5, figures


def test_the_harness_kills_where_it_is_told_and_counts_every_kind(world, tmp_path):
    """The injector itself: a kill at k leaves exactly k-1 points logged, and convert's points
    include files, renames, deletions and store writes."""
    argv = _local_commands(world)["convert"](tmp_path / "a.zarr")
    counted = faults.run_command(argv, tmp_path / "count")
    assert counted.code == 0
    assert {"open", "replace", "unlink", "LocalStore.set"} <= counted.kinds
    killed = faults.run_command(_local_commands(world)["convert"](tmp_path / "b.zarr"), tmp_path / "kill",
                                kill_at=7)
    assert killed.code == faults.KILLED and len(killed.points) == 7
    assert killed.points[-1][0] == "KILLED"
    assert faults.strided(5, 6) == [1, 2, 3, 4, 5] and faults.strided(101, 5) == [1, 26, 51, 76, 101]


# -- S3 ---------------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_server):
    return {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": s3_server["key"],
            "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": "us-east-1"}


def _s3_files(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.parametrize("command", ["convert", "first-level"])
def test_a_kill_at_each_write_point_on_s3_resumes_to_the_same_outputs(world, command, s3_server, s3_env,
                                                                       s3_bucket, tmp_path):
    make = _local_commands(world)[command]

    def argv_for(tag):
        out = f"s3://{s3_bucket}/{tag}/" + ("store.zarr" if command == "convert" else "out")
        return make(out), out

    def snapshot(url: str):
        prefix = url.split("/", 3)[3]
        return normalised(_s3_files(s3_server, s3_bucket, prefix), url)

    figures = check_matrix(f"{command} (S3)", argv_for, tmp_path, snapshot, env=s3_env)
    assert figures["killed"] >= 1 and any(k.startswith(("ObjectStore", "FsspecStore", "s3fs"))
                                          for k in figures["kinds"]), figures
