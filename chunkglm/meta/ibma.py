"""Image-based meta-analysis estimators with NiMARE 0.22's names, parameters and maps.

Each estimator holds parameters; ``fit`` resolves the inputs into a maps
collection of a cohort store (NIfTI tables and NiMARE Datasets are converted
once) and builds one dask graph: every voxel block of the collection is read
once, its missing-data patterns are found (:mod:`chunkglm.meta._bags`), and
the estimator's kernel (:mod:`chunkglm.kernels.meta`) runs once per pattern.
Nothing is computed until a map is asked for; all maps of a fit come from
one pass.

New API (NiMARE >= 0.1): :class:`Fishers`, :class:`Stouffers`,
:class:`WeightedLeastSquares`, :class:`DerSimonianLaird`, :class:`Hedges`,
:class:`VarianceBasedLikelihood`, :class:`SampleSizeBasedLikelihood`,
:class:`PermutedOLS`, :class:`FixedEffectsHedges`. Old API (NiMARE 0.0.x):
:class:`FFX_GLM`, :class:`MFX_GLM`, :class:`RFX_GLM`, :class:`WeightedStouffers`,
the old ``Stouffers(inference, null, n_iters, two_sided)`` signature and the module
functions :func:`ffx_glm`, :func:`mfx_glm`, :func:`fsl_glm` (:mod:`chunkglm.meta._old_api`).

Dependence groups (several images sharing a ``study_id`` with
``groupby=None``, or a ``groupby`` that groups images) are modelled as NiMARE
0.22 models them: the regression estimators through PyMARE's
``weight_scheme``/``rho``, CR2 standard errors and Satterthwaite dof
(:mod:`chunkglm.kernels.meta.dependence`). Maps not on the mask's grid are
resampled at conversion as NiMARE resamples them (``resample__*`` options).
The base class and the input handling are in :mod:`chunkglm.meta._estimator`.
"""

from __future__ import annotations

import inspect

import numpy as np

from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels import meta as km
from chunkglm.meta import grf
from chunkglm.meta._estimator import IBMAEstimator
from chunkglm.meta._old_api import ffx_glm, fsl_glm, mfx_glm
from chunkglm.meta.correct import add_cluster_maps, permuted_ols_montecarlo

_WEIGHT_SCHEMES = ("rescale", "individual", "collapse")
_SMALL_SAMPLE = ("knapp-hartung", "knapp-hartung-conservative", "wald")


# -- new API ---------------------------------------------------------------------------


class _RegressionEstimator(IBMAEstimator):
    """PyMARE meta-regression estimators: ``weight_scheme``, ``rho``, ``small_sample_correction``.

    ``weight_scheme`` and ``rho`` apply where images share a dependence group (without
    groups PyMARE has nothing to rescale or collapse); ``small_sample_correction`` applies
    where they do not (with groups, CR2 errors and Satterthwaite dof replace it), as in NiMARE.
    """

    _models_dependence = True

    def __init__(self, weight_scheme="rescale", rho=0.8, small_sample_correction=None, **kwargs):
        if weight_scheme not in _WEIGHT_SCHEMES:
            raise InputError(f"Invalid weight_scheme '{weight_scheme}'; must be one of {sorted(_WEIGHT_SCHEMES)}.")
        if small_sample_correction is not None and small_sample_correction not in _SMALL_SAMPLE:
            raise InputError(f"Invalid small_sample_correction '{small_sample_correction}'; must be None or "
                             f"one of {sorted(_SMALL_SAMPLE)}.")
        if isinstance(rho, bool) or not isinstance(rho, int | float | np.integer | np.floating):
            raise InputError(f"Invalid rho {rho!r}; must be a number.")
        if not 0.0 <= float(rho) <= 1.0:
            raise InputError(f"Invalid rho {rho!r}; must lie in [0, 1].")
        super().__init__(**kwargs)
        self.weight_scheme = weight_scheme
        self.rho = float(rho)
        self.small_sample_correction = small_sample_correction

    def _kernel_params(self) -> dict:
        params = {}
        if self.small_sample_correction is not None:
            params["small_sample_correction"] = self.small_sample_correction
        if self._grouped():
            params.update(weight_scheme=self.weight_scheme, rho=self.rho)
        return _accepted(self._kernel_name(), params)


def _accepted(kernel_name, params) -> dict:
    """Keep the parameters the kernel takes; refuse non-default ones it does not."""
    kernel = km.KERNELS[kernel_name]
    signature = inspect.signature(kernel).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.values())
    unknown = [k for k in params if k not in signature and not takes_any]
    if unknown:
        raise InputError(f"{kernel_name}: {unknown} = {[params[k] for k in unknown]} is not supported by "
                         "chunkglm's kernel; leave it at NiMARE's default.")
    return params


