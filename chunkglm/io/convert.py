"""``chunkglm.convert``: BIDS derivatives or NIfTI files -> a cohort store.

Three steps, in order: *plan* (read headers and masks only; every input error
is raised here, before anything is written), *grids* (the driver writes the
small grid nodes), *runs* (one task per run, in parallel on the cluster; each
task writes its own node and marks it complete last). Re-running skips nodes
that are complete and whose source file is unchanged, and redoes the others.

The root's consolidated listing is kept in batches
(:class:`chunkglm.io.consolidated.Batch`): the nodes to create are listed
incomplete in one rewrite before the tasks start, the tasks merge nothing, and
this process merges the nodes whose tasks ended, many per rewrite, and a last
time (with the provenance record) before ``convert`` returns.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from distributed import as_completed, wait

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_TASK_MEMORY, as_bytes
from chunkglm.errors import ConversionError, CorruptInputError, InputError, NodeBusyError
from chunkglm.io import consolidated
from chunkglm.io import layout as st
from chunkglm.io import locks
from chunkglm.io.bids import RunFiles, bids_name, discover_runs, parse_entities
from chunkglm.io.nifti import NiftiInfo, NiftiReader, read_info
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.write_maps import MapsJob, convert_maps
from chunkglm.io.sources import file_sha256, same_source, source_key
from chunkglm.io.write_run import RunJob, convert_run, existing_result
from chunkglm.provenance import Stopwatch, cluster_summary, record

__all__ = ["ConversionReport", "convert", "file_sha256", "plan_conversion"]


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes
    ----------
    store : str
        The store location (credentials removed).
    converted, skipped : list of str
        Node paths written now / already complete and unchanged.
    grids : list of str
        Grid ids the inputs use.
    """

    store: str
    converted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    grids: list = field(default_factory=list)


@dataclass
class _Plan:
    grids: dict
    runs: list
    maps: list
    options: dict
    #: Node path -> why its file cannot be read (a damaged gzip stream): it fails alone.
    failed: dict = field(default_factory=dict)


