"""Reports of a derivatives folder written by chunkglm (``chunkglm report DIR``).

Finds every result under ``DIR`` by its sidecar and writes one
self-contained page next to it:

======================================================  ===============================================
sidecar                                                 report
======================================================  ===============================================
``first_level/sub-XX/<s>_glm.json``                     ``first_level/sub-XX/<s>_report.html``
``group_level/group_glm.json``                          ``group_level/group_report.html``
``meta/<Estimator>.json``                               ``meta/<Estimator>_report.html``
======================================================  ===============================================

The pages are those of ``generate_report`` on the fitted objects, built
from the files: the design matrices (``*_design-matrix.tsv``), the contrast
weights of the sidecar, the z maps, the mask, and the provenance record the
command left (``*_provenance.json``), which tells which inputs, chunkglm
version and cluster produced the results and how long it took.

Surface layouts (``chunkglm first-level`` on GIFTI or CIFTI runs) are read
too: a map is ``<stem>_<rest>.nii.gz``, ``<stem>_<rest>.dscalar.nii`` (CIFTI)
or one ``<stem>_hemi-L|R_<rest>.func.gii`` per hemisphere, drawn on the mesh of
the space the sidecar records (``"Space": "fsaverage5"``; nilearn's packaged mesh,
:mod:`chunkglm.io.mesh_spaces`). A space nilearn ships no mesh of is refused in one
line (the files hold no geometry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from chunkglm.errors import InputError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.derivatives import file_label
from chunkglm.io.layout import is_url
from chunkglm.io.mesh_spaces import layout_gifti_image
from chunkglm.provenance import read_record
from chunkglm.report.build import Design, GLMPieces, glm_report, mask_count, meta_report
from chunkglm.report.pages import INDEX_NAME, PageOutcome, build_pages, check_jobs, write_index
from chunkglm.report.sections import Correction, ReportOptions


@dataclass(frozen=True)
class Found:
    """One result of a derivatives folder."""

    kind: str  # "first_level", "group_level" or "meta"
    sidecar: Path

    @property
    def report_path(self) -> Path:
        stem = self.sidecar.name.removesuffix(".json").removesuffix("_glm")
        return self.sidecar.with_name(f"{stem}_report.html")


def find_results(root) -> list[Found]:
    """Every first-level, group and meta-analysis result under ``root``, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder: pass a derivatives folder written by chunkglm "
                         "(e.g. derivatives/glm, or the -o/--output-dir folder of chunkglm meta).")
    found = []
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith(".") or path.name.endswith("provenance.json") or \
                path.name == "dataset_description.json":
            continue
        kind = _kind(path)
        if kind:
            found.append(Found(kind, path))
    return found


def _kind(path: Path) -> str | None:
    if path.name.endswith("_glm.json"):
        level = _read(path).get("AnalysisLevel")
        return level if level in ("first_level", "group_level") else None
    if path.parent.name == "meta":
        content = _read(path)
        return "meta" if "Estimator" in content and "Maps" in content else None
    return None


