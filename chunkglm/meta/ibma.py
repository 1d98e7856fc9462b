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
:class:`FFX_GLM`, :class:`MFX_GLM`, :class:`RFX_GLM`, :class:`WeightedStouffers`
and the old ``Stouffers(inference, null, n_iters, two_sided)`` signature.

Differences from NiMARE (all refused with an InputError, never silently
different): dependence groups (several images sharing a ``study_id`` with
``groupby=None``, or a ``groupby`` that groups images) are not modelled, so
``weight_scheme``/``rho`` have no effect and are accepted only at their
defaults; images are never resampled (maps on other grids are refused).
"""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd

from chunkglm._version import __version__
from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels import meta as km
from chunkglm.meta import _bags
from chunkglm.meta._blocks import _ROLE_OF, _fit_block, _image_any_valid, _image_roles, _role, _stored_roles
from chunkglm.meta._inputs import DERIVATIONS, ROLES, MetaMaps, _is_nimare_dataset, resolve, table_from_dataset
from chunkglm.meta.correct import add_cluster_maps, permuted_ols_montecarlo
from chunkglm.meta.results import MetaResult

_REGRESSION_DEFAULTS = {"weight_scheme": "rescale", "rho": 0.8}
_WEIGHT_SCHEMES = ("rescale", "individual", "collapse")
_SMALL_SAMPLE = ("knapp-hartung", "knapp-hartung-conservative", "wald")
_REMOVED = ("resample", "memory_limit")


class IBMAEstimator:
    """Base class: parameters, input checks and the block graph.

    Parameters
    ----------
    aggressive_mask : bool
        Drop every voxel that is zero or NaN in any input map (NiMARE's
        ``aggressive_mask=True``); default fits each missing-data pattern
        with its own studies.
    mask : str, Path or nibabel image, optional
        Restricts the analysed voxels (on the collection's grid).
    groupby : None, False, str or array-like
        None (NiMARE's default) groups images by ``study_id``, a str by that
        per-image coordinate, an array gives one label per image. chunkglm
        does not model dependence groups: every label must be unique (an
        InputError says so otherwise). False treats every image as independent.
    memory, memory_level, generate_description
        Accepted for NiMARE compatibility (caching does not apply here).
    store : str or Path, optional
        Where NIfTI/Dataset inputs are converted (default: a temporary store).
    chunk_voxels : int, optional
        Voxels per block of the graph (default: each store chunk split so that
        a task's float64 (K, voxel) block is about
        :data:`chunkglm.graph.meta.TASK_BLOCK_BYTES`).
    """

    _kernel: str = ""

    def __init__(self, aggressive_mask=False, memory=None, memory_level=0, generate_description=True, *,
                 mask=None, groupby=None, store=None, chunk_voxels=None, **kwargs):
        _check_kwargs(type(self).__name__, kwargs)
        self.aggressive_mask = bool(aggressive_mask)
        self.memory = memory
        self.memory_level = memory_level
        self.generate_description = generate_description
        self.mask = mask
        self.groupby = groupby
        self.store = store
        self.chunk_voxels = chunk_voxels

    # -- what subclasses declare ----------------------------------------------------

    def _kernel_name(self) -> str:
        return self._kernel

    def _kernel_params(self) -> dict:
        """Estimator parameters the kernel takes, by the kernel's keyword names."""
        return {}

    def _roles(self) -> tuple[str, ...]:
        """Kernel inputs (keyword names) this fit passes."""
        return tuple(km.INPUTS[self._kernel_name()])

    def _aliases(self) -> dict:
        """Kernel input name -> map type, where they differ (``con`` is ``beta``)."""
        return dict(_ROLE_OF)

    def _row_scale(self, blocks, stored, rows):
        """Per-image divisor of the image inputs (old RFX_GLM's global normalisation), or None."""
        return None

    def _outputs(self) -> tuple[str, ...]:
        return tuple(km.OUTPUTS[self._kernel_name()])

    def _description(self, n_images: int) -> str:
        return (f"An image-based meta-analysis was performed with chunkglm {__version__} on "
                f"{n_images} images using the {type(self).__name__} estimator, reproducing "
                "NiMARE 0.22's implementation.")

    def get_params(self, deep=True) -> dict:
        """Constructor parameters and their values (scikit-learn style)."""
        names = []
        for klass in type(self).__mro__:
            if "__init__" in vars(klass) and klass is not object:
                names += [p for p in inspect.signature(klass.__init__).parameters
                          if p not in ("self", "kwargs", "args") and p not in names]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    # -- fit ------------------------------------------------------------------------

    def fit(self, dataset, drop_invalid=True) -> MetaResult:
        """Fit to a maps collection, a table of NIfTI paths or a NiMARE Dataset.

        Parameters
        ----------
        dataset : chunkglm.io.cohort.Node, pandas.DataFrame or nimare.dataset.Dataset
            See :func:`chunkglm.meta._inputs.resolve`.
        drop_invalid : bool
            Drop images with no usable voxel (NiMARE's default); False raises.

        Returns
        -------
        MetaResult
            Lazy until a map is read.

        Notes
        -----
        Two global passes run at fit, each one read of the inputs: with
        ``aggressive_mask`` (which images hold any usable voxel; NiMARE drops
        the others first) and for the old RFX tests (each map's standard
        deviation over voxels). Otherwise fit reads only metadata.
        """
        inputs, mask = self._needed_images(dataset)
        maps = resolve(inputs, mask, store=self.store)
        self.inputs_ = maps
        roles = self._roles()
        self._check_inputs(maps, roles)
        rows = self._usable_images(maps, roles, drop_invalid) if self.aggressive_mask else None
        self.images_ = rows
        lazy = self._graph(maps, roles, rows)
        n_images = maps.n_images if rows is None else int(rows.size)
        result = MetaResult(self, lazy, self._outputs(), maps, self._description(n_images))
        result.tables.update(self._tables())
        return result

    def _needed_images(self, dataset):
        """A table (or NiMARE Dataset) reduced to the map types this estimator reads, so that
        only those are converted (NiMARE loads only its required inputs too); other inputs as
        given. Returns ``(inputs, mask)``: a Dataset's mask unless ``mask`` was given."""
        mask = self.mask
        if _is_nimare_dataset(dataset):
            dataset, dataset_mask = table_from_dataset(dataset)
            mask = dataset_mask if mask is None else mask
        if not isinstance(dataset, pd.DataFrame):
            return dataset, mask
        aliases = self._aliases()
        needed = set()
        for arg in _image_roles(self._roles()):
            role = _role(arg, aliases)
            if role in dataset.columns or role not in DERIVATIONS:
                needed.add(role)
            else:
                needed.update(s for s in DERIVATIONS[role] if s != "sample_sizes")
        unused = [c for c in ROLES if c in dataset.columns and c not in needed]
        return (dataset.drop(columns=unused) if unused and needed & set(dataset.columns) else dataset), mask

    def _tables(self) -> dict:
        """Non-map outputs (NiMARE: the assumed tau2 of WLS and FixedEffectsHedges)."""
        if hasattr(self, "tau2"):
            return {"level-estimator": pd.DataFrame(columns=["tau2"], data=[self.tau2])}
        return {}

    def _check_inputs(self, maps: MetaMaps, roles) -> None:
        name = type(self).__name__
        missing = [self._aliases().get(r, _role(r)) for r in roles
                   if self._aliases().get(r, _role(r)) not in maps.available()]
        if missing:
            how = {"sample_sizes": "a sample_sizes column / coordinate",
                   "varcope": "varcope maps (or se maps: varcope = se**2)",
                   "z": "z maps (or t maps with sample_sizes)"}
            raise InputError(f"{name} needs {', '.join(how.get(r, f'{r} maps') for r in missing)}; the "
                             f"collection {maps.node.name!r} holds {sorted(maps.available())}.")
        if maps.n_images < _bags.MIN_STUDIES:
            raise InputError(f"{name} needs at least {_bags.MIN_STUDIES} images; received {maps.n_images}. "
                             "One image has no replication to estimate a variance from.")
        self._check_groups(maps)

    def _check_groups(self, maps: MetaMaps) -> None:
        if self.groupby is False:
            return
        if self.groupby is None:
            labels = maps.coord("study_id")
            labels = maps.ids if labels is None else labels
            what = "study_id"
        elif isinstance(self.groupby, str):
            labels = maps.coord(self.groupby)
            if labels is None:
                raise InputError(f"groupby={self.groupby!r} names no per-image coordinate of the collection.")
            what = self.groupby
        else:
            labels = np.asarray(self.groupby).ravel()
            what = "groupby"
            if labels.size != maps.n_images:
                raise InputError(f"groupby must contain one label per image: expected {maps.n_images}, "
                                 f"got {labels.size}.")
        values, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
        if (counts > 1).any():
            raise InputError(
                f"{type(self).__name__}: images share a {what} ({values[counts > 1][:5].tolist()} ...), which "
                "NiMARE 0.22 models as dependence groups (cluster-robust errors, Brown's method). chunkglm "
                "does not model dependence groups: give each image its own study_id, or pass groupby=False "
                "to treat the images as independent (this inflates significance if they share participants).")

    def _usable_images(self, maps, roles, drop_invalid) -> np.ndarray:
        """NiMARE drops images with no usable voxel before the aggressive mask (one global pass)."""
        stored = _stored_roles(roles, maps, self._aliases())
        blocks = [self._stored(maps, r) for r in stored]
        keep = meta_graph.rows_with_any(_image_any_valid, blocks, roles=roles, stored=stored,
                                        sample_sizes=maps.sample_sizes, aliases=self._aliases())
        if keep.all():
            return np.arange(keep.size)
        if not drop_invalid or not keep.any():
            raise InputError(f"{int((~keep).sum())} of {keep.size} images have no voxel with a usable value "
                             f"in every required input ({np.asarray(maps.ids)[~keep][:10].tolist()}). "
                             + ("Pass drop_invalid=True to drop them." if keep.any() else "Nothing to meta-analyse."))
        if keep.sum() < _bags.MIN_STUDIES:
            raise InputError(f"only {int(keep.sum())} image(s) hold usable values; a meta-analysis needs 2.")
        return np.flatnonzero(keep)

    def _stored(self, maps: MetaMaps, role):
        """A stored map type in the voxel blocks of the tasks (lazy)."""
        return meta_graph.task_array(maps.data(role), self.chunk_voxels)

    def _graph(self, maps: MetaMaps, roles, rows):
        """(n_outputs, V) float64 dask array of the estimator's maps."""
        aliases = self._aliases()
        stored = _stored_roles(roles, maps, aliases)
        blocks = [self._stored(maps, r) for r in stored]
        if rows is not None and rows.size != maps.n_images:
            blocks = [meta_graph.select_images(b, rows) for b in blocks]
        sizes = maps.sample_sizes
        if sizes is not None and rows is not None:
            sizes = sizes[rows]
        params, per_study = self._split_params(self._kernel_params())
        outputs = self._outputs()
        # one row more than the maps: which voxels held a NaN/inf (MetaResult's warning)
        return meta_graph.block_maps(
            _fit_block, blocks, len(outputs) + 1, f"meta-{type(self).__name__}", kernel_name=self._kernel_name(),
            roles=roles, stored=stored, aliases=aliases, row_scale=self._row_scale(blocks, stored, rows),
            sample_sizes=sizes, params=params, per_study=per_study, aggressive=self.aggressive_mask,
            outputs=outputs)

    @staticmethod
    def _split_params(params):
        """Per-study keyword values (last axis = the fitted images, e.g. sign flips) are sliced per pattern."""
        per_study = {k: np.asarray(v) for k, v in params.items() if k in ("sign_flips",) and v is not None}
        return {k: v for k, v in params.items() if k not in per_study}, per_study


def _check_kwargs(name, kwargs):
    removed = [k for k in kwargs if k in _REMOVED]
    resample = [k for k in kwargs if k.startswith("resample__")]
    other = sorted(set(kwargs) - set(removed) - set(resample))
    if removed or other:
        raise TypeError(f"{name} got unexpected keyword argument(s): {', '.join(map(repr, removed + other))}.")
    if resample:
        raise InputError(f"{name}: {resample} set how NiMARE resamples images onto the mask; chunkglm never "
                         "resamples (maps on another grid are refused). Resample the maps first.")


# -- new API ---------------------------------------------------------------------------


class _RegressionEstimator(IBMAEstimator):
    """PyMARE meta-regression estimators: ``weight_scheme``, ``rho``, ``small_sample_correction``."""

    def __init__(self, weight_scheme="rescale", rho=0.8, small_sample_correction=None, **kwargs):
        if weight_scheme not in _WEIGHT_SCHEMES:
            raise InputError(f"Invalid weight_scheme '{weight_scheme}'; must be one of {sorted(_WEIGHT_SCHEMES)}.")
        if small_sample_correction is not None and small_sample_correction not in _SMALL_SAMPLE:
            raise InputError(f"Invalid small_sample_correction '{small_sample_correction}'; must be None or "
                             f"one of {sorted(_SMALL_SAMPLE)}.")
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0.0 <= float(rho) <= 1.0:
            raise InputError(f"Invalid rho {rho!r}; must be a number in [0, 1].")
        super().__init__(**kwargs)
        # Without dependence groups NiMARE passes no groups to PyMARE: both are inert.
        self.weight_scheme = weight_scheme
        self.rho = float(rho)
        self.small_sample_correction = small_sample_correction

    def _kernel_params(self) -> dict:
        params = {}
        if self.small_sample_correction is not None:
            params["small_sample_correction"] = self.small_sample_correction
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
    n_images = estimator.inputs_.n_images if rows is None else rows.size
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
        Weight studies by sample size (CR2 t, Satterthwaite dof); its Monte
        Carlo correction is not implemented.
    n_jobs : int
        Accepted for compatibility (the dask client sets parallelism).
    random_state : int
        Seed of the sign flips of :meth:`correct_fwe_montecarlo` (NiMARE draws
        ``RandomState(random_state).choice((-1, 1), (n_iters, K))``; so does chunkglm).

    Maps: ``t``, ``z``, ``p``, ``logp``, ``dof``.
    """

    _kernel = "PermutedOLS"

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
        sign_flips : ndarray of shape (n_iters, K), optional
            Explicit flips (+-1) instead of NiMARE's seeded draw.
        """
        if self.use_sample_size:
            raise InputError("Monte Carlo FWE of PermutedOLS(use_sample_size=True) (NiMARE's CR2 sign-flip null) "
                             "is not implemented in chunkglm; use use_sample_size=False, or Bonferroni/FDR.")
        return permuted_ols_montecarlo(self, result, n_iters, sign_flips)


# -- old API ---------------------------------------------------------------------------


class _ClusterGLM(IBMAEstimator):
    """FFX/MFX GLM of the old API: voxelwise maps, then the cluster-level rule of ``cdt``/``q``."""

    def __init__(self, cdt=0.01, q=0.05, two_sided=True, **kwargs):
        super().__init__(**kwargs)
        if not 0 < cdt < 1 or not 0 < q < 1:
            raise InputError(f"cdt and q must be probabilities in (0, 1); received cdt={cdt!r}, q={q!r}.")
        self.cdt = cdt
        self.q = q
        self.two_sided = two_sided

    def _kernel_params(self):
        return _accepted(self._kernel, {"two_sided": self.two_sided})

    def _roles(self):
        roles = super()._roles()
        inputs = getattr(self, "inputs_", None)
        if inputs is not None and inputs.sample_sizes is not None and "sample_sizes" not in roles:
            roles = (*roles, "sample_sizes")  # old NiMARE passed n - 1 to flameo as varcope dof
        return roles

    def fit(self, dataset, drop_invalid=True):
        """Voxelwise maps plus ``z_corr-cluster`` / ``logp_corr-cluster`` (see :mod:`chunkglm.meta.correct`)."""
        result = super().fit(dataset, drop_invalid)
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
    """

    _kernel = "FFX_GLM"


class MFX_GLM(_ClusterGLM):  # noqa: N801
    """Mixed-effects GLM (FLAME1-style REML tau^2), NiMARE 0.0.x ``MFX_GLM`` without FSL.

    Parameters
    ----------
    cdt, q, two_sided
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
           "WeightedLeastSquares", "WeightedStouffers"]