def convert(inputs, store, *, task=None, space=None, subjects=None, sessions=None,
            derivatives_folder="derivatives/fmriprep", mask_img=None, collection="images",
            map_type="effect", storage_options=None, input_storage_options=None, client=None,
            chunk_bytes=DEFAULT_CHUNK_BYTES, task_memory=DEFAULT_TASK_MEMORY, overwrite=False,
            progress=None, target_affine=None, target_shape=None,
            smoothing_fwhm=None, command=None, surface=None) -> ConversionReport:
    """Convert fMRI images into a chunked zarr cohort store.

    Parameters
    ----------
    inputs : str, Path or list of them
        A BIDS dataset root or fMRIPrep derivatives folder, or NIfTI files:
        4-D files become ``runs/<name>`` nodes, 3-D files are stacked into
        ``maps/<collection>``. Surface runs too: a BIDS folder with ``space``
        ``fsaverage*`` (fMRIPrep's GIFTI pairs) or ``fsLR`` (its CIFTI dense
        series), or ``*_hemi-L/R_*.func.gii`` / ``*.dtseries.nii`` files
        (see :mod:`chunkglm.io.convert_surface`).
    store : str or Path
        Local path or fsspec URL (``s3://bucket/cohort.zarr``).
    task, space, subjects, sessions : str or list, optional
        BIDS filters (labels with or without their ``task-`` etc. prefix).
        A ``space`` starting with ``fsaverage`` or ``fsLR`` converts that
        space's surface runs; for GIFTI files, the mesh nilearn ships of that
        name (default: the files' ``space-`` entity).
    mask_img : str, path, URL or nibabel image, optional
        A 3-D mask defining the voxel axis. By default the union of the runs'
        ``desc-brain_mask`` images (BIDS), else every voxel of the grid.
    collection, map_type : str
        Node name and variable name for 3-D inputs.
    storage_options, input_storage_options : dict, optional
        fsspec options for the store and for the inputs (e.g. S3 endpoint and
        credentials). Used to connect only: never written anywhere.
    client : distributed.Client, optional
        Cluster to run on; default the active client, else this process.
    chunk_bytes : int or str
        Target uncompressed bytes per chunk (voxel blocks are sized to it).
    task_memory : int or str
        Memory one run's task may hold; larger runs stream through a staging
        array (peak stays under this).
    overwrite : bool
        Replace complete nodes whose source file changed (default: refuse).
    progress : callable, optional
        Called as ``progress(done, total, node)`` after each node.
    target_affine, target_shape : optional
        Resample every run onto this grid while converting (continuous
        interpolation, volume by volume, as nilearn's maskers; the mask is
        resampled with nearest neighbours).
    smoothing_fwhm : float, optional
        Smooth every volume (after resampling) with nilearn's ``smooth_img``.
    command : dict, optional
        The command-line arguments that asked for this conversion, kept in
        the provenance record (secrets are stripped).
    surface : {"gifti", "cifti"}, optional
        Convert the BIDS ``space``'s surface runs of this kind (default:
        GIFTI pairs for ``fsaverage*``, CIFTI dense series for ``fsLR``).
        Surface runs take no ``mask_img``, resampling, smoothing or
        ``input_storage_options`` (refused), and ``progress`` is called for
        each node once they are all converted.

    Returns
    -------
    ConversionReport

    Raises
    ------
    InputError
        Missing or unusable inputs; raised before anything is written.
    ConversionError
        Some nodes failed while others were written; lists the failures.
    """
    if _is_surface_request(inputs, space, surface):
        return _convert_surface(inputs, store, locals())
    stopwatch = Stopwatch()
    plan = plan_conversion(inputs, task=task, space=space, subjects=subjects, sessions=sessions,
                           derivatives_folder=derivatives_folder, mask_img=mask_img,
                           collection=collection, map_type=map_type,
                           input_storage_options=input_storage_options,
                           chunk_bytes=as_bytes(chunk_bytes), task_memory=as_bytes(task_memory),
                           preprocessing=SpatialPreprocessing(target_affine, target_shape, smoothing_fwhm))
    root = st.open_root(store, storage_options, mode="a")
    locks.remove_leftovers(root)  # of conversions killed before (their locks, temporary files)
    report = ConversionReport(store=st.redact_url(str(store)), grids=sorted(plan.grids))
    for grid in plan.grids.values():
        st.write_grid(root, grid)
    jobs, new = _pending_jobs(root, plan, report, overwrite, input_storage_options)
    for kind in ("runs", "maps"):  # listed incomplete (one rewrite) before any task writes them
        st.list_incomplete(root, kind, [job.name for k, job in jobs if k == kind and f"{kind}/{job.name}" in new])
    listing = consolidated.Batch(root)
    try:
        results, failures = _execute(jobs, _store_arg(store), storage_options, input_storage_options, client,
                                     progress, listing)
        failures = {**plan.failed, **failures}
        results = _check_converted(root, results, failures)
        report.converted = [f"{kind}/{r['name']}" for kind, r in results]
        unrecorded = _unrecorded(root, plan, report.skipped, input_storage_options)
        if results or unrecorded:
            record = _provenance(plan, results + unrecorded, client, stopwatch, command)
            listing.add(st.add_provenance(root, record, listed=False))
    finally:
        listing.flush()  # also when interrupted: the nodes written so far are listed complete
    # the listing of nodes completed or switched by a conversion cut off before its merge is mended
    # (its grids too: one cut off between a grid's completion and its merge left the grid listed
    # with the stand-in document of a node not yet written, without its attributes and arrays;
    # and the provenance records, when one was written just before the cut)
    consolidated.mend(root, [f"grids/{grid_id}" for grid_id in plan.grids]
                      + [f"{kind}/{job.name}" for kind, jobs in (("runs", plan.runs), ("maps", plan.maps))
                         for job in jobs] + [st.PROVENANCE])
    if failures:
        raise ConversionError(_failure_message(failures, report), failures)
    return report


