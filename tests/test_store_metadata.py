"""Stores anyone can open fast (issue 17 item 11).

The root zarr.json carries consolidated metadata (one read lists the store,
local or S3), kept correct by merges under the store's lock while several
conversions write at once; plain ``xarray.open_datatree`` opens it without a
warning; text is zarr v3's ``string`` data type; every run has a ``voxel``
coordinate; an independent zarr v3 reader (tensorstore) reads a run's BOLD
array, crc32c codec included, exactly as chunkglm does.
"""

from __future__ import annotations

import json
import multiprocessing
import warnings

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from zarr.storage import LocalStore, LoggingStore

import chunkglm
from chunkglm.io import consolidated, layout as st
from chunkglm.io.cohort import Cohort
from chunkglm.testing import make_synthetic_bids


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("bids"), n_subjects=3, size="tiny", seed=4)


@pytest.fixture(scope="module")
def store(bids, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "cohort.zarr"
    chunkglm.convert(bids.root, path, task="main", client=None)
    return path


def _counted(path):
    return LoggingStore(LocalStore(str(path), read_only=True), log_level="CRITICAL")


def test_listing_a_store_is_one_read(store, bids):
    counted = _counted(store)
    cohort = Cohort(counted)
    assert sorted(cohort.runs) == sorted(r.name for r in bids.runs)
    assert cohort.grids and not cohort.incomplete
    assert counted.counter.get("get") == 1 and not counted.counter.get("list_dir")
    # the listed attributes are the node's own
    name = bids.runs[0].name
    assert cohort.runs[name].attrs == st.open_root(str(store))[f"runs/{name}"].attrs.asdict()


def test_plain_xarray_opens_the_store_without_a_warning(store, bids):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(store), engine="zarr")
        run = tree[f"runs/{bids.runs[0].name}"].dataset
        assert run["bold"].dims == ("time", "voxel")
        assert list(run["trial_type"].values) == list(chunkglm.open_cohort(store).runs[bids.runs[0].name]
                                                      .events["trial_type"])


def test_text_is_the_zarr_v3_string_type_and_voxel_a_flat_index(store, bids):
    node = st.open_root(str(store))[f"runs/{bids.runs[0].name}"]
    for name in ("trial_type", "confound"):
        document = json.loads((store / node.path / name / "zarr.json").read_text())
        assert document["data_type"] == "string"
        assert [c["name"] for c in document["codecs"]] == ["vlen-utf8", "zstd", "crc32c"]
    cohort = chunkglm.open_cohort(store)
    run = cohort.runs[bids.runs[0].name]
    voxel = run.to_dataset()["voxel"].values
    grid = run.grid
    np.testing.assert_array_equal(np.stack(np.unravel_index(voxel, grid.shape), axis=1), grid.ijk)
    np.testing.assert_array_equal(np.flatnonzero(grid.mask.ravel()), voxel)


def test_a_store_without_consolidated_metadata_is_read_and_consolidated_at_the_next_write(store, tmp_path, bids):
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    document = json.loads((old / "zarr.json").read_text())
    del document["consolidated_metadata"]
    (old / "zarr.json").write_text(json.dumps(document))
    counted = _counted(old)
    assert sorted(Cohort(counted).runs) == sorted(r.name for r in bids.runs)
    assert counted.counter["get"] > len(bids.runs)  # one per node: the store as written before
    root = st.open_root(str(old), mode="a")
    st.add_provenance(root, {"operation": "test"})
    counted = _counted(old)
    cohort = Cohort(counted)
    assert sorted(cohort.runs) == sorted(r.name for r in bids.runs) and counted.counter["get"] == 1
    assert "test" in [r.get("operation") for r in cohort.attrs["provenance"]]


def _merge_groups(path, worker, n):
    root = st.open_root(path, mode="a")
    for i in range(n):
        group = root.require_group("maps").create_group(f"w{worker}-{i}", attributes={
            st.ATTR: {"complete": True}, "grid_id": "none"})
        consolidated.merge(root, group.path)


