"""SecondLevelModel: nilearn's API, an OLS graph over the voxel blocks of a maps node.

``fit`` validates the inputs, builds the design, computes the mask (as
nilearn's masker would) and loads image inputs once into a ``maps/`` node of
a store (:mod:`chunkglm.glm.second_level.inputs`). ``compute_contrast``
evaluates the OLS fit of the (image, voxel) array block by block with the
first-level kernels (the image axis plays the role of time, with no
whitening), each stored chunk read by the task that fits it, in float64 slabs
(:func:`chunkglm.graph.glm.fit_stored`);
the fit is kept, so further contrasts are arithmetic on small per-block
results. z, stat and p maps come from nilearn's own ``Contrast``.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
from joblib import Memory
from nilearn.glm.contrasts import Contrast, expression_to_contrast_vector
from nilearn.maskers import NiftiMasker, SurfaceMasker
from nilearn.surface import SurfaceImage
from nilearn.maskers.masker_validation import check_embedded_masker
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from chunkglm._estimator import NilearnEstimator
from chunkglm.chunking import DEFAULT_CHUNK_BYTES
from chunkglm.design.second_level import check_confounds_table, check_design, make_second_level_design_matrix
from chunkglm.errors import InputError
from chunkglm.glm.first_level.model import FirstLevelModel
from chunkglm.glm.first_level.results import labels_and_results
from chunkglm.glm.first_level.surface_inputs import elements_image
from chunkglm.glm.second_level import cifti, inputs
from chunkglm.glm.second_level import surface as surf
from chunkglm.graph import glm as graph
from chunkglm.graph.evaluate import compute_blocks, persist_runs
from chunkglm.io.inputs import MapsView, scratch_folder, stage_inputs
from chunkglm.io.nifti import image_from_voxels
from chunkglm.kernels.finite import warn
from chunkglm.report.mixin import GLMReportMixin

OUTPUT_TYPES = ("z_score", "stat", "p_value", "effect_size", "effect_variance")

__all__ = ["OUTPUT_TYPES", "SecondLevelModel", "make_second_level_design_matrix", "parse_contrast"]


class SecondLevelModel(GLMReportMixin, NilearnEstimator):
    """Second-level (group) GLM with nilearn's parameters and outputs.

    Parameters
    ----------
    mask_img : str, nibabel image, fitted NiftiMasker, SurfaceImage, SurfaceMasker or None, default=None
        The analysis mask. Default: nilearn's, the background mask of the
        sample map (mean of the maps for image inputs). A fitted NiftiMasker
        gives its mask, target_affine, target_shape and smoothing_fwhm
        (overriding the model's, with nilearn's warning) and becomes ``masker_``.
        Surface maps: a SurfaceImage mask or a SurfaceMasker (nilearn's
        masker fitted on the maps' sample map; default the vertices finite in
        every map). target_affine and target_shape do not apply to surfaces.
        CIFTI maps: a CIFTI dense scalar mask (path or Cifti2Image, one map on
        the maps' brain-model axis, non-zero inside); default the
        grayordinates finite in every map. target_affine, target_shape and
        smoothing_fwhm are refused with CIFTI maps
        (:mod:`chunkglm.glm.second_level.cifti`).
    target_affine : ndarray (4, 4) or (3, 3), or None, default=None
        Resample maps (continuous) and the mask (nearest) onto this grid when
        the maps are loaded, as nilearn's masker.
    target_shape : tuple of 3 int or None, default=None
        As target_affine.
    smoothing_fwhm : float or None, default=None
        Gaussian smoothing (mm) of each map when it is loaded.
    memory : None, str, Path or joblib.Memory, default=None
        Accepted, not used for computing: the dask scheduler runs the work
        and nothing is cached with joblib; ``memory_`` is the
        ``joblib.Memory`` nilearn would use, and ``masker_`` gets it.
    memory_level : int, default=1
        Handed to ``masker_``; see ``memory``.
    verbose : int, default=0
        As nilearn's, messages on stdout from ``fit``: 1, the maps being
        loaded and the time the fit took (the model is fitted lazily, when a
        contrast is computed); 2, also the embedded masker's messages.
        Progress of the computation itself is reported by chunkglm's
        progress bars and the dask dashboard.
    n_jobs : int, default=1
        Not used: the dask scheduler (threaded, or the active distributed
        client) runs the work.
    minimize_memory : bool, default=True
        As nilearn: when True, ``r_square_``, ``residuals_`` and
        ``predicted_`` raise nilearn's AttributeError.
    reports : bool, default=True
        As nilearn 0.14's; chunkglm keeps what a report needs either way.
    store : str, Path or None, default=None
        chunkglm only: a cohort store in which image inputs are loaded (as a
        new ``maps/second_level_<id>`` node). Default: a temporary store,
        removed with the model.
    chunk_bytes : int or str, default=64 MiB
        chunkglm only: the memory budget (:class:`chunkglm.chunking.MemoryBudget`),
        uncompressed bytes per chunk of loaded maps; stored chunks larger than
        it are split into smaller task blocks (each chunk is still read once).
    scratch_dir : str, Path or None, default=None
        chunkglm only: the local folder in which the model makes its temporary
        folder (the temporary store, and the files staged from in-memory or
        processed maps); default the temporary directory (``TMPDIR``). The
        cluster's workers read that store: on a cluster of several machines,
        give a folder on a file system they share (or ``store``).

    Attributes
    ----------
    confounds_ : pandas.DataFrame or None
        As given to ``fit``.
    design_matrix_ : pandas.DataFrame of shape (n_maps, n_regressors)
        The design used.
    mask_img_ : nibabel image
        The analysis mask.
    masker_ : nilearn.maskers.NiftiMasker, SurfaceMasker or None
        Fitted on ``mask_img_`` (or the given fitted masker); None for CIFTI maps.
    memory_ : joblib.Memory
        As nilearn's (see ``memory``).
    n_elements_ : int
        Voxels in the mask.
    second_level_input_ : as given to ``fit``
        The input maps (a list of images or models, a DataFrame or a node).

    Notes
    -----
    These fitted attributes are properties, computed when read after
    ``compute_contrast`` (each has its docstring): ``labels_`` and
    ``results_`` (nilearn's, of the last contrast's fit, see
    :func:`chunkglm.glm.first_level.results.labels_and_results`),
    ``r_square_``, ``predicted_`` and ``residuals_`` (nilearn's voxelwise
    attributes of the last contrast's fit, which need
    ``minimize_memory=False``; nilearn makes these three properties too).
    nilearn sets ``labels_`` and ``results_`` to None during ``fit`` and
    fills them in ``compute_contrast``; chunkglm computes them from the
    per-block fits on first read.
    """

    _estimator_type = "glm"
    _nilearn_module = "nilearn.glm.second_level"

    def __init__(self, mask_img=None, target_affine=None, target_shape=None, smoothing_fwhm=None,
                 memory=None, memory_level=1, verbose=0, n_jobs=1, minimize_memory=True,
                 reports=True, store=None, chunk_bytes=DEFAULT_CHUNK_BYTES, scratch_dir=None):
        self.mask_img = mask_img
        self.target_affine = target_affine
        self.target_shape = target_shape
        self.smoothing_fwhm = smoothing_fwhm
        self.memory = memory
        self.memory_level = memory_level
        self.verbose = verbose
        self.n_jobs = n_jobs
        self.minimize_memory = minimize_memory
        self.reports = reports
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.scratch_dir = scratch_dir

    def __str__(self):
        return "Second Level Model"

    def _is_volume_glm(self) -> bool:
        """nilearn's: False when the mask is a surface one or the model was fitted on surface maps."""
        return not (isinstance(self.mask_img, SurfaceImage | SurfaceMasker) or getattr(self, "_surface", False))

    def _is_first_level_glm(self) -> bool:
        return False

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "second_level_input_", None) is not None

    def _embedded_masker(self):
        """nilearn's embedded NiftiMasker (a given fitted masker's parameters, with nilearn's
        warning where they override the model's)."""
        if isinstance(self.mask_img, NiftiMasker):
            check_is_fitted(self.mask_img)  # nilearn's NotFittedError
        return check_embedded_masker(self, masker_type="surface" if self._surface else "nii")

    def _preprocessing(self):
        """(mask, target_affine, target_shape, smoothing_fwhm): a given masker's, else the model's."""
        if self._cifti:  # checked at fit: no masker, no resampling or smoothing of grayordinates
            return self.mask_img, None, None, None
        masker = self._embedded
        return (masker.mask_img, getattr(masker, "target_affine", None), getattr(masker, "target_shape", None),
                masker.smoothing_fwhm)

    def _fitted_masker(self):
        if self._cifti:  # nilearn has no CIFTI masker
            return None
        if self._surface:
            return self._surface_masker
        if isinstance(self.mask_img, NiftiMasker) and getattr(self.mask_img, "mask_img_", None) is not None:
            return self.mask_img
        masker = clone(self._embedded)
        masker.mask_img = self.mask_img_
        return masker.fit()

    @property
    def labels_(self):
        """nilearn's labels of the last contrast's fit (0.0 for every voxel: OLS)."""
        return self._labels_and_results()[0]

    @property
    def results_(self):
        """nilearn's {0.0: results} of the last contrast's fit (theta, cov, dispersion, df)."""
        return self._labels_and_results()[1]

    def _labels_and_results(self):
        if getattr(self, "_last_run", None) is None:
            raise AttributeError("'SecondLevelModel' object has no attribute 'labels_'/'results_' "
                                 "before compute_contrast(...).")
        run = self._last_run[1]
        return labels_and_results(graph.gathered_fits(run), run.r_factor, "ols", len(run.basis))

    # -- fit -------------------------------------------------------------------

    def fit(self, second_level_input, confounds=None, design_matrix=None):
        """Validate the inputs, build the design and mask, load image maps once.

        Parameters
        ----------
        second_level_input : list of 3-D images, 4-D image, DataFrame, list of FirstLevelModel, maps node or SurfaceImages
            As nilearn's: 3-D images (paths or nibabel) or one 4-D image
            (need ``design_matrix``); a DataFrame with columns
            ``subject_label``, ``map_name``, ``effects_map_path`` (the maps of
            ``first_level_contrast`` are used at ``compute_contrast``);
            fitted :class:`chunkglm.glm.first_level.FirstLevelModel` objects
            (their effect maps of ``first_level_contrast``); or a maps node of
            a cohort store (``chunkglm.open_cohort(store).maps[name]``).
            Surfaces (:mod:`chunkglm.glm.second_level.surface`): a list of
            SurfaceImage maps or one 2-D SurfaceImage (need ``design_matrix``),
            FirstLevelModels fitted on surfaces (nilearn 0.14.1's own
            compute_contrast refuses these), or a maps node of a mesh grid;
            the outputs are then SurfaceImages. CIFTI-2 dense scalar maps
            (``.dscalar.nii`` paths or nibabel Cifti2Images, a list or one file
            of several maps; need ``design_matrix``), a maps node of a CIFTI
            grid, or FirstLevelModels fitted on CIFTI store runs: the outputs
            are dense scalar Cifti2Images on the maps' brain-model axis and
            ``masker_`` is None (nilearn reads no CIFTI).
        confounds : pandas.DataFrame, optional
            ``subject_label`` plus covariate columns (one row per subject).
        design_matrix : pandas.DataFrame or path, optional
            One row per map, in the maps' order.

        Returns
        -------
        self
        """
        started = time.perf_counter()
        self._reset()
        self.memory_ = self.memory if isinstance(self.memory, Memory) else Memory(self.memory, verbose=0)
        kind = inputs.input_kind(second_level_input)
        self._log(f"Fitting second level model: loading the maps ({kind} input).")
        self._cifti = cifti.is_cifti_input(second_level_input)
        cifti.check_options(self._cifti, self.target_affine, self.target_shape, self.smoothing_fwhm, self.mask_img)
        self._surface = self._cifti or surf.is_surface_input(second_level_input, self.mask_img)
        self._embedded = None if self._cifti else self._embedded_masker()
        if kind == "surface":
            surf.check_surface_images(second_level_input, design_matrix is None)
        if confounds is not None:
            check_confounds_table(confounds)
        if design_matrix is not None:
            design_matrix = check_design(design_matrix, None)
        loader = {"images": self._fit_images, "dataframe": self._fit_dataframe, "flm": self._fit_models,
                  "maps": self._fit_node, "surface": self._fit_surface, "cifti": self._fit_cifti}[kind]
        labels, n_maps = loader(second_level_input, confounds, design_matrix)
        design = design_matrix if design_matrix is not None else make_second_level_design_matrix(labels, confounds)
        self.design_matrix_ = check_design(design, n_maps)
        self._kind = kind
        self.confounds_ = confounds
        self.masker_ = self._fitted_masker()
        self.n_elements_ = (self.masker_.n_elements_ if self._surface and not self._cifti
                            else int(np.asarray(self.mask_img_.dataobj).astype(bool).sum()))
        self._log(f"Computation of second level model ({n_maps} maps) done in "
                  f"{time.perf_counter() - started:.2f} seconds; its fit is computed with a contrast.")
        return self

    def _reset(self):
        for name in ("_kind", "_maps", "_fits", "_last_run", "design_matrix_", "mask_img_", "_surface_masker",
                     "_cifti"):
            self.__dict__.pop(name, None)
        self._maps, self._fits, self._nonfinite = {}, {}, {}

    def _fit_images(self, second_level_input, confounds, design_matrix):
        images = inputs.image_list(second_level_input)
        inputs.check_images(images, resampling=self._preprocessing()[1] is not None)
        if design_matrix is None:
            raise InputError("List of niimgs as 'second_level_input' require a design matrix to be "
                             "provided (one row per map); build one with "
                             "make_second_level_design_matrix(subject_labels, confounds).")
        self.second_level_input_ = images
        mask = self._mask(images)
        self._maps[None] = self._load(images, mask)
        return None, len(images)

    def _fit_surface(self, second_level_input, confounds, design_matrix):
        maps = surf.effect_maps(second_level_input)
        if len(maps) < 2:
            raise InputError(f"a second-level model needs at least 2 maps; received {len(maps)}.")
        self.second_level_input_ = second_level_input
        self._mask(surf.sample_map(second_level_input if isinstance(second_level_input, SurfaceImage)
                                   else maps))
        self._maps[None] = self._load(maps, self.mask_img_)
        return None, len(maps)

    def _fit_cifti(self, second_level_input, confounds, design_matrix):
        items = cifti.map_list(second_level_input)
        n_maps = cifti.count_maps(items)
        if n_maps < 2:
            raise InputError(f"a second-level model needs at least 2 maps; the CIFTI input holds {n_maps}.")
        if design_matrix is None:
            raise InputError("CIFTI maps as 'second_level_input' require a design matrix to be provided (one "
                             "row per map); build one with make_second_level_design_matrix(subject_labels, "
                             "confounds).")
        self.second_level_input_ = second_level_input
        node = self._stage(items, None)  # every grayordinate: the default mask is read from the node
        self._maps[None], self.mask_img_ = cifti.node_maps(node, self.mask_img)
        return None, n_maps

    def _fit_dataframe(self, frame, confounds, design_matrix):
        frame = inputs.dataframe_rows(frame)
        self.second_level_input_ = frame
        self._mask(frame["effects_map_path"][0])
        return frame["subject_label"].tolist(), None

    def _fit_models(self, models, confounds, design_matrix):
        models = list(models)
        if len(models) < 2:
            raise InputError(f"a second-level model needs at least 2 first-level models; received {len(models)}.")
        _check_models(models, confounds is not None, self._surface)
        self.second_level_input_ = models
        first = models[0]
        self._mask(first.compute_contrast(first.design_matrices_[0].columns[0], output_type="effect_size"))
        return [m.subject_label for m in models], len(models)

    def _fit_node(self, node, confounds, design_matrix):
        if self._cifti:
            maps, self.mask_img_ = cifti.node_maps(node, self.mask_img)
        elif self._surface:
            given = self._preprocessing()[0]
            maps, self.mask_img_ = surf.node_maps(node, given, self._preprocessing()[3])
            masker = clone(self._embedded)
            masker.mask_img = self.mask_img_
            self._surface_masker = masker.fit()
        else:
            maps = inputs.node_maps(node, *self._preprocessing())
            self.mask_img_ = maps.mask_img()
        self.second_level_input_ = node
        self._maps[None] = maps
        labels = None
        if design_matrix is None:
            ds = node.to_dataset()
            if "subject" not in ds.coords and "subject" not in ds:
                raise InputError(f"the maps node {node.name!r} has no subject labels: pass design_matrix "
                                 "(one row per map).")
            labels = [str(s) for s in ds["subject"].values]
        return labels, int(node.data().shape[0])

    def _mask(self, sample):
        if self._cifti:  # first-level models' maps: a given CIFTI mask, or the sample's finite elements
            self.mask_img_ = cifti.sample_mask(sample, self.mask_img, self.second_level_input_[0]._grid)
            return self.mask_img_
        if self._surface:  # nilearn's SurfaceMasker fitted on the sample map
            self._surface_masker = surf.fit_masker(self, sample)
            self.mask_img_ = self._surface_masker.mask_img_
            return self.mask_img_
        mask, target_affine, target_shape, _ = self._preprocessing()
        self.mask_img_ = inputs.analysis_mask(mask, sample, target_affine, target_shape)
        return self.mask_img_

    def _load(self, images, mask) -> MapsView:
        """Stack the maps into a new maps node (processed as nilearn's masker), all its voxels."""
        nonfinite = None
        if self._cifti:
            mask = np.asarray(mask.dataobj)[0] != 0
        elif self._surface:
            mask = surf.mask_elements(mask, [p for p in ("left", "right") if p in images[0].data.parts])
            nonfinite = surf.nonfinite_elements(images, mask)
        view = MapsView(self._stage(images, mask))
        if nonfinite is not None and nonfinite.size:
            self._nonfinite[id(view)] = nonfinite
        return view

    def _stage(self, images, mask):
        """The maps written once into a new maps node of the model's store (on ``mask``)."""
        if getattr(self, "_folder", None) is None:
            self._folder = scratch_folder(self, "chunkglm-second-level-", self.scratch_dir)
        staged = stage_inputs(images, "maps", mask_img=mask, smoothing_fwhm=self._preprocessing()[3],
                              map_types=("effect",), chunk_bytes=self.chunk_bytes, folder=self._folder,
                              store=self.store, collection=f"second_level_{uuid.uuid4().hex[:12]}",
                              argument="second_level_input", resample_to_mask=True)
        return staged.nodes[0]

    # -- contrasts ---------------------------------------------------------------

    def compute_contrast(self, second_level_contrast=None, first_level_contrast=None,
                         second_level_stat_type=None, output_type="z_score"):
        """Compute a second-level contrast, as nilearn's.

        Parameters
        ----------
        second_level_contrast : str, array of shape (p,) or (q, p), optional
            Weights on the design's columns, or a formula over their names
            (``"intercept - age"``). Default: ``[1]`` for a one-column design.
        first_level_contrast : str or array, optional
            DataFrame input: the ``map_name`` to model. First-level models:
            their contrast whose effect maps are modelled (required).
        second_level_stat_type : {"t", "F"}, optional
            Default "t" for a vector, "F" for a matrix.
        output_type : {"z_score", "stat", "p_value", "effect_size", "effect_variance", "all"}

        Returns
        -------
        nibabel.Nifti1Image or dict of them
            3-D float64 maps (as nilearn's) on the mask's grid (an F effect: one volume per
            contrast row); "all" gives a dict keyed by output type.
        """
        self._check_fitted()
        if self._kind == "flm" and first_level_contrast is None:
            raise InputError("second_level_input was a list of FirstLevelModels: first_level_contrast is "
                             "required (the contrast whose effect maps are modelled).")
        con_val = self._contrast_vector(second_level_contrast)
        stat_type = _stat_type(con_val, second_level_stat_type)
        if output_type not in (*OUTPUT_TYPES, "all"):
            raise InputError(f"'output_type' must be one of {[*OUTPUT_TYPES, 'all']}; received {output_type!r}.")
        maps = self._maps_for(first_level_contrast)
        run = self._fit(maps)
        effect, variance = _compute(run, con_val, stat_type)
        effect = effect[0] if stat_type == "t" else np.atleast_2d(effect)
        contrast = Contrast(effect=effect, variance=variance, dim=1 if stat_type == "t" else effect.shape[0],
                            dof=run.df_residuals, stat_type=stat_type)
        names = OUTPUT_TYPES if output_type == "all" else (output_type,)
        images = {}
        for name in names:
            values = np.array(getattr(contrast, name)(), dtype=np.float64)
            if id(maps) in self._nonfinite:  # nilearn's SurfaceMasker keeps NaN/inf: its fit gives NaN there
                values[..., self._nonfinite[id(maps)]] = np.nan
            img = self._to_image(maps, values)
            if not self._surface:
                img.header["descrip"] = f"{output_type} of contrast {con_val}"  # nilearn's text
            images[name] = img
        return images if output_type == "all" else images[output_type]

    def _check_fitted(self):
        if not hasattr(self, "design_matrix_"):
            raise InputError("this SecondLevelModel is not fitted yet: call fit(...) first.")

    def _contrast_vector(self, contrast):
        columns = [str(c) for c in self.design_matrix_.columns]
        con = parse_contrast(contrast, columns)
        if con.size == 0 or not np.any(con):
            raise InputError("Contrast is null. Second_level_contrast must be a valid contrast vector, a "
                             "list/array of 0s and 1s, a string, or a string expression; received "
                             f"{contrast!r}.")
        width = np.atleast_2d(con).shape[1]
        if con.ndim > 2 or width != len(columns):
            nilearns = (f"t contrasts should be of length P={len(columns)}, but it has length {width}."
                        if con.ndim == 1 else
                        f"F contrasts should have {len(columns)} columns, but it has {width}.")
            raise InputError(f"{nilearns} The design has columns {columns}: give one weight per column "
                             f"(a (q, {len(columns)}) matrix for F).")
        return con

    def _maps_for(self, first_level_contrast) -> MapsView:
        if self._kind in ("images", "maps", "surface", "cifti"):
            return self._maps[None]
        key = first_level_contrast if isinstance(first_level_contrast, str) else repr(
            np.asarray(first_level_contrast).tolist())
        if key not in self._maps:
            if self._kind == "dataframe":
                images = inputs.dataframe_maps(self.second_level_input_, first_level_contrast)
            else:
                images = [m.compute_contrast(first_level_contrast, output_type="effect_size")
                          for m in self.second_level_input_]
            if len(images) != len(self.design_matrix_):
                raise InputError(f"'design_matrix' does not match the number of maps considered. "
                                 f"{len(self.design_matrix_)} rows in design matrix do not match with "
                                 f"{len(images)} maps (first_level_contrast={first_level_contrast!r}): "
                                 "give one row per map.")
            if not self._surface:
                inputs.check_images(images, resampling=self._preprocessing()[1] is not None)
            self._maps[key] = self._load(images, self.mask_img_)
        return self._maps[key]

    def _fit(self, maps: MapsView):
        """The OLS fit of these maps, evaluated once and kept."""
        key = id(maps)
        if key not in self._fits:
            self._fits[key] = _evaluate_fit(maps, self.design_matrix_, self.chunk_bytes,
                                            warn_nonfinite=self._cifti or not self._surface)
        self._last_run = (maps, self._fits[key])
        return self._fits[key]

    def _to_image(self, maps, values, dtype=np.float64):
        grid = maps.grid
        if self._surface:  # a SurfaceImage on the maps' mesh, 0 outside the analysed vertices
            return elements_image(grid, np.asarray(values), maps.voxels, dtype=dtype)
        return image_from_voxels(np.asarray(values), maps.ijk, grid.shape, affine=grid.affine,
                                 dtype=dtype)

    # -- voxelwise model attributes (nilearn 0.14 names) ----------------------------------

    @property
    def r_square_(self):
        """nilearn's r-square of the last contrast's fit: a 4-D image of one volume."""
        maps, run = self._voxelwise_run()
        return self._to_image(maps, _gather(graph.r_square(run))[None])

    @property
    def predicted_(self):
        """Predicted values X beta of the last contrast's fit: a 4-D image, one volume per map."""
        maps, run = self._voxelwise_run()
        return self._to_image(maps, _gather(graph.predicted(run)))

    @property
    def residuals_(self):
        """Residuals Y - X beta of the last contrast's fit (reads the maps again): 4-D image."""
        maps, run = self._voxelwise_run()
        return self._to_image(maps, _gather(graph.residuals(run)))

    r_square = r_square_
    predicted = predicted_
    residuals = residuals_

    def _voxelwise_run(self):
        self._check_fitted()
        if self.minimize_memory:
            raise AttributeError(
                "To access voxelwise attributes like R-squared, residuals, and predictions, the "
                "`SecondLevelModel`-object needs to store there attributes. To do so, set "
                "`minimize_memory` to `False` when initializing the `SecondLevelModel`-object "
                "(chunkglm keeps only per-block fits either way; nilearn's rule is kept).")
        if getattr(self, "_last_run", None) is None:
            raise InputError("The model has no results. No contrast has been computed yet: call "
                             "compute_contrast(...) first.")
        return self._last_run