def _read(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the sidecar {path}: {error}") from error
    return content if isinstance(content, dict) else {}


def write_reports(root, title=None, jobs=None, **options) -> list[Path]:
    """Write the report of every result under ``root``, and ``root/index.html``; returns the result pages.

    The pages are built in parallel (a pool of ``jobs`` workers, see
    :mod:`chunkglm.report.pages`); then ``root/index.html`` links every
    page, says for each map what survives (or that no voxel does) and names
    the results that could not be reported.

    Parameters
    ----------
    root : str or Path
        A derivatives folder (or any folder above one).
    title : str, optional
        Title of every page (default: the subject, the kind of result and
        its contrasts); a first-level page's title starts with its subject
        (``sub-01 task-main · TITLE``), so that the browser's tabs differ.
    jobs : int, optional
        Pages built at once (default: one per CPU this process may use; 1:
        one after the other, in this process).
    **options
        ``generate_report``'s thresholding and display options (``alpha``,
        ``height_control``, ``threshold``, ``cluster_threshold``,
        ``two_sided``, ``min_distance``, ``plot_type``, ``display_mode``,
        ``cut_coords``, ``bg_img``).

    Raises
    ------
    InputError
        No result under ``root`` or a bad option (checked before any page is
        written), or results whose files are incomplete: the other results'
        pages and the index are written first, then the error names each
        missing file.
    """
    checked = ReportOptions.checked(**options)
    check_jobs(jobs)
    found = find_results(root)
    if not found:
        raise InputError(f"no chunkglm result under {root}: expected first_level/sub-XX/*_glm.json, "
                         "group_level/group_glm.json or meta/<Estimator>.json (written by chunkglm "
                         "first-level, second-level and meta).")
    outcomes = build_pages(_write_page, [(result, checked, title) for result in found], jobs)
    write_index(Path(root), outcomes)
    written = [outcome.page for outcome in outcomes if outcome.page is not None]
    failed = [f"{outcome.sidecar}: {outcome.error}" for outcome in outcomes if outcome.error]
    if failed:
        raise InputError(f"{len(failed)} of {len(found)} result(s) could not be reported ({len(written)} page(s) "
                         f"written, listed in {Path(root) / INDEX_NAME}):\n  " + "\n  ".join(failed))
    return written


def _write_page(task) -> PageOutcome:
    """One result's page, written (a pool's task: module level, its argument one tuple)."""
    result, options, title = task
    try:
        report = report_of(result, options, title)
    except InputError as error:
        return PageOutcome(result.kind, result.sidecar, error=str(error))
    page = report.save_as_html(result.report_path)
    return PageOutcome(result.kind, result.sidecar, page, report.title, getattr(report, "findings", {}))


def report_of(result: Found, options: ReportOptions, title=None):
    """The :class:`~chunkglm.report.HTMLReport` of one result (a first-level ``title`` after its subject)."""
    if result.kind == "meta":
        return _meta(result.sidecar, options, title)
    pieces = _first_level(result.sidecar) if result.kind == "first_level" else _group_level(result.sidecar)
    if title is not None and pieces.label():
        title = f"{pieces.label()} · {title}"
    return glm_report(pieces, options, title)


def _load(path: Path):
    if not path.exists():
        raise InputError(f"{path} is missing: the derivatives folder is incomplete (re-run the command "
                         "that wrote it).")
    return nib.load(path)


def _optional(path: Path):
    return _load(path) if path.exists() else None


#: Where a map of the glm layout may be: ``<stem>_<rest>`` as NIfTI, CIFTI dense scalar, or a GIFTI file per
#: hemisphere with the hemi entity after the stem (chunkglm.glm.io.surface_derivatives' names).
HEMIS = {"left": "L", "right": "R"}


def _map_files(folder: Path, stem: str, rest: str) -> dict:
    """The files of one map: ``{"nifti": path}``, ``{"cifti": path}`` or ``{"left": path, "right": path}``."""
    for key, extension in (("nifti", "nii.gz"), ("cifti", "dscalar.nii")):
        path = folder / f"{stem}_{rest}.{extension}"
        if path.exists():
            return {key: path}
    return {hemi: path for hemi, label in HEMIS.items()
            if (path := folder / f"{stem}_hemi-{label}_{rest}.func.gii").exists()}


def _load_map(folder: Path, stem: str, rest: str, required: bool = True):
    """A map of the glm layout (a NIfTI or CIFTI image, or a SurfaceImage of its GIFTI pair); None when it
    is not there and not ``required``."""
    files = _map_files(folder, stem, rest)
    if not files:
        if required:
            _load(folder / f"{stem}_{rest}.nii.gz")  # the error naming the missing file
        return None
    if "nifti" in files or "cifti" in files:
        return _load(next(iter(files.values())))
    return layout_gifti_image(files)  # on the mesh of the space its sidecar records


def _provenance(path: Path) -> dict | None:
    return read_record(path)


def _designs(folder: Path, stem: str) -> list[Design]:
    tables = sorted(folder.glob(f"{stem}*_design-matrix.tsv"))
    if tables:
        return [Design(_design_label(p, stem), pd.read_csv(p, sep="\t")) for p in tables]
    return [Design(_design_label(p, stem), png=p.read_bytes()) for p in sorted(folder.glob(f"{stem}*_design-matrix.png"))]


def _design_label(path: Path, stem: str) -> str:
    extra = path.name.removeprefix(stem).removesuffix("_design-matrix.tsv").removesuffix("_design-matrix.png")
    return f"{stem}{extra}"


def _first_level(sidecar: Path) -> GLMPieces:
    meta = _read(sidecar)
    folder, stem = sidecar.parent, sidecar.name.removesuffix("_glm.json")
    designs = _designs(folder, stem)
    contrasts, stat_maps = {}, {}
    for label, spec in (meta.get("Contrasts") or {}).items():
        stat = "F" if _map_files(folder, stem, f"contrast-{label}_stat-F") else "t"
        contrasts[label] = _per_design(spec.get("Weights"), stat, len(designs))
        stat_maps[label] = _load_map(folder, stem, f"contrast-{label}_stat-z")
    model = meta.get("Model") or {}
    provenance = _first_level_provenance(folder, stem)
    timing = acquisition_timing(meta, folder, stem, provenance)
    parameters = {"hrf_model": model.get("HRF"), "drift_model": model.get("DriftModel"),
                  "high_pass": model.get("HighPassFilter"), "noise_model": model.get("NoiseModel"),
                  "t_r": timing.get("t_r"), "slice_time_ref": timing.get("slice_time_ref"),
                  "confounds": meta.get("Confounds")}
    mask = _load_map(folder, stem, "mask", required=False)
    inputs = {"Runs": len(designs), "Scans per run": [len(d.matrix) for d in designs if d.matrix is not None]}
    if mask is not None:
        inputs.update(mask_count(mask))
    if "t_r" not in timing:
        inputs["TR and slice timing"] = ("not recorded: the sidecar has no RepetitionTime, no nilearn "
                                         "statmap.json is beside it and the runs' store is not readable here")
    pieces = GLMPieces("First Level Model", {k: v for k, v in parameters.items() if v is not None}, designs,
                       contrasts, stat_maps, mask, inputs, provenance)
    entities = stem_entities(stem)
    pieces.subject = entities.pop("sub", None)
    pieces.entities = {key: entities[key] for key in ("ses", "task") if key in entities}
    return pieces


def stem_entities(stem: str) -> dict:
    """The BIDS entities of a file-name stem: ``sub-01_task-main`` -> ``{"sub": "01", "task": "main"}``."""
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)


