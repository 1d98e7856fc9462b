"""Save a fitted GLM (first or second level) as BIDS-like derivatives.

Three layouts:

- :func:`save_glm_to_bids`: nilearn's ``save_glm_to_bids`` file set and
  file names (``sub-XX/...contrast-<label>_stat-<t|F|z|p|effect|variance>
  _statmap.nii.gz``, design matrices, figures, cluster tables, ...);
- :func:`save_glm_derivatives`: the ``derivatives/glm`` layout
  (``first_level/sub-XX/sub-XX_task-T_contrast-C_stat-{t,z,effect,variance}.nii.gz``
  with one JSON sidecar per model);
- :func:`save_group_derivatives`: the ``derivatives/glm/group_level``
  layout of a second-level model (``group_contrast-C_stat-{t,z}.nii.gz``,
  ``group_contrast-C_{fdr,fwe}-corrected.nii.gz``, ``group_glm.json``).

All write all files into a temporary folder beside ``out_dir`` and move
them into ``out_dir`` only once every file is written: after an error,
``out_dir`` is exactly as before.
"""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np

from chunkglm.errors import InputError
from chunkglm.glm.second_level import SecondLevelModel
from chunkglm.glm.second_level.nonparametric import contrast_vector
from chunkglm.glm.thresholding import threshold_stats_img
from chunkglm.inference.clusters import apply_cluster_extent
from chunkglm.glm.io._bids_files import (
    cluster_options,
    clusters,
    confound_names,
    contrast_specs,
    derivative_entities,
    derivatives_metadata,
    group_metadata,
    fwe_metadata,
    group_model_parameters,
    mask_image,
    model_parameters,
    permutation_inputs,
    remember_report,
    report_keywords,
    repetition_times,
    run_entities,
    write_description,
)
from chunkglm.glm.io._bids_names import (
    MAP_STATS,
    check_prefix,
    derivative_names,
    group_derivative_names,
    plan_bids_names,
)
from chunkglm.glm.io._surface_files import cifti_clusters_skipped, density, is_surface_map, save_map
from chunkglm.glm.io.surface_derivatives import (is_surface_image, mask_output, permutation_fwe_surface,
                                                 save_surface_map)
from chunkglm.io.derivatives import (
    StagedOutput,
    write_json,
)
from chunkglm.io.mesh_spaces import space_metadata
from chunkglm.io.nifti import save_map as save_image  # derivative maps: float32
from chunkglm.report.build import SavedResults, model_report
from chunkglm.report.figures import (
    FIGURE_FORMATS,
    contrast_matrix_figure,
    design_matrix_correlation_figure,
    design_matrix_figure,
    save_figure,
)

__all__ = ["check_correction_options", "permutation_contrasts", "permutation_fwe_map", "save_glm_derivatives",
           "save_glm_to_bids", "save_group_derivatives", "write_glm_to_bids"]

