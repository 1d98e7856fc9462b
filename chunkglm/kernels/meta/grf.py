"""Gaussian random field pieces of FSL's cluster inference: smoothness from residuals, cluster p.

What the old NiMARE ``FFX_GLM``/``MFX_GLM`` ran after ``flameo``: FSL's
``smoothest`` on the group model's residuals (``res4d``), then FSL's ``cluster``
with the smoothness it reported (``dLh``, ``volume``). Both are written here from
the published method, on numpy blocks; the graph layer sums the per-block parts.

Smoothness (FMRIB technical report TR00DF1, the "more robust" estimator FSL uses):
each voxel's residuals are centred and scaled to unit variance over the images
(the standardised residual field ``u``); for every voxel whose three backward
neighbours (-x, -y, -z) are in the mask, and each axis a,

    SS-_a = sum_t u_t(v) u_t(v - e_a),     S2_a = sum_t (u_t(v)^2 + u_t(v - e_a)^2) / 2,

summed over those voxels. For a white field smoothed with a Gaussian kernel of
standard deviation s_a voxels, SS-_a / S2_a estimates the neighbour correlation
exp(-1 / (4 s_a^2)), so ``sigmasq_a = -1 / (4 ln |SS-_a / S2_a|)``,
``FWHM_a = sqrt(8 ln 2 sigmasq_a)`` (voxels), ``dLh = |Lambda|^(1/2) =
(8 sigmasq_x sigmasq_y sigmasq_z)^(-1/2)`` (voxel^-3) and a resel is
``FWHM_x FWHM_y FWHM_z`` voxels.

Cluster p (Friston, Worsley et al. 1994, as FSL's ``cluster``): at a z threshold
``h`` over ``V`` voxels, the expected number of supra-threshold voxels is
``E[N] = V Phi(-h)``, the expected number of clusters is the expected Euler
characteristic ``E[m] = V dLh (2 pi)^-2 (h^2 - 1) exp(-h^2 / 2)``, the mean cluster
size ``E[N] / E[m]``; a cluster's size k has ``P(S >= k) = exp(-beta k^(2/3))``
with ``beta = (Gamma(5/2) E[m] / E[N])^(2/3)``, and the probability that the
largest of the Poisson(E[m]) clusters reaches k is ``1 - exp(-E[m] P(S >= k))``.
"""

from __future__ import annotations

import numpy as np
from scipy import special

#: Sums of one block: SS-_x, SS-_y, SS-_z, S2_x, S2_y, S2_z, voxels counted, voxels with variance.
N_SUMS = 8
#: Lowest cluster-forming z of the formula: below it (h^2 - 1) exp(-h^2/2) is no Euler
#: characteristic density of separate clusters (FSL's own code switches rule below 1.1).
MIN_CLUSTER_Z = 1.1
_EXTREME = 0.99999999  # FSL's clamp of a neighbour correlation indistinguishable from 1