class Fishers(IBMAEstimator):
    """Fisher's combined probability test on z maps (NiMARE ``Fishers``).

    Parameters
    ----------
    two_sided : bool
        Two-sided ("concordant") or one-sided ("directed") test.
    use_sample_size : bool
        Weighted Fisher with sample sizes as weights.
    **kwargs
        See :class:`IBMAEstimator`.

    Maps: ``z``, ``p``, ``logp``, ``dof``.
    """

    _kernel = "Fishers"
    _voxel_averaging = "reject"
    _models_dependence = True
    _requires_corr_matrix = True

    def __init__(self, two_sided=True, use_sample_size=False, **kwargs):
        super().__init__(**kwargs)
        self.two_sided = two_sided
        self.use_sample_size = use_sample_size

    def _roles(self):
        roles = super()._roles()
        if self.use_sample_size and "sample_sizes" not in roles:
            roles = (*roles, "sample_sizes")
        return roles

    def _kernel_params(self):
        params = {"two_sided": self.two_sided}
        if self.use_sample_size:
            params["use_sample_size"] = True
        return _accepted(self._kernel, params)


class Stouffers(IBMAEstimator):
    """Stouffer's z on z maps, NiMARE 0.22's and the old (0.0.x) signature in one class.

    New: ``Stouffers(use_sample_size=False, two_sided=True, **kwargs)``.
    Old: ``Stouffers(inference='ffx', null='theoretical', n_iters=None, two_sided=True)``
    (recognised when the first positional argument is a string, or when
    ``inference``/``null``/``n_iters`` are given). ``inference='ffx'`` is
    Stouffer's z (NiMARE 0.22's Stouffers); ``inference='rfx'`` is the old
    random-effects t-test on the z maps (``RFX_GLM`` on z), with a
    theoretical or sign-flip (``null='empirical'``, ``n_iters`` flips) null.

    Maps: ``z``, ``p``, ``logp``, ``dof`` (``inference='rfx'``: those of RFX_GLM).
    """

    _kernel = "Stouffers"
    _voxel_averaging = "reject"
    _requires_corr_matrix = True
    _chunkglm_only = ("inference", "null", "n_iters", "random_state")

    def __init__(self, *args, inference=None, null=None, n_iters=None, two_sided=True,
                 use_sample_size=False, random_state=None, **kwargs):
        if args and isinstance(args[0], str):  # old positional signature
            old = dict(zip(("inference", "null", "n_iters", "two_sided"), args))
            inference, null = old.get("inference", inference), old.get("null", null)
            n_iters, two_sided = old.get("n_iters", n_iters), old.get("two_sided", two_sided)
        elif args:
            new = dict(zip(("use_sample_size", "two_sided"), args))
            use_sample_size, two_sided = new.get("use_sample_size", use_sample_size), new.get("two_sided", two_sided)
        super().__init__(**kwargs)
        self.inference = "ffx" if inference is None else inference
        self.null = "theoretical" if null is None else null
        if self.inference not in ("ffx", "rfx") or self.null not in ("theoretical", "empirical"):
            raise InputError(f"Stouffers: inference must be 'ffx' or 'rfx' and null 'theoretical' or "
                             f"'empirical'; received inference={inference!r}, null={null!r}.")
        if self.null == "empirical" and self.inference != "rfx":
            raise InputError("Stouffers: an empirical null is only possible with inference='rfx'.")
        self.n_iters = n_iters
        self.two_sided = two_sided
        self.use_sample_size = use_sample_size
        self.random_state = random_state

    def _kernel_name(self):
        return "RFX_GLM" if self.inference == "rfx" else "Stouffers"

    @property
    def _models_dependence(self):
        return self.inference == "ffx"  # the old random-effects t-test had no dependence groups

    def _roles(self):
        roles = super()._roles()
        if self.inference == "ffx" and self.use_sample_size and "sample_sizes" not in roles:
            roles = (*roles, "sample_sizes")
        return roles

    def _aliases(self):
        return {"con": "z"}  # old Stouffers rfx: the one-sample t-test runs on the z maps

    def _row_scale(self, blocks, stored, rows):
        return _unit_variance(blocks) if self.inference == "rfx" else None

    def _kernel_params(self):
        params = {"two_sided": self.two_sided}
        if self.inference == "rfx":
            params.update(_empirical_null(self.null, self.n_iters, self.random_state, self))
        elif self.use_sample_size:
            params["use_sample_size"] = True
        return _accepted(self._kernel_name(), params)


