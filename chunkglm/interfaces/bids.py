"""Save a fitted first-level GLM as BIDS-like derivatives.

Two layouts:

- :func:`save_glm_to_bids`: nilearn's ``save_glm_to_bids`` file set and
  file names (``sub-XX/...contrast-<label>_stat-<t|F|z|p|effect|variance>
  _statmap.nii.gz``, design matrices, figures, cluster tables, ...);
- :func:`save_glm_derivatives`: the ``derivatives/glm`` layout
  (``first_level/sub-XX/sub-XX_task-T_contrast-C_stat-{t,z,effect}.nii.gz``
  with one JSON sidecar per model).

Both write all files into a temporary folder beside ``out_dir`` and move
them into ``out_dir`` only once every file is written: after an error,
``out_dir`` is exactly as before.
"""

from __future__ import annotations

import string

from chunkglm.errors import InputError
from chunkglm.interfaces._bids_files import (
    cluster_options,
    clusters,
    confound_names,
    contrast_specs,
    dataset_description,
    derivatives_metadata,
    mask_image,
    model_parameters,
    repetition_times,
    run_entities,
    write_json,
)
from chunkglm.interfaces._bids_names import (
    MAP_STATS,
    bids_filename,
    check_paths,
    check_prefix,
    plan_bids_names,
)
from chunkglm.interfaces._staging import StagedOutput
from chunkglm.io.nifti import save_image
from chunkglm.report.figures import (
    FIGURE_FORMATS,
    contrast_matrix_figure,
    design_matrix_correlation_figure,
    design_matrix_figure,
    save_figure,
)

__all__ = ["save_glm_to_bids", "save_glm_derivatives"]

#: Maps of the derivatives/glm layout: output key -> stat label (None: t or F).
DERIVATIVE_STATS = {"stat": None, "z_score": "z", "effect_size": "effect"}


def save_glm_to_bids(model, contrasts, contrast_types=None, out_dir=".", prefix=None, **kwargs):
    """Save GLM results to BIDS-like files, as :func:`nilearn.glm.save_glm_to_bids`.

    Parameters
    ----------
    model : chunkglm.glm.first_level.FirstLevelModel
        A fitted first-level model.
    contrasts : str, array-like, list of them, or dict
        A formula (``"a - b"``), weights (1-D: t, 2-D: F), a list of these,
        or a dict ``{name: formula or weights}``. Without a dict, each
        contrast is named after its definition (nilearn's rule). Names
        become ``contrast-<label>`` entities with nilearn's camelCase
        conversion (``"a - b"`` -> ``aMinusB``), keeping ASCII letters and
        digits only.
    contrast_types : dict, optional
        ``{name: "t" or "F"}`` for some contrasts; default t for formulas
        and 1-D weights, F for 2-D weights. Used to compute the maps too
        (nilearn only uses it in the file name).
    out_dir : str or Path, default="."
        Output folder; created if needed. Existing files of the same names
        are replaced; other files are left alone.
    prefix : str, optional
        Prepended (with ``_``) to the file names. When None and the model
        knows the BIDS entities of its inputs (``model.run_entities_``:
        runs of a cohort store, or NIfTI files with BIDS names), names are
        built from them
        (``sub-01_task-main_run-1_space-X_...``) in a ``sub-<label>``
        folder, as nilearn does for inputs given as file names. ``""``
        turns that off. A prefix starting with ``sub-<label>_`` also puts
        the files in a ``sub-<label>`` folder.
    **kwargs
        nilearn's report options that shape the cluster tables:
        ``threshold``, ``alpha`` (0.001), ``height_control`` ("fpr"),
        ``cluster_threshold`` (0), ``two_sided`` (False), ``min_distance``
        (8.0), with the semantics of nilearn's GLM report: the z map is
        thresholded within the mask by
        :func:`nilearn.glm.threshold_stats_img` and tabulated by
        :func:`nilearn.reporting.get_clusters_table`, both with
        ``two_sided`` (nilearn's ``save_glm_to_bids`` always thresholds
        two-sided: pass ``two_sided=True`` for its 3.29 default
        threshold). ``title``, ``bg_img``, ``plot_type``, ``cut_coords``,
        ``display_mode``, ``report_dims``, ``first_level_contrast`` are
        accepted for compatibility and ignored with a warning (no HTML
        report is written).

    Returns
    -------
    list of pathlib.Path
        Every file written, in ``out_dir``, in writing order.

    Raises
    ------
    InputError
        Invalid contrast (unknown column, wrong number of weights, null),
        unsafe or colliding contrast name (``"../x"``, ``"a/b"``, ``""``,
        two names with one label), unsafe prefix, invalid option, or an
        output path that is a folder. Found before anything is written.
    TypeError
        A model that is not a first-level model, a contrast name that is
        not a string.

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

    Differences from nilearn 0.14: no ``report.html``; figures also as SVG;
    cluster tables from the z map (nilearn thresholds the variance map),
    thresholded as nilearn's report does (``two_sided`` for both steps,
    within the mask); maps are float32; ``stat-errorts`` and
    ``stat-rsquared`` are written whatever ``minimize_memory``;
    ``contrast_types`` also sets the statistic computed; on error nothing
    is left; contrast names are refused rather than changed when they hold
    path separators or no letter or digit; the written paths are returned
    (nilearn returns the model).

    Examples
    --------
    >>> run = chunkglm.open_cohort("cohort.zarr").runs["sub-01_task-main_run-1"]  # doctest: +SKIP
    >>> model = FirstLevelModel(slice_time_ref=0.5).fit(run)  # doctest: +SKIP
    >>> paths = save_glm_to_bids(model, "a - b", out_dir="results",
    ...                          prefix="sub-01_task-main")  # doctest: +SKIP
    >>> [str(p.relative_to("results")) for p in paths if "stat-z" in p.name]  # doctest: +SKIP
    ['sub-01/sub-01_task-main_contrast-aMinusB_stat-z_statmap.nii.gz']
    """
    _check_model(model)
    options = cluster_options(kwargs)
    prefix = check_prefix(prefix)
    specs = contrast_specs(contrasts, contrast_types, model.design_matrices_)
    names = plan_bids_names(specs, run_entities(model), len(model.design_matrices_), prefix)
    with StagedOutput(out_dir) as out:
        _write_bids(model, specs, names, options, out)
    return out.written