def _stat_type(con_val, stat_type):
    dim = con_val.shape[0] if con_val.ndim > 1 else 1
    if stat_type is None:
        stat_type = "t" if dim == 1 else "F"
    if not isinstance(stat_type, str) or stat_type not in ("t", "F"):
        raise InputError(f"'stat_type' must be one of ['t', 'F'] (second_level_stat_type); received "
                         f"{stat_type!r}.")
    if stat_type == "t" and dim > 1:
        raise InputError(f"a t contrast is one row of weights; received {dim} rows. Use "
                         "second_level_stat_type='F' for a matrix.")
    return stat_type


def _check_models(models, need_labels, surface=False):
    """nilearn's checks on first-level models: fitted, one grid, labels for confounds."""
    reference = None
    for index, model in enumerate(models):
        if not inputs.is_first_level_model(model) or not inputs.is_fitted_first_level(model):
            raise InputError(f"Model {getattr(model, 'subject_label', None)} at index {index} has not been "
                             "fit yet: call fit(...) on it first.")
        if need_labels and model.subject_label is None:
            raise InputError(f"In case confounds are provided, first level objects need to provide the "
                             f"attribute 'subject_label'; model {index} has none (set "
                             "model.subject_label = '01').")
        mask = inputs.first_level_mask(model)
        if reference is None:
            reference = mask
        elif surface:  # SurfaceImage masks (CIFTI runs: dense scalar Cifti2Images)
            if not isinstance(mask, type(reference)) or mask.shape != reference.shape:
                raise InputError(f"first-level model {index} is not fitted on the mesh of model 0 (its mask: "
                                 f"{type(mask).__name__} of shape {mask.shape}): all models must share one mesh.")
        elif mask.shape != reference.shape or not np.allclose(mask.affine, reference.affine, atol=1e-4):
            raise InputError(f"first-level model {index} is on another grid (shape {mask.shape}) than model 0 "
                             f"(shape {reference.shape}): all models must share one grid.")


