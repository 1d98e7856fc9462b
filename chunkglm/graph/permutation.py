"""dask plumbing for max-T permutation inference over voxel blocks.

No statistics here: :mod:`chunkglm.kernels.permutation` does them. The graph::

    block_i --block_max_t(all permutation batches)--> (t_i, null_i)
    null = max over blocks of null_i          (the global max-statistic pass)

Each block of the (sample, voxel) maps is read once and every permutation
batch runs on it in memory (one GEMM per batch); only n_perm numbers per
block leave the task. The permutations are one array in the graph, shipped
once.
"""

from __future__ import annotations

from typing import NamedTuple

import dask
import dask.array as da
import numpy as np

from chunkglm.errors import InputError
from chunkglm.graph.blocks import within_budget
from chunkglm.graph.evaluate import compute_items
from chunkglm.graph.finite import finite_array
from chunkglm.kernels import permutation as kp
from chunkglm.kernels.permutation import fwe_logp, nilearn_permutations, prepare_design

__all__ = ["MaxTNull", "assemble_blocks", "fwe_logp", "max_t_blocks", "max_t_null", "max_t_inference", "nilearn_permutations",
           "prepare_design"]


class MaxTNull(NamedTuple):
    """Lazy results of :func:`max_t_null`.

    Attributes
    ----------
    t : dask.array.Array of shape (n_voxels,)
        t-scores of the tested variable on the original data.
    h0_max_t : dask.array.Array of shape (n_perm,)
        Max over voxels of t (|t| when two-sided) per permutation, in
        permutation order (nilearn's ``h0_max_t`` row).
    design : PermutationDesign
        The prepared design (``design.sign_flip`` says which scheme was used).
    permutations : numpy.ndarray of shape (n_perm, n_samples)
        The effective sign-flips or sample orders that were applied.
    blocks : list of dask.delayed.Delayed
        Per voxel block, the pair (t_block, null_block) that ``t`` and
        ``h0_max_t`` are assembled from (to evaluate block by block, e.g.
        with a progress bar, then :func:`assemble_blocks`).
    """

    t: da.Array
    h0_max_t: da.Array
    design: kp.PermutationDesign
    permutations: np.ndarray
    blocks: list


def max_t_null(target_vars, tested_vars, confounding_vars=None, model_intercept=True,
               n_perm=10000, two_sided_test=False, random_state=None, permutations=None,
               batch_size=None, n_jobs=1) -> MaxTNull:
    """Build the graph of nilearn's max-T permutation test (``permuted_ols``) for one variable.

    Parameters
    ----------
    target_vars : dask.array.Array or ndarray of shape (n_samples, n_voxels)
        The maps (image, voxel), chunked over voxels. A sample axis split in
        several chunks is joined (each block needs all samples).
    tested_vars : array-like of shape (n_samples,) or (n_samples, 1)
        The tested variable: design matrix times the second-level contrast.
    confounding_vars : array-like of shape (n_samples, n_covars) or None
        The design columns the contrast does not touch.
    model_intercept : bool, default=True
        As nilearn: add a constant confound unless the test is an intercept test.
    n_perm : int, default=10000
        Number of permutations (>= 1); ignored when ``permutations`` is given.
    two_sided_test : bool, default=False
        Use max |t| (nilearn's ``non_parametric_inference`` default is False).
    random_state : None, int or numpy.random.RandomState
        nilearn's seed: the same value draws nilearn's exact permutations
        (see :func:`~chunkglm.kernels.permutation.nilearn_permutations`).
    permutations : array-like of shape (n_perm, n_samples) or None
        Explicit effective permutations: +1/-1 sign-flips for a sign-flip
        design, sample orders otherwise. Overrides ``n_perm``/``random_state``.
    batch_size : int or None
        Permutations per GEMM; None sizes each batch to about 64 MiB.
    n_jobs : int, default=1
        Only to reproduce the stream of nilearn run with this many jobs.

    Returns
    -------
    MaxTNull
        Lazy ``t`` and ``h0_max_t``; compute them together to read each block once.
    """
    design = kp.prepare_design(tested_vars, confounding_vars, model_intercept)
    maps = _as_sample_voxel(target_vars, design.n_samples)
    if permutations is None:
        kp.check_n_perm(n_perm)
        perms = kp.nilearn_permutations(design.n_samples, n_perm, design.sign_flip, random_state,
                                        n_jobs)
    else:
        perms = kp.check_permutations(permutations, design)
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise InputError(f"batch_size must be a positive integer or None; received {batch_size!r}.")
    t, null, parts = _block_graph(maps, design, perms, bool(two_sided_test), batch_size)
    return MaxTNull(t, null, design, perms, parts)