def _is_surface_request(inputs, space, surface) -> bool:
    """:func:`chunkglm.io.convert_surface.is_surface_request`, its module imported here.

    chunkglm.io.convert_surface brings nilearn.surface (scikit-learn, scipy.stats: ~100 MiB
    resident); the worker processes import this module for its volume tasks (:func:`_task`) and
    need none of it.
    """
    from chunkglm.io.convert_surface import is_surface_request

    return is_surface_request(inputs, space, surface)


def _convert_surface(inputs, store, given) -> ConversionReport:
    """Surface runs: converted by :func:`chunkglm.io.convert_surface.convert_surface`."""
    from chunkglm.io.convert_surface import convert_surface

    volume = {key: given[key] for key in ("mask_img", "target_affine", "target_shape", "smoothing_fwhm",
                                          "input_storage_options")}
    options = {key: given[key] for key in ("chunk_bytes", "task_memory", "storage_options", "overwrite", "client")}
    converted, skipped, grids = convert_surface(
        inputs, store, space=given["space"], surface=given["surface"], task=given["task"],
        subjects=given["subjects"], sessions=given["sessions"], derivatives_folder=given["derivatives_folder"],
        options=options, volume_options=volume, command=given["command"])
    nodes = converted + skipped
    for done, node in enumerate(nodes, 1):
        _report(given["progress"], done, len(nodes), node)
    return ConversionReport(store=st.redact_url(str(store)), converted=converted, skipped=skipped, grids=grids)


def _unrecorded(root, plan, skipped, storage_options) -> list[tuple[str, dict]]:
    """The skipped (complete, same source) nodes that no provenance record names: written by a
    conversion killed before its record. This conversion's record names them."""
    named = {entry.get("node") for old in st.provenance_records(root) for entry in old.get("inputs", [])}
    jobs = {f"{kind}/{job.name}": (kind, job) for kind, jobs in (("runs", plan.runs), ("maps", plan.maps))
            for job in jobs}
    found = []
    for path in skipped:
        if path not in named and path in jobs:
            result = existing_result(root, *jobs[path], storage_options)
            if result is not None:
                found.append((jobs[path][0], result))
    return found


def _store_arg(store):
    """Workers may run elsewhere: pass local stores as absolute paths."""
    if isinstance(store, str | Path) and not st.is_url(str(store)):
        return str(Path(str(store).removeprefix("file://")).absolute())
    return store


def plan_conversion(inputs, *, task=None, space=None, subjects=None, sessions=None,
                    derivatives_folder="derivatives/fmriprep", mask_img=None, collection="images",
                    map_type="effect", input_storage_options=None, chunk_bytes=DEFAULT_CHUNK_BYTES,
                    task_memory=DEFAULT_TASK_MEMORY, preprocessing=None) -> _Plan:
    """Read headers and masks, validate, and decide every node to write."""
    prep = preprocessing or SpatialPreprocessing()
    options = {"task": task, "space": space, "subjects": subjects, "sessions": sessions,
               "mask_img": None if mask_img is None else (
                   "<image in memory>" if hasattr(mask_img, "get_fdata") else st.redact_url(str(mask_img))),
               "chunk_bytes": chunk_bytes, "task_memory": task_memory, **prep.to_attrs()}
    sizes = {"chunk_bytes": chunk_bytes, "task_memory": task_memory, "preprocessing": prep}
    user_mask = _read_mask(mask_img, input_storage_options) if mask_img is not None else None
    if _is_bids_folder(inputs):
        runs = discover_runs(inputs, task=task, space=space, subjects=subjects,
                             sessions=sessions, derivatives_folder=derivatives_folder)
        failed = {}
        grids, run_jobs = _plan_runs(runs, user_mask, input_storage_options, sizes, failed=failed)
        return _Plan(grids, run_jobs, [], {**options, "inputs": "bids"}, failed)
    paths = _as_paths(inputs)
    infos, failed = _read_infos(paths, input_storage_options)
    run_files = [RunFiles(bold=p, entities=_file_entities(p)) for p, i in infos.items() if _is_run(i)]
    map_paths = [p for p, i in infos.items() if not _is_run(i)]
    grids, run_jobs = _plan_runs(run_files, user_mask, input_storage_options, sizes, infos)
    maps_jobs = []
    if map_paths:
        if prep.active:
            raise InputError("resampling/smoothing at conversion applies to 4-D runs; 3-D maps "
                             f"were given ({map_paths[:2]}). Convert them separately.")
        sizes = {k: v for k, v in sizes.items() if k != "preprocessing"}
        grid, job = _plan_maps(map_paths, infos, user_mask, collection, map_type, input_storage_options, sizes)
        grids[grid.grid_id] = grid
        maps_jobs.append(job)
    return _Plan(grids, run_jobs, maps_jobs, {**options, "inputs": "files"}, failed)


