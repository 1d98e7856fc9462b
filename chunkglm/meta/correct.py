"""Multiple-comparison corrections of a :class:`~chunkglm.meta.results.MetaResult`, as NiMARE's.

``FDRCorrector(method='indep'|'negcorr', alpha)`` and
``FWECorrector(method='bonferroni'|'montecarlo', n_iters)`` with NiMARE's
``corrector.transform(result)`` API and map names:
``{p,z,logp}_corr-FDR_method-<method>``, ``{p,z,logp}_corr-FWE_method-bonferroni``
and, for :class:`~chunkglm.meta.ibma.PermutedOLS`,
``{p,z,logp}_level-voxel_corr-FWE_method-montecarlo``.

FDR and Bonferroni are global passes over the 1-D p map (NiMARE's log-space
step-up, ``nimare.stats.nlogp_fdr`` / ``nlogp_bonferroni``; NaN voxels take
no part but count in the number of tests). Monte Carlo FWE is NiMARE
0.22's max-z sign-flip null: one flip matrix ``RandomState(random_state)
.choice((-1, 1), (n_iters, K))`` shared by every voxel block and missing-data
pattern; per pattern the null max-|t| is converted to z with that pattern's
dof, the max over blocks and patterns is the null (one more pass over the
inputs, ``n_iters`` numbers per block leave each task).

The old API's ``cdt``/``q`` (FFX_GLM, MFX_GLM) cluster rule, see :func:`add_cluster_maps`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from scipy import ndimage, special

from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.inference.clusters import label_clusters
from chunkglm.kernels import meta as km
from chunkglm.meta import _bags
from chunkglm.meta.results import MetaResult, clip_logp, clip_p

_LOG10 = np.log(10.0)


def nlogp_to_z(nlogp) -> np.ndarray:
    """NiMARE's two-tailed ``nlogp_to_z`` (unsigned)."""
    return -special.ndtri_exp(np.asarray(nlogp, dtype=np.float64) - np.log(2.0)) + 0.0


def nlogp_fdr(nlogp, method="bh") -> np.ndarray:
    """NiMARE's ``nlogp_fdr``: BH ("bh") or BY ("by") step-up in log space; NaN stays NaN."""
    nlogp = np.asarray(nlogp, dtype=np.float64)
    n_tests = nlogp.size
    evaluated = ~np.isnan(nlogp)
    out = np.full(nlogp.shape, np.nan)
    values = nlogp[evaluated]
    order = np.argsort(values)
    revert = np.argsort(order)
    log_factor = np.log(np.arange(1, values.size + 1) / n_tests)
    if method == "by":
        log_factor = log_factor - np.log(np.sum(1 / np.arange(1, n_tests + 1)))
    adjusted = values[order] - log_factor
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    out[evaluated] = np.minimum(adjusted, 0.0)[revert]
    return out


def nlogp_bonferroni(nlogp) -> np.ndarray:
    """NiMARE's ``nlogp_bonferroni``."""
    nlogp = np.asarray(nlogp, dtype=np.float64)
    return np.minimum(nlogp + np.log(nlogp.size), 0.0)


def uncorrected_nlogp(maps: dict, p_name="p") -> np.ndarray:
    """NiMARE's ``_uncorrected_nlogp``: log of the float32 p map, the logp map past its floor."""
    p = np.asarray(maps[p_name])
    tiny64 = np.nextafter(0.0, 1.0)
    nlogp = np.log(np.clip(p.astype(np.float64), tiny64, 1.0))
    logp_name = "logp" if p_name == "p" else p_name.replace("p_", "logp_")
    if logp_name in maps:
        floored = p <= np.nextafter(p.dtype.type(0), p.dtype.type(1), dtype=p.dtype)
        if floored.any():
            nlogp = np.where(floored, -_LOG10 * np.asarray(maps[logp_name], dtype=np.float64), nlogp)
    return nlogp


