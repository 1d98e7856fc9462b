"""Second-level inputs on CIFTI-2 grayordinates: dense scalar maps, their mask, CIFTI outputs.

nilearn has no CIFTI image (its SecondLevelModel takes NIfTI maps and
SurfaceImages); chunkglm fits the same OLS model on grayordinates (cortex
vertices and subcortical voxels as one element axis, the brain-model axis of
the maps kept whole). Inputs: CIFTI-2 dense scalar maps (``*.dscalar.nii``
paths or nibabel ``Cifti2Image``s, one map each, or one file of several maps),
a maps node of a CIFTI grid, or chunkglm FirstLevelModels fitted on CIFTI store
runs (their effect maps are Cifti2Images). The rules, nilearn's where it has
one for a like input:

- the default mask is the elements finite in every map (nilearn's
  SurfaceMasker rule: no background rule applies to grayordinates); a mask is
  a dense scalar map of one row on the maps' brain-model axis (non-zero inside);
- non-finite values inside a given mask count as 0 with chunkglm's warning
  (nilearn's NiftiMasker rule for array inputs);
- ``smoothing_fwhm``, ``target_affine`` and ``target_shape`` are refused
  (grayordinates have no geometry to smooth along or resample onto here);
- outputs are dense scalar Cifti2Images on the maps' brain-model axis, 0
  outside the mask; ``masker_`` is None (nilearn has no CIFTI masker).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.first_level.model import FirstLevelModel
from chunkglm.glm.first_level.surface_inputs import elements_image
from chunkglm.glm.second_level import inputs
from chunkglm.io.cohort import Node
from chunkglm.io.inputs import MapsView
from chunkglm.io.surface import SurfaceGrid
from chunkglm.io.surface_convert import cifti_shape
from chunkglm.io.surface_maps import is_cifti_image, is_cifti_map

__all__ = ["check_options", "count_maps", "is_cifti_input", "map_list", "mask_elements", "mask_image",
           "node_maps", "sample_mask"]


def _cifti_model(model) -> bool:
    """A chunkglm FirstLevelModel fitted on CIFTI store runs."""
    grid = getattr(model, "_grid", None) if isinstance(model, FirstLevelModel) else None
    return isinstance(grid, SurfaceGrid) and grid.kind == "cifti"


def is_cifti_input(second_level_input) -> bool:
    """True for CIFTI dense scalar maps (one, or a list), a maps node of a CIFTI grid, or
    FirstLevelModels fitted on CIFTI runs."""
    if isinstance(second_level_input, Node):
        grid = second_level_input.grid if second_level_input.kind == "maps" else None
        return isinstance(grid, SurfaceGrid) and grid.kind == "cifti"
    if is_cifti_map(second_level_input):
        return True
    if isinstance(second_level_input, list | tuple) and second_level_input:
        first = second_level_input[0]
        return is_cifti_map(first) or _cifti_model(first)
    return False


def _load(item):
    return item if is_cifti_image(item) else nib.load(str(_existing(item)))


def map_list(second_level_input) -> list:
    """The CIFTI maps as given: one file or image (of several maps) or a list of them, each a
    dense scalar path or Cifti2Image (anything else in the list: one line naming it)."""
    items = list(second_level_input) if isinstance(second_level_input, list | tuple) else [second_level_input]
    for index, item in enumerate(items):
        if not is_cifti_map(item):
            raise InputTypeError(f"second_level_input[{index}] is a {type(item).__name__} "
                                 f"({str(item)[:60]!r}) among CIFTI maps: give all maps as CIFTI-2 dense "
                                 "scalars (.dscalar.nii paths or nibabel Cifti2Images).")
    return items


def count_maps(items) -> int:
    """The number of maps in CIFTI dense scalar files or images (rows of each; NIfTI headers only)."""
    return sum(int(item.shape[0]) if is_cifti_image(item) else int(cifti_shape(_existing(item))[0])
               for item in items)


def _existing(path):
    if not Path(path).is_file():
        raise InputError(f"the CIFTI map {str(path)!r} does not exist; give existing .dscalar.nii files.")
    return path


def check_options(maps_are_cifti: bool, target_affine, target_shape, smoothing_fwhm, mask_img) -> None:
    """Refuse what does not apply to grayordinates, and a CIFTI mask with other maps (or the
    reverse), before anything is read."""
    if not maps_are_cifti:
        if mask_img is not None and is_cifti_map(mask_img):
            raise InputTypeError("Mask and input images must be of compatible types: mask_img is a CIFTI "
                                 "dense scalar, the maps are not CIFTI grayordinates. Give a mask of the "
                                 "maps' kind (NIfTI, SurfaceImage), or CIFTI maps.")
        return
    given = [name for name, value in (("target_affine", target_affine), ("target_shape", target_shape),
                                      ("smoothing_fwhm", smoothing_fwhm)) if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} given with CIFTI maps: grayordinates are used as stored "
                         "(no resampling, no smoothing along a mesh here). Leave them None, or smooth "
                         "the maps before (e.g. wb_command -cifti-smoothing).")
    if mask_img is not None and not is_cifti_map(mask_img):
        raise InputTypeError(f"Mask and input images must be of compatible types: the maps are CIFTI "
                             f"grayordinates; received a {type(mask_img).__name__} mask. Give a CIFTI "
                             "dense scalar mask (one map, non-zero inside) on the maps' brain-model axis.")


def mask_elements(mask_img, grid: SurfaceGrid) -> np.ndarray:
    """A CIFTI mask (path or Cifti2Image, one map) as (n_elements,) bool over ``grid``'s elements."""
    img = _load(mask_img)
    axis = img.header.get_axis(1)
    if img.shape[0] != 1 or axis != grid.brain_models:
        raise InputError(f"the CIFTI mask (shape {img.shape}) is not one map on the maps' brain-model axis "
                         f"({grid.shape[0]} grayordinates): give a dense scalar of one row on that axis.")
    return np.asarray(img.dataobj)[0] != 0


