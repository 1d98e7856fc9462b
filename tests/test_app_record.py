"""chunkglm app's record under parallel participant jobs: every job's files stay listed."""

from __future__ import annotations

import json
import multiprocessing
import time

from chunkglm.cli.app import RECORD, merge_record
from chunkglm.io.layout import open_root

JOBS, MERGES = 3, 6


def _participant_job(output_dir, store, job, start):
    """One BIDS-App batch: writes its files, then merges them into the record, MERGES times."""
    start.wait(60)  # every job imported and ready: they merge at the same time
    for k in range(MERGES):
        name = f"sub-{job}{k:02d}/sub-{job}{k:02d}_stat-t_statmap.nii.gz"
        path = output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"map")
        merge_record(str(output_dir), str(store), [name], _slow_record)


def _slow_record(listed):
    """The record of a job that takes a while between reading the record and rewriting it (a real
    record collects the cluster's summary and the model there): another job reads meanwhile."""
    time.sleep(0.1)
    return {"outputs": listed}


def test_parallel_jobs_lose_no_file_from_the_record(tmp_path):
    # Each job rewrites the whole record after reading it; without the store's lock, a job
    # reading between another's read and write drops that job's files.
    store, output_dir = tmp_path / "cohort.zarr", tmp_path / "out"
    open_root(str(store), mode="a")
    output_dir.mkdir()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(JOBS)
    jobs = [context.Process(target=_participant_job, args=(output_dir, store, j, start)) for j in range(JOBS)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    listed = json.loads((output_dir / RECORD).read_text())["outputs"]
    expected = {f"sub-{j}{k:02d}/sub-{j}{k:02d}_stat-t_statmap.nii.gz" for j in range(JOBS) for k in range(MERGES)}
    assert set(listed) == expected
    assert len(listed) == len(expected)
