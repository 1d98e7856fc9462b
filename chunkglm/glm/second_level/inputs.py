"""Second-level inputs: what was given, the mask, the maps to model.

nilearn's ``SecondLevelModel`` accepts 3-D images (a list, or one 4-D image),
a DataFrame of map paths, or fitted first-level models, and masks them with
a ``NiftiMasker``. Here every image input is written once into a maps node
of a cohort store (a temporary one unless the user gives a store) by
:func:`chunkglm.io.inputs.stage_inputs`; the masker's work is reproduced on
the way in, with nilearn's own functions:

- default mask: ``compute_background_mask`` of nilearn's sample map (the
  mean image of a list, the first map of a DataFrame, the first model's
  effect map of its first regressor); a user mask is used as given;
- the mask is resampled onto ``target_affine``/``target_shape`` (nearest);
- images not on the mask's grid are resampled onto it (continuous,
  clipped to the range of all inputs and 0, as ``resample_img`` on the
  concatenated images), then smoothed (``smooth_img``), then masked.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.image import mean_img, resample_img
from nilearn.masking import compute_background_mask
from nilearn.surface import SurfaceImage
from scipy.sparse import issparse

from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.first_level.model import FirstLevelModel
from chunkglm.graph.glm import stored_mean
from chunkglm.io.cohort import Node
from chunkglm.io.inputs import MapsView
from chunkglm.io.nifti import load_image as _load
from chunkglm.io.stored_blocks import StoredBlocks
from chunkglm.io.surface_maps import is_cifti_map

KINDS = ("images", "dataframe", "flm", "maps", "surface", "cifti")


# -- what was given -------------------------------------------------------------


def input_kind(second_level_input) -> str:
    """One of :data:`KINDS`, or an InputError naming what was received."""
    if isinstance(second_level_input, pd.DataFrame):
        return "dataframe"
    if isinstance(second_level_input, Node):
        if second_level_input.kind != "maps":
            raise InputError(f"a store node given as second_level_input must be a maps collection "
                             f"(cohort.maps[name]); received the run {second_level_input.name!r}.")
        return "maps"
    if isinstance(second_level_input, pd.Series):
        return "images"
    if isinstance(second_level_input, SurfaceImage):
        return "surface"
    if is_cifti_map(second_level_input) or (isinstance(second_level_input, list | tuple) and any(
            is_cifti_map(item) for item in second_level_input)):
        return "cifti"  # CIFTI-2 dense scalars (chunkglm.glm.second_level.cifti names any other item)
    if isinstance(second_level_input, str | Path | nib.spatialimages.SpatialImage):
        return "images"
    if isinstance(second_level_input, list | tuple) and second_level_input:
        if len(second_level_input) < 2:
            raise InputTypeError("A second level model requires a list with at least two first level "
                                 f"models or niimgs; received {len(second_level_input)}.")
        for index, item in enumerate(second_level_input):
            if not isinstance(item, type(second_level_input[0])) and not (
                    _is_image(item) and _is_image(second_level_input[0])):
                raise InputTypeError(
                    f"Elements of 'second_level_input' must be of the same type. Got object type "
                    f"{type(item)} at idx {index}: give all images, or all fitted FirstLevelModels.")
        if all(is_first_level_model(item) for item in second_level_input):
            return "flm"
        if all(isinstance(item, SurfaceImage) for item in second_level_input):
            return "surface"
        if all(_is_image(item) for item in second_level_input):
            return "images"
    if issparse(second_level_input):
        raise InputTypeError(f"second_level_input: sparse input is not supported (received "
                             f"{type(second_level_input).__name__}); give NIfTI images.")
    raise InputTypeError(_type_error_message(second_level_input))


def is_first_level_model(item) -> bool:
    """chunkglm's FirstLevelModel, or nilearn's own (its effect maps are nilearn's computation,
    read as images: fitted nilearn models from existing scripts can be brought to chunkglm)."""
    if isinstance(item, FirstLevelModel):
        return True
    return any(f"{cls.__module__}.{cls.__name__}" == "nilearn.glm.first_level.first_level.FirstLevelModel"
               for cls in type(item).__mro__)


def is_fitted_first_level(model) -> bool:
    if isinstance(model, FirstLevelModel):
        return hasattr(model, "_runs")
    return getattr(model, "labels_", None) is not None and getattr(model, "results_", None) is not None


def first_level_mask(model):
    """The mask image of a fitted first-level model (chunkglm's or nilearn's)."""
    if isinstance(model, FirstLevelModel):
        return model.mask_img_
    return model.masker_.mask_img_


def _is_image(item) -> bool:
    return isinstance(item, str | Path | nib.spatialimages.SpatialImage)


def _type_error_message(second_level_input) -> str:
    """nilearn's message (its wording, chunkglm's input forms added), then the remedy."""
    got = ([type(x) for x in second_level_input] if isinstance(second_level_input, list | tuple)
           else type(second_level_input))
    return ("'second_level_input' must be either:\n- a pandas DataFrame,\n- a Niimg-like object\n"
            "- a pandas Series of Niimg-like object\n- a list of Niimg-like objects\n"
            "- a list of 2D SurfaceImage objects\n- a 3D SurfaceImage object\n"
            "- a list of FirstLevelModel objects.\n- a maps node of a chunkglm cohort store.\n"
            "- CIFTI-2 dense scalar maps (.dscalar.nii paths or Cifti2Images).\n"
            f"Got {got} instead.")


def image_list(second_level_input) -> list:
    """3-D images (paths or nibabel images) of an "images" input; a 4-D one is split."""
    if isinstance(second_level_input, pd.Series):
        second_level_input = second_level_input.to_list()
    if isinstance(second_level_input, str | Path | nib.spatialimages.SpatialImage):
        img = _load(second_level_input)
        if img.ndim != 4:
            raise InputError(f"a single image given as second_level_input must be 4-D (one volume per "
                             f"map); received shape {img.shape}. Pass a list of 3-D maps instead.")
        images = [img.slicer[..., i] for i in range(img.shape[3])]
    else:
        images = list(second_level_input)
    if len(images) < 2:
        raise InputError(f"a second-level model needs at least 2 maps; received {len(images)}.")
    return images


def check_images(images, resampling: bool, remedy: str | None = None) -> None:
    """Each image is 3-D (or 4-D of one volume); all share a grid unless resampling.
    ``remedy`` replaces the message's last sentence (what to do about other grids)."""
    first = None
    for index, image in enumerate(images):
        img = _load(image)
        if not (img.ndim == 3 or (img.ndim == 4 and img.shape[3] == 1)):
            raise InputError(f"When passing a list of Nifti image, each image must be 3D, or 4D with "
                             f"single volume. Got 'second_level_input[{index}].shape={img.shape}'.")
        grid = (img.shape[:3], img.affine)
        if first is None:
            first = grid
        elif not resampling and (grid[0] != first[0] or not np.allclose(grid[1], first[1], atol=1e-4)):
            raise InputError(
                f"Following field of view errors were detected: second_level_input[{index}] is on another grid (shape {grid[0]}, affine\n{grid[1]}) than "
                f"second_level_input[0] (shape {first[0]}, affine\n{first[1]}). " + (remedy or
                "Resample the maps onto one grid, or pass target_affine and target_shape to SecondLevelModel."))