def test_concurrent_merges_lose_no_entry(store, tmp_path):
    """Four processes each add five nodes and merge each at once: all twenty are listed
    (each merge reads the root under the store's lock, so none writes back an older listing)."""
    import shutil

    path = tmp_path / "shared.zarr"
    shutil.copytree(store, path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_merge_groups, args=(str(path), w, 5)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    listed = Cohort(str(path))._listing
    assert {f"maps/w{w}-{i}" for w in range(4) for i in range(5)} <= set(listed)


def _convert_subject(root, path, subject):
    chunkglm.convert(root, path, task="main", subjects=[subject], client=None)


def test_two_conversions_into_one_store_at_once_both_listed(bids, tmp_path):
    path = tmp_path / "two.zarr"
    chunkglm.convert(bids.root, path, task="main", subjects=["01"], client=None)  # grid written once
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_convert_subject, args=(str(bids.root), str(path), s))
               for s in ("02", "03")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
        assert worker.exitcode == 0
    counted = _counted(path)
    assert sorted(Cohort(counted).runs) == sorted(r.name for r in bids.runs)
    assert counted.counter["get"] == 1
    # the listing equals a consolidation from scratch
    listed = Cohort(str(path))._listing
    consolidated.consolidate(st.open_root(str(path), mode="a"))
    assert Cohort(str(path))._listing == listed


def test_a_replacement_is_listed_at_its_switch(bids, tmp_path):
    import os
    import shutil
    import time

    path, src = tmp_path / "replaced.zarr", tmp_path / "run.nii.gz"
    shutil.copyfile(bids.runs[0].bold_path, src)
    chunkglm.convert([src], path, client=None)
    shutil.copyfile(bids.runs[1].bold_path, src)  # a changed source: --overwrite replaces the node
    os.utime(src, ns=(time.time_ns(), time.time_ns()))
    chunkglm.convert([src], path, overwrite=True, client=None)
    counted = _counted(path)
    run = Cohort(counted).runs["run"]
    assert counted.counter["get"] == 1 and run.data_path == "runs/run/v-2"
    expected = np.asarray(nib.load(bids.runs[1].bold_path).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(run.data().values, expected.reshape(-1, expected.shape[-1]).T)


def test_listing_on_s3_is_one_request(bids, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/cohort.zarr"
    options = s3_server["storage_options"]
    chunkglm.convert(bids.root, url, task="main", storage_options=options, client=None)
    counted = LoggingStore(st.zarr_store(url, options, read_only=True), log_level="CRITICAL")
    cohort = Cohort(counted)
    assert sorted(cohort.runs) == sorted(r.name for r in bids.runs)
    assert counted.counter["get"] == 1 and not counted.counter.get("list_dir")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.open_datatree(st.zarr_store(url, options, read_only=True), engine="zarr")


def test_tensorstore_reads_a_run_bold_array_as_chunkglm_does(store, bids):
    ts = pytest.importorskip("tensorstore")
    run = chunkglm.open_cohort(store).runs[bids.runs[0].name]
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / run.data_path / "bold")}}
    array = ts.open(spec, read=True).result()
    document = json.loads((store / run.data_path / "bold" / "zarr.json").read_text())
    assert [c["name"] for c in document["codecs"]] == ["bytes", "blosc", "crc32c"]
    values = array.read().result()
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, run.data().values)  # the same bytes: exact


def test_a_listing_left_stale_by_a_killed_writer_is_mended_by_the_rerun(bids, tmp_path):
    """A conversion killed between a node's completion (or switch) and its merge leaves the
    listing without it; the same command run again lists it (the conversion's record merge
    compares each of its nodes' documents with the listing at its end)."""
    path = tmp_path / "stale.zarr"
    chunkglm.convert(bids.root, path, task="main", client=None)
    name = bids.runs[1].name
    root_document = json.loads((path / "zarr.json").read_text())
    entries = root_document["consolidated_metadata"]["metadata"]
    for key in [k for k in entries if k == f"runs/{name}" or k.startswith(f"runs/{name}/")]:
        del entries[key]
    (path / "zarr.json").write_text(json.dumps(root_document))
    assert name not in Cohort(str(path)).runs  # the listing is what readers trust
    report = chunkglm.convert(bids.root, path, task="main", client=None)
    assert f"runs/{name}" in report.skipped
    listed = Cohort(str(path))._listing
    assert name in Cohort(str(path)).runs
    consolidated.consolidate(st.open_root(str(path), mode="a"))
    assert Cohort(str(path))._listing == listed


