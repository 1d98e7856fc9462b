"""Whole-volume permutation statistics: cluster size, cluster mass and TFCE as nilearn.

Pure numpy/scipy on whole 3-D volumes; no dask. These are the statistics of
nilearn 0.14's ``permuted_ols(..., threshold=..., tfce=True)`` that need a
voxel's neighbours, so they cannot be computed voxel block by voxel block:

- clusters are face-connected (``generate_binary_structure(3, 1)``);
  one-sided tests keep t > u, two-sided tests label t > u and t < -u
  separately; a cluster's size counts its voxels, its mass sums |t| - u;
- TFCE follows nilearn's ``calculate_tfce`` step by step (100 heights from
  max t / 100 to max t, extent^0.5 * height^2 per height, not times dh, as
  fslmaths), so the sums are taken in nilearn's order;
- cluster p-values use nilearn's ``null_to_p`` ("larger", clipped to
  [1/n_perm, 1 - 1/n_perm]); TFCE and max-T p-values use the
  (n_perm + 1) rank formula.

Volumes are cropped to the bounding box of the mask: voxels outside the mask
are zero (background) in nilearn's volumes, so labels and sums are unchanged;
only the maximum of a one-sided t map, which nilearn takes over the whole
volume, must still see those zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse, stats
from scipy.sparse import csgraph

from chunkglm.errors import InputError
from chunkglm.kernels.permutation import PermutationDesign, original_equivalents, original_t

#: nilearn's connectivity for clusters and TFCE: faces only.
FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)
_TFCE_STEPS, _TFCE_E, _TFCE_H = 100, 0.5, 2
_SPARSE_TFCE_MIN_BOX = 32768  # a graph per height costs ~0.3 ms: label small boxes instead
_GEMM_BYTES, _GEMM_MAX_GROUP = 8 * 2**20, 64  # products of one permutation GEMM


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the V in-mask voxels sit in the cropped bounding box of the mask.

    Attributes
    ----------
    box_mask : ndarray of bool, 3-D
        The mask cropped to its bounding box; its true voxels in C order are
        the V voxels of the (sample, voxel) maps.
    has_background : bool
        True when the full mask has voxels outside it (nilearn's volumes then
        hold zeros that enter the maximum of a one-sided t map).
    edges : ndarray of shape (n_edges, 2), intp
        Pairs of face-neighbouring in-mask voxels (voxel indices, each pair once).
    neighbours : ndarray of shape (n_voxels, 6), intp
        Each voxel's face neighbours in the mask; ``n_voxels`` where there is none.
    """

    box_mask: np.ndarray
    has_background: bool
    edges: np.ndarray
    neighbours: np.ndarray

    @property
    def n_voxels(self) -> int:
        """V, the number of in-mask voxels."""
        return int(np.count_nonzero(self.box_mask))

    def to_volume(self, values) -> np.ndarray:
        """(V,) voxel values into a box volume, zero outside the mask."""
        volume = np.zeros(self.box_mask.shape, dtype=np.asarray(values).dtype)
        volume[self.box_mask] = values
        return volume


def volume_geometry(mask) -> VolumeGeometry:
    """Crop a 3-D boolean mask to its bounding box.

    Parameters
    ----------
    mask : array-like of bool, 3-D
        The mask whose true voxels, in C order, are the columns of the maps.

    Returns
    -------
    VolumeGeometry
    """
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.dtype != np.bool_:
        raise InputError(f"mask must be a 3-D boolean array; received an array of shape "
                         f"{mask.shape} and dtype {mask.dtype}. Pass the mask image's data "
                         "as a boolean array (e.g. mask_img.get_fdata() > 0).")
    if not mask.any():
        raise InputError("mask has no true voxel; cluster and TFCE inference need a "
                         "non-empty mask.")
    box = tuple(slice(int(np.min(ix)), int(np.max(ix)) + 1) for ix in np.nonzero(mask))
    box_mask = np.ascontiguousarray(mask[box])
    edges = _face_edges(box_mask)
    return VolumeGeometry(box_mask, bool(not mask.all()), edges,
                          _neighbours(edges, int(np.count_nonzero(box_mask))))