def save_glm_to_bids(model, contrasts, first_level_contrast=None, contrast_types=None, out_dir=".", prefix=None,
                     **kwargs):
    """Save GLM results to BIDS-like files, as :func:`nilearn.glm.save_glm_to_bids`; returns the model.

    Parameters
    ----------
    model : chunkglm.glm.first_level.FirstLevelModel or chunkglm.glm.second_level.SecondLevelModel
        A fitted model. For a second-level model, see the "Second level"
        notes below.
    contrasts : str, array-like, list of them, or dict
        A formula (``"a - b"``), weights (1-D: t, 2-D: F), a list of these,
        or a dict ``{name: formula or weights}``. Without a dict, each
        contrast is named after its definition (nilearn's rule). Names
        become ``contrast-<label>`` entities with nilearn's camelCase
        conversion (``"a - b"`` -> ``aMinusB``), keeping ASCII letters and
        digits only.
    first_level_contrast : str or array-like, optional
        Second level: passed to ``compute_contrast`` (required when the model
        was fitted on first-level models; the ``map_name`` for a DataFrame
        input). Ignored for a first-level model, with nilearn's warning.
    contrast_types : dict, optional
        ``{name: "t" or "F"}`` for some contrasts; default t for formulas
        and 1-D weights, F for 2-D weights. Used to compute the maps too
        (nilearn only uses it in the file name).
    out_dir : str or Path, default="."
        Output folder; created if needed. Existing files of the same names
        are replaced; other files are left alone.
    prefix : str, optional
        Prepended (with ``_``) to the file names. A value that is not a
        string means no prefix (nilearn's rule), with a warning. When None and the model
        knows the BIDS entities of its inputs (``model.run_entities_``:
        runs of a cohort store, or NIfTI files with BIDS names), names are
        built from them
        (``sub-01_task-main_run-1_space-X_...``) in a ``sub-<label>``
        folder, as nilearn does for inputs given as file names. ``""``
        turns that off. A prefix starting with ``sub-<label>_`` also puts
        the files in a ``sub-<label>`` folder.
    **kwargs
        The options of the model's ``generate_report`` (nilearn's rule;
        another keyword raises ValueError): ``threshold``, ``alpha``
        (0.001), ``height_control`` ("fpr"), ``cluster_threshold`` (0),
        ``two_sided`` (False), ``min_distance`` (8.0) shape the cluster
        tables and the report, with the semantics of nilearn's GLM report:
        the z map is thresholded within the mask by
        :func:`nilearn.glm.threshold_stats_img` and tabulated by
        :func:`nilearn.reporting.get_clusters_table`, both with
        ``two_sided`` (nilearn's ``save_glm_to_bids`` always thresholds
        two-sided: pass ``two_sided=True`` for its 3.29 default
        threshold). ``title``, ``bg_img``, ``plot_type``, ``cut_coords``,
        ``display_mode``, ``report_dims`` shape the report page
        (``report.html``), as ``generate_report``'s.

    Returns
    -------
    model
        The model given (nilearn 0.14). :func:`write_glm_to_bids` takes the
        same arguments and returns the paths written.

    Raises
    ------
    InputError
        Invalid contrast (unknown column, wrong number of weights, null),
        unsafe or colliding contrast name (``"../x"``, ``"a/b"``, ``""``,
        two names with one label), unsafe prefix, invalid option, or an
        output path that is a folder. Found before anything is written.
    TypeError
        A model that is not a first- or second-level model, a contrast name
        that is not a string.

    Notes
    -----
    Whatever the error, also one raised while writing or moving files
    into place, ``out_dir`` is left as it was (files are written in a
    temporary folder beside it, then moved in).

    Files (``<e>`` stands for the entities or prefix; see nilearn)::

        dataset_description.json            (extended if it exists)
        [sub-XX/][<prefix>_]statmap.json    model parameters
        [sub-XX/]<e>_mask.nii.gz
        [sub-XX/]<e>_design.{tsv,json,png,svg}        one per run
        [sub-XX/]<e>_corrdesign.{png,svg}             one per run
        [sub-XX/]<e>_stat-{errorts,rsquared}_statmap.nii.gz   one per run
        [sub-XX/]<e>_contrast-<label>_stat-{effect,variance,t|F,p,z}_statmap.nii.gz
        [sub-XX/]<e>_contrast-<label>_clusters.{tsv,json}
        [sub-XX/]<e>_contrast-<label>_design.{png,svg}        one per run
        [sub-XX/][<prefix>_]report.html     generate_report's page; its figures are the PNG files
                                            beside it, its z maps those written

    Differences from nilearn 0.14: figures also as SVG; ``report.html`` is the page itself
    (nilearn writes it wrapped in an ``<iframe srcdoc=...>``);
    cluster tables from the z map (nilearn thresholds the variance map),
    thresholded as nilearn's report does (``two_sided`` for both steps,
    within the mask); maps are float32; ``stat-errorts`` and
    ``stat-rsquared`` are written whatever ``minimize_memory``;
    ``contrast_types`` also sets the statistic computed; on error nothing
    is left; contrast names are refused rather than changed when they hold
    path separators or no letter or digit.

    Surface models (SurfaceImage maps), as nilearn 0.14.1: each map is one
    GIFTI file per hemisphere, ``hemi-L``/``hemi-R`` and ``den-<vertices>``
    placed in BIDS entity order (``sub-01_hemi-L_den-10242_contrast-c0_stat-z_statmap.gii``;
    float32, the mask uint8), ``statmap.json`` has nilearn's ``Density``, the
    clusters' json leaves out the cluster size and distance entries;
    ``report.html`` draws the maps on their mesh. CIFTI models (nilearn has
    none): each map one dense scalar file
    (``<e>_contrast-<label>_stat-z_statmap.dscalar.nii``, the mask
    ``<e>_mask.dscalar.nii``) on the runs' brain-model axis; no cluster
    tables (a warning says so); ``report.html`` draws the cortex on the mesh
    nilearn ships with its number of vertices (fsaverage5) and lists the
    survivors of each structure of the brain-model axis.

    Second level: as nilearn, every file goes to ``out_dir/group/`` and
    names never come from the inputs (``prefix`` only)::

        dataset_description.json
        group/[<prefix>_]statmap.json         ModelParameters: smoothing_fwhm,
                                              target_affine, target_shape
        group/[<prefix>_]mask.nii.gz
        group/[<prefix>_]design.tsv, design.{png,svg}, corrdesign.{png,svg}
        group/[<prefix>_]contrast-<label>_stat-{effect,variance,t|F,p,z}_statmap.nii.gz
        group/[<prefix>_]contrast-<label>_clusters.{tsv,json}
        group/[<prefix>_]contrast-<label>_design.{png,svg}
        group/[<prefix>_]stat-{errorts,rsquared}_statmap.nii.gz
        group/[<prefix>_]report.html

    No ``design.json`` (nilearn writes it for first-level models only).
    ``stat-errorts`` (one volume per map) and ``stat-rsquared`` are those
    of the last contrast's fit and need ``minimize_memory=False``: with
    ``minimize_memory=True`` they are left out with a warning (nilearn
    raises after writing the other files).

    Examples
    --------
    >>> run = chunkglm.open_cohort("cohort.zarr").runs["sub-01_task-main_run-1"]  # doctest: +SKIP
    >>> model = FirstLevelModel(slice_time_ref=0.5).fit(run)  # doctest: +SKIP
    >>> paths = write_glm_to_bids(model, "a - b", out_dir="results",
    ...                           prefix="sub-01_task-main")  # doctest: +SKIP
    >>> [str(p.relative_to("results")) for p in paths if "stat-z" in p.name]  # doctest: +SKIP
    ['sub-01/sub-01_task-main_contrast-aMinusB_stat-z_statmap.nii.gz']
    """
    write_glm_to_bids(model, contrasts, first_level_contrast, contrast_types, out_dir, prefix, **kwargs)
    return model


