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


def test_a_convert_killed_before_listing_its_grid_is_mended_by_the_rerun(world, tmp_path):
    """Found by the all-points matrix (CHUNKGLM_FAULT_MATRIX=all, 7 of 563 points): a convert
    killed after a grid's completion but before the root's listing was rewritten left the grid
    listed as a placeholder (complete: false, no affine, no arrays) for good: the re-run found
    the grid complete and its closing mend looked at runs, maps and records only. Plain
    ``xarray.open_datatree`` then showed a grid without its affine."""
    argv = _local_commands(world)["convert"]
    counted = faults.run_command(argv(tmp_path / "ref.zarr"), tmp_path / "count")
    assert counted.code == 0, counted.output
    root = f"{tmp_path / 'ref.zarr'}/zarr.json"
    grid_done = max(k for k, (kind, target) in enumerate(counted.points, 1)
                    if kind == "LocalStore.set" and "/grids/" in target and target.count("/", target.index("/grids/")) == 3)
    k = next(k for k, (kind, target) in enumerate(counted.points, 1)
             if k > grid_done and kind == "LocalStore.set" and target == root)
    out = tmp_path / "killed.zarr"
    killed = faults.run_command(argv(out), tmp_path / "kill", kill_at=k,
                                env={"CHUNKGLM_PARTIAL_STALE_SECONDS": "0"})
    assert killed.code == faults.KILLED and killed.killed_at.endswith("killed.zarr/zarr.json"), killed.killed_at
    again = faults.run_command(argv(out), tmp_path / "again", env={"CHUNKGLM_PARTIAL_STALE_SECONDS": "0"})
    assert again.code == 0, again.output
    want = normalised(local_files(tmp_path / "ref.zarr"), str(tmp_path / "ref.zarr"))
    assert differences(normalised(local_files(out), str(out)), want) == []


class _Killed(BaseException):
    """Stands for the process dying (zarr removes its temporary file on an Exception only)."""


def test_a_convert_killed_before_renaming_its_record_into_place_leaves_no_partial_file(
        world, tmp_path, monkeypatch):
    """Found by the all-points matrix (CHUNKGLM_FAULT_MATRIX=all): a convert killed between writing
    its provenance record's document (zarr's ``zarr.<hex>.partial``) and renaming it left that file
    in ``_provenance/<record>/`` for good: the re-run's clean-up looked at the shared groups and
    the nodes, not at records. Now the stale file and the record's empty folder are removed.
    (In process, dying at that rename: the matrix's kill points move with the lock heartbeats'
    writes on a loaded machine, so a count taken from another run may land elsewhere.)"""
    import re

    reference, out = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    chunkglm.convert(world["bids"].root, reference, client=None)
    record, replace = re.compile(r"/_provenance/[^/]+/zarr\.json$"), os.replace

    def dies_at_the_record(src, dst, *args, **kwargs):
        if record.search(str(dst)):
            raise _Killed
        return replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", dies_at_the_record)
        with pytest.raises(_Killed):
            chunkglm.convert(world["bids"].root, out, client=None)
    assert list((out / "_provenance").glob("*/*.partial"))  # what the killed run left
    monkeypatch.setenv("CHUNKGLM_PARTIAL_STALE_SECONDS", "0")
    chunkglm.convert(world["bids"].root, out, client=None)
    assert not list((out / "_provenance").glob("*/*.partial"))
    assert all((folder / "zarr.json").exists() for folder in (out / "_provenance").iterdir() if folder.is_dir())
    want = normalised(local_files(reference), str(reference))
    assert differences(normalised(local_files(out), str(out)), want) == []


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