# -- the mask ---------------------------------------------------------------------


def background_mask(sample) -> nib.Nifti1Image:
    """nilearn's default second-level mask: ``compute_background_mask`` of the sample map.

    ``sample`` is a 3-D image or a list of them (their mean, as nilearn's
    ``mean_img``, is masked).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(sample, list):
            sample = mean_img([_load(s) for s in sample], copy_header=True)
        return compute_background_mask(_load(sample))


def analysis_mask(mask_img, sample, target_affine=None, target_shape=None) -> nib.Nifti1Image:
    """The mask the model uses: given or nilearn's default, then on the target grid."""
    if mask_img is None:
        mask = background_mask(sample)
    else:
        mask = _load(mask_img)
        if mask.ndim == 4 and mask.shape[3] == 1:
            mask = mask.slicer[..., 0]
        if mask.ndim != 3:
            raise InputError(f"mask_img must be a 3-D image; received shape {mask.shape}.")
    if target_affine is not None or target_shape is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = resample_img(mask, target_affine=target_affine, target_shape=target_shape,
                                interpolation="nearest", force_resample=True, copy_header=True)
    data = np.asarray(mask.dataobj) != 0
    if not data.any():
        raise InputError(
            "the mask has no voxel: " + ("mask_img is empty (on the target grid)." if mask_img is not None
                                          else "nilearn's background mask of the maps is empty "
                                               "(are the maps NaN or constant everywhere?)."))
    return nib.Nifti1Image(data.astype(np.uint8), mask.affine)