def write_glm_to_bids(model, contrasts, first_level_contrast=None, contrast_types=None, out_dir=".",
                      prefix=None, *, residuals=True, **kwargs) -> list:
    """:func:`save_glm_to_bids`, returning every file written (``pathlib.Path``, in writing order).

    ``residuals=False`` (keyword only; not nilearn's) leaves out the ``stat-errorts`` files:
    at first level one 4-D file per run, as large as the run, that reads the data a second
    time; at second level one volume per input map. ``stat-rsquared`` is written either way.
    """
    report = report_keywords(kwargs)
    prefix = _prefix(prefix)
    if _is_second_level(model):
        return _save_group_bids(model, contrasts, first_level_contrast, contrast_types, out_dir, prefix, report,
                                residuals)
    _check_model(model)
    if first_level_contrast is not None:
        warnings.warn("'first_level_contrast' is ignored for FirstLevelModel. Setting first_level_contrast=None.",
                      UserWarning, stacklevel=3)
    options = cluster_options(report)
    prefix = check_prefix(prefix)
    specs = contrast_specs(contrasts, contrast_types, model.design_matrices_)
    names = plan_bids_names(specs, run_entities(model), len(model.design_matrices_), prefix)
    with StagedOutput(out_dir) as out:
        saved = _write_bids(model, specs, names, options, out, residuals)
        _write_report(model, specs, names, saved, None, report, out)
    remember_report(model, specs, names, saved, out)
    return out.written


def _prefix(prefix):
    if prefix is None or isinstance(prefix, str):
        return prefix
    warnings.warn(f"prefix={prefix!r} is not a string: no prefix is used (nilearn's rule); pass a string, or "
                  "'' for none.", UserWarning, stacklevel=4)
    return ""


def _write_report(model, specs, names, saved, first_level_contrast, report, out) -> None:
    """``report.html`` beside the files: generate_report's page on the maps and figures just written
    (surface maps drawn on their mesh, CIFTI maps' cortex and subcortical structures: chunkglm.report.surface)."""
    statmap = names.statmap_json
    page = statmap[:-len("statmap.json")] + "report.html"
    html = model_report(model, {spec.name: spec.definition for spec in specs}, first_level_contrast,
                        saved=saved, **report)
    html.save_as_html(out.path(f"{names.folder}/{page}" if names.folder else page))


def _is_second_level(model) -> bool:
    return isinstance(model, SecondLevelModel)


def _check_second_level(model) -> None:
    if getattr(model, "design_matrix_", None) is None:
        raise InputError("the SecondLevelModel is not fitted yet: call model.fit(...) first; nothing "
                         "was written.")


def _check_model(model) -> None:
    if _is_second_level(model):
        raise TypeError("save_glm_derivatives writes the first_level layout; for a SecondLevelModel "
                        "use save_group_derivatives (group_level layout).")
    if not hasattr(model, "compute_contrast"):
        raise TypeError(f"expected a fitted FirstLevelModel; received {type(model).__name__}.")
    if getattr(model, "design_matrices_", None) is None:
        raise InputError("the model is not fitted yet: call model.fit(...) first.")


