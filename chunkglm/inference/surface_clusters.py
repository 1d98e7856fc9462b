"""Cluster inference and cluster tables on surface maps (nilearn ``SurfaceImage``s).

Global passes over one small map per hemisphere, with nilearn 0.14.1's
semantics and numbers:

- :func:`cluster_level_inference_surface`: All-Resolution Inference run on
  each hemisphere on its own (its own Hommel value). nilearn forms these
  clusters as runs of consecutive vertex indices, not mesh neighbours; the
  default keeps that for parity, ``mesh_adjacency=True`` forms them on the
  mesh instead (the bound stays valid for any cluster: ARI bounds every set).
- :func:`clusters_table_surface`: ``get_clusters_table`` on a surface: the map
  thresholded (mesh clusters of either sign below ``cluster_threshold``
  vertices removed), then one row per mesh cluster and hemisphere with its
  peak and its size in vertices.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from nilearn.surface import SurfaceImage

from chunkglm.errors import InputError
from chunkglm.inference.primitives import (
    apply_height_threshold,
    hommel_value,
    true_positive_fraction,
    warn_threshold_beyond_values,
)
from chunkglm.kernels.finite import NILEARN_MESSAGE, _stack_level
from chunkglm.kernels.mesh import (
    mesh_adjacency,
    mesh_clusters,
    remove_small_mesh_clusters,
    vertex_order_runs,
)

#: nilearn 0.14.1's surface cluster table columns.
SURFACE_TABLE_COLUMNS = ["Cluster ID", "Hemisphere", "Peak Stat", "Cluster Size (vertices)"]
#: nilearn's default ``min_distance`` (not used on surfaces: nilearn warns when another is given).
DEFAULT_MIN_DISTANCE = 8.0


def surface_parts(img, name="stat_img") -> dict[str, np.ndarray]:
    """The one map of a SurfaceImage, per hemisphere, as arrays of shape (n_vertices,).

    Raises
    ------
    InputError
        nilearn's "Data for each part of img should be 1D" (a ValueError) for
        more than one sample, or "The image is empty."
    """
    parts = {}
    for hemi, values in img.data.parts.items():
        values = np.asarray(values)
        if values.ndim > 2 or (values.ndim == 2 and values.shape[1] != 1):
            raise InputError(
                f"Data for each part of img should be 1D. Found: {values.shape[1]}. {name} has "
                f"data of shape {values.shape} on its {hemi} hemisphere; pass one map (one sample)."
            )
        parts[hemi] = values.reshape(values.shape[0])
    if sum(v.size for v in parts.values()) == 0:
        raise InputError(f"The image is empty. {name} has no vertex: pass a map with data.")
    return parts


def _adjacency(img, hemi):
    mesh = img.mesh.parts[hemi]
    return mesh_adjacency(mesh.faces, mesh.n_vertices)


def _surface_image(like, parts):
    return SurfaceImage(mesh=like.mesh, data=parts)


def _mask_parts(parts, mask_img):
    """In-mask vertices per hemisphere: ``mask_img``'s non-zero ones, or the finite ones
    (nilearn's SurfaceMasker rule, with its warning)."""
    if mask_img is None:
        mask = {hemi: np.isfinite(values.astype("float32")) for hemi, values in parts.items()}
        if not all(m.all() for m in mask.values()):
            warnings.warn("Non-finite values detected in the input image. The computed mask will "
                          "mask out these vertices.", UserWarning, stacklevel=_stack_level())
        return mask
    mask = {}
    for hemi, values in parts.items():
        given = np.asarray(mask_img.data.parts.get(hemi, np.zeros(0))).reshape(-1)
        if given.shape[0] != values.shape[0]:
            raise InputError(
                f"mask_img does not match stat_img's mesh on the {hemi} hemisphere ({given.shape[0]} "
                f"vertices vs {values.shape[0]}): pass a mask on stat_img's mesh."
            )
        mask[hemi] = given.astype(bool)
    return mask


def cluster_level_inference_surface(stat_img, mask_img, thresholds, alpha, verbose=0,
                                    mesh_adjacency=False):
    """All-Resolution Inference on a surface map, hemisphere by hemisphere.

    Parameters
    ----------
    stat_img : nilearn.surface.SurfaceImage
        One z map (data of shape (n_vertices,) or (n_vertices, 1) per part).
    mask_img : SurfaceImage or None
        Vertices counted (non-zero ones); None: the finite vertices.
    thresholds : list of float
        Non-negative cluster-forming z thresholds (already checked).
    alpha : float
    verbose : int, default=0
        Above 0, nilearn's figure of each hemisphere's Hommel line.
    mesh_adjacency : bool, default=False
        False: clusters are runs of consecutive vertex indices, as nilearn
        0.14.1 forms them (same numbers). True: clusters of mesh neighbours.

    Returns
    -------
    SurfaceImage
        Per vertex, the lower bound on the proportion of true discoveries of
        its cluster; 0 outside clusters and outside the mask (float64).
    """
    for name, img in (("stat_img", stat_img), ("mask_img", mask_img)):
        if img is not None and not isinstance(img, SurfaceImage):
            raise InputError(f"{name} is a {type(img).__name__} but the other image is a "
                             "SurfaceImage: give both on the same mesh (or both volumes).")
    parts = surface_parts(stat_img)
    mask = _mask_parts(parts, mask_img)
    out = {}
    for hemi, values in parts.items():
        out[hemi] = np.zeros(values.shape[0])
        in_mask = mask[hemi]
        if not in_mask.any():
            continue
        stats = values[in_mask].astype(np.float64)  # as nilearn's SurfaceMasker.transform gives them
        hommel = hommel_value(stats, alpha, verbose=verbose)
        stat_map = np.zeros(values.shape[0], dtype=stats.dtype)
        stat_map[in_mask] = stats
        adjacency = _adjacency(stat_img, hemi) if mesh_adjacency else None
        proportion = np.zeros(stats.shape[0])
        for cut in sorted(thresholds):
            if mesh_adjacency:
                labels, sizes = mesh_clusters(adjacency, stat_map > cut)
                n_clusters = sizes.size
            else:
                labels, n_clusters = vertex_order_runs(stat_map > cut)
            _set_cluster_fractions(proportion, labels[in_mask], n_clusters, stats, hommel, alpha)
        out[hemi][in_mask] = proportion
    return _surface_image(stat_img, out)


def _set_cluster_fractions(proportion, labels, n_clusters, stats, hommel, alpha):
    """Each cluster's true-discovery bound written on its members (in place)."""
    members = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[members], np.arange(1, n_clusters + 2))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            vertices = members[start:stop]
            proportion[vertices] = true_positive_fraction(stats[vertices], hommel, alpha)


