"""The derivatives/glm layout of surface models, in GIFTI / CIFTI files (``chunkglm first-level``).

The files and sidecar of :func:`chunkglm.glm.io.save_glm_derivatives` (same
names, contrast labels, ``_glm.json`` and design matrices), with the maps and
the mask in the surface formats of the runs:

- mesh runs (fsaverage GIFTI pairs): one GIFTI file per hemisphere, the ``hemi``
  entity after the run's (``sub-01_task-main_hemi-L_contrast-aMinusB_stat-z.func.gii``),
  float32 maps (the mask: uint8), one data array per map column;
- CIFTI runs: one CIFTI-2 dense scalar file on the runs' brain-model axis
  (``sub-01_task-main_contrast-aMinusB_stat-z.dscalar.nii``), as the model's
  ``compute_contrast`` returns it.

The sidecar (``_glm.json``) records the runs' template space and, for mesh runs, the vertex
counts of each hemisphere (``"Space": "fsaverage5", "VertexCount": {"L": 10242, "R": 10242}``,
:func:`chunkglm.io.mesh_spaces.space_metadata`): the GIFTI files hold no geometry, and the readers
(``chunkglm second-level``, ``chunkglm report``) take the mesh of that space.

Residuals and nilearn's ``save_glm_to_bids`` file set are not written for surface runs
(refused by the command before anything is computed).

The group_level layout of surface models (:func:`chunkglm.glm.io.save_group_derivatives`) writes
its maps through :func:`save_surface_map` with the ``group`` prefix
(``group_hemi-L_contrast-mean_stat-z.func.gii``), and its permutation FWE maps with
:func:`permutation_fwe_surface`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from chunkglm.errors import InputError
from chunkglm.glm.io._bids_files import (confound_names, contrast_specs, derivative_entities, derivatives_metadata,
                                         run_entities, write_description)
from chunkglm.glm.io._bids_names import derivative_names
from chunkglm.io.derivatives import StagedOutput, bids_filename, write_json
from chunkglm.io.mesh_spaces import space_metadata
from chunkglm.io.surface import gifti_image
from chunkglm.kernels.mesh import mesh_adjacency, remove_small_mesh_clusters
from chunkglm.report.figures import design_matrix_figure, save_figure

__all__ = ["is_surface_image", "is_surface_model", "mask_output", "permutation_fwe_surface", "save_surface_derivatives",
           "save_surface_map", "surface_file_names"]

#: The volume name's extension, replaced by the surface format's.
_VOLUME_EXTENSION = ".nii.gz"
#: nilearn's part names -> the BIDS hemi label.
HEMI = {"left": "L", "right": "R"}


def is_surface_model(model) -> bool:
    """True for a FirstLevelModel fitted on surface runs (mesh or CIFTI)."""
    return not model._is_volume_glm() or _is_cifti(model.mask_img_)


def _is_cifti(image) -> bool:
    from nibabel.cifti2 import Cifti2Image

    return isinstance(image, Cifti2Image)


def surface_file_names(name: str, prefix: str, image) -> dict:
    """The files of one volume derivative name for ``image``: {part: relative path}
    (``{"cifti": ...}`` for a CIFTI image)."""
    stem = name.removesuffix(_VOLUME_EXTENSION)
    if _is_cifti(image):
        return {"cifti": f"{stem}.dscalar.nii"}
    folder, _, base = stem.rpartition("/")
    if not base.startswith(prefix):
        raise InputError(f"cannot place the hemi entity in {base!r} (expected it to start with {prefix!r}).")
    return {part: f"{folder}/{prefix}_hemi-{HEMI[part]}{base[len(prefix):]}.func.gii"
            for part in image.data.parts}


def is_surface_image(image) -> bool:
    """A surface model's map: a nilearn SurfaceImage or a CIFTI-2 image."""
    return _is_cifti(image) or type(image).__name__ == "SurfaceImage"


def save_surface_map(image, name: str, prefix: str, out, dtype=np.float32) -> None:
    """Write ``image`` under the volume derivative ``name`` in its surface format (:func:`surface_file_names`):
    one GIFTI file per hemisphere (``dtype``, one data array per map column) or one CIFTI file as it is."""
    files = surface_file_names(name, prefix, image)
    if "cifti" in files:
        image.to_filename(str(out.path(files["cifti"])))
        return
    for part, relative in files.items():
        values = np.asarray(image.data.parts[part])
        gifti = gifti_image(values.reshape(len(values), -1).T, dtype=dtype)
        path = out.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        gifti.to_filename(str(path))


