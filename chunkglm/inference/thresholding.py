"""Voxel-level thresholds (fpr, fdr, Bonferroni, fixed), map thresholding and
All-Resolution Inference (``cluster_level_inference``).

Global passes over one 3-D result map, in memory, with nilearn 0.14's
semantics (``nilearn.glm.threshold_stats_img``): the same threshold for the
same map and the same surviving voxels. The default mask (no ``mask_img``) is
nilearn's own "background" mask, computed by nilearn, so that Bonferroni and
FDR count the same voxels.
"""

from __future__ import annotations

import numbers
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.stats import norm

from nilearn.exceptions import DimensionError

from chunkglm.errors import ChunkglmError, InputError
from chunkglm.inference.clusters import apply_cluster_extent, label_clusters
from chunkglm.inference.primitives import (
    apply_height_threshold,
    hommel_value,
    true_positive_fraction,
    warn_threshold_beyond_values,
)
from chunkglm.inference.surface_clusters import cluster_level_inference_surface
from chunkglm.io.surface_maps import is_cifti_map
from chunkglm.kernels.finite import NILEARN_MESSAGE, _stack_level

HEIGHT_CONTROLS = ("fpr", "fdr", "bonferroni", None)
#: nilearn's threshold when ``height_control=None`` and none is given.
DEFAULT_THRESHOLD = 3.0
#: The default nilearn 0.14 announces for 0.15 (its ``DEFAULT_Z_THRESHOLD``, ``norm.isf(0.001)``).
NEXT_DEFAULT_THRESHOLD = norm.isf(0.001)


class StatImageDimensionError(ChunkglmError, DimensionError):
    """nilearn's DimensionError (a TypeError): a statistic image that is not one 3-D map."""

    def __init__(self, file_dimension: int, required_dimension: int, remedy: str = ""):
        super().__init__(file_dimension, required_dimension)
        self.remedy = remedy

    def __str__(self):
        return f"{self.message} {self.remedy}".rstrip()  # nilearn's message, then the remedy


def warn_default_threshold(threshold) -> None:
    """nilearn 0.14's FutureWarning, given whenever the threshold used is 3.0."""
    warnings.warn(
        f"\nFrom nilearn version>=0.15, the default 'threshold' will be set to "
        f"{NEXT_DEFAULT_THRESHOLD}. (chunkglm follows nilearn's defaults; this warning is "
        f"nilearn's, given whenever threshold={threshold!r}: pass another value to silence it.)",
        FutureWarning,
        stacklevel=_stack_level(),
    )