def _neighbours(edges, n_voxels):
    both = np.concatenate([edges, edges[:, ::-1]])
    both = both[np.argsort(both[:, 0], kind="stable")]
    counts = np.bincount(both[:, 0], minlength=n_voxels)
    slot = np.arange(both.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.full((n_voxels, 6), n_voxels, dtype=np.intp)
    table[both[:, 0], slot] = both[:, 1]
    return table


def _face_edges(box_mask):
    index = np.full(box_mask.shape, -1, dtype=np.intp)
    index[box_mask] = np.arange(np.count_nonzero(box_mask))
    pairs = []
    for axis in range(3):
        lower = index[tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))]
        upper = index[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))]
        keep = (lower >= 0) & (upper >= 0)
        pairs.append(np.stack([lower[keep], upper[keep]], axis=1))
    return np.concatenate(pairs)


def cluster_forming_t(threshold, two_sided_test, n_samples, n_confound_columns) -> float:
    """nilearn's t threshold for a cluster-forming p-value threshold.

    Parameters
    ----------
    threshold : float
        Uncorrected p-value in (0, 1).
    two_sided_test : bool
        Split ``threshold`` between the two tails.
    n_samples : int
    n_confound_columns : int
        Confound columns as nilearn counts them (after dropping constant
        columns and adding its intercept), not their rank.

    Returns
    -------
    float
        ``t.isf(threshold / 2 if two-sided else threshold, n - 1 - n_confound_columns)``;
        NaN without residual degrees of freedom (nilearn's value: no voxel exceeds it, so
        there is no cluster).
    """
    numeric = isinstance(threshold, (int, float, np.floating, np.integer))
    if isinstance(threshold, bool) or not numeric or not 0 < threshold < 1:
        raise InputError(f"threshold is the cluster-forming p-value and must lie in (0, 1); "
                         f"received {threshold!r}. For example threshold=0.001.")
    dof = n_samples - (1 + n_confound_columns)
    threshold_t = float(stats.t.isf(threshold / 2 if two_sided_test else threshold, df=dof))
    if dof <= 0:  # no residual degrees of freedom: nilearn's threshold is NaN, no voxel exceeds it
        return float("nan")
    if not threshold_t > 0:  # nilearn would then treat the background as one cluster
        raise InputError(f"threshold={threshold!r} gives a cluster-forming t of {threshold_t:.3g} "
                         "<= 0, so every voxel would belong to a cluster. Give a p-value below "
                         "0.5 (one-sided) or 1 (two-sided), usually 0.001 to 0.01.")
    return threshold_t


def _labels(volume, threshold_t, two_sided_test):
    """Cluster labels (0 = background) of t > u, and of t < -u after them when two-sided."""
    labels, n_positive = ndimage.label(volume > threshold_t, FACE_CONNECTIVITY)
    if two_sided_test:
        negative, _ = ndimage.label(volume < -threshold_t, FACE_CONNECTIVITY)
        labels = labels + np.where(negative > 0, negative + n_positive, 0)
    return labels


def _size_and_mass(volume, labels, threshold_t):
    """Per-label size (int) and mass (sum of |t| - u); label 0 (background) gets 0."""
    flat = labels.ravel()
    sizes = np.bincount(flat)
    weights = np.where(flat > 0, np.abs(volume.ravel()) - threshold_t, 0.0)
    masses = np.bincount(flat, weights=weights, minlength=sizes.size)
    sizes[0], masses[0] = 0, 0.0
    return sizes, masses


def cluster_maps(volume, threshold_t, two_sided_test):
    """Size and mass of the cluster each voxel belongs to (nilearn's ``size``/``mass`` maps).

    Parameters
    ----------
    volume : ndarray, 3-D
        t map, zero outside the mask.
    threshold_t : float
        Cluster-forming t threshold (see :func:`cluster_forming_t`).
    two_sided_test : bool

    Returns
    -------
    size_volume : ndarray of int, 3-D
        0 outside clusters.
    mass_volume : ndarray of float64, 3-D
        0 outside clusters.
    sizes, masses : ndarray of shape (n_clusters + 1,)
        Per cluster, index 0 the background (0), as nilearn feeds to ``null_to_p``.
    """
    labels = _labels(volume, threshold_t, two_sided_test)
    sizes, masses = _size_and_mass(volume, labels, threshold_t)
    return sizes[labels], masses[labels], sizes, masses


def max_cluster_measures(volume, threshold_t, two_sided_test):
    """Largest cluster size and mass of one t map (nilearn's ``calculate_cluster_measures``).

    Parameters
    ----------
    volume : ndarray, 3-D
        t map, zero outside the mask.
    threshold_t : float
    two_sided_test : bool

    Returns
    -------
    max_size : int
        0 when no voxel passes the threshold.
    max_mass : float
        0.0 when no voxel passes the threshold.
    """
    labels = _labels(volume, threshold_t, two_sided_test)
    sizes, masses = _size_and_mass(volume, labels, threshold_t)
    return int(sizes.max()), float(max(masses.max(), 0.0))


