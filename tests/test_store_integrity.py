"""Silent data loss, ruled out: re-run conversion tasks, incomplete nodes, damaged chunks.

- A conversion task run twice (dask re-runs a task whose worker died after it
  finished) never deletes the complete node; a replacement is staged and
  swapped in, so a failure half-way through it keeps the old version.
- Selections that hit an incomplete run refuse, naming it; --allow-incomplete
  skips it and says so.
- A deleted or altered chunk file makes every read fail with one line naming
  the run and the chunk (never zeros); ``chunkglm verify`` finds both, and
  ``--repair`` restores a bitwise-identical store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import chunkglm
from chunkglm.errors import StoreError
from chunkglm.io import consolidated, layout as st
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import plan_conversion
from chunkglm.io.write_run import convert_run
from chunkglm.testing import make_synthetic_bids

RUN = "sub-01_task-main_run-1"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("integrity") / "bids", n_subjects=2, size="tiny", seed=3)


@pytest.fixture
def store(bids, tmp_path):
    """A fresh store; 64 KiB chunks give each tiny run 2 bold chunks."""
    path = tmp_path / "store.zarr"
    chunkglm.convert(bids.root, path, chunk_bytes=2**16)
    return path


def _job(bids, name=RUN):
    plan = plan_conversion(bids.root, chunk_bytes=2**16)
    return next(job for job in plan.runs if job.name == name)


def _files(node_dir: Path) -> dict:
    """Every file of a node: path -> (inode, mtime_ns, bytes)."""
    return {str(p.relative_to(node_dir)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(node_dir.rglob("*")) if p.is_file()}


def _arrays(path) -> dict:
    """Every array of every node's current version (what readers read)."""
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for kind in ("grids", "runs"):
        for node in root[kind].group_keys():
            data = st.data_path(f"{kind}/{node}", st.node_meta(root[f"{kind}/{node}"]))
            out.update({f"{kind}/{node}/{name}": array[...] for name, array in root[data].arrays()})
    return out


def _bold_chunk(store, name=RUN, index=1) -> Path:
    return sorted(p for p in (store / "runs" / name / "bold" / "c").rglob("*") if p.is_file())[index]


# -- 1. a conversion task run again never deletes a complete node ------------------------------


def test_a_task_run_twice_returns_the_complete_node_untouched(bids, store):
    job = _job(bids)
    before = _files(store / "runs" / RUN)
    result = convert_run(job, str(store))  # what dask does when the worker holding the result died
    assert result["name"] == RUN and result["shape"][0] == 40
    assert _files(store / "runs" / RUN) == before  # not one file deleted or rewritten
    assert RUN in open_cohort(store).runs


def test_a_replacement_that_fails_half_way_keeps_the_complete_node(bids, store, monkeypatch):
    from chunkglm.io import write_run

    expected = open_cohort(store).runs[RUN].data().values

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(write_run, "write_rows", broken)
    with pytest.raises(OSError, match="simulated"):
        convert_run(_job(bids), str(store), replace=True)
    cohort = open_cohort(store)
    assert cohort.incomplete == []  # the complete version was never deleted
    np.testing.assert_array_equal(cohort.runs[RUN].data().values, expected)


def test_a_replacement_is_swapped_in_complete_and_equal(bids, store):
    before = _arrays(store)
    convert_run(_job(bids), str(store), replace=True)
    assert open_cohort(store).incomplete == []
    after = _arrays(store)
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_convert_reports_only_nodes_that_are_complete(bids, tmp_path, monkeypatch):
    """A node its task reported but that is incomplete at the end is a failure, not 'converted'."""
    from chunkglm.io import convert as conversion
    from chunkglm.errors import ConversionError

    real = conversion._task

    def task_then_lost(kind, job, *args):
        out = real(kind, job, *args)
        if job.name == RUN:  # what a re-run that deleted the node left behind
            root = st.open_root(args[0], mode="a")
            root[f"runs/{RUN}"].attrs.put({st.ATTR: {"complete": False}})
        return out

    monkeypatch.setattr(conversion, "_task", task_then_lost)
    with pytest.raises(ConversionError, match=f"runs/{RUN}: its task reported success but the node is not complete"):
        chunkglm.convert(bids.root, tmp_path / "s.zarr", chunk_bytes=2**16, client=None)


# -- 2. incomplete nodes are refused, named, or skipped on request -----------------------------


