"""Second-level inputs on surfaces: nilearn's checks, mask and maps for SurfaceImage inputs.

nilearn 0.14 fits second-level models on :class:`~nilearn.surface.SurfaceImage`
maps: a list of 1-D maps (or (n_vertices, 1)), one 2-D SurfaceImage of one map
per column, or first-level models fitted on surfaces. Its mask comes from a
``SurfaceMasker`` fitted on the "sample map" (the maps side by side: vertices
finite in every map, unless a mask is given); the maps are smoothed along the
mesh when ``smoothing_fwhm`` is set. Here the same masker is fitted (nilearn's
own), and the maps are written once, on its mask, into a ``maps/`` node of a
surface grid (:func:`chunkglm.io.inputs.stage_inputs`), read by the same graph
as volume maps. Outputs are SurfaceImages (0 outside the mask, float64).
"""

from __future__ import annotations

import warnings

import numpy as np
from nilearn._utils.masker_validation import check_compatibility_mask_and_images
from nilearn.image import concat_imgs, iter_img, mean_img
from nilearn.maskers import SurfaceMasker
from nilearn.maskers.masker_validation import check_embedded_masker
from nilearn.surface import SurfaceImage
from nilearn.surface.utils import check_polymesh_equal

from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.first_level.model import FirstLevelModel
from chunkglm.glm.first_level.surface_inputs import elements_image
from chunkglm.glm.second_level import inputs
from chunkglm.io.cohort import Node
from chunkglm.io.inputs import MapsView
from chunkglm.io.surface import SurfaceGrid

__all__ = ["check_surface_images", "effect_maps", "fit_masker", "is_surface_input", "mask_elements",
           "node_maps", "nonfinite_elements", "sample_map"]


def _surface_model(model) -> bool:
    """A first-level model (chunkglm's or nilearn's) fitted on surfaces."""
    if isinstance(model, FirstLevelModel):
        return bool(getattr(model, "_surface", False))
    return isinstance(getattr(model, "masker_", None), SurfaceMasker)


def is_surface_input(second_level_input, mask=None) -> bool:
    """True for SurfaceImage maps, first-level models fitted on surfaces, a maps node of a surface
    grid, or a surface mask (SurfaceImage or SurfaceMasker)."""
    if isinstance(mask, SurfaceImage | SurfaceMasker):
        return True
    if isinstance(second_level_input, SurfaceImage):
        return True
    if isinstance(second_level_input, Node):
        return second_level_input.kind == "maps" and isinstance(second_level_input.grid, SurfaceGrid)
    if isinstance(second_level_input, list | tuple) and second_level_input:
        first = second_level_input[0]
        return isinstance(first, SurfaceImage) or (hasattr(first, "compute_contrast") and _surface_model(first))
    return False


def check_surface_images(second_level_input, none_design_matrix: bool) -> None:
    """nilearn's checks of SurfaceImage inputs, with its exception types and wording."""
    images = [second_level_input] if isinstance(second_level_input, SurfaceImage) else second_level_input
    for img in images:
        if 0 in img.shape:
            raise InputError(f"The image is empty: a SurfaceImage of shape {img.shape} holds no map to model.")
    if isinstance(second_level_input, SurfaceImage):
        if len(second_level_input.shape) == 1 or second_level_input.shape[1] == 1:
            raise InputTypeError("If a single SurfaceImage object is passed as 'second_level_input',it must "
                                 f"be a 3D SurfaceImage. Received shape {second_level_input.shape}: give a "
                                 "2-D SurfaceImage (one map per column) or a list of maps.")
        return
    for img in second_level_input:
        if len(img.shape) > 1 and img.shape[1] != 1:
            raise InputTypeError("List of SurfaceImage objects as 'second_level_input' require all images to "
                                 f"be 3D SurfaceImage. Received one of shape {img.shape}: give one map "
                                 "per SurfaceImage.")
    for img in second_level_input[1:]:
        check_polymesh_equal(second_level_input[0].mesh, img.mesh)
    if none_design_matrix:
        raise InputError("List of SurfaceImage objects as 'second_level_input' require a design matrix to be "
                         "provided (one row per map); build one with "
                         "make_second_level_design_matrix(subject_labels, confounds).")


