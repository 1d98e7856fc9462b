"""Evaluation of lazy graphs: progress over independent items, persisted fits, waves.

:func:`compute_items`: long graphs (permutation tests over voxel blocks or permutation batches) are
lists of independent items; a command wants a progress bar over them. With a
``distributed`` client active the items are submitted at once and counted as
they complete (no loss of parallelism); without one they run on the local
scheduler in groups of one item per core, counted group by group.

:func:`persist_fits` evaluates the fits of first-level models once (kept in
memory, or on the workers); :func:`fitted_in_waves` does it for a cohort, a
window of models at a time, so that memory stays flat however many models
there are. :func:`compute_blocks` evaluates lazy (..., voxel) arrays block by
block and joins the blocks here.
"""

from __future__ import annotations

import contextlib
import os

import dask
import numpy as np
from distributed import Worker, as_completed, default_client, futures_of

__all__ = ["active_client", "compute_blocks", "compute_items", "fitted_in_waves", "persist_fits",
           "persist_runs"]


def active_client():
    """The default ``distributed`` client, or None when none is running."""
    try:
        return default_client()
    except ValueError:  # no client started
        return None


def compute_items(items, progress=None) -> list:
    """Compute ``items`` (dask collections or delayed objects); results in their order.

    Parameters
    ----------
    items : list
        Independent dask objects (they may share inputs).
    progress : callable, optional
        Called as ``progress(done, total)`` after each finished item.
    """
    items = list(items)
    if progress is None or not items:
        return list(dask.compute(*items))
    client = active_client()
    total = len(items)
    if client is not None:
        futures = client.compute(items)
        for done, _ in enumerate(as_completed(futures), start=1):
            progress(done, total)
        return client.gather(futures)
    step = max(1, os.cpu_count() or 1)
    results = []
    for start in range(0, total, step):
        results.extend(dask.compute(*items[start:start + step]))
        progress(len(results), total)
    return results


def compute_blocks(arrays: list) -> list[np.ndarray]:
    """Evaluate lazy (..., voxel) dask arrays in one pass; each joined along its last axis.

    The voxel blocks are gathered and joined here: a worker holds one block's
    result at a time (its memory scales with the chunk size), never a whole array.
    """
    blocks = dask.compute(*[array.to_delayed().ravel().tolist() for array in arrays])
    return [np.concatenate(parts, axis=-1) for parts in blocks]


def persist_runs(runs: list, progress=None, on_block=None) -> None:
    """Evaluate the fits of lazy runs (:class:`chunkglm.graph.glm.RunFit`) as one graph, kept.

    Each run's ``fits`` and ``nonfinite`` counts become persisted results (the
    counts come from the same reads); the lazy fits stay in ``lazy_fits``, for
    :meth:`release` and for locating tasks (:mod:`chunkglm.graph.faults`).
    ``progress`` wraps the evaluation (e.g. a progress bar context).
    ``on_block(run)`` is called once per voxel block fitted: as each block
    finishes with a ``distributed`` client (from the client's callback thread;
    persisting then returns at once), after the evaluation without one.
    """
    if not runs:
        return
    with progress or contextlib.nullcontext():
        persisted = dask.persist(*[(run.fits, run.nonfinite) for run in runs])
    for run, (fits, counts) in zip(runs, persisted):
        run.lazy_fits, run.fits, run.nonfinite = run.fits, list(fits), list(counts)
    if on_block is not None:
        _report_blocks(runs, on_block)


def _report_blocks(runs, on_block) -> None:
    for run in runs:
        for fit in run.fits:
            futures = futures_of(fit)
            if not futures:  # evaluated here already
                on_block(run)
                continue
            futures[0].add_done_callback(lambda _, run=run: on_block(run))


def persist_fits(models, progress=None, on_block=None) -> None:
    """Evaluate the fits of several first-level models as one dask graph, kept in memory.

    Each input chunk is read once (by its block's moments task); afterwards
    every contrast or voxelwise map of these models is arithmetic on the
    persisted per-block results. On a distributed cluster they stay on the
    workers. ``progress`` wraps the evaluation (e.g. a progress bar context);
    ``on_block(run)`` is called per voxel block fitted (:func:`persist_runs`).
    """
    pending = [model for model in models if not model._persisted]
    runs = [run for model in pending for run in model._runs]
    if not runs:
        return
    persist_runs(runs, progress, on_block)
    for model in pending:
        model._persisted = True


def fitted_in_waves(models, window=None, progress=None, on_block=None):
    """Yield models with their fits evaluated, holding at most two windows at once.

    For cohorts: a window of models is persisted (on a cluster, the next one
    starts while the current one is consumed); each model yielded is released
    when the loop moves on, so memory stays flat however many models there
    are. ``window`` defaults to twice the number of workers (or threads); with workers that
    are threads of this process, to their number of threads.
    ``on_block(run)`` is called per voxel block fitted (:func:`persist_runs`).
    """
    window = window or _default_window()
    batches = [models[i:i + window] for i in range(0, len(models), window)]
    if batches:
        persist_fits(batches[0], progress, on_block)
    for index, batch in enumerate(batches):
        if index + 1 < len(batches):
            persist_fits(batches[index + 1], progress, on_block)  # asynchronous on a cluster
        for model in batch:
            yield model
            model.release()


def _default_window() -> int:
    """Twice the workers (or the local threads); one model per worker thread when the workers are
    threads of this process (``LocalCluster(processes=False)``): their persisted fits are then held
    in the process that writes the models' maps, two windows at once."""
    client = active_client()
    if client is not None:
        workers = client.scheduler_info()["workers"]
        if _workers_in_process(client):
            return max(2, sum(int(worker.get("nthreads", 1)) for worker in workers.values()))
        return max(2, 2 * len(workers))
    return max(2, 2 * len(os.sched_getaffinity(0)))


def _workers_in_process(client) -> bool:
    """Whether every worker of ``client``'s cluster is a Worker object of this process (no Nanny)."""
    workers = list(getattr(getattr(client, "cluster", None), "workers", {}).values())
    return bool(workers) and all(isinstance(worker, Worker) for worker in workers)
