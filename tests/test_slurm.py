"""chunkglm on a real SLURM scheduler, started by the tests on 127.0.0.1.

The session fixture ``slurm`` installs ``slurm-wlm`` and ``munge`` from apt
when they are missing (root only), then runs a private munged, slurmctld and
``slurmd -N localhost`` from a temporary directory (tests/infra/slurm).  The
tests are skipped, with the reason, only where the packages cannot be
installed; a scheduler that is installed but does not start is a failure.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra" / "slurm"))
from local_slurm import (  # noqa: E402
    LocalSlurm,
    SlurmUnavailable,
    communication_parameters,
    ensure_installed,
)

#: Per-worker resources: this machine has 2 cores and 24 GiB, CI runners similar.
WORKER_MEMORY = "2GiB"
N_JOBS = 2


@pytest.fixture(scope="session")
def slurm():
    """A running single-node SLURM; ``SLURM_CONF`` points at it for the session."""
    try:
        seconds = ensure_installed(timeout=240)
    except SlurmUnavailable as exc:
        pytest.skip(f"SLURM unavailable: {exc}")
    if seconds:
        print(f"installed slurm-wlm and munge in {seconds:.0f} s", file=sys.stderr)
    cluster = LocalSlurm(start_timeout=60).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))  # for sbatch run by in-process clusters
        try:
            yield cluster
        finally:
            cluster.stop()


def slurm_config(folder: Path, **slurm_options) -> dict:
    """A chunkglm ``type: slurm`` config for the local scheduler, files under ``folder``."""
    options = {
        "cores": 1,
        "processes": 1,
        "memory": WORKER_MEMORY,
        "walltime": "00:20:00",
        "interface": "lo",
        "local_directory": str(folder / "worker-space"),
        "log_directory": str(folder / "worker-logs"),
        "scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        "jobs": N_JOBS,
        "job_extra_directives": [],
        "queue": None,
    }
    options.update(slurm_options)
    return {"version": 1, "type": "slurm", "slurm": options, "adapt": None}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def registered_workers(log_directory: Path) -> list[Path]:
    """Worker logs (written by the SLURM jobs) that show the worker joined a scheduler."""
    logs = log_directory.glob("dask-worker-*.err")
    return [path for path in logs if "Registered to:" in path.read_text()]


def files_under(root: Path) -> set[Path]:
    """The files of an output folder; a store's provenance records are named after their time,
    host and process (one group each, chunkglm.io.layout.add_provenance): counted, not named."""
    files = {path.relative_to(root) for path in root.rglob("*") if path.is_file()}
    return {p if "_provenance" not in p.parts else Path(*p.parts[:p.parts.index("_provenance") + 1], "<record>")
            for p in files}


def queued_ids(slurm: LocalSlurm) -> set[str]:
    return {job["id"] for job in slurm.jobs()}


# ------------------------------------------------------------------ the scheduler
def test_the_scheduler_runs_a_batch_job_and_listens_only_on_loopback(slurm, tmp_path):
    out = tmp_path / "job.out"
    slurm.run("sbatch", "--job-name=probe", "--mem=50M", "-o", str(out),
              "--wrap", "echo ran on $SLURMD_NODENAME")
    wait_until(lambda: out.is_file() and "ran on localhost" in out.read_text(), 30,
               "the batch job's output")
    assert sorted(slurm.daemons) == ["munged", "slurmctld", "slurmd"], slurm.logs()
    addresses = {conn.laddr.ip for pid in slurm.daemons.values()
                 for conn in psutil.Process(pid).net_connections("inet")
                 if conn.status == psutil.CONN_LISTEN}
    # slurmctld binds to the host name's address: loopback here, else all interfaces
    loopback_host = "NoCtld" in communication_parameters()
    expected = {"127.0.0.1"} if loopback_host else {"127.0.0.1", "0.0.0.0"}
    assert addresses and addresses <= expected, addresses


# ------------------------------------------------------------------ through chunkglm
def test_workers_started_by_sbatch_join_compute_and_leave_the_queue(slurm, tmp_path):
    from chunkglm.cluster import start

    with start(slurm_config(tmp_path), verbose=False) as client:
        client.wait_for_workers(N_JOBS, timeout=90)
        assert client.submit(lambda: 1 + 1, pure=False).result(timeout=30) == 2
        workers = client.scheduler_info()["workers"]
        assert all(address.startswith("tcp://127.0.0.1:") for address in workers)
        job_ids = {job.job_id for job in client.cluster.workers.values()}
        queue = {job["id"]: job for job in slurm.jobs()}
        assert len(job_ids) == N_JOBS and job_ids <= set(queue), (job_ids, queue)
        assert all(queue[i]["state"] == "RUNNING" for i in job_ids), queue
        assert all(queue[i]["name"] == "dask-worker" for i in job_ids), queue
    # closing the client cancels its jobs
    wait_until(lambda: not job_ids & queued_ids(slurm), 30, "the jobs to leave squeue")
    assert len(registered_workers(tmp_path / "worker-logs")) == N_JOBS


def test_jobs_that_never_start_are_reported_with_their_queue_state(slurm, tmp_path):
    from chunkglm.cluster import ClusterStartError, start

    # --begin keeps the job pending, as a busy queue would
    config = slurm_config(tmp_path, jobs=1, wait_timeout=3,
                          job_extra_directives=["--begin=now+1hour"])
    with pytest.raises(ClusterStartError) as info:
        start(config, verbose=False)
    message = str(info.value)
    assert "Only 0 of 1 slurm worker(s)" in message and "(BeginTime)" in message, message
    assert str(tmp_path / "worker-logs") in message
    wait_until(lambda: not slurm.jobs(), 30, "the pending job to be cancelled")


def test_a_job_slurm_cannot_run_is_refused_at_once_with_sbatchs_reason(slurm, tmp_path):
    from chunkglm.cluster import ClusterStartError, start

    # far more memory than this node has: sbatch refuses it; wait_timeout would be 600 s
    config = slurm_config(tmp_path, jobs=1, memory="4000GiB", wait_timeout=600)
    started = time.monotonic()
    with pytest.raises(ClusterStartError) as info:
        start(config, verbose=False)
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert "sbatch --test-only" in message and "configuration is not available" in message, message
    assert not slurm.jobs()  # nothing was queued


def _first_level(bids_root, out: Path, cluster: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chunkglm.cli.main", "first-level", str(bids_root),
         "-o", str(out), "--task", "main", "-c", "aMinusB=a - b", "--cluster", cluster],
        capture_output=True, text=True, timeout=300, env=env)


def test_first_level_cli_on_slurm_equals_the_local_run(slurm, tiny_bids, tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump(slurm_config(tmp_path)))
    env = {k: v for k, v in slurm.env.items() if not k.startswith("CHUNKGLM_CLUSTER")}

    on_slurm = _first_level(tiny_bids.root, tmp_path / "slurm", str(config), env)
    assert on_slurm.returncode == 0, on_slurm.stderr + slurm.logs()
    assert "[2/2] sub-02 written" in on_slurm.stderr
    assert "Scheduler: tcp://127.0.0.1:" in on_slurm.stderr  # a real distributed scheduler
    assert registered_workers(tmp_path / "worker-logs"), "no SLURM job's worker joined"
    wait_until(lambda: not slurm.jobs(), 30, "the CLI's jobs to leave squeue")

    local = _first_level(tiny_bids.root, tmp_path / "local", "none", env)
    assert local.returncode == 0, local.stderr

    files = files_under(tmp_path / "local")
    assert files_under(tmp_path / "slurm") == files
    maps = sorted(path for path in files if path.name.endswith(".nii.gz"))
    assert any("stat-z" in p.name for p in maps) and any("stat-effect" in p.name for p in maps)
    for relative in maps:
        expected = nib.load(tmp_path / "local" / relative).get_fdata()
        written = nib.load(tmp_path / "slurm" / relative).get_fdata()
        # Same code and inputs, only the processes differ. Measured: bit-identical.
        # Allowed: float rounding if BLAS thread counts reorder sums (workers run
        # single-threaded BLAS), ~1e-7 relative in these float32 maps; 1e-6 is
        # far below any real change in a z or effect map.
        np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-6,
                                   err_msg=str(relative))
