"""The maps maskers' docstring (nilearn's parameters and attributes, chunkglm's notes)."""

NIFTI_MAPS_MASKER_DOC = """Region signals of one run at a time from (overlapping) probabilistic maps.

    nilearn's ``NiftiMapsMasker`` (0.14), out of core: same parameters, same
    attributes, same numbers. ``transform`` of one 4-D run gives one (time,
    region) array (a 3-D image: one row, returned 1-D); a list of runs is
    refused as nilearn refuses it (use :class:`MultiNiftiMapsMasker`). With
    ``high_variance_confounds``, the confounds come first, as nilearn's.

    Parameters
    ----------
    maps_img : 4-D Niimg-like object (path or nibabel image)
        One probabilistic map per volume; a 3-D image is one map.
    mask_img : 3-D Niimg-like object, optional
        Voxels outside it are left out of the extraction.
    allow_overlap : bool, default=True
        If False, overlapping maps raise a ValueError.
    smoothing_fwhm : float, optional
        Smoothing (mm) of the data before extraction (applied when NIfTI runs
        are converted; store runs must have been converted with it).
    standardize : {'zscore_sample', 'zscore', 'psc', True, False, None}, default=False
        Standardization of the region signals (nilearn.signal.clean).
    standardize_confounds : bool, default=True
        Standardize the confounds before regressing them out.
    high_variance_confounds : bool, default=False
        Add nilearn's high-variance confounds of the data.
    detrend : bool, default=False
        Remove linear trends from the signals.
    low_pass : float, optional
        Low cutoff frequency (Hz).
    high_pass : float, optional
        High cutoff frequency (Hz).
    t_r : float, optional
        Repetition time (s); by default the runs' RepetitionTime when filtering.
    dtype : {dtype, "auto"}, optional
        Data type of the output signals.
    resampling_target : {"data", "mask", "maps", None}, default="data"
        The grid everything is resampled onto (None: all grids must match).
    keep_masked_maps : bool, default=False
        Keep maps that are empty inside the mask (their signals are zero), with
        nilearn's FutureWarning; by default they are dropped with a warning.
    memory : None, str or joblib.Memory, optional
        Accepted for nilearn compatibility and not used: chunkglm caches
        nothing on disk (dask schedules the work; ``maps_store`` keeps the
        prepared maps). ``memory_`` is a joblib Memory built from it, as nilearn's.
    memory_level : int, default=0
        Accepted for nilearn compatibility; not used (see ``memory``).
    verbose : int, default=0
        Accepted for nilearn compatibility; chunkglm logs nothing more with it.
    reports : bool, default=True
        If True, ``fit`` keeps what ``generate_report`` draws (the maps on the
        fitted grid, a middle volume of the images given to fit).
    cmap : str or matplotlib colormap, default="CMRmap_r"
        Colormap of the background images in the report.
    clean_args : dict, optional
        Further arguments of ``nilearn.signal.clean``.
    maps_store : str or Path, optional
        chunkglm only: a folder where the prepared maps are written, one zarr
        array per data grid (``<maps_store>/<grid-id>``), and NIfTI runs are
        then converted into a store. By default the maps stay in memory as a
        sparse matrix while their non-zero values take up to 256 MiB (four
        ``chunk_bytes``); larger ones go to a temporary folder, removed with the masker.
    chunk_bytes : int or str, optional
        chunkglm only: the memory budget (:class:`chunkglm.chunking.MemoryBudget`,
        default 64 MiB): the maps kept in memory (four times it), the maps
        resampled per step (twice it, float64) and the runs read together per
        voxel block (four times it) derive from it.

    Attributes
    ----------
    clean_args_ : dict
        The arguments passed to ``nilearn.signal.clean`` (``clean_args`` or {}).
    dropped_regions_ : list of int
        Maps dropped because they are empty inside ``mask_img`` (nilearn drops
        them with a warning and returns only the others).
    maps_img_ : nibabel.nifti1.Nifti1Image
        The maps on the fitted grid (resampled as nilearn resamples them; the
        input image itself, not read, when no resampling is needed).
    mask_img_ : nibabel.nifti1.Nifti1Image or None
        The mask on the fitted grid.
    memory_ : joblib.Memory
        nilearn's cache object built from ``memory``; chunkglm does not use it.
    n_elements_ : int
        Number of maps in ``maps_img``.
    region_indices_ : ndarray of int
        Maps kept (indices into maps_img): the columns of the output.

    Notes
    -----
    See the module documentation for what differs from nilearn by design.
    """
