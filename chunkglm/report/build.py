"""Reports of GLM and meta-analysis results, from fitted objects or from derivatives.

One page layout for every kind of result; what differs is where the pieces
come from. :func:`glm_report` takes plain pieces (parameters, design
matrices, contrast weights, z maps, mask, provenance record) so that a
fitted model (``FirstLevelModel.generate_report``...) and a derivatives
folder read back from disk (:mod:`chunkglm.report.from_derivatives`) give the
same page for the same results.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.stats import norm

from chunkglm.errors import InputError
from chunkglm.graph.evaluate import active_client
from chunkglm.provenance import Stopwatch, cluster_summary, record
from chunkglm.report.descriptions import group_model_parameters, model_parameters, repetition_times
from chunkglm.report.document import HEIGHT_DEFAULT, WIDTH_DEFAULT, HTMLReport
from chunkglm.report.figures import (
    contrast_matrix_figure,
    design_matrix_correlation_figure,
    design_matrix_figure,
)
from chunkglm.report.methods import first_level_methods, second_level_methods
from chunkglm.report import surface
from chunkglm.report.sections import (
    Block,
    Correction,
    Panel,
    ReportOptions,
    Section,
    corrected_map_blocks,
    figure_png,
    file_figure,
    mask_block,
    parameters_section,
    png_figure,
    provenance_section,
    render,
    stat_map_blocks,
    table_html,
)

#: Units nilearn appends to parameter names in its reports.
UNITS = {"t_r": "t_r (seconds)", "high_pass": "high_pass (Hertz)", "smoothing_fwhm": "smoothing_fwhm (mm)"}


@dataclass
class Design:
    """One design matrix to show: its label and its values, a saved figure (PNG bytes) or a figure file."""

    label: str
    matrix: pd.DataFrame | None = None
    png: bytes | None = None
    #: figure files beside the page (relative paths or absolute): the design and its correlations
    src: str | None = None
    correlation_src: str | None = None


@dataclass
class GLMPieces:
    """Everything a GLM report shows, however it was obtained."""

    model_type: str
    parameters: dict
    designs: list[Design]
    #: contrast name -> weights per design (None where the weights are unknown)
    contrasts: dict[str, list]
    #: contrast name -> z map (nibabel image)
    stat_maps: dict
    mask_img: object = None
    inputs: dict = field(default_factory=dict)
    provenance: dict | None = None
    #: name -> (corrected map, its :class:`~chunkglm.report.sections.Correction`)
    corrected_maps: dict = field(default_factory=dict)
    #: contrast name -> the figure file of its weights for each design (instead of drawing them)
    contrast_srcs: dict = field(default_factory=dict)
    #: the subject label (without ``sub-``) of a first-level result, and its other entities (task, session...)
    subject: str | None = None
    entities: dict = field(default_factory=dict)
    #: second level: the first-level contrast modelled, if known
    first_level_contrast: str | None = None

    def label(self) -> str:
        """"sub-01 task-main" (the entities known), "" when none is."""
        parts = [f"sub-{self.subject}"] if self.subject else []
        return " ".join(parts + [f"{key}-{value}" for key, value in self.entities.items() if value])

    def methods(self, options: ReportOptions) -> str:
        """The methods paragraph (:mod:`chunkglm.report.methods`)."""
        contrasts = list(self.stat_maps) or list(self.contrasts)
        if self.model_type == "First Level Model":
            scans = [len(d.matrix) for d in self.designs if d.matrix is not None]
            return first_level_methods(self.parameters, scans, contrasts, options, self.subject)
        design = self.designs[0].matrix if self.designs and self.designs[0].matrix is not None else None
        regressors = [str(c) for c in design.columns] if design is not None else self.inputs.get("Regressors") or []
        n_maps = len(design) if design is not None else self.inputs.get("Maps")
        return second_level_methods(n_maps, regressors, contrasts, options,
                                    [correction for _, correction in self.corrected_maps.values()],
                                    self.first_level_contrast, self.parameters.get("smoothing_fwhm"))


def glm_report(pieces: GLMPieces, options: ReportOptions, title=None, report_dims=None) -> HTMLReport:
    """The page of a first- or second-level GLM (nilearn's report sections, plus provenance).

    The sections are nilearn's, with its ids: model details, the design
    matrices and contrast weights of each run (a carousel when there are
    several runs), the mask, the statistical maps; then chunkglm's
    provenance record. An unfitted model's page has the parameters only,
    and says that there is no mask and no statistical map.
    """
    names = list(pieces.stat_maps) or list(pieces.contrasts)
    label = pieces.label()
    if title is None:  # the subject first: it is what tells the browser's tabs apart
        title = f"{label + ' · ' if label else ''}{pieces.model_type}{': ' + ', '.join(names) if names else ''}"
    details = [Block(heading="Inputs", tables=[table_html(pieces.inputs, header=False)])] if pieces.inputs else []
    if pieces.designs:
        details.append(Block(heading="Methods", text=pieces.methods(options)))
    sections = [parameters_section("Model details", _with_units(pieces.parameters), details)]
    if pieces.designs:
        sections.append(Section("runs", "Design matrices and contrasts", panels=_run_panels(pieces)))
    if pieces.mask_img is not None:
        sections.append(Section("mask", "Mask", [_mask_block(pieces.mask_img, options)]))
    else:
        sections.append(Section("mask", "Mask", [Block(text="No mask was provided.", text_class="note")]))
    sections.append(_stat_maps_section(pieces.stat_maps, pieces.mask_img, options, pieces.corrected_maps,
                                       fitted=bool(pieces.designs)))
    sections.append(provenance_section(pieces.provenance))
    page = render(title=title, model_type=pieces.model_type, subtitle=label, sections=sections,
                  warnings=options.warnings)
    report = HTMLReport(page, title, *(report_dims or (WIDTH_DEFAULT, HEIGHT_DEFAULT)))
    report.findings = findings(sections)
    return report


def _mask_block(mask_img, options: ReportOptions):
    if surface.is_surface(mask_img):
        return surface.mask_block(mask_img, options, "The vertices analysed, on the mesh")
    return mask_block(mask_img, options, "The voxels analysed, over the background image")


def findings(sections) -> dict:
    """Each map's outcome on the page: its heading -> "no voxel survives" (vertex, grayordinate for surface
    maps) or its cluster count."""
    out = {}
    for section in sections:
        if section.anchor != "statistical-maps":
            continue
        heading = None
        for block in section.blocks:
            if block.heading:
                heading = block.heading
            if heading is None:
                continue
            if "no-survivor" in block.text_class:
                element = next((kind for kind in ("vertex", "grayordinate") if f"no {kind} survives" in block.text),
                               "voxel")
                out[heading] = f"no {element} survives"
            elif block.text.endswith(("peaks and subpeaks in mm (world coordinates).", surface.CLUSTERS_TAIL)) \
                    or surface.GRAYORDINATES_SURVIVE in block.text:
                out[heading] = block.text.split(";", 1)[0]
    return out


def _with_units(parameters: dict) -> dict:
    return {UNITS.get(key, key): value for key, value in parameters.items()}


def _run_panels(pieces: GLMPieces) -> list[Panel]:
    """One panel per design (run): its design matrix, its correlations, its contrasts' weights."""
    panels = []
    for index, design in enumerate(pieces.designs):
        contrasts = Section("contrasts", "Contrasts", _contrast_blocks(pieces, index, design),
                            nav_id="navbar-contrasts-link", in_nav=bool(pieces.contrasts))
        panels.append(Panel(design.label, [
            Section("design-matrix", "Design matrix", [_design_block(design)], nav_id="navbar-matrix-link"),
            contrasts]))
    return panels


