"""NiMARE's collections and maskers as chunkglm reads them (duck typed: chunkglm never imports NiMARE).

A NiMARE ``Dataset`` or ``Studyset`` (NiMARE 0.22's preferred input) both
expose an ``images`` table (one row per analysis: ``id``, ``study_id`` and a
path column per map type, empty where the analysis has no such map), a
``metadata`` table (``sample_sizes``/``sample_size`` per analysis, a number or
a list) and a ``masker`` (a fitted nilearn masker, or None for a Studyset
without a space). This module turns them into the table of paths that
:func:`chunkglm.meta._inputs.convert_meta_maps` converts, keeping only the
analyses that hold every input the estimator reads (NiMARE's
``collect_inputs``: the others are left out, silently, as NiMARE does), and
resolves a ``mask=`` given as an image, a path, a ``NiftiMasker`` or a
``NiftiLabelsMasker``.

Resampling: NiMARE loads each image and, when its field of view differs from
the mask's, resamples it with ``nilearn.image.resample_to_img`` (default
``clip=True, interpolation="linear"``, overridden by the estimator's
``resample__*`` options). :func:`resample_paths` does the same, once, at
conversion: the resampled images are written to a temporary folder and
converted from there.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from chunkglm.errors import InputError
from chunkglm.io.scratch import TemporaryFolder

#: NiMARE's resampling defaults (``IBMAEstimator._resample_kwargs``).
RESAMPLE_DEFAULTS = {"clip": True, "interpolation": "linear", "copy_header": True}


def is_collection(obj) -> bool:
    """A NiMARE ``Dataset`` or ``Studyset`` (by its class name and tables, not by import)."""
    return type(obj).__name__ in ("Dataset", "Studyset") and hasattr(obj, "images") and hasattr(obj, "metadata")


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and not value)


def sample_size_list(value) -> list[float] | None:
    """An analysis' sample sizes as NiMARE reads them: a list of numbers, or None when absent."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not _present(value):
        return None
    values = value if isinstance(value, list | tuple) else [value]
    try:
        out = [float(v) for v in values if _present(v)]
    except (TypeError, ValueError):
        return None
    return out or None


#: NiMARE 0.0.x's image types -> today's (its Datasets and ``FFX_GLM``/``RFX_GLM`` read ``con``).
OLD_IMAGE_TYPES = {"con": "beta"}


