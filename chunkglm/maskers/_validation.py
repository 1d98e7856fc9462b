"""nilearn's input checks of the maps maskers, with nilearn's exception classes and wording.

Each error's message starts with the words nilearn uses (code and tests that
match on them keep working) and goes on with what to do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.exceptions import DimensionError
from nilearn.image import concat_imgs

from chunkglm.errors import ChunkglmError, InputError, InputTypeError
from chunkglm.io.cohort import Node
from chunkglm.io.nifti import read_info


class ImageDimensionError(ChunkglmError, DimensionError):
    """nilearn's DimensionError (a TypeError): an image (or list) of the wrong dimensionality."""

    def __init__(self, file_dimension: int, required_dimension: int, remedy: str = ""):
        super().__init__(file_dimension, required_dimension)
        self.remedy = remedy

    def __str__(self):
        return (f"Input data has incompatible dimensionality: Expected dimension is "
                f"{self.required_dimension}D and you provided a {self.file_dimension}D image. "
                f"{self.remedy}").rstrip()


def check_maps_img(maps_img):
    """nilearn's TypeError for a missing or unusable maps_img."""
    if maps_img is None:
        raise InputTypeError("input should be a NiftiLike object: maps_img is None. Give a 4-D image "
                             "of probabilistic maps (a path or a nibabel image), or a 3-D one for one map.")
    if not isinstance(maps_img, str | Path | nib.spatialimages.SpatialImage):
        raise InputTypeError(f"input should be a NiftiLike object: maps_img is a {type(maps_img).__name__}. "
                             "Give a path or a nibabel image.")


def check_single_run(imgs):
    """The single-run masker refuses a list of runs, as nilearn's NiftiMapsMasker does."""
    if isinstance(imgs, list | tuple):
        raise ImageDimensionError(5, 4, "NiftiMapsMasker takes one run (a 3-D or 4-D image): for a "
                                  "list of runs, use MultiNiftiMapsMasker (chunkglm.maskers).")


def check_not_bool_dtype(dtype):
    if dtype is bool or dtype is np.bool_:
        raise InputTypeError("'dtype' cannot be bool: give a float type such as 'float32' or 'float64'.")


def fov_error(detail: str) -> str:
    """nilearn's wording for grids that differ where resampling_target=None requires them equal."""
    return f"Following field of view errors were detected:\n{detail}"


def single_run(imgs):
    """One run for NiftiMapsMasker: a list of 3-D images is one 4-D run (nilearn concatenates
    them); a list of 4-D runs raises nilearn's DimensionError."""
    if not isinstance(imgs, list | tuple):
        return imgs
    if imgs and all(_ndim(item) == 3 for item in imgs):
        return concat_imgs(list(imgs))
    raise ImageDimensionError(5, 4, "NiftiMapsMasker takes one run (a 3-D or 4-D image): for a "
                              "list of runs, use MultiNiftiMapsMasker (chunkglm.maskers).")


def _ndim(item):
    if isinstance(item, nib.spatialimages.SpatialImage):
        return len(item.shape)
    if isinstance(item, str | Path) and Path(item).is_file():
        return len(read_info(str(item)).shape)
    return None


def check_input_type(item):
    """nilearn's TypeError for inputs that are not images (a SurfaceImage, an array...)."""
    if not isinstance(item, str | Path | nib.spatialimages.SpatialImage | Node):
        raise InputTypeError(f"input should be a NiftiLike object or an iterable of NiftiLike object. "
                             f"Got: {type(item).__name__}. chunkglm's maps maskers take NIfTI paths or "
                             "images, or runs of a cohort store.")
    if isinstance(item, nib.spatialimages.SpatialImage) and 0 in item.shape:
        raise InputError(f"The image is empty: it has shape {item.shape}.")


def warn_non_finite(image):
    """nilearn's warning for NaN or infinite values in an in-memory image (they count as 0)."""
    data = image.dataobj
    if isinstance(data, np.ndarray) and data.dtype.kind == "f" and not np.isfinite(data).all():
        warnings.warn("Non-finite values detected. These values will be replaced with zeros.",
                      UserWarning, stacklevel=4)


def log(masker, step: str, item=None) -> None:
    """nilearn's masker messages on stdout, by ``verbose``: "[Class.method] message"."""
    if not masker.verbose:
        return
    text = "" if item is None else repr(item)
    if masker.verbose == 1 and len(text) > 60:
        text = text[:57] + "..."
    messages = {"load_data": f"Loading data from {text}", "load_mask": f"Loading mask from {text}",
                "load_regions": f"Loading regions from {text}", "resample_regions": "Resampling regions",
                "resample_mask": "Resampling mask", "fit_done": "Finished fit",
                "extracting": "Extracting region signals", "cleaning": "Cleaning extracted signals",
                "inverse_transform": "Computing image from signals"}
    method = {"fit_done": "fit", "extracting": "transform", "cleaning": "transform",
              "inverse_transform": "inverse_transform"}.get(step, "fit")
    print(f"[{type(masker).__name__}.{method}] {messages[step]}")