def _is_bids_folder(inputs) -> bool:
    return isinstance(inputs, str | Path) and not st.is_url(str(inputs)) and Path(inputs).is_dir()


def _as_paths(inputs) -> list[str]:
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not items:
        raise InputError("no inputs given: pass a BIDS folder or a list of NIfTI files.")
    paths = [str(p) for p in items]
    missing = [p for p in paths if not st.is_url(p) and not Path(p).is_file()]
    if missing:
        raise InputError(f"{len(missing)} input file(s) not found, e.g. {missing[:3]}. Nothing was written.")
    return paths


def _read_infos(paths, storage_options) -> tuple[dict[str, NiftiInfo], dict[str, str]]:
    """Headers of the files; a file whose gzip stream is damaged fails alone (node -> why)."""
    infos, failed = {}, {}
    for path in paths:
        try:
            infos[path] = read_info(path, storage_options)
        except CorruptInputError as err:
            failed[f"runs/{_node_name(_file_entities(path))}"] = f"{type(err).__name__}: {err}"
    for path, info in infos.items():
        if len(info.shape) not in (3, 4) or (len(info.shape) == 4 and info.shape[3] < 1):
            raise InputError(
                f"{path} has shape {info.shape}: chunkglm converts 3-D images (maps) and "
                "4-D images (runs). Nothing was written."
            )
    return infos, failed


def _is_run(info: NiftiInfo) -> bool:
    return len(info.shape) == 4


def _file_entities(path: str) -> dict:
    entities = parse_entities(path)
    if "sub" in entities:
        return {k: v for k, v in entities.items() if k not in ("desc", "space", "res")}
    stem = Path(path).name.split(".")[0]
    return {"name": "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)}


def _node_name(entities: dict) -> str:
    return entities.get("name") or bids_name(entities)


def _read_mask(path, storage_options):
    """A 3-D mask image (path, URL or nibabel image) -> (affine, bool array); non-zero voxels are in."""
    if hasattr(path, "get_fdata") and hasattr(path, "affine"):  # an image in memory
        shape = path.shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
            raise InputError(f"the mask image has shape {shape}; a mask is a 3-D image.")
        data = np.asanyarray(path.dataobj).reshape(shape[:3])
        return np.asarray(path.affine, dtype=float), (data != 0).copy()
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"mask_img must be a path, a URL or a nibabel image; received {type(path).__name__}.")
    with NiftiReader(path, storage_options) as reader:
        info = reader.info
        if len(info.shape) not in (3, 4) or (len(info.shape) == 4 and info.shape[3] != 1):
            raise InputError(f"the mask {path} has shape {info.shape}; a mask is a 3-D image.")
        (_, raw), = reader.iter_volumes(0, 1)
        mask = (raw != 0).reshape(info.volume_shape, order="F")
    return info.affine, mask.copy()


