"""Convert one 4-D run into a store node: the task each worker executes.

Memory per task (measured in benchmarks/results/convert.md):

- in memory, when the run's in-mask float32 data (time x voxel) plus two
  chunks fit in ``task_memory``: the masked run once, plus one decompressed
  volume, the read buffers and one chunk per core being encoded -- about 2x
  the masked run at the peak (520 MiB for a 266 MiB realistic run);
- streaming, for larger runs: time slabs of ``task_memory / 4`` go to a
  staging array (slab, chunk copies being encoded, their compressed output:
  about ``task_memory / 2``), then each final chunk is assembled from the
  staging pieces and written: at most ``task_memory`` plus ~4 chunks
  (``chunk_bytes``), independent of the run's length.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_TASK_MEMORY, plan_row_slabs, plan_voxel_chunks
from chunkglm.errors import InputError
from chunkglm.io import layout as st
from chunkglm.io.locks import node_lock
from chunkglm.io.nifti import NiftiReader, fortran_indices, header_to_text, scale_values
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.sources import file_sha256, same_source, source_key

__all__ = ["RunJob", "convert_run", "existing_result", "source_key", "write_events", "write_rows"]

_STAGING = "_staging"


@dataclass(frozen=True)
class RunJob:
    """Everything a worker needs to convert one run (no credentials stored)."""

    name: str
    bold: str
    grid_id: str
    entities: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    confounds: str | None = None
    events: str | None = None
    source_key: dict = field(default_factory=dict)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    task_memory: int = DEFAULT_TASK_MEMORY
    preprocessing: SpatialPreprocessing = field(default_factory=SpatialPreprocessing)


def convert_run(job: RunJob, store, storage_options=None, input_storage_options=None, *,
                replace=False, listed=True) -> dict:
    """Write ``runs/<job.name>``; return a summary (name, sha256, size, shape).

    Idempotent: a node already complete from the same source is returned as
    it is (a task dask runs twice does nothing the second time), unless
    ``replace`` (a repair). A complete node is never deleted: its new version
    is written beside it as a new version and switched to at its completion
    marker (:func:`chunkglm.io.layout.begin_version`), so readers see the old
    or the new version, never a mix. The completion marker is written last,
    so an interrupted task leaves a node the next run redoes. The node's lock
    is held throughout: a second conversion of it at the same time gets
    :class:`~chunkglm.errors.NodeBusyError`.
    ``listed`` False: a new node is not merged into the root's consolidated
    metadata here (its caller listed it incomplete before and merges it after
    the task, in a batch: :class:`chunkglm.io.consolidated.Batch`).
    """
    root = st.open_root(store, storage_options, mode="a")
    with node_lock(root, "runs", job.name, st.redact_url(str(store))):  # NodeBusyError for a second writer
        st.resume_swap(root, "runs", job.name)
        done = None if replace else existing_result(root, "runs", job, input_storage_options)
        if done is not None:
            return done
        return _convert(root, store, job, input_storage_options, listed)


def _convert(root, store, job, input_storage_options, listed) -> dict:
    grid = _cached_grid(root, store, job.grid_id)
    with NiftiReader(job.bold, input_storage_options) as reader:
        info = reader.info
        _check_run_grid(info, grid, job.bold, job.preprocessing)
        _check_repetition_time(job, info)
        _check_start_time(job, info)
        confounds = _read_table(job.confounds, input_storage_options)
        _check_confounds(confounds, info.n_volumes, job)
        events = _read_table(job.events, input_storage_options)
        _check_events(events, job)
        node = st.begin_version(root, "runs", job.name, listed=listed)
        try:
            sha256, size = _write_run(node, job, reader, grid, input_storage_options)
            _write_tables(node, confounds, events, info)
            st.write_voxel_coordinate(node, grid)
        except BaseException:
            st.discard_version(root, node, listed=listed)
            raise
    source = {**job.source_key, "sha256": sha256, "size": size}
    meta = {"kind": "run", "source": source, "preprocessing": job.preprocessing.to_attrs(),
            "inputs": _job_record(job, input_storage_options)}
    if job.preprocessing.target_affine is None:  # the original header still describes the grid
        meta["nifti_header"] = header_to_text(info.header_bytes)
    st.finish_node(node, _run_attrs(job, info), meta)
    st.publish_version(root, "runs", job.name, node, listed=listed)
    return {"name": job.name, "path": job.source_key.get("path", st.redact_url(job.bold)),
            "sha256": sha256, "size": size, "shape": [info.n_volumes, grid.n_voxels]}


def _write_run(node, job, reader, grid, input_storage_options):
    info = reader.info
    plan = plan_voxel_chunks(info.n_volumes, grid.n_voxels, 4, job.chunk_bytes)
    clip_range = _data_range(job, input_storage_options) if job.preprocessing.needs_range() else None
    fill = _row_filler(reader, grid, job.preprocessing, clip_range)
    write_rows(node, "bold", ("time", "voxel"), plan, fill, job.task_memory, job.bold)
    return reader.finish()


def existing_result(root, kind, job, storage_options=None) -> dict | None:
    """The summary of a node already complete from ``job``'s files, else None."""
    path = f"{kind}/{job.name}"
    if path not in root or not st.is_complete(root[path]):
        return None
    meta = st.node_meta(root[path])
    if not same_source(meta, job, storage_options):
        return None
    if kind == "maps":
        return {"name": job.name, "n_images": len(job.images), "sources": meta["sources"]}
    source = meta["source"]
    bold = root[st.data_path(path, meta)]["bold"]
    return {"name": job.name, "path": source["path"], "sha256": source["sha256"],
            "size": source["size"], "shape": list(bold.shape)}


