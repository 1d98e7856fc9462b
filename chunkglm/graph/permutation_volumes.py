"""Permutation inference that needs whole volumes: cluster size, cluster mass, TFCE.

No statistics here: :mod:`chunkglm.kernels.volume_stats` does them. Unlike
max-T (a max over voxel blocks, :mod:`chunkglm.graph.permutation`), a
cluster or a TFCE value needs every voxel of a permuted t map at once, so the
work is split over *permutations* instead of voxels::

    maps --residualise (per voxel block)--> resid (n_samples, V), gathered once
    resid --scattered once--> batch_j --batch_volume_null--> per-permutation maxima
    maxima of all batches, concatenated in permutation order --> FWE p-values

With a ``distributed`` client active, ``resid`` is one task's result (a graph
literal the scheduler can send again if the worker holding it is lost), fetched
once by each worker, and each permutation batch is a task on it; otherwise the batches are tasks of a plain dask graph sharing one
``resid`` node (threads by default).
"""

from __future__ import annotations

import math
import os

import dask
import dask.array as da
import numpy as np

from chunkglm.errors import InputError
from chunkglm.graph.evaluate import active_client, compute_items
from chunkglm.kernels import permutation as kp
from chunkglm.kernels import volume_stats as vs

__all__ = ["volume_null"]


def volume_null(target_vars, mask, tested_vars, confounding_vars=None, model_intercept=True,
                n_perm=10000, two_sided_test=False, random_state=None, permutations=None,
                threshold=None, tfce=False, batch_size=None, n_jobs=1, progress=None,
                compute_with=()) -> dict:
    """nilearn's ``permuted_ols`` with cluster-level and TFCE inference, for one variable.

    Parameters
    ----------
    target_vars : ndarray or dask.array.Array of shape (n_samples, n_voxels)
        The maps (image, voxel); voxel j is the j-th true voxel of ``mask``
        in C order (the order of ``NiftiMasker``).
    mask : ndarray of bool, 3-D
        The mask of the maps, with ``n_voxels`` true voxels.
    tested_vars : array-like of shape (n_samples,) or (n_samples, 1)
        The tested variable (design matrix times the contrast).
    confounding_vars : array-like of shape (n_samples, n_covars) or None
        Design columns fitted but not tested.
    model_intercept : bool, default=True
        As nilearn: add a constant confound unless the test is an intercept test.
    n_perm : int, default=10000
        Number of permutations (>= 1); ignored when ``permutations`` is given.
    two_sided_test : bool, default=False
        Test |t|; clusters are formed from t > u and t < -u separately.
    random_state : None, int or numpy.random.RandomState
        nilearn's seed: the same value gives nilearn's permutations.
    permutations : array-like of shape (n_perm, n_samples) or None
        Explicit effective permutations: +1/-1 sign-flips for a sign-flip
        design, sample orders otherwise (see
        :func:`chunkglm.kernels.permutation.check_permutations`).
    threshold : float or None
        Cluster-forming p-value threshold in (0, 1) (nilearn's p scale);
        None skips cluster size and mass inference.
    tfce : bool, default=False
        Compute TFCE and its FWE p-values.
    batch_size : int or None
        Permutations per task; None makes about four tasks per worker thread.
        Results do not depend on it.
    n_jobs : int, default=1
        Only to reproduce the stream of nilearn run with this many jobs.
    progress : callable, optional
        Called as ``progress(done, total)`` after each permutation batch.
    compute_with : list of dask.delayed.Delayed, optional
        Computed in the same pass as the residualised maps (e.g. per-block
        counts made by the tasks that read the maps, so they are not read
        twice); returned, computed, under ``computed_with``.

    Returns
    -------
    dict of numpy arrays
        Always ``t``, ``logp_max_t`` (n_voxels,) and ``h0_max_t`` (n_perm,).
        With ``threshold``: ``size`` (int) and ``mass`` (n_voxels,), the size
        and mass of each voxel's cluster (0 outside clusters),
        ``logp_max_size``, ``logp_max_mass`` (n_voxels,), ``h0_max_size``
        (whole numbers in float64, as nilearn) and ``h0_max_mass`` (n_perm,).
        With ``tfce``: ``tfce``, ``logp_max_tfce`` (n_voxels,) and
        ``h0_max_tfce`` (n_perm,). Nulls are in permutation order (nilearn's
        rows, one regressor); maps are 1-D (nilearn's are (1, n_voxels)).
        ``computed_with`` (when ``compute_with`` is given): its values, in order.
    """
    design = kp.prepare_design(tested_vars, confounding_vars, model_intercept)
    geometry = vs.volume_geometry(mask)
    maps = _as_sample_voxel(target_vars, design.n_samples, geometry.n_voxels)
    perms = _permutations(design, n_perm, random_state, permutations, n_jobs)
    _check_batch_size(batch_size)
    threshold_t = None
    if threshold is not None:
        n_columns = vs.nilearn_confound_columns(tested_vars, confounding_vars, model_intercept)
        threshold_t = vs.cluster_forming_t(threshold, bool(two_sided_test), design.n_samples,
                                           n_columns)
    resid, computed_with = _residualised(maps, design, compute_with)
    nulls = _run_batches(resid, design, perms, geometry, bool(two_sided_test), threshold_t,
                         bool(tfce), batch_size, progress)
    out = _outputs(resid, design, geometry, nulls, bool(two_sided_test), threshold_t, bool(tfce))
    return {**out, "computed_with": list(computed_with)} if compute_with else out


