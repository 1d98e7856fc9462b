"""Fault tolerance with real processes: killed workers, a killed client, memory limits.

Nothing is simulated: worker processes of a real LocalCluster are SIGKILLed
while they run fit tasks, the ``chunkglm first-level`` command is SIGKILLed
(with its whole process group) half-way, and a worker is run under a memory
limit its task cannot fit in, so that the nanny kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

import chunkglm
from chunkglm.glm.first_level import first_level_from_bids
from chunkglm.testing import make_synthetic_bids

CONTRASTS = ("-c", "aMinusB=a - b", "-c", "effects=a; b")


def _cli(*args, env=None, **kwargs):
    return [sys.executable, "-m", "chunkglm.cli.main", *map(str, args)], {**os.environ, **(env or {})}


def _maps(folder: Path) -> dict[str, np.ndarray]:
    """Every NIfTI map under ``folder`` (relative path -> data)."""
    return {str(p.relative_to(folder)): np.asarray(nib.load(p).dataobj)
            for p in sorted(folder.rglob("*.nii.gz")) if "cohort.zarr" not in p.parts}


def _assert_same_maps(got: Path, expected: Path) -> None:
    a, b = _maps(got), _maps(expected)
    assert sorted(a) == sorted(b) and a
    for name in b:  # same inputs, same blocks, same summation order: bitwise equal
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# -- a worker killed mid-analysis -------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """Two subjects of "small" runs (~20k voxels x 120 volumes) in 1 MiB chunks: 9 blocks a run."""
    tmp = tmp_path_factory.mktemp("ft_small")
    dataset = make_synthetic_bids(tmp / "bids", n_subjects=2, size="small", seed=5)
    chunkglm.convert(dataset.root, tmp / "store.zarr", chunk_bytes=2**20)
    return tmp / "store.zarr"


def _contrast_maps(store) -> list[np.ndarray]:
    models, runs, events, confounds = first_level_from_bids(store, "main")
    for model, run_list, ev in zip(models, runs, events):
        model.fit(run_list, events=ev)
    maps = []
    for model in models:
        images = model.compute_contrast("a - b", output_type="all")
        maps += [np.asarray(images[k].dataobj) for k in sorted(images)]
    return maps


def _busy_worker(client, timeout=60.0) -> str:
    """Wait until fit tasks run on a worker while others are done; return its address."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processing = {w: keys for w, keys in client.processing().items() if keys}
        done = client.run_on_scheduler(
            lambda dask_scheduler: sum(ts.state == "memory" for ts in dask_scheduler.tasks.values()))
        if processing and done:
            return next(iter(processing))
        time.sleep(0.005)
    pytest.fail("no task was seen running on a worker")


def test_a_worker_killed_mid_analysis_changes_nothing(small_store):
    from chunkglm.cluster import start

    with start(n_workers=2, dashboard_address=None, verbose=False) as client:
        expected = _contrast_maps(small_store)  # undisturbed, same cluster
        pids = client.run(os.getpid)
        result, errors = [], []

        def analysis():
            try:
                result.extend(_contrast_maps(small_store))
            except BaseException as err:  # reported below
                errors.append(err)

        thread = threading.Thread(target=analysis)
        thread.start()
        victim = _busy_worker(client)
        os.kill(pids[victim], signal.SIGKILL)
        assert thread.is_alive()  # killed while the analysis was running
        thread.join(timeout=120)
        assert not thread.is_alive() and not errors, errors
        assert victim not in client.scheduler_info()["workers"]
        removed = [msg for _, msg in client.get_events(victim) if msg.get("action") == "remove-worker"]
        # the scheduler lost running tasks or computed results with it, and redid them
        assert removed and (removed[0]["processing-tasks"] or removed[0]["lost-computed-tasks"])
    assert len(result) == len(expected)
    for got, want in zip(result, expected):
        np.testing.assert_array_equal(got, want)


def test_task_keys_map_to_their_run_and_voxel_block(small_store):
    from chunkglm.graph.faults import _fit_graph, locate_task

    models, runs, events, _ = first_level_from_bids(small_store, "main")
    model = models[1].fit(runs[1], events=events[1])
    run = model._runs[0]
    graph = _fit_graph(run)
    chunk = next(k for k in graph if isinstance(k, tuple) and k[-1] == 3)
    grand_mean = next(k for k in graph if isinstance(k, str) and k.startswith("_global_mean"))
    bounds = np.cumsum([0, *run.block_sizes])
    where = locate_task(models, run.fits[4].key)  # the AR(1) refit of block 4 (0-based)
    assert len(run.block_sizes) > 5 and where["n_blocks"] == len(run.block_sizes)
    assert where["run"] == runs[1][0].name and where["block"] == 4
    assert where["voxels"] == (bounds[4], bounds[5])
    assert locate_task(models, chunk)["block"] == 3
    assert locate_task(models, grand_mean)["block"] is None  # a run-level reduction
    assert locate_task(models, "not-a-task") is None


# -- the client killed mid-analysis ---------------------------------------------------