def _empirical_null(null, n_iters, random_state, estimator) -> dict:
    """Sign flips of an old-API empirical null, drawn once for all voxel blocks."""
    if null != "empirical":
        return {}
    if not isinstance(n_iters, int | np.integer) or n_iters < 1:
        raise InputError(f"null='empirical' needs n_iters, a positive number of sign flips; received {n_iters!r}.")
    rows = estimator.images_
    n_images = estimator._meta_maps.n_images if rows is None else rows.size
    flips = np.random.RandomState(random_state).choice((-1.0, 1.0), size=(int(n_iters), n_images))
    return {"sign_flips": flips}


def _unit_variance(blocks):
    """Old NiMARE's RFX normalisation: each map divided by its std over all analysed voxels.

    A global pass (one read of the maps) done at fit; NaN entries are ignored, zeros count
    (old NiMARE took ``np.std`` of the masked maps).
    """
    return meta_graph.row_nanstd(blocks[0])


class WeightedLeastSquares(_RegressionEstimator):
    """Weighted least squares with a known tau^2 (NiMARE ``WeightedLeastSquares``).

    Parameters
    ----------
    tau2 : float
        Assumed between-study variance (default 0: fixed effects).

    Maps: ``z``, ``p``, ``logp``, ``est``, ``se``, ``dof``.
    """

    _kernel = "WeightedLeastSquares"

    def __init__(self, tau2=0, **kwargs):
        super().__init__(**kwargs)
        self.tau2 = tau2

    def _kernel_params(self):
        return {**super()._kernel_params(), **_accepted(self._kernel, {"tau2": self.tau2})}


class DerSimonianLaird(_RegressionEstimator):
    """DerSimonian-Laird random effects (NiMARE ``DerSimonianLaird``).

    Maps: ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """

    _kernel = "DerSimonianLaird"


class Hedges(_RegressionEstimator):
    """Hedges' random-effects estimator (NiMARE ``Hedges``).

    Maps: ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """

    _kernel = "Hedges"


class VarianceBasedLikelihood(_RegressionEstimator):
    """ML/REML random effects with known variances (NiMARE ``VarianceBasedLikelihood``).

    Parameters
    ----------
    method : {"ml", "reml"}

    Notes
    -----
    tau^2 maximises the same profile likelihood as PyMARE's, but with a bracketed
    Newton solver (:mod:`chunkglm.kernels.meta.likelihood`) where PyMARE runs a
    bounded scan and golden-section search. Where a voxel's profile has two basins
    PyMARE may stop in the worse one; chunkglm keeps the better optimum. On NiMARE's
    own test data (21 studies, 1,000 voxels) that is 2 voxels under ML (tau^2 2.2 and
    7.2 against NiMARE's 48.3 and 65.5) and 1 under REML, each with a higher
    likelihood by PyMARE's own objective (tests/test_meta_likelihood_optimum.py);
    everywhere else the maps agree to PyMARE's optimiser tolerance.

    Maps: ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """

    _kernel = "VarianceBasedLikelihood"

    def __init__(self, method="ml", **kwargs):
        super().__init__(**kwargs)
        self.method = method

    def _kernel_params(self):
        if str(self.method).lower() not in ("ml", "reml"):
            raise InputError(f"method must be 'ml' or 'reml'; received {self.method!r}.")
        return {**super()._kernel_params(), **_accepted(self._kernel, {"method": str(self.method).lower()})}


class SampleSizeBasedLikelihood(VarianceBasedLikelihood):
    """ML/REML with sample sizes and unknown variances (NiMARE ``SampleSizeBasedLikelihood``).

    Maps: ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``sigma2``, ``dof``.
    """

    _kernel = "SampleSizeBasedLikelihood"
    _voxel_averaging = None

    def _check_inputs(self, maps, roles):
        super()._check_inputs(maps, roles)
        sizes = maps.sample_sizes
        if sizes is not None and np.unique(sizes).size == 1:
            raise InputError(
                f"SampleSizeBasedLikelihood needs sample sizes that differ between studies: all {sizes.size} "
                f"are {sizes[0]:g}, so the within-study variance sigma2/n cannot be told apart from tau2 "
                "(the likelihood is flat along sigma2 + n*tau2). Use VarianceBasedLikelihood with varcope maps, "
                "or DerSimonianLaird.")


