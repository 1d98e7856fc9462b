"""Killing a conversion half-way loses nothing complete; re-running finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import chunkglm
from chunkglm.testing import make_synthetic_bids


@pytest.fixture(scope="module")
def six_runs(tmp_path_factory):
    # Runs big enough (~37 MB each) that a conversion takes a few seconds.
    return make_synthetic_bids(tmp_path_factory.mktemp("bids6"), n_subjects=6, size="small", seed=3)


def _node_states(store: Path) -> dict[str, bool]:
    states = {}
    for meta in (store / "runs").glob("*/zarr.json"):
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (json.JSONDecodeError, OSError):  # being replaced right now
            continue
        states[meta.parent.name] = bool(attrs.get("chunkglm", {}).get("complete"))
    return states


def _convert_cmd(root, store):
    return [sys.executable, "-m", "chunkglm.cli.main", "convert", str(root), "-o", str(store),
            "--cluster", "none"]


def _kill_mid_run(root, store, timeout=120.0) -> dict[str, bool]:
    """Start a real conversion process; SIGKILL it while a node is half-written."""
    proc = subprocess.Popen(_convert_cmd(root, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            states = _node_states(store) if (store / "runs").exists() else {}
            if any(states.values()) and not all(states.values()):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return _node_states(store)
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
    pytest.fail("the conversion finished before it could be interrupted; use larger runs")


def test_killed_conversion_resumes_without_redoing_or_corrupting(six_runs, tmp_path):
    store = tmp_path / "cohort.zarr"
    states = _kill_mid_run(six_runs.root, store)
    done = sorted(name for name, ok in states.items() if ok)
    assert done and len(done) < len(six_runs.runs)

    cohort = chunkglm.open_cohort(store)  # the interrupted store is readable
    assert sorted(cohort.runs) == done
    assert set(cohort.incomplete) == {f"runs/{n}" for n, ok in states.items() if not ok}
    written = {n: (store / "runs" / n / "zarr.json").stat().st_mtime_ns for n in done}

    report = chunkglm.convert(six_runs.root, store)
    assert sorted(report.skipped) == [f"runs/{n}" for n in done]
    assert len(report.converted) == len(six_runs.runs) - len(done)
    assert {n: (store / "runs" / n / "zarr.json").stat().st_mtime_ns for n in done} == written

    reference = tmp_path / "clean.zarr"
    chunkglm.convert(six_runs.root, reference)
    resumed, clean = chunkglm.open_cohort(store), chunkglm.open_cohort(reference)
    assert resumed.incomplete == [] and sorted(resumed.runs) == sorted(clean.runs)
    for name, node in clean.runs.items():
        np.testing.assert_array_equal(resumed.runs[name].data().values, node.data().values)
        pd_a, pd_b = resumed.runs[name].confounds, node.confounds
        np.testing.assert_array_equal(pd_a.to_numpy(), pd_b.to_numpy())


def test_rerunning_the_cli_on_a_complete_store_is_a_no_op(six_runs, tmp_path):
    store = tmp_path / "cohort.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.run(_convert_cmd(six_runs.root, store), capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert f"converted {len(six_runs.runs)} node(s)" in first.stdout
    assert "[6/6]" in first.stderr  # progress, one line per node
    again = subprocess.run(_convert_cmd(six_runs.root, store), capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "converted 0 node(s), skipped 6" in again.stdout