def _design_block(design: Design) -> Block:
    if design.src is not None:
        figures = [file_figure(design.src, f"Design matrix {design.label}")]
        if design.correlation_src is not None:
            figures.append(file_figure(design.correlation_src, f"Correlations of the regressors of {design.label}"))
        return Block(figures=figures)
    if design.matrix is None:
        return Block(figures=[png_figure(design.png, f"Design matrix {design.label}", "as saved")])
    figures = [figure_png(design_matrix_figure(design.matrix), f"Design matrix {design.label}",
                          f"{design.matrix.shape[0]} rows × {design.matrix.shape[1]} regressors")]
    correlation = design_matrix_correlation_figure(design.matrix)
    if correlation is not None:
        figures.append(figure_png(correlation, f"Correlations of the regressors of {design.label}",
                                  "correlations between regressors (drifts and constant left out)"))
    return Block(figures=figures)


def _contrast_blocks(pieces: GLMPieces, index: int, design: Design) -> list[Block]:
    if not pieces.contrasts:
        return [Block(text="No contrast was provided.", text_class="note")]
    blocks = []
    for name, per_design in pieces.contrasts.items():
        srcs = pieces.contrast_srcs.get(name)
        if srcs is not None:
            blocks.append(Block(heading=name, figures=[file_figure(srcs[index], f"Weights of contrast {name}")]))
            continue
        weights = per_design[index] if index < len(per_design) else None
        if weights is None or design.matrix is None:
            text = f"weights: {np.asarray(weights).tolist()}" if weights is not None else ""
            blocks.append(Block(heading=name, text=text))
            continue
        blocks.append(Block(heading=name, figures=[figure_png(contrast_matrix_figure(weights, design.matrix, name),
                                                              f"Weights of contrast {name}")]))
    return blocks


