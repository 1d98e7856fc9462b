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

import inspect
import time
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr
from nilearn.glm.contrasts import Contrast, expression_to_contrast_vector
from nilearn.image import load_img, resample_img
from joblib import Memory
from nilearn.maskers import MultiNiftiMasker, NiftiMasker, SurfaceMasker
from nilearn.surface import SurfaceImage

from nilearn.maskers.masker_validation import check_embedded_masker
from scipy.sparse import issparse
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from chunkglm.chunking import MemoryBudget
from chunkglm.design.first_level import check_rank, read_table, run_design
from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.first_level import surface_inputs as surf
from chunkglm.glm.first_level.results import labels_and_results
from chunkglm.graph import glm as graph
from chunkglm.graph.evaluate import compute_blocks, persist_fits
from chunkglm.io.bids import input_entities
from chunkglm.io.cohort import Node
from chunkglm.io.inputs import stage_inputs
from chunkglm.io.nifti import image_from_voxels
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.layout import ATTR, list_written, writer_store
from chunkglm.kernels.ar import ar_order
from chunkglm.kernels.finite import warn
from chunkglm.kernels.glm import is_grand_mean_scaling
from chunkglm._estimator import NilearnEstimator
from chunkglm.report.mixin import GLMReportMixin

OUTPUT_TYPES = ("z_score", "stat", "p_value", "effect_size", "effect_variance")


