"""FirstLevelModel on surface runs: nilearn's mask rules for SurfaceImages, and SurfaceImage outputs
(CIFTI store runs: CIFTI dense scalar outputs).

nilearn 0.14 fits first-level GLMs on 2-D :class:`~nilearn.surface.SurfaceImage`
runs (vertices x time) through a ``SurfaceMasker``. The mask is nilearn's
(computed here with nilearn's own masker, from the in-memory images: vertices
finite in every run when ``mask_img`` is None, every vertex when False, a given
mask image's or fitted masker's otherwise); the runs are then staged into the
store on that mask (:func:`chunkglm.io.inputs.stage_inputs`) and fitted by the
same graph as volumes. Outputs are SurfaceImages on the runs' mesh, float64, 0
outside the mask, shaped as nilearn's ((n_vertices,) per map, (n_vertices, k)
for k volumes).
"""

from __future__ import annotations

import numpy as np
from nilearn._utils.masker_validation import check_compatibility_mask_and_images
from nilearn.maskers import SurfaceMasker
from nilearn.maskers.masker_validation import check_embedded_masker
from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage
from nilearn.surface.utils import check_polymesh_equal

from chunkglm.errors import InputError
from chunkglm.io.cohort import Node
from chunkglm.io.surface import SurfaceGrid, cifti_header, cifti_image
from chunkglm.io.surface_convert import is_surface_input

__all__ = ["check_surface_inputs", "elements_image", "is_surface_fit", "surface_mask"]


def is_surface_fit(items, mask_img) -> bool:
    """True when the runs are SurfaceImages or surface store runs, or the mask is a surface one."""
    if isinstance(mask_img, SurfaceImage | SurfaceMasker):
        return True
    return any(isinstance(item, SurfaceImage) or is_surface_input(item)
               or (isinstance(item, Node) and isinstance(item.grid, SurfaceGrid)) for item in items)


def check_surface_inputs(items, mask_img) -> None:
    """nilearn's refusals: a volume mask with surface runs or a surface mask with volume runs
    (TypeError "Mask and input images must be of compatible types."), runs on meshes of different
    sizes (nilearn's MeshDimensionError), and runs that are not 2-D (vertices x time)."""
    files = [item for item in items if is_surface_input(item) and not isinstance(item, SurfaceImage)]
    if files:
        raise InputError(f"run_imgs holds surface files ({str(files[0])[:80]}): convert them first "
                         "(chunkglm.io.surface_convert.convert_surface_runs or convert_surface_bids) and pass "
                         "the store's runs, or load them as nilearn SurfaceImages.")
    images = [item for item in items if not isinstance(item, Node)]
    if mask_img is not False and images:
        check_compatibility_mask_and_images(mask_img, images)
    if any(isinstance(item, Node) for item in items) and images:
        raise InputError("run_imgs mixes store runs and SurfaceImages: give one kind.")
    for item in images:
        if not isinstance(item, SurfaceImage):
            raise TypeError(f"Mask and input images must be of compatible types: surface runs are "
                            f"SurfaceImages; received {type(item).__name__}.")
        if len(item.shape) != 2:
            raise InputError(f"a surface run is a 2-D SurfaceImage (vertices x time points); received shape "
                             f"{item.shape}.")
        if 0 in item.shape:
            raise InputError(f"The image is empty: a surface run of shape {item.shape} (vertices x time points) "
                             "has no value to model.")
        check_polymesh_equal(images[0].mesh, item.mesh)


def surface_mask(model, images) -> np.ndarray | None:
    """The vertices to fit, (n_vertices,) bool over the runs' parts, as nilearn's FirstLevelModel
    chooses them (None: every vertex). ``images``: the SurfaceImage runs."""
    given = model.mask_img
    if given is False:
        return None
    if isinstance(given, SurfaceMasker):  # fitted (checked as nilearn does, with its NotFittedError)
        mask = given.mask_img_
    elif isinstance(given, SurfaceImage):
        mask = SurfaceMasker(mask_img=given).fit().mask_img_
    else:  # None: nilearn's multi-run surface masker on the runs
        masker = check_embedded_masker(model, masker_type="multi_surface", ignore=["high_pass"])
        mask = masker.fit(images).mask_img_
    parts = [part for part in ("left", "right") if part in images[0].data.parts]
    missing = [part for part in parts if part not in mask.data.parts]
    if missing:
        raise InputError(f"the mask has no {missing} part; the runs have parts {parts}.")
    values = np.concatenate([np.asarray(mask.data.parts[part]).reshape(-1) for part in parts])
    return values != 0


def _polymesh(grid: SurfaceGrid):
    return PolyMesh(**{part: InMemoryMesh(*grid.meshes[part]) for part, _ in grid.parts})


def elements_image(grid: SurfaceGrid, values, selected=None, dtype=np.float64):
    """An image of ``values`` over the fitted elements, 0 outside them. ``selected``: indices into
    the stored elements (None: all).

    Mesh grids: a SurfaceImage, (voxel,) -> (n_vertices,), (k, voxel) -> (n_vertices, k).
    CIFTI grids (nilearn has no CIFTI image): a ``nibabel.cifti2.Cifti2Image`` dense scalar file of
    one map per row (maps ``map-0``...), on the runs' brain-model axis.
    """
    values = np.asarray(values, dtype=dtype)
    elements = grid.flat_index if selected is None else grid.flat_index[selected]
    full = np.zeros((grid.shape[0], *values.shape[:-1]), dtype=dtype)
    full[elements] = values.T if values.ndim == 2 else values
    if grid.kind == "cifti":
        return _cifti_image(grid, full)
    slices = grid.part_slices()
    return SurfaceImage(_polymesh(grid), {part: full[slices[part]] for part, _ in grid.parts})


def _cifti_image(grid: SurfaceGrid, full: np.ndarray):
    """A dense scalar image of ``full`` (n_elements,) or (n_elements, k), maps ``map-0``..., its own
    header built from the grid's brain-model arrays (~5 ms on a 91k axis)."""
    from nibabel.cifti2 import ScalarAxis

    rows = full.reshape(len(full), -1).T  # (maps, grayordinates)
    if rows.dtype == bool:
        rows = rows.astype(np.uint8)  # CIFTI-2 has no boolean type
    header = cifti_header(ScalarAxis([f"map-{i}" for i in range(len(rows))]), grid.cifti)
    return cifti_image(np.ascontiguousarray(rows), header)


def fitted_surface_masker(model, mask_image):
    """``masker_``: the given fitted SurfaceMasker, else one fitted on the model's mask (None for
    CIFTI runs: nilearn has no CIFTI masker)."""
    if model._grid.kind == "cifti":
        return None
    if isinstance(model.mask_img, SurfaceMasker):
        return model.mask_img
    masker = check_embedded_masker(model, masker_type="surface", ignore=["high_pass"])
    masker.mask_img = mask_image
    return masker.fit()
