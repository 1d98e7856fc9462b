"""Evaluate a list of independent dask items, reporting each one as it finishes.

Long graphs (permutation tests over voxel blocks or permutation batches) are
lists of independent items; a command wants a progress bar over them. With a
``distributed`` client active the items are submitted at once and counted as
they complete (no loss of parallelism); without one they run on the local
scheduler in groups of one item per core, counted group by group.
"""

from __future__ import annotations

import os

import dask

__all__ = ["active_client", "compute_items"]


def active_client():
    """The default ``distributed`` client, or None when none is running."""
    try:
        from distributed import default_client
    except ImportError:
        return None
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
        from distributed import as_completed

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