def _make_incomplete(store, name=RUN):
    root = st.open_root(str(store), mode="a")
    root[f"runs/{name}"].attrs.put({st.ATTR: {"complete": False}})
    # as a writer leaves it: its change merged into the root's listing (a listing left stale
    # is caught at the node's own read: tests/test_store_metadata.py)
    consolidated.merge(root, f"runs/{name}")


def test_first_level_from_bids_refuses_a_store_with_an_incomplete_run(store):
    from chunkglm.glm.first_level import first_level_from_bids

    _make_incomplete(store)
    with pytest.raises(StoreError, match=rf"runs/{RUN}.*Re-run `chunkglm convert`.*allow_incomplete=True"):
        first_level_from_bids(store, "main")
    with pytest.warns(UserWarning, match=f"skipping incomplete node.*runs/{RUN}"):
        models, runs, _, _ = first_level_from_bids(open_cohort(store, allow_incomplete=True), "main")
    assert [m.subject_label for m in models] == ["02"]


def test_incomplete_nodes_are_named_when_asked_for(store):
    _make_incomplete(store)
    cohort = open_cohort(store)
    with pytest.raises(StoreError, match=f"runs/{RUN}.*incomplete"):
        cohort.runs[RUN]
    with pytest.raises(StoreError, match=f"runs/{RUN}.*incomplete"):
        cohort.node(f"runs/{RUN}")


def test_cli_first_level_refuses_an_incomplete_run_and_skips_it_on_request(store, tmp_path):
    _make_incomplete(store)
    args = ("first-level", store, "--task", "main", "-c", "aMinusB=a - b", "--cluster", "none", "--no-progress")
    refused = _cli(*args, "-o", tmp_path / "out1")
    assert refused.returncode == 2, refused.stderr
    assert f"runs/{RUN}" in refused.stderr and "--allow-incomplete" in refused.stderr
    assert not list((tmp_path / "out1").rglob("sub-02"))  # nothing fitted
    allowed = _cli(*args, "-o", tmp_path / "out2", "--allow-incomplete")
    assert allowed.returncode == 0, allowed.stderr
    assert f"skipped incomplete node runs/{RUN} (--allow-incomplete)" in allowed.stderr
    subjects = {p.name for p in (tmp_path / "out2").rglob("sub-*") if p.is_dir()}  # sub-XX/ or first_level/sub-XX/
    assert "sub-02" in subjects and "sub-01" not in subjects


# -- 3. damaged chunks fail every read, naming the run and the chunk ---------------------------


def test_a_deleted_chunk_fails_reads_naming_run_and_chunk(store, tmp_path):
    from chunkglm.glm.first_level import FirstLevelModel
    from chunkglm.glm.first_level import first_level_from_bids

    chunk = _bold_chunk(store)
    chunk.unlink()
    key = f"bold/c/{chunk.parent.name}/{chunk.name}"
    back = _cli("to-nifti", store, RUN, tmp_path / "back.nii.gz")
    assert back.returncode == 2 and f"runs/{RUN}: chunk {key} is missing" in back.stderr
    assert not (tmp_path / "back.nii.gz").exists()
    models, runs, events, _ = first_level_from_bids(store, "main", sub_labels=["01"], noise_model="ols")
    model = models[0].fit(runs[0], events=events[0])
    assert isinstance(model, FirstLevelModel)
    with pytest.raises(StoreError, match=f"runs/{RUN}: chunk {key} is missing"):
        model.compute_contrast("a - b")
    fl = _cli("first-level", store, "-o", tmp_path / "out", "--task", "main", "-c", "aMinusB=a - b",
              "--cluster", "none", "--no-progress")
    assert fl.returncode != 0 and f"runs/{RUN}: chunk {key} is missing" in fl.stderr


def test_a_flipped_byte_fails_reads_naming_run_and_chunk(store, tmp_path):
    chunk = _bold_chunk(store, index=0)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    key = f"bold/c/{chunk.parent.name}/{chunk.name}"
    back = _cli("to-nifti", store, RUN, tmp_path / "back.nii.gz")
    assert back.returncode == 2 and f"runs/{RUN}: chunk {key} fails its crc32c checksum" in back.stderr
    with pytest.raises(StoreError, match=f"chunk {key} fails its crc32c"):
        open_cohort(store).runs[RUN].data().values