def test_a_provenance_record_left_unlisted_by_a_killed_conversion_is_listed_by_the_rerun(bids, tmp_path):
    """Found by the kill-at-every-write matrix (tests/test_fault_matrix.py with
    CHUNKGLM_FAULT_MATRIX=all): a conversion cut after writing its provenance record but before
    merging it left the listing without the record for good (the record's group document is
    new, its parent's unchanged); the next conversion's mend looks for unlisted records by name."""
    path = tmp_path / "unlisted.zarr"
    chunkglm.convert(bids.root, path, task="main", client=None)
    root_document = json.loads((path / "zarr.json").read_text())
    entries = root_document["consolidated_metadata"]["metadata"]
    records = [k for k in entries if k.startswith(f"{st.PROVENANCE}/")]
    assert records
    for key in records:
        del entries[key]
    (path / "zarr.json").write_text(json.dumps(root_document))
    chunkglm.convert(bids.root, path, task="main", client=None)  # nothing to convert
    listed = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert set(records) <= set(listed)


# -- batched merges: one rewrite of the root per batch of nodes, not two per node ---------------


@pytest.fixture(scope="module")
def ten_runs(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("ten"), n_subjects=5, n_runs=2, size="tiny", seed=7)


def _count_rewrites(monkeypatch) -> list:
    """Every rewrite of a root document by this process (chunkglm.io.consolidated's one writer)."""
    rewrites = []
    write = consolidated._write_root

    def counted(zstore, document, entries):
        rewrites.append(len(entries))
        return write(zstore, document, entries)

    monkeypatch.setattr(consolidated, "_write_root", counted)
    return rewrites


def _full_consolidation_equals_listing(path) -> None:
    listed = Cohort(str(path))._listing
    consolidated.consolidate(st.open_root(str(path), mode="a"))
    assert Cohort(str(path))._listing == listed


@pytest.mark.parametrize("batch", [4, 100])
def test_a_conversion_rewrites_the_root_once_per_batch_of_nodes(ten_runs, tmp_path, monkeypatch, batch):
    """N runs: the grid's two merges, the new nodes listed incomplete (1), the ended nodes and the
    provenance record in ceil((N + 1) / batch) merges, nothing mended: O(N / batch), where every
    node's start and completion made 2 N + 3 before."""
    import math

    n_runs = len(ten_runs.runs)
    monkeypatch.setattr(consolidated, "BATCH_COUNT", batch)
    monkeypatch.setattr(consolidated, "BATCH_SECONDS", 3600.0)
    rewrites = _count_rewrites(monkeypatch)
    path = tmp_path / "batched.zarr"
    report = chunkglm.convert(ten_runs.root, path, task="main", client=None)
    assert len(report.converted) == n_runs == 10
    assert len(rewrites) == 2 + 1 + math.ceil((n_runs + 1) / batch)
    counted = _counted(path)
    cohort = Cohort(counted)
    assert sorted(cohort.runs) == sorted(r.name for r in ten_runs.runs) and not cohort.incomplete
    assert counted.counter["get"] == 1  # every node listed complete: no marker read from the store
    _full_consolidation_equals_listing(path)


def test_a_distributed_conversion_merges_in_batches_from_the_client(ten_runs, tmp_path, monkeypatch):
    """On a LocalCluster the workers merge nothing: the client lists the new nodes, then merges
    them as their tasks end (here every 3 nodes or 0.2 s), and lists them all before returning."""
    from distributed import Client, LocalCluster

    monkeypatch.setattr(consolidated, "BATCH_COUNT", 3)
    monkeypatch.setattr(consolidated, "BATCH_SECONDS", 0.2)
    rewrites = _count_rewrites(monkeypatch)
    path = tmp_path / "distributed.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        report = chunkglm.convert(ten_runs.root, path, task="main", client=client)
    assert len(report.converted) == 10
    # 2 (grid) + 1 (listed incomplete) + at most one per ended node (a due batch can hold one)
    # + the last; at least ceil(11 / 3) batches
    assert 3 + 4 <= len(rewrites) <= 3 + 10 + 1
    counted = _counted(path)
    assert sorted(Cohort(counted).runs) == sorted(r.name for r in ten_runs.runs)
    assert counted.counter["get"] == 1
    _full_consolidation_equals_listing(path)