class Corrector(ABC):
    """Base of the correctors: ``transform(result)`` returns a corrected copy."""

    _kind = ""
    _methods: tuple[str, ...] = ()

    def __init__(self, method, **kwargs):
        self.method = method
        self.parameters = kwargs

    @property
    def _suffix(self) -> str:
        return f"_corr-{self._kind}_method-{self.method}"

    def transform(self, result: MetaResult) -> MetaResult:
        """Apply the correction; maps are added under NiMARE's names.

        Parameters
        ----------
        result : MetaResult

        Returns
        -------
        MetaResult
            A copy with the corrected maps added.
        """
        if not isinstance(result, MetaResult):
            raise InputError(f"First argument to transform() must be a MetaResult, not {type(result).__name__}.")
        estimator_method = getattr(result.estimator, f"correct_{self._kind.lower()}_{self.method}", None)
        if estimator_method is not None:
            maps, description = estimator_method(result, **self._estimator_kwargs())
        elif self.method in self._methods:
            maps, description = self._voxelwise(result)
        else:
            raise InputError(f"Unsupported {self._kind} correction method '{self.method}' for "
                             f"{type(result.estimator).__name__}: available {list(self._methods)}"
                             + (" (montecarlo: PermutedOLS only)." if self._kind == "FWE" else "."))
        result = result.copy()
        result.add_maps({name + self._suffix: values for name, values in maps.items()})
        result.description_ = f"{result.description_} {description}"
        result.corrector = self
        return result

    def _estimator_kwargs(self) -> dict:
        return dict(self.parameters)

    def _voxelwise(self, result):
        maps = result.maps
        if "p" not in maps:
            raise InputError(f"{type(self).__name__} requires a 'p' map; the result has {sorted(maps)}.")
        nlogp = uncorrected_nlogp(maps)
        corrected = np.full_like(nlogp, np.nan)
        ok = ~np.isnan(nlogp)
        corrected[ok] = self._correct(nlogp[ok], nlogp.size)
        out = {"p": clip_p(np.exp(corrected))}
        if "z" in maps:
            out["z"] = (nlogp_to_z(corrected) * np.sign(maps["z"])).astype(np.float32)
        if "logp" in maps:
            out["logp"] = clip_logp(corrected / -_LOG10 + 0.0)
        return out, self._description()

    @abstractmethod
    def _correct(self, nlogp, n_tests):
        """Corrected natural-log p-values of ``nlogp`` (one per test of ``n_tests``)."""

    def _description(self) -> str:
        return ""


class FDRCorrector(Corrector):
    """False discovery rate correction (NiMARE ``FDRCorrector``).

    Parameters
    ----------
    method : {"indep", "negcorr"}
        Benjamini-Hochberg or Benjamini-Yekutieli.
    alpha : float
        Kept for NiMARE compatibility (corrected p maps do not depend on it).
    """

    _kind = "FDR"
    _methods = ("indep", "negcorr")

    def __init__(self, method="indep", alpha=0.05, **kwargs):
        super().__init__(method, **kwargs)
        self.alpha = alpha

    def _correct(self, nlogp, n_tests):
        # NaN voxels are dropped before; NiMARE counts only the evaluated ones here too.
        return nlogp_fdr(nlogp, "bh" if self.method == "indep" else "by")

    def _description(self):
        name = "Benjamini-Hochberg" if self.method == "indep" else "Benjamini-Yekutieli"
        return f"False discovery rate correction was performed with the {name} procedure."


class FWECorrector(Corrector):
    """Family-wise error correction (NiMARE ``FWECorrector``).

    Parameters
    ----------
    method : {"bonferroni", "montecarlo"}
        ``montecarlo`` is the estimator's own method (PermutedOLS).
    n_iters : int, optional
        Sign flips for ``montecarlo`` (NiMARE's default 5000 when None).
    n_cores : int
        Accepted for compatibility.
    sign_flips : ndarray of shape (n_iters, K), optional
        Explicit flips for ``montecarlo`` (chunkglm extension).
    """

    _kind = "FWE"
    _methods = ("bonferroni",)

    def __init__(self, method="bonferroni", n_iters=None, n_cores=1, **kwargs):
        if method not in ("bonferroni", "montecarlo"):
            raise InputError(f"FWECorrector method must be 'bonferroni' or 'montecarlo'; received {method!r}.")
        super().__init__(method, **kwargs)
        self.n_iters = n_iters
        self.n_cores = n_cores

    def _estimator_kwargs(self):
        kwargs = dict(self.parameters)
        if self.n_iters is not None:
            kwargs["n_iters"] = self.n_iters
        return kwargs

    def _correct(self, nlogp, n_tests):
        return nlogp_bonferroni(nlogp)

    def _description(self):
        return "Family-wise error rate correction was performed with the Bonferroni procedure."


