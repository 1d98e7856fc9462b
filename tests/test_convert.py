"""Conversion into the cohort store, and the round trip back to NIfTI.

Exactness: the store keeps float32 values equal to nibabel's scaled values
(``np.asarray(img.dataobj, dtype=np.float32)``), so comparisons are exact.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import chunkglm
from chunkglm.chunking import plan_voxel_chunks
from chunkglm.io.layout import open_root


def _scaled(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def _union_mask(dataset) -> np.ndarray:
    masks = [np.asarray(nib.load(r.mask_path).dataobj) != 0 for r in dataset.runs]
    return np.logical_or.reduce(masks)


@pytest.fixture(scope="module")
def tiny_store(tiny_bids, tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "cohort.zarr"
    report = chunkglm.convert(tiny_bids.root, store, task="main", space="MNI152NLin2009cAsym")
    return store, report


def test_bids_conversion_values_equal_nibabel_inside_the_union_mask(tiny_bids, tiny_store):
    store, report = tiny_store
    cohort = chunkglm.open_cohort(store)
    assert sorted(cohort.runs) == sorted(r.name for r in tiny_bids.runs)
    assert report.converted and not report.skipped
    mask = _union_mask(tiny_bids)
    for run in tiny_bids.runs:
        node = cohort.runs[run.name]
        grid = node.grid
        np.testing.assert_array_equal(grid.mask, mask)
        np.testing.assert_allclose(grid.affine, tiny_bids.affine)
        bold = node.data().values
        np.testing.assert_array_equal(bold, _scaled(run.bold_path)[mask].T)


def test_voxel_axis_is_c_order_over_the_mask(tiny_bids, tiny_store):
    cohort = chunkglm.open_cohort(tiny_store[0])
    grid = next(iter(cohort.runs.values())).grid
    np.testing.assert_array_equal(grid.ijk, np.argwhere(grid.mask))


def test_events_confounds_and_sidecar_are_stored_with_the_run(tiny_bids, tiny_store):
    cohort = chunkglm.open_cohort(tiny_store[0])
    run = tiny_bids.runs[0]
    node = cohort.runs[run.name]
    events = pd.read_csv(run.events_path, sep="\t")
    pd.testing.assert_frame_equal(node.events[events.columns.tolist()], events, check_dtype=False)
    confounds = pd.read_csv(run.confounds_path, sep="\t", na_values="n/a")
    stored = node.confounds
    assert list(stored.columns) == list(confounds.columns)
    np.testing.assert_array_equal(stored.to_numpy(), confounds.to_numpy(dtype=float))
    assert np.isnan(stored["framewise_displacement"].iloc[0])  # fMRIPrep's first-row NaN kept
    sidecar = pd.read_json(run.sidecar_path, typ="series")
    assert node.attrs["RepetitionTime"] == pytest.approx(sidecar["RepetitionTime"])
    assert node.attrs["slice_time_ref"] == pytest.approx(sidecar["StartTime"] / sidecar["RepetitionTime"])
    assert node.attrs["subject"] == run.subject and node.attrs["task"] == "main"
    times = node.to_dataset()["time"].values
    np.testing.assert_allclose(times, np.arange(tiny_bids.n_volumes) * tiny_bids.tr)


def test_store_opens_with_plain_xarray(tiny_store, tiny_bids):
    tree = xr.open_datatree(tiny_store[0], engine="zarr", zarr_format=3, consolidated=False)
    run = tiny_bids.runs[0]
    assert tree[f"runs/{run.name}"].dataset["bold"].dims == ("time", "voxel")
    assert tree["grids"].children


def test_round_trip_to_nifti_is_bit_exact(tiny_bids, tiny_store, tmp_path):
    cohort = chunkglm.open_cohort(tiny_store[0])
    run = tiny_bids.runs[1]
    out = cohort.to_nifti(f"runs/{run.name}", tmp_path / "back.nii.gz")
    back, orig = nib.load(tmp_path / "back.nii.gz"), nib.load(run.bold_path)
    mask = cohort.runs[run.name].grid.mask
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32)[mask], _scaled(run.bold_path)[mask])
    _assert_same_geometry(back, orig)
    assert out.shape == orig.shape


def _assert_same_geometry(back, orig):
    np.testing.assert_array_equal(back.affine, orig.affine)
    for field in ("qform_code", "sform_code", "xyzt_units", "dim"):
        np.testing.assert_array_equal(back.header[field], orig.header[field])
    np.testing.assert_array_equal(back.header.get_qform(), orig.header.get_qform())
    np.testing.assert_array_equal(back.header.get_sform(), orig.header.get_sform())
    assert back.header.get_zooms() == orig.header.get_zooms()  # includes TR


def test_real_images_round_trip_bit_exact(real_images, tmp_path):
    store = tmp_path / "real.zarr"
    chunkglm.convert(real_images, store)
    cohort = chunkglm.open_cohort(store)
    for path in real_images:
        name = path.name.split(".")[0]
        cohort.to_nifti(name, tmp_path / f"{name}.nii.gz")
        back, orig = nib.load(tmp_path / f"{name}.nii.gz"), nib.load(path)
        np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), _scaled(path))
        _assert_same_geometry(back, orig)
    # nipy's functional.nii.gz is int16 with scl_slope/scl_inter: scaling was applied.
    assert cohort.runs["functional"].attrs["scl_slope"] != 1.0


def test_int16_scaled_runs_with_sessions(tiny_bids_sessions, tmp_path):
    store = tmp_path / "ses.zarr"
    chunkglm.convert(tiny_bids_sessions.root, store, task="main")
    cohort = chunkglm.open_cohort(store)
    assert len(cohort.runs) == 8
    run = tiny_bids_sessions.runs[-1]
    assert "ses-2" in run.name and nib.load(run.bold_path).header.get_slope_inter()[0] != 1
    node = cohort.runs[run.name]
    np.testing.assert_array_equal(node.data().values, _scaled(run.bold_path)[node.grid.mask].T)
    assert len(cohort.select(sub="01", ses="ses-2")) == 2
    assert len(cohort.select(sub=["01", "02"], run=1)) == 4
    with pytest.raises(chunkglm.errors.InputError, match="unknown BIDS entities"):
        cohort.select(subject="01")


@pytest.mark.parametrize("chunk_bytes", [2_000, 50_000, "64MiB"])
@pytest.mark.parametrize("task_memory", [3_000, "2GiB"])  # 3 kB forces the streaming path
def test_every_chunking_and_both_write_paths_give_the_same_store(tiny_bids, tiny_store, tmp_path,
                                                                 chunk_bytes, task_memory):
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids.root, store, chunk_bytes=chunk_bytes, task_memory=task_memory)
    ref = chunkglm.open_cohort(tiny_store[0])
    new = chunkglm.open_cohort(store)
    for name, node in new.runs.items():
        arr = open_root(store)[f"runs/{name}/bold"]
        plan = plan_voxel_chunks(*arr.shape, 4, chunk_bytes)
        assert arr.chunks == plan.chunks
        assert "_staging" not in open_root(store)[f"runs/{name}"]
        np.testing.assert_array_equal(node.data().values, ref.runs[name].data().values)


def test_explicit_3d_images_become_a_maps_collection(tiny_bids, tmp_path):
    vols = []
    for i, run in enumerate(tiny_bids.runs):
        img = nib.load(run.bold_path)
        vol = nib.Nifti1Image(np.asarray(img.dataobj)[..., i], img.affine, img.header)
        vols.append(tmp_path / f"sub-{run.subject}_effect.nii.gz")
        nib.save(vol, vols[-1])
    store = tmp_path / "maps.zarr"
    chunkglm.convert(vols, store, collection="effects", map_type="effect",
                     mask_img=str(tiny_bids.runs[0].mask_path))
    node = chunkglm.open_cohort(store).maps["effects"]
    ds = node.to_dataset()
    assert ds["effect"].dims == ("image", "voxel")
    assert list(ds["subject"].values) == [r.subject for r in tiny_bids.runs]
    mask = np.asarray(nib.load(tiny_bids.runs[0].mask_path).dataobj) != 0
    for row, path in enumerate(vols):
        np.testing.assert_array_equal(ds["effect"].values[row], _scaled(path)[mask])
    img = node.to_nifti(tmp_path / "stack.nii.gz")
    assert img.shape == (*tiny_bids.shape, len(vols))
    # the mask as an image in memory stores the same voxels
    in_memory = tmp_path / "maps-mask-image.zarr"
    chunkglm.convert(vols, in_memory, collection="effects", map_type="effect",
                     mask_img=nib.load(tiny_bids.runs[0].mask_path))
    np.testing.assert_array_equal(
        chunkglm.open_cohort(in_memory).maps["effects"].to_dataset()["effect"].values, ds["effect"].values)


def test_conversion_on_a_real_local_cluster_equals_in_process(tiny_bids, tiny_store, tmp_path):
    from chunkglm.cluster import start

    store = tmp_path / "dist.zarr"
    with start(n_workers=2, dashboard_address=":0", verbose=False) as client:
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        report = chunkglm.convert(tiny_bids.root, store, client=client)
    assert len(pids) == 2  # two real worker processes
    assert len(report.converted) == len(tiny_bids.runs)
    ref, new = chunkglm.open_cohort(tiny_store[0]), chunkglm.open_cohort(store)
    for name, node in new.runs.items():
        np.testing.assert_array_equal(node.data().values, ref.runs[name].data().values)


def test_provenance_lists_inputs_with_sha256(tiny_bids, tiny_store):
    import hashlib

    meta = chunkglm.open_cohort(tiny_store[0]).attrs
    assert meta["format"] == "chunkglm-cohort" and meta["chunkglm_version"] == chunkglm.__version__
    record = meta["provenance"][-1]
    assert record["operation"] == "convert" and record["options"]["task"] == "main"
    by_node = {i["node"]: i for i in record["inputs"]}
    for run in tiny_bids.runs:
        digest = hashlib.sha256(run.bold_path.read_bytes()).hexdigest()
        assert by_node[f"runs/{run.name}"]["sha256"] == digest


def test_reconversion_of_a_complete_store_is_a_no_op(tiny_bids, tmp_path):
    store = tmp_path / "again.zarr"
    chunkglm.convert(tiny_bids.root, store)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    report = chunkglm.convert(tiny_bids.root, store)
    after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert report.converted == [] and len(report.skipped) == len(tiny_bids.runs)
    assert before == after  # not a single byte rewritten


def test_events_columns_that_collide_with_run_variables_survive(tiny_bids, tmp_path):
    import shutil

    root = tmp_path / "bids"
    shutil.copytree(tiny_bids.root, root)
    run = tiny_bids.runs[0]
    events_path = root / run.events_path.relative_to(tiny_bids.root)
    events = pd.read_csv(events_path, sep="\t")
    events["time"] = np.arange(len(events), dtype=float)  # collides with the time axis
    events["event_type"] = "x"  # looks like a prefixed name, is not one
    events.to_csv(events_path, sep="\t", index=False)
    store = tmp_path / "c.zarr"
    chunkglm.convert(root, store, subjects=run.subject)
    stored = chunkglm.open_cohort(store).runs[run.name].events
    pd.testing.assert_frame_equal(stored[events.columns.tolist()], events, check_dtype=False)


def test_a_touched_or_copied_source_with_the_same_content_is_not_redone(tiny_bids, tmp_path):
    import os

    store = tmp_path / "touch.zarr"
    chunkglm.convert(tiny_bids.root, store, subjects="01")
    bold = tiny_bids.runs[0].bold_path
    stat = bold.stat()
    try:
        os.utime(bold, (stat.st_atime, stat.st_mtime + 100))
        report = chunkglm.convert(tiny_bids.root, store, subjects="01")
    finally:
        os.utime(bold, (stat.st_atime, stat.st_mtime))
    assert report.converted == [] and report.skipped == [f"runs/{tiny_bids.runs[0].name}"]


def _start_run_node(path, index, barrier, results):
    import zarr

    from chunkglm.io import layout as st

    root = zarr.open_group(path, mode="r+")
    barrier.wait()
    try:
        st.start_node(root, "runs", f"sub-{index:02d}_task-main_run-1")
        results.put(None)
    except Exception as error:  # reported to the test
        results.put(repr(error))


def test_runs_started_at_once_by_several_processes_on_a_fresh_store_all_succeed(tmp_path):
    """Worker processes converting the first runs of a new store race to create ``runs/``:
    every one must get its node (seen failing in CI as ContainsGroupError). Without the
    guard about 3 attempts in 10 fail, so 10 attempts of 4 processes catch it ~97% of the time."""
    import multiprocessing

    import zarr

    context = multiprocessing.get_context("fork")
    for attempt in range(10):
        path = str(tmp_path / f"s{attempt}.zarr")
        zarr.open_group(path, mode="w")
        barrier, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_start_run_node, args=(path, i, barrier, results))
                     for i in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        errors = [results.get(timeout=10) for _ in processes]
        assert errors == [None] * 4, errors
        assert len(list(zarr.open_group(path, mode="r")["runs"].group_keys())) == 4


def test_concurrent_conversions_keep_every_provenance_record(tmp_path):
    """Four conversions into one store at once (one subject each, separate processes): every
    run written and every conversion's record kept (each record is a group of its own; the old
    single root list was rewritten by each, keeping 1 of 4)."""
    import subprocess
    import sys

    from chunkglm.testing import make_synthetic_bids

    data = make_synthetic_bids(tmp_path / "bids", n_subjects=5, size="tiny", seed=4)
    store = tmp_path / "c.zarr"
    chunkglm.convert(data.root, store, subjects=["01"])  # the store exists before the race
    code = "import sys, chunkglm; chunkglm.convert(sys.argv[1], sys.argv[2], subjects=[sys.argv[3]])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data.root), str(store), sub])
             for sub in ("02", "03", "04", "05")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    cohort = chunkglm.open_cohort(store)
    assert sorted(n.split("_")[0] for n in cohort.runs) == [f"sub-0{i}" for i in range(1, 6)]
    records = cohort.attrs["provenance"]
    assert len(records) == 5 and all(r["operation"] == "convert" for r in records)


def test_a_conversion_writes_no_temporary_file_for_documents_that_exist(tiny_bids, tmp_path, monkeypatch):
    """zarr writes each parent group's zarr.json 'if not exists' at every array creation; zarr's
    LocalStore did that with a temporary file linked into place (and removed when the document
    existed), so a worker killed there left ``runs/zarr.<hex>.partial`` in a finished store (the
    distributed kill test). The store chunkglm opens looks first: no such write at all."""
    import zarr.storage._local as zarr_local

    original, pointless = zarr_local._put, []

    def put(path, value, exclusive=False):
        if exclusive and path.exists():
            pointless.append(str(path.relative_to(tmp_path)))
        return original(path, value, exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    chunkglm.convert(tiny_bids.root, tmp_path / "s.zarr", client=None)
    assert pointless == []
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