def max_t_inference(target_vars, tested_vars, confounding_vars=None, model_intercept=True,
                    n_perm=10000, two_sided_test=False, random_state=None, permutations=None,
                    batch_size=None, n_jobs=1) -> dict:
    """Compute max-T inference eagerly; nilearn's ``permuted_ols`` outputs for one variable.

    Parameters are those of :func:`max_t_null`.

    Returns
    -------
    dict
        ``t`` (n_voxels,), ``logp_max_t`` (n_voxels,) and ``h0_max_t``
        (n_perm,), all float64 numpy arrays.
    """
    lazy = max_t_null(target_vars, tested_vars, confounding_vars, model_intercept, n_perm,
                      two_sided_test, random_state, permutations, batch_size, n_jobs)
    t, null = dask.compute(lazy.t, lazy.h0_max_t)
    return {"t": t, "logp_max_t": fwe_logp(t, null, two_sided_test), "h0_max_t": null}


def max_t_blocks(maps, tested_vars, confounding_vars=None, model_intercept=True, n_perm=10000,
                 two_sided_test=False, random_state=None, permutations=None, n_jobs=1,
                 progress=None, budget=None) -> tuple[np.ndarray, np.ndarray, int]:
    """nilearn's max-T test evaluated voxel block by voxel block, NaN/inf counted on the way.

    As nilearn's masker, non-finite values of the maps count as 0
    (:func:`chunkglm.graph.finite.finite_array`); each block's task reads the
    block once for both its part of the test and its count.

    Parameters
    ----------
    maps : dask array (n_samples, n_voxels), floating
    progress : callable, optional
        ``progress(done, total)`` as each voxel block is done.
    budget : chunkglm.chunking.MemoryBudget, int, str or None
        Stored chunks larger than it are split into task blocks
        (:func:`chunkglm.graph.blocks.within_budget`); None keeps them.
    Other parameters are :func:`max_t_null`'s.

    Returns
    -------
    t : ndarray (n_voxels,)
    h0_max_t : ndarray (n_perm,)
    nonfinite : int
        Voxels that held a NaN or inf value.
    """
    data, counts = finite_array(within_budget(maps, budget))
    lazy = max_t_null(data, tested_vars, confounding_vars, model_intercept, n_perm, two_sided_test,
                      random_state, permutations, None, n_jobs)
    # each block's result with its count: the same task read the block for both
    pairs = [dask.delayed(tuple, pure=True)([part, count]) for part, count in zip(lazy.blocks, counts)]
    done = compute_items(pairs, progress)
    t, null = assemble_blocks([part for part, _ in done])
    return t, null, sum(count for _, count in done)


def _as_sample_voxel(target_vars, n_samples) -> da.Array:
    maps = target_vars if isinstance(target_vars, da.Array) else da.asarray(target_vars)
    if maps.ndim != 2 or maps.shape[0] != n_samples:
        raise InputError(f"target_vars must have shape (n_samples={n_samples}, n_voxels) to match "
                         f"the tested variable; received shape {maps.shape}. Give one row per "
                         "image (one map per design row).")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if maps.numblocks[0] != 1:
        maps = maps.rechunk({0: -1})
    return maps


def _block_graph(maps: da.Array, design, perms, two_sided_test, batch_size):
    perms_node = dask.delayed(perms, pure=True)
    design_node = dask.delayed(design, pure=True, traverse=False)
    kernel = dask.delayed(kp.block_max_t, pure=True, nout=2)
    # unoptimized: the blocks keep their tasks' keys, so what else a caller computes from
    # the same tasks (e.g. non-finite counts, graph.finite) shares their single read
    parts = [kernel(block, design_node, perms_node, two_sided_test, batch_size)
             for block in maps.to_delayed(optimize_graph=False)[0]]
    t = da.concatenate([da.from_delayed(part[0], shape=(size,), dtype=np.float64)
                        for part, size in zip(parts, maps.chunks[1])])
    null = dask.delayed(_max_over_blocks, pure=True)([part[1] for part in parts])
    return t, da.from_delayed(null, shape=(perms.shape[0],), dtype=np.float64), parts


def assemble_blocks(block_results) -> tuple[np.ndarray, np.ndarray]:
    """``(t, h0_max_t)`` from the computed :attr:`MaxTNull.blocks`, in block order."""
    t = np.concatenate([np.asarray(part[0], dtype=np.float64) for part in block_results])
    return t, _max_over_blocks([part[1] for part in block_results])


def _max_over_blocks(block_nulls):
    """Max over blocks per permutation; NaN only where every block is NaN (all-zero maps)."""
    return np.fmax.reduce(np.stack(block_nulls), axis=0)