def threshold_surface_parts(parts, adjacencies, threshold, two_sided, cluster_threshold):
    """nilearn's ``threshold_img`` on a surface map: vertex level, then mesh cluster extent.

    Parameters
    ----------
    parts : dict of str to ndarray of shape (n_vertices,)
    adjacencies : dict of str to sparse array
        Each hemisphere's :func:`~chunkglm.kernels.mesh.mesh_adjacency`.
    threshold : float
        See :func:`~chunkglm.inference.thresholding.apply_height_threshold`.
    two_sided : bool
    cluster_threshold : float
        Mesh clusters of non-zero vertices (either sign) smaller than this
        many vertices are removed.

    Returns
    -------
    dict of str to ndarray
        Non-finite values count as 0 (nilearn's warning).

    Warns
    -----
    UserWarning
        nilearn's: non-finite values; a threshold beyond the map's values.
    """
    parts = {hemi: np.array(values, dtype=float if values.dtype.kind in "iub" else values.dtype)
             for hemi, values in parts.items()}
    if not all(np.isfinite(values).all() for values in parts.values()):
        warnings.warn(NILEARN_MESSAGE, UserWarning, stacklevel=_stack_level())
        for values in parts.values():
            values[~np.isfinite(values)] = 0
    warn_threshold_beyond_values(np.concatenate(list(parts.values())), threshold, two_sided)
    return {hemi: remove_small_mesh_clusters(apply_height_threshold(values, threshold, two_sided),
                                             adjacencies[hemi], cluster_threshold)
            for hemi, values in parts.items()}