def acquisition_timing(sidecar: dict, folder: Path, stem: str, provenance: dict | None = None) -> dict:
    """``{"t_r": ..., "slice_time_ref": ...}`` of a first-level result (the keys known).

    From the derivatives/glm sidecar (``RepetitionTime`` and
    ``SliceTimingRef``, in ``Model`` or at the top), else from nilearn's
    ``statmap.json`` of the same analysis when its file set was written too
    (``<root>/sub-XX/<stem>_statmap.json``, or beside the sidecar), else
    from the runs' nodes in the cohort store the provenance record names,
    when it is a local folder that exists here.
    """
    model = sidecar.get("Model") or {}
    timing = {}
    for key, names in (("t_r", ("RepetitionTime",)), ("slice_time_ref", ("SliceTimingRef", "SliceTimeRef"))):
        for name in names:
            value = model.get(name, sidecar.get(name))
            if value is not None:
                timing[key] = value
                break
    if "t_r" in timing:
        return timing
    for statmap in (folder.parent.parent / folder.name / f"{stem}_statmap.json", folder / f"{stem}_statmap.json"):
        if statmap.is_file():
            parameters = _read(statmap).get("ModelParameters") or {}
            found = {key: parameters[key] for key in ("t_r", "slice_time_ref") if parameters.get(key) is not None}
            if "t_r" in found:
                return {**found, **timing}
    return {**timing_from_store(provenance), **timing}


def timing_from_store(provenance: dict | None) -> dict:
    """The TR and ``slice_time_ref`` of the runs a provenance record names, read from their store.

    The records of ``chunkglm first-level`` and of the demo name each run's
    store and node (``{"store": path, "node": "runs/<name>"}`` or ``"run":
    "<name>"``); a store that is a URL or not here is not opened. One value
    when the runs agree, else one per run.
    """
    values = {"t_r": [], "slice_time_ref": []}
    cohorts = {}
    for entry in (provenance or {}).get("inputs") or []:
        store = entry.get("store") if isinstance(entry, dict) else None
        name = str(entry.get("run") or entry.get("node") or "").removeprefix("runs/") if store else ""
        if not name or is_url(store) or not Path(store).is_dir():
            return {}
        try:
            cohort = cohorts.get(store) or cohorts.setdefault(store, open_cohort(store))
            attrs = cohort.runs[name].attrs
        except (InputError, OSError, KeyError, ValueError):  # not a store, or not this run: not recorded
            return {}
        values["t_r"].append(attrs.get("RepetitionTime"))
        values["slice_time_ref"].append(attrs.get("slice_time_ref"))
    return {key: found[0] if len(set(found)) == 1 else found
            for key, found in values.items() if found and None not in found}