def _stat_maps_section(stat_maps: dict, mask_img, options: ReportOptions, corrected=None,
                       fitted=True) -> Section:
    if not stat_maps and not corrected:
        hint = " Pass contrasts=... to see them." if fitted else " Fit the model, then pass contrasts=..."
        return Section("statistical-maps", "Statistical maps", [Block(
            text="No statistical map was provided." + hint, text_class="note")], in_nav=False)
    blocks = [block for name, img in stat_maps.items()
              for block in (surface.stat_map_blocks if surface.is_surface(img) else stat_map_blocks)(
                  name, img, mask_img, options)]
    for name, (img, correction) in (corrected or {}).items():
        draw = surface.corrected_map_blocks if surface.is_surface(img) else corrected_map_blocks
        blocks += draw(name, img, mask_img, options, correction)
    intro = (f"Thresholded with height_control={options.height_control!r}, α = {options.alpha:g}"
             if options.height_control else f"Thresholded at z = {options.threshold:g}")
    intro += f", clusters of at least {options.cluster_threshold} voxels." if options.cluster_threshold else "."
    if corrected:
        intro = ("Uncorrected maps: " + intro[0].lower() + intro[1:] + " Corrected maps: each at the α of its "
                 "correction (stated with it), showing every voxel that survives it.")
    return Section("statistical-maps", "Statistical maps", blocks, intro=intro)


def contrast_dict(contrasts) -> dict:
    """nilearn's coercion of ``contrasts``: a name (or formula), weights, or lists/dicts of them."""
    if contrasts is None:
        return {}
    if isinstance(contrasts, dict):
        items = list(contrasts.items())
    elif isinstance(contrasts, str | np.ndarray):
        items = [(_name(contrasts), contrasts)]
    elif isinstance(contrasts, list | tuple):
        if contrasts and all(isinstance(v, numbers.Real) for v in contrasts):
            items = [(_name(np.asarray(contrasts)), np.asarray(contrasts))]
        else:
            items = [(_name(c), c) for c in contrasts]
    else:
        raise InputError(f"contrasts must be a dict of name -> definition, a name or formula, weights, or a "
                         f"list of them; received {type(contrasts).__name__}.")
    for name, _ in items:
        if not isinstance(name, str):
            raise InputError(f"contrast names must be strings; received {name!r}.")
    return dict(items)


def _name(definition) -> str:
    return definition if isinstance(definition, str) else str(np.asarray(definition).tolist())


# -- fitted objects ---------------------------------------------------------------------


def _record(operation, inputs, options, stopwatch) -> dict:
    return record(operation, inputs=inputs, options=options, cluster=cluster_summary(active_client()),
                  stopwatch=stopwatch, note="computed in memory for this report; wall time: computing its maps")


def first_level_pieces(model, contrasts, stat_maps=None) -> GLMPieces:
    """A fitted :class:`~chunkglm.glm.first_level.FirstLevelModel`'s pieces (its z maps computed unless given)."""
    definitions = contrast_dict(contrasts)
    designs = model.design_matrices_
    labels = _run_labels(model)
    if stat_maps is None:
        weights = {name: [np.asarray(w) for w in model._contrast_vectors(definition)]
                   for name, definition in definitions.items()}
        stat_maps = {name: model.compute_contrast(definition, output_type="z_score")
                     for name, definition in definitions.items()}
    else:  # save_glm_to_bids: the weights were drawn into the files the page links (and said their warnings)
        weights = {name: [None] * len(designs) for name in definitions}
    t_r = repetition_times(model)[0]
    inputs = {"Runs": len(designs), "Scans per run": [len(d) for d in designs], **mask_count(model.mask_img_)}
    if labels:
        inputs["Run names"] = labels
    pieces = GLMPieces("First Level Model", model_parameters(model, t_r),
                       [Design(label, d) for label, d in zip(labels or [f"run {i + 1}" for i in range(len(designs))],
                                                             designs)],
                       weights, stat_maps, model.mask_img_, inputs)
    subject = getattr(model, "subject_label", None)
    pieces.subject = str(subject) if subject is not None else None
    pieces.entities = shared_entities(getattr(model, "run_entities_", None) or [])
    return pieces