def _job_record(job, storage_options) -> dict:
    """What a repair needs to convert the run again: its tables (with sha256) and sizes."""
    tables = {}
    for role in ("confounds", "events"):
        path = getattr(job, role)
        if path is not None:
            local = path if st.is_url(path) else os.path.abspath(path)
            tables[role] = {"path": st.redact_url(local), "sha256": file_sha256(path, storage_options)}
    return {"tables": tables, "chunk_bytes": job.chunk_bytes,
            "task_memory": job.task_memory}


_GRID_CACHE: dict = {}


def _cached_grid(root, store, grid_id):
    """Grids are small and immutable: read each once per worker process."""
    key = (str(store), grid_id)
    if key not in _GRID_CACHE:
        _GRID_CACHE[key] = st.read_grid(root, grid_id)
    return _GRID_CACHE[key]


def _check_run_grid(info, grid, path, preprocessing):
    if len(info.shape) == 4 and preprocessing.target_affine is not None:
        return  # resampled onto the grid volume by volume
    if len(info.shape) != 4 or any(n != m for n, m in zip(info.volume_shape, grid.shape)):
        raise InputError(
            f"{path} has shape {info.shape}; its run needs a 4-D image on the grid "
            f"{grid.shape}. Resample it onto the mask's grid first."
        )
    if not np.allclose(info.affine, grid.affine, atol=1e-4):
        raise InputError(f"{path}: its affine differs from its mask's affine:\n{info.affine}\nvs\n{grid.affine}")


def _data_range(job, storage_options):
    """[min(data, 0), max(data, 0)] of the whole run, as nilearn's resample_img clips.

    A separate pass over the input (only when resampling)."""
    low, high = 0.0, 0.0
    with NiftiReader(job.bold, storage_options) as reader:
        info = reader.info
        for _, raw in reader.iter_volumes():
            values = scale_values(raw, info.slope, info.inter)
            low, high = min(low, float(np.nanmin(values))), max(high, float(np.nanmax(values)))
    return low, high


def _row_filler(reader, grid, preprocessing, clip_range=None):
    """``fill(out, start, stop)`` for write_rows: raw volumes -> in-mask float32 rows."""
    if not preprocessing.active:
        fidx = fortran_indices(grid.ijk, grid.shape)
        return lambda out, start, stop: _fill_rows(reader, fidx, out, start, stop)
    i, j, k = grid.ijk.T
    info = reader.info

    def fill(out, start, stop):
        finite = False
        for index, raw in reader.iter_volumes(start=start, stop=stop):
            volume = scale_values(raw, info.slope, info.inter).reshape(info.volume_shape, order="F")
            out[index - start] = preprocessing.apply(volume, info.affine, clip_range)[i, j, k]
            finite = finite or bool(np.isfinite(out[index - start]).any())
        return finite

    return fill


def _fill_rows(reader, fidx, out, start, stop):
    """Decompress volumes [start, stop) into ``out`` rows (in-mask, float32).

    Returns True when any value is finite.
    """
    info = reader.info
    finite = False
    for index, raw in reader.iter_volumes(start=start, stop=stop):
        row = scale_values(raw[fidx], info.slope, info.inter)
        out[index - start] = row
        finite = finite or bool(np.isfinite(row).any())
    return finite


def nan_only_error(what):
    """The error for inputs with no finite value inside the mask."""
    return InputError(
        f"{what} holds only NaN (or inf) inside the mask: there is nothing to model. "
        "Check the input (a failed preprocessing step?) or leave it out."
    )