def _first_level(dataset, out, *extra):
    """The command on a real local cluster (one worker process, no dashboard)."""
    return _cli("first-level", dataset.root, "-o", out, "--task", "main", *CONTRASTS, *extra,
                env={"CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "1",
                     "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "null"})


def _marker(out: Path, sub: str) -> Path:
    """The subject's completion record, beside its files (the default --layout glm)."""
    return out / "first_level" / f"sub-{sub}" / f"sub-{sub}_task-main_provenance.json"


def _kill_group_after_first_subject(command, env, out, timeout=180.0) -> int:
    """Run the command in its own process group; SIGKILL the group once sub-01 is complete."""
    proc = subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _marker(out, "01").is_file():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return proc.pid
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pytest.fail("the command ended before its first subject was complete")


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _files_with_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_killed_command_resumes_without_redoing_complete_subjects(tiny_bids, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    command, env = _first_level(tiny_bids, reference, "--cluster", "none")  # in-process: faster
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    command, env = _first_level(tiny_bids, out)
    pgid = _kill_group_after_first_subject(command, env, out)
    deadline = time.monotonic() + 15
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(pgid) == []  # no worker, nanny or scheduler process lingers
    assert not _marker(out, "02").exists()  # killed before the end
    kept = {**_files_with_mtimes(out / "sub-01"), **{
        f"first_level/{k}": v for k, v in _files_with_mtimes(out / "first_level" / "sub-01").items()}}

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "sub-01: complete (same analysis), skipped" in again.stderr
    assert "fitting 1 subject(s), 1 run(s)" in again.stderr  # sub-01 is not fitted again
    assert "sub-01 written" not in again.stderr and "sub-02 written" in again.stderr
    after = {**_files_with_mtimes(out / "sub-01"), **{
        f"first_level/{k}": v for k, v in _files_with_mtimes(out / "first_level" / "sub-01").items()}}
    assert after == kept  # not one file of the complete subject was rewritten
    _assert_same_maps(out, reference)


# -- a worker over its memory limit ---------------------------------------------------


@pytest.fixture(scope="module")
def one_big_block(tmp_path_factory):
    """One run of ~20k voxels x 400 volumes stored as a single 31 MiB chunk."""
    tmp = tmp_path_factory.mktemp("ft_big")
    dataset = make_synthetic_bids(tmp / "bids", n_subjects=1, size="small", n_volumes=400, seed=9)
    chunkglm.convert(dataset.root, tmp / "store.zarr", chunk_bytes=64 * 2**20)
    return dataset, tmp / "store.zarr"


def test_a_worker_over_its_memory_limit_is_reported_with_its_block_and_a_hint(one_big_block, tmp_path):
    dataset, store = one_big_block
    env = {"CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "1",
           "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "null",
           # A worker process holds ~100-150 MiB once its imports are done; reading the 31 MiB
           # chunk and fitting it (float64 copies) takes it well past 95% of 200 MiB (measured
           # peak ~240 MiB), where the nanny kills it.
           "CHUNKGLM_CLUSTER__LOCAL__MEMORY_LIMIT": "200MiB",
           # Neither pause nor spill (they would stall or slow this tiny worker); retry once only
           # (dask's default is 3 retries: the same outcome, slower).
           "DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False",
           "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
           "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    command, env = _cli("first-level", store, "-o", tmp_path / "glm", "--task", "main", "-c", "a=a",
                        env=env)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    error = done.stderr[done.stderr.index("chunkglm first-level: error:"):]
    assert f"run {dataset.runs[0].name}, voxel block 1 of 1 (voxels 0-" in error
    assert "200.00 MiB per worker" in error and "--chunk-mb" in error and "memory_limit" in error
    assert "Traceback" not in done.stderr
    assert not _marker(tmp_path / "glm", "01").exists()  # nothing counts as complete


# -- a worker killed at each write of a distributed conversion -------------------------


def test_a_worker_killed_at_its_writes_during_a_distributed_conversion_loses_nothing(tiny_bids, tmp_path):
    """Every stage of a conversion task on a worker process of a real LocalCluster (creating
    the node, each chunk, the marker, the lock's release): the worker dies (os._exit) before
    its k-th write, for k evenly spaced over a worker's writes. Dask runs its task again on a
    worker the nanny restarts; convert reports every run converted and the store equals the
    undisturbed one, file for file (tests/infra/faults.py: times and record names aside)."""
    from distributed import Client, LocalCluster

    sys.path.insert(0, str(Path(__file__).parent))
    from infra import faults

    def contents(store):  # the cluster's summary in the record may count a worker being restarted
        files = faults.normalised(faults.local_files(store), str(store))
        return {**files, "_provenance records": files["_provenance records"]["inputs"]}

    runs = sorted(f"runs/{run.name}" for run in tiny_bids.runs)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(faults.WorkerFaults(None, str(tmp_path / "count.points"), str(tmp_path / "x")))
        chunkglm.convert(tiny_bids.root, tmp_path / "count.zarr", client=client)
        want = contents(tmp_path / "count.zarr")
        per_worker = len((tmp_path / "count.points").read_text().splitlines()) // 2
        assert per_worker >= 10
        killed = 0
        for k in faults.strided(per_worker, 5):
            store, once = tmp_path / f"k{k}.zarr", tmp_path / f"k{k}.killed"
            client.register_plugin(faults.WorkerFaults(k, str(tmp_path / f"k{k}.points"), str(once)))
            report = chunkglm.convert(tiny_bids.root, store, client=client)
            killed += once.exists()
            assert sorted(report.converted) == runs, k
            got = contents(store)
            assert faults.differences(got, want) == [], (k, faults.differences(got, want))
            client.wait_for_workers(2, timeout=60)
    assert killed >= 4  # the scenario happened (a point past a worker's last write kills nobody)
