"""non_parametric_inference: nilearn's function, max-T over the voxel blocks of a maps node.

The inputs are handled as :class:`~chunkglm.glm.second_level.model.SecondLevelModel`
handles them (nilearn's input forms, default mask, resampling onto the mask,
smoothing), so the maps are loaded once into a ``maps/`` node. The tested
variable and the confounds are built from the design and the contrast as in
nilearn 0.14 (``tested_var = design @ contrast``, the columns the contrast
does not touch are confounds), and the permutation test is the engine of
:mod:`chunkglm.graph.permutation` (nilearn's sign-flips or permutations,
one GEMM per batch of permutations per voxel block; each block read once).

With ``threshold`` (cluster size and mass) or ``tfce``, whole volumes are
needed per permutation: :func:`chunkglm.graph.permutation_volumes.volume_null`
residualises the data once, scatters it to the workers and distributes the
permutation batches; max-T comes from the same permutations.
"""

from __future__ import annotations

import warnings

import joblib
import numpy as np
from nilearn.exceptions import NotImplementedWarning
from nilearn.maskers import NiftiMasker, SurfaceMasker
from nilearn.surface import SurfaceImage
from sklearn.base import clone

from chunkglm.chunking import DEFAULT_CHUNK_BYTES
from chunkglm.design.second_level import check_confounds_table, check_design
from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.second_level import cifti, inputs
from chunkglm.glm.second_level import surface as surf
from chunkglm.glm.second_level.model import SecondLevelModel, parse_contrast
from chunkglm.graph.finite import finite_array
from chunkglm.io.surface_maps import is_cifti_image
from chunkglm.graph.permutation import max_t_blocks
from chunkglm.graph.permutation_volumes import volume_null
from chunkglm.kernels.finite import _stack_level, warn
from chunkglm.kernels.permutation import check_n_perm, fwe_logp

__all__ = ["check_permutation_options", "contrast_vector", "non_parametric_inference", "permutation_maps",
           "tested_and_confounding_vars"]