def mask_image(grid: SurfaceGrid, inside: np.ndarray):
    """The analysed elements (indices into the grid's stored elements) as a uint8 CIFTI map."""
    return elements_image(grid, np.ones(len(inside), dtype=bool), inside, dtype=bool)


def _selected(grid: SurfaceGrid, selected: np.ndarray, what: str) -> np.ndarray:
    """``selected`` (n_elements,) bool as indices into the grid's stored elements."""
    if (selected & ~grid.mask).any():
        raise InputError(f"mask_img selects grayordinates that {what} does not hold; convert the maps "
                         "with this mask, or a larger one, first.")
    inside = np.flatnonzero(selected[grid.mask])
    if inside.size == 0:
        raise InputError(f"the mask of {what} is empty: are its maps NaN everywhere, or mask_img all 0?")
    return inside


def node_maps(node, mask_img) -> tuple[MapsView, object]:
    """A maps node of a CIFTI grid restricted to ``mask_img`` or to the elements finite in every map
    (one pass over the maps, at fit), and the mask as a CIFTI image."""
    grid = node.grid
    if node.data().shape[0] < 2:
        raise InputError(f"the maps node {node.name!r} holds {node.data().shape[0]} map(s); a second-level "
                         "model needs at least 2.")
    if mask_img is None:
        selected = np.zeros(grid.shape, dtype=bool)
        selected[grid.flat_index] = np.isfinite(inputs.node_mean(node))
    else:
        selected = mask_elements(mask_img, grid)
    inside = _selected(grid, selected, f"the maps node {node.name!r}")
    view = MapsView(node, None if inside.size == grid.n_voxels else inside)
    return view, mask_image(grid, inside)


def sample_mask(sample, mask_img, grid: SurfaceGrid):
    """First-level models' maps: the mask as a CIFTI image, ``mask_img``'s or the elements finite
    in the sample map (the first model's first effect map, nilearn's sample)."""
    if mask_img is not None:
        selected = mask_elements(mask_img, grid)
    else:
        selected = np.isfinite(np.asarray(sample.dataobj, dtype=np.float64)).all(axis=0)
    return mask_image(grid.with_mask(np.ones(grid.shape, dtype=bool)),
                      _selected(grid.with_mask(np.ones(grid.shape, dtype=bool)), selected, "the maps"))