def max_cluster_measures_voxels(values, geometry: VolumeGeometry, threshold_t, two_sided_test):
    """:func:`max_cluster_measures` on in-mask voxel values, on the supra-threshold voxels only.

    Parameters
    ----------
    values : ndarray of shape (n_voxels,)
        t-scores of the in-mask voxels.
    geometry : VolumeGeometry
    threshold_t : float
        Positive cluster-forming t threshold.
    two_sided_test : bool

    Returns
    -------
    max_size : int
    max_mass : float

    Notes
    -----
    Clusters are the connected components of the graph of face edges between
    supra-threshold voxels of the same sign, so the cost follows the (small)
    supra-threshold set rather than the volume.
    """
    n_voxels = values.shape[0]
    side = np.zeros(n_voxels + 1, dtype=np.int8)  # +1: the "no neighbour" slot stays 0
    side[:n_voxels][values > threshold_t] = 1
    if two_sided_test:
        side[:n_voxels][values < -threshold_t] = -1
    active = np.flatnonzero(side)
    if active.size == 0:
        return 0, 0.0
    near = geometry.neighbours[active]
    keep = side[near] == side[active][:, None]
    position = np.zeros(n_voxels + 1, dtype=np.intp)
    position[active] = np.arange(active.size)
    rows = np.broadcast_to(np.arange(active.size)[:, None], near.shape)[keep]
    graph = sparse.coo_array((np.ones(rows.size), (rows, position[near[keep]])),
                             shape=(active.size, active.size)).tocsr()
    _, labels = csgraph.connected_components(graph, directed=False)
    masses = np.bincount(labels, weights=np.abs(values[active]) - threshold_t)
    return int(np.bincount(labels).max()), float(max(masses.max(), 0.0))


def tfce_volume(volume, two_sided_test, has_background=True) -> np.ndarray:
    """TFCE of one t map, computed as nilearn's ``calculate_tfce`` (dh="auto", E=0.5, H=2).

    Parameters
    ----------
    volume : ndarray, 3-D
        t map, zero outside the mask.
    two_sided_test : bool
        Also enhance negative clusters (with negative TFCE values).
    has_background : bool, default=True
        Whether nilearn's full volume holds zeros outside ``volume`` (they
        enter its maximum t, hence the heights, for a one-sided test).

    Returns
    -------
    ndarray of float64, same shape as ``volume``
    """
    volume = np.asarray(volume, dtype=np.float64)
    tfce = np.zeros_like(volume)
    signs = [-1, 1] if two_sided_test else [1]
    heights = _tfce_heights(volume, two_sided_test, has_background)
    for sign in signs:
        temp = volume * sign
        n_labelled = None
        for height in heights:
            temp[temp < height] = 0  # NaN voxels stay and are labelled, as in nilearn
            # Voxels are only ever zeroed, so the same count of non-zero voxels is the same
            # set: the labels and extents of the height below hold (skipping a labelling of
            # the box at most heights of a heavy-tailed map; the sums are nilearn's).
            if np.count_nonzero(temp) != n_labelled:
                n_labelled = np.count_nonzero(temp)
                labels, _ = ndimage.label(temp, FACE_CONNECTIVITY)
                extents = np.bincount(labels.ravel()) ** _TFCE_E
            values = sign * extents * (height**_TFCE_H)
            values[0] = 0.0
            tfce += values[labels]
    return tfce


def tfce_voxels(values, geometry: VolumeGeometry, two_sided_test) -> np.ndarray:
    """TFCE of the in-mask voxels: the numbers of :func:`tfce_volume`, computed sparsely.

    Parameters
    ----------
    values : ndarray of shape (n_voxels,)
        t-scores of the in-mask voxels.
    geometry : VolumeGeometry
    two_sided_test : bool

    Returns
    -------
    ndarray of shape (n_voxels,), float64

    Notes
    -----
    At each TFCE height the supra-threshold voxels are a prefix of the voxels
    sorted by decreasing score, and the face edges joining them a prefix of
    the edges sorted by their lower end's rank; clusters are the connected
    components of that small graph, so each height costs the size of its
    supra-threshold set instead of a labelling of the whole volume. Each
    voxel's contributions are added in nilearn's order (heights increasing,
    negative sign first), so the sums are nilearn's. Small volumes (a bounding
    box under 32768 voxels, where labelling the box is cheaper than building
    a graph per height) and non-positive heights (a map with no positive
    score and no background) take nilearn's literal path,
    :func:`tfce_volume`.
    """
    values = np.asarray(values, dtype=np.float64)
    heights = _tfce_heights(values, two_sided_test, geometry.has_background)
    if not heights[0] > 0 or geometry.box_mask.size < _SPARSE_TFCE_MIN_BOX:
        return tfce_volume(geometry.to_volume(values), two_sided_test,
                           geometry.has_background)[geometry.box_mask]
    tfce = np.zeros_like(values)
    for sign in ([-1, 1] if two_sided_test else [1]):
        _add_tfce_sign(tfce, values * sign, sign, heights, geometry.edges)
    return tfce