def with_new_image_types(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with NiMARE 0.0.x's image-type columns renamed (``con`` -> ``beta``).

    A column under both names is refused: they are one map type, and which to read is not ours to guess.
    """
    old = [c for c in OLD_IMAGE_TYPES if c in table.columns]
    if not old:
        return table
    both = [c for c in old if OLD_IMAGE_TYPES[c] in table.columns]
    if both:
        raise InputError(f"the images have both {both[0]!r} and {OLD_IMAGE_TYPES[both[0]]!r} columns: "
                         f"{both[0]!r} is NiMARE 0.0.x's name for {OLD_IMAGE_TYPES[both[0]]!r} maps; keep one of them.")
    return table.rename(columns={c: OLD_IMAGE_TYPES[c] for c in old})


def table_from_collection(collection, roles) -> tuple[pd.DataFrame, object]:
    """A Dataset's or Studyset's images and sample sizes as a table, and its masker (or None).

    Parameters
    ----------
    collection : nimare.dataset.Dataset or nimare.nimads.Studyset
    roles : sequence of str
        Map types to keep as columns (those the table holds a path for); an ``images``
        column of NiMARE 0.0.x's ``con`` type is read as ``beta``.

    Returns
    -------
    table : pandas.DataFrame
        ``id``, ``study_id``, a column per map type (None where missing) and,
        when the metadata has them, ``sample_sizes`` (a list per analysis, or None).
    masker : nilearn masker or None
    """
    images = with_new_image_types(collection.images)
    table = pd.DataFrame({"id": images["id"].astype(str).to_numpy(),
                          "study_id": images["study_id"].astype(str).to_numpy()})
    for role in roles:
        if role in images.columns:
            table[role] = [v if _present(v) else None for v in images[role].to_numpy()]
    meta = collection.metadata
    column = next((c for c in ("sample_sizes", "sample_size") if c in meta.columns), None)
    if column is not None:
        by_id = dict(zip(meta["id"].astype(str), meta[column]))
        table["sample_sizes"] = [sample_size_list(by_id.get(i)) for i in table["id"]]
    return table, getattr(collection, "masker", None)


def usable_rows(table, roles, need_sample_sizes) -> np.ndarray:
    """Rows holding a path for every map type in ``roles`` (and sample sizes if needed)."""
    keep = np.ones(len(table), dtype=bool)
    for role in roles:
        keep &= np.array([_present(v) for v in table[role]]) if role in table.columns else False
    if need_sample_sizes:
        keep &= (np.array([sample_size_list(v) is not None for v in table["sample_sizes"]])
                 if "sample_sizes" in table.columns else False)
    return keep


def is_voxel_masker(mask) -> bool:
    """A nilearn masker that only selects voxels (NiftiMasker without standardize/detrend/smoothing)."""
    return (type(mask).__name__ == "NiftiMasker" and not getattr(mask, "standardize", False)
            and not getattr(mask, "detrend", False) and getattr(mask, "smoothing_fwhm", None) is None)


def is_masker(mask) -> bool:
    """Any nilearn masker (it transforms images into features and back)."""
    return hasattr(mask, "transform") and hasattr(mask, "inverse_transform")


def mask_image(mask):
    """The mask image of ``mask`` (an image, a path, a NiftiMasker or a NiftiLabelsMasker), or None."""
    if mask is None:
        return None
    if is_masker(mask) or any(hasattr(mask, a) for a in ("mask_img_", "mask_img", "labels_img")):
        img = getattr(mask, "mask_img_", None)
        if img is None:
            img = getattr(mask, "mask_img", None)
        if img is None:
            labels = getattr(mask, "labels_img", None)
            if labels is None:
                raise InputError(f"the masker {type(mask).__name__} defines no mask image (mask_img or labels_img).")
            img = _load(labels)
            return nib.Nifti1Image((np.asarray(img.dataobj) != 0).astype(np.uint8), img.affine)
        return _load(img)
    return _load(mask)


def _load(img):
    return nib.load(str(img)) if isinstance(img, str | Path) else img


def _same_fov(img, ref) -> bool:
    return img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine)


def resample_paths(table, roles, mask_img, options, folder) -> pd.DataFrame:
    """Paths of the maps not on ``mask_img``'s grid replaced by their resampled copies in ``folder``.

    As NiMARE's ``_load_image``: ``resample_to_img(img, mask_img, **options)`` only where the
    field of view differs (same shape and affine otherwise: the file is read as it is).
    """
    from nilearn.image import resample_to_img  # nilearn's resampling, as NiMARE's (imported when needed)

    reference = _load(mask_img)
    table = table.copy()
    for role in roles:
        paths = list(table[role])
        for row, path in enumerate(paths):
            img = _load(path)
            if _same_fov(img, reference):
                continue
            out = Path(folder) / f"resampled-{role}-{row:05d}.nii.gz"
            nib.save(resample_to_img(img, reference, **options), out)
            paths[row] = str(out)
        table[role] = paths
    return table


def resample_options(kwargs: dict) -> dict:
    """NiMARE's resampling options: its defaults updated with ``resample__<name>`` keywords."""
    options = dict(RESAMPLE_DEFAULTS)
    options.update({k.split("resample__", 1)[1]: v for k, v in kwargs.items()})
    return options


def masked_arrays(table, roles, masker, options) -> dict[str, np.ndarray]:
    """(K, n_features) float32 arrays of a masker that does more than select voxels
    (a NiftiLabelsMasker averages within labels): NiMARE transforms all images of an input at once."""
    from nilearn.image import concat_imgs, resample_to_img  # as NiMARE's 4-D masking path

    reference = mask_image(masker)
    if not getattr(masker, "__sklearn_is_fitted__", lambda: hasattr(masker, "mask_img_") or
                   hasattr(masker, "labels_img_"))():
        masker.fit()
    out = {}
    for role in roles:
        imgs = []
        for path in table[role]:
            img = _load(path)
            imgs.append(img if _same_fov(img, reference) else resample_to_img(img, reference, **options))
        out[role] = np.asarray(masker.transform(concat_imgs(imgs, ensure_ndim=4)), dtype=np.float32)
    return out


def temporary_folder(prefix="chunkglm-resample-"):
    """A temporary folder for resampled copies (removed once converted)."""
    return TemporaryFolder(prefix)