def _write_bids(model, specs, names, options, out, residuals=True) -> None:
    def rel(name):
        return f"{names.folder}/{name}" if names.folder else name

    write_description(out, "first")
    t_rs = repetition_times(model)
    mask = mask_image(model)
    write_json(out.path(rel(names.statmap_json)),
               {"Description": "A statistical map generated by chunkglm.",
                "ModelParameters": model_parameters(model, t_rs[0]),
                **({"Density": density(mask)} if is_surface_map(mask) else {})})
    save_map(mask, out, rel(names.mask), save_image)
    design_srcs = [_write_design(design, run_names, t_r, out, rel)
                   for design, run_names, t_r in zip(model.design_matrices_, names.runs, t_rs)]
    saved = SavedResults({}, design_srcs, {})
    for spec in specs:
        z_map = _write_contrast(model, spec, names.contrasts[spec.label], mask, options, out, rel)
        saved.stat_maps[spec.name] = z_map
        saved.contrast_srcs[spec.name] = [_png(base) for base in names.contrasts[spec.label]["design"]]
    _write_model_maps(model, names.runs, out, rel, residuals)
    return saved


def _png(base: str) -> str:
    """A figure's PNG file as the report page beside it names it."""
    return f"{base.rsplit('/', 1)[-1]}.png"


def _write_design(design, run_names, t_r, out, rel) -> tuple:
    """The design's files; returns its figure files as the report links them (design, correlations)."""
    design.to_csv(out.path(rel(run_names["design_tsv"])), sep="\t", index=False)
    if t_r is not None:  # second level: no design.json (nilearn)
        write_json(out.path(rel(run_names["design_json"])), {"RepetitionTime": t_r})
    _save_figure(design_matrix_figure(design), out, rel(run_names["design_base"]))
    correlation = design_matrix_correlation_figure(design)
    if correlation is not None:
        _save_figure(correlation, out, rel(run_names["corrdesign_base"]))
    return _png(run_names["design_base"]), (_png(run_names["corrdesign_base"]) if correlation is not None else None)


def _write_contrast(model, spec, outputs, mask, options, out, rel):
    """The contrast's maps, cluster table and weights figures; returns its z map."""
    maps = model.compute_contrast(spec.definition, stat_type=spec.stat_type, output_type="all")
    for key in MAP_STATS:
        save_map(maps[key], out, rel(outputs[key]), save_image)
    if not cifti_clusters_skipped(maps["z_score"]):  # CIFTI: no cluster table (a warning says so)
        table, details = clusters(maps["z_score"], mask, options)
        table.to_csv(out.path(rel(outputs["clusters_tsv"])), sep="\t", index=False)
        write_json(out.path(rel(outputs["clusters_json"])), details, indent=None, sort_keys=False)
    for design, base in zip(model.design_matrices_, outputs["design"]):
        _save_figure(contrast_matrix_figure(spec.definition, design, spec.name), out, rel(base))
    return maps["z_score"]


def _write_model_maps(model, runs, out, rel, residuals=True) -> None:
    """stat-rsquared (from the fit's moments), then stat-errorts (reads the data again)."""
    for run_names, image in zip(runs, model.voxelwise_images("r_square")):
        save_map(image, out, rel(run_names["rsquared"]), save_image)
    if not residuals:
        return
    for run_names, image in zip(runs, model.voxelwise_images("residuals")):
        save_map(image, out, rel(run_names["errorts"]), save_image)


def _save_figure(figure, out, base: str) -> None:
    save_figure(figure, [out.path(f"{base}.{fmt}") for fmt in FIGURE_FORMATS])


# -- second level, nilearn's file set ----------------------------------------------


def _save_group_bids(model, contrasts, first_level_contrast, contrast_types, out_dir, prefix, kwargs,
                     residuals=True):
    _check_second_level(model)
    options = cluster_options(kwargs)
    prefix = check_prefix(prefix)
    specs = contrast_specs(contrasts, contrast_types, [model.design_matrix_])
    names = plan_bids_names(specs, None, 1, prefix, group=True)
    if model.minimize_memory:
        warnings.warn("the SecondLevelModel has minimize_memory=True: stat-errorts and stat-rsquared "
                      "are not written (fit with minimize_memory=False to get them).",
                      UserWarning, stacklevel=3)
    with StagedOutput(out_dir) as out:
        saved = _write_group_bids(model, specs, names, options, first_level_contrast, out, residuals)
        _write_report(model, specs, names, saved, first_level_contrast, kwargs, out)
    remember_report(model, specs, names, saved, out)
    return out.written


