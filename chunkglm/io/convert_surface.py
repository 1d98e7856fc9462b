"""``chunkglm.convert`` on surface inputs: routed to :mod:`chunkglm.io.surface_convert`.

Surface inputs are

- a BIDS folder with a surface ``space`` (``fsaverage*``: fMRIPrep's GIFTI pairs
  ``*_hemi-L/R_space-<space>_bold.func.gii``; ``fsLR``: its CIFTI dense series
  ``*_space-fsLR_den-91k_bold.dtseries.nii``; ``surface="cifti"`` or ``"gifti"``
  chooses the other kind for a space);
- files: GIFTI runs (``*.func.gii``, the two hemispheres of a run paired by their
  ``hemi-L``/``hemi-R`` entity) or CIFTI dense series (``*.dtseries.nii``).

They are converted by :func:`~chunkglm.io.surface_convert.convert_surface_bids` /
:func:`~chunkglm.io.surface_convert.convert_surface_runs`, which give the resume
(complete nodes from the same source skipped), ``overwrite`` and provenance of
volume conversion. Which nodes were written and which skipped is read from
their completion markers before and after.
"""

from __future__ import annotations

from pathlib import Path

from chunkglm.errors import InputError
from chunkglm.io import layout as st
from chunkglm.io.bids import bids_name, parse_entities
from chunkglm.io.surface_convert import CIFTI_RUN_SUFFIXES, convert_surface_bids, convert_surface_runs

__all__ = ["GIFTI_RUN_SUFFIXES", "SURFACE_KINDS", "convert_surface", "is_surface_request"]

#: Suffixes of the GIFTI files read as (one hemisphere of) a run.
GIFTI_RUN_SUFFIXES = (".func.gii",)
#: Values of ``surface``: the kind of fMRIPrep surface output a BIDS space is read as.
SURFACE_KINDS = ("gifti", "cifti")
#: Volume-only options and what to do instead (name -> advice).
_VOLUME_OPTIONS = {
    "mask_img": "surface runs are stored on every vertex/grayordinate; mask them when fitting "
                "(FirstLevelModel(mask_img=<SurfaceImage or SurfaceMasker>))",
    "target_affine": "surface runs are not resampled", "target_shape": "surface runs are not resampled",
    "smoothing_fwhm": "GIFTI/CIFTI runs are converted unsmoothed (FirstLevelModel(smoothing_fwhm=...) "
                      "smooths SurfaceImage runs along the mesh)",
    "input_storage_options": "surface files are read from local paths only",
}


def _space(space) -> str:
    return str(space or "").removeprefix("space-")


def _is_surface_file(path) -> bool:
    return str(path).endswith(GIFTI_RUN_SUFFIXES + CIFTI_RUN_SUFFIXES)


def is_surface_request(inputs, space=None, surface=None) -> bool:
    """True when ``convert`` is asked for surface runs: ``surface`` given, a BIDS ``space``
    fsaverage*/fsLR, or GIFTI/CIFTI run files (all of them: a mix with NIfTI files is refused)."""
    if surface is not None:
        if surface not in SURFACE_KINDS:
            raise InputError(f"surface must be one of {SURFACE_KINDS} (or None); received {surface!r}.")
        return True
    if _space(space).startswith(("fsaverage", "fsLR")):
        return True
    if isinstance(inputs, str | Path) and Path(inputs).is_dir():
        return False
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs or [])
    kinds = {_is_surface_file(p) for p in items}
    if kinds == {True, False}:
        odd = [str(p) for p in items if _is_surface_file(p)][:2]
        raise InputError(f"surface files ({odd}) were given with NIfTI files: convert them in separate "
                         "conversions (each store grid is one kind).")
    return kinds == {True}


