"""The mesh of a surface glm layout's GIFTI maps, from the space its sidecar records.

``chunkglm first-level`` writes a mesh model's maps as one GIFTI file per hemisphere
(``sub-01_task-main_hemi-L_contrast-c_stat-effect.func.gii``), which hold values and no
geometry. Its sidecar (``sub-01_task-main_glm.json``; ``group_glm.json`` at the group level)
records the runs' template space and vertex counts (:func:`space_metadata`):
``"Space": "fsaverage5", "VertexCount": {"L": 10242, "R": 10242}``. Readers
(``chunkglm second-level``, ``chunkglm report``) model the pair on that space's mesh
(:func:`gifti_pair_image`): nilearn's ``load_fsaverage(space)["pial"]`` for the fsaverage
meshes nilearn ships inside its package (fsaverage5; the others are downloads, which chunkglm
never starts). A layout whose sidecar records no space (written before the space was
recorded) is modelled on the packaged mesh with the files' vertex count, as it was then.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from chunkglm.errors import InputError

__all__ = ["PACKAGED_MESHES", "gifti_files", "gifti_pair", "gifti_pair_data", "gifti_pair_image", "layout_gifti_image", "map_sidecar",
           "packaged_mesh", "sidecar_space", "space_mesh", "space_metadata"]

#: Meshes nilearn ships (no download), by the vertices of one hemisphere.
PACKAGED_MESHES = {10242: "fsaverage5"}
#: nilearn's part names -> the BIDS hemi label.
HEMI = {"left": "L", "right": "R"}


def packaged_mesh(n_vertices: int):
    """nilearn's packaged pial mesh with ``n_vertices`` per hemisphere (a PolyMesh), or None."""
    name = PACKAGED_MESHES.get(int(n_vertices))
    return None if name is None else space_mesh(name)


def space_mesh(space: str):
    """nilearn's packaged pial mesh (a PolyMesh) of the template ``space`` (``fsaverage5`` or
    ``space-fsaverage5``), one object per space (a group's maps share it).

    Raises
    ------
    InputError
        For a space whose mesh nilearn does not ship (it would be a download).
    """
    name = str(space).removeprefix("space-")
    if name not in PACKAGED_MESHES.values():
        raise InputError(f"space {name!r}: nilearn ships no mesh of it in its package (only "
                         f"{sorted(PACKAGED_MESHES.values())}; other fsaverage meshes are downloads, which chunkglm "
                         "does not start), so its GIFTI maps have no geometry; convert the maps into a store with "
                         "their mesh (chunkglm.io.surface_maps) and pass the store.")
    return _packaged(name)


@lru_cache(maxsize=len(PACKAGED_MESHES))
def _packaged(name: str):
    from nilearn.datasets import load_fsaverage  # packaged with nilearn: no download

    return load_fsaverage(name)["pial"]


def _mesh_space(mesh) -> str | None:
    """The packaged space whose mesh has ``mesh``'s faces on every part (None: none does)."""
    for name in PACKAGED_MESHES.values():
        known = space_mesh(name)
        parts = mesh.parts
        if set(parts) <= set(known.parts) and all(
                np.array_equal(np.asarray(parts[p].faces), np.asarray(known.parts[p].faces)) for p in parts):
            return name
    return None


def space_metadata(image, space: str | None = None) -> dict:
    """The sidecar entries of a surface model's maps: ``Space`` (``space``, else the packaged fsaverage
    mesh whose faces the image's mesh has, else left out) and, for a SurfaceImage, ``VertexCount``
    (``{"L": n, "R": n}``). A CIFTI image: ``Space`` only, when ``space`` is given."""
    entries = {}
    space = str(space or "").removeprefix("space-")
    if type(image).__name__ == "Cifti2Image":
        return {"Space": space} if space else {}
    space = space or _mesh_space(image.mesh)
    if space:
        entries["Space"] = space
    entries["VertexCount"] = {HEMI.get(p, p): int(m.n_vertices) for p, m in image.mesh.parts.items()}
    return entries


def map_sidecar(path) -> Path:
    """The glm sidecar of a GIFTI map of the layout: ``<prefix>_glm.json`` beside it, ``<prefix>`` the
    name before its ``_hemi-`` entity (``group_hemi-L_...`` -> ``group_glm.json``)."""
    path = Path(path)
    prefix, found, _ = path.name.partition("_hemi-")
    if not found:
        raise InputError(f"{path}: a GIFTI map of the glm layout has a hemi entity (..._hemi-L_...).")
    return path.with_name(f"{prefix}_glm.json")


def sidecar_space(sidecar) -> str | None:
    """The ``Space`` a glm sidecar records (None: no sidecar, or no space in it)."""
    path = Path(sidecar)
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the sidecar {path}: {error}") from error
    space = content.get("Space") if isinstance(content, dict) else None
    return str(space) if space else None