def _write_group_bids(model, specs, names, options, first_level_contrast, out, residuals=True) -> None:
    def rel(name):
        return f"{names.folder}/{name}"

    write_description(out, "second")
    mask = mask_image(model)
    write_json(out.path(rel(names.statmap_json)),
               {"Description": "A statistical map generated by chunkglm.",
                "ModelParameters": group_model_parameters(model),
                **({"Density": density(mask)} if is_surface_map(mask) else {})})
    save_map(mask, out, rel(names.mask), save_image)
    saved = SavedResults({}, [_write_design(model.design_matrix_, names.runs[0], None, out, rel)], {})
    for spec in specs:
        maps = model.compute_contrast(spec.definition, first_level_contrast=first_level_contrast,
                                      second_level_stat_type=spec.stat_type, output_type="all")
        outputs = names.contrasts[spec.label]
        for key in MAP_STATS:
            save_map(maps[key], out, rel(outputs[key]), save_image)
        if not cifti_clusters_skipped(maps["z_score"]):  # CIFTI: no cluster table (a warning says so)
            table, details = clusters(maps["z_score"], mask, options)
            table.to_csv(out.path(rel(outputs["clusters_tsv"])), sep="\t", index=False)
            write_json(out.path(rel(outputs["clusters_json"])), details, indent=None, sort_keys=False)
        figure = contrast_matrix_figure(spec.definition, model.design_matrix_, spec.name)
        _save_figure(figure, out, rel(outputs["design"][0]))
        saved.stat_maps[spec.name] = maps["z_score"]
        saved.contrast_srcs[spec.name] = [_png(outputs["design"][0])]
    if not model.minimize_memory:  # of the last contrast's fit, as nilearn
        save_map(model.r_square_, out, rel(names.runs[0]["rsquared"]), save_image)
        if residuals:
            save_map(model.residuals_, out, rel(names.runs[0]["errorts"]), save_image)
    return saved


# -- derivatives/glm layout -------------------------------------------------------


def save_glm_derivatives(model, contrasts, out_dir, *, task_label=None, subject_label=None,
                         session_label=None, contrast_types=None, confounds=None,
                         descriptions=None, residuals=False):
    """Save a first-level GLM in the ``derivatives/glm`` layout.

    Parameters
    ----------
    model : chunkglm.glm.first_level.FirstLevelModel
        A fitted first-level model.
    contrasts : str, array-like, list of them, or dict
        As in :func:`save_glm_to_bids` (same names and labels).
    out_dir : str or Path
        The ``derivatives/glm`` folder; files go to
        ``out_dir/first_level/sub-<subject>/``.
    task_label : str, optional
        Default: the task entity shared by the model's runs.
    subject_label : str, optional
        Default: ``model.subject_label``, else the runs' shared subject.
    session_label : str, optional
        Default: the runs' shared session, if any (then ``ses-<label>`` is
        in the names).
    contrast_types : dict, optional
        As in :func:`save_glm_to_bids`.
    confounds : list of str, optional
        Confound column names for the sidecar; default the model's
        ``confound_names_``. Pass ``[]`` for a model without confounds.
    descriptions : dict, optional
        ``{contrast name: text}`` for the sidecar; default the formula (or
        the name, for weights).
    residuals : bool, default=False
        Also write each run's residuals (``stat-errorts``, 4-D, as large as
        the run in float32; computing them reads the run's data a second
        time).

    Returns
    -------
    list of pathlib.Path
        Every file written, in writing order.

    Notes
    -----
    Files, with ``<s> = sub-<subject>[_ses-<session>]_task-<task>`` and ``<label>`` the
    contrast's name as given when it is a BIDS label (letters and digits: ``faceVsBaseline``
    stays ``contrast-faceVsBaseline``, as the LAION layout's page shows; nilearn's file set
    folds it to ``facevsbaseline``), else converted as :func:`chunkglm.io.derivatives.glm_label`
    says (``"a - b"`` -> ``aMinusB``)::

        dataset_description.json                        (extended if it exists)
        first_level/sub-XX/<s>_contrast-<label>_stat-{t|F,z,effect,variance}.nii.gz
        first_level/sub-XX/<s>[_run-<r>]_design-matrix.{png,tsv}   (run only if several)
        first_level/sub-XX/<s>_mask.nii.gz
        first_level/sub-XX/<s>_glm.json
        first_level/sub-XX/<s>[_run-<r>]_stat-errorts.nii.gz       (residuals=True; run only if several)

    The sidecar holds ``AnalysisLevel`` ("first_level"), ``Model`` (Type,
    HRF, DriftModel, HighPassFilter, NoiseModel), ``Regressors`` (design
    columns), ``Contrasts`` (label -> Description, Weights over the
    regressors; one list per run when runs differ), ``Software`` (Name,
    Version) and ``Confounds``. Like :func:`save_glm_to_bids`, nothing is
    left in ``out_dir`` after an error.
    """
    _check_model(model)
    specs = contrast_specs(contrasts, contrast_types, model.design_matrices_)
    entities = derivative_entities(model, subject_label, session_label, task_label)
    metadata = derivatives_metadata(model, specs, confound_names(model, confounds), descriptions)
    names = derivative_names(specs, entities, run_entities(model) or [], len(model.design_matrices_))
    with StagedOutput(out_dir) as out:
        _write_derivatives(model, specs, names, metadata, out, residuals)
    return out.written