def convert_surface(inputs, store, *, space=None, surface=None, task=None, subjects=None, sessions=None,
                    derivatives_folder="derivatives/fmriprep", options=None, volume_options=None,
                    command=None) -> tuple[list[str], list[str], list[str]]:
    """Convert surface runs; return the node paths (converted, skipped) and the grid ids.

    ``options``: keywords of :func:`~chunkglm.io.surface_convert.convert_surface_runs`
    (chunk_bytes, task_memory, storage_options, overwrite, client). ``volume_options``:
    the volume-only options of ``convert`` as given; any set is refused (one line).
    """
    for name, value in (volume_options or {}).items():
        if value is not None:
            raise InputError(f"{name} applies to volume runs; these are surface runs: {_VOLUME_OPTIONS[name]}. "
                             "Leave it out. Nothing was written.")
    options = {**(options or {}), "command": command}
    root_before = _markers(store, options.get("storage_options"))
    if isinstance(inputs, str | Path) and Path(inputs).is_dir():
        if not _space(space):
            raise InputError("converting surface runs from a BIDS folder needs its space: give space='fsaverage5' "
                             "(GIFTI pairs) or space='fsLR' (CIFTI dense series; --space). Nothing was written.")
        cifti = None if surface is None else surface == "cifti"
        names = convert_surface_bids(inputs, store, space=_space(space), task=task, subjects=subjects,
                                     sessions=sessions, derivatives_folder=derivatives_folder, cifti=cifti,
                                     **options)
    else:
        items, names, entities = surface_files(inputs)
        gifti = isinstance(items[0], dict)
        mesh = (_space(space) or _shared_space(entities)) if gifti else None
        if gifti and not mesh:
            raise InputError("GIFTI runs carry no geometry and their names no space-<mesh> entity: give the mesh "
                             "nilearn ships as space='fsaverage5' (--space). Nothing was written.")
        names = convert_surface_runs(items, store, names=names, mesh=mesh,
                                     space=_space(space) or _shared_space(entities) or "",
                                     entities=entities, **options)
    after = _markers(store, options.get("storage_options"))
    converted = [f"runs/{n}" for n in names if after.get(n) != root_before.get(n)]
    skipped = [f"runs/{n}" for n in names if after.get(n) == root_before.get(n)]
    grids = sorted({after[n][2] for n in names if n in after})
    return converted, skipped, grids


def _markers(store, storage_options) -> dict:
    """Run name -> (version, completion time, grid id) of the store's complete runs ({} without a store)."""
    try:
        root = st.open_root(store, storage_options, mode="r")
    except Exception:  # no store yet
        return {}
    found = {}
    for name, attrs in st.node_attributes(root, "runs").items():
        if attrs:
            meta = dict(attrs.get(st.ATTR, {}))
            found[name] = (meta.get("version"), meta.get("written"), attrs.get("grid_id"))
    return found


def surface_files(inputs) -> tuple[list, list[str], list[dict]]:
    """GIFTI / CIFTI run files -> (runs, node names, entities): a GIFTI run is the pair of its
    ``hemi-L`` and ``hemi-R`` files (one hemisphere alone is a run of it), a CIFTI run its file."""
    paths = [str(p) for p in ([inputs] if isinstance(inputs, str | Path) else list(inputs))]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise InputError(f"{len(missing)} input file(s) not found, e.g. {missing[:3]}. Nothing was written.")
    if len({p.endswith(GIFTI_RUN_SUFFIXES) for p in paths}) > 1:
        raise InputError("GIFTI and CIFTI runs were given together: a store grid is a mesh or a CIFTI axis, not "
                         "both; convert them in separate conversions. Nothing was written.")
    runs: dict[str, dict] = {}
    for path in paths:
        entities = _run_entities(path)
        name = st.check_node_name(entities.get("name") or bids_name(entities))
        entry = runs.setdefault(name, {"entities": entities, "files": {}})
        if path.endswith(CIFTI_RUN_SUFFIXES):
            if entry["files"]:
                raise InputError(f"two CIFTI files would become runs/{name}: rename one. Nothing was written.")
            entry["files"] = path
            continue
        part = {"L": "left", "R": "right"}.get(parse_entities(path).get("hemi", ""))
        if part is None:
            raise InputError(f"{Path(path).name} has no hemi-L or hemi-R entity: name GIFTI runs as fMRIPrep "
                             "does (..._hemi-L_space-fsaverage5_bold.func.gii). Nothing was written.")
        if part in entry["files"]:
            raise InputError(f"two {part} hemisphere files would become runs/{name}: rename one. Nothing was written.")
        entry["files"][part] = path
    return ([e["files"] for e in runs.values()], list(runs),
            [{k: v for k, v in e["entities"].items() if k != "name"} for e in runs.values()])


def _run_entities(path: str) -> dict:
    """A run file's BIDS entities without hemi/den/desc/res (the run's, as discovery gives them),
    or {"name": <stem>} for a file without a subject entity."""
    entities = parse_entities(path)
    if "sub" in entities:
        return {k: v for k, v in entities.items() if k not in ("hemi", "den", "desc", "res")}
    stem = Path(path).name.split(".")[0]
    for hemi in ("_hemi-L", "_hemi-R", "hemi-L_", "hemi-R_"):
        stem = stem.replace(hemi, "")
    return {"name": "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)}


def _shared_space(entities) -> str:
    spaces = {e.get("space") for e in entities if e.get("space")}
    return spaces.pop() if len(spaces) == 1 else ""
