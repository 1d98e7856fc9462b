"""A watch on a command's cluster: work waiting while no worker can run it ends the command.

Two ways a command waited for ever without a word: a cluster whose workers never
started or all died (0 workers: the tasks wait for one), and workers paused by
dask's memory monitor (a worker's process holding more than 80 % of its
``memory_limit``, e.g. an in-process worker measured on the whole command). The
:class:`StallWatch` asks the scheduler every few seconds how many workers are
running (``status`` "running": paused and closing ones do not count) and looks
at the client's tasks still pending. When tasks have been pending with no
running worker for :func:`stall_seconds` in a row, it cancels the client's
pending tasks (the command's wait ends with them) and keeps the reason
(:attr:`StallWatch.fired`), one line naming the cluster's state, which the
command reports as its error. A cluster with a running worker, or with nothing
to do, is never stopped; a worker that joins or resumes in time resets the wait.
"""

from __future__ import annotations

import os
import threading
import time

from chunkglm.errors import ChunkglmError

__all__ = ["STALL_SECONDS", "ClusterStalledError", "StallWatch", "stall_seconds"]

#: Seconds tasks may wait with no running worker before the command stops
#: (environment: ``CHUNKGLM_STALL_SECONDS``; 0 waits for ever).
STALL_SECONDS = 600.0
#: Seconds between two looks at the scheduler (at most).
POLL_SECONDS = 5.0


class ClusterStalledError(ChunkglmError):
    """The command's tasks waited :func:`stall_seconds` with no running worker."""


def stall_seconds() -> float:
    """:data:`STALL_SECONDS`, or ``CHUNKGLM_STALL_SECONDS`` when set (0: no watch).

    Raises
    ------
    ChunkglmError
        The variable is not a number of seconds >= 0.
    """
    text = os.environ.get("CHUNKGLM_STALL_SECONDS")
    if text is None:
        return STALL_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ChunkglmError(f"CHUNKGLM_STALL_SECONDS takes a number of seconds >= 0 (0: wait for ever); "
                            f"received {text!r}.")
    return value


class StallWatch:
    """Stop the waiting tasks of ``client`` when no worker has been running for ``seconds``.

    Use as a context manager around the command's work (a daemon thread looks
    every ``min(seconds / 4, POLL_SECONDS)``); :meth:`check` is one look.

    Parameters
    ----------
    client : distributed.Client
    seconds : float
        Seconds of pending tasks without a running worker before the tasks are
        cancelled; 0 disables the watch.
    clock : callable
        Monotonic seconds (tests give their own).
    """

    def __init__(self, client, seconds: float, clock=time.monotonic):
        self.client, self.seconds, self.clock = client, float(seconds), clock
        self.since: float | None = None
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.seconds > 0:
            self._thread = threading.Thread(target=self._run, name="chunkglm-stall-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def _run(self) -> None:
        while not self._stop.wait(min(self.seconds / 4, POLL_SECONDS)):
            try:
                self.check()
            except Exception:  # the scheduler unreachable for a moment: look again next time
                continue

    def check(self) -> str | None:
        """One look: cancel the pending tasks when they have waited too long; the reason, or None."""
        pending = self._pending()
        try:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        except TypeError:  # distributed before n_workers: every worker listed
            workers = self.client.scheduler_info().get("workers", {})
        statuses = [str(w.get("status", "running")) for w in workers.values()]
        running = statuses.count("running")
        if running or not pending:
            self.since = None
            return self.fired
        now = self.clock()
        self.since = now if self.since is None else self.since
        if now - self.since >= self.seconds:
            if self.fired is None:
                self.fired = self._message(len(pending), statuses)
            self.client.cancel(pending, msg=self.fired)
        return self.fired

    def _pending(self) -> list:
        from distributed import Future

        try:
            keys = [key for key, state in list(self.client.futures.items()) if state.status == "pending"]
        except RuntimeError:  # the client's table changed while read: none this time
            return []
        return [Future(key, self.client) for key in keys]

    def _message(self, n_pending: int, statuses: list[str]) -> str:
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))) or "none"
        address = getattr(getattr(self.client, "scheduler", None), "address", None) or "unknown"
        return (f"the cluster had no running worker for {self.seconds:g} s while {n_pending} task(s) waited "
                f"(scheduler {address}; workers: {counts}): its workers did not start, died or were "
                "paused by dask for memory. Look at the workers' logs, give them more memory "
                "(memory_limit, --mem) or start workers for a running scheduler (dask worker ADDRESS), "
                "then run the same command again; CHUNKGLM_STALL_SECONDS sets this wait (0: wait for ever).")