def _evaluate_fit(maps, design, budget=None, warn_nonfinite=True):
    """Build the OLS graph over the maps' stored blocks and persist the per-block fits.

    Each task reads its stored chunk itself and fits it in float64 slabs
    (:func:`chunkglm.graph.glm.fit_stored`): a worker holds one chunk per running task.
    As nilearn's masker, NaN/inf values of the maps count as 0 (a warning gives
    how many voxels held one; the counts come from the same reads as the fits).
    ``warn_nonfinite=False`` for surface maps: nilearn's SurfaceMasker keeps them
    and its maps are NaN there, which the model's outputs give instead.
    """
    run = graph.fit_stored(inputs.stored_maps(maps.node, maps.voxels), design, budget, bold=maps.data())
    persist_runs([run])
    if warn_nonfinite:
        warn(sum(graph.nonfinite_counts([run])[0]), "the second-level input maps")
    return run


def _compute(run, con_val, stat_type):
    effect, variance = graph.compute_contrasts([(run, con_val)], stat_type)[0]
    return np.atleast_2d(effect), variance


def _gather(array) -> np.ndarray:
    """Compute a lazy (…, voxel) array block by block and join the blocks here."""
    return compute_blocks([array])[0]


def parse_contrast(contrast, columns) -> np.ndarray:
    """A second-level contrast as weights: a formula over ``columns`` (nilearn's
    ``expression_to_contrast_vector``), numbers, or None for a one-column design.

    Parameters
    ----------
    contrast : None, str or array-like
    columns : list of str
        The design's column names.

    Returns
    -------
    ndarray of float64, as given (1-D for t, 2-D for F); shape checks are the caller's.
    """
    if contrast is None:
        if len(columns) != 1:
            raise InputError(f"No second-level contrast is specified, and the design has {len(columns)} "
                             f"columns {columns}: name the contrast (e.g. 'intercept' or [1, 0]).")
        return np.ones(1)
    if isinstance(contrast, str):
        if len(set(columns)) != len(columns):
            raise InputError(f"contrast {contrast!r} names columns, but the design's column names are not "
                             f"unique: {columns}. Give the contrast as weights, one per column.")
        try:
            return np.asarray(expression_to_contrast_vector(contrast, columns), dtype=np.float64)
        except Exception as err:  # pandas eval raises several kinds
            raise InputError(f"contrast {contrast!r} cannot be evaluated on the design columns "
                             f"{columns}: {err}") from None
    try:
        return np.asarray(contrast, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"second_level_contrast must be numbers or a formula; received {contrast!r}.") from None