def write_rows(node, name, dims, plan, fill, task_memory, what):
    """Write a ``(rows, voxel)`` float32 array whose rows come from ``fill``.

    ``fill(out, start, stop)`` writes rows [start, stop) into ``out`` and
    returns whether any value was finite. Rows arrive in order, once each
    (a gzip stream cannot seek). Arrays that fit ``task_memory`` (with room
    for two chunks being encoded) are filled in memory; larger ones go
    through a staging array by row slabs of ``task_memory / 2``. Writes go
    one chunk (or shard) at a time so encoding never holds a second copy.
    """
    n_rows, n_vox = plan.shape
    unit_bytes = n_rows * (plan.shards or plan.chunks)[1] * 4
    final = _create_float_array(node, name, plan.shape, plan.chunks, plan.shards, dims)
    if n_rows * n_vox * 4 + 2 * unit_bytes <= task_memory:
        data = np.empty(plan.shape, dtype=np.float32)
        if not fill(data, 0, n_rows) and n_vox:
            raise nan_only_error(what)
        _write_by_block(final, data, 0, plan.write_slices())
        return
    staging = _stage_rows(node, dims, plan, fill, task_memory, what)
    release_free_memory()
    for block in plan.write_slices():
        final[:, block] = staging[:, block]
    del node[_STAGING]


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it per thread arena).

    Between the staging and copy phases the freed slab buffers would
    otherwise stay in the process's RSS; dask.distributed trims its workers
    the same way.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _create_float_array(node, name, shape, chunks, shards, dims):
    return node.create_array(
        name, shape=shape, dtype="float32", chunks=chunks, shards=shards,
        compressors=st.checked_codecs("float32"), dimension_names=dims,
        fill_value=st.fill_value("float32"), config=st.ARRAY_CONFIG,
    )


def _write_by_block(array, rows, row_start, slices):
    """Write ``rows`` into ``array[row_start:...]``, a few voxel blocks at a time.

    One block per usable core is encoded concurrently: the speed of one big
    write without its memory (a copy and a compressed output of every chunk).
    """
    stop = row_start + len(rows)
    group = max(1, len(os.sched_getaffinity(0)))
    for first in range(0, len(slices), group):
        last = slices[min(first + group, len(slices)) - 1]
        block = slice(slices[first].start, last.stop)
        array[row_start:stop, block] = rows[:, block]


def _stage_rows(node, dims, plan, fill, task_memory, what):
    n_rows, n_vox = plan.shape
    # The slab buffer is about half of what staging holds (the chunk copies
    # being encoded and their compressed outputs are the rest).
    slab = plan_row_slabs(n_rows, n_vox, 4, task_memory // 4)
    staging = _create_float_array(node, _STAGING, plan.shape, (slab, plan.chunks[1]), None, dims)
    any_finite = False
    buffer = np.empty((slab, n_vox), dtype=np.float32)
    for start in range(0, n_rows, slab):
        stop = min(start + slab, n_rows)
        any_finite |= fill(buffer, start, stop)
        _write_by_block(staging, buffer[: stop - start], start, plan.block_slices())
    if not any_finite and n_vox:
        raise nan_only_error(what)
    return staging


def _read_table(path, storage_options):
    if path is None:
        return None
    with fsspec.open(path, "rt", **(storage_options or {})) as handle:
        return pd.read_csv(handle, sep="\t", na_values=["n/a", "NaN", "nan"], keep_default_na=False)


def _check_confounds(confounds, n_volumes, job):
    if confounds is not None and len(confounds) != n_volumes:
        raise InputError(
            f"{job.confounds} has {len(confounds)} rows but {job.bold} has {n_volumes} "
            "volumes: confounds need one row per volume."
        )


def _check_events(events, job):
    """Onsets and durations are numbers of seconds, none missing (nilearn refuses others later)."""
    if events is None:
        return
    for column in ("onset", "duration"):
        if column not in events:
            raise InputError(f"{job.events} has no {column!r} column (it has {list(events.columns)}); "
                             "BIDS events need onset and duration in seconds.")
        values = pd.to_numeric(events[column], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=np.float64)))
        if bad.size:
            raise InputError(
                f"{job.events}: column {column!r} must hold a number of seconds on every row; row "
                f"{bad[0] + 1} has {_shown(events[column].iloc[bad[0]])} ({bad.size} such row(s)). Fix the "
                "events file."
            )


def _shown(value) -> str:
    return "n/a (no value)" if pd.isna(value) else repr(str(value))