def backward_neighbours(ijk, shape) -> np.ndarray:
    """(V, 3) index of each voxel's -x, -y, -z neighbour in the voxel list, -1 where none.

    Parameters
    ----------
    ijk : ndarray of int, shape (V, 3)
        Grid indices of the analysed voxels (the voxel axis of the maps).
    shape : tuple of 3 int
        Grid shape.
    """
    ijk = np.asarray(ijk, dtype=np.int64)
    index = np.full(tuple(int(s) for s in shape), -1, dtype=np.int64)
    index[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = np.arange(ijk.shape[0])
    out = np.full(ijk.shape, -1, dtype=np.int64)
    for axis in range(3):
        back = ijk.copy()
        back[:, axis] -= 1
        inside = back[:, axis] >= 0
        out[inside, axis] = index[back[inside, 0], back[inside, 1], back[inside, 2]]
    return out


def standardise(residuals) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale each voxel's residuals to unit variance over the images.

    Parameters
    ----------
    residuals : ndarray of shape (K, v)
        Residuals of the group model (non-finite entries count as 0, as the old
        NiMARE zeroed NaN before FSL).

    Returns
    -------
    u : ndarray of shape (K, v), float64
        Standardised residuals (0 at voxels without variance).
    valid : ndarray of bool, shape (v,)
        Voxels with a positive variance (FSL drops the others from the mask).
    """
    r = np.nan_to_num(np.asarray(residuals, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    centred = r - r.mean(axis=0)
    scale = np.sqrt((centred * centred).sum(axis=0))
    valid = scale > 0
    u = np.zeros_like(centred)
    u[:, valid] = centred[:, valid] / scale[valid] * np.sqrt(max(r.shape[0] - 1, 1))
    return u, valid


def neighbour_sums(window, here, back) -> np.ndarray:
    """The pair sums of one block of voxels (see the module notes).

    Parameters
    ----------
    window : ndarray of shape (K, w)
        Residuals of a window of consecutive voxels holding the block and every
        backward neighbour of its voxels.
    here : ndarray of int, shape (n,)
        Window positions of the block's voxels.
    back : ndarray of int, shape (n, 3)
        Window positions of their -x, -y, -z neighbours, -1 where none.

    Returns
    -------
    ndarray of shape (8,)
        SS-_x, SS-_y, SS-_z, S2_x, S2_y, S2_z, the number of voxels counted and the
        number of the block's voxels with residual variance (FSL's mask volume).
    """
    u, valid = standardise(window)
    here, back = np.asarray(here), np.asarray(back)
    counted = valid[here] & (back >= 0).all(axis=1)
    counted[counted] &= valid[back[counted]].all(axis=1)
    centre = u[:, here[counted]]
    sums = np.zeros(N_SUMS)
    for axis in range(3):
        neighbour = u[:, back[counted, axis]]
        sums[axis] = np.einsum("kv,kv->", centre, neighbour)
        sums[3 + axis] = 0.5 * (np.einsum("kv,kv->", centre, centre) + np.einsum("kv,kv->", neighbour, neighbour))
    sums[6] = counted.sum()
    sums[7] = valid[here].sum()
    return sums


def smoothness(sums) -> dict:
    """FSL ``smoothest``'s numbers from the summed pair sums.

    Parameters
    ----------
    sums : ndarray of shape (8,)
        :func:`neighbour_sums` added over all blocks.

    Returns
    -------
    dict
        ``sigmasq`` (3,) and ``fwhm`` (3,) in voxels, ``dlh`` (voxel^-3), ``resels``
        (voxels per resel), ``volume`` (mask voxels with residual variance, FSL's
        ``VOLUME``), ``n_voxels`` (the voxels counted) and
        ``clamped`` (axes whose correlation was indistinguishable from 1, set to 0.99999 as FSL does).

    Notes
    -----
    FSL's ``smoothest`` given residuals and their dof further multiplies ``dLh`` by
    a small-dof correction read from a lookup table of its own (about 2 % at
    dof = 29); that table is not reproduced here, so ``dlh`` is the estimator's
    value for the residual field itself.
    """
    sums = np.asarray(sums, dtype=np.float64)
    if sums[6] < 1:
        raise ValueError("no voxel of the mask has its three backward neighbours in the mask with residual "
                         "variance: the smoothness cannot be estimated (the mask is too thin or the residuals are 0)")
    ratio = sums[:3] / sums[3:6]
    clamped = ratio >= _EXTREME
    ratio = np.where(clamped, 0.99999, ratio)
    sigmasq = -1.0 / (4.0 * np.log(np.abs(ratio)))
    fwhm = np.sqrt(8.0 * np.log(2.0) * sigmasq)
    return {"sigmasq": sigmasq, "fwhm": fwhm, "dlh": float((8.0 * np.prod(sigmasq)) ** -0.5),
            "resels": float(np.prod(fwhm)), "volume": int(sums[7]), "n_voxels": int(sums[6]),
            "clamped": np.flatnonzero(clamped).tolist()}


def expected_voxels(z_threshold, volume) -> np.ndarray:
    """E[N]: expected supra-threshold voxels of a unit Gaussian field over ``volume`` voxels."""
    return volume * special.ndtr(-np.asarray(z_threshold, dtype=np.float64))


def expected_clusters(z_threshold, dlh, volume) -> np.ndarray:
    """E[m]: the expected Euler characteristic above ``z_threshold`` (3-D term), V dLh (2 pi)^-2 (h^2 - 1) e^(-h^2/2)."""
    h = np.asarray(z_threshold, dtype=np.float64)
    return volume * dlh * (h * h - 1.0) * np.exp(-0.5 * h * h) / (2.0 * np.pi) ** 2


def cluster_p(sizes, z_threshold, dlh, volume) -> np.ndarray:
    """Probability that a cluster of at least ``sizes`` voxels occurs above ``z_threshold``.

    Parameters
    ----------
    sizes : array-like of int
        Cluster sizes (voxels).
    z_threshold : float
        Cluster-forming z (>= :data:`MIN_CLUSTER_Z`).
    dlh : float
        |Lambda|^(1/2) per voxel (:func:`smoothness`).
    volume : int
        Search volume (voxels).

    Returns
    -------
    ndarray
        ``1 - exp(-E[m] exp(-beta k^(2/3)))``, see the module notes.
    """
    h = float(z_threshold)
    if h < MIN_CLUSTER_Z:
        raise ValueError(f"GRF cluster inference needs a cluster-forming z of at least {MIN_CLUSTER_Z}; received "
                         f"{h:g}. Below it the expected Euler characteristic does not count separate clusters: "
                         "raise the threshold (lower cdt).")
    if not (dlh > 0 and volume > 0):
        raise ValueError(f"dlh and volume must be positive; received dlh={dlh!r}, volume={volume!r}")
    n_clusters = expected_clusters(h, dlh, volume)
    beta = (special.gamma(2.5) * n_clusters / expected_voxels(h, volume)) ** (2.0 / 3.0)
    k = np.asarray(sizes, dtype=np.float64)
    return -np.expm1(-n_clusters * np.exp(-beta * k ** (2.0 / 3.0)))