def clusters_table_surface(stat_img, stat_threshold, cluster_threshold=0, two_sided=False,
                           min_distance=DEFAULT_MIN_DISTANCE, return_label_maps=False):
    """nilearn 0.14.1's ``get_clusters_table`` on a SurfaceImage.

    Parameters
    ----------
    stat_img : nilearn.surface.SurfaceImage
        One statistic map.
    stat_threshold : float
        Vertex-level threshold; one-sided and negative: the clusters below it.
    cluster_threshold : int or None, default=0
        Mesh clusters smaller than this many vertices are left out.
    two_sided : bool, default=False
        Positive clusters, then negative ones (each with its own label map).
    min_distance : float, default=8.0
        Not used on surfaces (subpeaks are a volume notion): another value
        gives nilearn's warning.
    return_label_maps : bool, default=False

    Returns
    -------
    table : pandas.DataFrame
        Columns "Cluster ID" (str, numbered from 1 over hemispheres and
        tails), "Hemisphere", "Peak Stat" (the largest value of the
        cluster, as nilearn: for a negative tail, the one closest to 0),
        "Cluster Size (vertices)". Within a hemisphere, clusters come in the
        order of their lowest vertex index.
    label_maps : list of SurfaceImage
        Only with ``return_label_maps``: one per tail, vertices labelled with
        their cluster's id (0 outside clusters).
    """
    if min_distance != DEFAULT_MIN_DISTANCE:
        warnings.warn("The 'min_distance' parameter is not used for surface data and will be "
                      "ignored.", UserWarning, stacklevel=_stack_level())
    parts = surface_parts(stat_img)
    adjacencies = {hemi: _adjacency(stat_img, hemi) for hemi in parts}
    cluster_threshold = cluster_threshold or 0
    thresholded = threshold_surface_parts(parts, adjacencies, stat_threshold, two_sided,
                                          cluster_threshold)
    if not two_sided:
        table, labels, _ = _one_tail_table(thresholded, adjacencies, stat_threshold, 1)
        tables, label_parts = [table], [labels]
    else:
        tables, label_parts, offset = [], [], 1
        for sign in (1, -1):
            tail = threshold_surface_parts(thresholded, adjacencies, stat_threshold * sign, False,
                                           cluster_threshold)
            table, labels, offset = _one_tail_table(tail, adjacencies, stat_threshold * sign, offset)
            if not tables or len(table):
                tables.append(table)
            label_parts.append(labels)
    table = pd.concat(tables, ignore_index=True)
    if not return_label_maps:
        return table
    return table, [_surface_image(stat_img, labels) for labels in label_parts]


def _one_tail_table(parts, adjacencies, stat_threshold, offset):
    """Rows and label map of the mesh clusters of a one-sided thresholded map."""
    rows, labels_out = [], {}
    for hemi, values in parts.items():
        labels, sizes = mesh_clusters(adjacencies[hemi], values != 0)
        ids = np.arange(offset, offset + sizes.size)
        labels[labels > 0] += offset - 1
        members = np.argsort(labels, kind="stable")[np.count_nonzero(labels == 0):]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        peaks = [values[members[a:b]].max() for a, b in zip(starts[:-1], starts[1:])]
        rows.append(pd.DataFrame({"Cluster ID": [str(i) for i in ids], "Hemisphere": hemi,
                                  "Peak Stat": peaks, "Cluster Size (vertices)": sizes},
                                 columns=SURFACE_TABLE_COLUMNS))
        labels_out[hemi] = labels
        offset += sizes.size
    if offset == 1:  # nilearn's test: nothing found in this tail nor any before it
        warnings.warn(f"No clusters found for '{stat_threshold=}'.", UserWarning,
                      stacklevel=_stack_level())
    return pd.concat(rows, ignore_index=True), labels_out, offset
