"""NiftiMapsMasker / MultiNiftiMapsMasker: nilearn's maps maskers over cohort stores.

The classes are scikit-learn estimators as nilearn's are (:mod:`chunkglm._estimator`),
with nilearn's fitted attributes, errors, warnings and report
(:mod:`chunkglm.maskers._report`). ``MapsMasker`` and ``MultiMapsMasker`` are
the same classes under chunkglm's first names.

Extraction is nilearn's ``img_to_signals_maps`` least squares, computed as a
reduction over voxel blocks (:mod:`chunkglm.graph.maps`): ``maps.T @ maps``
once per atlas, ``maps.T @ data`` per run, then the small solve. The region
signals are then cleaned by nilearn's own ``nilearn.signal.clean`` with the
arguments nilearn's masker passes. All runs of one ``transform`` are one dask
graph; each data chunk is read once (twice with ``high_variance_confounds``,
which needs a global threshold between two passes, as nilearn's).
Probabilistic maps are mostly zero: they are held as a sparse (voxel, map)
matrix, and only their non-zero values cost work.

NIfTI files that need no resampling, smoothing or high-variance confounds
are read as they are, volume by volume (one task per run: a file is stored
time-major, so this is its single streaming pass); other NIfTI inputs are
converted into a temporary store first.

Differences from nilearn, by design:

- Store runs hold the voxels of the store's grid mask only: for them the
  store's mask acts as part of ``mask_img`` (maps weight at voxels the store
  lacks is ignored, with a warning). NIfTI inputs are read (or converted)
  with every voxel (or ``mask_img``'s), so they match nilearn exactly.
- ``smoothing_fwhm`` (and the data resampling of ``resampling_target`` "mask"
  or "maps") is applied when NIfTI inputs are converted (nilearn's
  ``resample_img``/``smooth_img``, volume by volume); store runs must have
  been converted with the same values.
- High-variance confounds (nilearn: from the input image as given, every
  voxel) come from the stored run; for NIfTI inputs that are smoothed or
  resampled, from an unprocessed copy converted alongside. Voxels outside a
  store's mask count as constant (zero) series in the percentile.
- ``t_r=None`` with a filter uses the runs' stored RepetitionTime.
- Signals are solved and cleaned in float64 and returned in nilearn's dtype.
- MultiNiftiMapsMasker given one run takes a plain list of indices or booleans
  as that run's entry of ``sample_mask`` (``[[1, 2, 4]]``), as NiftiMapsMasker
  takes it; nilearn's raises TypeError ("'int' object is not iterable").

Outputs: ``transform`` gives nilearn's list of (time, region) arrays;
``transform_to_xarray`` a labelled (run, time, region) DataArray, written by
:func:`save_timeseries` (BIDS-derivative TSV + JSON per run) or
:func:`save_timeseries_to_store` (``timeseries/<atlas>`` of a zarr store).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import joblib
import nibabel as nib
import numpy as np
from nilearn._utils.numpy_conversions import get_target_dtype
from nilearn.image import load_img, resample_img
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from chunkglm._estimator import NilearnEstimator
from chunkglm.chunking import MemoryBudget
from chunkglm.errors import InputError
from chunkglm.graph import maps as graph
from chunkglm.io.bids import input_entities
from chunkglm.io.cohort import Node
from chunkglm.io.inputs import stage_inputs
from chunkglm.io.nifti import read_info
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.layout import Grid, node_meta
from chunkglm.io.write_run import _seconds
from chunkglm.kernels.maps import CleanSpec
from chunkglm.maskers._maps_input import (
    NiftiVolumeReader,
    ZarrRunReader,
    maps_source,
    prepare_maps,
    same_grid,
)
from chunkglm.maskers._helpers import (
    FITTED,
    FileRun,
    as_list,
    batched_moments,
    check_confounds,
    downcast_int64,
    file_t_r,
    input_grid,
    input_name,
    load_mask,
    mismatch,
    multi_doc,
    nilearn_data_dtype,
    node_key,
    one_run_sample_mask,
    per_run,
    read_image,
    reread,
    run_reader,
)
from chunkglm.maskers._docs import NIFTI_MAPS_MASKER_DOC
from chunkglm.maskers._report import MapsReportMixin
from chunkglm.maskers._validation import (
    check_input_type,
    check_maps_img,
    check_not_bool_dtype,
    fov_error,
    log,
    single_run,
    warn_non_finite,
)
from chunkglm.maskers.outputs import to_xarray

RESAMPLING_TARGETS = ("data", "mask", "maps", None)
STANDARDIZE = ("zscore_sample", "zscore", "psc", True, False, None)


class NiftiMapsMasker(MapsReportMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, NilearnEstimator):
    __doc__ = NIFTI_MAPS_MASKER_DOC

    _estimator_type = "masker"
    _nilearn_module = "nilearn.maskers"
    _multi = False

    def __init__(self, maps_img=None, mask_img=None, allow_overlap=True, smoothing_fwhm=None,
                 standardize=False, standardize_confounds=True, high_variance_confounds=False,
                 detrend=False, low_pass=None, high_pass=None, t_r=None, dtype=None,
                 resampling_target="data", keep_masked_maps=False, memory=None, memory_level=0,
                 verbose=0, reports=True, cmap="CMRmap_r", clean_args=None, maps_store=None,
                 chunk_bytes=None):
        self.maps_img = maps_img
        self.mask_img = mask_img
        self.allow_overlap = allow_overlap
        self.smoothing_fwhm = smoothing_fwhm
        self.standardize = standardize
        self.standardize_confounds = standardize_confounds
        self.high_variance_confounds = high_variance_confounds
        self.detrend = detrend
        self.low_pass = low_pass
        self.high_pass = high_pass
        self.t_r = t_r
        self.dtype = dtype
        self.resampling_target = resampling_target
        self.keep_masked_maps = keep_masked_maps
        self.memory = memory
        self.memory_level = memory_level
        self.verbose = verbose
        self.reports = reports
        self.cmap = cmap
        self.clean_args = clean_args
        self.maps_store = maps_store
        self.chunk_bytes = chunk_bytes
        self._reset_report()

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "maps_img_") and hasattr(self, "n_elements_")

    @property
    def _n_features_out(self):
        """Output columns, for scikit-learn's ``set_output`` feature names."""
        return self.n_elements_

    # -- fit ---------------------------------------------------------------------------

    def fit(self, imgs=None, y=None):
        """Check the maps and mask; with ``imgs``, prepare the maps on their grid.

        Parameters
        ----------
        imgs : store run(s), NIfTI path(s) or image(s), optional
            Data defining the grid for ``resampling_target="data"``.
        y : None
            Ignored (scikit-learn's signature).

        Returns
        -------
        self
        """
        del y
        self._fit_inputs(imgs)
        return self

    def _fit_inputs(self, imgs):
        """Fit; return the runs read as files (list of FileRun), store nodes, or None."""
        if imgs is not None and not self._multi:
            imgs = single_run(imgs)
        self._setup()
        log(self, "load_regions", self.maps_img)
        if self.mask_img is not None:
            log(self, "load_mask", self.mask_img)
        runs = None
        if imgs is not None:
            log(self, "load_data", imgs)
            items, _ = self._as_4d(as_list(imgs))
            runs = self._file_runs(items)
            if runs is not None:  # NIfTI files read as they are: the maps are ready on their grid
                self._fit_grid = runs[0].grid
            else:
                runs = self._as_nodes(items)
                self._fit(runs)
            self._input_entities = [input_entities(item) for item in as_list(imgs)]
        else:
            self._fit(None)
        self._finish_fit(imgs)
        log(self, "fit_done")
        return runs

    def _fit(self, nodes):
        """Fit after :meth:`_setup`: the grid of ``nodes`` (store runs) and the maps on it."""
        if nodes is not None:
            self._fit_grid = self._grid_of(nodes)
            self._maps_on(self._fit_grid, voxel_chunk=nodes[0].data().chunks[1][0])
        elif self.resampling_target in ("mask", "maps"):
            self._fit_grid = self._target_grid_without_data()
            self._maps_on(self._fit_grid)  # nilearn's errors at fit (no map left in the mask)
        else:
            self._check_fov_without_data()
            if not self._source.any_nonzero():
                raise InputError("maps_img contains no map.")
        return self

    def _setup(self):
        """Validate parameters, read the maps' header and the mask; forget previous fits."""
        check_maps_img(self.maps_img)
        self._check_params()
        self._reset_report()
        for name in FITTED:
            self.__dict__.pop(name, None)
        self._source = maps_source(self.maps_img)
        self._mask = load_mask(self.mask_img)
        self._prepared: dict = {}
        self._fit_grid = None
        self.clean_args_ = {} if self.clean_args is None else dict(self.clean_args)
        self.memory_ = self.memory if isinstance(self.memory, joblib.Memory) else joblib.Memory(
            location=self.memory, verbose=0)
        if not hasattr(self, "_input_dtypes"):
            self._input_dtypes: dict = {}  # (store, run) -> dtype of the converted NIfTI
            self._hv_sources: dict = {}  # (store, run) -> unprocessed run, for hv confounds

    def _finish_fit(self, imgs):
        """nilearn's fitted attributes, and what the report draws."""
        grid = self._fit_grid
        self.maps_img_ = self._source.image_on(None if grid is None else (grid.affine, grid.shape))
        if grid is not None and not same_grid(self._source.affine, self._source.shape, grid.affine, grid.shape):
            log(self, "resample_regions")
        if self._mask is not None and grid is not None and not same_grid(
                self._mask[0], self._mask[1].shape, grid.affine, grid.shape):
            log(self, "resample_mask")
        if self._mask is None:
            self.mask_img_ = None
        elif grid is None:
            affine, mask = self._mask
            self.mask_img_ = read_image(mask.astype(np.int8), affine)
        else:
            self.mask_img_ = read_image(self._mask_on(grid).astype(np.int8), grid.affine)
        if "region_indices_" not in self.__dict__:  # no grid yet: every map, until transform
            self.region_indices_ = np.arange(self._source.n_maps)
            self.dropped_regions_ = []
        self.n_elements_ = self._source.n_maps
        self._set_reporting_data(imgs)

    def _check_fov_without_data(self):
        if self.resampling_target is None and self._mask is not None:
            affine, mask = self._mask
            if not same_grid(affine, mask.shape, self._source.affine, self._source.shape):
                raise InputError(fov_error(mismatch("mask_img", affine, mask.shape, Grid(
                    self._source.affine, np.ones(self._source.shape, dtype=bool))) + " With "
                    "resampling_target=None the mask and the maps must be on one grid."))

    def _check_params(self):
        if self.resampling_target not in RESAMPLING_TARGETS:
            raise InputError(f"'resampling_target' must be one of {RESAMPLING_TARGETS}; "
                             f"received {self.resampling_target!r}.")
        if self.resampling_target == "mask" and self.mask_img is None:
            raise InputError("resampling_target has been set to 'mask' but no mask has been provided.\n"
                             "Set resampling_target to something else or provide a mask.")
        if self.standardize not in STANDARDIZE:
            raise InputError(f"standardize must be one of {STANDARDIZE}; received {self.standardize!r}.")
        check_not_bool_dtype(self.dtype)

    def _check_fitted(self):
        check_is_fitted(self)  # scikit-learn's NotFittedError, nilearn's message

    # -- grids ---------------------------------------------------------------------------

    def _target_grid_without_data(self):
        """The grid of resampling_target "mask" or "maps" (all voxels stored)."""
        if self.resampling_target == "mask":
            affine, mask = self._mask
            return Grid(affine, np.ones(mask.shape, dtype=bool))
        return Grid(self._source.affine, np.ones(self._source.shape, dtype=bool))

    def _mask_on(self, grid):
        """nilearn's ``mask_img_`` on ``grid`` (nearest-neighbour resampling), or None."""
        if self._mask is None:
            return None
        affine, mask = self._mask
        if same_grid(affine, mask.shape, grid.affine, grid.shape):
            return mask
        if self.resampling_target is None:
            raise InputError(fov_error(mismatch("mask_img", affine, mask.shape, grid)))
        img = resample_img(nib.Nifti1Image(mask.astype(np.int8), affine), interpolation="nearest",
                           target_shape=grid.shape, target_affine=grid.affine, copy=True,
                           force_resample=True, copy_header=True)
        resampled = np.asarray(img.dataobj) != 0
        if not resampled.any():
            raise InputError("mask_img has no voxel left after resampling onto the data grid.")
        return resampled

    def _maps_on(self, grid, voxel_chunk=None):
        """The prepared maps for a grid (cached per grid)."""
        key = grid.grid_id
        if key not in self._prepared:
            where = None if self.maps_store is None else f"{str(self.maps_store).rstrip('/')}/{key}"
            prepared = prepare_maps(self._source, grid, self._mask_on(grid), voxel_chunk,
                                    resample=self.resampling_target is not None,
                                    maps_store=where, keep_empty=self.keep_masked_maps,
                                    check_overlap=not self.allow_overlap, budget=self.chunk_bytes)
            self._prepared[key] = prepared
            self.region_indices_ = prepared.kept
            self.dropped_regions_ = prepared.dropped
        return self._prepared[key]

    # -- inputs ------------------------------------------------------------------------

    def _as_nodes(self, items):
        if all(isinstance(item, Node) for item in items):
            for node in items:
                self._check_store_run(node)
        return self._convert_images(items)

    def _check_store_run(self, node):
        if node.kind != "runs":
            raise InputError(f"imgs must be runs of a cohort store; received the {node.kind} node {node.name}.")
        done = node_meta(node.cohort.root[node.path]).get("preprocessing", SpatialPreprocessing().to_attrs())
        if done.get("smoothing_fwhm") != self.smoothing_fwhm:
            raise InputError(
                f"{node.name} was converted with smoothing_fwhm={done.get('smoothing_fwhm')}, but this "
                f"masker asks for smoothing_fwhm={self.smoothing_fwhm}. nilearn smooths the data before "
                "extraction: convert the runs with chunkglm.convert(..., smoothing_fwhm=...) or pass "
                "the NIfTI files.")

    def _convert_images(self, images):
        staged = stage_inputs(images, "runs", owner=self, argument="imgs", smoothing_fwhm=self.smoothing_fwhm,
                              target_affine=lambda infos: self._conversion_target(infos[0]),
                              mask_img=lambda infos: self._conversion_mask_img(infos[0]),
                              chunk_bytes=MemoryBudget.of(self.chunk_bytes).chunk_bytes)
        if not staged.converted:
            return staged.nodes
        nodes = staged.nodes
        self._input_entities = [input_entities(item) for item in images]
        self._input_dtypes.update({node_key(node): nilearn_data_dtype(image, info)
                                   for node, image, info in zip(nodes, images, staged.infos)})
        if self.high_variance_confounds and (self._conversion_target(staged.infos[0]) is not None
                                             or self.smoothing_fwhm is not None):
            # nilearn takes them from the input images as given (not resampled, not smoothed)
            raw = staged.convert_again("raw.zarr")
            self._hv_sources.update({node_key(node): run for node, run in zip(nodes, raw)})
        return nodes

    def _conversion_mask_img(self, info):
        """The mask of the temporary store (on the conversion's target grid), or None."""
        target = self._conversion_target(info)
        mask = self._conversion_mask(target, info)
        if mask is None:
            return None
        return nib.Nifti1Image(mask.astype(np.uint8), target[0] if target else info.affine)

    def _conversion_target(self, info):
        """(affine, shape) the data are resampled onto (continuous), or None."""
        if self.resampling_target == "mask":
            affine, mask = self._mask
            grid = (affine, mask.shape)
        elif self.resampling_target == "maps":
            grid = (self._source.affine, self._source.shape)
        else:
            return None
        return None if same_grid(grid[0], grid[1], info.affine, info.volume_shape) else grid

    def _conversion_mask(self, target, info):
        """The voxels the temporary store holds: every voxel, or mask_img's (on the data grid)."""
        if self._mask is None or self.high_variance_confounds:
            return None  # nilearn's high-variance confounds use every voxel of the image
        affine, shape = target if target is not None else (info.affine, info.volume_shape)
        return self._mask_on(Grid(np.asarray(affine), np.ones(shape, dtype=bool)))

    def _grid_of(self, nodes):
        grids = {node.attrs["grid_id"] for node in nodes}
        if len(grids) > 1:
            raise InputError(f"the runs of one masker must share a grid; received grids {sorted(grids)}. "
                             "Use one masker per grid, or convert with one target_affine.")
        grid = nodes[0].grid
        if self.resampling_target in ("mask", "maps", None):
            self._check_data_grid(grid)
        return grid

    def _check_data_grid(self, grid):
        if self.resampling_target == "mask":
            affine, mask = self._mask
            if not same_grid(affine, mask.shape, grid.affine, grid.shape):
                raise InputError(mismatch("the store runs (resampling_target='mask': mask_img)",
                                           affine, mask.shape, grid) + " Convert the runs with "
                                 "target_affine/target_shape of mask_img, or pass NIfTI files.")
        elif self.resampling_target == "maps":
            if not same_grid(self._source.affine, self._source.shape, grid.affine, grid.shape):
                raise InputError(mismatch("the store runs (resampling_target='maps': maps_img)",
                                           self._source.affine, self._source.shape, grid)
                                 + " Convert the runs with the maps' target_affine/target_shape.")
        elif not same_grid(self._source.affine, self._source.shape, grid.affine, grid.shape):
            raise InputError(fov_error(
                f"maps_img has shape {self._source.shape} and affine\n{self._source.affine}\nbut the data "
                f"have shape {tuple(grid.shape)} and affine\n{grid.affine}\nWith resampling_target=None "
                "they must match: resample the maps (nilearn.image.resample_to_img) or set "
                "resampling_target='data'."))

    # -- transform ------------------------------------------------------------------------

    def transform(self, imgs, confounds=None, sample_mask=None):
        """Region signals: one (time, region) array per run (one array for one run).

        Parameters
        ----------
        imgs : store run(s), NIfTI path(s) or image(s)
            A 3-D image is one volume: its signals are returned 1-D.
        confounds : array, DataFrame, path, or a list with one per run, optional
        sample_mask : array or list of arrays, optional
            Volumes to keep per run (nilearn's censoring).

        Returns
        -------
        ndarray (time, region), or a list of them for a list of runs
        """
        self._check_fitted()
        if not self._multi:
            imgs = single_run(imgs)
        if isinstance(imgs, list | tuple):
            return self.transform_imgs(imgs, confounds, sample_mask=sample_mask)
        confounds = confounds[0] if isinstance(confounds, list) and self._multi else confounds
        sample_mask = one_run_sample_mask(sample_mask) if self._multi else sample_mask
        items, flat = self._as_4d([imgs])
        return self._flatten(self._extract(items, [confounds], [sample_mask]), flat)[0]

    def transform_single_imgs(self, imgs, confounds=None, sample_mask=None):
        """Region signals of one run (nilearn's ``transform_single_imgs``).

        Parameters
        ----------
        imgs : store run, NIfTI path or image (3-D or 4-D)
        confounds : array, DataFrame, path or list of them, optional
            Confounds of this run (a list: several sets, concatenated).
        sample_mask : array, optional
            Volumes to keep (nilearn's censoring).

        Returns
        -------
        ndarray (time, region); 1-D for a 3-D image
        """
        self._check_fitted()
        imgs = single_run(imgs)
        items, flat = self._as_4d([imgs])
        return self._flatten(self._extract(items, [confounds], [sample_mask]), flat)[0]

    def transform_imgs(self, imgs_list, confounds=None, n_jobs=1, sample_mask=None):
        """Region signals of a list of runs (nilearn's ``transform_imgs``).

        ``n_jobs`` is accepted for nilearn compatibility: all runs are one dask graph.
        """
        del n_jobs
        self._check_fitted()
        n = len(imgs_list)
        items, flat = self._as_4d(list(imgs_list))
        return self._flatten(self._extract(items, per_run(confounds, n, "confounds"),
                                           per_run(sample_mask, n, "sample_mask")), flat)

    def fit_transform(self, imgs, y=None, confounds=None, sample_mask=None):
        """``fit(imgs).transform(imgs, ...)``, converting NIfTI inputs once.

        Parameters
        ----------
        imgs : store run(s), NIfTI path(s) or image(s)
        y : None
            Ignored.
        confounds, sample_mask
            As :meth:`transform`.
        """
        del y
        runs = self._fit_inputs(imgs)
        if not runs or not isinstance(runs[0], Node):
            return self.transform(imgs, confounds, sample_mask)
        single = not isinstance(imgs, list | tuple)
        _, flat = self._as_4d(as_list(imgs))
        if single:
            confounds = confounds[0] if isinstance(confounds, list) and self._multi else confounds
            sample_mask = one_run_sample_mask(sample_mask) if self._multi else sample_mask
            return self._flatten(self._extract(runs, [confounds], [sample_mask]), flat)[0]
        n = len(runs)
        return self._flatten(self._extract(runs, per_run(confounds, n, "confounds"),
                                           per_run(sample_mask, n, "sample_mask")), flat)

    def _as_4d(self, items):
        """``items`` with 3-D images as 4-D ones of one volume, and which ones were 3-D."""
        out, flat = [], []
        for item in items:
            check_input_type(item)
            image = None
            if isinstance(item, nib.spatialimages.SpatialImage) and len(item.shape) == 3:
                image = item
            elif isinstance(item, str | Path) and Path(item).is_file() and len(read_info(str(item)).shape) == 3:
                image = nib.load(str(item))
            flat.append(image is not None)
            if isinstance(item, nib.spatialimages.SpatialImage):
                warn_non_finite(item)
            out.append(item if image is None else
                       nib.Nifti1Image(np.asanyarray(image.dataobj)[..., None], image.affine))
        return out, flat

    def _flatten(self, signals, flat):
        """nilearn's signals of 3-D images (unless ``set_output`` asks for a container): 1-D, one
        value per map, and 0-D for a single map (nilearn squeezes the volume and the map axes)."""
        if getattr(self, "_sklearn_output_config", None) is not None:
            return signals
        return [np.squeeze(s[0]) if one else s for s, one in zip(signals, flat)]

    def transform_to_xarray(self, imgs, confounds=None, sample_mask=None):
        """Region signals as a DataArray (run, time, region) with BIDS entities as coordinates.

        Coordinates: ``run`` (store node names), ``time`` (volume index),
        ``region`` (map index in maps_img); along ``run``: ``sub``, ``ses``,
        ``task``, ``run_label`` (the BIDS run entity), ..., ``repetition_time``
        and ``n_scans`` (volumes after censoring).

        Runs shorter than the longest (or censored by sample_mask) are padded
        with NaN at the end of the time axis.
        """
        items = as_list(imgs)
        nodes = self._nodes_of(items)
        n = len(nodes)
        signals = self._extract(nodes, per_run(confounds, n, "confounds"), per_run(sample_mask, n, "sample_mask"))
        return to_xarray(signals, nodes, self.region_indices_)

    def _nodes_of(self, items):
        return items if all(isinstance(i, Node) for i in items) else self._as_nodes(items)

    def _file_runs(self, items):
        """NIfTI files to read volume by volume as they are, or None when they need a store.

        Runs need converting into a (temporary) store when they are resampled
        or smoothed, for high-variance confounds (two passes over voxels), for
        maps kept in a zarr array, or when they are not all files on one grid.
        """
        if (self.high_variance_confounds or self.smoothing_fwhm is not None or self.maps_store is not None
                or not items or not all(isinstance(i, str | Path) and Path(i).is_file() for i in items)):
            return None
        infos = [read_info(str(item)) for item in items]
        first = infos[0]
        if any(len(info.shape) != 4 or not same_grid(info.affine, info.volume_shape, first.affine,
                                                      first.volume_shape) for info in infos):
            return None  # the store path gives the errors
        if self._conversion_target(first) is not None:
            return None
        mask = self._conversion_mask(None, first)
        grid = Grid(np.asarray(first.affine, dtype=float),
                    np.ones(first.volume_shape, dtype=bool) if mask is None else mask)
        if self.resampling_target in ("mask", "maps", None):
            self._check_data_grid(grid)
        if self._maps_on(grid).sparse is None:  # zarr-backed: prepared again in the store's blocks
            self._prepared.pop(grid.grid_id)
            return None
        return [FileRun(str(item), info, grid) for item, info in zip(items, infos)]

    def _extract_files(self, files, confounds, sample_masks):
        """Region signals of NIfTI runs, each streamed volume by volume in one task."""
        grid = files[0].grid
        maps = self._maps_on(grid)
        self._check_overlap(maps)
        self._warn_dropped(maps)
        for index, (run, conf) in enumerate(zip(files, confounds)):
            check_confounds(conf, run.info.n_volumes, index)
        covered = np.flatnonzero(np.diff(maps.sparse.indptr))  # voxels of some map: the others add 0
        positions = np.ravel_multi_index(tuple(grid.ijk[covered].T), grid.shape, order="F")
        gram, projections = graph.volume_moments(maps.sparse[covered],
                                                 [NiftiVolumeReader(run.path, positions) for run in files])
        dtypes = [self._output_dtype(maps.dtype, nilearn_data_dtype(run.path, run.info)) for run in files]
        t_rs = [self.t_r if self.t_r is not None else file_t_r(run.info) for run in files]
        return self._clean_all(gram, projections, [None] * len(files), dtypes, t_rs, confounds, sample_masks)

    def _clean_all(self, gram, projections, hvs, dtypes, t_rs, confounds, sample_masks):
        """Solve and clean every run's signals (one dask computation)."""
        log(self, "extracting")
        log(self, "cleaning")
        if self.keep_masked_maps:
            warnings.warn('Applying "mask_img" before signal extraction may result in empty region '
                          'signals in the output. These are currently kept.\n"keep_masked_maps" parameter '
                          'will be removed in version 0.15. Set "keep_masked_maps=False" to silence this '
                          "warning.", FutureWarning, stacklevel=4)
        return graph.cleaned_signals(self._cleaning(), gram, projections, hvs, dtypes, t_rs, confounds,
                                     sample_masks)

    def _extract(self, items, confounds, sample_masks):
        self._warn_resampling_at_transform(items)
        files = self._file_runs(items)
        if files is not None:
            return self._extract_files(files, confounds, sample_masks)
        nodes = self._nodes_of(items)
        grid = self._grid_of(nodes)
        datas = [node.data().data for node in nodes]
        maps = self._maps_on(grid, voxel_chunk=datas[0].chunks[1][0])
        self._check_overlap(maps)
        self._warn_dropped(maps)
        self._warn_outside(maps)
        for index, (node, conf) in enumerate(zip(nodes, confounds)):
            check_confounds(conf, int(node.data().shape[0]), index)
        projections = batched_moments(maps, [run_reader(node, data) for node, data in zip(nodes, datas)],
                                      self.chunk_bytes)
        gram = projections.pop()
        n_outside = int(np.prod(grid.shape)) - grid.n_voxels
        hvs = [self._hv_confounds(node, data, n_outside) if self.high_variance_confounds else None
               for node, data in zip(nodes, datas)]
        dtypes = [self._output_dtype(maps.dtype, self._input_dtypes.get(node_key(node), np.float32))
                  for node in nodes]
        return self._clean_all(gram, projections, hvs, dtypes, [self._t_r(node) for node in nodes], confounds,
                               sample_masks)

    def _warn_resampling_at_transform(self, items):
        """nilearn's warnings when ``transform`` gets runs on another grid than the fitted one.

        resampling_target "data": the maps (``maps_img_``) and the mask (``mask_img_``) are
        resampled onto these runs for this call (the fitted masker is left unchanged);
        "maps": the runs are resampled onto the maps. Once per call, not per run.
        """
        if self.resampling_target not in ("data", "maps"):
            return
        grids = [input_grid(item) for item in items]
        grids = [g for g in grids if g is not None]
        if self.resampling_target == "maps":
            affine, shape = self._source.affine, self._source.shape
            if any(not same_grid(a, s, affine, shape) for a, s in grids):
                warnings.warn("Resampling images at transform time...\nTo avoid this warning, make sure to "
                              "resample the images you want to transform to the shape of the maps or set "
                              "resampling_target to 'data'.", UserWarning, stacklevel=4)
            return
        if any(not same_grid(a, s, self.maps_img_.affine, self.maps_img_.shape[:3]) for a, s in grids):
            warnings.warn("Resampling maps at transform time...\nTo avoid this warning, make sure to pass "
                          "the images you want to transform to fit() first, or directly use fit_transform().",
                          UserWarning, stacklevel=4)
        mask = self.mask_img_
        if mask is not None and any(not same_grid(a, s, mask.affine, mask.shape[:3]) for a, s in grids):
            warnings.warn("Resampling mask at transform time...\nTo avoid this warning, make sure to pass "
                          "the images you want to transform to fit() first, or directly use fit_transform().",
                          UserWarning, stacklevel=4)

    def _hv_confounds(self, node, data, n_outside):
        """Lazy high-variance confounds of a run, from its unprocessed data when there is one."""
        source = self._hv_sources.get(node_key(node))
        if source is not None:
            data = source.data().data
            n_outside = int(np.prod(source.grid.shape)) - source.grid.n_voxels
            node = source
        return graph.high_variance_confounds(data, n_outside, reread=reread(node, data))

    def _output_dtype(self, maps_dtype, data_dtype):
        """nilearn's output dtype: its solve's (maps x data) type, or the ``dtype`` asked for."""
        if self.dtype is not None:
            target = get_target_dtype(np.dtype(data_dtype), self.dtype)
            return np.dtype(data_dtype) if target is None else np.dtype(target)
        dtype = np.result_type(maps_dtype, data_dtype)
        return dtype if dtype.kind == "f" else np.dtype(np.float64)

    def _t_r(self, node):
        return self.t_r if self.t_r is not None else node.attrs.get("RepetitionTime")

    def _cleaning(self) -> CleanSpec:
        filtering = self.low_pass is not None or self.high_pass is not None
        return CleanSpec(self.detrend, self.standardize, self.standardize_confounds, self.low_pass,
                         self.high_pass, filtering or self.t_r is not None, dict(self.clean_args_),
                         hv_first=not self._multi)

    def _check_overlap(self, maps):
        if not self.allow_overlap and maps.overlap:
            raise InputError("Overlap detected in the maps. The overlap may be due to the atlas itself "
                             "or possibly introduced by resampling.")

    def _warn_dropped(self, maps):
        if maps.dropped:
            warnings.warn(
                "After applying mask to the maps image, maps with the following indices were "
                f"removed: {set(maps.dropped)}. Out of {maps.n_maps} maps, the masked map image "
                f"only contains {len(maps.kept)} maps.", UserWarning, stacklevel=3)

    def _warn_outside(self, maps):
        if maps.n_outside_maps:
            warnings.warn(
                f"{maps.n_outside_maps} map(s) have weight at voxels the store does not hold (outside "
                "its mask); these voxels are left out of the extraction, as if mask_img excluded them. "
                "Convert without a mask (or pass the NIfTI files) to include them.", UserWarning, stacklevel=3)

    # -- inverse ---------------------------------------------------------------------------

    def inverse_transform(self, region_signals):
        """Voxel signals from region signals: nilearn's ``signals_to_img_maps``.

        Parameters
        ----------
        region_signals : ndarray or DataFrame (time, n_elements_) or (time, n_kept), or 1-D
            One column per map (nilearn) or per kept map.

        Returns
        -------
        nibabel.Nifti1Image
            4-D (3-D for 1-D input) on the fitted grid (the maps' grid when
            ``fit`` had no images).
        """
        self._check_fitted()
        log(self, "inverse_transform")
        grid = self._fit_grid if self._fit_grid is not None else self._maps_grid()
        maps = self._maps_on(grid)
        if hasattr(region_signals, "to_numpy"):  # pandas / polars DataFrame
            region_signals = region_signals.to_numpy().squeeze()
        signals = np.asarray(region_signals)
        flat = signals.ndim == 1
        signals = np.atleast_2d(signals)
        if signals.ndim != 2 or signals.shape[1] not in (maps.n_maps, len(maps.kept)):
            expected = (maps.n_maps,) if flat else (signals.shape[0], maps.n_maps)
            raise InputError(f"Input to 'inverse_transform' has wrong shape.\nExpected {expected}.\n"
                             f"Got {np.shape(region_signals)}. Give one column per map "
                             f"({len(maps.kept)} kept of {maps.n_maps}).")
        if signals.shape[1] == maps.n_maps:
            signals = signals[:, maps.kept]
        if signals.dtype == bool:
            target = self.dtype if self.dtype is not None else np.int32
            warnings.warn(f"Casting boolean input to {target}", UserWarning, stacklevel=2)
            signals = signals.astype(target)
        out_dtype = get_target_dtype(signals.dtype, self.dtype)
        out_dtype = signals.dtype if out_dtype is None else np.dtype(out_dtype)
        signals = signals.astype(np.result_type(signals.dtype, maps.dtype), copy=False)
        if maps.sparse is not None:  # in memory: (voxel, region) @ (region, time)
            voxels = np.asarray(maps.sparse.astype(signals.dtype) @ signals.T).T
        else:
            voxels = graph.voxel_signals(signals, maps.array("maps-inverse"))
        data = np.zeros((*grid.shape, signals.shape[0]), dtype=out_dtype)
        ijk = grid.ijk
        data[ijk[:, 0], ijk[:, 1], ijk[:, 2], :] = voxels.T
        # nilearn's header keeps the dtype asked for; its array of int64 becomes int32 (nibabel's rule)
        image = nib.Nifti1Image(downcast_int64(data[..., 0] if flat else data), grid.affine)
        image.set_data_dtype(out_dtype)
        return image

    def _maps_grid(self):
        """The maps' own grid (restricted to mask_img when it is on that grid)."""
        mask = np.ones(self._source.shape, dtype=bool)
        if self._mask is not None and same_grid(self._mask[0], self._mask[1].shape, self._source.affine,
                                                self._source.shape):
            mask = self._mask[1]
        return Grid(self._source.affine, mask)


class MultiNiftiMapsMasker(NiftiMapsMasker):
    __doc__ = multi_doc(NiftiMapsMasker.__doc__)

    _multi = True

    def __init__(self, maps_img=None, mask_img=None, allow_overlap=True, smoothing_fwhm=None,
                 standardize=False, standardize_confounds=True, high_variance_confounds=False,
                 detrend=False, low_pass=None, high_pass=None, t_r=None, dtype=None,
                 resampling_target="data", keep_masked_maps=False, memory=None, memory_level=0,
                 verbose=0, reports=True, cmap="CMRmap_r", n_jobs=1, clean_args=None, maps_store=None,
                 chunk_bytes=None):
        self.n_jobs = n_jobs
        super().__init__(maps_img, mask_img, allow_overlap, smoothing_fwhm, standardize,
                         standardize_confounds, high_variance_confounds, detrend, low_pass, high_pass,
                         t_r, dtype, resampling_target, keep_masked_maps, memory, memory_level, verbose,
                         reports, cmap, clean_args, maps_store, chunk_bytes)


#: The short names of chunkglm's first releases.
MapsMasker = NiftiMapsMasker
MultiMapsMasker = MultiNiftiMapsMasker
