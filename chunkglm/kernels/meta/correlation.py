"""The null correlation between images that NiMARE 0.22's grouped combination tests read.

NiMARE (``nimare.meta.ibma._null_correlation``) strips the shared signal (each
voxel's mean over the images usable there), correlates every pair of images
over the voxels where both are usable, and undoes the shrinkage that
centering induces within each dependence group (PyMARE's
``undo_centering_shrinkage``). Every pairwise quantity is a sum over voxels,
so a block gives its moments (:func:`null_correlation_moments`), blocks are
summed, and :func:`null_correlation` finishes on the (K, K) sums. Numpy only.
"""

from __future__ import annotations

import numpy as np

_ITERATIONS = 50
_TOLERANCE = 1e-12


def null_correlation_moments(z: np.ndarray) -> dict:
    """Sums over the voxels of one block, per pair of images (K, K), for :func:`null_correlation`.

    ``valid`` marks finite, non-zero entries (NiMARE's ``_usable``); residuals are each
    voxel's values less their mean over the images valid there, 0 where not valid.
    """
    z = np.asarray(z, dtype=np.float64)
    valid = np.isfinite(z) & (z != 0)
    n_images, n_voxels = z.shape
    if valid.all():  # the usual block inside the brain: one product instead of four
        resid = z - z.mean(axis=0)
        ones = np.ones((1, n_images))
        return {"pairs": np.full((n_images, n_images), float(n_voxels)),
                "sums": resid.sum(axis=1)[:, None] * ones, "squares": (resid * resid).sum(axis=1)[:, None] * ones,
                "cross": resid @ resid.T, "all_valid": True}
    counts = valid.sum(axis=0)
    totals = np.where(valid, z, 0.0).sum(axis=0)
    means = np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)
    resid = np.where(valid, z - means, 0.0)
    weights = valid.astype(np.float64)
    return {"pairs": weights @ weights.T, "sums": resid @ weights.T, "squares": (resid * resid) @ weights.T,
            "cross": resid @ resid.T, "all_valid": bool(valid.all())}


def add_moments(parts) -> dict:
    """The moments of several blocks together."""
    parts = list(parts)
    out = {key: sum(p[key] for p in parts) for key in ("pairs", "sums", "squares", "cross")}
    out["all_valid"] = all(p["all_valid"] for p in parts)
    return out


def null_correlation(moments: dict, groups) -> np.ndarray | None:
    """The (K, K) null correlation from summed moments, or None when no pair of images shares two voxels.

    Where every image is usable at every voxel this is PyMARE's
    ``estimate_null_correlation`` (the plain correlation of the residual rows;
    non-finite entries 0); otherwise NiMARE's pairwise-complete version (pairs with
    fewer than two shared voxels 0, symmetrised, clipped). Then the within-group
    entries are de-shrunk (:func:`undo_centering_shrinkage`) and the diagonal is 1.
    """
    pairs, sums = moments["pairs"], moments["sums"]
    with np.errstate(invalid="ignore", divide="ignore"):
        pair_means = sums / pairs
        covariance = moments["cross"] / pairs - pair_means * pair_means.T
        variance = moments["squares"] / pairs - pair_means * pair_means
        corr = covariance / np.sqrt(variance * variance.T)
    if moments["all_valid"]:
        corr = np.where(np.isfinite(corr), corr, 0.0)
    else:
        estimable = np.isfinite(corr) & (pairs >= 2)
        if not estimable[~np.eye(corr.shape[0], dtype=bool)].any():
            return None
        corr = np.where(estimable, corr, 0.0)
        corr = np.clip((corr + corr.T) / 2.0, -1.0, 1.0)
        np.fill_diagonal(corr, 1.0)
    corr = undo_centering_shrinkage(corr, groups)
    np.fill_diagonal(corr, 1.0)
    return corr


def undo_centering_shrinkage(corr: np.ndarray, groups) -> np.ndarray:
    """Invert the shrinkage that centering over K images induces in within-group correlations.

    For images i != j of one group of size b whose underlying correlation is rho,
    the residual correlation after removing the mean over K images is
    r = (rho a + c) / (rho d + 1 + c), with a = 1 - 2(b-1)/K + b(b-1)/K^2,
    d = -2(b-1)/K + b(b-1)/K^2 and c = -2/K + (K + S)/K^2, where S sums
    b_h (b_h - 1) rho_h over the groups. This inverts it per group (r clipped to
    the image of [-1/(b-1), 1], rho to [-1/(b-1), 1]; S from a fixed-point
    iteration, each group's own share kept out of its c), sets each group's
    block to rho plus its entries' deviations from their mean (shrunk to stay
    in [-1, 1]), and rescales between-group entries (r + 1/(K-1)) / (1 + 1/(K-1)).
    The result is clipped to [-1, 1]. PyMARE's ``undo_centering_shrinkage``.
    """
    corr = np.array(corr, dtype=np.float64)
    n = corr.shape[0]
    _, codes = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if n else []
    pooled = [i for i, m in enumerate(members) if m.size > 1]
    k2 = float(n) ** 2
    blocks, entries, observed, coeffs = {}, {}, {}, {}
    for i in pooled:
        m = members[i]
        b = float(m.size)
        off = ~np.eye(m.size, dtype=bool)
        blocks[i] = (np.ix_(m, m), off)
        entries[i] = corr[np.ix_(m, m)][off]
        observed[i] = float(entries[i].mean())
        own = b * (b - 1) / k2
        coeffs[i] = (1.0 - 2.0 * (b - 1) / n + own, -2.0 * (b - 1) / n + own, (n - b) * (n - b + 1.0),
                     -1.0 / (b - 1))

    def solve(r, i, others):
        slope_num, slope_den, outside, floor = coeffs[i]
        offset = -2.0 / n + (n + others) / k2
        if (outside + others) / k2 <= 0:
            return min(max(r, -1.0), 1.0)
        shifted = 1.0 + offset
        low = (floor * slope_num + offset) / (floor * slope_den + shifted)
        r = min(max(r, low), 1.0)
        rho = (r * shifted - offset) / (slope_num - r * slope_den)
        return min(max(rho, floor), 1.0)

    weight = {i: float(members[i].size * (members[i].size - 1)) for i in pooled}
    share = {i: 0.0 for i in pooled}
    for _ in range(_ITERATIONS):
        total = sum(share.values())
        updated = {i: weight[i] * solve(observed[i], i, total - share[i]) for i in pooled}
        if all(abs(updated[i] - share[i]) <= _TOLERANCE for i in pooled):
            break
        share = updated
    offset = 1.0 / (n - 1)
    out = (corr + offset) / (1.0 + offset)
    total = sum(share.values())
    for i in pooled:
        rho = solve(observed[i], i, total - share[i])
        deviation = entries[i] - observed[i]
        scale = 1.0
        if deviation.max() > 0:
            scale = min(scale, (1.0 - rho) / deviation.max())
        if deviation.min() < 0:
            scale = min(scale, (-1.0 - rho) / deviation.min())
        block = np.empty(blocks[i][1].shape)
        block[blocks[i][1]] = rho + max(scale, 0.0) * deviation
        np.fill_diagonal(block, 1.0)
        out[blocks[i][0]] = block
    np.fill_diagonal(out, 1.0)
    return np.clip(out, -1.0, 1.0)
