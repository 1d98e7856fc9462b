"""Measured steps: each runs alone in a fresh child process.

Usage (the runner does this; by hand only to debug one step)::

    python benchmarks/_steps.py STEP '{"json": "keyword arguments"}'

A step function receives a :class:`Timed` context manager and its keyword
arguments. Everything before ``with timed:`` is set-up (imports, deleting an
old store) and is not measured; the block under ``with timed:`` is the work.
The child prints one line ``BENCH-RESULT {json}`` with

- ``wall_s``: ``time.perf_counter()`` around the work only;
- ``rss_start_mib``: resident memory when the work starts (interpreter plus
  imports: the baseline included in the peak);
- ``peak_rss_mib``: ``ru_maxrss`` of this process right after the work (the
  peak over the whole process life, imports included);
- whatever the step returns (checksums, sizes).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH-RESULT "
READ_BYTES = 8 * 2**20  # the floor reads 8 MiB blocks, as chunkglm's reader does
STEPS = {}


def step(name):
    """Register a step function under ``name``."""
    def register(fn):
        STEPS[name] = fn
        return fn
    return register


class Timed:
    """Context manager: wall time, RSS at start and peak RSS of the work."""

    def __enter__(self):
        self.rss_start_mib = _current_rss_mib()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._start
        self.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return False

    def record(self) -> dict:
        return {"wall_s": self.wall_s, "rss_start_mib": self.rss_start_mib, "peak_rss_mib": self.peak_rss_mib}


def _current_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fingerprint(block) -> dict:
    """Shape and sha256 of a (time, voxel) block as C-ordered float32."""
    import numpy as np

    data = np.ascontiguousarray(block, dtype=np.float32)
    return {"block_shape": list(data.shape), "block_sha256": hashlib.sha256(data.tobytes()).hexdigest()[:16]}


def _drain(handle) -> int:
    """Read a stream to its end through one reused 8 MiB buffer."""
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    total = 0
    while n := handle.readinto(view):
        total += n
    return total


# --- the floor: decompress the input once, keep nothing ---------------------

@step("floor_isal")
def floor_isal(timed, path):
    """ISA-L's threaded reader (file reads overlap decompression): the
    fastest gzip reader installed, slightly ahead of single-threaded igzip."""
    from isal import igzip_threaded

    with timed:
        with igzip_threaded.open(path, "rb", threads=1) as handle:
            n_bytes = _drain(handle)
    return {"decompressed_bytes": n_bytes}


@step("floor_gzip")
def floor_gzip(timed, path):
    import gzip

    with timed:
        with gzip.open(path, "rb") as handle:
            n_bytes = _drain(handle)
    return {"decompressed_bytes": n_bytes}


# --- the anchor: nibabel as nilearn uses it ---------------------------------

@step("anchor_read")
def anchor_read(timed, bold, mask, start, stop):
    """Load, full data as float32, mask (-> time x voxel), one voxel block."""
    import nibabel as nib
    import numpy as np

    with timed:
        data = np.asarray(nib.load(bold).dataobj, dtype=np.float32)
        in_mask = np.asarray(nib.load(mask).dataobj) != 0
        series = data[in_mask].T  # (time, voxel), as nilearn's apply_mask
        block = np.ascontiguousarray(series[:, start:stop])
    return fingerprint(block)


# --- chunkglm ---------------------------------------------------------------

@step("convert")
def convert(timed, inputs, store, task_memory=None, mask_img=None):
    """``chunkglm.convert`` into a fresh store, in this process (client=None).

    ``task_memory=None`` keeps chunkglm's default; ``mask_img`` defines the voxel axis.
    """
    _import_convert_dependencies()
    from chunkglm.io.convert import convert as chunkglm_convert

    options = {} if task_memory is None else {"task_memory": task_memory}
    if mask_img is not None:
        options["mask_img"] = mask_img
    shutil.rmtree(store, ignore_errors=True)
    with timed:
        report = chunkglm_convert(inputs, store, client=None, **options)
    return {"converted": report.converted, "store_mib": _tree_bytes(store) / 2**20}


def _import_convert_dependencies():
    """Modules convert imports lazily: imports are not the work measured."""
    import fsspec  # noqa: F401  (events / confounds tables)
    import isal.igzip  # noqa: F401
    import numcodecs.blosc  # noqa: F401
    import pandas  # noqa: F401
    import zarr  # noqa: F401

    try:  # convert looks for an active dask client when none is given
        import distributed  # noqa: F401
    except ImportError:
        pass


def _tree_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@step("read_zarr")
def read_zarr(timed, store, node):
    """The first chunk of ``runs/<node>/bold`` (all time points), via zarr."""
    import zarr

    block = zarr.open_group(store, mode="r")[f"runs/{node}/bold"].chunks[1]
    with timed:
        array = zarr.open_group(store, mode="r")[f"runs/{node}/bold"]
        data = array[:, 0:block]
    return {**fingerprint(data), "start": 0, "stop": int(data.shape[1])}


@step("read_cohort")
def read_cohort(timed, store, node, start, stop):
    """The same block via ``open_cohort(store).runs[node].data()[:, block].values``."""
    import dask.array  # noqa: F401

    from chunkglm.io.cohort import open_cohort

    with timed:
        data = open_cohort(store).runs[node].data()[:, start:stop].values
    return fingerprint(data)


# --- case "first_level": nilearn vs chunkglm, fit + one contrast -----------

#: The confounds both sides regress out: the 6 motion parameters, CSF and
#: white matter (no n/a in these columns).
CONFOUND_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "csf", "white_matter"]
#: FirstLevelModel parameters, identical for nilearn and chunkglm.
GLM_PARAMS = {"t_r": 2.0, "slice_time_ref": 0.5, "noise_model": "ar1"}
CONTRAST = "a - b"


def _glm_inputs(events, confounds):
    """The events table as given and the chosen confound columns (set-up, untimed)."""
    import pandas as pd

    events_df = pd.read_csv(events, sep="\t", na_values="n/a")
    confounds_df = pd.read_csv(confounds, sep="\t", na_values="n/a")[CONFOUND_COLUMNS]
    return events_df, confounds_df


def _save_maps(maps: dict, out: str, label: str) -> dict:
    """Save the z and effect maps (for the parity check) after the timed work."""
    import nibabel as nib
    import numpy as np

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in ("z_score", "effect_size"):
        path = folder / f"{label}_{name}.nii"
        image = maps[name]
        nib.save(nib.Nifti1Image(np.asarray(image.get_fdata(), dtype=np.float64), image.affine), path)
        saved[name] = str(path)
    return saved


@step("glm_nilearn")
def glm_nilearn(timed, bold, mask, events, confounds, out):
    """nilearn's FirstLevelModel on the NIfTI file: fit + compute_contrast(all)."""
    from nilearn.glm.first_level import FirstLevelModel

    events_df, confounds_df = _glm_inputs(events, confounds)
    model = FirstLevelModel(mask_img=mask, **GLM_PARAMS)
    with timed:
        model.fit(bold, events=events_df, confounds=confounds_df)
        maps = model.compute_contrast(CONTRAST, output_type="all")
    design = model.design_matrices_[0]
    return {"maps": _save_maps(maps, out, "nilearn"), "design_columns": list(design.columns)}