def test_a_batch_is_merged_when_full_or_due(store, tmp_path):
    import shutil

    path = tmp_path / "batch.zarr"
    shutil.copytree(store, path)
    root = st.open_root(str(path), mode="a")
    now = [0.0]
    batch = consolidated.Batch(root, count=3, seconds=10.0, clock=lambda: now[0])
    paths = []
    for i in range(5):
        group = root.require_group("maps").create_group(f"b{i}", attributes={st.ATTR: {"complete": True}})
        paths.append(group.path)
    batch.add(paths[0])
    now[0] = 9.0
    batch.add(paths[1])
    batch.flush_if_due()
    assert batch.merges == 0 and batch.seconds_left() == pytest.approx(1.0)
    assert paths[0] not in Cohort(str(path))._listing
    now[0] = 10.0
    batch.flush_if_due()  # the oldest waited 10 s: both merged in one rewrite
    assert batch.merges == 1 and batch.seconds_left() is None
    assert {paths[0], paths[1]} <= set(Cohort(str(path))._listing)
    for p in paths[2:]:
        batch.add(p)  # the third fills the batch
    assert batch.merges == 2 and not batch.pending
    batch.flush()  # nothing pending: no rewrite
    assert batch.merges == 2 and set(paths) <= set(Cohort(str(path))._listing)


class _Killed(BaseException):
    """Stands for the process dying (not an Exception: nothing catches it on the way)."""


def test_a_conversion_killed_before_its_batch_merge(ten_runs, tmp_path, monkeypatch):
    """Cut after every node was written, before any batch merge: the listing still says the nodes
    are incomplete (plain xarray reads them marked incomplete), chunkglm's readers read their
    markers from the store and see them complete, ``chunkglm verify`` reports the listing (and
    ``--repair`` mends it), and the same conversion run again lists them (skipping every node)
    exactly as a full consolidation would."""
    import shutil

    path = tmp_path / "killed.zarr"

    def killed(self):
        raise _Killed

    with monkeypatch.context() as patched:
        patched.setattr(consolidated.Batch, "flush", killed)
        patched.setattr(consolidated, "BATCH_COUNT", 1000)
        with pytest.raises(_Killed):
            chunkglm.convert(ten_runs.root, path, task="main", client=None)
    names = sorted(r.name for r in ten_runs.runs)
    listing = Cohort(str(path))._listing
    assert all(listing[f"runs/{n}"] == st.INCOMPLETE for n in names)
    assert not any(k.startswith(f"runs/{names[0]}/") for k in listing)
    tree = xr.open_datatree(str(path), engine="zarr")  # a reader of the listing: marked incomplete
    assert tree[f"runs/{names[0]}"].attrs[st.ATTR] == {"complete": False}
    counted = _counted(path)
    cohort = Cohort(counted)
    assert sorted(cohort.runs) == names and not cohort.incomplete  # markers read from the store
    assert counted.counter["get"] > len(names)
    # chunkglm verify names the listing; --repair lists them again
    from chunkglm.io.verify import LISTING, repair_store, verify_store

    copy = tmp_path / "verified.zarr"
    shutil.copytree(path, copy)
    problems, _ = verify_store(str(copy))
    assert [p.node for p in problems] == [LISTING]  # 10 runs and the unlisted provenance record:
    assert "out of date for 11 node(s) (e.g. _provenance, runs/sub-01" in problems[0].message
    assert repair_store(str(copy), problems) == ([LISTING], {})
    assert verify_store(str(copy)) == ([], [])
    _full_consolidation_equals_listing(copy)
    report = chunkglm.convert(ten_runs.root, path, task="main", client=None)
    assert sorted(report.skipped) == [f"runs/{n}" for n in names] and not report.converted
    counted = _counted(path)
    assert sorted(Cohort(counted).runs) == names and counted.counter["get"] == 1
    _full_consolidation_equals_listing(path)


