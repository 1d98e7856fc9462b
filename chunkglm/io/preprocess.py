"""Spatial preprocessing applied while converting: resampling and smoothing.

nilearn's maskers resample a 4-D image (continuous interpolation) and then
smooth it before masking; both act on each volume independently, so doing
them volume by volume inside the streaming conversion gives the same numbers
without ever holding the 4-D image. nilearn's own functions do the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from chunkglm.errors import InputError


@dataclass(frozen=True)
class SpatialPreprocessing:
    """What to do to every volume before masking (all None: nothing).

    Attributes
    ----------
    target_affine : ndarray (4, 4) or None
    target_shape : tuple of 3 int or None
    smoothing_fwhm : float or None
        Gaussian FWHM in mm, as nilearn's ``smooth_img``.
    """

    target_affine: np.ndarray | None = None
    target_shape: tuple | None = None
    smoothing_fwhm: float | None = None

    def __post_init__(self):
        if (self.target_affine is None) != (self.target_shape is None):
            raise InputError("give target_affine and target_shape together (a 4x4 affine and a 3-D shape).")
        if self.target_affine is not None and np.asarray(self.target_affine).shape != (4, 4):
            raise InputError(f"target_affine must be 4x4; received shape {np.asarray(self.target_affine).shape}.")

    @property
    def active(self) -> bool:
        """True when volumes are changed at all."""
        return self.target_affine is not None or self.smoothing_fwhm is not None

    def grid(self, affine, shape):
        """The (affine, shape) of the output volumes."""
        if self.target_affine is None:
            return np.asarray(affine), tuple(shape)
        return np.asarray(self.target_affine, dtype=float), tuple(int(n) for n in self.target_shape)

    def apply(self, volume: np.ndarray, affine: np.ndarray, clip_range=None) -> np.ndarray:
        """One 3-D volume on the source grid -> the processed volume (float32).

        ``clip_range``: nilearn clips resampled data to the range of the whole
        4-D input (and 0), not of each volume; the caller passes that range.
        """
        resample_img, smooth_img = _nilearn_image()
        img = nib.Nifti1Image(volume, affine)
        if self.target_affine is not None:
            img = resample_img(img, target_affine=self.target_affine, target_shape=self.target_shape,
                               interpolation="continuous", force_resample=True, copy_header=True,
                               clip=False)
            if clip_range is not None:
                img = nib.Nifti1Image(np.asarray(img.dataobj).clip(*clip_range), img.affine, img.header)
        if self.smoothing_fwhm is not None:
            img = smooth_img(img, self.smoothing_fwhm)
        return np.asarray(img.dataobj, dtype=np.float32)

    def needs_range(self) -> bool:
        """Resampling clips to the whole input's range: a first pass must find it."""
        return self.target_affine is not None

    def resample_mask(self, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """A mask on the source grid -> the output grid (nearest, as nilearn's maskers)."""
        if self.target_affine is None:
            return mask
        resample_img, _ = _nilearn_image()
        img = resample_img(nib.Nifti1Image(mask.astype(np.uint8), affine), target_affine=self.target_affine,
                           target_shape=self.target_shape, interpolation="nearest",
                           force_resample=True, copy_header=True)
        return np.asarray(img.dataobj) != 0

    def to_attrs(self) -> dict:
        """JSON-able record stored with each run."""
        return {
            "target_affine": None if self.target_affine is None else np.asarray(self.target_affine).tolist(),
            "target_shape": None if self.target_shape is None else list(self.target_shape),
            "smoothing_fwhm": self.smoothing_fwhm,
        }


def _nilearn_image():
    """nilearn's ``resample_img`` and ``smooth_img``, imported when a run is resampled or smoothed.

    ``nilearn.image`` brings scikit-learn and scipy.stats (~100 MiB resident): every worker that
    converts a run imports this module (its jobs carry a :class:`SpatialPreprocessing`), and most
    conversions neither resample nor smooth.
    """
    from nilearn.image import resample_img, smooth_img

    return resample_img, smooth_img