class FirstLevelModel(GLMReportMixin, NilearnEstimator):
    """First-level GLM with nilearn's parameters and outputs (see nilearn's documentation).

    Parameters
    ----------
    t_r : float or None, default=None
        Repetition time (s); default each run's ``RepetitionTime``.
    slice_time_ref : float, default=0.0
        Fraction of the TR at which the design is sampled.
    hrf_model : str, callable or list, default="glover"
        As nilearn's ``make_first_level_design_matrix`` (used underneath).
    drift_model : {"cosine", "polynomial", None}, default="cosine"
        As nilearn's.
    high_pass : float, default=0.01
        Cosine drift cut-off (Hz).
    drift_order : int, default=1
        Polynomial drift order.
    fir_delays : list of int or None, default=None
        FIR delays (scans); None means [0] (``fir_delays_``).
    min_onset : float, default=-24
        Earliest onset (s) relative to the first scan.
    mask_img : str, nibabel image, fitted NiftiMasker, False or None, default=None
        Restricts the store's voxels to this mask (a subset of its grid). A
        fitted ``NiftiMasker`` gives its mask and its target_affine,
        target_shape and smoothing_fwhm (overriding the model's, with
        nilearn's warning); it becomes ``masker_``. False: every voxel of
        the images' grid. None: nilearn's multi-run EPI mask. Surface runs
        take a SurfaceImage mask or a fitted SurfaceMasker (None: the vertices
        finite in every run, nilearn's); a mask with store surface runs is
        refused (convert them with it).
    target_affine : ndarray (4, 4) or (3, 3), or None, default=None
        As nilearn's: applied when NIfTI inputs are converted (volume by
        volume, nilearn's resample_img). Store runs must have been converted
        with the same value (chunkglm.convert takes it).
    target_shape : tuple of 3 int or None, default=None
        As target_affine.
    smoothing_fwhm : float or None, default=None
        Gaussian smoothing (mm) at conversion, nilearn's smooth_img.
    memory : None, str, Path or joblib.Memory, default=None
        Accepted as nilearn's and handed to ``masker_``, but chunkglm caches
        nothing with joblib: NIfTI inputs are converted once per fit into a
        temporary store (convert them with ``chunkglm.convert`` and pass the
        store's runs to reuse the conversion). ``memory_`` is the
        ``joblib.Memory`` nilearn would use.
    memory_level : int, default=1
        Handed to ``masker_``; see ``memory``.
    standardize : False, True, "zscore_sample" or "psc", default=False
        As nilearn 0.14's, which never standardises: its ``standardize_`` is
        None whenever ``signal_scaling in [0, 1, (0, 1)]``, true of every
        valid value (False == 0). Validated, recorded, handed to ``masker_``.
    signal_scaling : False, 0, 1 or (0, 1), default=0
        0: nilearn's percent-signal-change scaling per voxel; 1: per time
        point by its mean over voxels (nilearn 0.14 fails on it: its division
        broadcasts along voxels); (0, 1): by the grand mean; False: none.
    noise_model : {"ar1", "ols", "arN"}, default="ar1"
        "arN" (N > 1): nilearn's k-means over the AR(N) coefficients, run as
        an explicit global pass over the (small) coefficient map.
    verbose : int, default=0
        As nilearn's, messages on stdout from ``fit``: 1, the runs' graphs
        being built and the time taken (the data are read later, when a
        contrast is computed); 2, also the runs staged into the store and
        the embedded masker's messages. Progress of the computation itself
        is reported by chunkglm's progress bars and the dask dashboard.
    n_jobs : int, default=1
        Not used: the dask cluster (or the threaded scheduler) runs the work.
    minimize_memory : bool, default=True
        As nilearn's: ``r_square_``, ``predicted_`` and ``residuals_`` need
        ``minimize_memory=False`` (otherwise an AttributeError, as nilearn's).
        chunkglm keeps only the per-block fits (small) either way and computes
        those maps from them when asked; :meth:`voxelwise` gives them lazily
        whatever its value.
    subject_label : str or None, default=None
        Identifies the model when passed to a SecondLevelModel.
    random_state : int, RandomState or None, default=None
        Seed of the AR(N>1) k-means, as nilearn's.
    reports : bool, default=True
        As nilearn 0.14's; chunkglm keeps what a report needs either way
        (design matrices and the mask), so it changes nothing else.
    chunk_bytes : int, str or None, default=None
        chunkglm only: the memory budget, uncompressed bytes per chunk
        (``"16MiB"``; :class:`chunkglm.chunking.MemoryBudget`). Stored chunks
        larger than it are split into smaller task blocks (each chunk is still
        read once), and NIfTI inputs are converted with chunks of this size.
        Default: a store's chunks as they are; 64 MiB for NIfTI inputs.

    Attributes
    ----------
    confound_names_ : list
        Per run, the confound column names given (chunkglm; for reports).
    design_matrices_ : list of pandas.DataFrame
        Design matrices used to fit the GLM (after sample masks).
    fir_delays_ : list
        The FIR delays used (``fir_delays``, or [0]).
    masker_ : nilearn.maskers.NiftiMasker
        Fitted on the model's mask (or the given fitted masker); a
        SurfaceMasker for surface runs, None for CIFTI runs.
    memory_ : joblib.Memory
        As nilearn's (see ``memory``).
    n_elements_ : int
        Number of voxels in the mask.
    run_entities_ : list of dict
        BIDS entities of each run (chunkglm; used for output file names).
    standardize_ : None
        As nilearn 0.14's (see ``standardize``).

    Notes
    -----
    These fitted attributes are properties, computed when read (each has its
    docstring): ``mask_img_`` (the mask of the fitted voxels), ``labels_``
    and ``results_`` (nilearn's, per run), ``r_square_``, ``predicted_`` and
    ``residuals_`` (nilearn's voxelwise attributes, which need
    ``minimize_memory=False``; nilearn makes these three properties too).
    nilearn sets ``labels_`` and ``results_`` during ``fit``; chunkglm's fit
    only builds the graph (the data are not read), so they are computed from
    the per-block fits on first read, which evaluates the graph.
    """

    def __init__(self, t_r=None, slice_time_ref=0.0, hrf_model="glover", drift_model="cosine",
                 high_pass=0.01, drift_order=1, fir_delays=None, min_onset=-24, mask_img=None,
                 target_affine=None, target_shape=None, smoothing_fwhm=None, memory=None,
                 memory_level=1, standardize=False, signal_scaling=0, noise_model="ar1", verbose=0,
                 n_jobs=1, minimize_memory=True, subject_label=None, random_state=None, reports=True,
                 chunk_bytes=None):
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
        self.memory = memory
        self.memory_level = memory_level
        self.standardize = standardize
        self.signal_scaling = signal_scaling
        self.noise_model = noise_model
        self.verbose = verbose
        self.n_jobs = n_jobs
        self.minimize_memory = minimize_memory
        self.subject_label = subject_label
        self.random_state = random_state
        self.reports = reports
        self.chunk_bytes = chunk_bytes

    _estimator_type = "glm"
    _nilearn_module = "nilearn.glm.first_level"

    def __str__(self):
        return "First Level Model"

    def _is_volume_glm(self) -> bool:
        """nilearn's: False when the mask is a surface one or the model was fitted on surface runs."""
        return not (isinstance(self.mask_img, SurfaceImage | SurfaceMasker) or getattr(self, "_surface", False))

    def _is_first_level_glm(self) -> bool:
        return True

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_runs")

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
            mask (which, as in nilearn, reads every run once more). 2-D
            nilearn SurfaceImages (vertices x time) are staged the same way on
            nilearn's surface mask (:mod:`~chunkglm.glm.first_level.surface_inputs`);
            outputs are then SurfaceImages. Store runs on a CIFTI grid give
            nibabel Cifti2Image dense scalar outputs (one map per row).
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
        started = time.perf_counter()
        self._check_params()
        _refuse_sparse(run_imgs)
        if design_matrices is not None:
            self._warn_ignored(events, confounds)
        self.fir_delays_ = [0] if self.fir_delays is None else self.fir_delays
        self.memory_ = self.memory if isinstance(self.memory, Memory) else Memory(self.memory, verbose=0)
        self.standardize_ = _standardize_strategy(self.standardize, self.signal_scaling)
        items = _as_list(run_imgs)
        self._surface = surf.is_surface_fit(items, self.mask_img)
        if self._surface:
            surf.check_surface_inputs(items, self.mask_img)
        self._embedded = self._embedded_masker()
        self._resolve_target(items)
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
        arrays = [node.dask_array() for node in nodes]  # each node opened once, no xarray Dataset
        full = [self._design(node, len(array), ev, conf, dm, i)
                for i, (node, array, ev, conf, dm) in enumerate(zip(nodes, arrays, events_list, confounds_list,
                                                                    designs))]
        rows = [_sample_rows(mask, len(design), i) for i, (mask, design) in enumerate(zip(masks, full))]
        self.design_matrices_ = [design if r is None else design.iloc[r] for design, r in zip(full, rows)]
        for index, design in enumerate(self.design_matrices_):
            check_rank(design, f"run {index} after sample_masks")
        self._grid, self._voxels = self._voxel_selection(nodes)
        self._runs = []
        for index, (array, r, design) in enumerate(zip(arrays, rows, self.design_matrices_)):
            self._log(f"Computing run {index + 1} out of {len(nodes)} runs: building its graph.")
            # nilearn's SurfaceMasker gives float64 signals: it scales them in float64
            self._runs.append(graph.fit_run(self._bold(array, r), design, self.noise_model, bins,
                                            self.signal_scaling, self.random_state, budget=self.chunk_bytes,
                                            dtype=np.float64 if self._surface else None))
        self._log(f"Computation of {len(nodes)} runs' graphs done in {time.perf_counter() - started:.2f} "
                  "seconds; the data are read when a contrast is computed.")
        self._persisted = False
        self._nonfinite_warned = False
        self.masker_ = self._fitted_masker()
        self.n_elements_ = int(self._grid.mask.sum() if self._voxels is None else len(self._voxels))
        return self

    def _warn_ignored(self, events, confounds):
        """nilearn's warnings: with design matrices, events, confounds and the design settings
        given at init (those not at their defaults) are not used."""
        given = [name for name, value in (("confounds", confounds), ("events", events)) if value is not None]
        if given:
            warnings.warn(f"If design matrices are supplied, {' and '.join(given)} will be ignored.",
                          UserWarning, stacklevel=3)
        defaults = inspect.signature(type(self).__init__).parameters
        settings = [name for name in ("drift_model", "drift_order", "fir_delays", "high_pass", "hrf_model",
                                      "min_onset", "slice_time_ref", "t_r")
                    if getattr(self, name) != defaults[name].default]
        if settings:
            warnings.warn(f"If design matrices are supplied, [{', '.join(settings)}] will be ignored.",
                          UserWarning, stacklevel=3)

    def _embedded_masker(self):
        """nilearn's embedded NiftiMasker: from a given (fitted) masker's parameters, with
        nilearn's warning where they override the model's, or from the model's."""
        given = self.mask_img
        if _is_masker(given):
            check_is_fitted(given)  # nilearn's NotFittedError ("NiftiMasker instance is not fitted yet")
        kind = "surface" if getattr(self, "_surface", False) else "nii"
        masker = check_embedded_masker(self, masker_type=kind, ignore=["high_pass"])
        if _is_masker(given) and getattr(given, "mask_img_", None) is None:
            masker.mask_img = None  # nilearn: a fitted masker without a mask -> computed from the runs
        return masker

    def _preprocessing(self):
        """(target_affine, target_shape, smoothing_fwhm) applied to NIfTI inputs: a given
        masker's (nilearn transforms with it), else the model's; a target_affine without
        target_shape resolved to the grid nilearn's resampling gives (see _resolve_target)."""
        masker = self._embedded
        resolved = getattr(self, "_target_grid", None)
        if resolved is not None:
            return (*resolved, masker.smoothing_fwhm)
        # a SurfaceMasker has no target grid
        return getattr(masker, "target_affine", None), getattr(masker, "target_shape", None), masker.smoothing_fwhm

    def _resolve_target(self, items):
        """nilearn resamples onto a target_affine given alone with the shape that holds the
        reference image's field of view: the mask's (NiftiMasker resamples it first) or, without
        a mask image, the runs' (they share one, as nilearn checks). The same (affine, shape) is
        then given to the conversion explicitly, so the grid and the values are nilearn's."""
        self._target_grid = None
        masker = self._embedded
        if self._surface or masker.target_affine is None or masker.target_shape is not None:
            return
        mask = self._mask_param()
        reference = mask if mask is not None and mask is not False else items[0]
        if isinstance(reference, Node):
            raise InputError("target_affine without target_shape needs NIfTI inputs or a mask image: "
                             "store runs were converted onto a grid already; give target_shape too.")
        img = load_img(reference)
        volume = nib.Nifti1Image(np.zeros(img.shape[:3], np.int8), img.affine)
        out = resample_img(volume, target_affine=masker.target_affine, interpolation="nearest",
                           force_resample=True, copy_header=True)
        self._target_grid = (out.affine, tuple(int(n) for n in out.shape[:3]))

    def _mask_param(self):
        """The mask image to fit in: a given masker's mask, a mask image, False (the whole
        grid) or None (nilearn's multi-run EPI mask)."""
        if _is_masker(self.mask_img):
            return self._embedded.mask_img
        return self.mask_img

    def _fitted_masker(self):
        """``masker_``: the given fitted masker, or a NiftiMasker fitted on the model's mask."""
        given = self.mask_img
        if self._surface:
            masker = surf.fitted_surface_masker(self, self.mask_img_)
            if masker is not None:  # None: CIFTI runs
                masker.standardize = self.standardize_  # as nilearn does
            return masker
        if _is_masker(given) and getattr(given, "mask_img_", None) is not None:
            given.standardize = self.standardize_  # as nilearn does
            return given
        masker = clone(self._embedded)
        masker.mask_img = self.mask_img_
        masker.standardize = self.standardize_
        return masker.fit()

    def _check_params(self):
        try:
            ar_order(self.noise_model)
        except ValueError as err:
            raise InputError(str(err)) from None
        scaling = self.signal_scaling
        if not (scaling is False or (not isinstance(scaling, bool) and scaling in (0, 1))
                or is_grand_mean_scaling(scaling)):
            raise InputError(
                f"'signal_scaling' must be one of [False, 0, 1, (0, 1)].\n{scaling!r} was provided: "
                "False (none), 0 (per voxel, over time), 1 (per time point, over voxels) or (0, 1) "
                "(by the grand mean).")

    def _as_nodes(self, items):
        target_affine, target_shape, smoothing_fwhm = self._preprocessing()
        mask = self._mask_param()
        if self._surface and not isinstance(items[0], Node):
            mask = surf.surface_mask(self, items)
        elif mask is None:
            mask = lambda infos: _nilearn_epi_mask([info.path for info in infos], target_affine, target_shape)  # noqa: E731
        elif mask is False:
            mask = None  # every voxel of the grid
        staged = stage_inputs(items, "runs", mask_img=mask, target_affine=target_affine,
                              target_shape=target_shape, smoothing_fwhm=smoothing_fwhm,
                              chunk_bytes=MemoryBudget.of(self.chunk_bytes).chunk_bytes,
                              owner=self, argument="run_imgs")
        self._converted_here = staged.converted  # the store's grid is the (resampled) mask already
        if staged.converted:
            self._log(f"Extracting region signals: {len(items)} runs staged into {staged.folder}", level=2)
        return staged.nodes

    def _check_preprocessing(self, nodes):
        wanted = SpatialPreprocessing(*self._preprocessing()).to_attrs()
        for node in nodes:
            # the marker as read when the store was opened: the version this node reads
            done = dict(node.attrs.get(ATTR, {})).get("preprocessing", SpatialPreprocessing().to_attrs())
            if done != wanted:
                raise InputError(
                    f"{node.name} was converted with {done}, but this model asks for {wanted}. "
                    "Convert the runs with the same target_affine/target_shape/smoothing_fwhm "
                    "(chunkglm.convert(..., smoothing_fwhm=...)) or pass NIfTI files.")

    def _design(self, node, n_scans, events, confounds, design, index):
        where = f"run {index} ({node.name})"
        if design is None:
            # nilearn needs t_r for NIfTI inputs; a store run converted with its sidecar knows it
            t_r = self.t_r if self.t_r is not None or self._converted_here else node.attrs.get("RepetitionTime")
            events = node.events if events is None else events
            if events is None:
                raise InputError(f"events or design matrices must be provided: {where} has no events "
                                 "stored with it; pass events=... or design_matrices=....")
            if t_r is None:
                raise InputError(f"t_r not given to FirstLevelModel object to compute design from events "
                                 f"({where}: NIfTI inputs, or a store run without RepetitionTime): "
                                 "pass t_r=....")
            design = run_design(n_scans, float(t_r), self.slice_time_ref, events, confounds,
                                hrf_model=self.hrf_model, drift_model=self.drift_model,
                                high_pass=self.high_pass, drift_order=self.drift_order,
                                fir_delays=self.fir_delays_, min_onset=self.min_onset, where=where,
                                index=index)
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
        mask_param = self._mask_param()
        if mask_param is None or mask_param is False or self._converted_here:
            return grid, None
        if self._surface:
            raise InputError("mask_img with store surface runs is not supported yet: convert the runs with "
                             "the mask (chunkglm.io.surface_convert.convert_surface_runs(..., mask=...)).")
        mask = np.asarray(load_img(mask_param).dataobj) != 0
        if mask.shape != grid.shape or (mask & ~grid.mask).any():
            raise InputError(
                f"mask_img (shape {mask.shape}) must select voxels of the store's grid {grid.shape} "
                "that the store holds; convert with this mask, or a larger one, first.")
        if (mask == grid.mask).all():
            return grid, None
        return grid, np.flatnonzero(mask[grid.mask])

    def _bold(self, bold, rows=None):
        """The fitted part of a run's (time, voxel) dask array: the volumes kept, the voxels masked."""
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
            raise InputError(f"'output_type' must be one of {[*OUTPUT_TYPES, 'all']}; received {output_type!r}.")
        contrast = self._fixed_effects(con_vals, stat_type)
        maps = {name: getattr(contrast, name)() for name in OUTPUT_TYPES if name != "p_value"}
        # z_score computed and kept nilearn's p-values (Contrast.p_value_): not computed twice
        kept = getattr(contrast, "p_value_", None)
        maps["p_value"] = contrast.p_value() if kept is None else kept
        maps = {name: maps[name] for name in OUTPUT_TYPES}
        images = {name: self._to_image(values) for name, values in maps.items()}
        return images if output_type == "all" else images[output_type]

    @property
    def mask_img_(self):
        """The mask of the fitted voxels, as a NIfTI image (nilearn's name)."""
        self._check_fitted()
        if self._surface:
            count = self._grid.n_voxels if self._voxels is None else len(self._voxels)
            return surf.elements_image(self._grid, np.ones(count, dtype=bool), self._voxels, bool)
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
        self._check_voxelwise()
        return self.voxelwise_images("r_square")

    @property
    def predicted_(self):
        """Per run, the 4-D image of nilearn's predicted values (whitened design x beta)."""
        self._check_voxelwise()
        return self.voxelwise_images("predicted")

    @property
    def residuals_(self):
        """Per run, the 4-D residual image (reads each run's data a second time)."""
        self._check_voxelwise()
        return self.voxelwise_images("residuals")

    def voxelwise_images(self, name: str) -> list:
        """Per run, the image of "r_square" (4-D of one volume), "predicted" or "residuals"
        (4-D; reads each run's data again), whatever ``minimize_memory`` (chunkglm keeps the
        per-block fits either way): what ``r_square_``, ``predicted_`` and ``residuals_`` give.
        Also "log_likelihood" (4-D of one volume, from the fits): each voxel's maximised
        log-likelihood, nilearn's ``RegressionResults.logL`` (no nilearn attribute gives it)."""
        builders = {"r_square": (lambda run: graph.r_square(run)[None], False),
                    "log_likelihood": (lambda run: graph.log_likelihood(run)[None], False),
                    "predicted": (graph.predicted, True), "residuals": (graph.residuals, True)}
        if name not in builders:
            raise InputError(f"voxelwise_images takes one of {sorted(builders)}; received {name!r}.")
        build, squeeze = builders[name]
        return self._per_run_images(build, squeeze=squeeze)

    def _check_voxelwise(self):
        """nilearn's rule: voxelwise attributes need minimize_memory=False (an AttributeError,
        so ``hasattr`` is False as for nilearn's model). chunkglm computes them from the per-block
        fits either way; :meth:`voxelwise` gives them lazily whatever minimize_memory is."""
        if self.minimize_memory:
            raise AttributeError(
                "To access voxelwise attributes like R-squared, residuals, and predictions, the "
                "`FirstLevelModel`-object needs to store there attributes. To do so, set "
                "`minimize_memory` to `False` when initializing the `FirstLevelModel`-object "
                "(or use chunkglm's model.voxelwise('residuals'), lazy, whatever minimize_memory is).")
        if not hasattr(self, "_runs"):
            raise InputError("The model has not been fit yet: call fit(...) first.")

    r_square = r_square_
    predicted = predicted_
    residuals = residuals_

    @property
    def labels_(self):
        """Per run, nilearn's label of each voxel (0.0 for OLS, the binned AR(1) coefficient as
        text, the AR(N) cluster's rounded coefficients); computed from the fits when read."""
        return [labels for labels, _ in self._labels_and_results()]

    @property
    def results_(self):
        """Per run, nilearn's {label: results} (:class:`RegressionSummary`: theta, cov,
        dispersion, df_residuals, df_model); computed from the fits when read, holding every
        voxel's betas (p x voxels per run)."""
        return [results for _, results in self._labels_and_results()]

    def _labels_and_results(self):
        if not hasattr(self, "_runs"):
            raise AttributeError("'FirstLevelModel' object has no attribute 'labels_'/'results_' "
                                 "before fit: call fit(...) first.")
        return [labels_and_results(graph.gathered_fits(run), run.r_factor, self.noise_model,
                                   len(run.basis)) for run in self._fits()]

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
        run = (self.run_entities_[index] and "_".join(f"{k}-{v}" for k, v in self.run_entities_[index].items()
                                                      if k in ("sub", "ses", "task", "run"))) or f"run-{index}"
        dims = ("voxel",) if array.ndim == 1 else ("time", "voxel")
        path = f"glm/{run}"
        data = xr.Dataset({name: (dims, array.astype(np.float32))})
        data.to_zarr(writer_store(store, storage_options), group=path, mode="a", zarr_format=3, consolidated=False)
        list_written(store, path, storage_options)
        return f"{path}/{name}"

    def _per_run_images(self, build, squeeze=True):
        self._check_fitted()
        # the voxel blocks are joined here: a worker holds one block's result at a time
        values = compute_blocks([build(run) for run in self._fits()])
        return [self._to_image(run_values, squeeze) for run_values in values]

    def _check_fitted(self):
        if not hasattr(self, "_runs"):
            raise InputError("this FirstLevelModel is not fitted yet: call fit(...) first.")

    def _contrast_vectors(self, contrast_def):
        if isinstance(contrast_def, str | np.ndarray):
            con_vals = [contrast_def]
        elif isinstance(contrast_def, list | tuple):
            con_vals = list(contrast_def)
        else:
            raise InputError(f"contrast_def must be an array or str or list of (array or str); received "
                             f"{contrast_def!r}.")
        n_runs = len(self._runs)
        if len(con_vals) == 1 and n_runs > 1:
            warnings.warn(
                f"The same contrast will be used for all {n_runs} runs. If the design matrices are not "
                "the same for all runs, (for example with different column names or column order "
                "across runs) you should pass contrast as an expression using the name of the "
                "conditions as they appear in the design matrices.", RuntimeWarning, stacklevel=3)
            con_vals = con_vals * n_runs
        elif len(con_vals) != n_runs:
            raise InputError(f"{len(con_vals)} contrasts given, while there are {n_runs} runs. Give one "
                             "contrast, or one per run.")
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
        if getattr(self, "_nonfinite_warned", True):
            return
        counts = graph.nonfinite_counts(self._runs)
        for name, per_block in zip(self._run_names, counts):
            warn(sum(per_block), f"run {name}")
        self._nonfinite_warned = True

    def _fixed_effects(self, con_vals, stat_type):
        runs = self._fits()
        # a null contrast leaves its run out of the fixed effects, as nilearn's; it is not even
        # computed (its covariance c cov c' is singular)
        used_runs = [(run, con) for run, con in zip(runs, con_vals) if np.any(con)]
        for index, con in enumerate(con_vals):
            if not np.any(con):
                warnings.warn(f"Contrast for run {index} is null.", UserWarning, stacklevel=3)
        computed = graph.compute_contrasts(used_runs, stat_type)
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
        """3-D float64 image, as nilearn's; an F contrast's (q, voxel) effect becomes q volumes."""
        values = np.asarray(values, dtype=np.float64)
        if squeeze and values.ndim == 2 and values.shape[0] == 1:
            values = values[0]
        if self._surface:
            return surf.elements_image(self._grid, values, self._voxels)
        ijk = self._grid.ijk if self._voxels is None else self._grid.ijk[self._voxels]
        return image_from_voxels(values, ijk, self._grid.shape, affine=self._grid.affine,
                                 dtype=np.float64)