# -- writers read the root's own fields, not its listing: a task's open does not grow with the store


class _RootReads(st.CohortLocalStore):
    """The local store, counting the reads of the root document and their bytes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.root_reads, self.root_bytes = 0, 0

    async def get(self, key, prototype, byte_range=None):
        found = await super().get(key, prototype, byte_range)
        if key == "zarr.json" and found is not None:
            self.root_reads, self.root_bytes = self.root_reads + 1, self.root_bytes + len(found)
        return found


def _store_with_listed_nodes(store, path, n_listed: int, removed: str):
    """A copy of ``store`` without the node ``runs/<removed>``, whose root lists ``n_listed``
    more runs (each with a real run's document: the root grows as with converted runs)."""
    import shutil

    shutil.copytree(store, path)
    shutil.rmtree(path / "runs" / removed)
    root = st.open_root(str(path), mode="a")
    document = Cohort(str(path))._listing[f"runs/{removed}"]
    consolidated.merge_many(root, [f"runs/filler-{i:04d}" for i in range(n_listed)], listed_as=document)
    return path


def test_a_writer_task_reads_as_much_of_the_root_whatever_the_number_of_runs(store, bids, tmp_path):
    """A conversion task writing one run into a store listing 40 or 400 other runs reads the root
    document as often and as many bytes (its own fields, one bounded range per read), where it read
    the whole document -- a dozen times (its open, and zarr's parent check at each array) -- before."""
    from chunkglm.io.convert import plan_conversion
    from chunkglm.io.write_run import convert_run
    from chunkglm.io.writer_store import HEAD_BYTES

    job = next(j for j in plan_conversion(bids.root, task="main").runs if j.name == bids.runs[1].name)
    reads = {}
    for n_listed in (40, 400):
        path = _store_with_listed_nodes(store, tmp_path / f"listing-{n_listed}.zarr", n_listed, job.name)
        before = (path / "zarr.json").read_bytes()
        assert len(before) > HEAD_BYTES
        counted = _RootReads(str(path))
        result = convert_run(job, counted, listed=False)
        assert result["name"] == job.name
        assert (path / "zarr.json").read_bytes() == before  # the task merged nothing
        reads[n_listed] = (counted.root_reads, counted.root_bytes)
        assert counted.root_bytes <= counted.root_reads * HEAD_BYTES
        run = st.open_root(str(path))[f"runs/{job.name}"]
        assert st.is_complete(run)
    assert reads[40] == reads[400]


@pytest.mark.parametrize("layout", ["compact", "indented", "own fields over the range", "small"])
def test_the_root_head_is_the_root_without_its_listing(layout):
    """WriterStore's root document: the root's own fields whatever its size and layout (read whole
    when its own fields do not end within the bounded range, or when it is not laid out as
    chunkglm writes it)."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    from chunkglm.io.writer_store import HEAD_BYTES, WriterStore

    n_entries = 2 if layout == "small" else 200
    own = {"attributes": {st.ATTR: {"format": st.FORMAT_NAME, "note": '"consolidated_metadata": {'}},
           "zarr_format": 3, "node_type": "group"}
    if layout == "own fields over the range":
        own["attributes"]["legacy"] = ["x" * 100] * (HEAD_BYTES // 50)
    listing = {"kind": "inline", "must_understand": False,
               "metadata": {f"runs/r{i}": {"node_type": "group", "attributes": {"pad": "y" * 600}}
                            for i in range(n_entries)}}
    document = {**own, consolidated.KEY: listing}
    text = json.dumps(document, indent=2) if layout == "indented" else json.dumps(document, separators=(",", ":"))
    memory = MemoryStore()
    prototype = default_buffer_prototype()
    asyncio.run(memory.set("zarr.json", prototype.buffer.from_bytes(text.encode())))
    assert (len(text) > HEAD_BYTES) == (layout != "small")
    found = asyncio.run(WriterStore(memory).get("zarr.json", prototype))
    assert json.loads(found.to_bytes()) == own
    # the merges still read the whole document
    assert consolidated.read_root(WriterStore(memory)) == document