def shared_entities(run_entities) -> dict:
    """The session and task every run shares (``{"ses": "1", "task": "main"}``), for the page's label."""
    shared = {}
    for key in ("ses", "task"):
        values = {str((entities or {}).get(key)) for entities in run_entities if (entities or {}).get(key)}
        if len(values) == 1 and all((entities or {}).get(key) for entities in run_entities):
            shared[key] = values.pop()
    return shared


def _run_labels(model) -> list[str]:
    names = getattr(model, "_run_names", None)
    return [str(n) for n in names] if names else []


def second_level_pieces(model, contrasts, first_level_contrast=None, stat_maps=None) -> GLMPieces:
    """A fitted :class:`~chunkglm.glm.second_level.SecondLevelModel`'s pieces (its z maps computed unless given)."""
    design = model.design_matrix_
    definitions = contrast_dict(contrasts)
    weights = {name: [model._contrast_vector(definition)] for name, definition in definitions.items()}
    if stat_maps is None:
        stat_maps = {name: model.compute_contrast(definition, first_level_contrast=first_level_contrast,
                                                  output_type="z_score")
                     for name, definition in definitions.items()}
    inputs = {"Maps": int(len(design)), **(mask_count(model.mask_img_) if surface.is_surface(model.mask_img_)
                                           else {"Voxels in the mask": int(model.n_elements_)})}
    if first_level_contrast is not None:
        inputs["First-level contrast"] = _name(first_level_contrast)
    pieces = GLMPieces("Second Level Model", group_model_parameters(model) or {"smoothing_fwhm": None},
                       [Design("group design", design)], weights, stat_maps, model.mask_img_, inputs)
    pieces.first_level_contrast = _name(first_level_contrast) if first_level_contrast is not None else None
    return pieces


def mask_count(mask_img) -> dict:
    """``{"Voxels in the mask": n}`` (``Vertices``, ``Grayordinates`` for surface and CIFTI masks)."""
    if surface.is_surface(mask_img):
        n_kept, _, kind = surface.element_count(mask_img)
        return {f"{kind.capitalize()} in the mask": n_kept}
    return {"Voxels in the mask": int(np.count_nonzero(np.asanyarray(mask_img.dataobj)))}


def unfitted_pieces(model) -> GLMPieces:
    """An unfitted model's pieces: its parameters only (nilearn's "empty" report)."""
    first = model._is_first_level_glm()
    keys = (("subject_label", "drift_model", "hrf_model", "noise_model", "t_r", "signal_scaling",
             "smoothing_fwhm", "slice_time_ref", "target_shape", "target_affine") if first
            else ("smoothing_fwhm", "target_affine", "target_shape"))
    parameters = {key: getattr(model, key, None) for key in keys}
    parameters = {key: (np.asarray(value).tolist() if isinstance(value, np.ndarray | tuple) else value)
                  for key, value in parameters.items() if value is not None}
    return GLMPieces("First Level Model" if first else "Second Level Model", parameters, [], {}, {})


def _saved_report(model, contrasts, saved):
    """(contrasts, saved results) of the last ``save_glm_to_bids`` of this fit, if any.

    nilearn: ``generate_report()`` without contrasts after ``save_glm_to_bids``
    shows the contrasts saved, from the files written (figures linked by
    their absolute paths, z maps read back).
    """
    memo = getattr(model, "_saved_bids_report", None)
    current = model.design_matrices_ if model._is_first_level_glm() else model.design_matrix_
    if memo is None or memo["design_matrices"] is not current:
        return contrasts, saved
    return memo["contrasts"], memo["saved"]