def _check_model(model) -> None:
    if not hasattr(model, "compute_contrast"):
        raise TypeError(f"expected a fitted FirstLevelModel; received {type(model).__name__}.")
    if getattr(model, "design_matrices_", None) is None:
        raise InputError("the model is not fitted yet: call model.fit(...) first.")


def _write_bids(model, specs, names, options, out) -> None:
    def rel(name):
        return f"{names.folder}/{name}" if names.folder else name

    existing = out.existing("dataset_description.json")
    write_json(out.path("dataset_description.json"), dataset_description(existing))
    t_rs = repetition_times(model)
    write_json(out.path(rel(names.statmap_json)),
               {"Description": "A statistical map generated by chunkglm.",
                "ModelParameters": model_parameters(model, t_rs[0])})
    mask = mask_image(model)
    save_image(mask, out.path(rel(names.mask)))
    for design, run_names, t_r in zip(model.design_matrices_, names.runs, t_rs):
        _write_design(design, run_names, t_r, out, rel)
    for spec in specs:
        _write_contrast(model, spec, names.contrasts[spec.label], mask, options, out, rel)
    _write_model_maps(model, names.runs, out, rel)


def _write_design(design, run_names, t_r, out, rel) -> None:
    design.to_csv(out.path(rel(run_names["design_tsv"])), sep="\t", index=False)
    write_json(out.path(rel(run_names["design_json"])), {"RepetitionTime": t_r})
    _save_figure(design_matrix_figure(design), out, rel(run_names["design_base"]))
    correlation = design_matrix_correlation_figure(design)
    if correlation is not None:
        _save_figure(correlation, out, rel(run_names["corrdesign_base"]))


def _write_contrast(model, spec, outputs, mask, options, out, rel) -> None:
    maps = model.compute_contrast(spec.definition, stat_type=spec.stat_type, output_type="all")
    for key in MAP_STATS:
        save_image(maps[key], out.path(rel(outputs[key])))
    table, details = clusters(maps["z_score"], mask, options)
    table.to_csv(out.path(rel(outputs["clusters_tsv"])), sep="\t", index=False)
    write_json(out.path(rel(outputs["clusters_json"])), details, indent=None)
    for design, base in zip(model.design_matrices_, outputs["design"]):
        _save_figure(contrast_matrix_figure(spec.definition, design, spec.name), out, rel(base))


