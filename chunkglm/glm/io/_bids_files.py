"""Contents of GLM output files: contrasts, JSON metadata, cluster tables.

Also the few things read from the model besides nilearn's public API
(``design_matrices_``, ``compute_contrast``, ``r_square_``, ``residuals_``),
gathered in :func:`run_entities`, :func:`mask_image`, :func:`confound_names` and
(shared with the reports) :mod:`chunkglm.report.descriptions`, so that there is one place to adapt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from chunkglm.errors import InputError
from chunkglm.glm.second_level.nonparametric import check_permutation_options
from chunkglm.glm.io._bids_names import weights_json
from chunkglm.io.derivatives import check_label, contrast_label, dataset_description, glm_label, software, write_json
from chunkglm.report.descriptions import group_model_parameters, model_parameters, repetition_times
from chunkglm.report.build import SavedResults
from chunkglm.report.sections import ReportOptions

#: Keyword arguments of nilearn's ``generate_report`` that shape the cluster
#: tables, with nilearn's defaults.
CLUSTER_DEFAULTS = {"threshold": None, "alpha": 0.001, "cluster_threshold": 0,
                    "height_control": "fpr", "two_sided": False, "min_distance": 8.0}
#: Keyword arguments of ``generate_report`` that only affect the report page.
REPORT_ONLY = ("title", "bg_img", "plot_type", "cut_coords", "display_mode", "report_dims")
#: nilearn 0.14's cluster-forming z threshold when height_control is None.
DEFAULT_Z = 3.09


# -- options -----------------------------------------------------------------


def report_keywords(kwargs: dict) -> dict:
    """``save_glm_to_bids``' keyword arguments: those of ``generate_report`` (nilearn's rule).

    Unknown ones raise InputError (a ValueError) with nilearn's words; the
    values are checked as ``generate_report`` checks them (nilearn's errors),
    before anything is computed or written. Nothing is warned here: the
    report written at the end says each adjustment once.
    """
    allowed = [*CLUSTER_DEFAULTS, *REPORT_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InputError(f"unknown keyword argument(s) {unknown}: Extra key-word must be one of {allowed} "
                         "(the options of generate_report).")
    ReportOptions.checked(**kwargs)
    return dict(kwargs)


def cluster_options(kwargs: dict) -> dict:
    """The options that shape the cluster tables, with nilearn's adjustments (said by the report)."""
    report_keywords(kwargs)
    options = {**CLUSTER_DEFAULTS, **{k: v for k, v in kwargs.items() if k in CLUSTER_DEFAULTS}}
    if options["height_control"] is None and options["threshold"] is None:
        options["threshold"] = DEFAULT_Z
    elif options["height_control"] is not None:
        options["threshold"] = None  # nilearn: only used with height_control=None
    return options


# -- contrasts ---------------------------------------------------------------


@dataclass(frozen=True)
class ContrastSpec:
    """One contrast: its name, file labels, definition, stat type and weights per run.

    ``label`` is nilearn's (its file set), ``glm_label`` the derivatives/glm layout's (the
    name verbatim when it is a BIDS label, see :func:`chunkglm.io.derivatives.glm_label`).
    """

    name: str
    label: str
    definition: object
    stat_type: str
    weights: tuple
    glm_label: str = ""


def as_contrast_dict(contrasts) -> dict:
    """nilearn's ``coerce_to_dict``: a formula, weights, a list of them, or a dict."""
    if isinstance(contrasts, dict):
        items = dict(contrasts)
    elif isinstance(contrasts, str):
        items = {contrasts: contrasts}
    elif isinstance(contrasts, list | tuple | np.ndarray):
        single = len(contrasts) > 0 and not isinstance(contrasts[0], Iterable)
        items = {str(contrasts): contrasts} if single else {str(c): c for c in contrasts}
    else:
        raise TypeError("contrasts must be a string, weights, a list of them or a dict; "
                        f"received {type(contrasts).__name__}.")
    if not items:
        raise InputError("no contrast given: pass at least one, e.g. contrasts='a - b'.")
    return items


def contrast_specs(contrasts, contrast_types, design_matrices) -> list[ContrastSpec]:
    """Check names, definitions and types, and evaluate the weights on every run's design.

    Everything that can make a contrast fail is found here, before any file
    is written.
    """
    items = as_contrast_dict(contrasts)
    types = _check_contrast_types(contrast_types, items)
    specs, labels = [], {}
    for name, definition in items.items():
        label, verbatim = contrast_label(name), glm_label(name)
        for key in (label, verbatim.lower()):  # .lower(): one file on case-insensitive file systems
            if key in labels:
                raise InputError(f"contrasts {labels[key]!r} and {name!r} would both be saved as "
                                 f"contrast-{label if key == label else verbatim}: rename one.")
        labels.update({label: name, verbatim.lower(): name})
        definition = _definition(name, definition)
        weights = tuple(_weights(name, definition, dm) for dm in design_matrices)
        if not any(np.any(w) for w in weights):
            raise InputError(f"contrast {name!r} is null (all weights are 0) on every run.")
        default = "t" if isinstance(definition, str) or definition.ndim == 1 else "F"
        specs.append(ContrastSpec(name, label, definition, types.get(name, default), weights, verbatim))
    return specs


def _check_contrast_types(contrast_types, items) -> dict:
    if contrast_types is None:
        return {}
    if not isinstance(contrast_types, dict):
        raise TypeError(f"contrast_types must be a dict or None; received {type(contrast_types).__name__}.")
    unknown = sorted(set(contrast_types) - set(items))
    if unknown:
        raise InputError(f"contrast_types names {unknown}, which are not contrasts ({list(items)}).")
    bad = {k: v for k, v in contrast_types.items() if v not in ("t", "F")}
    if bad:
        raise InputError(f"contrast types must be 't' or 'F'; received {bad}.")
    return dict(contrast_types)


def _definition(name, definition):
    if isinstance(definition, str):
        return definition
    if not isinstance(definition, list | tuple | np.ndarray):
        raise TypeError(f"contrast definitions must be strings or array_likes: contrast {name!r} is a "
                        f"{type(definition).__name__}; give a formula ('a - b') or weights (1-D: t, 2-D: F).")
    array = np.asarray(definition, dtype=float)
    if array.ndim not in (1, 2):
        raise InputError(f"contrast {name!r}: weights must be 1-D (t) or 2-D (F); got shape {array.shape}.")
    return array


def _weights(name, definition, design) -> np.ndarray:
    from nilearn.glm.contrasts import expression_to_contrast_vector

    columns = [str(c) for c in design.columns]
    if isinstance(definition, str):
        try:
            return expression_to_contrast_vector(definition, columns)
        except Exception as err:  # pandas eval raises several kinds
            raise InputError(f"contrast {name!r} cannot be evaluated on the design columns "
                             f"{columns}: {err}") from err
    if np.atleast_2d(definition).shape[1] != len(columns):
        raise InputError(f"contrast {name!r} has {np.atleast_2d(definition).shape[1]} weights but the "
                         f"design has {len(columns)} columns {columns}.")
    return definition


# -- what the model knows about its inputs -------------------------------------


def run_entities(model) -> list[dict] | None:
    """BIDS entities of each run's input, or None when the model does not record them.

    Read from ``model.run_entities_`` (one dict per run; empty for inputs
    without BIDS names).
    """
    entities = getattr(model, "run_entities_", None)
    if entities is None:
        return None
    entities = [dict(e or {}) for e in entities]
    if len(entities) != len(model.design_matrices_):
        raise InputError(f"model.run_entities_ has {len(entities)} entries for "
                         f"{len(model.design_matrices_)} runs.")
    return entities


def derivative_entities(model, subject, session, task) -> dict:
    """The derivatives/glm layout's sub/ses/task labels: those given, else the model's runs' shared ones."""
    runs = run_entities(model) or []

    def shared(key):
        labels = {str(e[key]) for e in runs if e.get(key) is not None}
        return labels.pop() if len(labels) == 1 else None

    entities = {"sub": subject if subject is not None else (getattr(model, "subject_label", None)
                                                             or shared("sub")),
                "ses": session if session is not None else shared("ses"),
                "task": task if task is not None else shared("task")}
    for key, what in (("sub", "subject_label"), ("task", "task_label")):
        if entities[key] is None:
            raise InputError(f"the {what} is unknown (the model's runs do not give one): pass "
                             f"{what}=...")
    for key, label in entities.items():
        if label is not None:
            entities[key] = check_label(str(label).removeprefix(f"{key}-"), f"{key} label")
    return entities


def mask_image(model):
    """The fit mask as a uint8 NIfTI image (``model.mask_img_`` when the model has it)."""
    import nibabel as nib

    mask = getattr(model, "mask_img_", None)
    if type(mask).__name__ in ("SurfaceImage", "Cifti2Image"):  # surface models: written per hemisphere
        return mask  # (GIFTI, as nilearn) or as a dense scalar file (CIFTI)
    if mask is not None:
        from nilearn.image import load_img

        mask = load_img(mask)
        return nib.Nifti1Image((np.asarray(mask.dataobj) != 0).astype(np.uint8), mask.affine)
    grid = getattr(model, "_grid", None)  # chunkglm's FirstLevelModel without mask_img_
    if grid is None:
        raise InputError("the model exposes no mask (mask_img_): cannot write the mask or clusters.")
    voxels = getattr(model, "_voxels", None)
    ijk = grid.ijk if voxels is None else grid.ijk[voxels]
    data = np.zeros(grid.shape, dtype=np.uint8)
    data[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1
    return nib.Nifti1Image(data, grid.affine)


def confound_names(model, given=None) -> list[str]:
    """Confound column names: ``given``, else ``model.confound_names_`` (per run, merged)."""
    names = given if given is not None else getattr(model, "confound_names_", None)
    if names is None:
        raise InputError("the model does not record its confound names (confound_names_): pass "
                         "confounds=[...] (the confound columns used at fit), or [] for none.")
    if names and not isinstance(names[0], str):  # one list per run
        names = [n for run in names for n in (run or [])]  # None: a run fitted without confounds
    return list(dict.fromkeys(str(n) for n in names))


# -- JSON contents -----------------------------------------------------------------


def write_description(out, level: str) -> None:
    """dataset_description.json (an existing one is extended, as nilearn does)."""
    write_json(out.path("dataset_description.json"),
               dataset_description(description=f"A chunkglm {level}-level GLM.",
                                   existing=out.existing("dataset_description.json")))


def group_metadata(model, specs, corrections: dict, descriptions=None) -> dict:
    """The derivatives/glm group sidecar.

    Parameters
    ----------
    model : chunkglm.glm.second_level.SecondLevelModel
        Fitted.
    specs : list of ContrastSpec
    corrections : dict
        ``{"TwoSided", "ClusterThreshold", "FDR": {...}, "FWE": {...}}``
        with, in FDR/FWE, ``Method``, ``Alpha`` and ``Thresholds``
        (``{label: z threshold}``; None where no voxel can pass).
    descriptions : dict, optional
        ``{contrast name: text}``; default the formula (or the name).
    """
    descriptions = descriptions or {}
    contrasts = {}
    for spec in specs:
        default = spec.definition if isinstance(spec.definition, str) else spec.name
        contrasts[spec.glm_label] = {"Name": spec.name,
                                 "Description": descriptions.get(spec.name, default),
                                 "Weights": weights_json(spec.weights[0]), "Type": spec.stat_type}
    design = model.design_matrix_
    return {
        "AnalysisLevel": "group_level",
        "Model": {"Type": "GLM", "Estimator": "OLS", "Regressors": [str(c) for c in design.columns],
                  "NumberOfMaps": int(len(design)),
                  "SmoothingFWHM": getattr(model, "smoothing_fwhm", None)},
        "Contrasts": contrasts,
        "Corrections": corrections,
        "Software": software(),
    }


def derivatives_metadata(model, specs, confounds, descriptions=None) -> dict:
    """The derivatives/glm sidecar: AnalysisLevel, Model (with the runs' RepetitionTime and
    the SliceTimingRef of their designs), Contrasts, Software, Confounds."""
    descriptions = descriptions or {}
    columns = [[str(c) for c in dm.columns] for dm in model.design_matrices_]
    same = all(c == columns[0] for c in columns)
    contrasts = {}
    for spec in specs:
        weights = [weights_json(w) for w in spec.weights]
        one = same and all(w == weights[0] for w in weights)
        default = spec.definition if isinstance(spec.definition, str) else spec.name
        contrasts[spec.glm_label] = {"Description": descriptions.get(spec.name, default),
                                 "Weights": weights[0] if one else weights}
    t_r = repetition_times(model)
    slice_time_ref = getattr(model, "slice_time_ref", None)
    return {
        "AnalysisLevel": "first_level",
        "Model": {"Type": "GLM", "HRF": model.hrf_model, "DriftModel": model.drift_model,
                  "HighPassFilter": model.high_pass if model.drift_model == "cosine" else None,
                  "NoiseModel": model.noise_model,
                  # the design's timing (the report's model details read them here)
                  "RepetitionTime": t_r[0] if len(set(t_r)) == 1 else t_r,
                  "SliceTimingRef": None if slice_time_ref is None else float(slice_time_ref)},
        "Regressors": columns[0] if same else columns,
        "Contrasts": contrasts,
        "Software": software(),
        "Confounds": confounds,
    }


# -- clusters ------------------------------------------------------------------------


def clusters(z_img, mask_img, options: dict):
    """Cluster table of a contrast's z map and its parameters (clusters.tsv / .json).

    As nilearn's GLM report: :func:`nilearn.glm.threshold_stats_img` on the
    z map within the mask, then :func:`nilearn.reporting.get_clusters_table`
    with the same ``two_sided``.
    """
    from nilearn.glm import threshold_stats_img
    from nilearn.reporting import get_clusters_table

    thresholded, threshold = threshold_stats_img(
        stat_img=z_img, mask_img=mask_img, alpha=options["alpha"], threshold=options["threshold"],
        height_control=options["height_control"], cluster_threshold=options["cluster_threshold"],
        two_sided=options["two_sided"])
    table = get_clusters_table(thresholded, stat_threshold=threshold,
                               cluster_threshold=options["cluster_threshold"],
                               two_sided=options["two_sided"], min_distance=options["min_distance"])
    return table, cluster_details(threshold, options, volume=type(z_img).__name__ != "SurfaceImage")


def cluster_details(threshold, options: dict, volume: bool = True) -> dict:
    """nilearn's ``clustering_params_to_dataframe`` as a dict (``volume=False``: a surface GLM's, without
    the cluster size and minimum distance entries, as nilearn's)."""
    threshold = float(np.around(threshold, 3))
    alpha, height_control = options["alpha"], options["height_control"]
    if height_control:
        details = {"Height control": height_control,
                   "\u03b1": f"{Decimal(alpha):.2E}" if alpha < 0.001 else alpha,
                   "Threshold (computed)": threshold}
    else:
        details = {"Height control": "None", "Threshold Z": threshold}
    if volume:
        details["Cluster size threshold (voxels)"] = options["cluster_threshold"]
        details["Minimum distance (mm)"] = options["min_distance"]
    return details


def remember_report(model, specs, names, saved, out) -> None:
    """After ``save_glm_to_bids`` wrote into a local folder: what a later ``generate_report()``
    without contrasts shows (nilearn's behaviour), read from the files written.

    Kept on the model as ``_saved_bids_report`` with the design matrices of the fit
    it belongs to: a refit model (new design matrices) no longer uses it. Only file
    paths are kept (the z maps are read back when a report is made), not images.
    """
    if out.remote:  # figures on an object store cannot be linked from a page made elsewhere
        return
    folder = out.out_dir / names.folder if names.folder else out.out_dir
    first = model._is_first_level_glm()

    def where(name):
        return str(folder / name) if name is not None else None

    files = SavedResults(
        {spec.name: folder / names.contrasts[spec.label]["z_score"] for spec in specs},
        [(where(design), where(correlation)) for design, correlation in saved.design_srcs],
        {name: [where(src) for src in srcs] for name, srcs in saved.contrast_srcs.items()})
    model._saved_bids_report = {"design_matrices": model.design_matrices_ if first else model.design_matrix_,
                                "contrasts": {spec.name: spec.definition for spec in specs}, "saved": files}


# -- permutation maps of the group layout ----------------------------------


#: Permutation maps written, in order: always, with tfce, with a cluster-forming threshold.
PERMUTATION_MAPS = (("logp_max_t",), ("tfce", "logp_max_tfce"),
                    ("size", "logp_max_size", "mass", "logp_max_mass"))


def permutation_inputs(specs, permutation_maps, permutation, two_sided):
    """(settings, {label: maps}) of the permutation-tested contrasts; (None, {}) without any.

    Checks, before anything is written, that the maps are those of t contrasts among
    ``specs``, computed with checked settings and ``two_sided``, and hold every map to write.
    """
    if not permutation_maps:
        if permutation is not None:
            raise InputError("permutation settings were given without permutation_maps: pass the maps "
                             "computed with them (chunkglm.glm.second_level.permutation_maps).")
        return None, {}
    if not isinstance(permutation, dict):
        raise InputError("permutation_maps need permutation={'n_perm': ..., 'random_state': ..., 'tfce': ..., "
                         "'threshold': ...}: the settings they were computed with.")
    unknown = sorted(set(permutation) - {"n_perm", "random_state", "tfce", "threshold", "two_sided_test"})
    if unknown:
        raise InputError(f"unknown permutation setting(s) {unknown}; allowed: n_perm, random_state, tfce, "
                         "threshold, two_sided_test.")
    settings = {"n_perm": permutation.get("n_perm", 10000), "tfce": permutation.get("tfce", False),
                "threshold": permutation.get("threshold"), "random_state": permutation.get("random_state")}
    check_permutation_options(settings["threshold"], settings["tfce"], settings["n_perm"])
    if "two_sided_test" in permutation and bool(permutation["two_sided_test"]) != two_sided:
        raise InputError(f"the permutation maps were computed with two_sided_test="
                         f"{permutation['two_sided_test']!r} but two_sided={two_sided!r}: compute them "
                         "with two_sided_test=two_sided.")
    settings["n_perm"] = int(settings["n_perm"])
    settings["tfce"] = bool(settings["tfce"])
    groups = (True, settings["tfce"], settings["threshold"] is not None)
    settings["maps"] = [key for group, wanted in zip(PERMUTATION_MAPS, groups) if wanted for key in group]
    by_name = {spec.name: spec for spec in specs}
    tested = {}
    for name, maps in permutation_maps.items():
        spec = by_name.get(name)
        if spec is None or spec.stat_type != "t":
            t_names = [s.name for s in specs if s.stat_type == "t"]
            raise InputError(f"permutation maps given for {name!r}, which is not a t contrast of this call "
                             f"(t contrasts: {t_names}).")
        missing = [key for key in settings["maps"] if key not in maps]
        if missing:
            raise InputError(f"the permutation maps of contrast {name!r} lack {missing}: compute them with "
                             "the tfce / threshold settings given in permutation.")
        tested[spec.label] = maps
    return settings, tested


def fwe_metadata(alpha, thresholds, specs, tested, settings) -> dict:
    if settings is None:
        return {"Method": "bonferroni", "Alpha": alpha, "Thresholds": thresholds}
    methods = {spec.glm_label: ("permutation max-T" if spec.label in tested else "bonferroni")
               for spec in specs}
    state = settings["random_state"]
    return {"Method": methods, "Alpha": alpha, "Thresholds": thresholds,
            "Permutation": {"NumberOfPermutations": settings["n_perm"],
                            "RandomState": state if isinstance(state, int) else None,
                            "TFCE": settings["tfce"],
                            "ClusterFormingP": settings["threshold"],
                            "ThresholdsAre": "-log10 FWE p-value for permutation contrasts, "
                                             "|z| for bonferroni ones"}}