def _as_sample_voxel(target_vars, n_samples, n_voxels) -> da.Array:
    maps = target_vars if isinstance(target_vars, da.Array) else da.asarray(target_vars)
    if maps.ndim != 2 or maps.shape != (n_samples, n_voxels):
        raise InputError(f"target_vars must have shape (n_samples={n_samples}, "
                         f"n_voxels={n_voxels}): one row per design row and one column per "
                         f"true voxel of the mask; received shape {maps.shape}. Mask the maps "
                         "with the same mask.")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    return maps.rechunk({0: -1}) if maps.numblocks[0] != 1 else maps


def _permutations(design, n_perm, random_state, permutations, n_jobs):
    if permutations is not None:
        return kp.check_permutations(permutations, design)
    kp.check_n_perm(n_perm)
    return kp.nilearn_permutations(design.n_samples, n_perm, design.sign_flip, random_state, n_jobs)


def _residualised(maps: da.Array, design, compute_with=()) -> tuple[np.ndarray, list]:
    """The whole (n_samples, V) residualised maps, computed block by block, as one array
    (and ``compute_with``, computed in the same pass)."""
    # delayed blocks of the unoptimized graph: ``compute_with`` made from the same tasks
    # shares their read (an optimized array graph would fuse its own copy of the read)
    design_node = dask.delayed(design, pure=True, traverse=False)
    parts = [dask.delayed(kp.residualise_block, pure=True)(block, design_node)
             for block in maps.to_delayed(optimize_graph=False)[0]]
    resid, computed_with = dask.compute(parts, list(compute_with))
    return np.ascontiguousarray(np.concatenate(resid, axis=1)), computed_with


def _check_batch_size(batch_size):
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer or None; received {batch_size!r}.")


def _batches(n_perm, batch_size, n_workers):
    if batch_size is None:
        batch_size = max(1, math.ceil(n_perm / (4 * max(n_workers, 1))))
    return [slice(a, min(a + int(batch_size), n_perm)) for a in range(0, n_perm, int(batch_size))]


def _run_batches(resid, design, perms, geometry, two_sided_test, threshold_t, tfce, batch_size,
                 progress=None):
    client = active_client()
    if client is not None:
        n_workers = sum(client.nthreads().values())
        # a task of its own, not scattered data: lost with a worker, it is sent again (scattered,
        # every batch needing it would be cancelled); each worker fetches it once
        resid_future = client.compute(dask.delayed(resid, traverse=False))
        futures = [client.submit(vs.batch_volume_null, resid_future, design, perms[part],
                                 geometry, two_sided_test, threshold_t, tfce, pure=False)
                   for part in _batches(perms.shape[0], batch_size, n_workers)]
        if progress is not None:
            from distributed import as_completed

            for done, _ in enumerate(as_completed(futures), start=1):
                progress(done, len(futures))
        parts = client.gather(futures)
    else:
        resid_node = dask.delayed(resid, traverse=False)
        design_node = dask.delayed(design, traverse=False)
        geometry_node = dask.delayed(geometry, traverse=False)
        kernel = dask.delayed(vs.batch_volume_null, pure=True)
        parts = compute_items([kernel(resid_node, design_node, perms[part], geometry_node,
                                      two_sided_test, threshold_t, tfce)
                               for part in _batches(perms.shape[0], batch_size, os.cpu_count())],
                              progress)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _outputs(resid, design, geometry, nulls, two_sided_test, threshold_t, tfce):
    t = kp.original_t(resid, design)
    out = {"t": t, "logp_max_t": kp.fwe_logp(t, nulls["h0_max_t"], two_sided_test),
           "h0_max_t": nulls["h0_max_t"]}
    volume = geometry.to_volume(t)
    if threshold_t is not None:
        size_volume, mass_volume, _, _ = vs.cluster_maps(volume, threshold_t, two_sided_test)
        for name, values in (("size", size_volume), ("mass", mass_volume)):
            values = values[geometry.box_mask]
            out[name] = values
            null = nulls[f"h0_max_{name}"]
            out[f"logp_max_{name}"] = -np.log10(vs.null_to_p_larger(values, null))
            out[f"h0_max_{name}"] = nulls[f"h0_max_{name}"]
    if tfce:
        out["tfce"] = vs.tfce_voxels(t, geometry, two_sided_test)
        out["logp_max_tfce"] = kp.fwe_logp(out["tfce"], nulls["h0_max_tfce"], two_sided_test=True)
        out["h0_max_tfce"] = nulls["h0_max_tfce"]
    return out