def _write_derivatives(model, specs, names, metadata, out, residuals=False) -> None:
    write_description(out, "first")
    for spec in specs:
        maps = model.compute_contrast(spec.definition, stat_type=spec.stat_type, output_type="all")
        for key, name in names["maps"][spec.label].items():
            save_image(maps[key], out.path(name))
    for design, name in zip(model.design_matrices_, names["designs"]):
        save_figure(design_matrix_figure(design), [out.path(name)])
        design.to_csv(out.path(name.removesuffix(".png") + ".tsv"), sep="\t", index=False)
    save_image(model.mask_img_, out.path(names["mask"]))
    write_json(out.path(names["sidecar"]), metadata)
    if residuals:  # last: the second read of the data
        for name, image in zip(names["residuals"], model.voxelwise_images("residuals")):
            save_image(image, out.path(name))


# -- derivatives/glm group_level layout ------------------------------------------------


def save_group_derivatives(model, contrasts, out_dir, *, contrast_types=None,
                           first_level_contrast=None, alpha=0.05, two_sided=True,
                           cluster_threshold=0, descriptions=None, permutation_maps=None,
                           permutation=None, residuals=False):
    """Save a second-level GLM in the ``derivatives/glm/group_level`` layout.

    Parameters
    ----------
    model : chunkglm.glm.second_level.SecondLevelModel
        A fitted second-level model.
    contrasts : str, array-like, list of them, or dict
        Over the design's columns, as in :func:`save_glm_to_bids` (same
        names and labels).
    out_dir : str or Path
        The ``derivatives/glm`` folder; files go to ``out_dir/group_level/``.
    contrast_types : dict, optional
        ``{name: "t" or "F"}``, as in :func:`save_glm_to_bids`.
    first_level_contrast : str or array-like, optional
        Passed to ``model.compute_contrast`` (required for a model fitted on
        first-level models).
    alpha : float, default=0.05
        The FDR q-value and the family-wise p-value.
    two_sided : bool, default=True
        Both tails kept, ``alpha`` split between them (nilearn's
        ``threshold_stats_img`` default).
    cluster_threshold : int, default=0
        Clusters smaller than this many voxels are removed from the
        corrected maps.
    descriptions : dict, optional
        ``{contrast name: text}`` for the sidecar; default the formula (or
        the name, for weights).
    permutation_maps : dict, optional
        ``{contrast name: maps}`` for t contrasts whose FWE map comes from
        nilearn's max-T permutation test instead of Bonferroni: ``maps`` is
        what :func:`chunkglm.glm.second_level.permutation_maps` returned for
        the contrast's vector (see :func:`permutation_contrasts`), run with
        ``two_sided_test=two_sided``. Other contrasts (F contrasts always)
        are Bonferroni-corrected.
    permutation : dict
        With ``permutation_maps``: the settings they were computed with, the
        keywords of ``permutation_maps`` (``n_perm``, ``random_state``,
        ``tfce``, ``threshold``, optionally ``two_sided_test``), checked by
        :func:`chunkglm.glm.second_level.check_permutation_options`. They
        choose the maps written and fill the sidecar.
    residuals : bool, default=False
        Also write the residuals of the last contrast's fit
        (``group_level/group_stat-errorts.nii.gz``, one volume per input
        map); needs a model fitted with ``minimize_memory=False``.

    Returns
    -------
    list of pathlib.Path
        Every file written, in writing order.

    Raises
    ------
    InputError
        Unfitted model, invalid contrast (unknown column, wrong number of
        weights, null), unsafe or colliding contrast name, an invalid
        ``alpha`` / ``cluster_threshold``, or permutation maps that are not
        those of the contrasts and settings given. Found before anything is
        written.

    Examples
    --------
    The permutation test runs first, then the files are written:

    >>> from chunkglm.glm.second_level import check_permutation_options, permutation_maps
    >>> settings = {"n_perm": 5000, "random_state": 0, "tfce": False, "threshold": None,
    ...             "two_sided_test": True}
    >>> check_permutation_options(settings["threshold"], settings["tfce"],
    ...                           settings["n_perm"])  # doctest: +SKIP
    >>> maps = {name: permutation_maps(model, con_val, **settings)  # doctest: +SKIP
    ...         for name, con_val in permutation_contrasts(model, "intercept").items()}
    >>> save_group_derivatives(model, "intercept", "derivatives/glm", permutation_maps=maps,
    ...                        permutation=settings)  # doctest: +SKIP

    Notes
    -----
    Files, with ``<C>`` the contrast label (the name verbatim when it is a BIDS label, as in
    :func:`save_glm_derivatives`)::

        dataset_description.json                        (extended if it exists)
        group_level/group_contrast-<C>_stat-{t|F,z}.nii.gz
        group_level/group_contrast-<C>_fdr-corrected.nii.gz
        group_level/group_contrast-<C>_fwe-corrected.nii.gz
        group_level/group_design-matrix.tsv
        group_level/group_mask.nii.gz
        group_level/group_glm.json
        group_level/group_contrast-<C>_stat-<map>.nii.gz   (permutation_maps)
        group_level/group_stat-errorts.nii.gz              (residuals=True)

    with ``<map>`` one of nilearn's permutation outputs without underscores:
    ``logpmaxt`` always, ``tfce``/``logpmaxtfce`` with ``tfce``,
    ``size``/``logpmaxsize``/``mass``/``logpmaxmass`` with ``threshold``.

    The corrected maps are the z map thresholded, within the model's mask,
    by :func:`chunkglm.glm.thresholding.threshold_stats_img` (nilearn's
    semantics) with ``height_control="fdr"`` and ``"bonferroni"``: voxels
    below the threshold are 0. With permutation maps the FWE map of a t
    contrast keeps the z values of the voxels whose max-T FWE p-value is
    below ``alpha`` (then ``cluster_threshold`` applies as for the others).

    The sidecar holds ``AnalysisLevel`` ("group_level"), ``Model`` (Type,
    Estimator, Regressors, NumberOfMaps, SmoothingFWHM), ``Contrasts``
    (label -> Name, Description, Weights, Type), ``Corrections``
    (TwoSided, ClusterThreshold, and for FDR and FWE: Method, Alpha and
    the z Thresholds per label, null where no voxel can pass) and
    ``Software`` (Name, Version). Nothing is left in ``out_dir`` after an
    error.

    Surface models write each map in the inputs' format: one GIFTI file per
    hemisphere with the hemi entity after ``group``
    (``group_level/group_hemi-L_contrast-<C>_stat-z.func.gii``, the mask uint8) or one
    CIFTI dense scalar file (``group_level/group_contrast-<C>_stat-z.dscalar.nii``);
    clusters of the corrected maps are formed on each hemisphere's mesh, never on
    CIFTI grayordinates (``cluster_threshold`` > 0 refused there). A mesh model's sidecar
    adds ``VertexCount`` and ``Space`` (the fsaverage mesh nilearn ships whose faces the
    maps' mesh has; left out for another mesh): readers draw the GIFTI maps on it.
    """
    if not _is_second_level(model):
        raise TypeError(f"expected a SecondLevelModel; received {type(model).__name__} (for a "
                        "first-level model use save_glm_derivatives).")
    _check_second_level(model)
    check_correction_options(alpha, two_sided, cluster_threshold)
    if residuals and model.minimize_memory:
        raise InputError("residuals=True needs the residuals the fit keeps: fit the SecondLevelModel with "
                         "minimize_memory=False; nothing was written.")
    specs = contrast_specs(contrasts, contrast_types, [model.design_matrix_])
    settings, tested = permutation_inputs(specs, permutation_maps, permutation, two_sided)
    names = group_derivative_names(specs, permutation_maps=settings["maps"] if settings else ())
    with StagedOutput(out_dir) as out:
        write_description(out, "second")
        thresholds = {"fdr": {}, "fwe": {}}
        for spec in specs:
            maps = model.compute_contrast(spec.definition, first_level_contrast=first_level_contrast,
                                          second_level_stat_type=spec.stat_type, output_type="all")
            logp = None
            if spec.label in tested:
                for key in settings["maps"]:
                    _save_group_map(tested[spec.label][key], names["maps"][spec.label][key], out)
                logp = tested[spec.label]["logp_max_t"]
            found = _write_group_maps(model, maps, names["maps"][spec.label],
                                      (alpha, two_sided, cluster_threshold), out, logp)
            for key, value in found.items():
                thresholds[key][spec.glm_label] = value
        corrections = {"TwoSided": bool(two_sided), "ClusterThreshold": cluster_threshold,
                       "FDR": {"Method": "fdr", "Alpha": alpha, "Thresholds": thresholds["fdr"]},
                       "FWE": fwe_metadata(alpha, thresholds["fwe"], specs, tested, settings)}
        model.design_matrix_.to_csv(out.path(names["design"]), sep="\t", index=False)
        if is_surface_image(model.mask_img_):
            save_surface_map(mask_output(model), names["mask"], "group", out, np.uint8)
        else:
            save_image(model.mask_img_, out.path(names["mask"]))
        metadata = group_metadata(model, specs, corrections, descriptions)
        if is_surface_image(model.mask_img_):  # the mesh's space, for readers of the GIFTI maps
            metadata.update(space_metadata(model.mask_img_))
        write_json(out.path(names["sidecar"]), metadata)
        if residuals:  # of the last contrast's fit, as nilearn's residuals_
            _save_group_map(model.residuals_, "group_level/group_stat-errorts.nii.gz", out)
    return out.written