# -- Monte Carlo FWE for PermutedOLS ------------------------------------------------------


def permuted_ols_montecarlo(estimator, result, n_iters=5000, sign_flips=None):
    """NiMARE 0.22's ``PermutedOLS.correct_fwe_montecarlo``; returns (maps, description)."""
    maps_in = estimator.inputs_
    rows = getattr(estimator, "images_", None)
    if rows is None:  # NiMARE drops images without a usable voxel: they take no flip column
        rows = estimator._usable_images(maps_in, ("beta",), True)
    n_images = rows.size
    flips = _flips(sign_flips, n_iters, n_images, estimator.random_state)
    beta = estimator._stored(maps_in, "beta")
    if rows is not None and rows.size != maps_in.n_images:
        beta = meta_graph.select_images(beta, rows)
    computed = meta_graph.per_block(_montecarlo_block, beta, flips, estimator.two_sided, estimator.aggressive_mask)
    observed_z = np.concatenate([z for z, _ in computed])
    h0_max_z = np.full(flips.shape[0], -np.inf)
    for _, null in computed:
        np.fmax(h0_max_z, null, out=h0_max_z)
    p = np.full(observed_z.size, np.nan)
    valid = np.isfinite(observed_z)
    p[valid] = empirical_max_p(observed_z[valid], h0_max_z, estimator.two_sided)
    sign = np.sign(observed_z)
    sign[sign == 0] = 1
    tail = "two" if estimator.two_sided else "one"
    z = _p_to_z(p, tail) * sign
    estimator.null_distributions_ = {"values_level-voxel_corr-fwe_method-montecarlo": h0_max_z}
    maps = {"p_level-voxel": p.astype(np.float32), "z_level-voxel": z.astype(np.float32),
            "logp_level-voxel": (-np.log10(p)).astype(np.float32)}
    description = ("Family-wise error rate correction was performed with a max-statistic null distribution "
                   f"generated by sign-flipping each image ({flips.shape[0]} iterations), the maximum taken "
                   "over z-statistics.")
    return maps, description


def _flips(sign_flips, n_iters, n_images, random_state) -> np.ndarray:
    if sign_flips is not None:
        flips = np.asarray(sign_flips, dtype=np.float64)
        if flips.ndim != 2 or flips.shape[1] != n_images or not np.isin(flips, (-1.0, 1.0)).all():
            raise InputError(f"sign_flips must have shape (n_iters, {n_images}) with values -1 and 1; "
                             f"received shape {flips.shape}.")
        return flips
    if not isinstance(n_iters, int | np.integer) or n_iters <= 0:
        raise InputError(f"n_iters must be a positive integer; received {n_iters!r}.")
    return np.random.RandomState(random_state).choice((-1.0, 1.0), size=(int(n_iters), n_images))


def _montecarlo_block(block, flips, two_sided, aggressive):
    """Observed z and per-flip null max z of one voxel block, over its missing-data patterns."""
    values = np.asarray(block, dtype=np.float64)
    valid = _bags.validity({"beta": values})
    z = np.full(values.shape[1], np.nan)
    null = np.full(flips.shape[0], -np.inf)
    for rows, voxels in _bags.pattern_groups(valid, aggressive):
        if voxels.size == 0 or rows.sum() < _bags.MIN_STUDIES:
            continue
        n = int(rows.sum())
        y = values[np.ix_(rows, voxels)]
        # NiMARE's arithmetic (observed: column sums; null: flips @ y), so that a flip of all +1
        # ties exactly with the observed statistic, as it does in NiMARE.
        t = km.one_sample_t(y.sum(axis=0), np.einsum("ij,ij->j", y, y), n)
        z[voxels] = km.t_to_z(t, n - 1)
        np.fmax(null, km.t_to_z(km.sign_flip_max_null(y, flips[:, rows], two_sided), n - 1), out=null)
    return z, null