#: nilearn's words for a report of an unfitted model (a UserWarning and on the page).
UNFITTED_MESSAGE = "This estimator has not been fit yet. Make sure to run `fit` before inspecting reports."
#: nilearn's words when no contrast is given for a fitted model.
NO_CONTRAST_MESSAGE = "No contrast passed during report generation."


@dataclass
class SavedResults:
    """What ``save_glm_to_bids`` computed and wrote that its report page shows instead of redoing it.

    ``stat_maps``: contrast name -> z map; ``design_srcs``: per design, its
    figure file and its correlation figure file (or None), relative to the
    page; ``contrast_srcs``: contrast name -> its weights figure file per design.
    """

    stat_maps: dict
    design_srcs: list
    contrast_srcs: dict


def model_report(model, contrasts=None, first_level_contrast=None, title=None, report_dims=None,
                 saved: SavedResults | None = None, **options) -> HTMLReport:
    """``generate_report`` of the GLM models (see their docstrings).

    nilearn 0.14's behaviour: options are checked first (ValueError with
    nilearn's words); each adjustment of the options (``threshold`` unused
    with a ``height_control``, ``cut_coords`` with a glass brain,
    ``first_level_contrast`` at the first level), a missing contrast and an
    unfitted model are said once as a UserWarning and on the page; with
    ``height_control=None`` and the 3.09 threshold, nilearn's FutureWarning
    about its next default. An unfitted model gives a page of its
    parameters instead of an error. With ``saved`` (``save_glm_to_bids``),
    the z maps are those already computed and the figures are the files
    written beside the page; without contrasts after a ``save_glm_to_bids``
    of this fit, the page shows the contrasts saved, from its files
    (nilearn's behaviour; "No contrast passed" is still said, as nilearn).
    """
    checked = ReportOptions.checked(**options)
    notes = list(checked.warnings)
    watch = Stopwatch()
    first_level = model._is_first_level_glm()
    if first_level and first_level_contrast is not None:
        notes.insert(0, "'first_level_contrast' is ignored for FirstLevelModel. Setting first_level_contrast=None.")
        first_level_contrast = None
    if checked.height_control is None and checked.threshold == 3.09:
        warnings.warn("From nilearn version>=0.15, the default 'threshold' will be set to 3.090232306167813 "
                      "(nilearn's DEFAULT_Z_THRESHOLD, norm.isf(0.001)); chunkglm follows nilearn: pass "
                      "threshold= explicitly to keep a value.", FutureWarning, stacklevel=3)
    if not model.__sklearn_is_fitted__():
        notes.append(UNFITTED_MESSAGE)
        pieces = unfitted_pieces(model)
        operation = "report: unfitted GLM"
    else:
        if surface.is_surface(model.mask_img_):  # nilearn's refusal of a volume background, before any map
            surface.check_background(options.get("bg_img"))
        if contrasts is None:
            notes.append(NO_CONTRAST_MESSAGE)
            contrasts, saved = _saved_report(model, contrasts, saved)
        stat_maps = saved.stat_maps if saved is not None else None
        if first_level:
            pieces = first_level_pieces(model, contrasts, stat_maps)
            operation = "report: first-level GLM"
        else:
            pieces = second_level_pieces(model, contrasts, first_level_contrast, stat_maps)
            operation = "report: second-level GLM"
        if saved is not None:
            for design, (src, correlation_src) in zip(pieces.designs, saved.design_srcs):
                design.src, design.correlation_src = src, correlation_src
            pieces.contrast_srcs = dict(saved.contrast_srcs)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    checked = replace(checked, warnings=tuple(notes))
    inputs = [{"design": d.label, "rows": int(len(d.matrix))} for d in pieces.designs]
    pieces.provenance = _record(operation, inputs, pieces.parameters, watch)
    report = glm_report(pieces, checked, title, report_dims)
    report.provenance = pieces.provenance
    return report


def meta_pieces(result, maps=None) -> tuple[dict, dict, dict]:
    """(parameters, inputs, z maps) of a :class:`~chunkglm.meta.results.MetaResult`."""
    available = result.maps
    names = list(maps) if maps is not None else [n for n in available if n == "z" or n.startswith("z_")]
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(f"maps {missing} are not in this result; it has {sorted(available)}.")
    if not names:
        raise InputError(f"this result has no z map to show; pass maps=[...] among {sorted(available)}.")
    estimator = result.estimator
    parameters = {"estimator": type(estimator).__name__, **estimator_parameters(estimator.get_params())}
    if result.corrector is not None:
        parameters["corrector"] = f"{type(result.corrector).__name__}(method={result.corrector.method!r})"
    described = result._inputs.describe()
    inputs = {"Images": described.get("n_images"), "Variables": described.get("variables"),
              "Voxels analysed": int(np.count_nonzero(np.asanyarray(result._inputs.mask_img().dataobj))),
              "Maps computed": sorted(available)}
    return parameters, inputs, {name: result.get_map(name) for name in names}