class FixedEffectsHedges(_RegressionEstimator):
    """Fixed effects on Hedges' g from t maps and sample sizes (NiMARE ``FixedEffectsHedges``).

    Parameters
    ----------
    tau2 : float
        Assumed between-study variance (default 0).

    Maps: ``z``, ``p``, ``logp``, ``est``, ``se``, ``dof``.
    """

    _kernel = "FixedEffectsHedges"

    def __init__(self, tau2=0, **kwargs):
        super().__init__(**kwargs)
        self.tau2 = tau2

    def _kernel_params(self):
        return {**super()._kernel_params(), **_accepted(self._kernel, {"tau2": self.tau2})}


class PermutedOLS(IBMAEstimator):
    """One-sample OLS on beta maps with a sign-flip max-T FWE correction (NiMARE ``PermutedOLS``).

    Parameters
    ----------
    two_sided : bool
    use_sample_size : bool
        Weight studies by sample size (CR2 t, Satterthwaite dof).
    n_jobs : int
        Accepted for compatibility (the dask client sets parallelism).
    random_state : int
        Seed of the sign flips of :meth:`correct_fwe_montecarlo` (NiMARE draws
        ``RandomState(random_state).choice((-1, 1), (n_iters, n_blocks))``; so does chunkglm).

    Dependence groups are exchangeability blocks, as in NiMARE 0.22: each group's
    mean map enters the test (K becomes the number of groups), its sample size the
    group's mean, and the sign flips of the FWE correction flip whole groups.

    Maps: ``t``, ``z``, ``p``, ``logp``, ``dof``.
    """

    _kernel = "PermutedOLS"
    _voxel_averaging = None
    _models_dependence = True

    def __init__(self, two_sided=True, use_sample_size=False, n_jobs=1, random_state=42, **kwargs):
        super().__init__(**kwargs)
        self.two_sided = two_sided
        self.use_sample_size = use_sample_size
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _roles(self):
        return ("beta", "sample_sizes") if self.use_sample_size else ("beta",)

    def _kernel_params(self):
        params = {"two_sided": self.two_sided}
        if self.use_sample_size:
            params["use_sample_size"] = True
        return _accepted(self._kernel, params)

    def correct_fwe_montecarlo(self, result, n_iters=5000, n_cores=1, sign_flips=None):
        """NiMARE's max-z sign-flip FWE correction; maps ``{p,z,logp}_level-voxel``.

        Parameters
        ----------
        result : MetaResult
        n_iters : int
            Number of sign flips.
        n_cores : int
            Accepted for compatibility.
        sign_flips : ndarray of shape (n_iters, n_blocks), optional
            Explicit flips (+-1) instead of NiMARE's seeded draw, one column per
            exchangeability block (dependence group, in sorted-label order; or image).
        """
        return permuted_ols_montecarlo(self, result, n_iters, sign_flips)


# -- old API ---------------------------------------------------------------------------


class _ClusterGLM(IBMAEstimator):
    """FFX/MFX GLM of the old API: voxelwise maps, then the cluster-level rule of ``cdt``/``q``.

    Two rules (``cluster``), each adding ``z_corr-cluster`` (z inside significant
    clusters, 0 elsewhere: old NiMARE's ``thresh_z``, also readable under that name
    with ``get_map``) and ``labels_corr-cluster``, computed with the maps:

    - ``"fdr"`` (default; distribution-free, needs no smoothness): voxels with
      uncorrected ``p < cdt`` (the estimator's p, two-sided when ``two_sided``), split
      by the sign of z, 6-connected; a cluster is kept when its peak voxel passes
      Benjamini-Hochberg FDR at ``q`` over all analysed voxels
      (:func:`chunkglm.meta.correct.add_cluster_maps`). It controls the FDR of peaks,
      not the family-wise error of cluster extent, and ignores cluster size.
    - ``"grf"``: the old NiMARE 0.0.x meaning (FSL ``smoothest`` + ``cluster``):
      ``z > cdt_z`` (``cdt_z`` the two-tailed z of ``cdt``, whatever ``two_sided``;
      ``-z > cdt_z`` too when ``two_sided``), 26-connected, a cluster kept when its
      Gaussian-random-field p-value (from its size in voxels and the residuals'
      smoothness) is below ``q`` (:mod:`chunkglm.meta.grf`); adds
      ``logp_corr-cluster`` (-log10 cluster p of every supra-threshold cluster) and
      ``result.metadata["smoothness"]`` (FWHM per axis in voxels, dLh, resels, volume).
    """

    _chunkglm_only = IBMAEstimator._chunkglm_only + ("cluster",)

    def __init__(self, cdt=0.01, q=0.05, two_sided=True, cluster="fdr", **kwargs):
        super().__init__(**kwargs)
        if not 0 < cdt < 1 or not 0 < q < 1:
            raise InputError(f"cdt and q must be probabilities in (0, 1); received cdt={cdt!r}, q={q!r}.")
        self.cdt = cdt
        self.q = q
        self.two_sided = two_sided
        self.cluster = grf.check_cluster_rule(cluster)
        if cluster == "grf":
            grf.check_cluster_z(grf.cdt_to_z(cdt))

    def _kernel_params(self):
        return _accepted(self._kernel, {"two_sided": self.two_sided})

    def _roles(self):
        roles = super()._roles()
        inputs = getattr(self, "_meta_maps", None)
        if inputs is not None and inputs.sample_sizes is not None and "sample_sizes" not in roles:
            roles = (*roles, "sample_sizes")  # old NiMARE passed n - 1 to flameo as varcope dof
        return roles

    def fit(self, dataset, drop_invalid=True):
        """Voxelwise maps plus the cluster maps of the ``cluster`` rule (see the class notes)."""
        result = super().fit(dataset, drop_invalid)
        if grf.check_cluster_rule(self.cluster) == "grf":
            con = self._stored(self._meta_maps, "beta")
            if self.images_ is not None and self.images_.size != self._meta_maps.n_images:
                con = meta_graph.select_images(con, self.images_)
            grf.add_grf_cluster_maps(result, con, self.cdt, self.q, self.two_sided)
        else:
            add_cluster_maps(result, self.cdt, self.q, self.two_sided)
        return result


