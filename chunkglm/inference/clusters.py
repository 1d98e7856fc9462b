"""Cluster labelling, cluster-extent filtering and cluster tables on in-memory 3-D maps.

These are global passes over one result map (a few MB), never over 4-D data.
Connectivity follows nilearn: clusters of a thresholded map are
6-connected ("faces", AFNI's NN1), positive and negative values separately.
"""

from __future__ import annotations

import warnings
from string import ascii_lowercase

import numpy as np
from scipy.ndimage import (
    find_objects,
    generate_binary_structure,
    label,
    maximum,
    maximum_filter,
    minimum,
    minimum_filter,
    sum_labels,
)

#: 6-connectivity ("faces"), nilearn's cluster definition in
#: ``threshold_img`` and ``get_clusters_table``.
FACE_CONNECTIVITY = generate_binary_structure(3, 1)


def label_clusters(binary):
    """Label the 6-connected clusters of a binary 3-D map.

    Parameters
    ----------
    binary : ndarray of bool, shape (x, y, z)
        Supra-threshold voxels.

    Returns
    -------
    labels : ndarray of int32, shape (x, y, z)
        0 outside clusters, 1..n_clusters inside, numbered in scan order
        (as :func:`scipy.ndimage.label`).
    n_clusters : int
    """
    labels, n_clusters = label(binary, FACE_CONNECTIVITY)
    return labels, int(n_clusters)


def cluster_sizes(labels, n_clusters):
    """Voxel count of every cluster.

    Parameters
    ----------
    labels : ndarray of int, shape (x, y, z)
        Output of :func:`label_clusters`.
    n_clusters : int

    Returns
    -------
    sizes : ndarray of int64, shape (n_clusters + 1,)
        ``sizes[k]`` is the size of cluster k; ``sizes[0]`` counts background.
    """
    return np.bincount(labels.ravel(), minlength=n_clusters + 1)


def apply_cluster_extent(data, cluster_threshold):
    """Zero the clusters smaller than ``cluster_threshold`` voxels.

    Same result as nilearn's ``_apply_cluster_size_threshold``: positive and
    negative voxels form clusters separately (6-connectivity) and a cluster is
    kept when it has at least ``cluster_threshold`` voxels. One labelling and
    one ``bincount`` per sign instead of one full-volume pass per cluster.

    Parameters
    ----------
    data : ndarray, shape (x, y, z)
        Map already thresholded at the voxel level (sub-threshold voxels 0).
    cluster_threshold : int or float
        Minimum cluster size, in voxels.

    Returns
    -------
    ndarray, shape (x, y, z)
        A copy of ``data`` with the small clusters set to 0.
    """
    data = np.array(data, copy=True)
    if cluster_threshold <= 0:
        return data
    for sign_mask in (data > 0, data < 0):
        labels, n_clusters = label_clusters(sign_mask)
        if n_clusters == 0:
            continue
        too_small = cluster_sizes(labels, n_clusters) < cluster_threshold
        too_small[0] = False
        data[too_small[labels]] = 0
    return data


# --- cluster tables ----------------------------------------------------------
#
# nilearn's get_clusters_table runs full-volume filters once per cluster
# (866 clusters of a 2 mm map: 134 s). Every step below only looks at a
# cluster and its 1-voxel border, so each cluster is processed on its bounding
# box (plus that border): the same arithmetic in the same order, hence the same
# table, at a cost proportional to the cluster's size.

TABLE_COLUMNS = ["Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)"]
_MAX_SUBPEAKS = 3


def cluster_table_rows(stat_map, affine, voxel_volume, stat_threshold, two_sided,
                       min_distance):
    """Rows of nilearn's cluster table for a map already thresholded.

    Parameters
    ----------
    stat_map : ndarray, shape (x, y, z)
        Thresholded statistic map (finite, sub-threshold voxels 0).
    affine : ndarray, shape (4, 4)
    voxel_volume : float
        mm³ per voxel.
    stat_threshold : float
        Cluster-forming threshold; one-sided and negative: clusters below it.
    two_sided : bool
        Positive clusters, then negative ones.
    min_distance : float
        Minimum distance between subpeaks, in mm.

    Returns
    -------
    rows : list of list
        [cluster id, x, y, z, peak stat, size in mm³ ('' for subpeaks)].
    label_maps : list of ndarray of int
        Per tail: clusters numbered 1.. by decreasing peak (0 outside).
    tails_found : list of int
        The signs (1, -1) that had supra-threshold voxels.
    """
    below = not two_sided and stat_threshold < 0
    rows, label_maps, tails_found = [], [], []
    for sign in (1, -1) if two_sided else (1,):
        signed = stat_map * sign
        binary = signed < stat_threshold if below else signed > stat_threshold
        if not binary.any():
            continue
        tails_found.append(sign)
        labels, n_clusters = label_clusters(binary)
        order = _clusters_by_peak(signed, labels, n_clusters, below)
        relabel = np.insert(order, 0, 0).argsort().astype(np.int32)
        label_maps.append(relabel[labels])
        boxes = find_objects(labels)
        offset = len(rows)
        for rank, cluster in enumerate(order, start=offset + 1):
            rows += _cluster_rows(signed, labels, cluster, boxes[cluster - 1], rank, sign,
                                  below, affine, voxel_volume, min_distance)
    return rows, label_maps, tails_found