def permutation_contrasts(model, contrasts, contrast_types=None) -> dict:
    """The t contrasts a permutation test can give the FWE maps of, as contrast vectors.

    Parameters
    ----------
    model : chunkglm.glm.second_level.SecondLevelModel
        Fitted.
    contrasts, contrast_types
        As for :func:`save_group_derivatives` (checked the same way).

    Returns
    -------
    dict
        ``{contrast name: ndarray of shape (n_columns,)}``, the ``con_val``
        of :func:`chunkglm.glm.second_level.permutation_maps`, for every t
        contrast (F contrasts are not permutation-tested, as in nilearn).
    """
    _check_second_level(model)
    specs = contrast_specs(contrasts, contrast_types, [model.design_matrix_])
    return {spec.name: contrast_vector(spec.weights[0], model.design_matrix_)
            for spec in specs if spec.stat_type == "t"}


#: Corrected maps of the group layout: name key -> threshold_stats_img height_control.
CORRECTIONS = {"fdr": "fdr", "fwe": "bonferroni"}
def _write_group_maps(model, maps, outputs, settings, out, logp_max_t=None) -> dict:
    """stat and z maps, then the corrected z maps; returns the z thresholds (None if infinite).

    With ``logp_max_t`` (a permutation test's -log10 FWE p-values), the FWE map keeps
    the voxels where it exceeds -log10(alpha) and its threshold entry is that logp.
    """
    alpha, two_sided, cluster_threshold = settings
    _save_group_map(maps["stat"], outputs["stat"], out)
    _save_group_map(maps["z_score"], outputs["z_score"], out)
    found = {}
    for key, height_control in CORRECTIONS.items():
        if key == "fwe" and logp_max_t is not None:
            image = permutation_fwe_map(maps["z_score"], logp_max_t, alpha, cluster_threshold)
            _save_group_map(image, outputs[key], out)
            found[key] = -math.log10(alpha)
            continue
        image, threshold = threshold_stats_img(
            maps["z_score"], mask_img=model.mask_img_, alpha=alpha, height_control=height_control,
            cluster_threshold=cluster_threshold, two_sided=two_sided)
        _save_group_map(image, outputs[key], out)
        threshold = float(threshold)
        found[key] = threshold if math.isfinite(threshold) else None
    return found