# -- a maps node given by the user -------------------------------------------------------


def node_maps(node, mask_img, target_affine, target_shape, smoothing_fwhm) -> MapsView:
    """A user's maps node, restricted to ``mask_img`` or to nilearn's default mask."""
    if not isinstance(node, Node):
        raise InputError(f"expected a maps node; received {type(node).__name__}.")
    if target_affine is not None or target_shape is not None or smoothing_fwhm is not None:
        raise InputError(
            "a maps node is used on its own grid, as stored: target_affine, target_shape and "
            "smoothing_fwhm apply when images are loaded. Pass the images (paths) instead, or "
            "leave these parameters None.")
    grid = node.grid
    if len(node.data().shape) != 2 or node.data().shape[0] < 2:
        raise InputError(f"the maps node {node.name!r} holds {node.data().shape[0]} map(s); "
                         "a second-level model needs at least 2.")
    if mask_img is None:
        selected = _node_background_mask(node)
    else:
        mask = analysis_mask(mask_img, None)
        selected = np.asarray(mask.dataobj) != 0
        if mask.shape[:3] != grid.shape or not np.allclose(mask.affine, grid.affine, atol=1e-4):
            raise InputError(f"mask_img (shape {mask.shape}) is not on the grid of the maps node "
                             f"{node.name!r} (shape {grid.shape}); resample it onto that grid.")
        if (selected & ~grid.mask).any():
            raise InputError(f"mask_img selects voxels that the maps node {node.name!r} does not hold; "
                             "convert the maps with this mask, or a larger one, first.")
    inside = selected[grid.mask]
    return MapsView(node, None if inside.all() else np.flatnonzero(inside))


def stored_maps(node, voxels=None) -> StoredBlocks:
    """A maps node's stored (image, voxel) maps as the fit reads them: by stored chunk, inside the
    tasks that use them (:func:`chunkglm.graph.glm.fit_stored`); ``voxels`` selects (sorted indices)."""
    return StoredBlocks(node.zarr_array(node.attrs["variables"][0]), voxels)


def node_mean(node) -> np.ndarray:
    """Mean over the images of a maps node's stored maps, float64 (voxel,): one read of each chunk."""
    return stored_mean(stored_maps(node))


def _node_background_mask(node) -> np.ndarray:
    """nilearn's background mask of the mean map (voxels not stored count as NaN).

    An explicit global pass over the maps (one read), done at fit.
    """
    grid = node.grid
    mean = node_mean(node)
    volume = np.full(grid.shape, np.nan)
    volume[grid.mask] = mean
    mask = np.asarray(background_mask(nib.Nifti1Image(volume, grid.affine)).dataobj) != 0
    if not mask.any():
        raise InputError(f"nilearn's background mask of the maps node {node.name!r} is empty: "
                         "are its maps NaN or constant everywhere?")
    return mask & grid.mask


def dataframe_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """nilearn's checks on a DataFrame input, and its sort by subject_label."""
    missing = [c for c in ("subject_label", "map_name", "effects_map_path") if c not in frame.columns]
    if missing:
        raise InputError(f"'second_level_input' DataFrame must have columns 'subject_label', "
                         f"'map_name' and 'effects_map_path'. It lacks {missing} (it has "
                         f"{list(frame.columns)}).")
    if not all(isinstance(s, str) for s in frame["subject_label"]):
        raise InputError("'subject_label' column must contain only strings (e.g. '01', not 1).")
    if len(frame) < 2:
        raise InputError(f"a second-level model needs at least 2 maps; the DataFrame has {len(frame)} row(s).")
    column = list(frame.columns).index("subject_label")
    rows = sorted(frame.values, key=lambda row: row[column])  # nilearn's (stable) sort
    return pd.DataFrame(rows, columns=frame.columns)


def dataframe_maps(frame: pd.DataFrame, first_level_contrast) -> list:
    """The effects_map_path entries whose map_name is ``first_level_contrast``."""
    names = list(dict.fromkeys(frame["map_name"]))
    chosen = frame[frame["map_name"] == first_level_contrast]["effects_map_path"].tolist()
    if not chosen:
        raise InputError(f"first_level_contrast={first_level_contrast!r} names no map: the DataFrame's "
                         f"map_name values are {names[:10]}.")
    return chosen
