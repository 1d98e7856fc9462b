"""Clusters of vertices on one hemisphere's mesh: adjacency, labelling, extent filtering.

Pure numpy/scipy on one small map of shape (n_vertices,) — the global
cluster passes of surface results (a few hundred kB), never 4-D data. Two
cluster definitions exist because nilearn 0.14.1 uses both on surfaces:

- mesh clusters (:func:`mesh_clusters`): connected components of the
  supra-threshold vertices in the graph of mesh edges (two vertices are
  neighbours when they share a face edge). nilearn's ``threshold_img``
  (``cluster_threshold``) and ``get_clusters_table`` form these.
- vertex-order runs (:func:`vertex_order_runs`): runs of consecutive vertex
  indices, which is what nilearn's ``cluster_level_inference`` forms on a
  surface (``scipy.ndimage.label`` on the vertex axis); kept for its numbers.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph


def mesh_adjacency(faces, n_vertices) -> sparse.csr_array:
    """Symmetric vertex adjacency of a triangle mesh.

    Parameters
    ----------
    faces : ndarray of int, shape (n_faces, 3)
        Vertex indices of each triangle.
    n_vertices : int

    Returns
    -------
    scipy.sparse.csr_array of shape (n_vertices, n_vertices)
        1 where two distinct vertices share a face edge, 0 elsewhere (each
        edge counted once however many faces share it).
    """
    faces = np.asarray(faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (n_faces, 3); got {faces.shape}.")
    first = faces[:, [0, 0, 1]].ravel()
    second = faces[:, [1, 2, 2]].ravel()
    rows = np.concatenate([first, second])
    cols = np.concatenate([second, first])
    graph = sparse.coo_array((np.ones(rows.size, dtype=np.int8), (rows, cols)),
                             shape=(n_vertices, n_vertices)).tocsr()
    graph.data[:] = 1  # an edge shared by two faces was summed twice
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def mesh_clusters(adjacency, supra) -> tuple[np.ndarray, np.ndarray]:
    """Connected clusters of the ``supra`` vertices on the mesh.

    Parameters
    ----------
    adjacency : scipy.sparse array, shape (n_vertices, n_vertices)
        Output of :func:`mesh_adjacency`.
    supra : ndarray of bool, shape (n_vertices,)
        Vertices that may belong to a cluster.

    Returns
    -------
    labels : ndarray of int64, shape (n_vertices,)
        0 outside clusters, 1..n_clusters inside, numbered by each cluster's
        lowest vertex index (the order nilearn's ``find_surface_clusters``
        gives them).
    sizes : ndarray of int64, shape (n_clusters,)
        Vertex count of clusters 1..n_clusters.
    """
    supra = np.asarray(supra, dtype=bool)
    labels = np.zeros(supra.shape[0], dtype=np.int64)
    members = np.flatnonzero(supra)
    if members.size == 0:
        return labels, np.zeros(0, dtype=np.int64)
    sub = sparse.csr_array(adjacency)[members][:, members]
    _, components = csgraph.connected_components(sub, directed=False)
    # renumber by first member (members are sorted, so by lowest vertex index)
    _, first = np.unique(components, return_index=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, first.size + 1)
    labels[members] = rank[components]
    return labels, np.bincount(labels, minlength=first.size + 1)[1:]


def vertex_order_runs(supra) -> tuple[np.ndarray, int]:
    """Runs of consecutive supra-threshold vertex indices (not mesh neighbours).

    Parameters
    ----------
    supra : ndarray of bool, shape (n_vertices,)

    Returns
    -------
    labels : ndarray of int32, shape (n_vertices,)
        0 outside runs, 1..n_runs in vertex order.
    n_runs : int
    """
    labels, n_runs = ndimage.label(np.asarray(supra, dtype=bool).ravel())
    return labels, int(n_runs)


def remove_small_mesh_clusters(values, adjacency, cluster_threshold) -> np.ndarray:
    """Zero the mesh clusters of non-zero vertices smaller than ``cluster_threshold``.

    As nilearn 0.14.1's ``threshold_img`` on a surface: every non-zero vertex
    (either sign: positive and negative neighbours join one cluster) counts.

    Parameters
    ----------
    values : ndarray, shape (n_vertices,)
        A map already thresholded at the vertex level (sub-threshold 0).
    adjacency : scipy.sparse array, shape (n_vertices, n_vertices)
    cluster_threshold : float
        Minimum cluster size, in vertices; <= 0 keeps everything.

    Returns
    -------
    ndarray, shape (n_vertices,)
        A copy of ``values`` with the small clusters set to 0.
    """
    values = np.array(values, copy=True)
    if cluster_threshold <= 0:
        return values
    labels, sizes = mesh_clusters(adjacency, values != 0)
    too_small = np.concatenate([[False], sizes < cluster_threshold])
    values[too_small[labels]] = 0
    return values