@step("glm_chunkglm")
def glm_chunkglm(timed, mask, events, confounds, out, label, bold=None, store=None, node=None):
    """chunkglm's FirstLevelModel, fit + compute_contrast(all), on either

    - ``bold``: the NIfTI path (fit converts it into a temporary store: timed), or
    - ``store`` + ``node``: a store converted beforehand (opening it is set-up).
    """
    _import_convert_dependencies()
    import dask.array  # noqa: F401
    import nilearn.glm.contrasts  # noqa: F401  (contrast arithmetic, used lazily)
    import nilearn.image  # noqa: F401
    import xarray  # noqa: F401

    from chunkglm.glm.first_level import FirstLevelModel
    from chunkglm.io.cohort import open_cohort

    events_df, confounds_df = _glm_inputs(events, confounds)
    model = FirstLevelModel(mask_img=mask, **GLM_PARAMS)
    opened = time.perf_counter()
    run = bold if store is None else open_cohort(store).runs[node]
    open_s = time.perf_counter() - opened
    with timed:
        model.fit(run, events=events_df, confounds=confounds_df)
        maps = model.compute_contrast(CONTRAST, output_type="all")
    design = model.design_matrices_[0]
    return {"maps": _save_maps(maps, out, label), "design_columns": list(design.columns),
            "open_store_s": open_s if store is not None else None}


# --- case "first_level_cohort": N runs in one graph on a local cluster ------

MiB = 2**20