def _add_tfce_sign(tfce, scores, sign, heights, edges):
    key = np.where(np.isnan(scores), np.inf, scores)  # nilearn keeps NaN voxels at every height
    order = np.argsort(-key, kind="stable")
    ascending = key[order][::-1]
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    # CSR rows are an edge's higher rank, columns its lower one: sorted by row, the edges
    # among the first n voxels are a prefix and indptr[: n + 1] is their row index.
    edge_ranks = np.sort(rank[edges], axis=1)
    lowest = order.size - int(np.searchsorted(ascending, heights[0], side="left"))
    edge_ranks = edge_ranks[edge_ranks[:, 1] < lowest]  # never active otherwise
    by_row = np.argsort(edge_ranks[:, 1], kind="stable")
    columns = np.ascontiguousarray(edge_ranks[by_row, 0], dtype=np.int32)
    indptr = np.searchsorted(edge_ranks[by_row, 1], np.arange(order.size + 1)).astype(np.int32)
    weights = np.ones(columns.size)
    ranked = tfce[order]
    previous = -1
    for height in heights:
        n_active = order.size - int(np.searchsorted(ascending, height, side="left"))
        if n_active == 0:
            break
        if n_active != previous:  # same voxels as the height below: same clusters
            n_edges = int(indptr[n_active])
            graph = sparse.csr_array((weights[:n_edges], columns[:n_edges],
                                      indptr[: n_active + 1]), shape=(n_active, n_active))
            _, labels = csgraph.connected_components(graph, directed=False)
            extent = sign * (np.bincount(labels) ** _TFCE_E)
            previous = n_active
        ranked[:n_active] += (extent * (height**_TFCE_H))[labels]
    tfce[order] = ranked


def _tfce_heights(volume, two_sided_test, has_background):
    scores = np.abs(volume) if two_sided_test else volume
    top = np.fmax.reduce(scores, axis=None)
    if has_background:
        top = np.fmax(top, 0.0)
    return np.linspace(0, top, _TFCE_STEPS + 1)[1:]


def null_to_p_larger(values, null) -> np.ndarray:
    """nilearn's ``null_to_p(values, null, "larger")``.

    Parameters
    ----------
    values : ndarray
    null : ndarray of shape (n_perm,)

    Returns
    -------
    ndarray, same shape as ``values``
        1 - #{null < value} / n_perm, clipped to [max(eps, 1/n_perm), 1 - that].
    """
    null = np.sort(np.asarray(null, dtype=np.float64))
    p = 1 - np.searchsorted(null, values, side="left").astype(float) / null.size
    smallest = np.maximum(np.finfo(float).eps, 1.0 / null.size)
    return np.maximum(smallest, np.minimum(p, 1.0 - smallest))


def permutation_t_maps(resid, design: PermutationDesign, permutations) -> np.ndarray:
    """t maps of the tested variable for a batch of permutations.

    Parameters
    ----------
    resid : ndarray of shape (n_samples, n_voxels)
        Output of :func:`chunkglm.kernels.permutation.residualise_block`.
    design : PermutationDesign
    permutations : ndarray of shape (n_batch, n_samples)
        Sign-flips (+1/-1) or sample orders, as ``design.sign_flip`` says.

    Returns
    -------
    ndarray of shape (n_batch, n_voxels)
        t = b sqrt(dof / (1 - a2 - b^2)), nilearn's formula.
    """
    rows = design.rows
    weights = rows[:, None, :] * permutations[None] if design.sign_flip else rows[:, permutations]
    k1, n_batch, n_samples = weights.shape
    moments = (weights.reshape(k1 * n_batch, n_samples) @ resid).reshape(k1, n_batch, -1)
    b = moments[0]
    rss = 1.0 - np.sum(moments[1:] ** 2, axis=0) - b**2 if k1 > 1 else 1.0 - b**2
    with np.errstate(invalid="ignore", divide="ignore"):
        return b * np.sqrt(design.dof_factor / rss)


