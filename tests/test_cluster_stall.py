"""A command whose tasks wait with no running worker stops with one line (issue 17).

A cluster whose workers never start or all die, or whose workers dask paused for
memory, left a command waiting for ever without a word. The stall watch of every
command's cluster ends it once tasks have waited CHUNKGLM_STALL_SECONDS with no
running worker. The waits here are certain, not raced: the clusters have no
worker at all (or one reported paused by the test), so nothing can run.
"""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from chunkglm.cli.main import main
from chunkglm.cluster.stall import StallWatch, stall_seconds
from chunkglm.errors import ChunkglmError


@pytest.fixture
def idle_scheduler():
    """A scheduler without workers (in this process: nothing to spawn)."""
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        yield cluster


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_tasks_waiting_on_paused_or_no_workers_are_cancelled_after_the_wait(idle_scheduler, monkeypatch):
    with Client(idle_scheduler) as client:
        task = client.submit(sum, [1, 2], key="waits-for-a-worker")
        clock, workers = _Clock(), {}
        monkeypatch.setattr(client, "scheduler_info", lambda **kwargs: {"workers": workers})
        watch = StallWatch(client, 30, clock=clock)
        workers["tcp://w1"] = {"status": "paused"}  # a paused worker runs nothing
        assert watch.check() is None and watch.since == 0.0
        clock.now = 29.0
        assert watch.check() is None
        workers["tcp://w1"] = {"status": "running"}  # resumed in time: the wait starts again
        assert watch.check() is None and watch.since is None
        workers["tcp://w1"] = {"status": "paused"}
        clock.now = 40.0
        assert watch.check() is None
        clock.now = 70.0
        fired = watch.check()
        assert fired.startswith("the cluster had no running worker for 30 s while 1 task(s) waited (scheduler "
                                f"{client.scheduler.address}; workers: 1 paused)")
        assert "CHUNKGLM_STALL_SECONDS" in fired and "\n" not in fired
        client.gather([task], errors="skip")  # returns once the task is cancelled
        assert task.status == "cancelled"


def test_nothing_to_do_is_no_stall(idle_scheduler):
    with Client(idle_scheduler) as client:
        clock = _Clock()
        watch = StallWatch(client, 1, clock=clock)
        assert watch.check() is None
        clock.now = 100.0
        assert watch.check() is None and watch.fired is None


def test_the_wait_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("CHUNKGLM_STALL_SECONDS", raising=False)
    assert stall_seconds() == 600.0
    monkeypatch.setenv("CHUNKGLM_STALL_SECONDS", "0")
    assert stall_seconds() == 0.0
    monkeypatch.setenv("CHUNKGLM_STALL_SECONDS", "soon")
    with pytest.raises(ChunkglmError, match="CHUNKGLM_STALL_SECONDS takes a number of seconds >= 0"):
        stall_seconds()


@pytest.mark.timeout(120)  # before the watch: waited for ever
def test_a_command_on_a_scheduler_without_workers_ends_with_one_line(idle_scheduler, tiny_bids, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("CHUNKGLM_STALL_SECONDS", "1")
    store = tmp_path / "cohort.zarr"
    code = main(["convert", str(tiny_bids.root), "-o", str(store), "--task", "main", "--scheduler",
                 idle_scheduler.scheduler_address, "--no-progress"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith("chunkglm convert: error: the cluster had no running worker for 1 s while "), errors
    assert f"(scheduler {idle_scheduler.scheduler_address}; workers: none)" in errors[0]