@step("s3_upload")
def s3_upload(timed, local, url, endpoint):
    """Copy a local store folder to ``url`` on the S3 server at ``endpoint``
    (creating the bucket); set-up of ``scale_out``, credentials from the environment."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    with timed:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        fs.put(local.rstrip("/") + "/", url.removeprefix("s3://"), recursive=True)
    return {"objects": len(fs.find(url.removeprefix("s3://")))}


@step("convert_cluster")
def convert_cluster(timed, inputs, store, n_workers=2):
    """``chunkglm.convert`` of a BIDS dataset on a local cluster (runs in parallel).

    Set-up of ``first_level_cohort`` (run through ``run_child``): the cluster
    start is not timed, the conversion is.
    """
    _import_convert_dependencies()
    from chunkglm.cluster import start
    from chunkglm.io.convert import convert as chunkglm_convert

    shutil.rmtree(store, ignore_errors=True)
    client = start(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", verbose=False)
    try:
        with timed:
            report = chunkglm_convert(inputs, store, client=client)
    finally:
        client.close()
    return {"converted": report.converted, "store_mib": _tree_bytes(store) / MiB}


def _worker_peak_rss() -> int:
    """This worker process's peak RSS (bytes): ``VmHWM``, the high-water mark
    of its own address space since it started.

    Not ``ru_maxrss``: a worker is spawned (fork + exec) by its nanny, which
    lives in the driver process, and Linux carries the forked copy's RSS (the
    driver's, at that moment) into the new program's ``ru_maxrss``.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker_memory(dask_worker) -> tuple:
    """``(rss, {key: bytes})`` of this worker: its resident memory and the
    size of every task result it holds.

    Sizes are measured from the objects: dask's ``sizeof`` does not look
    inside dataclasses, so its own estimate (``dask_worker.state.nbytes``)
    counts chunkglm's per-block results (``GLMFit``, ``BlockMoments``) as a
    few bytes each.
    """
    import dataclasses

    import psutil
    from dask.sizeof import sizeof

    rss = psutil.Process().memory_info().rss
    held = {}
    for key, value in list(dask_worker.data.items()):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            held[str(key)] = sum(sizeof(getattr(value, f.name)) for f in dataclasses.fields(value))
        else:
            held[str(key)] = sizeof(value)
    return rss, held


def _worker_imports() -> None:
    """What the GLM tasks import on a worker: set-up, as the driver's imports."""
    import dask.array  # noqa: F401
    import numcodecs.blosc  # noqa: F401
    import numpy  # noqa: F401
    import psutil  # noqa: F401
    import zarr  # noqa: F401

    import chunkglm.graph.glm  # noqa: F401
    import chunkglm.io.cohort  # noqa: F401
    import chunkglm.kernels.glm  # noqa: F401