def batch_volume_null(resid, design: PermutationDesign, permutations, geometry: VolumeGeometry,
                      two_sided_test=False, threshold_t=None, tfce=False) -> dict:
    """Null maxima of t, cluster size, cluster mass and TFCE for a batch of permutations.

    Parameters
    ----------
    resid : ndarray of shape (n_samples, n_voxels)
        Residualised maps of the whole mask.
    design : PermutationDesign
    permutations : ndarray of shape (n_batch, n_samples)
    geometry : VolumeGeometry
    two_sided_test : bool
    threshold_t : float or None
        Cluster-forming t threshold; None skips cluster measures.
    tfce : bool

    Returns
    -------
    dict of ndarray of shape (n_batch,)
        ``h0_max_t`` (max t, or max |t| when two-sided, NaN-ignoring), and
        ``h0_max_size`` (whole numbers, float64 as nilearn's), ``h0_max_mass``
        when ``threshold_t`` is given,
        ``h0_max_tfce`` (max |TFCE|) when ``tfce``.
    """
    n_batch = permutations.shape[0]
    out = {"h0_max_t": np.full(n_batch, np.nan)}
    if threshold_t is not None:
        out["h0_max_size"] = np.zeros(n_batch)  # float64, as nilearn's h0_max_size
        out["h0_max_mass"] = np.zeros(n_batch)
    if tfce:
        out["h0_max_tfce"] = np.zeros(n_batch)
    step = gemm_group_size(design, resid.shape[1])
    equivalents = original_equivalents(design, permutations)
    original = original_t(resid, design) if equivalents.any() else None
    for start in range(0, n_batch, step):
        group = permutations[start:start + step]
        # Every GEMM has the same shape (the last group padded): BLAS then sums each
        # permutation's products in the same order whatever the batch, so results do not
        # depend on how permutations are split into batches.
        padded = np.concatenate([group, np.repeat(group[-1:], step - group.shape[0], axis=0)])
        t_maps = permutation_t_maps(resid, design, padded)[: group.shape[0]]
        for i, t in enumerate(t_maps, start):
            if equivalents[i]:  # the original map itself (or its negative): ties stay exact
                t = original * float(equivalents[i])
            _one_permutation(out, i, t, geometry, two_sided_test, threshold_t, tfce)
    return out


def gemm_group_size(design: PermutationDesign, n_voxels: int) -> int:
    """Permutations per GEMM: products of about 8 MiB, at most 64 (padding stays cheap)."""
    per_perm = 8 * (1 + design.n_covars) * max(n_voxels, 1)
    return int(min(_GEMM_MAX_GROUP, max(1, _GEMM_BYTES // per_perm)))


def _one_permutation(out, i, t, geometry, two_sided_test, threshold_t, tfce):
    score = np.abs(t) if two_sided_test else t
    out["h0_max_t"][i] = np.fmax.reduce(score) if score.size else np.nan
    if threshold_t is not None:
        out["h0_max_size"][i], out["h0_max_mass"][i] = max_cluster_measures_voxels(
            t, geometry, threshold_t, two_sided_test)
    if tfce:
        top = np.fmax.reduce(np.abs(tfce_voxels(t, geometry, two_sided_test)))
        out["h0_max_tfce"][i] = np.fmax(top, 0.0) if geometry.has_background else top


def nilearn_confound_columns(tested_vars, confounding_vars=None, model_intercept=True) -> int:
    """How many confound columns nilearn counts in the cluster-forming threshold's dof.

    nilearn drops constant confound columns and adds its intercept as in
    :func:`chunkglm.kernels.permutation.prepare_design`, then counts columns
    (not their rank) in ``n_samples - 1 - n_columns``.

    Parameters
    ----------
    tested_vars : array-like of shape (n_samples,) or (n_samples, 1)
    confounding_vars : array-like of shape (n_samples, n_covars) or None
    model_intercept : bool

    Returns
    -------
    int
    """
    intercept_test = np.unique(np.asarray(tested_vars)).size == 1
    n_columns = 0
    if confounding_vars is not None:
        covars = np.asarray(confounding_vars, dtype=np.float64)
        covars = covars[:, None] if covars.ndim == 1 else covars
        n_columns = covars.shape[1]
        n_constant = sum(np.unique(covars[:, j]).size == 1 for j in range(n_columns))
        if (intercept_test and n_constant == 1) or n_constant > 1:
            n_columns -= n_constant
            model_intercept = True
        if not intercept_test and n_constant == 1:
            intercept_test = True
    if model_intercept and not intercept_test:
        n_columns += 1
    return n_columns
