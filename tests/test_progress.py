"""Progress bars on a terminal, plain lines elsewhere, none with --no-progress.

The bar case runs the real command with its stderr on a pseudo-terminal
(:mod:`pty`), as a user's shell would.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys

BAR = "━"  # rich draws its bars with this character


def _command(*args):
    return [sys.executable, "-m", "chunkglm.cli.main", *map(str, args)]


def _env():
    return {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}


def _run_on_a_terminal(command, timeout=300) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; return (exit code, terminal output, stdout)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=_env())
    os.close(slave)
    received = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        received.append(data)
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=timeout), b"".join(received).decode(errors="replace"), stdout


def test_bars_on_a_terminal_for_conversion_and_fitting(tiny_bids, tmp_path):
    code, terminal, stdout = _run_on_a_terminal(_command(
        "first-level", tiny_bids.root, "-o", tmp_path / "glm", "--task", "main", "-c", "a=a",
        "--cluster", "none"))
    assert code == 0, terminal
    assert BAR in terminal and "\x1b[" in terminal  # drawn (and redrawn) with escape codes
    assert "converting" in terminal and "first-level" in terminal  # one bar per phase
    assert "2/2" in terminal and "sub-02 written" in terminal
    assert "[1/2]" not in terminal  # no plain lines when bars are drawn
    assert "derivatives:" in stdout


def test_first_level_bar_counts_voxel_blocks_as_they_finish_on_a_cluster(tiny_bids, tmp_path):
    """Issue 17 item 4: the first-level bar moved once per subject; it counts voxel blocks."""
    import re

    code, terminal, stdout = _run_on_a_terminal(_command(
        "first-level", tiny_bids.root, "-o", tmp_path / "glm", "--task", "main", "-c", "a=a",
        "--chunk-mb", "0.02", "--workers", "1"))
    assert code == 0, terminal
    assert "first-level: voxel blocks fitted" in terminal and "eta" in terminal
    counts = {(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+)", terminal.split("voxel blocks fitted", 1)[1])}
    totals = {b for _, b in counts}
    assert len(totals - {2}) == 1, counts  # one bar total besides the subjects' (2)
    total = max(totals - {2})
    assert total > 2 and (total, total) in counts  # many blocks per run, all counted
    # (how many intermediate counts the terminal shows depends on rich's refresh rate against the
    # blocks' pace: the callbacks' timing is checked in test_blocks_are_reported_as_their_futures_finish)
    assert "sub-01 written" in terminal and "sub-02 written" in terminal


def test_blocks_are_reported_as_their_futures_finish(tiny_bids):
    """fitted_in_waves' on_block runs once per voxel block, from the client's callbacks: some
    before the wave is consumed (not all at the end), all by the time the models are yielded."""
    import threading
    import time

    from chunkglm.cluster import start
    from chunkglm.glm.first_level import first_level_from_bids, fitted_in_waves
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.convert import convert

    with start(n_workers=1, verbose=False) as client:
        store = str(tiny_bids.root.parent / "progress_blocks.zarr")
        convert(tiny_bids.root, store, client=client, chunk_bytes=20_000)
        models, runs, events, _ = first_level_from_bids(store, "main")
        for model, run_list, ev in zip(models, runs, events):
            model.fit(run_list, events=ev)
        n_blocks = sum(len(run.fits) for model in models for run in model._runs)
        seen, threads = [], set()
        for model in fitted_in_waves(models, on_block=lambda run: (seen.append(run),
                                                                   threads.add(threading.get_ident()))):
            model.compute_contrast("a")  # waits for the model's fits, as the command's writer does
        deadline = time.monotonic() + 30  # the last callbacks run on the client's thread
        while len(seen) < n_blocks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert n_blocks > 2 and len(seen) == n_blocks
        assert threading.get_ident() not in threads  # from the client's callback thread
    assert open_cohort(store).runs


def test_no_progress_on_a_terminal_prints_plain_lines(tiny_bids, tmp_path):
    code, terminal, stdout = _run_on_a_terminal(_command(
        "convert", tiny_bids.root, "-o", tmp_path / "c.zarr", "--cluster", "none", "--no-progress"))
    assert code == 0, terminal
    assert BAR not in terminal and "\x1b[" not in terminal
    assert "[2/2] runs/sub-0" in terminal and "converted 2 node(s)" in stdout


def test_no_bars_when_stderr_is_not_a_terminal(tiny_bids, tmp_path):
    done = subprocess.run(_command("convert", tiny_bids.root, "-o", tmp_path / "c.zarr",
                                   "--cluster", "none"),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert BAR not in done.stderr and "\x1b[" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("[")] == [
        line for line in done.stderr.splitlines() if line.startswith(("[1/2] runs/", "[2/2] runs/"))]
    assert "[2/2] runs/" in done.stderr


def test_bars_show_the_time_remaining():
    """Issue 17 item 4: the bars had no ETA."""
    import io

    from chunkglm.cli.progress import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    reporter = Reporter(bars=True, stream=stream)
    assert reporter.bars
    with reporter.phase("permutations, contrast mean (1/2)", total=4) as advance:
        advance("block", done=1, total=4)
    drawn = stream.getvalue()
    assert "permutations, contrast mean (1/2)" in drawn and "eta" in drawn
    assert "0:00:0" in drawn or "-:--:--" in drawn  # rich's remaining-time column


def test_dask_errors_are_one_line_each_and_once_during_a_command():
    # A worker lost with its host makes the in-process scheduler log the same error several
    # times with tracebacks (seen in tests/test_hosts_netns.py); the command prints each once,
    # as one line, and still prints every distinct one.
    import io
    import logging

    from chunkglm.cli.progress import library_lines_once

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("distributed")
    logger.addHandler(handler)
    try:
        with library_lines_once():
            for _ in range(3):
                try:
                    raise TimeoutError("1/1 nanny worker(s) did not shut down within 30s: {'tcp://10.0.0.2:1'}")
                except TimeoutError:
                    logging.getLogger("distributed.scheduler").exception(
                        "Exception in callback <bound method Scheduler.check_worker_ttl of <Scheduler 'tcp://x', "
                        "workers: 1>>")
            logging.getLogger("distributed.scheduler").error("Workers %s did not shut down", ["tcp://10.0.0.2:1"])
            logging.getLogger("distributed.scheduler").info("Register worker %s", "a")
        logging.getLogger("distributed.scheduler").exception("after the command", exc_info=ValueError("x"))
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[:3] == [
        "Exception in callback Scheduler.check_worker_ttl: TimeoutError: 1/1 nanny worker(s) did not shut down "
        "within 30s: {'tcp://10.0.0.2:1'}",
        "Workers ['tcp://10.0.0.2:1'] did not shut down",
        "Register worker a",
    ]
    assert lines[3:] == ["after the command", "ValueError: x"]  # outside the command: as the library logs