def _plan_runs(runs, user_mask, storage_options, sizes, infos=None, failed=None):
    """Group runs by grid (affine+shape); the grid mask is the union of run masks.

    A run whose gzip stream is damaged is recorded in ``failed`` (node -> why) and left out,
    so the others are still converted."""
    by_grid = defaultdict(list)
    for run in runs:
        try:
            info = (infos or {}).get(run.bold) or read_info(run.bold, storage_options)
        except CorruptInputError as err:
            if failed is None:
                raise
            failed[f"runs/{_node_name(run.entities)}"] = f"{type(err).__name__}: {err}"
            continue
        if not _is_run(info):
            raise InputError(f"{run.bold} has shape {info.shape}; a run must be a 4-D image.")
        key = (tuple(np.round(info.affine, 4).ravel()), info.volume_shape)
        by_grid[key].append((run, info))
    grids, jobs = {}, []
    for members in by_grid.values():
        grid = _grid_for(members, user_mask, storage_options, sizes.get("preprocessing"))
        grids[grid.grid_id] = grid
        jobs.extend(_run_job(run, grid, storage_options, sizes) for run, _ in members)
    _check_names([job.name for job in jobs])
    return grids, jobs


def _grid_for(members, user_mask, storage_options, prep=None) -> st.Grid:
    run, info = members[0]
    space = run.entities.get("space", "")
    prep = prep or SpatialPreprocessing()
    if prep.target_affine is not None:
        return _resampled_grid(members, user_mask, storage_options, prep, space)
    if user_mask is not None:
        return _grid_from_user_mask(user_mask, info, space)
    masks = [run.mask for run, _ in members if run.mask]
    union = np.zeros(info.volume_shape, dtype=bool)
    for path in masks:
        affine, mask = _read_mask(path, storage_options)
        if mask.shape != union.shape or not np.allclose(affine, info.affine, atol=1e-4):
            raise InputError(f"the mask {path} is not on the grid of its run {run.bold}.")
        union |= mask
    if not masks:
        union[...] = True
    return st.Grid(info.affine, union, space)


def _resampled_grid(members, user_mask, storage_options, prep, space) -> st.Grid:
    """The target grid; its mask is the (union of) mask(s) resampled, nearest."""
    affine, shape = prep.grid(None, None)
    if user_mask is not None:
        mask = prep.resample_mask(user_mask[1], user_mask[0])
    else:
        masks = [_read_mask(run.mask, storage_options) for run, _ in members if run.mask]
        mask = np.zeros(shape, dtype=bool) if masks else np.ones(shape, dtype=bool)
        for mask_affine, source_mask in masks:
            mask |= prep.resample_mask(source_mask, mask_affine)
    if not mask.any():
        raise InputError("the mask resampled onto target_affine/target_shape has no voxel left.")
    return st.Grid(affine, mask, space)


def _grid_from_user_mask(user_mask, info, space):
    affine, mask = user_mask
    if mask.shape != info.volume_shape or not np.allclose(affine, info.affine, atol=1e-4):
        raise InputError(
            f"mask_img has shape {mask.shape} and affine\n{affine}\nbut {info.path} has "
            f"shape {info.volume_shape} and affine\n{info.affine}\nResample the mask onto the images' grid."
        )
    if not mask.any():
        raise InputError("mask_img has no non-zero voxel: nothing would be stored.")
    return st.Grid(info.affine, mask, space)


def _run_job(run: RunFiles, grid, storage_options, sizes) -> RunJob:
    name = st.check_node_name(_node_name(run.entities))
    entities = {k: v for k, v in run.entities.items() if k != "name"}
    return RunJob(name=name, bold=run.bold, grid_id=grid.grid_id, entities=entities,
                  metadata=run.metadata, confounds=run.confounds, events=run.events,
                  source_key=source_key(run.bold, storage_options), **sizes)


def _check_names(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"several inputs would become the same node {twice[:3]}; rename the files.")