def _save_group_map(image, name, out) -> None:
    """A group_level map: NIfTI, or its surface format (GIFTI per hemisphere, ``group_hemi-L_...``; CIFTI)."""
    if is_surface_image(image):
        save_surface_map(image, name, "group", out)
    else:
        save_image(image, out.path(name))


def permutation_fwe_map(z_img, logp_img, alpha, cluster_threshold=0):
    """The z map where the max-T FWE p-value is below ``alpha`` (0 elsewhere), small clusters removed.

    Parameters
    ----------
    z_img, logp_img : nibabel.Nifti1Image
        A contrast's z map and the -log10 max-T FWE p-values of its permutation test (same grid).
    alpha : float
        Family-wise error rate: voxels with -log10 p > -log10(alpha) are kept.
    cluster_threshold : int, default=0
        Clusters smaller than this many voxels are removed.

    Returns
    -------
    nibabel.Nifti1Image
        float32 (a SurfaceImage or CIFTI image for surface maps: clusters on each hemisphere's mesh,
        none on CIFTI grayordinates).
    """
    if is_surface_image(z_img):
        return permutation_fwe_surface(z_img, logp_img, alpha, cluster_threshold)
    z = np.asarray(z_img.dataobj, dtype=np.float32)
    logp = np.asarray(logp_img.dataobj, dtype=np.float64)
    kept = np.where(logp > -math.log10(alpha), z, 0).astype(np.float32)
    if cluster_threshold > 0:
        kept = apply_cluster_extent(kept, cluster_threshold)
    return nib.Nifti1Image(kept, z_img.affine, z_img.header)


def check_correction_options(alpha, two_sided, cluster_threshold) -> None:
    """Check :func:`save_group_derivatives`' ``alpha``, ``two_sided`` and ``cluster_threshold``.

    For callers that run a long permutation test first: they fail before it.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise InputError(f"alpha must be a number in (0, 1); received {alpha!r}.")
    if not isinstance(two_sided, bool):
        raise InputError(f"two_sided must be True or False; received {two_sided!r}.")
    if isinstance(cluster_threshold, bool) or not isinstance(cluster_threshold, int | float) \
            or cluster_threshold < 0:
        raise InputError(f"cluster_threshold must be a number >= 0 (voxels); received "
                         f"{cluster_threshold!r}.")