#: Estimator parameters that say how chunkglm computes, not what: left out of the page's estimator
#: table (NiMARE's caching, chunkglm's store and chunk sizes, the description switch). The provenance
#: section keeps the options of the command that ran.
EXECUTION_PARAMETERS = frozenset({"memory", "memory_level", "store", "chunk_voxels", "chunk_bytes",
                                  "generate_description", "n_cores"})


def estimator_parameters(parameters: dict) -> dict:
    """An estimator's statistical parameters: ``get_params()`` without :data:`EXECUTION_PARAMETERS`."""
    return {key: value for key, value in parameters.items() if key not in EXECUTION_PARAMETERS}


def meta_correction(name: str, alpha) -> Correction | None:
    """The correction of one of NiMARE's map names (``z_corr-FDR_method-indep``); None for others."""
    if "_corr-" not in name:
        return None
    entities = dict(part.split("-", 1) for part in name.split("_") if "-" in part)
    alpha = alpha or 0.05
    return Correction(entities.get("corr", "corrected"), entities.get("method"), alpha, float(norm.isf(alpha / 2)))


def meta_report(parameters, inputs, stat_maps, mask_img, options: ReportOptions, provenance,
                title=None, report_dims=None, description="", corrected_alpha=0.05) -> HTMLReport:
    """The page of an image-based meta-analysis.

    NiMARE's corrected z maps (``z_corr-…``) are the z of the corrected
    p-values (signed), not thresholded maps: they are shown above
    ``norm.isf(corrected_alpha / 2)``, i.e. where the corrected p < alpha,
    with the correction's settings (not the report's thresholding options).
    """
    estimator = parameters.get("estimator", "IBMA")
    title = title or f"Image-based meta-analysis: {estimator}"
    blocks = [Block(heading="Inputs", tables=[table_html(inputs, header=False)])]
    if description:
        blocks.append(Block(heading="Methods", text=description))
    sections = [parameters_section("Estimator", estimator_parameters(parameters), blocks),
                Section("mask", "Mask", [mask_block(mask_img, options, "The voxels analysed")])]
    maps_blocks, corrections = [], []
    for name, img in stat_maps.items():
        correction = meta_correction(name, corrected_alpha)
        if correction is None:
            maps_blocks += stat_map_blocks(name, img, mask_img, options)
        else:
            corrections.append(correction)
            maps_blocks += corrected_map_blocks(name, img, mask_img, options, correction)
    intro = "Uncorrected maps: the z map thresholded as asked."
    if corrections:
        intro += (f" Corrected maps (z of the corrected p-values, NiMARE's z_corr-…): the voxels where the corrected "
                  f"p < {corrections[0].alpha:g} (|z| > {corrections[0].z_threshold:.3f}).")
    sections.append(Section("statistical-maps", "Statistical maps", maps_blocks, intro=intro))
    sections.append(provenance_section(provenance))
    page = render(title=title, model_type=f"Image-based meta-analysis ({estimator})", sections=sections,
                  warnings=options.warnings)
    report = HTMLReport(page, title, *(report_dims or (WIDTH_DEFAULT, HEIGHT_DEFAULT)))
    report.findings = findings(sections)
    return report


def result_report(result, maps=None, title=None, report_dims=None, **options) -> HTMLReport:
    """``MetaResult.generate_report`` (see its docstring)."""
    checked = ReportOptions.checked(**options)
    watch = Stopwatch()
    parameters, inputs, stat_maps = meta_pieces(result, maps)
    provenance = _record("report: image-based meta-analysis",
                         [{"images": inputs["Images"], "variables": inputs["Variables"]}], parameters, watch)
    report = meta_report(parameters, inputs, stat_maps, result._inputs.mask_img(), checked, provenance,
                         title, report_dims, getattr(result, "description_", ""),
                         getattr(result.corrector, "alpha", None) or 0.05)
    report.provenance = provenance
    return report