def mask_output(model):
    """The model's mask with 0/1 values (GIFTI has no boolean type)."""
    image = model.mask_img_
    if _is_cifti(image):
        from nibabel.cifti2 import Cifti2Image

        return Cifti2Image(np.asarray(image.get_fdata(), dtype=np.float32), image.header)
    return image


def save_surface_derivatives(model, contrasts, out_dir, *, task_label, contrast_types=None,
                             confounds=None) -> list[Path]:
    """Write a surface FirstLevelModel's derivatives/glm files; return the paths written.

    Parameters
    ----------
    model : chunkglm.glm.first_level.FirstLevelModel
        Fitted on surface runs (store mesh or CIFTI runs, or SurfaceImages).
    contrasts : dict
        ``{name: formula or weights}``, as :func:`chunkglm.glm.io.save_glm_derivatives`'s.
    out_dir : str or Path
        The derivatives/glm folder; files go to ``out_dir/first_level/sub-<subject>/``.
    task_label : str
        The task entity of the names.
    contrast_types : dict, optional
        ``{name: "t" or "F"}``.
    confounds : list of str, optional
        Confound columns for the sidecar (default: the model's).
    """
    specs = contrast_specs(contrasts, contrast_types, model.design_matrices_)
    entities = derivative_entities(model, None, None, task_label)
    metadata = derivatives_metadata(model, specs, confound_names(model, confounds))
    # the maps' space and vertex counts: readers model GIFTI maps on that space's mesh
    metadata.update(space_metadata(model.mask_img_, getattr(getattr(model, "_grid", None), "space", None)))
    names = derivative_names(specs, entities, run_entities(model) or [], len(model.design_matrices_))
    prefix = bids_filename(entities, None, None)
    with StagedOutput(out_dir) as out:
        write_description(out, "first")
        for spec in specs:
            maps = model.compute_contrast(spec.definition, stat_type=spec.stat_type, output_type="all")
            for key, name in names["maps"][spec.label].items():
                save_surface_map(maps[key], name, prefix, out)
        for design, name in zip(model.design_matrices_, names["designs"]):
            save_figure(design_matrix_figure(design), [out.path(name)])
            design.to_csv(out.path(name.removesuffix(".png") + ".tsv"), sep="\t", index=False)
        save_surface_map(mask_output(model), names["mask"], prefix, out, np.uint8)
        write_json(out.path(names["sidecar"]), metadata)
    return out.written


def permutation_fwe_surface(z_img, logp_img, alpha: float, cluster_threshold=0):
    """:func:`chunkglm.glm.io.bids.permutation_fwe_map` of a surface map: the z values where the max-T
    -log10 p exceeds -log10(alpha), 0 elsewhere, clusters of fewer than ``cluster_threshold`` adjacent
    vertices removed (each hemisphere's mesh); a CIFTI map the same over its grayordinates, where
    clusters are not formed (``cluster_threshold`` > 0 refused)."""
    cut = -math.log10(alpha)
    if _is_cifti(z_img):
        if cluster_threshold:
            raise InputError(f"cluster_threshold={cluster_threshold}: clusters are not formed on CIFTI "
                             "grayordinates; pass 0.")
        from nibabel.cifti2 import Cifti2Image

        z = np.asarray(z_img.dataobj, dtype=np.float32)
        logp = np.asarray(logp_img.dataobj, dtype=np.float64).reshape(z.shape)
        return Cifti2Image(np.where(logp > cut, z, 0).astype(np.float32), z_img.header)
    from nilearn.surface import SurfaceImage

    parts = {}
    for part, values in z_img.data.parts.items():
        z = np.asarray(values, dtype=np.float32).reshape(-1)  # one map: (n_vertices,)
        kept = np.where(np.asarray(logp_img.data.parts[part], dtype=np.float64).reshape(-1) > cut, z, 0)
        if cluster_threshold > 0:
            mesh = z_img.mesh.parts[part]
            kept = remove_small_mesh_clusters(kept, mesh_adjacency(mesh.faces, mesh.n_vertices), cluster_threshold)
        parts[part] = np.asarray(kept, dtype=np.float32)
    return SurfaceImage(z_img.mesh, parts)
