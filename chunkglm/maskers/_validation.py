"""nilearn's input checks of the maps maskers, with nilearn's exception classes and wording.

Each error's message starts with the words nilearn uses (code and tests that
match on them keep working) and goes on with what to do.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.exceptions import DimensionError

from chunkglm.errors import ChunkglmError, InputTypeError


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
