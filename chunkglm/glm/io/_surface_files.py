"""save_glm_to_bids on surface models: one GIFTI file per hemisphere, as nilearn 0.14.1 writes them.

nilearn writes a surface GLM's maps (and its mask) as GIFTI shape files, one per
hemisphere, named from the volume name with ``hemi-L``/``hemi-R`` and
``den-<vertices>`` entities placed in BIDS entity order and the ``.gii``
extension (``sub-01_hemi-L_den-10242_contrast-c0_stat-z_statmap.gii``); values
are stored as float32 (uint8 for the mask), and the model's ``statmap.json``
sidecar gains a ``Density`` entry. CIFTI models' maps (nibabel Cifti2Images; nilearn has
no CIFTI GLM) are written as dense scalar files, ``.dscalar.nii``. :func:`save_map` writes
every kind of map.
"""

from __future__ import annotations

import warnings

import numpy as np
from nilearn.surface import SurfaceImage
from nilearn.surface.surface import data_to_gifti

from chunkglm.io.nifti import save_map as save_volume

__all__ = ["cifti_clusters_skipped", "cifti_file_name", "density", "is_cifti_map", "is_surface_map",
           "save_map", "surface_file_name"]

#: BIDS entities in the specification's order; hemi and den take their places among them, the
#: entities BIDS does not list (nilearn's contrast, stat) stay after them in their order.
BIDS_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
              "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
              "recording", "chunk", "seg", "res", "den", "label", "desc")
HEMISPHERES = (("L", "left"), ("R", "right"))


def is_surface_map(img) -> bool:
    return isinstance(img, SurfaceImage)


def is_cifti_map(img) -> bool:
    """A CIFTI model's output: a nibabel Cifti2Image dense scalar image."""
    return type(img).__name__ == "Cifti2Image"


def cifti_clusters_skipped(z_img) -> bool:
    """True (with a warning) for a CIFTI z map: nilearn's cluster tables take volumes and SurfaceImages only."""
    if not is_cifti_map(z_img):
        return False
    warnings.warn("save_glm_to_bids wrote no cluster table for this CIFTI contrast: nilearn's threshold_stats_img "
                  "and get_clusters_table take volumes and SurfaceImages, not grayordinates.", UserWarning,
                  stacklevel=4)
    return True


def cifti_file_name(relative: str) -> str:
    """``relative`` (a volume file name) as a CIFTI-2 dense scalar file name (``.dscalar.nii``)."""
    folder, _, name = relative.rpartition("/")
    name = name.split(".", 1)[0] + ".dscalar.nii"
    return f"{folder}/{name}" if folder else name


def density(img: SurfaceImage) -> dict:
    """nilearn's ``Density`` sidecar entry: {n_vertices: "<n> vertices per hemisphere"}."""
    return {int(mesh.n_vertices): f"{int(mesh.n_vertices)} vertices per hemisphere"
            for mesh in img.mesh.parts.values()}


def surface_file_name(relative: str, hemi: str, den: int) -> str:
    """``relative`` (a volume file name, folder allowed) with ``hemi-<hemi>`` and ``den-<den>`` placed in
    BIDS entity order and the ``.gii`` extension."""
    folder, _, name = relative.rpartition("/")
    stem = name.split(".", 1)[0]
    tokens = stem.split("_")
    suffix, tokens = tokens[-1], tokens[:-1]
    tokens = [t for t in tokens if not t.startswith(("hemi-", "den-"))] + [f"hemi-{hemi}", f"den-{den}"]
    known = sorted((t for t in tokens if t.split("-", 1)[0] in BIDS_ORDER),
                   key=lambda t: BIDS_ORDER.index(t.split("-", 1)[0]))
    others = [t for t in tokens if t.split("-", 1)[0] not in BIDS_ORDER]
    plain = [t for t in others if "-" not in t]  # a prefix's words without an entity
    entities = [t for t in others if "-" in t]
    name = "_".join([*plain, *known, *entities, suffix]) + ".gii"
    return f"{folder}/{name}" if folder else name


def save_map(img, out, relative: str, save_volume=save_volume) -> list[str]:
    """Write ``img`` as ``out_dir/relative`` (a volume, with ``save_volume(img, path)``) or its
    per-hemisphere GIFTI files (a SurfaceImage; uint8 for a boolean mask, float32 otherwise, as
    nilearn's ``data_to_gifti``; a CIFTI Cifti2Image: one ``.dscalar.nii`` file, float32). Returns the
    relative names written."""
    if is_cifti_map(img):  # float32 as every derivative map (the mask stays uint8)
        name = cifti_file_name(relative)
        data = np.asarray(img.dataobj)
        data = data if data.dtype == np.uint8 else data.astype(np.float32)
        type(img)(data, header=img.header).to_filename(out.path(name))
        return [name]
    if not is_surface_map(img):
        save_volume(img, out.path(relative))
        return [relative]
    written = []
    for label, part in HEMISPHERES:
        if part not in img.data.parts:
            continue
        data = np.asarray(img.data.parts[part])
        name = surface_file_name(relative, label, img.mesh.parts[part].n_vertices)
        data_to_gifti(data.astype(np.uint8) if data.dtype == bool else data, out.path(name))
        written.append(name)
    return written