def test_verify_finds_both_damages_and_repair_restores_the_store_bitwise(store):
    clean = _cli("verify", store)
    assert clean.returncode == 0 and "clean" in clean.stdout
    before = _arrays(store)
    _bold_chunk(store, index=1).unlink()
    other = _bold_chunk(store, "sub-02_task-main_run-1", index=0)
    data = bytearray(other.read_bytes())
    data[-10] ^= 0x80
    other.write_bytes(bytes(data))
    found = _cli("verify", store)
    assert found.returncode == 2
    lines = found.stdout.splitlines()
    assert any(f"runs/{RUN}: chunk bold/c/0/1 is missing" in line for line in lines), found.stdout
    assert any("runs/sub-02_task-main_run-1: chunk bold/c/0/0 fails its crc32c" in line for line in lines)
    repaired = _cli("verify", store, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"repaired: runs/{RUN}" in repaired.stdout
    after = _arrays(store)
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert _cli("verify", store).returncode == 0


def test_repair_refuses_a_changed_source_and_says_so(bids, tmp_path):
    import shutil

    source = tmp_path / "bids"
    shutil.copytree(bids.root, source)
    store = tmp_path / "s.zarr"
    chunkglm.convert(source, store, chunk_bytes=2**16)
    _bold_chunk(store).unlink()
    bold = Path(st.node_meta(zarr.open_group(str(store), mode="r")[f"runs/{RUN}"])["source"]["path"])
    with open(bold, "ab") as handle:  # the input changed since the conversion
        handle.write(b"\0")
    result = _cli("verify", store, "--repair")
    assert result.returncode == 2
    assert f"cannot repair runs/{RUN}: source {bold} changed" in result.stdout


def test_chunks_carry_a_crc32c_and_the_marker_an_inventory(store):
    root = zarr.open_group(str(store), mode="r")
    group = root[f"runs/{RUN}"]
    inventory = st.node_meta(group)["arrays"]
    assert inventory["bold"] == {"objects": 2, "crc32c": True, "inner": 0}
    for name, array in group.arrays():
        assert type(array.compressors[-1]).__name__ == "Crc32cCodec", name
        stored = [p for p in (store / "runs" / RUN / name / "c").rglob("*") if p.is_file()]
        assert inventory[name]["objects"] == len(stored), name


def test_stores_without_inventory_still_read(store, tmp_path):
    """Nodes written before inventories (old chunkglm) read as before; verify notes them."""
    root = st.open_root(str(store), mode="a")
    attrs = root[f"runs/{RUN}"].attrs.asdict()
    attrs[st.ATTR] = {k: v for k, v in attrs[st.ATTR].items() if k != "arrays"}
    root[f"runs/{RUN}"].attrs.put(attrs)
    consolidated.merge(root, f"runs/{RUN}")  # listed as written (verify reports a stale listing)
    values = open_cohort(store).runs[RUN].data().values
    assert values.shape == (40, open_cohort(store).runs[RUN].grid.n_voxels)
    result = _cli("verify", store)
    assert result.returncode == 0 and f"note: runs/{RUN}: written without a chunk inventory" in result.stdout


def test_a_worker_lost_after_its_task_finished_loses_no_run(bids, tmp_path):
    """A real (in-process) cluster: the worker holding the first finished run's result is
    closed while convert collects results, so dask runs that task again. convert returns
    only after the re-run, and every run it reports is complete and readable."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        closed, snapshot = [], {}

        def progress(done, total, node):
            if closed:
                return
            snapshot[node] = _files(tmp_path / "s.zarr" / node)  # complete: its task has finished
            holders = {w for key, ws in client.who_has().items() if node.split("/")[1] in str(key) for w in ws}
            for worker in cluster.workers.values():
                if worker.address in holders:
                    closed.append(worker.address)
                    cluster.sync(worker.close)

        report = chunkglm.convert(bids.root, tmp_path / "s.zarr", chunk_bytes=2**16, client=client,
                                  progress=progress)
        assert closed  # the scenario happened
        (node, files), = snapshot.items()
        assert _files(tmp_path / "s.zarr" / node) == files  # the re-run did not rewrite it
        assert not any(str(k).startswith("convert-") for k in client.processing().get(closed[0], []))
    cohort = open_cohort(tmp_path / "s.zarr")
    assert cohort.incomplete == []
    assert sorted(report.converted) == sorted(f"runs/{n}" for n in cohort.runs)
    for node in cohort.runs.values():
        assert np.isfinite(node.data().values).all()