class WorkerMemory:
    """Samples every worker's memory (:func:`_worker_memory`) with
    ``client.run`` from a background thread, every ``interval_s``.

    ``samples``: ``(seconds since start, {worker: (rss, {key: bytes})})``.
    Sampling more often than dask's heartbeats catches short peaks; the
    workers' own ``VmHWM`` (read at the end) catches the ones in between.
    """

    def __init__(self, client, interval_s=0.1):
        import threading

        self.client, self.interval_s = client, interval_s
        self.samples, self.errors = [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _loop(self):
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                memory = self.client.run(_worker_memory)
            except Exception:  # a worker restarting: the restart check reports it
                self.errors += 1
            else:
                self.samples.append((began - self._start, memory))
            self._stop.wait(max(0.0, self.interval_s - (time.perf_counter() - began)))

    def summary(self, worker, persisted: set) -> dict:
        """Largest sampled values for ``worker`` (bytes).

        ``persisted``: the keys the worker still holds when the work is done
        (what ``persist_fits`` keeps). ``rss_less_persisted``: RSS less the
        bytes of those keys held at that moment, i.e. the memory that would
        be there if the persisted results lived elsewhere; ``unmanaged``:
        RSS less every result held (interpreter, running tasks' temporaries,
        freed memory not yet returned to the OS).
        """
        out = {"rss": 0, "held": 0, "rss_less_persisted": 0, "unmanaged": 0}
        for _, memory in self.samples:
            if worker not in memory:
                continue
            rss, held = memory[worker]
            kept = sum(size for key, size in held.items() if key in persisted)
            for name, value in (("rss", rss), ("held", sum(held.values())),
                                ("rss_less_persisted", rss - kept), ("unmanaged", rss - sum(held.values()))):
                out[name] = max(out[name], value)
        return out

    def timeline_mib(self, persisted: dict) -> list:
        """``[seconds, RSS, results held, persisted results held]`` (MiB) of
        the worker with the largest RSS, per sample."""
        out = []
        for t, memory in self.samples:
            if not memory:
                continue
            worker = max(memory, key=lambda w: memory[w][0])
            rss, held = memory[worker]
            kept = sum(size for key, size in held.items() if key in persisted.get(worker, ()))
            out.append([round(t, 2), round(rss / MiB), round(sum(held.values()) / MiB), round(kept / MiB)])
        return out


@step("glm_cohort")
def glm_cohort(timed, store, nodes, mask, events, confounds, out, n_workers=2, sample_s=0.1, waves=False,
               storage_options=None, tag=""):
    """One FirstLevelModel per run of ``nodes``, fitted together on a local cluster.

    Set-up (untimed): imports, reading the TSVs, opening the store, starting
    the cluster (``n_workers`` processes x 1 thread) and importing the task
    modules on its workers. Timed: every ``fit``, one ``persist_fits`` over
    all the models (one dask graph), then ``compute_contrast("a - b",
    output_type="all")`` of each model. As a cohort pipeline would, the
    driver keeps the first model's maps only (to save them for the parity
    check) and compares every other model's z and effect maps with them
    (``np.array_equal``, ~1 ms a run: every run holds the same data).

    ``storage_options``: for a store URL (``s3://...``), passed to
    ``open_cohort`` (credentials from the environment).

    ``waves=True``: the same models, but evaluated with
    ``fitted_in_waves(models)`` (a bounded window of models persisted at a
    time, each released after its contrast) instead of one ``persist_fits``.

    Memory: every worker's RSS and the results it holds are sampled every
    ``sample_s`` s during the timed work (:class:`WorkerMemory`), and each
    worker's ``VmHWM`` (its true peak) is read at the end.
    """
    _import_convert_dependencies()
    import dask.array  # noqa: F401
    import nilearn.glm.contrasts  # noqa: F401
    import nilearn.image  # noqa: F401
    import numpy as np
    import xarray  # noqa: F401

    from chunkglm.cluster import start
    from chunkglm.glm.first_level import FirstLevelModel, persist_fits
    from chunkglm.io.cohort import open_cohort

    if waves:
        from chunkglm.glm.first_level import fitted_in_waves
    events_df, confounds_df = _glm_inputs(events, confounds)
    cohort = open_cohort(store, storage_options=storage_options)
    runs = [cohort.runs[node] for node in nodes]
    compared = ("z_score", "effect_size")
    client = start(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", verbose=False)
    try:
        client.wait_for_workers(n_workers)
        client.run(_worker_imports)
        pids = client.run(os.getpid)
        at_start = client.run(_worker_memory)
        with WorkerMemory(client, sample_s) as sampler:
            with timed:
                models = [FirstLevelModel(mask_img=mask, **GLM_PARAMS).fit(run, events=events_df,
                                                                            confounds=confounds_df)
                          for run in runs]
                if waves:
                    evaluated = fitted_in_waves(models)
                else:
                    persist_fits(models)
                    evaluated = models
                first, identical = None, True
                for model in evaluated:
                    maps = model.compute_contrast(CONTRAST, output_type="all")
                    if first is None:
                        first = maps
                    else:
                        identical &= all(np.array_equal(np.asanyarray(maps[k].dataobj),
                                                        np.asanyarray(first[k].dataobj)) for k in compared)
        at_end = client.run(_worker_memory)
        peaks = client.run(_worker_peak_rss)
        restarted = client.run(os.getpid) != pids
        scheduler_tasks = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    finally:
        client.close()
    workers = sorted(peaks)
    persisted = {w: set(at_end[w][1]) for w in workers}  # what the models keep on the workers
    sampled = [sampler.summary(w, persisted[w]) for w in workers]
    return {
        "n_runs": len(runs), "n_workers": len(workers),
        "maps": _save_maps(first, out, f"cohort_{len(runs)}{'_waves' if waves else ''}{tag}"),
        "identical_maps": bool(identical),
        # per worker, in MiB
        "worker_rss_start_mib": [at_start[w][0] / MiB for w in workers],
        "worker_peak_rss_mib": [peaks[w] / MiB for w in workers],  # VmHWM (whole life)
        "worker_sampled_peak_mib": [p["rss"] / MiB for p in sampled],
        "worker_peak_less_persisted_mib": [p["rss_less_persisted"] / MiB for p in sampled],
        "worker_persisted_end_mib": [sum(at_end[w][1].values()) / MiB for w in workers],
        "worker_held_peak_mib": [p["held"] / MiB for p in sampled],
        "worker_unmanaged_peak_mib": [p["unmanaged"] / MiB for p in sampled],
        "persisted_by_kind_mib": _by_kind({k: v for w in workers for k, v in at_end[w][1].items()}),
        "workers_restarted": restarted, "sampler_errors": sampler.errors, "n_samples": len(sampler.samples),
        "scheduler_tasks_after": scheduler_tasks,
        "memory_timeline_mib": sampler.timeline_mib(persisted),
    }


def _by_kind(held: dict) -> dict:
    """MiB held per task name prefix (``fit_whitened``, ``_moments``, ...)."""
    from dask.utils import key_split

    out = {}
    for key, size in held.items():
        kind = key_split(key)
        out[kind] = out.get(kind, 0) + size / MiB
    return out


# --- case "second_level": nilearn vs chunkglm, parametric and max-T ---------

SECOND_LEVEL_CONTRAST = "covariate"


def _second_level_design(design):
    """The design matrix CSV of ``_data.second_level_maps`` (set-up, untimed)."""
    import pandas as pd

    return pd.read_csv(design)


def _map_paths(maps) -> list:
    """The maps of ``_data.second_level_maps`` in design-row order (``sub-0001`` first).

    Steps take the folder, not the list: the runner's progress line prints list arguments."""
    paths = sorted(str(p) for p in Path(maps).glob("sub-*_effect.nii.gz"))
    if not paths:
        raise FileNotFoundError(f"no sub-*_effect.nii.gz maps in {maps}")
    return paths


def _save_volume(image, path: Path) -> str:
    """Save a 3-D map as float64 ``.nii`` (after the timed work)."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(image.get_fdata(), dtype=np.float64), image.affine), path)
    return str(path)


def _second_level_imports():
    """What chunkglm's second level imports lazily (imports are not the work)."""
    _import_convert_dependencies()
    import dask.array  # noqa: F401
    import nilearn.glm.contrasts  # noqa: F401
    import nilearn.image  # noqa: F401
    import nilearn.masking  # noqa: F401
    import xarray  # noqa: F401

    import chunkglm.glm.second_level  # noqa: F401
    import chunkglm.graph.glm  # noqa: F401
    import chunkglm.graph.permutation  # noqa: F401


@step("floor_maps")
def floor_maps(timed, maps):
    """Read and decompress every map once (ISA-L threaded reader), keep nothing."""
    from isal import igzip_threaded

    paths = _map_paths(maps)
    with timed:
        n_bytes = 0
        for path in paths:
            with igzip_threaded.open(path, "rb", threads=1) as handle:
                n_bytes += _drain(handle)
    return {"decompressed_bytes": n_bytes}


@step("second_level_nilearn")
def second_level_nilearn(timed, maps, mask, design, out):
    """nilearn's SecondLevelModel(mask_img=mask).fit(paths, design) + compute_contrast(all)."""
    from nilearn.glm.second_level import SecondLevelModel

    dm = _second_level_design(design)
    model = SecondLevelModel(mask_img=mask)
    paths = _map_paths(maps)
    with timed:
        model.fit(paths, design_matrix=dm)
        images = model.compute_contrast(SECOND_LEVEL_CONTRAST, output_type="all")
    return {"maps": _save_maps(images, out, "nilearn"),
            "stat": _save_volume(images["stat"], Path(out) / "nilearn_stat.nii")}


@step("second_level_chunkglm")
def second_level_chunkglm(timed, mask, design, out, label, maps=None, store=None, node=None):
    """chunkglm's SecondLevelModel, fit + compute_contrast(all), on either

    - ``maps``: the folder of NIfTI maps (fit loads them into a temporary store: timed), or
    - ``store`` + ``node``: a maps node loaded beforehand (opening the store is set-up).
    """
    _second_level_imports()
    from chunkglm.glm.second_level import SecondLevelModel
    from chunkglm.io.cohort import open_cohort

    dm = _second_level_design(design)
    model = SecondLevelModel(mask_img=mask)
    second_level_input = _map_paths(maps) if store is None else open_cohort(store).maps[node]
    with timed:
        model.fit(second_level_input, design_matrix=dm)
        images = model.compute_contrast(SECOND_LEVEL_CONTRAST, output_type="all")
    return {"maps": _save_maps(images, out, label),
            "stat": _save_volume(images["stat"], Path(out) / f"{label}_stat.nii")}


@step("second_level_load")
def second_level_load(timed, maps, mask, design, store):
    """Load the maps into ``store`` once (``SecondLevelModel(store=...).fit``):
    set-up of the store rows; returns the maps node's name."""
    _second_level_imports()
    from chunkglm.glm.second_level import SecondLevelModel

    shutil.rmtree(store, ignore_errors=True)
    model = SecondLevelModel(mask_img=mask, store=store)
    paths, dm = _map_paths(maps), _second_level_design(design)
    with timed:
        model.fit(paths, design_matrix=dm)
    return {"node": model._maps[None].node.name, "store_mib": _tree_bytes(store) / MiB}


@step("permutation_nilearn")
def permutation_nilearn(timed, maps, mask, design, n_perm, out, tfce=False, threshold=None):
    """nilearn's non_parametric_inference (max-T, one-sided, random_state=0, n_jobs=1);
    ``tfce`` / ``threshold`` (cluster-forming p) add TFCE / cluster size and mass inference."""
    from nilearn.glm.second_level import non_parametric_inference

    dm, paths = _second_level_design(design), _map_paths(maps)
    with timed:
        result = non_parametric_inference(paths, design_matrix=dm,
                                          second_level_contrast=SECOND_LEVEL_CONTRAST,
                                          mask=mask, n_perm=n_perm, random_state=0, n_jobs=1,
                                          tfce=tfce, threshold=threshold)
    return {"n_perm": n_perm, **_permutation_outputs(result, out, f"nilearn_{n_perm}", tfce, threshold)}


def _permutation_outputs(result, out, stem, tfce, threshold) -> dict:
    """Save the -log10 FWE p map(s): ``logp`` (max-T), ``logp_tfce``, ``logp_mass``."""
    if not isinstance(result, dict):
        return {"logp": _save_volume(result, Path(out) / f"{stem}_logp.nii")}
    saved = {"logp": _save_volume(result["logp_max_t"], Path(out) / f"{stem}_logp.nii")}
    if tfce:
        saved["logp_tfce"] = _save_volume(result["logp_max_tfce"], Path(out) / f"{stem}_logp_tfce.nii")
    if threshold is not None:
        saved["logp_mass"] = _save_volume(result["logp_max_mass"], Path(out) / f"{stem}_logp_mass.nii")
    return saved


@step("permutation_chunkglm")
def permutation_chunkglm(timed, store, node, mask, design, n_perm, out, tfce=False, threshold=None):
    """chunkglm's non_parametric_inference on the maps node loaded beforehand,
    with nilearn's arguments (random_state=0 draws nilearn's permutations)."""
    _second_level_imports()
    from chunkglm.glm.second_level import non_parametric_inference
    from chunkglm.io.cohort import open_cohort

    dm = _second_level_design(design)
    second_level_input = open_cohort(store).maps[node]
    with timed:
        result = non_parametric_inference(second_level_input, design_matrix=dm,
                                          second_level_contrast=SECOND_LEVEL_CONTRAST, mask=mask,
                                          n_perm=n_perm, random_state=0, n_jobs=1, tfce=tfce,
                                          threshold=threshold)
    return {"n_perm": n_perm, **_permutation_outputs(result, out, f"chunkglm_{n_perm}", tfce, threshold)}


@step("second_level_scale")
def second_level_scale(timed, store, node, mask, n_perm, n_workers=2, sample_s=0.2):
    """Scale case: SecondLevelModel fit + compute_contrast(covariate, z) and a max-T test of
    ``n_perm`` permutations on a maps node of N maps, on a LocalCluster of ``n_workers``
    processes x 1 thread (started in set-up), each worker's memory sampled (:class:`WorkerMemory`)
    and its ``VmHWM`` read at the end. The design is ``covariate`` (the node's ``covariate``
    coordinate) + ``intercept``."""
    _second_level_imports()
    import numpy as np
    import pandas as pd

    from chunkglm.cluster import start
    from chunkglm.glm.second_level.nonparametric import permutation_maps
    from chunkglm.glm.second_level import SecondLevelModel
    from chunkglm.io.cohort import open_cohort

    maps_node = open_cohort(store).maps[node]
    covariate = np.asarray(maps_node.to_dataset()["covariate"].values, dtype=np.float64)
    dm = pd.DataFrame({"covariate": covariate, "intercept": np.ones(covariate.size)})
    client = start(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", verbose=False)
    try:
        client.run(_worker_imports)
        client.run(lambda: __import__("chunkglm.kernels.permutation"))
        phases = {}
        with WorkerMemory(client, sample_s) as sampler, timed:
            began = time.perf_counter()
            model = SecondLevelModel(mask_img=mask).fit(maps_node, design_matrix=dm)
            z = model.compute_contrast(SECOND_LEVEL_CONTRAST, output_type="z_score")
            phases["parametric_s"] = time.perf_counter() - began
            began = time.perf_counter()
            logp = permutation_maps(model, np.array([1.0, 0.0]), n_perm=n_perm, random_state=0)["logp_max_t"]
            phases["permutation_s"] = time.perf_counter() - began
        peaks = client.run(_worker_peak_rss)
        memory = {str(w): sampler.summary(w, set()) for w in peaks}
    finally:
        client.close()
    values = np.asarray(z.dataobj)
    return {"n_maps": int(covariate.size), "n_perm": n_perm, **phases,
            "worker_vmhwm_mib": {str(w): v / MiB for w, v in peaks.items()},
            "worker_sampled_rss_mib": {w: m["rss"] / MiB for w, m in memory.items()},
            "z_max": float(np.nanmax(values)), "logp_max": float(np.asarray(logp.dataobj).max())}


@step("nimare_ibma")
def nimare_ibma(timed, dataset, mask, estimator, out, params=None, label=""):
    """NiMARE 0.22 (in its own venv): ``Dataset(<json>, mask=<mask>)`` (set-up), then timed
    ``ibma.<estimator>(**params).fit(dset)``: NiMARE reads and masks the NIfTI inside fit.
    Saves the z map (and est/tau2 when present) for the parity check."""
    import nimare
    from nimare.dataset import Dataset
    from nimare.meta import ibma

    dset = Dataset(dataset, mask=mask)
    est = getattr(ibma, estimator)(**(params or {}))
    with timed:
        result = est.fit(dset)
    Path(out).mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in ("z", "est", "tau2"):
        if name in result.maps:
            saved[name] = _save_float32(result.get_map(name), Path(out) / f"nimare_{estimator}{label}_{name}.nii.gz")
    return {"maps": saved, "nimare": nimare.__version__}


def _save_float32(img, path) -> str:
    """Save a map as float32. NiMARE's images carry the mask's header: with a uint8 mask,
    ``to_filename`` would quantise the map to 256 levels (slope/intercept), a ~1% error."""
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), path)
    return str(path)


def _meta_imports() -> None:
    """What a chunkglm IBMA fit imports (set-up, as the driver's other imports)."""
    _import_convert_dependencies()
    import dask.array  # noqa: F401
    import pandas  # noqa: F401
    import scipy.special  # noqa: F401
    import scipy.stats  # noqa: F401

    import chunkglm.kernels.meta  # noqa: F401
    import chunkglm.meta.ibma  # noqa: F401


def _save_meta_maps(result, out, stem) -> dict:
    Path(out).mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in ("z", "est", "tau2"):
        if name in result.maps:
            saved[name] = _save_float32(result.get_map(name), Path(out) / f"{stem}_{name}.nii.gz")
    return saved


@step("meta_chunkglm")
def meta_chunkglm(timed, estimator, mask, out, table=None, store=None, node=None, params=None, label=""):
    """chunkglm's IBMA estimator, fit + every map computed, on either

    - ``table``: the TSV of NIfTI paths (fit converts the map types it reads into a
      temporary store: timed), or
    - ``store`` + ``node``: a maps collection converted beforehand (opening it is set-up).
    """
    _meta_imports()
    import pandas as pd

    from chunkglm.io.cohort import open_cohort
    from chunkglm.meta import ibma

    est = getattr(ibma, estimator)(mask=mask, **(params or {}))
    source = pd.read_csv(table, sep="\t") if store is None else open_cohort(store).maps[node]
    with timed:
        result = est.fit(source)
        maps = result.maps  # computes every map of the fit in one pass
    return {"maps": _save_meta_maps(result, out, f"chunkglm_{estimator}{label}"), "n_maps": len(maps)}


@step("meta_load")
def meta_load(timed, table, mask, store):
    """Convert every map type of the table into ``maps/meta`` of ``store`` once (set-up of the
    store rows)."""
    _meta_imports()
    import pandas as pd

    from chunkglm.meta._inputs import convert_meta_maps

    shutil.rmtree(store, ignore_errors=True)
    frame = pd.read_csv(table, sep="\t")
    with timed:
        convert_meta_maps(frame, store, "meta", mask_img=mask)
    return {"node": "meta", "store_mib": _tree_bytes(store) / MiB}


@step("meta_scale")
def meta_scale(timed, store, node, estimator, n_workers=2, sample_s=0.2):
    """Scale case: ``ibma.<estimator>().fit(<maps node>)`` and every map, on a LocalCluster of
    ``n_workers`` processes x 1 thread (set-up); worker memory sampled and ``VmHWM`` read."""
    _meta_imports()
    import numpy as np

    from chunkglm.cluster import start
    from chunkglm.io.cohort import open_cohort
    from chunkglm.meta import ibma

    maps_node = open_cohort(store).maps[node]
    client = start(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", verbose=False)
    try:
        client.run(_worker_imports)
        client.run(_meta_imports)
        with WorkerMemory(client, sample_s) as sampler, timed:
            result = getattr(ibma, estimator)().fit(maps_node)
            z = result.maps["z"]
        peaks = client.run(_worker_peak_rss)
        memory = {str(w): sampler.summary(w, set()) for w in peaks}
    finally:
        client.close()
    return {"n_maps": int(maps_node.data().shape[0]), "z_max": float(np.nanmax(z)),
            "worker_vmhwm_mib": {str(w): v / MiB for w, v in peaks.items()},
            "worker_sampled_rss_mib": {w: m["rss"] / MiB for w, m in memory.items()}}


MASKER_OPTIONS = {"standardize": "zscore_sample", "detrend": True}


def _masker_tr(bold) -> float:
    sidecar = Path(str(bold).replace(".nii.gz", ".json"))
    return float(json.loads(sidecar.read_text())["RepetitionTime"])


@step("masker_nilearn")
def masker_nilearn(timed, bold, mask, maps, out):
    """nilearn's ``MultiNiftiMapsMasker(maps, mask_img=mask, standardize='zscore_sample',
    detrend=True, t_r=TR).fit_transform(bold)``: reads both 4-D images inside the call."""
    import numpy as np
    from nilearn.maskers import MultiNiftiMapsMasker

    masker = MultiNiftiMapsMasker(maps, mask_img=mask, t_r=_masker_tr(bold), **MASKER_OPTIONS)
    with timed:
        signals = masker.fit_transform(bold)
    path = Path(out) / "nilearn_signals.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(signals, dtype=np.float64))
    return {"signals": str(path), "shape": list(np.shape(signals))}


@step("masker_chunkglm")
def masker_chunkglm(timed, bold, mask, maps, out, label, store=None, nodes=None, n_workers=0, sample_s=0.2):
    """chunkglm's ``MultiMapsMasker`` with nilearn's arguments, on the NIfTI (converted inside the
    call: timed) or on ``nodes`` of ``store`` (converted beforehand). ``n_workers`` > 0: on a
    LocalCluster of that many processes x 1 thread (set-up), worker memory sampled."""
    import numpy as np

    _import_convert_dependencies()
    import nilearn.signal  # noqa: F401

    from chunkglm.io.cohort import open_cohort
    from chunkglm.maskers import MultiMapsMasker

    masker = MultiMapsMasker(maps, mask_img=mask, t_r=_masker_tr(bold), **MASKER_OPTIONS)
    inputs = bold if store is None else [open_cohort(store).runs[n] for n in nodes]
    client = None
    if n_workers:
        from chunkglm.cluster import start

        client = start(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", verbose=False)
        client.run(_worker_imports)
    try:
        if client is None:
            with timed:
                signals = masker.fit_transform(inputs)
            extra = {}
        else:
            with WorkerMemory(client, sample_s) as sampler, timed:
                signals = masker.fit_transform(inputs)
            peaks = client.run(_worker_peak_rss)
            extra = {"worker_vmhwm_mib": {str(w): v / MiB for w, v in peaks.items()},
                     "worker_sampled_rss_mib": {str(w): sampler.summary(w, set())["rss"] / MiB for w in peaks}}
    finally:
        if client is not None:
            client.close()
    first = signals[0] if isinstance(signals, list) else signals
    path = Path(out) / f"{label}_signals.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(first, dtype=np.float64))
    return {"signals": str(path), "n_runs": len(signals) if isinstance(signals, list) else 1, **extra}


@step("command_tree")
def command_tree(timed, command, clear=(), log=None, sample_s=0.2):
    """A whole command (another program, e.g. fitlins in its venv or ``chunkglm app``) as the work.

    Set-up (untimed): ``clear`` (its earlier outputs) removed. Timed: the command from start to
    exit. Memory: the resident memory of the command's whole process tree (the command and every
    descendant: nipype's or dask's worker processes), summed every ``sample_s`` s; the reported
    ``peak_rss_mib`` is the largest sum, or the largest single descendant's ``ru_maxrss`` when that
    is larger (a process shorter than ``sample_s`` can be missed by the sampling). Shared pages
    count once per process, as for both tools alike. stdout/stderr go to ``log``.
    """
    import subprocess

    import psutil

    for path in clear:
        shutil.rmtree(path, ignore_errors=True)
    log_path = Path(log) if log else Path(os.devnull)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak, samples, peaks, at_peak = 0, 0, {}, {}
    with open(log_path, "w") as handle, timed:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            sizes = _tree_sizes(root)
            for pid, size in sizes.items():
                peaks[pid] = max(peaks.get(pid, 0), size)
            if sum(sizes.values()) > peak:
                peak, at_peak = sum(sizes.values()), sizes
            samples += 1
            time.sleep(sample_s)
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:] if log else ""
        raise SystemExit(f"{command[0]} exited with {process.returncode}:\n{tail}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"peak_rss_mib": max(peak, largest) / 2**20, "rss_start_mib": 0.0,
            "sampled_tree_peak_mib": peak / 2**20, "largest_process_peak_mib": largest / 2**20,
            "n_samples": samples,
            # where the tree's memory is: each process's own sampled peak, and its share of the
            # tree's peak (the command first, then its descendants by pid)
            "process_peaks_mib": [round(peaks[pid] / 2**20, 1) for pid in sorted(peaks, key=_start_order(root))],
            "processes_at_tree_peak_mib": [round(at_peak[pid] / 2**20, 1)
                                           for pid in sorted(at_peak, key=_start_order(root))]}


def _tree_sizes(root) -> dict:
    """{pid: bytes resident} of ``root`` and all its descendants now (processes gone meanwhile skipped)."""
    import psutil

    sizes = {}
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return sizes
    for process in processes:
        try:
            sizes[process.pid] = process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return sizes


def _start_order(root):
    """Sort key: the command's own process first, then the others by pid."""
    return lambda pid: (pid != root.pid, pid)


def main(argv) -> None:
    name, kwargs = argv[1], json.loads(argv[2]) if len(argv) > 2 else {}
    timed = Timed()
    extra = STEPS[name](timed, **kwargs) or {}
    print(RESULT_PREFIX + json.dumps({"step": name, **timed.record(), **extra}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