def _refuse_sparse(run_imgs):
    items = run_imgs if isinstance(run_imgs, list | tuple) else [run_imgs]
    sparse = [type(item).__name__ for item in items if issparse(item)]
    if sparse:
        raise InputTypeError(f"run_imgs: sparse input is not supported (received {sparse[:3]}); give "
                             "4-D NIfTI images or runs of a cohort store.")


def _is_masker(value) -> bool:
    return isinstance(value, NiftiMasker | SurfaceMasker)


def _standardize_strategy(standardize, signal_scaling):
    """nilearn 0.14's ``standardize_``: True means "zscore_sample", and it is None whenever
    ``signal_scaling in [0, 1, (0, 1)]``, which holds for every valid value, False included
    (False == 0): nilearn's FirstLevelModel never standardises, and neither does this one."""
    if standardize not in (False, True, None, *STANDARDIZE_STRATEGIES):
        raise InputError(f"'standardize' must be one of {[False, True, *STANDARDIZE_STRATEGIES]}; "
                         f"received {standardize!r}.")
    strategy = {False: None, True: "zscore_sample"}.get(standardize, standardize)
    return None if signal_scaling in [0, 1, (0, 1)] else strategy


#: nilearn's standardize strategies (``signal.standardize_signal``)
STANDARDIZE_STRATEGIES = ("zscore_sample", "psc")