def _write_model_maps(model, runs, out, rel) -> None:
    """stat-rsquared (from the fit's moments), then stat-errorts (reads the data again)."""
    for run_names, image in zip(runs, model.r_square_):
        save_image(image, out.path(rel(run_names["rsquared"])))
    for run_names, image in zip(runs, model.residuals_):
        save_image(image, out.path(rel(run_names["errorts"])))


def _save_figure(figure, out, base: str) -> None:
    save_figure(figure, [out.path(f"{base}.{fmt}") for fmt in FIGURE_FORMATS])


# -- derivatives/glm layout -------------------------------------------------------


def save_glm_derivatives(model, contrasts, out_dir, *, task_label=None, subject_label=None,
                         session_label=None, contrast_types=None, confounds=None,
                         descriptions=None):
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

    Returns
    -------
    list of pathlib.Path
        Every file written, in writing order.

    Notes
    -----
    Files, with ``<s> = sub-<subject>[_ses-<session>]_task-<task>``::

        dataset_description.json                        (extended if it exists)
        first_level/sub-XX/<s>_contrast-<label>_stat-{t|F,z,effect}.nii.gz
        first_level/sub-XX/<s>[_run-<r>]_design-matrix.png   (run only if several)
        first_level/sub-XX/<s>_glm.json

    The sidecar holds ``AnalysisLevel`` ("first_level"), ``Model`` (Type,
    HRF, DriftModel, HighPassFilter, NoiseModel), ``Regressors`` (design
    columns), ``Contrasts`` (label -> Description, Weights over the
    regressors; one list per run when runs differ), ``Software`` (Name,
    Version) and ``Confounds``. Like :func:`save_glm_to_bids`, nothing is
    left in ``out_dir`` after an error.
    """
    _check_model(model)
    specs = contrast_specs(contrasts, contrast_types, model.design_matrices_)
    entities = _derivative_entities(model, subject_label, session_label, task_label)
    metadata = derivatives_metadata(model, specs, confound_names(model, confounds), descriptions)
    names = _derivative_names(specs, entities, run_entities(model) or [], len(model.design_matrices_))
    with StagedOutput(out_dir) as out:
        _write_derivatives(model, specs, names, metadata, out)
    return out.written


def _write_derivatives(model, specs, names, metadata, out) -> None:
    write_json(out.path("dataset_description.json"),
               dataset_description(out.existing("dataset_description.json")))
    for spec in specs:
        maps = model.compute_contrast(spec.definition, stat_type=spec.stat_type, output_type="all")
        for key, name in names["maps"][spec.label].items():
            save_image(maps[key], out.path(name))
    for design, name in zip(model.design_matrices_, names["designs"]):
        save_figure(design_matrix_figure(design), [out.path(name)])
    write_json(out.path(names["sidecar"]), metadata)


def _derivative_entities(model, subject, session, task) -> dict:
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
            entities[key] = _bids_label(str(label).removeprefix(f"{key}-"), key)
    return entities


def _bids_label(label: str, key: str) -> str:
    if not label or any(c not in string.ascii_letters + string.digits for c in label):
        raise InputError(f"{key} label {label!r} must be letters and digits only (a BIDS label).")
    return label


def _derivative_names(specs, entities, runs, n_runs) -> dict:
    base = f"first_level/sub-{entities['sub']}"
    maps = {spec.label: {key: f"{base}/" + bids_filename(
        {**entities, "contrast": spec.label, "stat": stat or spec.stat_type}, None, "nii.gz")
        for key, stat in DERIVATIVE_STATS.items()} for spec in specs}
    run_labels = [str((runs[i] if i < len(runs) else {}).get("run") or "") for i in range(n_runs)]
    if "" in run_labels or len(set(run_labels)) < n_runs:  # e.g. run-1 of two sessions
        run_labels = [str(i + 1) for i in range(n_runs)]
    designs = [f"{base}/" + bids_filename({**entities, "run": r if n_runs > 1 else None},
                                          "design-matrix", "png") for r in run_labels]
    sidecar = f"{base}/" + bids_filename(entities, "glm", "json")
    names = {"maps": maps, "designs": designs, "sidecar": sidecar}
    check_paths([p for m in maps.values() for p in m.values()] + designs + [sidecar])
    return names