def gifti_pair(left) -> dict:
    """``{"left": path, "right": path}`` of a hemi-L GIFTI file (its hemi-R sibling must exist)."""
    name = Path(left).name
    if "_hemi-L_" not in name:
        raise InputError(f"{left}: expected a left-hemisphere GIFTI file (..._hemi-L_....gii) whose hemi-R "
                         "file is beside it.")
    right = str(Path(left).with_name(name.replace("_hemi-L_", "_hemi-R_")))
    if not Path(right).exists():
        raise InputError(f"{left} has no right-hemisphere file {right}: give both files, or complete the "
                         "folder (re-run the command that wrote it).")
    return {"left": str(left), "right": right}


def gifti_files(paths) -> dict:
    """``{"left": path, "right": path}`` of one or two GIFTI files given by a user: one ``hemi-L`` (or
    ``hemi-R``) file whose other hemisphere's file is beside it, or two files, each hemisphere's told by
    its ``hemi-L``/``hemi-R`` entity (in the order left, right when the names carry none)."""
    paths = [str(p) for p in paths]
    if len(paths) == 1:
        name = Path(paths[0]).name
        if "_hemi-R_" in name:
            return gifti_pair(str(Path(paths[0]).with_name(name.replace("_hemi-R_", "_hemi-L_"))))
        return gifti_pair(paths[0])
    if len(paths) != 2:
        raise InputError(f"{paths}: a GIFTI pair is one file per hemisphere (two files, or the hemi-L file "
                         f"alone); received {len(paths)}.")
    labels = ["left" if "_hemi-L_" in Path(p).name else "right" if "_hemi-R_" in Path(p).name else None
              for p in paths]
    if labels == [None, None]:
        return {"left": paths[0], "right": paths[1]}
    if sorted(map(str, labels)) != ["left", "right"]:
        raise InputError(f"{paths}: expected one hemi-L and one hemi-R file (or two files without a hemi "
                         "entity, left first).")
    return dict(zip(labels, paths))


def gifti_pair_data(paths: dict) -> dict:
    """``{hemi: (n_vertices,) array}`` of one GIFTI file per hemisphere, each holding one data array."""
    import nibabel as nib

    arrays = {hemi: nib.load(str(path)).darrays for hemi, path in paths.items()}
    several = sorted(str(paths[hemi]) for hemi, found in arrays.items() if len(found) != 1)
    if several:
        raise InputError(f"{several}: expected one map per file (an F contrast's effect has one per row).")
    return {hemi: np.asarray(found[0].data) for hemi, found in arrays.items()}


def gifti_pair_image(paths: dict, space: str | None = None):
    """A SurfaceImage of one GIFTI file per hemisphere (``{"left": path, "right": path}``, the first data
    array of each) on the mesh of ``space`` (:func:`space_mesh`); ``space`` None: the mesh nilearn ships
    with the files' number of vertices.

    Raises
    ------
    InputError
        A file of several data arrays, a space nilearn ships no mesh of, or vertex counts that are not
        the mesh's.
    """
    from nilearn.surface import PolyMesh, SurfaceImage

    data = gifti_pair_data(paths)
    files = sorted(str(p) for p in paths.values())
    if space is not None:
        mesh = space_mesh(space)
        sizes = {hemi: mesh.parts[hemi].n_vertices for hemi in data}
        found = {hemi: len(values) for hemi, values in data.items()}
        if sizes != found:
            raise InputError(f"{files}: {found} vertices, but their sidecar's space {space!r} has {sizes}; the "
                             "maps are not on that mesh (re-run the command that wrote them).")
        return SurfaceImage(PolyMesh(**{hemi: mesh.parts[hemi] for hemi in data}), data)
    meshes = {hemi: packaged_mesh(len(values)) for hemi, values in data.items()}
    missing = {hemi: len(data[hemi]) for hemi, mesh in meshes.items() if mesh is None}
    if missing:
        raise InputError(f"{files}: no mesh nilearn ships has {missing} vertices (it ships "
                         f"{sorted(PACKAGED_MESHES.values())}) and no sidecar names their space; convert the maps "
                         "into a store with their mesh (chunkglm.io.surface_maps) and pass the store.")
    return SurfaceImage(PolyMesh(**{hemi: mesh.parts[hemi] for hemi, mesh in meshes.items()}), data)


def layout_gifti_image(paths: dict):
    """:func:`gifti_pair_image` of a glm layout's GIFTI pair on the space its sidecar records
    (:func:`map_sidecar`, :func:`sidecar_space`)."""
    return gifti_pair_image(paths, sidecar_space(map_sidecar(next(iter(paths.values())))))
