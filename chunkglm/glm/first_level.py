"""FirstLevelModel: nilearn's API, evaluated as a dask graph over store nodes.

``fit`` validates the inputs, builds every design matrix and the lazy graph
of each run (:mod:`chunkglm.graph.glm`), and returns without reading the 4-D
data. The first ``compute_contrast`` evaluates the fits once (persisted, in
this process or on the cluster's workers); every contrast after that is
arithmetic on small per-block results. Runs are combined by fixed effects
with nilearn's own ``Contrast`` arithmetic, so z, stat and p maps follow
nilearn's definitions exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import warnings

import numpy as np
import pandas as pd

from chunkglm.design.first_level import check_rank, read_table, run_design
from chunkglm.errors import ChunkglmError, InputError
from chunkglm.graph import glm as graph
from chunkglm.io.bids import input_entities
from chunkglm.io.nifti import image_from_voxels
from chunkglm.report.mixin import GLMReportMixin

OUTPUT_TYPES = ("z_score", "stat", "p_value", "effect_size", "effect_variance")


class FirstLevelModel(GLMReportMixin):
    """First-level GLM with nilearn's parameters (see nilearn's docs).

    Parameters
    ----------
    t_r : float, optional
        Repetition time (s); default each run's ``RepetitionTime``.
    slice_time_ref : float
        Fraction of the TR at which the design is sampled (nilearn default 0).
    hrf_model, drift_model, high_pass, drift_order, fir_delays, min_onset
        As nilearn's ``make_first_level_design_matrix`` (used underneath).
    mask_img : str or nibabel image, optional
        Restricts the store's voxels to this mask (a subset of its grid).
    target_affine, target_shape, smoothing_fwhm : optional
        As nilearn's, applied when NIfTI inputs are converted (volume by
        volume, with nilearn's resample_img and smooth_img). Store runs must
        have been converted with the same values (chunkglm.convert takes them).
    signal_scaling : False, 0, 1 or (0, 1)
        0: nilearn's percent-signal-change scaling per voxel; 1: per time
        point by its mean over voxels (nilearn 0.14 fails on it: its division
        broadcasts along voxels); (0, 1): by the grand mean; False: none.
    noise_model : {"ar1", "ols", "arN"}
        "arN" (N > 1): nilearn's k-means over the AR(N) coefficients, run as
        an explicit global pass over the (small) coefficient map.
    n_jobs : int
        Ignored: the dask cluster (or the threaded scheduler) runs the work.
    minimize_memory : bool
        Accepted for nilearn compatibility.
    """

    def __init__(self, t_r=None, slice_time_ref=0.0, hrf_model="glover", drift_model="cosine",
                 high_pass=0.01, drift_order=1, fir_delays=(0,), min_onset=-24, mask_img=None,
                 target_affine=None, target_shape=None, smoothing_fwhm=None,
                 signal_scaling=0, noise_model="ar1", n_jobs=1, minimize_memory=True,
                 subject_label=None, random_state=None, verbose=0):
        self.t_r = t_r
        self.slice_time_ref = slice_time_ref
        self.hrf_model = hrf_model
        self.drift_model = drift_model
        self.high_pass = high_pass
        self.drift_order = drift_order
        self.fir_delays = fir_delays
        self.min_onset = min_onset
        self.mask_img = mask_img
        self.target_affine = target_affine
        self.target_shape = target_shape
        self.smoothing_fwhm = smoothing_fwhm
        self.signal_scaling = signal_scaling
        self.noise_model = noise_model
        self.n_jobs = n_jobs
        self.minimize_memory = minimize_memory
        self.subject_label = subject_label
        self.random_state = random_state
        self.verbose = verbose

    # -- fit -------------------------------------------------------------------

    def fit(self, run_imgs, events=None, confounds=None, sample_masks=None, design_matrices=None,
            bins=100):
        """Validate inputs and build the lazy fit of every run; reads no 4-D data.

        Parameters
        ----------
        run_imgs : store node, NIfTI path or image, or a list of them
            Runs of a cohort store (``chunkglm.open_cohort(...).runs[...]``),
            or 4-D NIfTI files/images: these are converted once into a
            temporary store (removed with the model), masked with
            ``mask_img`` or, when it is None, with nilearn's multi-run EPI
            mask (which, as in nilearn, reads every run once more).
        events : DataFrame, path or list of them, optional
            Default: the events stored with each run.
        confounds : DataFrame or list of them, optional
            One row per scan, no NaN.
        sample_masks : array or list of arrays, optional
            Per run, the volumes to keep (indices or booleans), as nilearn's:
            the design's rows and the data's volumes are both subset.
        design_matrices : DataFrame or list of them, optional
            Used as given instead of building designs.
        bins : int
            AR(1) coefficient bins.
        """
        self._check_params()
        items = _as_list(run_imgs)
        nodes = self._as_nodes(items)
        _check_nodes(nodes)
        self.run_entities_ = [input_entities(item) for item in items]
        self._run_names = [node.name for node in nodes]
        self._check_preprocessing(nodes)
        masks = _per_run(sample_masks, len(nodes), "sample_masks")
        events_list = _per_run(events, len(nodes), "events")
        confounds_list = _per_run(confounds, len(nodes), "confounds")
        self.confound_names_ = [None if c is None else [str(n) for n in getattr(c, "columns", [])] or None
                                for c in confounds_list]
        designs = _per_run(design_matrices, len(nodes), "design_matrices")
        full = [self._design(node, ev, conf, dm, i)
                for i, (node, ev, conf, dm) in enumerate(zip(nodes, events_list, confounds_list, designs))]
        rows = [_sample_rows(mask, len(design), i) for i, (mask, design) in enumerate(zip(masks, full))]
        self.design_matrices_ = [design if r is None else design.iloc[r] for design, r in zip(full, rows)]
        for index, design in enumerate(self.design_matrices_):
            check_rank(design, f"run {index} after sample_masks")
        self._grid, self._voxels = self._voxel_selection(nodes)
        self._runs = [graph.fit_run(self._bold(node, r), design, self.noise_model, bins,
                                    self.signal_scaling, self.random_state)
                      for node, r, design in zip(nodes, rows, self.design_matrices_)]
        self._persisted = False
        self._nonfinite_warned = False
        return self

    def _check_params(self):
        try:
            graph.ar_order(self.noise_model)
        except ValueError as err:
            raise InputError(str(err)) from None
        scaling = self.signal_scaling
        if not (scaling is False or (not isinstance(scaling, bool) and scaling in (0, 1))
                or graph._is_grand(scaling)):
            raise InputError(
                f"signal_scaling must be False, 0 (per voxel, over time), 1 (per time point, over "
                f"voxels) or (0, 1) (by the grand mean); received {scaling!r}.")

    def _as_nodes(self, items):
        from chunkglm.io.cohort import Node

        self._converted_here = False
        if all(isinstance(item, Node) for item in items):
            return items
        if any(isinstance(item, Node) for item in items):
            raise InputError("run_imgs mixes store runs and NIfTI images: give one kind.")
        return self._convert_images(items)

    def _convert_images(self, images):
        import shutil
        import tempfile
        import weakref

        from chunkglm.io.cohort import open_cohort
        from chunkglm.io.convert import convert
        from chunkglm.io.nifti import stage_image

        folder = Path(tempfile.mkdtemp(prefix="chunkglm-first-level-"))
        weakref.finalize(self, shutil.rmtree, folder, True)
        paths = [stage_image(image, folder, index) for index, image in enumerate(images)]
        mask = self.mask_img if self.mask_img is not None else _nilearn_epi_mask(
            paths, self.target_affine, self.target_shape)
        mask_path = _stage_mask(mask, folder)
        convert(paths, folder / "store.zarr", mask_img=mask_path, target_affine=self.target_affine,
                target_shape=self.target_shape, smoothing_fwhm=self.smoothing_fwhm)
        cohort = open_cohort(folder / "store.zarr")
        self._converted_here = True  # the store's grid is the (resampled) mask already
        return [cohort.runs[Path(p).name.split(".")[0]] for p in paths]

    def _check_preprocessing(self, nodes):
        from chunkglm.io.preprocess import SpatialPreprocessing
        from chunkglm.io.store import node_meta

        wanted = SpatialPreprocessing(self.target_affine, self.target_shape, self.smoothing_fwhm).to_attrs()
        for node in nodes:
            done = node_meta(node.cohort.root[node.path]).get("preprocessing", SpatialPreprocessing().to_attrs())
            if done != wanted:
                raise InputError(
                    f"{node.name} was converted with {done}, but this model asks for {wanted}. "
                    "Convert the runs with the same target_affine/target_shape/smoothing_fwhm "
                    "(chunkglm.convert(..., smoothing_fwhm=...)) or pass NIfTI files.")

    def _design(self, node, events, confounds, design, index):
        where = f"run {index} ({node.name})"
        n_scans = int(node.data().shape[0])
        if design is None:
            t_r = self.t_r if self.t_r is not None else node.attrs.get("RepetitionTime")
            if t_r is None:
                raise InputError(f"t_r is unknown for {where}: pass t_r=...")
            events = node.events if events is None else events
            design = run_design(n_scans, float(t_r), self.slice_time_ref, events, confounds,
                                hrf_model=self.hrf_model, drift_model=self.drift_model,
                                high_pass=self.high_pass, drift_order=self.drift_order,
                                fir_delays=self.fir_delays, min_onset=self.min_onset, where=where)
        else:
            design = read_table(design, "design_matrices")
            if not isinstance(design, pd.DataFrame):
                raise TypeError(f"design_matrices of {where} must be DataFrames or paths to TSV/CSV "
                                f"files (nilearn needs column names for contrasts); received an array "
                                f"of shape {np.shape(design)}.")
            if len(design) != n_scans:
                raise InputError(f"the design matrix of {where} has {len(design)} rows for {n_scans} "
                                 "scans.")
        check_rank(design, where)
        return design

    def _voxel_selection(self, nodes):
        grid = nodes[0].grid
        if self.mask_img is None or self._converted_here:
            return grid, None
        from nilearn.image import load_img

        mask = np.asarray(load_img(self.mask_img).dataobj) != 0
        if mask.shape != grid.shape or (mask & ~grid.mask).any():
            raise InputError(
                f"mask_img (shape {mask.shape}) must select voxels of the store's grid {grid.shape} "
                "that the store holds; convert with this mask, or a larger one, first.")
        if (mask == grid.mask).all():
            return grid, None
        return grid, np.flatnonzero(mask[grid.mask])

    def _bold(self, node, rows=None):
        bold = node.data().data
        if rows is not None:  # scrubbing: keep these volumes (time stays whole per chunk)
            bold = bold[rows]
        return bold if self._voxels is None else bold[:, self._voxels]

    # -- contrasts ---------------------------------------------------------------

    def compute_contrast(self, contrast_def, stat_type=None, output_type="z_score"):
        """Compute a contrast as nilearn does; returns a NIfTI image (or a dict for "all")."""
        self._check_fitted()
        con_vals = self._contrast_vectors(contrast_def)
        stat_type = stat_type or ("t" if np.asarray(con_vals[0]).ndim == 1 else "F")
        if output_type not in (*OUTPUT_TYPES, "all"):
            raise InputError(f"output_type must be one of {OUTPUT_TYPES + ('all',)}; received {output_type!r}.")
        contrast = self._fixed_effects(con_vals, stat_type)
        maps = {name: getattr(contrast, name)() for name in OUTPUT_TYPES}
        images = {name: self._to_image(values) for name, values in maps.items()}
        return images if output_type == "all" else images[output_type]

    @property
    def mask_img_(self):
        """The mask of the fitted voxels, as a NIfTI image (nilearn's name)."""
        import nibabel as nib

        self._check_fitted()
        ijk = self._grid.ijk if self._voxels is None else self._grid.ijk[self._voxels]
        data = np.zeros(self._grid.shape, dtype=np.uint8)
        data[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1
        return nib.Nifti1Image(data, self._grid.affine)

    def release(self):
        """Drop the evaluated fits (memory, or workers' memory); the model stays
        fitted and re-evaluates lazily (reading the data again) if asked."""
        for run in getattr(self, "_runs", []):
            lazy = getattr(run, "lazy_fits", None)
            if lazy is not None:
                run.fits, run.lazy_fits = lazy, None
        self._persisted = False

    # -- voxelwise model attributes (nilearn 0.14 names; lists, one per run) --------

    @property
    def r_square_(self):
        """Per run, nilearn's r-square (a 4-D image of one volume, as nilearn's)."""
        return self._per_run_images(lambda run: graph.r_square(run)[None], squeeze=False)

    @property
    def predicted_(self):
        """Per run, the 4-D image of nilearn's predicted values (whitened design x beta)."""
        return self._per_run_images(graph.predicted)

    @property
    def residuals_(self):
        """Per run, the 4-D residual image (reads each run's data a second time)."""
        return self._per_run_images(graph.residuals)

    r_square = r_square_
    predicted = predicted_
    residuals = residuals_

    def voxelwise(self, name: str, store=None, storage_options=None):
        """Lazy per-run "r_square", "predicted" or "residuals", or written to a store.

        Without ``store``: one dask array per run, (voxel,) or (time, voxel),
        nothing computed. With ``store`` (a path or fsspec URL): each run's
        array is streamed block by block into ``glm/<run>/<name>`` of that zarr
        store (xarray-readable, voxel blocks as the run's), never held whole in
        memory; returns the node paths written.
        """
        builders = {"r_square": graph.r_square, "predicted": graph.predicted, "residuals": graph.residuals}
        if name not in builders:
            raise InputError(f"voxelwise takes one of {sorted(builders)}; received {name!r}.")
        self._check_fitted()
        arrays = [builders[name](run) for run in self._fits()]
        if store is None:
            return arrays
        return [self._stream_to_store(array, name, index, store, storage_options)
                for index, array in enumerate(arrays)]

    def _stream_to_store(self, array, name, index, store, storage_options):
        import xarray as xr

        from chunkglm.io.store import zarr_store

        run = (self.run_entities_[index] and "_".join(f"{k}-{v}" for k, v in self.run_entities_[index].items()
                                                      if k in ("sub", "ses", "task", "run"))) or f"run-{index}"
        dims = ("voxel",) if array.ndim == 1 else ("time", "voxel")
        path = f"glm/{run}"
        data = xr.Dataset({name: (dims, array.astype(np.float32))})
        data.to_zarr(zarr_store(store, storage_options), group=path, mode="a", zarr_format=3, consolidated=False)
        return f"{path}/{name}"

    def _per_run_images(self, build, squeeze=True):
        import dask

        self._check_fitted()
        # Gather the voxel blocks and join them here: a worker then holds one block's
        # result at a time (its memory scales with the chunk size), never a whole run.
        blocks = dask.compute(*[build(run).to_delayed().ravel().tolist() for run in self._fits()])
        return [self._to_image(np.concatenate(parts, axis=-1), squeeze) for parts in blocks]

    def _check_fitted(self):
        if not hasattr(self, "_runs"):
            raise InputError("this FirstLevelModel is not fitted yet: call fit(...) first.")

    def _contrast_vectors(self, contrast_def):
        from nilearn.glm.contrasts import expression_to_contrast_vector

        if isinstance(contrast_def, str | np.ndarray):
            con_vals = [contrast_def] * len(self._runs)
        elif isinstance(contrast_def, list | tuple) and len(contrast_def) == len(self._runs):
            con_vals = list(contrast_def)
        else:
            raise InputError(
                f"contrast_def must be a string, an array, or a list with one per run "
                f"({len(self._runs)}); received {contrast_def!r}.")
        out = []
        for con, design in zip(con_vals, self.design_matrices_):
            if isinstance(con, str):
                con = _expression(con, list(design.columns), expression_to_contrast_vector)
            out.append(_check_width(np.asarray(con, dtype=float), design))
        return out

    def _fits(self):
        if not self._persisted:
            persist_fits([self])
        self._warn_nonfinite()
        return self._runs

    def _warn_nonfinite(self):
        """Once per fit: nilearn's masker set the runs' NaN/inf values to 0, and so did the fit
        (the counts were persisted with the fits: no read of the data here)."""
        import dask

        from chunkglm.kernels.finite import warn

        if getattr(self, "_nonfinite_warned", True):
            return
        counts = dask.compute([run.nonfinite for run in self._runs])[0]
        for name, per_block in zip(self._run_names, counts):
            warn(sum(per_block), f"run {name}")
        self._nonfinite_warned = True

    def _fixed_effects(self, con_vals, stat_type):
        import dask
        from nilearn.glm.contrasts import Contrast

        runs = self._fits()
        # a null contrast leaves its run out of the fixed effects, as nilearn's; it is not even
        # computed (its covariance c cov c' is singular)
        used_runs = [(run, con) for run, con in zip(runs, con_vals) if np.any(con)]
        for index, con in enumerate(con_vals):
            if not np.any(con):
                warnings.warn(f"Contrast for run {index} is null.", UserWarning, stacklevel=3)
        computed = dask.compute(*[graph.contrast(run, con, stat_type) for run, con in used_runs])
        total, used = None, 0
        for (effect, variance), (run, con) in zip(computed, used_runs):
            part = Contrast(effect=np.atleast_2d(effect), variance=variance, dim=effect.shape[0],
                            dof=run.df_residuals, stat_type=stat_type)
            total = part if total is None else total + part
            used += 1
        if used == 0:
            raise InputError("All contrasts provided were null contrasts: give at least one run a "
                             "non-zero contrast.")
        return total * (1.0 / used)

    def _to_image(self, values, squeeze=True):
        """3-D image; an F contrast's (q, voxel) effect becomes q volumes, as nilearn."""
        values = np.asarray(values, dtype=np.float32)
        if squeeze and values.ndim == 2 and values.shape[0] == 1:
            values = values[0]
        ijk = self._grid.ijk if self._voxels is None else self._grid.ijk[self._voxels]
        return image_from_voxels(values, ijk, self._grid.shape, affine=self._grid.affine)


def _stage_mask(mask, folder: Path) -> str:
    import nibabel as nib
    from nilearn.image import load_img

    if isinstance(mask, str | Path):
        return str(mask)
    path = folder / "mask.nii"
    nib.save(load_img(mask), path)
    return str(path)


def _nilearn_epi_mask(paths, target_affine=None, target_shape=None):
    """The mask nilearn's FirstLevelModel computes when mask_img is None."""
    from nilearn.maskers import MultiNiftiMasker

    return MultiNiftiMasker(mask_strategy="epi", target_affine=target_affine,
                            target_shape=target_shape).fit(paths).mask_img_


def persist_fits(models, progress=None) -> None:
    """Evaluate the fits of several models as one dask graph, kept in memory.

    Each input chunk is read once (by its block's moments task); afterwards
    every contrast or voxelwise map of these models is arithmetic on the
    persisted per-block results. On a distributed cluster they stay on the
    workers. ``progress`` wraps the evaluation (e.g. a progress bar context).
    """
    import contextlib

    import dask

    pending = [model for model in models if not model._persisted]
    runs = [run for model in pending for run in model._runs]
    if not runs:
        return
    with progress or contextlib.nullcontext():  # the NaN/inf counts come from the same reads
        persisted = dask.persist(*[(run.fits, run.nonfinite) for run in runs])
    for run, (fits, counts) in zip(runs, persisted):
        run.lazy_fits, run.fits, run.nonfinite = run.fits, list(fits), list(counts)
    for model in pending:
        model._persisted = True


def _sample_rows(mask, n_scans, index):
    """nilearn's sample_mask (indices or booleans of volumes to keep) -> indices."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype == bool:
        if mask.shape != (n_scans,):
            raise InputError(f"the boolean sample_mask of run {index} has shape {mask.shape}; "
                             f"the run has {n_scans} scans.")
        return np.flatnonzero(mask)
    if mask.ndim != 1 or not np.issubdtype(mask.dtype, np.integer) or len(mask) == 0:
        raise InputError(f"sample_mask of run {index} must be 1-D volume indices or booleans; "
                         f"received dtype {mask.dtype}, shape {mask.shape}.")
    if mask.min() < 0 or mask.max() >= n_scans:
        raise InputError(f"sample_mask of run {index} indexes volumes outside 0..{n_scans - 1}.")
    return mask


def fitted_in_waves(models, window=None, progress=None):
    """Yield models with their fits evaluated, holding at most two windows at once.

    For cohorts: a window of models is persisted (on a cluster, the next one
    starts while the current one is consumed); each model yielded is released
    when the loop moves on, so memory stays flat however many models there
    are. ``window`` defaults to twice the number of workers (or threads).
    """
    window = window or _default_window()
    batches = [models[i:i + window] for i in range(0, len(models), window)]
    if batches:
        persist_fits(batches[0], progress)
    for index, batch in enumerate(batches):
        if index + 1 < len(batches):
            persist_fits(batches[index + 1], progress)  # asynchronous on a cluster
        for model in batch:
            yield model
            model.release()


class WorkerDiedError(ChunkglmError):
    """A cluster worker died (most often: over its memory limit) while running a fit task.

    Attributes
    ----------
    task : str
        The dask key of the task.
    location : dict or None
        ``{"run": name, "block": index, "n_blocks": n, "voxels": (start, stop),
        "n_time": t}`` when the task belongs to one voxel block of a run.
    """

    def __init__(self, message, task, location=None):
        super().__init__(message)
        self.task, self.location = task, location


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
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    fits = [f for f in (run.lazy_fits or run.fits) if isinstance(f, Delayed)]
    if not fits:
        return {}
    return dict(HighLevelGraph.merge(*[f.__dask_graph__() for f in fits]))


def _nearest_blocks(graph, key) -> set:
    """Voxel blocks of the data chunks nearest to ``key`` (breadth first, down the deps).

    Data chunk keys are ``(name, 0, block)``: a block's own tasks reach one
    chunk first; a run-level reduction reaches all of them at once.
    """
    from dask.core import get_dependencies

    level, seen = {key}, set()
    while level:
        chunks = {k[-1] for k in level if isinstance(k, tuple) and len(k) == 3}
        if chunks:
            return chunks
        seen |= level
        level = {d for k in level if k in graph for d in get_dependencies(graph, k)} - seen
    return set()


def worker_died_error(error, models, memory_limit=None) -> WorkerDiedError:
    """A :class:`WorkerDiedError` naming the run and voxel block of a ``KilledWorker``.

    Parameters
    ----------
    error : distributed.scheduler.KilledWorker
    models : list of FirstLevelModel
        The models being evaluated.
    memory_limit : int, optional
        Bytes per worker, for the message.
    """
    from dask.utils import format_bytes

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
    message = (
        f"a worker died while computing {place}, {error.allowed_failures + 1} time(s): most often "
        f"it went over its memory limit{limit}.{size} Use smaller chunks: convert into a new "
        "store with a smaller --chunk-mb (e.g. --chunk-mb 16 --store NEW.zarr), or give each "
        "worker more memory (memory_limit in the cluster config, e.g. "
        "CHUNKGLM_CLUSTER__LOCAL__MEMORY_LIMIT=8GiB). Complete subjects are kept.")
    return WorkerDiedError(message, key, where)


@contextlib.contextmanager
def explain_worker_deaths(models, client=None):
    """Context manager: a ``KilledWorker`` raised inside becomes a :class:`WorkerDiedError`.

    Parameters
    ----------
    models : list of FirstLevelModel
        The models evaluated inside the block (to locate the task).
    client : distributed.Client, optional
        Asked for the workers' memory limit on entry, for the message.
    """
    limit = _memory_limit(client)  # now, while the workers are all there
    try:
        yield
    except Exception as err:
        if type(err).__name__ != "KilledWorker" or not hasattr(err, "task"):
            raise
        raise worker_died_error(err, models, limit) from err


def _memory_limit(client):
    if client is None:
        return None
    try:
        workers = client.scheduler_info()["workers"].values()
        return max(w.get("memory_limit") or 0 for w in workers) or None
    except Exception:  # no client, or no worker left to ask
        return None


def _default_window() -> int:
    try:
        from distributed import default_client

        return max(2, 2 * len(default_client().scheduler_info()["workers"]))
    except (ImportError, ValueError):
        import os

        return max(2, 2 * len(os.sched_getaffinity(0)))


def _as_list(value):
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_nodes(nodes):
    from chunkglm.io.cohort import Node

    bad = [type(n).__name__ for n in nodes if not isinstance(n, Node) or n.kind != "runs"]
    if bad:
        raise InputError(
            f"run_imgs must be runs of a cohort store (chunkglm.open_cohort(store).runs[name]); "
            f"received {bad[:3]}. Convert NIfTI files first with chunkglm.convert(...).")
    grids = {n.attrs["grid_id"] for n in nodes}
    if len(grids) > 1:
        raise InputError(f"the runs of one model must share a grid; received grids {sorted(grids)}.")


def _per_run(value, n_runs, name):
    if value is None:
        return [None] * n_runs
    values = list(value) if isinstance(value, list | tuple) else [value]
    if len(values) != n_runs:
        raise InputError(f"{name} has {len(values)} entries for {n_runs} runs: give one per run.")
    return values


def _expression(expr, columns, parse):
    try:
        return parse(expr, columns)
    except Exception as err:  # pandas eval raises several kinds
        raise InputError(
            f"contrast {expr!r} cannot be evaluated on the design columns {columns}: {err}") from err


def _check_width(con, design: pd.DataFrame):
    width = np.atleast_2d(con).shape[1]
    if width != design.shape[1]:
        raise InputError(
            f"the contrast has {width} weights but the design has {design.shape[1]} columns "
            f"{list(design.columns)}. Give one weight per column (or a formula string).")
    return con


# nilearn exposes it here too; the implementation lives apart from the model.
from chunkglm.glm.from_bids import first_level_from_bids  # noqa: E402

__all__ = ["FirstLevelModel", "WorkerDiedError", "explain_worker_deaths", "first_level_from_bids",
           "fitted_in_waves", "locate_task", "persist_fits", "worker_died_error"]