def _clusters_by_peak(signed, labels, n_clusters, below):
    """Cluster labels sorted as nilearn sorts them (by decreasing peak)."""
    ids = np.arange(1, n_clusters + 1)
    if below:  # nilearn's min over the masked volume includes its zeros
        peaks = np.minimum(minimum(signed, labels, ids), 0)
    else:
        peaks = np.maximum(maximum(signed, labels, ids), 0)
    peaks = np.asarray(peaks, dtype=signed.dtype)
    return ids[(-peaks).argsort()]


def _cluster_rows(signed, labels, cluster, box, rank, sign, below, affine, voxel_volume,
                  min_distance):
    from nilearn.image import coord_transform

    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
                for s, n in zip(box, labels.shape))
    origin = np.array([s.start for s in box])
    in_cluster = labels[box] == cluster
    values = signed[box] * in_cluster
    if below:
        values *= -1
    size_mm3 = int(np.sum(in_cluster) * voxel_volume)
    ijk, peaks = _subpeaks(values, origin)
    ijk, peaks = _sort_and_pare(ijk, peaks, affine, min_distance)
    peaks *= sign
    xyz = np.asarray(coord_transform(ijk[:, 0], ijk[:, 1], ijk[:, 2], affine)).T
    rows = []
    for k in range(min(len(peaks), _MAX_SUBPEAKS + 1)):
        name = rank if k == 0 else f"{rank}{ascii_lowercase[k - 1]}"
        rows.append([name, *xyz[k], peaks[k], size_mm3 if k == 0 else ""])
    return rows


def _subpeaks(values, origin):
    """Local maxima of one cluster (nilearn's ``_identify_subpeaks``), in volume indices.

    ``values`` is the cluster's box, zero outside the cluster; ``origin`` is the
    box's first voxel in the volume. Plateaus of equal maxima give their
    centre of mass, moved to the nearest cluster voxel when it falls outside.
    """
    data_max = maximum_filter(values, 3)
    maxima = values == data_max
    zero = values == 0
    maxima[zero] = 0
    if not np.isclose(values[~zero].max(), values[~zero].min()):
        maxima[(data_max - minimum_filter(values, 3)) <= 0] = 0
    peak_labels, n_peaks = label(maxima)
    index = np.arange(1, n_peaks + 1)
    ijk = np.round(_center_of_mass(values, peak_labels, index, origin)).astype(int)
    local = ijk - origin
    outside = peak_labels[local[:, 0], local[:, 1], local[:, 2]] != index
    if outside.any():
        warnings.warn("Attention: At least one of the (sub)peaks falls outside of the cluster "
                      "body. Identifying the nearest in-cluster voxel.", stacklevel=4)
        local[outside] = _nearest_in_cluster(local[outside], index[outside], peak_labels)
        ijk = local + origin
    return ijk, values[local[:, 0], local[:, 1], local[:, 2]]


def _center_of_mass(values, peak_labels, index, origin):
    """scipy's ``center_of_mass`` computed with volume (not box) indices."""
    normalizer = sum_labels(values, peak_labels, index)
    grids = np.ogrid[tuple(slice(o, o + n) for o, n in zip(origin, values.shape))]
    return np.array([sum_labels(values * grid.astype(float), peak_labels, index) / normalizer
                     for grid in grids]).T.reshape(-1, 3)


def _nearest_in_cluster(points, index, peak_labels):
    voxels = np.array(peak_labels.nonzero()).T
    owners = peak_labels[peak_labels > 0]
    nearest = np.zeros_like(points)
    for k, (owner, point) in enumerate(zip(index, points)):
        candidates = voxels[owners == owner]
        nearest[k] = candidates[np.argmin(np.linalg.norm(candidates - point, axis=1))]
    return nearest


def _sort_and_pare(ijk, peaks, affine, min_distance):
    """Peaks by decreasing value, then nilearn's distance paring.

    nilearn 0.14's rule, kept for parity: for each kept peak i, every later
    peak j is set to "kept iff farther than min_distance from i", overwriting
    earlier decisions, so a subpeak closer than min_distance to the main peak
    can come back when it is far from an intermediate kept peak.
    """
    from nibabel.affines import apply_affine

    order = (-peaks).argsort()
    peaks, ijk = peaks[order], ijk[order, :]
    xyz = apply_affine(affine, ijk)
    keep = np.ones(len(peaks), dtype=bool)
    for i in range(len(peaks)):  # pairwise norms as nilearn computes them: same rounding
        if keep[i]:
            for j in range(i + 1, len(peaks)):
                keep[j] = np.linalg.norm(xyz[i, :] - xyz[j, :]) > min_distance
    return ijk[keep], peaks[keep]
