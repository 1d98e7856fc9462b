"""Find the runs of an fMRIPrep-style BIDS derivatives folder.

A run is a ``*_desc-preproc_bold.nii[.gz]`` with, beside it, its
``*_desc-brain_mask``, ``*_desc-confounds_timeseries.tsv`` and JSON sidecar;
events come from the raw dataset (``*_events.tsv``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from chunkglm.errors import InputError

#: BIDS entity order used to build node names.
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")
_BOLD_GLOB = "*_desc-preproc_bold.nii*"


@dataclass(frozen=True)
class RunFiles:
    """The files of one preprocessed run."""

    bold: str
    entities: dict
    mask: str | None = None
    confounds: str | None = None
    events: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Node name: the run's BIDS entities (without space/desc)."""
        return bids_name(self.entities)


def parse_entities(filename: str) -> dict:
    """``sub-01_task-x_run-1_space-MNI_desc-preproc_bold.nii.gz`` -> entities."""
    stem = Path(filename).name.split(".")[0]
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)


def input_entities(item) -> dict:
    """BIDS entities of an input image: a store node's, a file name's, or none (in-memory images).

    A store node (:class:`chunkglm.io.cohort.Node`) is known by its ``entities``
    attribute: this module sits below the store's and does not import it.
    """
    if isinstance(item, str | Path):
        return parse_entities(Path(item).name)
    entities = getattr(item, "entities", None)
    return dict(entities) if entities is not None else {}


def bids_name(entities: dict) -> str:
    """Join the entities that identify a run, in BIDS order."""
    parts = [f"{key}-{entities[key]}" for key in ENTITY_ORDER if key in entities]
    return "_".join(parts)


