"""Worker deaths, diagnosed: which run and which voxel block a lost task belonged to.

When a cluster worker dies (most often: over its memory limit) the scheduler
retries its tasks and, after ``allowed-failures``, raises ``KilledWorker``
naming one task key. :func:`locate_task` walks the fit graphs of the models
being evaluated to find the run and voxel block of that key;
:func:`explain_worker_deaths` turns the ``KilledWorker`` into a
:class:`WorkerDiedError` that says where and what to change.

The advice is the library's (``chunk_bytes``, the cluster's
``memory_limit``); the command line gives its own options instead
(``advice=``, or :meth:`WorkerDiedError.with_advice` where it catches the error).
"""

from __future__ import annotations

import contextlib

import numpy as np
from dask.core import get_dependencies
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.utils import format_bytes

from chunkglm.errors import ChunkglmError

__all__ = ["LIBRARY_ADVICE", "WorkerDiedError", "explain_worker_deaths", "locate_task",
           "worker_died_error"]

#: What a library user can change when a worker dies over its memory limit.
LIBRARY_ADVICE = ("Use smaller chunks: convert into a new store with a smaller chunk_bytes "
                  "(e.g. chunkglm.convert(..., chunk_bytes=16 * 2**20)), or give each worker more "
                  "memory (memory_limit in the cluster config).")


class WorkerDiedError(ChunkglmError):
    """A cluster worker died (most often: over its memory limit) while running a fit task.

    Attributes
    ----------
    task : str
        The dask key of the task.
    location : dict or None
        ``{"run": name, "block": index, "n_blocks": n, "voxels": (start, stop),
        "n_time": t}`` when the task belongs to one voxel block of a run.
    diagnosis : str
        What happened and where, without advice.
    """

    def __init__(self, message, task, location=None, diagnosis=None):
        super().__init__(message)
        self.task, self.location = task, location
        self.diagnosis = message if diagnosis is None else diagnosis

    def with_advice(self, advice: str) -> WorkerDiedError:
        """The same error with ``advice`` instead of the library's (e.g. command-line options)."""
        return WorkerDiedError(f"{self.diagnosis} {advice}", self.task, self.location, self.diagnosis)


def locate_task(models, key) -> dict | None:
    """Which run, and which voxel block of it, a dask task key belongs to.

    Parameters
    ----------
    models : list of FirstLevelModel
        Fitted models whose graphs may hold the task.
    key : str or tuple
        A dask key (as in ``distributed.scheduler.KilledWorker.task``).

    Returns
    -------
    dict or None
        ``run``, ``block`` (None for a run-level task such as the grand
        mean), ``n_blocks``, ``voxels`` ((start, stop) or None), ``n_time``;
        None when no model's fit graph holds the key.
    """
    for model in models:
        for name, run in zip(getattr(model, "_run_names", []), getattr(model, "_runs", [])):
            graph = _fit_graph(run)
            if key in graph:
                blocks = _nearest_blocks(graph, key)
                block = blocks.pop() if len(blocks) == 1 else None
                bounds = np.cumsum([0, *run.block_sizes])
                return {"run": name, "block": block, "n_blocks": len(run.block_sizes),
                        "voxels": None if block is None else (int(bounds[block]), int(bounds[block + 1])),
                        "n_time": int(run.bold.shape[0])}
    return None


def _fit_graph(run) -> dict:
    """The task graph of a run's (lazy) fits, as a dict."""
    fits = [f for f in (run.lazy_fits or run.fits) if isinstance(f, Delayed)]
    if not fits:
        return {}
    return dict(HighLevelGraph.merge(*[f.__dask_graph__() for f in fits]))


def _nearest_blocks(graph, key) -> set:
    """Voxel blocks of the data chunks nearest to ``key`` (breadth first, down the deps).

    Data chunk keys are ``(name, 0, block)``: a block's own tasks reach one
    chunk first; a run-level reduction reaches all of them at once.
    """
    level, seen = {key}, set()
    while level:
        chunks = {k[-1] for k in level if isinstance(k, tuple) and len(k) == 3}
        if chunks:
            return chunks
        seen |= level
        level = {d for k in level if k in graph for d in get_dependencies(graph, k)} - seen
    return set()


def worker_died_error(error, models, memory_limit=None, advice=LIBRARY_ADVICE) -> WorkerDiedError:
    """A :class:`WorkerDiedError` naming the run and voxel block of a ``KilledWorker``.

    Parameters
    ----------
    error : distributed.scheduler.KilledWorker
    models : list of FirstLevelModel
        The models being evaluated.
    memory_limit : int, optional
        Bytes per worker, for the message.
    advice : str
        The message's last sentences: what to change.
    """
    key = error.task
    where = locate_task(models, key)
    limit = f" ({format_bytes(memory_limit)} per worker)" if memory_limit else ""
    if where is None:
        place, size = f"task {key!r}", ""
    elif where["block"] is None:
        place, size = f"a run-level step of run {where['run']} (task {key!r})", ""
    else:
        start, stop = where["voxels"]
        nbytes = (stop - start) * where["n_time"] * 4
        place = (f"run {where['run']}, voxel block {where['block'] + 1} of {where['n_blocks']} "
                 f"(voxels {start}-{stop - 1}; task {key!r})")
        size = f" That block is {format_bytes(nbytes)} of float32 data."
    diagnosis = (f"a worker died while computing {place}, {error.allowed_failures + 1} time(s): most "
                 f"often it went over its memory limit{limit}.{size}")
    return WorkerDiedError(f"{diagnosis} {advice}", key, where, diagnosis)


@contextlib.contextmanager
def explain_worker_deaths(models, client=None, advice=LIBRARY_ADVICE):
    """Context manager: a ``KilledWorker`` raised inside becomes a :class:`WorkerDiedError`.

    Parameters
    ----------
    models : list of FirstLevelModel
        The models evaluated inside the block (to locate the task).
    client : distributed.Client, optional
        Asked for the workers' memory limit on entry, for the message.
    advice : str
        What the message tells to change: the library's parameters by default;
        a command passes its own options.
    """
    limit = _memory_limit(client)  # now, while the workers are all there
    try:
        yield
    except Exception as err:
        if type(err).__name__ != "KilledWorker" or not hasattr(err, "task"):
            raise
        raise worker_died_error(err, models, limit, advice) from err


def _memory_limit(client):
    if client is None:
        return None
    try:
        workers = client.scheduler_info()["workers"].values()
        return max(w.get("memory_limit") or 0 for w in workers) or None
    except Exception:  # no client, or no worker left to ask
        return None
