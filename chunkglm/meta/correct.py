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

import inspect
import logging

import numpy as np
from scipy import ndimage, special

from chunkglm.errors import InputError, InputTypeError
from chunkglm.graph import meta as meta_graph
from chunkglm.inference.clusters import label_clusters
from chunkglm.kernels import meta as km
from chunkglm.meta import _bags
from chunkglm.meta._base import NiMAREBase
from chunkglm.meta.results import MetaResult, clip_logp, clip_p, store_map

_LOG10 = np.log(10.0)
LGR = logging.getLogger("chunkglm.meta.correct")


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


def acceptable_kwargs(method, n_positional=1) -> list[str] | None:
    """Keyword names ``method`` accepts after its first ``n_positional`` positional parameters
    (None: it takes ``**kwargs``, so anything)."""
    params = list(inspect.signature(method).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    skipped = {p.name for p in positional[:n_positional]}
    return [p.name for p in params if p.name not in skipped and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class Corrector(NiMAREBase):
    """Base of the correctors (NiMARE's ``Corrector``): ``transform(result)`` returns a corrected copy.

    Keyword arguments set to None are dropped (the correction method's default applies);
    the others are checked against the method that receives them in :meth:`transform`.
    """

    _correction_method = ""
    _estimator_parameters: tuple[str, ...] = ()
    _required_maps = ("p",)

    def __init__(self, **kwargs):
        self.parameters = {k: v for k, v in kwargs.items() if v is not None}

    @property
    def _name_suffix(self) -> str:
        return f"_corr-{self._correction_method.upper()}_method-{self.method}"

    @classmethod
    def _get_corrector_methods(cls) -> list[str]:
        prefix = f"correct_{cls._correction_method}_"
        return [name.replace(prefix, "") for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
                if name.startswith(prefix)]

    @classmethod
    def _get_estimator_methods(cls, estimator) -> list[str]:
        prefix = f"correct_{cls._correction_method}_"
        return [name.replace(prefix, "") for name, _ in inspect.getmembers(estimator, predicate=inspect.ismethod)
                if name.startswith(prefix)]

    @classmethod
    def inspect(cls, result) -> list[str]:
        """Valid ``method`` values for ``result`` (the corrector's own and its estimator's), logged by kind."""
        corr_methods = cls._get_corrector_methods()
        est_methods = cls._get_estimator_methods(result.estimator)
        everything = sorted(set(corr_methods + est_methods))
        corr_methods = [f"{m} (overridden)" if m in est_methods else m for m in corr_methods]
        LGR.info(f"Available non-specific methods: {', '.join(corr_methods)}\n"
                 f"Available Estimator-specific methods: {', '.join(est_methods)}")
        return everything

    def _estimator_kwargs(self) -> dict:
        kwargs = dict(self.parameters)
        for name in self._estimator_parameters:
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    def _validate_parameters(self, correction_method, parameters) -> None:
        accepted = acceptable_kwargs(correction_method, n_positional=1)
        if accepted is None:
            return
        unexpected = sorted(set(parameters) - set(accepted))
        if unexpected:
            name = getattr(correction_method, "__qualname__", str(correction_method))
            raise InputTypeError(
                f"{type(self).__name__}(method='{self.method}') was given "
                f"{', '.join(repr(k) for k in unexpected)}, which {name} does not accept. "
                f"Accepted keyword arguments: {', '.join(accepted) if accepted else '(none)'}.")

    def _collect_inputs(self, result) -> None:
        if not isinstance(result, MetaResult):
            raise InputError("First argument to transform() must be an instance of class MetaResult, not "
                             f"{type(result)}.")
        corr_methods = self._get_corrector_methods()
        est_methods = self._get_estimator_methods(result.estimator)
        if self.method not in corr_methods + est_methods:
            raise InputError(f"Unsupported {self._correction_method} correction method '{self.method}'\n"
                             f"\tAvailable native methods: {', '.join(corr_methods)}\n"
                             f"\tAvailable estimator methods: {', '.join(est_methods)}")
        for name in self._required_maps:
            if result.maps.get(name) is None:
                raise InputError(f"{type(self)} requires '{name}' maps to be present in the MetaResult, "
                                 "but none were found.")

    def transform(self, result: MetaResult) -> MetaResult:
        """Apply the correction to a copy of ``result``; maps are added under NiMARE's names.

        An estimator's own ``correct_<fwe|fdr>_<method>`` takes precedence (it returns
        ``(maps, tables, description)``); otherwise the corrector's method corrects the
        p map (and the logp map past the float32 floor of p).

        Parameters
        ----------
        result : MetaResult

        Returns
        -------
        MetaResult
        """
        if not isinstance(result, MetaResult):
            raise InputError("First argument to transform() must be an instance of class MetaResult, not "
                             f"{type(result)}.")
        name = f"correct_{self._correction_method}_{self.method}"
        result = result.copy()
        estimator = result.estimator
        if hasattr(estimator, name):
            method = getattr(estimator, name)
            parameters = self._estimator_kwargs()
            self._validate_parameters(method, parameters)
            maps, tables, description = method(result, **parameters)
        else:
            self._collect_inputs(result)
            self._validate_parameters(getattr(self, name), self.parameters)
            maps, tables, description = self._transform(result, method=name)
        result.maps.update({k + self._name_suffix: store_map(k + self._name_suffix, v) for k, v in maps.items()})
        result.tables.update({k + self._name_suffix: v for k, v in tables.items()})
        result.description_ = f"{result.description_} {description}"
        result.estimator = estimator
        result.corrector = self
        return result

    def _transform(self, result, method):
        """The corrector's own method on each required p map (NaN voxels take no part)."""
        maps, tables, description = {}, {}, ""
        for name in self._required_maps:
            nlogp = uncorrected_nlogp(result.maps, name)
            ok = ~np.isnan(nlogp)
            corrected = np.full_like(nlogp, np.nan)
            corrected[ok], tables, description = getattr(self, method)(nlogp[ok])
            maps[name] = clip_p(np.exp(corrected))
            z_name, logp_name = ("z", "logp") if name == "p" else (name.replace("p_", "z_"), name.replace("p_", "logp_"))
            if z_name in result.maps:
                maps[z_name] = nlogp_to_z(corrected) * np.sign(result.maps[z_name])
            if logp_name in result.maps:
                maps[logp_name] = clip_logp(corrected / -_LOG10 + 0.0)
        return maps, tables, description


class FDRCorrector(Corrector):
    """False discovery rate correction (NiMARE ``FDRCorrector``).

    Parameters
    ----------
    method : {"indep", "negcorr"}
        Benjamini-Hochberg or Benjamini-Yekutieli.
    alpha : float
        The rate the corrected maps are meant to be thresholded at (they do not
        depend on it); forwarded to an estimator's own FDR method.
    **kwargs
        For the correction method (None values dropped).
    """

    _correction_method = "fdr"
    _estimator_parameters = ("alpha",)

    def __init__(self, method="indep", alpha=0.05, **kwargs):
        self.alpha = alpha
        self.method = method
        super().__init__(**kwargs)

    def correct_fdr_indep(self, nlogp):
        """Benjamini-Hochberg on natural-log p-values; returns ``(nlogp_corr, {}, description)``."""
        description = ("False discovery rate correction was performed with the Benjamini-Hochberg procedure "
                       "\\citep{benjamini1995controlling}.")
        return nlogp_fdr(nlogp, "bh"), {}, description

    def correct_fdr_negcorr(self, nlogp):
        """Benjamini-Yekutieli on natural-log p-values; returns ``(nlogp_corr, {}, description)``."""
        description = ("False discovery rate correction was performed with the Benjamini-Yekutieli procedure "
                       "\\citep{benjamini2001control}.")
        return nlogp_fdr(nlogp, "by"), {}, description


class FWECorrector(Corrector):
    """Family-wise error correction (NiMARE ``FWECorrector``).

    Parameters
    ----------
    method : {"bonferroni", "montecarlo"}
        ``montecarlo`` is the estimator's own method (PermutedOLS).
    n_iters : int, optional
        Sign flips for ``montecarlo`` (a positive integer; None: the estimator's default).
    n_cores : int
        Passed to the estimator's method (the dask client sets parallelism).
    **kwargs
        For the correction method (None values dropped), e.g. ``sign_flips``
        (chunkglm: explicit (n_iters, K) flips for PermutedOLS).
    """

    _correction_method = "fwe"

    def __init__(self, method="bonferroni", n_iters=None, n_cores=1, **kwargs):
        if method not in ("bonferroni", "montecarlo", "predictive"):
            raise InputError(f"Unsupported FWE correction method '{method}'")
        if method == "montecarlo":
            if n_iters is not None and (isinstance(n_iters, bool | np.bool_)
                                        or not isinstance(n_iters, int | np.integer) or n_iters <= 0):
                raise InputError("n_iters must be a positive integer when method='montecarlo'.")
            kwargs["n_iters"] = n_iters
            kwargs["n_cores"] = n_cores
        self.method = method
        self.n_iters = n_iters
        self.n_cores = n_cores
        super().__init__(**kwargs)

    def correct_fwe_bonferroni(self, nlogp):
        """Bonferroni on natural-log p-values; returns ``(nlogp_corr, {}, description)``."""
        description = ("Family-wise error rate correction was performed with the Bonferroni correction "
                       "procedure \\citep{bonferroni1936teoria,shaffer1995multiple}.")
        return nlogp_bonferroni(nlogp), {}, description


# -- Monte Carlo FWE for PermutedOLS ------------------------------------------------------


def permuted_ols_montecarlo(estimator, result, n_iters=5000, sign_flips=None):
    """NiMARE 0.22's ``PermutedOLS.correct_fwe_montecarlo``; returns (maps, tables, description).

    One sign-flip null over every missing-data pattern: a column of flips per
    exchangeability block (a dependence group, or an image without groups), drawn
    ``RandomState(random_state).choice((-1, 1), (n_iters, n_blocks))``; each pattern's
    flipped statistic (one-sample t, or the weighted CR2 t with ``use_sample_size``)
    on its blocks' mean maps, converted to z with the pattern's dof; max over voxels.
    """
    maps_in = estimator._meta_maps
    rows = getattr(estimator, "images_", None)
    if rows is None:  # NiMARE drops images without a usable voxel: they take no flip column
        rows = estimator._usable_images(maps_in, estimator._roles(), True)
    n_images = rows.size
    codes = np.asarray(estimator.inputs_["contrast_names"]) if estimator._grouped() else None
    n_blocks = n_images if codes is None else int(np.unique(codes).size)
    flips = _flips(sign_flips, n_iters, n_blocks, estimator.random_state)
    sizes = None
    if estimator.use_sample_size:
        sizes = np.asarray(maps_in.sample_sizes, dtype=np.float64)[rows]
    beta = estimator._stored(maps_in, "beta")
    if rows is not None and rows.size != maps_in.n_images:
        beta = meta_graph.select_images(beta, rows)
    computed = meta_graph.per_block(_montecarlo_block, beta, flips, estimator.two_sided, estimator.aggressive_mask,
                                    codes, sizes)
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
    unit = "image" if codes is None else "dependence group's contribution as one exchangeability block"
    description = ("Family-wise error rate correction was performed with a max-statistic null distribution "
                   f"generated by sign-flipping each {unit} ({flips.shape[0]} iterations), the maximum taken "
                   "over z-statistics.")
    return maps, {}, description


def _flips(sign_flips, n_iters, n_blocks, random_state) -> np.ndarray:
    if sign_flips is not None:
        flips = np.asarray(sign_flips, dtype=np.float64)
        if flips.ndim != 2 or flips.shape[1] != n_blocks or not np.isin(flips, (-1.0, 1.0)).all():
            raise InputError(f"sign_flips must have shape (n_iters, {n_blocks}) (one column per exchangeability "
                             f"block) with values -1 and 1; received shape {flips.shape}.")
        return flips
    if not isinstance(n_iters, int | np.integer) or n_iters <= 0:
        raise InputError(f"n_iters must be a positive integer; received {n_iters!r}.")
    return np.random.RandomState(random_state).choice((-1.0, 1.0), size=(int(n_iters), n_blocks))


def _montecarlo_block(block, flips, two_sided, aggressive, codes=None, sizes=None):
    """Observed z and per-flip null max z of one voxel block, over its missing-data patterns.

    ``codes``: dependence-group code of each image (flip column), None for one block per image;
    ``sizes``: per-image sample sizes for the weighted statistic, None for the one-sample t.
    """
    values = np.asarray(block, dtype=np.float64)
    valid = _bags.validity({"beta": values})
    z = np.full(values.shape[1], np.nan)
    null = np.full(flips.shape[0], -np.inf)
    for rows, voxels in _bags.pattern_groups(valid, aggressive):
        if voxels.size == 0 or rows.sum() < _bags.MIN_STUDIES:
            continue
        y = values[np.ix_(rows, voxels)]
        weights = None if sizes is None else sizes[rows]
        if codes is None:
            columns = np.flatnonzero(rows)
        else:
            columns = np.unique(codes[rows])
            if columns.size < _bags.MIN_STUDIES:
                continue  # one group: no fit (NiMARE skips it too)
            y, weights = km.collapse_blocks(y, codes[rows], weights)
        n = y.shape[0]
        if weights is None:
            # NiMARE's arithmetic (observed: column sums; null: flips @ y), so that a flip of all +1
            # ties exactly with the observed statistic, as it does in NiMARE.
            t = km.one_sample_t(y.sum(axis=0), np.einsum("ij,ij->j", y, y), n)
            dof = n - 1
            pattern_null = km.sign_flip_max_null(y, flips[:, columns], two_sided)
        else:
            t = km.weighted_sign_flip_t(y, weights, np.ones((1, n)))[0]
            dof = km.weighted_mean_satterthwaite_dof(weights)
            pattern_null = km.weighted_sign_flip_max_null(y, weights, flips[:, columns], two_sided)
        z[voxels] = km.t_to_z(t, dof)
        np.fmax(null, km.t_to_z(pattern_null, dof), out=null)
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