def check_alpha(alpha) -> None:
    """nilearn's check (and wording) for a p- or q-value level: a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise InputError(
            f"alpha should be between 0 and 1. {alpha!r} was provided: give a p-value (fpr, "
            "bonferroni) or q-value (fdr) level such as 0.05."
        )


def fdr_threshold(z_vals, alpha):
    """Benjamini-Hochberg FDR threshold of a set of z values.

    Parameters
    ----------
    z_vals : array-like of shape (n_voxels,)
        z-variates (one-sided: large values are significant).
    alpha : float
        FDR level, in [0, 1].

    Returns
    -------
    float
        The smallest z value whose p-value passes the BH step-up criterion,
        minus 1e-12 (so that ``z >= threshold`` keeps it), or ``inf`` when
        none passes. Identical to ``nilearn.glm.fdr_threshold``.
    """
    check_alpha(alpha)
    z_sorted = -np.sort(-np.asarray(z_vals).ravel())
    p_vals = norm.sf(z_sorted)
    n_samples = len(p_vals)
    passes = p_vals < alpha * np.linspace(1 / n_samples, 1, n_samples)
    return z_sorted[passes][-1] - 1.0e-12 if passes.any() else np.inf


def height_threshold(stats, alpha, height_control, two_sided, threshold=None):
    """The voxel-level (height) threshold in z scale.

    Parameters
    ----------
    stats : ndarray of shape (n_voxels,) or None
        In-mask statistics; needed for 'fdr' and 'bonferroni' only.
    alpha : float
        p-value ('fpr', 'bonferroni') or q-value ('fdr'); halved when
        ``two_sided``.
    height_control : {'fpr', 'fdr', 'bonferroni', None}
    two_sided : bool
        Threshold ``|z|`` rather than ``z``.
    threshold : float, optional
        The threshold itself when ``height_control`` is None (default 3.0).

    Returns
    -------
    float
    """
    alpha_ = alpha / 2 if two_sided else alpha
    if height_control is None:
        return DEFAULT_THRESHOLD if threshold is None else threshold
    if height_control == "fpr":
        return norm.isf(alpha_)
    values = np.abs(stats) if two_sided else stats
    if height_control == "fdr":
        return fdr_threshold(values, alpha_)
    return norm.isf(alpha_ / np.size(values))


def threshold_stats_img(
    stat_img=None,
    mask_img=None,
    alpha=0.001,
    threshold=None,
    height_control="fpr",
    cluster_threshold=0,
    two_sided=True,
):
    """Compute the voxel-level threshold and return the thresholded map.

    Same semantics, numbers, errors and warnings as
    ``nilearn.glm.threshold_stats_img`` (nilearn 0.14).

    Parameters
    ----------
    stat_img : NIfTI image, path, xarray.DataArray, SurfaceImage, CIFTI map or None
        A 3-D statistic map (z scale), a nilearn SurfaceImage map (vertices
        counted and clusters formed on its mesh as nilearn does, see
        ``_threshold_surface``), a CIFTI-2 dense scalar (path or Cifti2Image;
        grayordinates finite in every row counted, no clusters: see
        ``_threshold_cifti``), or a 4-D image as nilearn takes it:
        the threshold is computed over the values of all its volumes and
        each volume is thresholded (clusters are formed volume by volume);
        the returned map keeps the input's shape. A DataArray holds the
        in-mask values over the store's voxel axis, shape (voxel,), and needs
        ``mask_img``. None is allowed for 'fpr' and None height control
        (threshold only).
    mask_img : NIfTI image, path, grid or None
        Voxels counted for 'fdr' and 'bonferroni' and kept in the output; on
        the grid of ``stat_img``. None: nilearn's background mask of
        ``stat_img`` (and no voxel is zeroed for being outside it). A grid is
        a chunkglm ``Grid`` (``cohort.grid(id)``). With a CIFTI ``stat_img``:
        a CIFTI dense scalar of one row on its brain-model axis (non-zero inside).
    alpha : float, default=0.001
        In [0, 1]: p-value ('fpr', 'bonferroni') or q-value ('fdr').
    threshold : float or None, default=None
        z threshold, used only when ``height_control`` is None (then None
        means 3.0, with nilearn's FutureWarning about its next default);
        with another ``height_control`` it is not used (nilearn's
        UserWarning says so).
    height_control : {'fpr', 'fdr', 'bonferroni', None}, default='fpr'
    cluster_threshold : float, default=0
        Clusters (6-connected, each sign separately) smaller than this many
        voxels are removed. CIFTI maps: must be 0 (refused otherwise).
    two_sided : bool, default=True
        Keep both tails, ``alpha`` halved.

    Returns
    -------
    thresholded_map : nibabel.Nifti1Image or None
        None when ``stat_img`` is None.
    threshold : float
        The voxel-level threshold used.

    Warns
    -----
    FutureWarning
        ``height_control=None`` with the threshold 3.0 (nilearn announces
        another default).
    UserWarning
        ``threshold`` given with a ``height_control``; the threshold above
        the map's largest (absolute) value; NaN or infinite values (set to 0).
    """
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)):
        raise InputError(f"threshold must be a number or None; got {threshold!r}.")
    if height_control is None:
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        if threshold == DEFAULT_THRESHOLD:
            warn_default_threshold(threshold)
    elif threshold is not None:
        warnings.warn(
            f"\n'threshold={float(threshold)!r}' is not used with 'height_control={height_control!r}'."
            "\n'threshold' is only used when 'height_control=None'. \n'threshold' was set to 'None'. ",
            UserWarning,
            stacklevel=_stack_level(),
        )
        threshold = None
    _check_options(alpha, height_control, cluster_threshold, two_sided)
    if stat_img is None:
        if height_control in ("fdr", "bonferroni"):
            raise InputError(
                f"'stat_img' cannot be None for height_control={height_control!r}: this control "
                "counts the map's voxels; pass stat_img."
            )
        return None, height_threshold(None, alpha, height_control, two_sided, threshold)
    if is_cifti_map(stat_img) or (mask_img is not None and is_cifti_map(mask_img)):
        return _threshold_cifti(stat_img, mask_img, alpha, threshold, height_control, cluster_threshold,
                                two_sided)
    if _is_surface(stat_img) or _is_surface(mask_img):
        return _threshold_surface(stat_img, mask_img, alpha, threshold, height_control, cluster_threshold,
                                  two_sided)
    img, mask = load_stat_map(stat_img, mask_img, volumes=True)
    data = np.asanyarray(img.dataobj)
    counted = _default_mask(img) if mask is None else mask
    cutoff = height_threshold(data[counted], alpha, height_control, two_sided, threshold)
    thresholded = threshold_map(data, cutoff, two_sided, cluster_threshold, mask)
    return like_image(img, thresholded), cutoff


def cluster_level_inference(stat_img, mask_img=None, threshold=3.0, alpha=0.05, verbose=0, *,
                            mesh_adjacency=False):
    """Proportion of truly active voxels in each cluster (All-Resolution Inference).

    Rosenblatt et al. (2018), as ``nilearn.glm.cluster_level_inference``
    (nilearn 0.14): a Hommel value over all in-mask voxels, then for each
    cluster (6-connected, ``z > threshold``) a lower bound on its proportion
    of true discoveries; with several thresholds, clusters of the higher ones
    overwrite those of the lower ones.

    Parameters
    ----------
    stat_img : NIfTI image, path, xarray.DataArray or SurfaceImage
        A 3-D z map (a 4-D image of one volume counts as 3-D; more volumes
        raise nilearn's DimensionError). A DataArray of shape (voxel,) needs
        ``mask_img``. A SurfaceImage holds one map (one sample): each
        hemisphere is then inferred on its own, as nilearn does (see
        ``mesh_adjacency`` for its clusters). CIFTI maps are refused (no mesh
        in the file to find clusters on).
    mask_img : NIfTI image, path, grid, SurfaceImage or None
        Voxels (vertices) counted; on the grid (mesh) of ``stat_img``. None:
        nilearn's background mask of ``stat_img`` (on a surface: its finite
        vertices).
    threshold : float or list of float, default=3.0
        Non-negative cluster-forming thresholds, z scale. The value 3.0 gives
        nilearn's FutureWarning about its next default.
    alpha : float, default=0.05
        In [0, 1]: level of the bound.
    verbose : int, default=0
        As nilearn: above 0, draws (matplotlib, not blocking) the sorted
        p-values of the in-mask voxels and the line giving the Hommel value,
        when that value is not trivial (some but not all p-values below
        ``alpha``).
    mesh_adjacency : bool, default=False, keyword-only
        Surfaces only (True with a volume is refused). nilearn 0.14.1 forms a
        surface's clusters as runs of consecutive vertex indices, not of mesh
        neighbours; False keeps that (nilearn's numbers), True forms them on
        the mesh (clusters of vertices sharing face edges). The bound holds
        for either: All-Resolution Inference bounds any set of vertices.

    Returns
    -------
    nibabel.Nifti1Image or SurfaceImage
        The proportion of true discoveries of each voxel's cluster (0 outside
        clusters and outside the mask), float.

    Notes
    -----
    Kept for parity with nilearn 0.14: when every in-mask voxel has
    ``p < alpha`` the Hommel value is 0 and the "proportion" is
    (n + 1) / n, slightly above 1.
    """
    if not isinstance(threshold, (list, tuple)) and threshold == DEFAULT_THRESHOLD:
        warn_default_threshold(threshold)  # nilearn compares the value as given: a list never warns
    thresholds = threshold if isinstance(threshold, (list, tuple)) else [threshold]
    if not thresholds or any(isinstance(t, bool) or not isinstance(t, numbers.Real) for t in thresholds):
        raise InputError(f"threshold must be a z value >= 0 or a list of them; got {threshold!r}.")
    if any(t < 0 for t in thresholds):
        raise InputError(
            "'threshold' cannot be negative or contain negative values. "
            f"Got: 'threshold={threshold!r}'. Give cluster-forming z values >= 0."
        )
    check_alpha(alpha)
    if _is_surface(stat_img) or _is_surface(mask_img):
        return cluster_level_inference_surface(stat_img, mask_img, list(thresholds), alpha, verbose,
                                               mesh_adjacency=mesh_adjacency)
    refuse_cifti_clusters(stat_img, "cluster_level_inference")
    if mesh_adjacency:
        raise InputError("mesh_adjacency=True is for SurfaceImage maps; a volume's clusters are "
                         "always 6-connected voxels: leave mesh_adjacency at False.")
    img, mask = load_stat_map(stat_img, mask_img)
    mask = _default_mask(img) if mask is None else mask
    stats = np.asanyarray(img.dataobj)[mask]
    hommel = hommel_value(stats, alpha, verbose=verbose)
    in_mask_map = np.zeros(mask.shape, dtype=stats.dtype)
    in_mask_map[mask] = stats
    proportion = np.zeros(stats.shape, dtype=stats.dtype)
    for cut in sorted(thresholds):
        labels, n_clusters = label_clusters(in_mask_map > cut)
        labels = labels[mask]
        members = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[members], np.arange(1, n_clusters + 2))
        for start, stop in zip(bounds[:-1], bounds[1:]):
            voxels = members[start:stop]
            proportion[voxels] = true_positive_fraction(stats[voxels], hommel, alpha)
    out = np.zeros(mask.shape, dtype=proportion.dtype)
    out[mask] = proportion
    return like_image(img, out, copy_header=False)


def threshold_map(data, threshold, two_sided, cluster_threshold=0, mask=None):
    """Voxel- then cluster-level thresholding of an in-memory map, as nilearn's ``threshold_img``.

    Parameters
    ----------
    data : ndarray, shape (x, y, z) or (x, y, z, volume)
        Statistic map(s); NaN and inf count as 0, with nilearn's warning.
        Volumes are thresholded one by one (clusters within each volume).
    threshold : float
        Voxel-level threshold (see :func:`apply_height_threshold`).
    two_sided : bool
    cluster_threshold : float, default=0
        Minimum cluster size in voxels.
    mask : ndarray of bool, shape (x, y, z), optional
        Voxels outside are set to 0.

    Returns
    -------
    ndarray, the shape of ``data``

    Warns
    -----
    UserWarning
        nilearn's: non-finite values replaced with zeros; a threshold beyond
        the (in-mask) values of the map.
    """
    if two_sided and threshold < 0:
        raise InputError(
            f'"threshold" should not be a negative value when two_sided=True. Got '
            f"threshold={threshold!r}: pass its absolute value, or two_sided=False to keep the "
            "values below it."
        )
    data = np.array(data, copy=True)
    finite = np.isfinite(data)
    if not finite.all():
        warnings.warn(NILEARN_MESSAGE, UserWarning, stacklevel=_stack_level())
        data[~finite] = 0
    if mask is not None:
        warn_threshold_beyond_values(data[mask], threshold, two_sided)
        data[~mask] = 0
    else:
        warn_threshold_beyond_values(data, threshold, two_sided)
    if data.ndim == 4:
        for volume in range(data.shape[3]):
            data[..., volume] = apply_cluster_extent(
                apply_height_threshold(data[..., volume], threshold, two_sided), cluster_threshold)
        return data
    data = apply_height_threshold(data, threshold, two_sided)
    return apply_cluster_extent(data, cluster_threshold)


def _is_surface(img) -> bool:
    from nilearn.surface import SurfaceImage

    return isinstance(img, SurfaceImage)


def _threshold_surface(stat_img, mask_img, alpha, threshold, height_control, cluster_threshold, two_sided):
    """A SurfaceImage map: the vertices counted are nilearn's SurfaceMasker's (its finite vertices,
    or ``mask_img``'s), the cut-off this module's (as for volumes); the map is then thresholded
    on its mesh by nilearn's ``threshold_img`` (clusters of adjacent vertices for
    ``cluster_threshold``): a pass over one small map, as nilearn makes it."""
    from nilearn.image import threshold_img
    from nilearn.maskers import SurfaceMasker

    masker = SurfaceMasker(mask_img=mask_img, standardize=None)
    masker = masker.fit(stat_img) if mask_img is None else masker.fit()
    stats = np.ravel(masker.transform(stat_img))
    cutoff = height_threshold(stats, alpha, height_control, two_sided, threshold)
    thresholded = threshold_img(stat_img, threshold=cutoff, cluster_threshold=cluster_threshold,
                                two_sided=two_sided, mask_img=mask_img, copy=True)
    return thresholded, cutoff


def refuse_cifti_clusters(stat_img, function: str) -> None:
    """One-line refusal of a CIFTI map where clusters are formed (nilearn reads no CIFTI, and a dense
    scalar file carries no mesh to find neighbouring vertices on)."""
    if is_cifti_map(stat_img):
        raise InputError(f"{function} received a CIFTI-2 map: its clusters need the cortex's mesh, which "
                         "a CIFTI file does not carry. Pass the cortex as a nilearn SurfaceImage on its "
                         "mesh, or threshold the map with threshold_stats_img (cluster_threshold=0).")


def _threshold_cifti(stat_img, mask_img, alpha, threshold, height_control, cluster_threshold, two_sided):
    """A CIFTI-2 dense scalar map (nilearn reads none): the grayordinates counted are those finite in
    every row, or ``mask_img``'s (one row on the same brain-model axis, non-zero inside; the others
    zeroed); one cut-off over all rows, each element thresholded as a volume's voxels are. Cortex
    vertices and subcortical voxels have no common neighbourhood here: ``cluster_threshold`` > 0 is
    refused."""
    if cluster_threshold > 0:
        raise InputError(f"cluster_threshold={cluster_threshold!r} with a CIFTI map: its grayordinates "
                         "(cortex vertices and voxels on one axis) form no clusters here. Pass "
                         "cluster_threshold=0, or threshold the cortex as a SurfaceImage.")
    img, mask = _cifti_image(stat_img, "stat_img"), None
    data = np.asarray(img.dataobj)
    counted = np.isfinite(data).all(axis=0)
    if mask_img is not None:
        given = _cifti_image(mask_img, "mask_img")
        if given.shape != (1, data.shape[1]) or given.header.get_axis(1) != img.header.get_axis(1):
            raise InputError(f"mask_img (shape {given.shape}) is not one map on stat_img's brain-model axis "
                             f"({data.shape[1]} grayordinates): give a dense scalar of one row on it.")
        counted = np.asarray(given.dataobj)[0] != 0
        mask = np.broadcast_to(counted, data.shape)
    cutoff = height_threshold(data[:, counted], alpha, height_control, two_sided, threshold)
    return type(img)(threshold_map(data, cutoff, two_sided, 0, mask), img.header), cutoff


def _cifti_image(img, argument):
    if isinstance(img, (str, Path)):
        if not Path(img).is_file():
            raise InputError(f"{argument} {str(img)!r} does not exist; pass a CIFTI-2 .dscalar.nii file.")
        img = nib.load(str(img))
    if not is_cifti_map(img):
        raise InputError(f"{argument} is a {type(img).__name__} beside a CIFTI map: give both as CIFTI-2 "
                         "dense scalars on one brain-model axis.")
    return img


def load_stat_map(stat_img, mask_img=None, volumes=False):
    """A statistic image and, when given, its boolean mask on the same grid.

    Parameters
    ----------
    stat_img : NIfTI image, path or xarray.DataArray
        A DataArray of shape (voxel,) needs ``mask_img``: its voxel axis is the
        in-mask voxels of that mask in C order (the cohort store's layout).
    mask_img : NIfTI image, path, grid or None
    volumes : bool, default=False
        Accept 4-D images, kept as they are. Otherwise a 4-D image of one
        volume is made 3-D and others raise nilearn's DimensionError.

    Returns
    -------
    img : nibabel.Nifti1Image
        3-D (or 4-D with ``volumes``).
    mask : ndarray of bool, shape (x, y, z), or None
    """
    if _is_data_array(stat_img):
        if mask_img is None:
            raise InputError(
                "stat_img is an xarray.DataArray over the voxel axis, which has no grid; "
                "pass mask_img (the mask image, or the store's grid: cohort.grid(id))."
            )
        mask, affine = _load_mask(mask_img, None)
        return _image_from_data_array(stat_img, mask, affine), mask
    img = _load_image(stat_img, volumes=volumes)
    if mask_img is None:
        return img, None
    mask, _ = _load_mask(mask_img, img)
    return img, mask


def _check_options(alpha, height_control, cluster_threshold, two_sided):
    if height_control not in HEIGHT_CONTROLS:
        raise InputError(
            f"'height_control' must be one of {list(HEIGHT_CONTROLS)}.\n'{height_control}' was "
            "provided."
        )
    check_alpha(alpha)
    if isinstance(cluster_threshold, bool) or not isinstance(cluster_threshold, numbers.Real):
        raise InputError(
            f"cluster_threshold must be a number of voxels >= 0; got {cluster_threshold!r}."
        )
    if cluster_threshold < 0:
        raise InputError(
            f"'cluster_threshold' must be > 0. Got cluster_threshold={cluster_threshold!r}: give a "
            "minimum cluster size in voxels (0 keeps every cluster)."
        )
    if not isinstance(two_sided, (bool, np.bool_)):
        raise InputError(f"two_sided must be True or False; got {two_sided!r}.")


def _default_mask(img):
    """nilearn's mask for ``mask_img=None``: the background mask of the map."""
    from nilearn.maskers import NiftiMasker

    masker = NiftiMasker(mask_strategy="background", standardize=None).fit(img)
    return np.asanyarray(masker.mask_img_.dataobj).astype(bool)


def _load_3d(stat_img):
    return _load_image(stat_img, volumes=False)


def _load_image(stat_img, volumes=False):
    if isinstance(stat_img, (str, Path)):
        if not Path(stat_img).exists():
            raise InputError(f"stat_img {str(stat_img)!r} does not exist; pass a NIfTI file.")
        stat_img = nib.load(stat_img)
    if not isinstance(stat_img, nib.spatialimages.SpatialImage):
        raise InputError(
            f"stat_img must be a NIfTI image, a path or an xarray.DataArray; got "
            f"{type(stat_img).__name__}."
        )
    shape = stat_img.shape
    if volumes and len(shape) in (3, 4):
        return stat_img
    if len(shape) == 4 and shape[3] == 1:
        stat_img = stat_img.slicer[..., 0]
    elif len(shape) != 3:
        raise StatImageDimensionError(
            len(shape), 3,
            f"stat_img must be one 3-D map; got an image of shape {shape}. "
            "Threshold each volume separately (nilearn.image.index_img).",
        )
    return stat_img


def _load_mask(mask_img, img):
    """Boolean mask and affine; checked against ``img``'s grid when given."""
    from nilearn.masking import load_mask_img

    if hasattr(mask_img, "mask") and hasattr(mask_img, "affine"):  # a chunkglm Grid
        mask_img = nib.Nifti1Image(np.asarray(mask_img.mask, dtype=np.uint8), mask_img.affine)
    mask_img = _load_3d(mask_img)
    if img is not None and not _same_grid(mask_img, img):
        raise InputError(
            f"mask_img is on another grid (shape {mask_img.shape[:3]}, affine "
            f"{np.round(mask_img.affine, 3).tolist()}) than stat_img (shape {img.shape[:3]}, "
            f"affine {np.round(img.affine, 3).tolist()}). Resample the mask first: "
            "nilearn.image.resample_to_img(mask_img, stat_img, interpolation='nearest')."
        )
    try:
        mask, affine = load_mask_img(mask_img)
    except ValueError as error:
        raise InputError(f"mask_img cannot be used as a mask: {error}") from error
    return mask, affine


def _same_grid(a, b):
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine)


def _is_data_array(value):
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        return False
    return isinstance(value, xr.DataArray)


def _image_from_data_array(values, mask, affine):
    from chunkglm.io.nifti import image_from_voxels

    values = values.squeeze(drop=True)
    n_voxels = int(mask.sum())
    if values.ndim != 1 or values.size != n_voxels:
        raise InputError(
            f"stat_img is a DataArray of shape {dict(values.sizes)}; expected one map over "
            f"the {n_voxels} in-mask voxels of mask_img. Select one image first "
            "(e.g. data.isel(image=0))."
        )
    return image_from_voxels(np.asarray(values.values), np.argwhere(mask), mask.shape,
                             affine=affine)


def like_image(img, data, copy_header=True):
    """A NIfTI image with ``img``'s affine (and header) and new data.

    Parameters
    ----------
    img : nibabel.Nifti1Image
    data : ndarray, shape (x, y, z)
    copy_header : bool, default=True

    Returns
    -------
    nibabel.Nifti1Image
        As ``nilearn.image.new_img_like`` builds it.
    """
    from nilearn.image import new_img_like

    return new_img_like(img, data, img.affine, copy_header=copy_header)