def non_parametric_inference(second_level_input, confounds=None, design_matrix=None,
                             second_level_contrast=None, first_level_contrast=None, mask=None,
                             smoothing_fwhm=None, model_intercept=True, n_perm=10000,
                             two_sided_test=False, random_state=None, n_jobs=1, verbose=0,
                             threshold=None, tfce=False, permutations=None, store=None,
                             chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Max-T permutation inference on a second-level contrast, as nilearn's.

    Parameters
    ----------
    second_level_input : list of 3-D images, 4-D image, DataFrame, list of FirstLevelModel, maps node, SurfaceImage or CIFTI maps
        As :meth:`chunkglm.glm.second_level.SecondLevelModel.fit` (surface maps
        included: the -log10 p map is then a SurfaceImage; CIFTI dense scalar
        maps: a dense scalar Cifti2Image on their brain-model axis, the max-T
        null over every analysed grayordinate).
    confounds : pandas.DataFrame, optional
        Checked (``subject_label`` plus covariates) but not used, as in
        nilearn: covariates enter through ``design_matrix``.
    design_matrix : pandas.DataFrame or path
        Required (as in nilearn, with its errors): one row per modelled map,
        in the maps' order (build one with ``make_second_level_design_matrix``).
        A design that leaves no residual degrees of freedom gives nilearn's
        t-scores of 0 and p-values of 1, with a warning.
    second_level_contrast : str or array of shape (n_columns,), optional
        One t contrast: weights on the design's columns or a formula over
        their names. Default ``[1]`` for a one-column design. The tested
        variable is ``design_matrix @ contrast``; the columns with weight 0
        are the confounding variables.
    first_level_contrast : str, optional
        DataFrame input: the ``map_name`` to model. First-level models: the
        contrast whose effect maps are modelled (required).
    mask : str, nibabel image or nilearn NiftiMasker, optional
        The analysis mask; maps on another grid are resampled onto it.
        Default: nilearn's background mask of the mean map (of the first map
        for a DataFrame). A ``NiftiMasker`` (fitted or not) is used as
        nilearn uses it (see :func:`masker_settings`): its ``mask_img``
        (resampled onto its ``target_affine``/``target_shape``), or without
        one nilearn's background mask of the maps; its ``smoothing_fwhm``.
        Surface maps: a SurfaceImage or a SurfaceMasker (cloned and refitted,
        as nilearn; see :func:`surface_masker_settings`); default the
        vertices finite in every map. CIFTI maps: a dense scalar mask of one
        map on their brain-model axis; default the grayordinates finite in
        every map (:mod:`chunkglm.glm.second_level.cifti`).
    smoothing_fwhm : float, optional
        Gaussian smoothing (mm) of each map when it is loaded. With a
        ``NiftiMasker`` as ``mask``: it overrides the masker's own smoothing
        (nilearn's warning), and is not used when the masker has none (as in
        nilearn; a warning says so).
    model_intercept : bool, default=True
        As nilearn: add a constant confound (unless the test is an intercept test).
    n_perm : int, default=10000
        Number of permutations (>= 1); ignored when ``permutations`` is given.
    two_sided_test : bool, default=False
        Test |t| (max of |t| over voxels per permutation).
    random_state : None, int or numpy.random.RandomState
        As nilearn: the same value with the same ``n_jobs`` draws nilearn's
        exact sign-flips or permutations.
    n_jobs : int, default=1
        Used only to reproduce nilearn's random stream, which depends on its
        number of jobs (capped to the CPU count, negative values count back
        from it, as nilearn). The dask scheduler runs the work.
    verbose : int, default=0
        Not used: nilearn prints its progress messages with it; chunkglm's
        progress is the dask scheduler's (its dashboard). Accepted so that
        nilearn's calls run unchanged.
    threshold : float in (0, 1), optional
        Uncorrected p-value forming clusters (nilearn's): adds cluster size
        and cluster mass maps and their -log10 FWE p-values. Surface maps:
        not used, as in nilearn 0.14.1 (its NotImplementedWarning; only the
        max-T map is returned); CIFTI maps likewise (no cluster inference
        over grayordinates, the same warning).
    tfce : bool, default=False
        Adds the TFCE map and its -log10 FWE p-values. Surface maps: as
        ``threshold``, not used (nilearn's warning).
    permutations : array-like of shape (n_perm, n_maps), optional
        chunkglm only: explicit permutations, for exact comparisons. +1/-1
        sign-flips when the tested variable is a constant column without
        confounds left after nilearn's design handling (one-sample tests),
        sample orders otherwise (see
        :func:`chunkglm.graph.permutation.max_t_null`). Overrides ``n_perm``
        and ``random_state``.
    store : str or Path, optional
        chunkglm only: a cohort store in which image inputs are loaded.
        Default: a temporary store, removed afterwards.
    chunk_bytes : int or str
        chunkglm only: the memory budget, as :class:`SecondLevelModel`'s (64 MiB).

    Returns
    -------
    nibabel.Nifti1Image or dict of them
        With ``threshold=None`` and ``tfce=False``: the 3-D float32 map of
        -log10 family-wise-error corrected p-values (max-T), on the mask's
        grid, 0 outside it (as nilearn). Otherwise nilearn's dict: ``t``,
        ``logp_max_t``, plus ``tfce``, ``logp_max_tfce`` (``tfce``) and
        ``size``, ``logp_max_size``, ``mass``, ``logp_max_mass`` (``threshold``).
    """
    check_permutation_options(threshold, tfce, n_perm, permutations, mask)
    n_jobs = nilearn_n_jobs(n_jobs)
    kind = inputs.input_kind(second_level_input)
    images = _checked_images(second_level_input) if kind == "images" else None
    if kind == "surface":
        surf.check_surface_images(second_level_input, design_matrix is None)
        images = surf.effect_maps(second_level_input)
    if kind == "cifti":
        images = cifti.map_list(second_level_input)
    design = _required_design(design_matrix, kind)
    if confounds is not None:
        check_confounds_table(confounds)
    if isinstance(mask, NiftiMasker):  # nilearn sets its masker up before reading the contrast
        mask, target_affine, target_shape, smoothing_fwhm = masker_settings(mask, smoothing_fwhm)
    elif isinstance(mask, SurfaceMasker):
        mask, smoothing_fwhm = surface_masker_settings(mask, smoothing_fwhm)
        target_affine = target_shape = None
    else:
        target_affine = target_shape = None
    con_val = contrast_vector(second_level_contrast, design)
    if kind == "flm" and first_level_contrast is None:
        raise InputError("second_level_input is a list of FirstLevelModels: first_level_contrast is "
                         "required (the contrast whose effect maps are modelled).")
    _check_n_maps(kind, second_level_input, first_level_contrast, design, images)
    if (threshold is not None or tfce) and (surf.is_surface_input(second_level_input, mask)
                                            or cifti.is_cifti_input(second_level_input)):
        tfce, threshold = False, None  # nilearn 0.14.1 drops cluster inference on surfaces, with this warning
        warnings.warn("Cluster level inference not yet implemented for surface data.\n"
                      f"Setting {tfce=} and {threshold=}. (chunkglm does as nilearn: only the max-T map is "
                      "returned.)", NotImplementedWarning, stacklevel=_stack_level())
    model = SecondLevelModel(mask_img=mask, target_affine=target_affine, target_shape=target_shape,
                             smoothing_fwhm=smoothing_fwhm, store=store, chunk_bytes=chunk_bytes)
    model.fit(second_level_input, confounds=confounds, design_matrix=design)
    images = permutation_maps(model, con_val, first_level_contrast, model_intercept=model_intercept,
                              n_perm=n_perm, two_sided_test=two_sided_test,
                              random_state=random_state, permutations=permutations, n_jobs=n_jobs,
                              threshold=threshold, tfce=tfce, dtype=np.float64)
    return images["logp_max_t"] if threshold is None and not tfce else images


def permutation_maps(model, con_val, first_level_contrast=None, *, model_intercept=True,
                     n_perm=10000, two_sided_test=False, random_state=None, permutations=None,
                     n_jobs=1, threshold=None, tfce=False, progress=None, dtype=np.float32) -> dict:
    """nilearn's permutation maps of one t contrast of a fitted SecondLevelModel.

    The model's maps node and mask are used as they are (nothing is reloaded).

    Parameters
    ----------
    model : chunkglm.glm.second_level.SecondLevelModel
        Fitted.
    con_val : ndarray of shape (n_columns,)
        From :func:`contrast_vector`.
    progress : callable, optional
        ``progress(done, total)`` after each voxel block (max-T) or
        permutation batch (clusters, TFCE).
    dtype : numpy dtype, default float32
        Of the images (the derivatives' float32); :func:`non_parametric_inference`
        returns float64 images, as nilearn's (a float32 -log10 p of the top rank
        rounds above nilearn's float64 bound -log10(1 / (n_perm + 1))).
    Other parameters are :func:`non_parametric_inference`'s (already checked).

    Returns
    -------
    dict of nibabel.Nifti1Image
        ``t``, ``logp_max_t``, and nilearn's size/mass (``threshold``) and
        tfce (``tfce``) maps.
    """
    maps = model._maps_for(first_level_contrast)
    tested, confounding = tested_and_confounding_vars(model.design_matrix_, con_val)
    if threshold is None and not tfce:
        t, logp = _max_t_logp(maps, tested, confounding, model_intercept, n_perm, two_sided_test,
                              random_state, permutations, n_jobs, progress, budget=model.chunk_bytes)
        outputs = {"t": t, "logp_max_t": logp}
    else:
        outputs = _volume_outputs(maps, tested, confounding, model_intercept, n_perm,
                                  two_sided_test, random_state, permutations, n_jobs, threshold,
                                  tfce, progress)
    return {name: model._to_image(maps, values, dtype) for name, values in outputs.items()}


# -- checks before any map is read ---------------------------------------------------------


def check_permutation_options(threshold=None, tfce=False, n_perm=10000, permutations=None, mask=None) -> None:
    """Check :func:`non_parametric_inference`'s permutation settings; InputError naming the fix.

    Call it before :func:`permutation_maps` (which takes its settings as checked).
    """
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold < 1):
        raise InputError(f"threshold is the uncorrected p-value that forms clusters, strictly between 0 "
                         f"and 1 (e.g. 0.001), or None; received {threshold!r}.")
    if not isinstance(tfce, (bool, np.bool_)):
        raise InputError(f"tfce must be True or False; received {tfce!r}.")
    if permutations is None:
        check_n_perm(n_perm)
    if mask is not None and not isinstance(mask, (str, NiftiMasker, SurfaceImage, SurfaceMasker)) \
            and not hasattr(mask, "affine") and not hasattr(mask, "__fspath__") and not is_cifti_image(mask):
        raise InputError(f"mask must be a 3-D image (path or nibabel image) or a NiftiMasker (surface maps: a "
                         f"SurfaceImage or SurfaceMasker; CIFTI maps: a dense scalar mask); received "
                         f"{type(mask).__name__}.")


#: NiftiMasker parameters that change the masked values, with the values that leave them as they are
_SIGNAL_PARAMETERS = {"standardize": (False, None), "detrend": (False,), "low_pass": (None,),
                      "high_pass": (None,), "high_variance_confounds": (False,), "clean_args": (None,),
                      "runs": (None,), "dtype": (None,)}


def masker_settings(masker, smoothing_fwhm):
    """What nilearn's ``non_parametric_inference`` takes from a NiftiMasker given as ``mask``.

    nilearn clones the masker (a fitted one is refitted), lets
    ``smoothing_fwhm`` override the masker's own smoothing (with its warning)
    when both are set, keeps the masker's when ``smoothing_fwhm`` is None, and
    ignores ``smoothing_fwhm`` when the masker has none (chunkglm warns that
    it is not used). The mask is the masker's ``mask_img`` (resampled onto its
    ``target_affine``/``target_shape``) or, without one, nilearn's background
    mask of the maps (the masker's default strategy).

    Parameters
    ----------
    masker : nilearn.maskers.NiftiMasker
    smoothing_fwhm : float or None

    Returns
    -------
    tuple
        (mask_img, target_affine, target_shape, smoothing_fwhm) for
        :class:`SecondLevelModel`.

    Raises
    ------
    InputError
        For masker settings chunkglm does not apply to second-level maps
        (signal cleaning: standardize, detrend, filters, ...; another mask
        strategy than 'background' without a mask image), rather than
        ignoring them.
    """
    masker = _with_smoothing(masker, smoothing_fwhm)
    changed = {name: getattr(masker, name) for name, neutral in _SIGNAL_PARAMETERS.items()
               if not any(getattr(masker, name) is value for value in neutral)}
    if changed:
        raise InputError(f"the NiftiMasker given as mask sets {changed}, which chunkglm does not apply to "
                         "second-level maps; give a masker with only a mask, resampling "
                         "(target_affine, target_shape) and smoothing_fwhm, or preprocess the maps first.")
    if masker.mask_img is None and (masker.mask_strategy != "background" or masker.mask_args):
        raise InputError(f"the NiftiMasker given as mask has no mask_img and mask_strategy="
                         f"{masker.mask_strategy!r}, mask_args={masker.mask_args!r}: chunkglm computes "
                         "nilearn's background mask only. Give the masker a mask_img (e.g. the "
                         "mask_img_ of a masker fitted on the maps).")
    return masker.mask_img, masker.target_affine, masker.target_shape, masker.smoothing_fwhm


def surface_masker_settings(masker, smoothing_fwhm):
    """What nilearn's ``non_parametric_inference`` takes from a SurfaceMasker given as ``mask``: a clone
    (refitted on the maps' sample map), its smoothing overridden by ``smoothing_fwhm`` when both are set
    (nilearn's warning); ``smoothing_fwhm`` is not used when the masker has none (a warning says so).

    Returns
    -------
    (masker, smoothing_fwhm) for :class:`~chunkglm.glm.second_level.SecondLevelModel`.
    """
    masker = _with_smoothing(masker, smoothing_fwhm)
    return masker, masker.smoothing_fwhm


def _with_smoothing(masker, smoothing_fwhm):
    """A clone of the masker given as ``mask``, its smoothing overridden by ``smoothing_fwhm`` when both
    are set (nilearn's warning); ``smoothing_fwhm`` is not used when the masker has none (a warning)."""
    masker = clone(masker)
    if smoothing_fwhm is not None:
        if masker.smoothing_fwhm is not None:
            warnings.warn("Parameter 'smoothing_fwhm' of the masker overridden.", UserWarning,
                          stacklevel=_stack_level())
            masker.smoothing_fwhm = smoothing_fwhm
        else:
            warnings.warn(f"smoothing_fwhm={smoothing_fwhm!r} is not used: the masker given as mask has "
                          "smoothing_fwhm=None, which nilearn's non_parametric_inference keeps (no "
                          "smoothing). Set the masker's smoothing_fwhm to smooth the maps.", UserWarning,
                          stacklevel=_stack_level())
    return masker


def _checked_images(second_level_input) -> list:
    """nilearn's checks of image inputs (files found, 3-D, one grid), before the design's."""
    images = inputs.image_list(second_level_input)
    inputs.check_images(images, resampling=False, remedy=(
        "non_parametric_inference does not resample the maps onto one another (as nilearn's): "
        "resample them onto one grid first (nilearn.image.resample_to_img)."))
    return images


def _required_design(design_matrix, kind):
    if design_matrix is None and kind in ("surface", "cifti"):
        raise InputTypeError("design_matrix can only be a pandas DataFrame, a Path object or a string, or "
                             "a numpy array. A <class 'NoneType'> was provided at idx 0. "
                             "non_parametric_inference needs a design matrix (one row per map), as "
                             "nilearn's.")
    if design_matrix is None and kind == "images":
        raise InputError("List of niimgs as 'second_level_input' require a design matrix to be provided. "
                         "Give one row per map, in the maps' order; build one with "
                         "make_second_level_design_matrix(subject_labels, confounds).")
    if design_matrix is None:
        raise InputTypeError("design_matrix can only be a pandas DataFrame, a Path object or a string, or "
                             "a numpy array. A <class 'NoneType'> was provided at idx 0. "
                             "non_parametric_inference needs a design matrix (one row per map), as "
                             "nilearn's; build one with make_second_level_design_matrix(subject_labels, "
                             "confounds).")
    return check_design(design_matrix, None, full_rank=True)


def contrast_vector(second_level_contrast, design) -> np.ndarray:
    """nilearn's ``_get_con_val`` for one t contrast, with InputErrors.

    Parameters
    ----------
    second_level_contrast : None, str or array-like of shape (n_columns,) or (1, n_columns)
    design : pandas.DataFrame of shape (n_maps, n_columns)

    Returns
    -------
    ndarray of shape (n_columns,), float64
    """
    columns = [str(c) for c in design.columns]
    if second_level_contrast is not None and not isinstance(second_level_contrast, str):
        weights = np.asarray(second_level_contrast)
        if weights.size == 0 or (np.issubdtype(weights.dtype, np.number) and not np.any(weights)):
            raise InputError(_NULL_CONTRAST.format(second_level_contrast))
    con = parse_contrast(second_level_contrast, columns)
    if con.ndim == 2 and con.shape[0] == 1:
        con = con[0]
    if con.ndim != 1:
        raise InputError(f"permutation inference tests one t contrast (one weight per design column); "
                         f"received an array of shape {con.shape}. F contrasts are not supported "
                         "(as in nilearn): test each row separately.")
    if con.size != len(columns):
        raise InputError(f"the contrast has {con.size} weights but the design has {len(columns)} "
                         f"columns {columns}: give one weight per column.")
    if not np.any(con):
        raise InputError(_NULL_CONTRAST.format(second_level_contrast))
    return con


#: nilearn's message for a null (or empty) contrast, then the remedy
_NULL_CONTRAST = ("Contrast is null. Second_level_contrast must be a valid contrast vector, a list/array "
                  "of 0s and 1s, a string, or a string expression. Received {!r}: give non-zero weights, "
                  "one per design column.")


def tested_and_confounding_vars(design, con_val):
    """nilearn's split: ``design @ contrast`` and the columns with weight 0.

    Returns
    -------
    tested : ndarray of shape (n_maps,)
    confounding : ndarray of shape (n_maps, n_confounds) or None
    """
    X = design.to_numpy(dtype=np.float64)
    untouched = con_val == 0
    return X @ con_val, (X[:, untouched] if untouched.any() else None)


def nilearn_n_jobs(n_jobs) -> int:
    """The number of jobs nilearn's ``permuted_ols`` draws its random stream with."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise InputError(f"n_jobs must be a non-zero integer (negative: all CPUs but |n_jobs| - 1); "
                         f"received {n_jobs!r}.")
    if n_jobs < 0:
        return max(1, joblib.cpu_count() - int(n_jobs) + 1)  # nilearn's formula, as written there
    return min(int(n_jobs), joblib.cpu_count())


def _check_n_maps(kind, second_level_input, first_level_contrast, design, images=None) -> None:
    """One design row per modelled map, checked before the maps are loaded."""
    if kind in ("images", "surface"):
        n_maps = len(images)
    elif kind == "cifti":
        n_maps = cifti.count_maps(images)
    elif kind == "dataframe":
        frame = inputs.dataframe_rows(second_level_input)
        n_maps = len(inputs.dataframe_maps(frame, first_level_contrast))
    elif kind == "maps":
        n_maps = int(second_level_input.data().shape[0])
    else:
        n_maps = len(second_level_input)
    if len(design) != n_maps:
        raise InputError(f"'design_matrix' does not match the number of maps considered. {len(design)} "
                         f"rows in design matrix do not match with {n_maps} maps: give one row per map, "
                         "in the maps' order.")


# -- the test ----------------------------------------------------------------------------------


def _max_t_logp(maps, tested, confounding, model_intercept, n_perm, two_sided_test, random_state,
                permutations, n_jobs, progress=None, budget=None) -> tuple[np.ndarray, np.ndarray]:
    """t and -log10 FWE p-values (n_voxels,); the maps are read once (NaN/inf set to 0 on the way,
    as nilearn's masker does, and counted for the warning in the same tasks).

    ``progress(done, total)`` is called as each voxel block is done.
    """
    t, null, nonfinite = max_t_blocks(_floating(maps.data()), tested, confounding, model_intercept,
                                      n_perm, two_sided_test, random_state, permutations, n_jobs,
                                      progress, budget)
    warn(nonfinite, "the second-level input maps")
    return t, fwe_logp(t, null, two_sided_test)


#: nilearn's keys, in its order, of what each option adds to the returned dict
_VOLUME_KEYS = {"threshold": ("size", "logp_max_size", "mass", "logp_max_mass"),
                "tfce": ("tfce", "logp_max_tfce")}


def _volume_outputs(maps, tested, confounding, model_intercept, n_perm, two_sided_test, random_state,
                    permutations, n_jobs, threshold, tfce, progress=None) -> dict:
    """nilearn's dict (t, logp_max_t, + size/mass with ``threshold``, + tfce with ``tfce``)
    as voxel vectors: whole volumes per permutation (:func:`volume_null`), the data read once."""
    grid = maps.grid
    ijk = np.asarray(maps.ijk)
    flat = np.ravel_multi_index(tuple(ijk.T), grid.shape)
    order = np.argsort(flat, kind="stable")  # volume_null wants the mask's voxels in C order
    mask = np.zeros(grid.shape, dtype=bool)
    mask[tuple(ijk.T)] = True
    data = maps.data()
    if not np.array_equal(order, np.arange(order.size)):
        data = data[:, order]
    data, counts = finite_array(_floating(data))  # nilearn's masker: NaN/inf -> 0
    result = volume_null(data, mask, tested, confounding, model_intercept=model_intercept, n_perm=n_perm,
                         two_sided_test=two_sided_test, random_state=random_state,
                         permutations=permutations, threshold=threshold, tfce=bool(tfce), n_jobs=n_jobs,
                         progress=progress, compute_with=counts)
    warn(sum(result["computed_with"]), "the second-level input maps")
    keys = ["t", "logp_max_t"]
    keys += list(_VOLUME_KEYS["tfce"]) if tfce else []
    keys += list(_VOLUME_KEYS["threshold"]) if threshold is not None else []
    restore = np.empty_like(order)
    restore[order] = np.arange(order.size)
    return {key: np.asarray(result[key], dtype=np.float64).ravel()[restore] for key in keys}


def _floating(data):
    """The (image, voxel) maps in a floating dtype (as the permutation engine reads them)."""
    return data if np.issubdtype(data.dtype, np.floating) else data.astype(np.float64)