def effect_maps(second_level_input) -> list:
    """The maps, one SurfaceImage each (a 2-D SurfaceImage split by column). Inputs are not modified
    (nilearn's ``at_least_2d`` reshapes a SurfaceImage in place: not used)."""
    if isinstance(second_level_input, SurfaceImage):
        return list(iter_img(second_level_input))
    return list(second_level_input)


def sample_map(maps):
    """nilearn's sample map: a 2-D SurfaceImage as given, else the maps' means side by side."""
    if isinstance(maps, SurfaceImage):
        return maps
    return concat_imgs([mean_img(m) for m in maps])


def fit_masker(model, sample) -> SurfaceMasker:
    """nilearn's SurfaceMasker of a second-level model (its parameters, a given masker's), fitted on
    ``sample``; a volume mask with surface maps is nilearn's TypeError."""
    check_compatibility_mask_and_images(model.mask_img, sample)
    masker = check_embedded_masker(model, masker_type="surface")
    masker.memory_level = model.memory_level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Generation of a mask.*")
        masker.fit(sample)
    return masker


def mask_elements(mask_img: SurfaceImage, parts) -> np.ndarray:
    """A SurfaceImage mask as (n_elements,) bool over the grid's ``parts`` (names, in order)."""
    missing = [p for p in parts if p not in mask_img.data.parts]
    if missing:
        raise InputError(f"the mask has no {missing} part; the maps have parts {list(parts)}.")
    return np.concatenate([np.asarray(mask_img.data.parts[p]).reshape(-1) for p in parts]) != 0


def nonfinite_elements(maps, mask: np.ndarray) -> np.ndarray:
    """Indices, among the masked elements, of those holding NaN or inf in any map (in memory).

    nilearn's SurfaceMasker hands non-finite values on (its NiftiMasker sets them to 0): its fit then
    gives NaN maps there. chunkglm's graph reads them as 0 (and warns), so the model sets them back
    to NaN in its outputs.
    """
    bad = np.zeros(int(mask.sum()), dtype=bool)
    for img in maps:
        values = np.concatenate([np.asarray(img.data.parts[p]).reshape(len(img.data.parts[p]), -1)
                                 for p in ("left", "right") if p in img.data.parts])
        bad |= ~np.isfinite(values[mask]).all(axis=1)
    return np.flatnonzero(bad)


def node_maps(node, mask_img, smoothing_fwhm) -> tuple[MapsView, SurfaceImage]:
    """A maps node of a surface grid, restricted to ``mask_img`` (SurfaceImage or fitted SurfaceMasker)
    or to nilearn's default (elements finite in every map: one pass over the maps, at fit)."""
    if smoothing_fwhm is not None:
        raise InputError("a maps node is used as stored: smoothing_fwhm applies when SurfaceImages are "
                         "loaded. Pass the SurfaceImages instead, or leave smoothing_fwhm None.")
    grid = node.grid
    if node.data().shape[0] < 2:
        raise InputError(f"the maps node {node.name!r} holds {node.data().shape[0]} map(s); a second-level "
                         "model needs at least 2.")
    if grid.kind != "mesh":
        raise InputError(f"the maps node {node.name!r} is on a CIFTI grid, not a mesh: read it with "
                         "chunkglm.glm.second_level.cifti.node_maps (SecondLevelModel does so for CIFTI nodes).")
    if mask_img is None:
        inside = np.isfinite(inputs.node_mean(node))
    else:
        if isinstance(mask_img, SurfaceMasker):
            mask_img = mask_img.mask_img_
        if not isinstance(mask_img, SurfaceImage):
            raise InputTypeError(f"Mask and input images must be of compatible types: the maps node "
                                 f"{node.name!r} is on a mesh; received a {type(mask_img).__name__} mask.")
        selected = mask_elements(mask_img, [p for p, _ in grid.parts])
        if selected.shape != grid.shape:
            raise InputError(f"mask_img has {selected.shape[0]} vertices; the maps node's mesh has {grid.shape[0]}.")
        if (selected & ~grid.mask).any():
            raise InputError(f"mask_img selects vertices that the maps node {node.name!r} does not hold; convert "
                             "the maps with this mask, or a larger one, first.")
        inside = selected[grid.mask]
    if not inside.any():
        raise InputError(f"the mask of the maps node {node.name!r} is empty: are its maps NaN everywhere?")
    view = MapsView(node, None if inside.all() else np.flatnonzero(inside))
    return view, elements_image(grid, np.ones(int(inside.sum()), dtype=bool), view.voxels, dtype=bool)