def empirical_max_p(observed, h0_max, two_sided) -> np.ndarray:
    """NiMARE's ``_empirical_max_p``: (exceedances + 1) / (n_iters + 1)."""
    stat = np.abs(observed) if two_sided else observed
    exceed = h0_max.size - np.searchsorted(np.sort(h0_max), stat, side="left")
    return (exceed + 1) / (h0_max.size + 1)


def _p_to_z(p, tail):
    p = np.clip(np.asarray(p, dtype=np.float64), np.nextafter(0.0, 1.0), 1.0)
    nlogp = np.log(p)
    if tail == "two":
        return nlogp_to_z(nlogp)
    return np.maximum(-special.ndtri_exp(nlogp), 0.0)  # NiMARE's one-tailed nlogp_to_z


# -- old API: FFX_GLM / MFX_GLM cdt and q ------------------------------------------------------


def add_cluster_maps(result: MetaResult, cdt: float, q: float, two_sided: bool) -> None:
    """Cluster-level maps for the old API's ``cdt`` and ``q`` (computed with the maps).

    The rule (NiMARE 0.0.x ran FSL's GRF ``cluster``; chunkglm has no
    smoothness estimate, so it uses a distribution-free rule):

    1. cluster-forming: voxels with uncorrected ``p < cdt`` (``p`` is the
       estimator's p map: two-sided when ``two_sided``), split by the sign of
       ``z``, 6-connected (nilearn's, :func:`chunkglm.inference.clusters.label_clusters`);
    2. a cluster is significant when its peak voxel passes Benjamini-Hochberg
       FDR at level ``q`` over all analysed voxels (corrected p <= q).

    Adds ``z_corr-cluster`` (z inside significant clusters, 0 elsewhere) and
    ``labels_corr-cluster`` (cluster number, 0 outside), computed together
    with the other maps (lazily). ``two_sided`` acts through the p map.
    """
    result.add_hook(lambda maps: _cluster_maps(maps, result._inputs, cdt, q))


def _cluster_maps(maps, inputs, cdt, q) -> dict:
    ijk, shape = inputs.ijk, inputs.grid.shape
    where = (ijk[:, 0], ijk[:, 1], ijk[:, 2])
    p = np.asarray(maps["p"], dtype=np.float64)
    z = np.asarray(maps["z"], dtype=np.float64)
    nlogp = np.where(np.isnan(p), np.nan, np.log(np.clip(p, np.nextafter(0.0, 1.0), 1.0)))
    fdr_p = np.exp(nlogp_fdr(nlogp))
    fdr_volume = np.ones(shape)
    fdr_volume[where] = np.nan_to_num(fdr_p, nan=1.0)
    keep_z, labels_out = np.zeros(p.size), np.zeros(p.size)
    for sign in (1.0, -1.0):
        volume = np.zeros(shape, dtype=bool)
        volume[where] = (p < cdt) & (np.sign(z) == sign)
        labels, n_clusters = label_clusters(volume)
        if not n_clusters:
            continue
        peak_fdr = np.asarray(ndimage.minimum(fdr_volume, labels, np.arange(1, n_clusters + 1)))
        significant = np.concatenate([[False], peak_fdr <= q])
        voxel_labels = labels[where]
        kept = significant[voxel_labels]
        keep_z[kept] = z[kept]
        ranks = np.cumsum(significant) + labels_out.max()
        labels_out[kept] = ranks[voxel_labels[kept]]
    return {"z_corr-cluster": keep_z, "labels_corr-cluster": labels_out}
