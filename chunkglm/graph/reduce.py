"""One tree reduction over voxel blocks, flox-style: chunk, combine, finalize.

A global statistic over a run (its grand mean, the row means of mean
scaling, a masker's Gram matrix summed over blocks) must not gather every
block's partial result into one task: that task would wait for, and hold,
all of them. Here each block's task reduces its own block (``chunk``), groups
of ``split_every`` partial results are merged (``combine``, repeated while
more than ``split_every`` remain), and one last task makes the result
(``finalize``)::

    block_0 .. block_7 -chunk-> p_0 .. p_7 -combine-> q_0 \\
    block_8 .. block_15 -chunk-> p_8 .. p_15 -combine-> q_1 -- finalize --> result
    ...

Every level groups all that remains, so every block is the same number of
tasks away from the result. The partial results travel, never the blocks.

Exact combines keep results independent of the tree: :func:`concat` merges
ordered lists of partial results (no arithmetic; ``chunk`` then returns a
list of one), so that ``finalize`` sees every block's part in block order,
as a single gathering task would, and sums them in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import dask

__all__ = ["SPLIT_EVERY", "concat", "tree_reduce"]

#: Partial results merged per combine task.
SPLIT_EVERY = 8


def tree_reduce(blocks: list, chunk: Callable | None, combine: Callable, finalize: Callable | None = None,
                split_every: int = SPLIT_EVERY, finalize_args: tuple = (), pure: bool = True):
    """Lazy tree reduction of a list of delayed blocks.

    Parameters
    ----------
    blocks : list of dask.delayed.Delayed (or values)
        One per voxel block, in voxel order.
    chunk : callable or None
        ``chunk(block) -> partial``, one task per block; None: the blocks are
        the partial results.
    combine : callable
        ``combine([partial, ...]) -> partial`` for at most ``split_every``
        partial results, in block order.
    finalize : callable, optional
        ``finalize([partial, ...], *finalize_args) -> result`` on the last
        (at most ``split_every``) partial results. Default: ``combine``.
    split_every : int
        Fan-in of every combine task (>= 2).
    finalize_args : tuple
        Extra arguments of ``finalize`` (delayed objects allowed).
    pure : bool
        Deterministic task keys (dask's ``pure``).

    Returns
    -------
    dask.delayed.Delayed
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2; received {split_every}.")
    parts = list(blocks)
    if not parts:
        raise ValueError("tree_reduce needs at least one block.")
    if chunk is not None:
        parts = [dask.delayed(chunk, pure=pure)(block) for block in parts]
    while len(parts) > split_every:
        parts = [dask.delayed(combine, pure=pure)(parts[i:i + split_every])
                 for i in range(0, len(parts), split_every)]
    return dask.delayed(finalize or combine, pure=pure)(parts, *finalize_args)


def concat(lists: list) -> list:
    """An exact combine: ordered lists of partial results joined, in order."""
    return [part for parts in lists for part in parts]