#: Events columns that would collide with run variables are stored as ``event_<name>``.
RESERVED_EVENT_COLUMNS = frozenset({"bold", "time", "confound", "confounds", "event"})


def _write_tables(node, confounds, events, info):
    tr = float(info.header.get_zooms()[3]) if len(info.shape) == 4 else 0.0
    st.write_array(node, "time", np.arange(info.n_volumes) * _seconds(tr, info), ("time",),
                   attrs={"units": "s", "long_name": "volume acquisition onset"})
    if confounds is not None:
        numeric = confounds.apply(pd.to_numeric, errors="coerce").astype(np.float64)
        st.write_array(node, "confound", np.array(list(confounds.columns), dtype=str), ("confound",))
        st.write_array(node, "confounds", numeric.to_numpy(), ("time", "confound"))
    if events is not None:
        write_events(node, events)


def write_events(node, events):
    if "onset" not in events or "duration" not in events:
        raise InputError(f"events tables need 'onset' and 'duration' columns; found {list(events.columns)}")
    for column in events.columns:
        name = f"event_{column}" if column in RESERVED_EVENT_COLUMNS else column
        values = events[column]
        if pd.api.types.is_numeric_dtype(values):
            data = values.to_numpy(dtype=np.float64)
        else:
            data = values.fillna("n/a").astype(str).to_numpy(dtype=str)
        st.write_array(node, name, data, ("event",))


def _seconds(tr, info):
    """The 4th zoom in seconds (NIfTI allows ms and us units)."""
    unit = info.header.get_xyzt_units()[1]
    return tr / 1000.0 if unit == "msec" else tr / 1e6 if unit == "usec" else tr


def _check_repetition_time(job, info):
    """The sidecar's RepetitionTime is a positive number and, where the header states a time
    unit, its TR (BIDS requires them equal; a wrong TR misplaces every event in the design)."""
    if "RepetitionTime" not in job.metadata:
        return
    value = job.metadata["RepetitionTime"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
        raise InputError(f"the sidecar of {job.bold} gives RepetitionTime {value!r}; it must be a positive "
                         "number of seconds. Fix the sidecar.")
    zooms = info.header.get_zooms()
    if len(zooms) < 4 or info.header.get_xyzt_units()[1] not in ("sec", "msec", "usec") or not zooms[3] > 0:
        return  # the header states no TR: the sidecar's is the only one
    header = _seconds(float(zooms[3]), info)
    if abs(header - float(value)) > 1e-4 + 1e-3 * max(header, float(value)):
        raise InputError(
            f"{job.bold}: its sidecar gives RepetitionTime {float(value):g} s but its NIfTI header "
            f"{header:g} s. BIDS requires them equal, and a wrong TR misplaces every event of the design "
            "(events past the end of the run, a rank-deficient design). Fix the sidecar or the header."
        )


def _check_start_time(job, info):
    """The sidecar's StartTime (BIDS: when the reference slice was acquired, in seconds from the
    volume's start) is a number in [0, TR]: nilearn's slice_time_ref is StartTime / TR."""
    if "StartTime" not in job.metadata:
        return
    value = job.metadata["StartTime"]
    zooms = info.header.get_zooms()
    tr = job.metadata.get("RepetitionTime", _seconds(float(zooms[3]), info) if len(zooms) > 3 else None)
    number = not isinstance(value, bool) and isinstance(value, int | float) and np.isfinite(value)
    if not number or value < 0 or not tr or value > tr:
        raise InputError(f"the sidecar of {job.bold} gives StartTime {value!r}; it must be a number of "
                         f"seconds from 0 to the RepetitionTime ({tr!r}). Fix the sidecar.")


def _run_attrs(job, info):
    zooms = [float(z) for z in info.header.get_zooms()]
    tr = job.metadata.get("RepetitionTime", _seconds(zooms[3], info) if len(zooms) > 3 else None)
    start = job.metadata.get("StartTime")
    ref = job.metadata.get("slice_time_ref")
    if ref is None and start is not None and tr:
        ref = float(start) / float(tr)
    return {
        "grid_id": job.grid_id,
        "entities": dict(job.entities),
        "subject": job.entities.get("sub"),
        "session": job.entities.get("ses"),
        "task": job.entities.get("task"),
        "run": job.entities.get("run"),
        "RepetitionTime": tr,
        "slice_time_ref": ref,
        "sidecar": dict(job.metadata),
        "zooms": zooms,
        "source_dtype": str(info.dtype),
        "scl_slope": float(info.slope),
        "scl_inter": float(info.inter),
        "shape": list(info.shape),
    }