def _plan_maps(paths, infos, user_mask, collection, map_type, storage_options, sizes):
    first = infos[paths[0]]
    odd = [p for p in paths if infos[p].volume_shape != first.volume_shape
           or not np.allclose(infos[p].affine, first.affine, atol=1e-4)]
    if odd:
        raise InputError(
            f"the images of collection {collection!r} are not on one grid: {paths[0]} has shape "
            f"{first.volume_shape}, but {len(odd)} differ (e.g. {odd[0]}, shape "
            f"{infos[odd[0]].volume_shape}). Resample them onto one grid first. Nothing was written."
        )
    if user_mask is not None:
        grid = _grid_from_user_mask(user_mask, first, "")
    else:
        grid = st.Grid(first.affine, np.ones(first.volume_shape, dtype=bool), "")
    labels = tuple(_node_name(_file_entities(p)) for p in paths)
    _check_names(list(labels))
    subjects = [parse_entities(p).get("sub", "") for p in paths]
    coords = {"subject": np.array(subjects, dtype=str)} if any(subjects) else {}
    job = MapsJob(name=st.check_node_name(collection), images=tuple(paths), grid_id=grid.grid_id,
                  variable=map_type, labels=labels, coords=coords,
                  source_keys=tuple(source_key(p, storage_options) for p in paths), **sizes)
    return grid, job


def _pending_jobs(root, plan, report, overwrite, storage_options=None):
    """Drop jobs whose node is complete with an unchanged source; return the others (kind, job)
    and the paths of those whose node is not complete (new nodes, not replacements)."""
    pending, new = [], set()
    for kind, jobs in (("runs", plan.runs), ("maps", plan.maps)):
        status = st.node_status(root, kind)
        for job in jobs:
            if not status.get(job.name):
                pending.append((kind, job))
                new.add(f"{kind}/{job.name}")
            elif _same_source(root[f"{kind}/{job.name}"], job, storage_options):
                report.skipped.append(f"{kind}/{job.name}")
            elif overwrite:
                pending.append((kind, job))
            else:
                raise InputError(
                    f"the store already has a complete {kind}/{job.name} converted from a "
                    "different or changed file. Pass overwrite=True (--overwrite) to replace "
                    "it, or convert into another store. Nothing was written."
                )
    return pending, new


def _same_source(group, job, storage_options) -> bool:
    """Same path and size, and same mtime or (copied/touched file) same sha256;
    for runs also the same resampling/smoothing."""
    return same_source(st.node_meta(group), job, storage_options)


def _task(kind, job, store, storage_options, input_storage_options):
    """Write one node; its listing is merged by the client's batch (``listed=False``)."""
    fn = convert_run if kind == "runs" else convert_maps
    return kind, fn(job, store, storage_options, input_storage_options, listed=False)


def _execute(jobs, store, storage_options, input_storage_options, client, progress, listing):
    """Run the node tasks (on the cluster when there is one); collect failures.

    Each node whose task ended (written or failed) is added to ``listing``
    (a :class:`~chunkglm.io.consolidated.Batch`), which merges it into the
    root's consolidated metadata with others.
    """
    client = client if client is not None else _default_client()
    results, failures = [], {}
    if client is None:
        for done, (kind, job) in enumerate(jobs, 1):
            try:
                results.append(_task(kind, job, store, storage_options, input_storage_options))
            except Exception as err:  # one bad run must not lose the others
                failures[f"{kind}/{job.name}"] = f"{type(err).__name__}: {err}"
            listing.add(f"{kind}/{job.name}")
            _report(progress, done, len(jobs), f"{kind}/{job.name}")
        return results, failures
    return _execute_distributed(jobs, store, storage_options, input_storage_options, client, progress, listing)


#: Seconds between looks at finished tasks while nodes wait for their batch's merge.
_POLL_SECONDS = 0.1