def _nilearn_epi_mask(paths, target_affine=None, target_shape=None):
    """The mask nilearn's FirstLevelModel computes when mask_img is None."""
    return MultiNiftiMasker(mask_strategy="epi", target_affine=target_affine,
                            target_shape=target_shape).fit(paths).mask_img_


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


def _as_list(value):
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_nodes(nodes):
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
        raise InputError(f"len(run_imgs) {n_runs} does not match len({name}) {len(values)}: give one "
                         f"{name} entry per run.")
    return values


def _expression(expr, columns, parse):
    try:
        return parse(expr, columns)
    except Exception as err:  # pandas eval raises several kinds
        raise InputError(
            f"contrast {expr!r} cannot be evaluated on the design columns {columns}: {err}") from err


def _check_width(con, design: pd.DataFrame):
    if np.size(con) == 0:
        raise InputError(f"t contrasts cannot be empty: got {con!r}. Give one weight per column of "
                         f"{list(design.columns)} (or a formula string).")
    width = np.atleast_2d(con).shape[1]
    if width != design.shape[1]:
        raise InputError(
            f"the contrast has {width} weights but the design has {design.shape[1]} columns "
            f"{list(design.columns)}. Give one weight per column (or a formula string).")
    return con


__all__ = ["OUTPUT_TYPES", "FirstLevelModel"]