def _first_level_provenance(folder: Path, stem: str) -> dict | None:
    """The subject's record: ``<s>_provenance.json``, or the folder's only record (``chunkglm
    first-level`` names it ``sub-XX_task-T_provenance.json``, without the session)."""
    exact = folder / f"{stem}_provenance.json"
    records = sorted(folder.glob("*_provenance.json"))
    return _provenance(exact if exact.exists() or len(records) != 1 else records[0])


def _per_design(weights, stat: str, n_designs: int) -> list:
    """The sidecar's weights, one entry per design (one shared list when all runs agree)."""
    if weights is None:
        return [None] * n_designs
    array = np.asarray(weights, dtype=float)
    shared_ndim = 1 if stat == "t" else 2
    if array.ndim == shared_ndim + 1 and len(array) == n_designs:
        return list(array)
    return [array] * n_designs


def _group_level(sidecar: Path) -> GLMPieces:
    meta = _read(sidecar)
    folder = sidecar.parent
    design_path = folder / "group_design-matrix.tsv"
    designs = [Design("group design", pd.read_csv(design_path, sep="\t"))] if design_path.exists() else []
    contrasts, stat_maps, corrected = {}, {}, {}
    corrections = meta.get("Corrections") or {}
    for label, spec in (meta.get("Contrasts") or {}).items():
        name = spec.get("Name") or label
        contrasts[name] = [np.asarray(spec["Weights"], dtype=float)] if "Weights" in spec else [None]
        stat_maps[name] = _load_map(folder, "group", f"contrast-{label}_stat-z")
        for key in ("fdr", "fwe"):
            image = _load_map(folder, "group", f"contrast-{label}_{key}-corrected", required=False)
            if image is not None:
                corrected[f"{name} ({key.upper()}-corrected)"] = (image, _correction(corrections, key.upper(), label))
    model = meta.get("Model") or {}
    parameters = {"estimator": model.get("Estimator"), "smoothing_fwhm": model.get("SmoothingFWHM"),
                  "two_sided corrections": corrections.get("TwoSided"),
                  "cluster_threshold of corrections": corrections.get("ClusterThreshold")}
    mask = _load_map(folder, "group", "mask", required=False)
    inputs = {"Maps": model.get("NumberOfMaps"), "Regressors": model.get("Regressors")}
    if mask is not None:
        inputs.update(mask_count(mask))
    pieces = GLMPieces("Second Level Model", parameters, designs, contrasts, stat_maps, mask, inputs,
                       _provenance(folder / "group_provenance.json"))
    pieces.corrected_maps = corrected
    return pieces


def _correction(corrections: dict, kind: str, label: str) -> Correction:
    """The group sidecar's ``Corrections[kind]`` for one contrast (its method, α, permutations)."""
    spec = corrections.get(kind) or {}
    method = spec.get("Method")
    method = method.get(label) if isinstance(method, dict) else method
    permutations = (spec.get("Permutation") or {}).get("NumberOfPermutations")
    if method and "permutation" in str(method) and permutations:
        method = f"{method}, {permutations} permutations"
    return Correction(kind, method, spec.get("Alpha"))


def _meta(sidecar: Path, options: ReportOptions, title):
    meta = _read(sidecar)
    folder, estimator = sidecar.parent, sidecar.name.removesuffix(".json")
    names = [n for n in meta.get("Maps", []) if n == "z" or n.startswith("z_")]
    stat_maps = {name: _load(folder / f"{estimator}_{file_label(name)}.nii.gz") for name in names}
    if not stat_maps:
        raise InputError(f"{sidecar} lists no z map ({meta.get('Maps')}); nothing to report.")
    parameters = {"estimator": meta.get("Estimator"), **(meta.get("Parameters") or {})}
    corrections = meta.get("Corrections")
    if corrections:
        parameters["corrector"] = f"{corrections.get('Corrector')}(method={corrections.get('method')!r})"
    described = meta.get("Inputs") or {}
    mask = _optional(folder / f"{estimator}_mask.nii.gz")
    if mask is None:  # written before masks were saved: the voxels with a value
        z = stat_maps.get("z") or next(iter(stat_maps.values()))
        mask = nib.Nifti1Image((np.asanyarray(z.dataobj) != 0).astype(np.uint8), z.affine)
    inputs = {"Images": described.get("n_images"), "Variables": described.get("variables"),
              "Voxels analysed": int(np.count_nonzero(np.asanyarray(mask.dataobj))),
              "Maps computed": meta.get("Maps")}
    return meta_report(parameters, inputs, stat_maps, mask, options, _provenance(folder / "provenance.json"),
                       title, description=meta.get("Description") or "",
                       corrected_alpha=(corrections or {}).get("alpha") or 0.05)