class FFX_GLM(_ClusterGLM):  # noqa: N801 - NiMARE's name
    """Fixed-effects GLM on contrast and variance maps (NiMARE 0.0.x ``FFX_GLM``), without FSL.

    Parameters
    ----------
    cdt : float
        Cluster-defining p-value threshold.
    q : float
        Cluster-level significance.
    two_sided : bool
    cluster : {"fdr", "grf"}
        chunkglm only: the cluster rule (see :class:`_ClusterGLM`); ``"grf"`` is the old
        NiMARE meaning of ``cdt``/``q`` (FSL's Gaussian random field cluster p).
    """

    _kernel = "FFX_GLM"


class MFX_GLM(_ClusterGLM):  # noqa: N801
    """Mixed-effects GLM (FLAME1-style REML tau^2), NiMARE 0.0.x ``MFX_GLM`` without FSL.

    Parameters
    ----------
    cdt, q, two_sided, cluster
        As :class:`FFX_GLM`.
    """

    _kernel = "MFX_GLM"


class RFX_GLM(IBMAEstimator):  # noqa: N801
    """Random-effects one-sample t-test on contrast maps (NiMARE 0.0.x ``RFX_GLM``).

    Parameters
    ----------
    null : {"theoretical", "empirical"}
    n_iters : int or None
        Sign flips of the empirical null.
    two_sided : bool
    random_state : int or None
        Seed of the sign flips.
    """

    _kernel = "RFX_GLM"

    def __init__(self, null="theoretical", n_iters=None, two_sided=True, random_state=None, **kwargs):
        super().__init__(**kwargs)
        if null not in ("theoretical", "empirical"):
            raise InputError(f"null must be 'theoretical' or 'empirical'; received {null!r}.")
        self.null = null
        self.n_iters = n_iters
        self.two_sided = two_sided
        self.random_state = random_state

    def _row_scale(self, blocks, stored, rows):
        return _unit_variance(blocks)

    def _kernel_params(self):
        return _accepted(self._kernel, {"two_sided": self.two_sided,
                                        **_empirical_null(self.null, self.n_iters, self.random_state, self)})


class WeightedStouffers(IBMAEstimator):
    """Stouffer's z weighted by sqrt(sample size) (NiMARE 0.0.x ``WeightedStouffers``).

    Parameters
    ----------
    two_sided : bool
    """

    _kernel = "WeightedStouffers"

    def __init__(self, two_sided=True, **kwargs):
        super().__init__(**kwargs)
        self.two_sided = two_sided

    def _kernel_params(self):
        return _accepted(self._kernel, {"two_sided": self.two_sided})


__all__ = ["DerSimonianLaird", "FFX_GLM", "Fishers", "FixedEffectsHedges", "Hedges", "IBMAEstimator", "MFX_GLM",
           "PermutedOLS", "RFX_GLM", "SampleSizeBasedLikelihood", "Stouffers", "VarianceBasedLikelihood",
           "WeightedLeastSquares", "WeightedStouffers", "ffx_glm", "fsl_glm", "mfx_glm"]