def find_derivatives(path: Path, derivatives_folder: str = "derivatives/fmriprep") -> tuple[Path, Path]:
    """Return (derivatives folder, raw dataset root) for a BIDS path.

    ``path`` may be the raw dataset root (derivatives under
    ``derivatives_folder``) or the derivatives folder itself.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"BIDS folder not found: {path}")
    candidate = path / derivatives_folder
    if candidate.is_dir():
        return candidate, path
    if _dataset_type(path) == "derivative" or any(path.glob(f"sub-*/**/{_BOLD_GLOB}")):
        raw = path.parent.parent if path.parent.name == "derivatives" else path
        return path, raw
    raise InputError(
        f"{path} has neither a derivatives folder {derivatives_folder!r} nor "
        f"preprocessed runs ({_BOLD_GLOB}). Point at the dataset root or the "
        "fMRIPrep output folder, or set derivatives_folder."
    )


def _dataset_type(path: Path) -> str | None:
    description = path / "dataset_description.json"
    if description.is_file():
        return _read_sidecar(description).get("DatasetType")
    return None


def _matches(entities, filters):
    return all(entities.get(key) in allowed for key, allowed in filters.items() if allowed is not None)


def _as_set(value, strip_prefix):
    if value is None:
        return None
    values = [value] if isinstance(value, str | int) else list(value)
    return {str(v).removeprefix(strip_prefix) for v in values}


def discover_runs(path, *, task=None, space=None, subjects=None, sessions=None,
                  derivatives_folder="derivatives/fmriprep") -> list[RunFiles]:
    """List the runs matching the filters, with their companion files.

    Raises
    ------
    InputError
        When no run matches; the message lists what the folder does have.
    """
    deriv, raw = find_derivatives(Path(path), derivatives_folder)
    filters = {"task": _as_set(task, "task-"), "space": _as_set(space, "space-"),
               "sub": _as_set(subjects, "sub-"), "ses": _as_set(sessions, "ses-")}
    found = sorted(deriv.glob(f"sub-*/**/{_BOLD_GLOB}"))
    runs = [_run_files(p, raw) for p in found if _matches(parse_entities(p.name), filters)]
    if not runs:
        raise InputError(_no_match_message(deriv, found, filters))
    _check_unique(runs)
    return runs


#: fMRIPrep's surface spaces: fsaverage meshes (GIFTI pairs per run) and fsLR grayordinates (CIFTI).
_GIFTI_RUN = "*_hemi-L_space-{space}_bold.func.gii"
_CIFTI_RUN = "*_space-{space}_*bold.dtseries.nii"


def discover_surface_runs(path, *, space, task=None, subjects=None, sessions=None,
                          derivatives_folder="derivatives/fmriprep", cifti=None) -> list[RunFiles]:
    """fMRIPrep's surface runs of one space, with their companion files.

    GIFTI (``space`` ``fsaverage*``, the default there): each run is the pair
    ``*_hemi-L_space-<space>_bold.func.gii`` / ``*_hemi-R_...`` (``RunFiles.bold`` is
    ``{"left": path, "right": path}``). CIFTI (``space`` ``fsLR``, the default there, or
    ``cifti=True``): each run is a ``*_space-<space>_den-<den>_bold.dtseries.nii`` (``bold`` its path). Events, confounds and
    sidecar metadata are found as for volume runs (the run's entities without hemi/space/den).

    Raises
    ------
    InputError
        No run matches, or a left hemisphere file has no right one.
    """
    deriv, raw = find_derivatives(Path(path), derivatives_folder)
    space = str(space).removeprefix("space-")
    cifti = space.startswith("fsLR") if cifti is None else bool(cifti)
    pattern = (_CIFTI_RUN if cifti else _GIFTI_RUN).format(space=space)
    filters = {"task": _as_set(task, "task-"), "sub": _as_set(subjects, "sub-"), "ses": _as_set(sessions, "ses-")}
    found = sorted(p for p in deriv.glob(f"sub-*/**/{pattern}") if _matches(parse_entities(p.name), filters))
    if not found:
        raise InputError(f"no surface run ({pattern}) under {deriv} matches "
                         f"{ {k: sorted(v) for k, v in filters.items() if v} }.")
    runs = [_surface_run_files(p, raw, cifti) for p in found]
    _check_unique(runs)
    return runs


def _surface_run_files(bold: Path, raw: Path, cifti: bool) -> RunFiles:
    entities = {k: v for k, v in parse_entities(bold.name).items() if k not in ("hemi", "den", "desc", "res")}
    base = bold.name.split("_bold")[0]
    for entity in ("hemi", "space", "den", "desc", "res"):
        base = _without(base, entity)
    files = str(bold)
    if not cifti:
        right = bold.with_name(bold.name.replace("_hemi-L_", "_hemi-R_"))
        if not right.is_file():
            raise InputError(f"{bold.name} has no right hemisphere {right.name} beside it: fMRIPrep writes "
                             "both; copy it there or convert the left hemisphere alone as a GIFTI pair.")
        files = {"left": str(bold), "right": str(right)}
    confounds = sorted(bold.parent.glob(base + "_desc-confounds_*.tsv"))
    events = _find_events(bold, raw, base)
    return RunFiles(bold=files, entities=entities, confounds=str(confounds[0]) if confounds else None,
                    events=str(events) if events else None, metadata=_metadata(bold, raw, base))


def _no_match_message(deriv, found, filters):
    asked = {k: sorted(v) for k, v in filters.items() if v is not None}
    if not found:
        return f"no preprocessed runs ({_BOLD_GLOB}) under {deriv}."
    seen = {key: sorted({parse_entities(p.name).get(key, "-") for p in found}) for key in filters}
    return (
        f"no run under {deriv} matches {asked}. The folder has tasks {seen['task']}, "
        f"spaces {seen['space']}, subjects {seen['sub']}, sessions {seen['ses']}."
    )


def _check_unique(runs):
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"several images map to the same run {twice[:3]} (e.g. one per space or "
            "resolution). Choose one with space=... (--space) or a narrower filter."
        )


def _companion(bold: Path, suffix_glob: str) -> Path | None:
    """A file beside ``bold`` sharing its name up to ``_desc-preproc_bold``."""
    prefix = bold.name.split("_desc-preproc_bold")[0]
    hits = sorted(bold.parent.glob(prefix + suffix_glob))
    return hits[0] if hits else None


def _without(prefix: str, entity: str) -> str:
    return re.sub(rf"_{entity}-[^_]+", "", prefix)


def _run_files(bold: Path, raw: Path) -> RunFiles:
    entities = parse_entities(bold.name)
    mask = _companion(bold, "_desc-brain_mask.nii*")
    base = _without(bold.name.split("_desc-preproc_bold")[0], "space")
    base = _without(base, "res")
    confounds = sorted(bold.parent.glob(base + "_desc-confounds_*.tsv"))
    events = _find_events(bold, raw, base)
    return RunFiles(
        bold=str(bold),
        entities={k: v for k, v in entities.items() if k not in ("desc", "res")},
        mask=str(mask) if mask else None,
        confounds=str(confounds[0]) if confounds else None,
        events=str(events) if events else None,
        metadata=_metadata(bold, raw, base),
    )


def _find_events(bold: Path, raw: Path, base: str) -> Path | None:
    name = base + "_events.tsv"
    for folder in _raw_folders(bold, raw):
        if (folder / name).is_file():
            return folder / name
    return None


def _raw_folders(bold: Path, raw: Path):
    """The raw-dataset folder matching the run's sub-/ses-/func path, then bold's own."""
    parts = [p for p in bold.parent.parts if p.startswith(("sub-", "ses-"))] + [bold.parent.name]
    return [raw.joinpath(*dict.fromkeys(parts)), bold.parent]


def _metadata(bold: Path, raw: Path, base: str) -> dict:
    """Sidecar metadata by BIDS inheritance: task-level JSON, the raw run's
    ``*_bold.json``, then the derivative's own JSON (most specific wins)."""
    task = parse_entities(bold.name).get("task", "")
    layers = (
        raw / f"task-{task}_bold.json",
        _raw_folders(bold, raw)[0] / (base + "_bold.json"),
        bold.with_name(bold.name.split(".")[0] + ".json"),
    )
    meta = {}
    for path in layers:
        if path.is_file():
            meta.update(_read_sidecar(path))
    return meta


def _read_sidecar(path: Path) -> dict:
    """A JSON sidecar's object; an InputError naming the file when it is not one."""
    try:
        found = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"the sidecar {path} is not valid JSON ({err}); fix or remove it. "
                         "Nothing was written.") from err
    if not isinstance(found, dict):
        raise InputError(f"the sidecar {path} holds a JSON {type(found).__name__}, not an object of "
                         "fields; fix or remove it. Nothing was written.")
    return found