def _execute_distributed(jobs, store, storage_options, input_storage_options, client, progress, listing):
    """Submit one task per node; return only once every task has ended.

    A worker that dies holding a finished task's result makes dask run the
    task again; tasks are idempotent (a complete node from the same source is
    returned as it is), and the futures are waited on -- re-runs included --
    before they are released, so no task still runs when this returns.
    While ended nodes wait for their merge, finished tasks are looked for
    every :data:`_POLL_SECONDS`, so the batch is merged when due even if no
    other task ends meanwhile.
    """
    token = uuid.uuid4().hex[:8]  # readable keys on the dashboard, unique per call
    futures = {client.submit(_task, kind, job, store, storage_options, input_storage_options,
                             key=f"convert-{kind}-{job.name}-{token}"): f"{kind}/{job.name}"
               for kind, job in jobs}
    results, failures = [], {}
    try:
        finished, done = as_completed(list(futures)), 0
        while not finished.is_empty():
            ready = finished.next_batch(block=not listing.pending)
            if not ready:
                time.sleep(_POLL_SECONDS)
            for future in ready:
                node, done = futures[future], done + 1
                try:
                    results.append(future.result())
                except Exception as err:
                    failures[node] = f"{type(err).__name__}: {err}"
                listing.add(node)
                _report(progress, done, len(futures), node)
            listing.flush_if_due()
        wait(list(futures))  # a task re-run after a worker died is pending again: wait for it
    finally:
        client.cancel(list(futures))
    return results, failures


def _check_converted(root, results, failures):
    """Every node reported converted must be complete now; move the others to failures."""
    status = {kind: st.node_status(root, kind) for kind in ("runs", "maps")}
    kept = []
    for kind, result in results:
        if status[kind].get(result["name"]):
            kept.append((kind, result))
        else:
            failures[f"{kind}/{result['name']}"] = ("its task reported success but the node is not "
                                                    "complete in the store (written over meanwhile?)")
    return kept


def _default_client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _report(progress, done, total, node):
    if progress is not None:
        progress(done, total, node)


def _provenance(plan, results, client, stopwatch, command=None) -> dict:
    """The store's record of this conversion (see :mod:`chunkglm.provenance`)."""
    inputs = []
    for kind, result in results:
        if kind == "runs":
            inputs.append({"node": f"runs/{result['name']}", "path": result["path"], "sha256": result["sha256"], "size": result["size"]})
        else:
            inputs.extend({"node": f"maps/{result['name']}", **src} for src in result["sources"])
    options = {**plan.options, **({"command": command} if command else {})}
    cluster = cluster_summary(client if client is not None else _default_client())
    full = record("convert", inputs=inputs, options=options, cluster=cluster, stopwatch=stopwatch)
    full.pop("chunkglm_provenance")
    return full


#: What to do about each kind of node failure (see :func:`_failure_kind`).
_ADVICE = {
    "busy": "another conversion is writing {nodes}: wait for it to end",
    "space": "the store's disk is full ({nodes}): free space or convert into another location",
    "permission": "the store's location is not writable ({nodes}): fix its permissions or convert "
                  "into another location",
    "input": "fix the inputs of {nodes}",
}


def _failure_kind(message: str) -> str:
    """busy (another writer), space (disk full), permission (read-only) or input."""
    if message.startswith(f"{NodeBusyError.__name__}:"):
        return "busy"
    if "[Errno 28]" in message or "[Errno 122]" in message or "No space left" in message:
        return "space"
    if "[Errno 30]" in message or "[Errno 13]" in message or message.startswith("PermissionError"):
        return "permission"
    return "input"


def _failure_message(failures, report):
    lines = [f"  {node}: {message}" for node, message in sorted(failures.items())]
    by_kind = {}
    for node, message in sorted(failures.items()):
        by_kind.setdefault(_failure_kind(message), []).append(node)
    advice = "; ".join(_ADVICE[kind].format(nodes=", ".join(nodes)) for kind, nodes in by_kind.items())
    return (
        f"{len(failures)} node(s) could not be converted into {report.store}; the other "
        f"{len(report.converted)} were written completely:\n" + "\n".join(lines)
        + f"\n{advice[0].upper() + advice[1:]}; then run the same conversion again: complete nodes are skipped."
    )
