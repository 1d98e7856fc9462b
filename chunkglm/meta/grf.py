"""The old API's ``cdt``/``q`` with FSL's meaning: Gaussian-random-field cluster inference.

NiMARE 0.0.x's ``FFX_GLM``/``MFX_GLM`` (and ``ffx_glm``/``mfx_glm``/``fsl_glm``) ran
FSL: ``flameo`` for the voxelwise maps, ``smoothest`` on flameo's residuals for the
smoothness, then ``cluster`` on the z map at ``z > cdt_z`` (``cdt_z`` the two-tailed z
of ``cdt``; ``cdt >= 1`` is a z itself), 26-connected, keeping clusters whose GRF
p-value (from their size in voxels, the smoothness and the mask volume) is below
``q``; with ``two_sided`` the same on ``-z`` for negative clusters. ``thresh_z`` was
z inside the kept clusters, 0 elsewhere.

chunkglm does the same without FSL (:mod:`chunkglm.kernels.meta.grf`):

1. Smoothness, one more reduction in the same pass as the maps: the group model is
   an intercept, so its residuals are the contrast maps minus one value per voxel,
   which the standardisation over images removes; the pair sums are read from the
   contrast maps' voxel blocks (a block also reads the tail of the blocks holding its
   voxels' -x/-y/-z neighbours) and added over blocks.
2. A global pass on the 3-D z map (:func:`grf_cluster_maps`).

Known differences from FSL: ``smoothest``'s small-dof lookup correction of dLh is not
applied (about 2 % at 30 studies; see :func:`chunkglm.kernels.meta.grf.smoothness`);
entries that are NaN or 0 are left out of the voxelwise fit (NiMARE 0.22's rule) where
flameo received zeros.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, special

from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels import meta as km
from chunkglm.kernels.meta import grf as km_grf

#: 26-connectivity, as old NiMARE's ``cluster --connectivity=26``.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def cdt_to_z(cdt) -> float:
    """Old NiMARE's cluster-defining threshold: the two-tailed z of ``0 < cdt < 1``, else ``cdt`` as a z."""
    cdt = float(cdt)
    if 0 < cdt < 1:
        return float(-special.ndtri(cdt / 2.0))
    return cdt


def smoothness_sums(con, ijk, shape):
    """Lazy pair sums (:func:`chunkglm.kernels.meta.grf.neighbour_sums`) of the intercept model's
    residual field over the (image, voxel) contrast maps ``con`` (a dask array in task blocks)."""
    return meta_graph.window_sums(km.neighbour_sums, con, km.backward_neighbours(ijk, shape), km_grf.N_SUMS)


def grf_cluster_maps(z, ijk, shape, z_threshold, q, two_sided, smooth) -> dict:
    """FSL ``cluster``'s thresholded z map and every supra-threshold cluster's GRF p.

    Parameters
    ----------
    z : ndarray of shape (V,)
        Voxelwise z map (NaN: not analysed).
    ijk : ndarray of shape (V, 3)
    shape : tuple of 3 int
    z_threshold : float
        Cluster-forming z (voxels with ``z > z_threshold``; ``-z`` for negative clusters).
    q : float
        Clusters with GRF p < q are kept.
    two_sided : bool
        Negative clusters too.
    smooth : dict
        :func:`chunkglm.kernels.meta.grf.smoothness` (``dlh``, ``volume``).

    Returns
    -------
    dict
        ``z_corr-cluster`` (z in kept clusters, 0 elsewhere: old NiMARE's ``thresh_z``),
        ``labels_corr-cluster`` (kept clusters numbered 1.., positive ones first),
        ``logp_corr-cluster`` (-log10 GRF p of the cluster each supra-threshold voxel is in, 0 outside).
    """
    z = np.nan_to_num(np.asarray(z, dtype=np.float64), nan=0.0)
    where = tuple(np.asarray(ijk).T)
    thresh, labels_out, logp = np.zeros(z.size), np.zeros(z.size), np.zeros(z.size)
    n_kept = 0
    for sign in (1.0, -1.0) if two_sided else (1.0,):
        volume = np.zeros(shape, dtype=bool)
        volume[where] = sign * z > z_threshold
        labels, n_clusters = ndimage.label(volume, CONNECTIVITY_26)
        if not n_clusters:
            continue
        voxel_labels = labels[where]
        sizes = np.bincount(voxel_labels, minlength=n_clusters + 1)[1:]
        p = km.cluster_p(sizes, z_threshold, smooth["dlh"], smooth["volume"])
        inside = voxel_labels > 0
        logp[inside] = -np.log10(np.maximum(p[voxel_labels[inside] - 1], np.finfo(np.float64).tiny))
        kept = np.concatenate([[False], p < q])
        rank = np.concatenate([[0], np.cumsum(p < q)]) + n_kept
        voxels = kept[voxel_labels]
        thresh[voxels] = z[voxels]
        labels_out[voxels] = rank[voxel_labels[voxels]]
        n_kept += int((p < q).sum())
    return {"z_corr-cluster": thresh, "labels_corr-cluster": labels_out, "logp_corr-cluster": logp}


def check_cluster_z(z_threshold) -> float:
    """Refuse a cluster-forming z the GRF formula does not cover (below ``MIN_CLUSTER_Z``)."""
    if not z_threshold >= km_grf.MIN_CLUSTER_Z:
        raise InputError(f"GRF cluster inference needs a cluster-forming z of at least {km_grf.MIN_CLUSTER_Z} "
                         f"(cdt <= {2 * special.ndtr(-km_grf.MIN_CLUSTER_Z):.3f}); received z = {z_threshold:g}. "
                         "Below it the expected Euler characteristic does not count separate clusters: lower cdt.")
    return float(z_threshold)


def check_cluster_rule(cluster) -> str:
    """The cluster rule of the old GLMs: ``"fdr"`` (chunkglm's default) or ``"grf"`` (FSL's)."""
    if cluster not in ("fdr", "grf"):
        raise InputError(f"cluster must be 'fdr' (cluster peak passes FDR at q) or 'grf' (FSL's Gaussian random "
                         f"field cluster p < q, the old NiMARE meaning); received {cluster!r}.")
    return cluster


def add_grf_cluster_maps(result, con, cdt, q, two_sided) -> None:
    """Add the GRF cluster maps to a lazy ``MetaResult`` of FFX_GLM/MFX_GLM (computed with its maps).

    ``con`` is the fitted (image, voxel) contrast maps in the blocks of the fit's tasks; the
    smoothness is summed in the same graph as the maps and kept in ``result.metadata["smoothness"]``
    (:func:`chunkglm.kernels.meta.grf.smoothness`, plus ``fwhm_mm`` from the grid's voxel sizes).
    """
    inputs = result._inputs
    ijk, shape = inputs.ijk, inputs.grid.shape
    z_threshold = cdt_to_z(cdt)

    def cluster_maps(maps, sums):
        smooth = km.smoothness(sums)
        smooth["fwhm_mm"] = smooth["fwhm"] * np.sqrt((np.asarray(inputs.grid.affine)[:3, :3] ** 2).sum(axis=0))
        result.metadata["smoothness"] = smooth
        return grf_cluster_maps(maps["z"], ijk, shape, z_threshold, q, two_sided, smooth)

    result.add_hook(cluster_maps, smoothness_sums(con, ijk, shape))
