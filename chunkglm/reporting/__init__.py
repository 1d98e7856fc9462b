"""Cluster tables of statistic maps, with nilearn's names (``nilearn.reporting``).

The same table as nilearn 0.14's ``get_clusters_table`` (peaks, up to three
subpeaks per cluster at least ``min_distance`` mm apart, sizes in mm³,
clusters sorted by peak), computed cluster by cluster on each cluster's
bounding box instead of on the whole volume (see
:mod:`chunkglm.inference.clusters`). Bad inputs raise
:class:`~chunkglm.errors.InputError`; a map held as an ``xarray.DataArray``
over the cohort store's voxel axis is accepted too.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd

from chunkglm.errors import InputError
from chunkglm.inference.clusters import TABLE_COLUMNS, cluster_table_rows
from chunkglm.inference.surface_clusters import clusters_table_surface
from chunkglm.inference.thresholding import (
    like_image,
    load_stat_map,
    refuse_cifti_clusters,
    threshold_map,
)

from chunkglm.reporting.html_report import HEIGHT_DEFAULT, WIDTH_DEFAULT, HTMLReport

__all__ = ["HTMLReport", "get_clusters_table", "make_glm_report"]


def get_clusters_table(
    stat_img,
    stat_threshold,
    cluster_threshold=0,
    two_sided=False,
    min_distance=8.0,
    return_label_maps=False,
    *,
    mask_img=None,
):
    """Table of the clusters of a thresholded statistic map, with peaks and subpeaks.

    Parameters
    ----------
    stat_img : NIfTI image, path, xarray.DataArray or SurfaceImage
        One 3-D statistic map where larger values are more significant (z,
        t, -log10 p); a 4-D image of one volume counts as 3-D, more volumes
        raise nilearn's DimensionError (a TypeError). NaN and infinite values
        count as 0, with nilearn's warning. A DataArray of shape (voxel,)
        needs ``mask_img``. A SurfaceImage of one map gives nilearn 0.14.1's
        surface table: clusters of mesh neighbours per hemisphere, with
        columns "Cluster ID", "Hemisphere", "Peak Stat", "Cluster Size
        (vertices)" (see :func:`chunkglm.inference.surface_clusters.clusters_table_surface`).
        CIFTI maps are refused (no mesh in the file to find clusters on).
    stat_threshold : float
        Cluster-forming threshold, in the scale of ``stat_img``. With
        ``two_sided=False`` a negative threshold reports the clusters below it.
    cluster_threshold : int or None, default=0
        Clusters smaller than this many voxels are left out (None or 0: none).
    two_sided : bool, default=False
        Report positive clusters, then negative ones (``|stat| >
        stat_threshold``).
    min_distance : float, default=8.0
        Minimum distance between subpeaks, in mm. Not used for a
        SurfaceImage (no subpeaks): another value gives nilearn's warning.
    return_label_maps : bool, default=False
        Also return the cluster label maps (one per tail), labels numbered
        as the table's clusters (SurfaceImages for a surface map).
    mask_img : NIfTI image, path, grid or None, keyword-only
        Only for a DataArray ``stat_img``: the mask whose in-mask voxels (C
        order) form its voxel axis.

    Returns
    -------
    table : pandas.DataFrame
        Columns "Cluster ID", "X", "Y", "Z" (mm), "Peak Stat",
        "Cluster Size (mm3)"; subpeak rows have ids such as "1a" and an empty
        size.
    label_maps : list of nibabel.Nifti1Image
        Only when ``return_label_maps`` is True.

    Warns
    -----
    UserWarning
        nilearn's: non-finite values replaced with zeros; a threshold beyond
        the map's values ("But, you have given threshold=..."); no cluster
        found in a tail.
    """
    _check_table_options(stat_threshold, cluster_threshold, two_sided, min_distance)
    if mask_img is not None and not _is_data_array(stat_img):
        raise InputError(
            "mask_img is only used with a DataArray stat_img (to place its voxels); "
            f"got a {type(stat_img).__name__}. Mask the image itself instead."
        )
    if _is_surface(stat_img):
        return clusters_table_surface(stat_img, stat_threshold, cluster_threshold, two_sided,
                                      min_distance, return_label_maps)
    refuse_cifti_clusters(stat_img, "get_clusters_table")
    img, _ = load_stat_map(stat_img, mask_img)
    data = threshold_map(np.asanyarray(img.dataobj), stat_threshold, two_sided,
                         cluster_threshold or 0)
    thresholded = like_image(img, data)
    rows, label_maps, tails = cluster_table_rows(
        data, thresholded.affine, np.prod(thresholded.header.get_zooms()), stat_threshold,
        two_sided, min_distance,
    )
    for sign in (1, -1) if two_sided else (1,):
        if sign not in tails:
            side = "higher" if sign == 1 else "lower"
            warnings.warn(f"No clusters found with stat {side} than {stat_threshold * sign}",
                          UserWarning, stacklevel=2)
    table = pd.DataFrame(columns=TABLE_COLUMNS, data=rows or None)
    if not return_label_maps:
        return table
    return table, [like_image(thresholded, labels, copy_header=False) for labels in label_maps]


def _check_table_options(stat_threshold, cluster_threshold, two_sided, min_distance):
    if not isinstance(stat_threshold, numbers.Real):
        raise InputError(f"stat_threshold must be a number; got {stat_threshold!r}.")
    if two_sided and stat_threshold < 0:
        raise InputError(
            f'"threshold" should not be a negative value when two_sided=True. Got '
            f"stat_threshold={stat_threshold!r}: pass its absolute value, or two_sided=False for "
            "the clusters below it."
        )
    if cluster_threshold is not None and (
        not isinstance(cluster_threshold, numbers.Real) or cluster_threshold < 0
    ):
        raise InputError(
            f"cluster_threshold must be a number of voxels >= 0 or None; got "
            f"{cluster_threshold!r}."
        )
    if not isinstance(min_distance, numbers.Real) or min_distance <= 0:
        raise InputError(f"'min_distance' must be positive. Got min_distance={min_distance!r}: give the "
                         "minimum distance between subpeaks in mm (nilearn's default is 8).")


def _is_surface(value):
    from nilearn.surface import SurfaceImage

    return isinstance(value, SurfaceImage)


def _is_data_array(value):
    import xarray as xr

    return isinstance(value, xr.DataArray)


def make_glm_report(model, contrasts=None, first_level_contrast=None, title=None, bg_img="MNI152TEMPLATE",
                    threshold=3.09, alpha=0.001, cluster_threshold=0, height_control="fpr",
                    two_sided=False, min_distance=8.0, plot_type="slice", cut_coords=None,
                    display_mode=None, report_dims=(WIDTH_DEFAULT, HEIGHT_DEFAULT)):
    """nilearn's ``make_glm_report``: the fitted model's ``generate_report`` with these settings
    (``first_level_contrast`` only for a second-level model), with nilearn 0.14's FutureWarning."""
    warnings.warn("From release 0.15.0, make_glm_report will be deprecated. Use generate_report "
                  "method of the GLM model instead.", FutureWarning, stacklevel=2)
    settings = dict(contrasts=contrasts, title=title, bg_img=bg_img, threshold=threshold, alpha=alpha,
                    cluster_threshold=cluster_threshold, height_control=height_control,
                    two_sided=two_sided, min_distance=min_distance, plot_type=plot_type,
                    cut_coords=cut_coords, display_mode=display_mode, report_dims=report_dims)
    if str(model) == "Second Level Model":
        settings["first_level_contrast"] = first_level_contrast
    return model.generate_report(**settings)
