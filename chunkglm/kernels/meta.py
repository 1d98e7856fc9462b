"""Image-based meta-analysis (IBMA) kernels: NiMARE 0.22 / PyMARE 0.0.13 on one voxel block.

Pure numpy on one clean (study, voxel) block: K studies x V voxels, float64,
finite, variances > 0, every voxel valid in every study (the caller applies
NiMARE's liberal-mask "bags" and ``aggressive_mask``). No dask, no files.

Every kernel returns a dict of (V,) float64 maps named and ordered as the
NiMARE 0.22 estimator's ``MetaResult`` maps, for the case NiMARE meets when no
dependence group holds more than one image (``DependenceModel.labels`` is
None): PyMARE then uses model-based standard errors, the estimator's own
``small_sample_correction`` default (Knapp-Hartung where tau^2 is estimated,
Wald for ``WeightedLeastSquares``), and ``weight_scheme`` has no effect (no
groups to rescale or collapse). The ``dof`` map is NiMARE's ``_dof_map``:
the group count minus one, ``K - 1``.

Conventions copied from NiMARE / PyMARE:

- ``p`` is ``exp(nlogp)``, ``nlogp`` the natural log of the p-value computed in
  log space (no underflow); ``logp`` is NiMARE's ``_nlogp_to_logp_values``:
  ``-nlogp / ln 10`` rounded to float32, clipped to [0, float32 max].
- The maps are what NiMARE's ``_fit_over_bags`` holds (float64). NiMARE's
  ``MetaResult`` then casts every map to float32 and clips ``p`` to
  [smallest positive float32, 1]; the writer does that, not the kernels.
- Knapp-Hartung: covariance scaled by ``q = sum w e^2 / (K - 1)`` (0 when
  ``sum w e^2 <= eps``; floored at 1 for "knapp-hartung-conservative"), the
  statistic referred to t with ``K - 1`` dof and ``z`` matched on the log tail.
  A zero or non-finite ``se`` gives NaN ``z``/``p``/``logp``, as PyMARE.

The likelihood estimators (VarianceBasedLikelihood, SampleSizeBasedLikelihood,
MFX_GLM) profile the fixed effect out and solve the one remaining parameter
per voxel, all voxels at once: PyMARE's coarse scan brackets the minimum,
a finer scan of that bracket picks the basin (profiles can be bimodal), then a
safeguarded Newton iteration on the analytic derivatives converges to ~1e-13
relative. Swept against PyMARE on ~2e6 simulated voxels (K = 2..40, variances
over 4 decades), the optimum was never worse than PyMARE's by more than 1e-13
relative in the objective. Each voxel's iterations only read that voxel (PyMARE's stopping
rule is shared by all voxels of a call, so its optimum depends on the block).

Every kernel in :data:`KERNELS` gives bit-identical maps however voxels are
blocked and whatever the memory layout: sums over studies always run in study
order (:func:`_ksum`). The sign-flip nulls use one matrix product per batch of
flips instead (BLAS order), which is why their ties are taken within sqrt(eps).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import special, stats

from chunkglm.errors import InputError

SMALL_SAMPLE_CORRECTIONS = ("knapp-hartung", "knapp-hartung-conservative", "wald")
_LOG2 = math.log(2.0)
_LN10 = math.log(10.0)
_EPS = np.finfo(np.float64).eps
_TINY = np.finfo(np.float64).tiny

# PyMARE's bounded_scalar_min scan fractions and the upper end of its tau^2 search variable.
_SCAN_FRACTIONS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 25), [1e-6, 1e-4, 1e-2],
                                            1.0 - np.array([1e-2, 1e-4, 1e-6])]))
_SEARCH_MAX = 1.0 - 1e-9
_NEWTON_MAX_ITER = 200
_NEWTON_RTOL = 1e-13
#: Interior points (x2: linear and geometric) of the fine scan of the coarse bracket. 4 finds
#: the same optimum as 16 on a sweep of 200,000 voxels (K 3-30, ML and REML, sampling variances
#: over 8 orders of magnitude, tau2 from 0 to dominant) and on the bimodal test voxel, at a
#: third of the objective evaluations.
_FINE_POINTS = 4
#: Bytes of one (K, voxel) float64 array per tile of the likelihood solver.
_TILE_BYTES = 2 * 2**20
_TIE_RTOL = math.sqrt(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- tails


def nimare_logp(nlogp) -> np.ndarray:
    """NiMARE's ``logp`` map from natural-log p-values: float32 ``-log10(p)``, clipped, as float64."""
    with np.errstate(invalid="ignore"):
        logp = (np.asarray(nlogp, dtype=np.float64) / -_LN10 + 0.0).astype(np.float32)
        logp = np.clip(logp, np.float32(0), np.finfo(np.float32).max)
    return logp.astype(np.float64)


def _log_t_sf(t, dof):
    """log of the t upper tail; past SciPy's underflow, the power-law tail (NiMARE's ``_log_t_sf``)."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        out = np.array(stats.t.logsf(t, dof), dtype=np.float64, ndmin=1).reshape(t.shape)
    low = ~np.isfinite(out) & np.isfinite(t) & (t > 0)
    if low.any():
        d = np.broadcast_to(dof, t.shape)[low]
        log_c = (special.gammaln((d + 1) / 2.0) - special.gammaln(d / 2.0) - 0.5 * np.log(np.pi)
                 + ((d - 2) / 2.0) * np.log(d))
        out[low] = log_c - d * np.log(t[low])
    return out


def t_to_nlogp(t, dof, two_sided=True) -> np.ndarray:
    """NiMARE's ``t_to_nlogp``: natural log of the one- or two-tailed t p-value."""
    t = np.asarray(t, dtype=np.float64)
    nlogp = _LOG2 + _log_t_sf(np.abs(t), dof) if two_sided else _log_t_sf(t, dof)
    return np.minimum(nlogp, 0.0)


def t_to_z(t, dof) -> np.ndarray:
    """NiMARE's ``t_to_z``: z with the same one-tailed log tail as ``|t|``, sign of ``t``."""
    t = np.asarray(t, dtype=np.float64)
    nlogp = t_to_nlogp(np.abs(t), dof, two_sided=False)
    return np.sign(t) * np.maximum(-special.ndtri_exp(nlogp), 0.0) + 0.0


def _z_from_nlogp(nlogp, sign, two_sided):
    """NiMARE's ``nlogp_to_z`` with the statistic's sign reapplied (0 counts as +)."""
    if two_sided:
        z = -special.ndtri_exp(nlogp - _LOG2) + 0.0
    else:
        z = np.maximum(-special.ndtri_exp(nlogp), 0.0)
    return z * np.where(sign == 0, 1.0, np.sign(sign))


def log_chi2_sf(q, df) -> np.ndarray:
    """log P(chi2_df > q), finite where SciPy underflows (PyMARE's ``log_chi2_sf``)."""
    q = np.asarray(q, dtype=np.float64)
    a, x = np.broadcast_arrays(np.asarray(df, dtype=np.float64) / 2.0, q / 2.0)
    out = _chi2_logsf(q, np.asarray(df, dtype=np.float64))
    tail = ~np.isfinite(out) & np.isfinite(x) & (x >= a + 1.0)
    if tail.any():
        out[tail] = _log_gamma_cf_tail(a[tail], x[tail])
    return out


def _chi2_logsf(q, df) -> np.ndarray:
    """``scipy.stats.chi2.logsf(q, df)``, the same bits, for q >= 0 and df > 0.

    SciPy's generic ``_logsf`` takes log(sf) above the median and log1p(-cdf) below it,
    the median being ``2 gammaincinv(df/2, 0.5)`` computed per element (an inverse
    incomplete gamma: most of the cost). Here it is computed once per distinct df (one
    df per missing-data pattern in practice); other values go through SciPy itself.
    """
    q, df = np.broadcast_arrays(np.asarray(q, dtype=np.float64), df)
    distinct = np.unique(df)
    if distinct.size > 64 or not (np.all(q >= 0) and np.all(distinct > 0)):
        with np.errstate(divide="ignore"):
            return np.asarray(stats.chi2.logsf(q, df), dtype=np.float64).copy()
    median = np.empty(q.shape)
    for value in distinct:
        median[df == value] = 2 * special.gammaincinv(value / 2, 0.5)
    out = np.empty(q.shape)
    above = q > median
    with np.errstate(divide="ignore"):
        out[above] = np.log(special.chdtrc(df[above], q[above]))
        out[~above] = np.log1p(-special.chdtr(df[~above], q[~above]))
    out[np.isinf(q)] = -np.inf
    return out


def _log_gamma_cf_tail(a, x):
    """log Q(a, x) by the modified-Lentz continued fraction (PyMARE's underflow branch)."""
    b = x + 1.0 - a
    c = np.full(b.shape, 1.0 / _TINY)
    d = 1.0 / b
    h = d.copy()
    active = np.ones(b.shape, dtype=bool)
    for i in range(1, 301):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < _TINY, _TINY, d)
        c = b + an / c
        c = np.where(np.abs(c) < _TINY, _TINY, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(active, h * delta, h)
        active &= np.abs(delta - 1.0) > _EPS
        if not active.any():
            break
    return -x + a * np.log(x) - special.gammaln(a) + np.log(h)


# --------------------------------------------------------------------------- input checks


def _block(name, values, n_studies=None) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.float64)  # C order: see _ksum
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise InputError(f"{name} must be a (n_studies >= 2, n_voxels) array; received shape "
                         f"{np.shape(values)}. Stack one masked map per study as a row.")
    if n_studies is not None and arr.shape[0] != n_studies:
        raise InputError(f"{name} has {arr.shape[0]} rows but the first input has {n_studies}; "
                         "give one row per study in every input.")
    return arr


def _same_shape(first, second, names):
    if first.shape != second.shape:
        raise InputError(f"{names[0]} and {names[1]} must have the same shape; received "
                         f"{first.shape} and {second.shape}.")


def _sample_sizes(sample_sizes, shape) -> np.ndarray:
    """Sample sizes as a (K, 1) column or a (K, V) block."""
    if sample_sizes is None:
        raise InputError("sample_sizes is required here; give one sample size per study.")
    n = np.asarray(sample_sizes, dtype=np.float64)
    if n.ndim == 1 and n.shape[0] == shape[0]:
        n = n[:, None]
    if n.ndim != 2 or n.shape[0] != shape[0] or n.shape[1] not in (1, shape[1]):
        raise InputError(f"sample_sizes must have shape ({shape[0]},) or {shape}; received "
                         f"{np.shape(sample_sizes)}.")
    if not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise InputError("sample_sizes must be finite and positive; received "
                         f"min {np.nanmin(n)!r}.")
    return n


def _check_correction(small_sample_correction):
    if small_sample_correction not in SMALL_SAMPLE_CORRECTIONS:
        raise InputError(f"small_sample_correction must be one of {SMALL_SAMPLE_CORRECTIONS}; "
                         f"received {small_sample_correction!r}.")


def _dof_map(n_studies, n_voxels) -> np.ndarray:
    """NiMARE's ``_dof_map`` without dependence groups: K - 1 at every voxel."""
    return np.full(n_voxels, float(n_studies - 1))


def _ksum(values) -> np.ndarray:
    """Sum over studies (axis 0) in study order at every voxel, whatever the block layout.

    numpy sums along a contiguous axis pairwise but across rows of a C-ordered
    block one row at a time, so a one-voxel or Fortran-ordered block would round
    differently from the same voxel inside a wide C-ordered block. C order, and
    two copies of a lone column, keep the row-by-row order everywhere.
    """
    values = np.ascontiguousarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        return np.add.reduce(np.repeat(values, 2, axis=1), axis=0)[:1]
    return values.sum(0)


#: Studies multiplied together before one log in :func:`_log_ksum`.
_LOG_GROUP = 8
#: Partial products outside [1/_SAFE_PRODUCT, _SAFE_PRODUCT] send their voxel to the plain sum of logs.
_SAFE_PRODUCT = 1e300


def _log_ksum(values) -> np.ndarray:
    """``sum_k log(values[k])`` over studies for positive values, with 8x fewer logs.

    The log is most of the likelihood solver's time: studies ``k, k + n, k +
    2n, ...`` (n = ceil(K / 8)) are multiplied first, then the n partial
    products are logged and summed in study order. A voxel whose partial
    products leave [1e-300, 1e300] (values beyond about 1e±37) takes the
    plain sum of logs instead; the choice is per voxel, so results do not
    depend on the block layout. Differs from the plain sum by a few ulps.
    """
    values = np.ascontiguousarray(values)
    n_studies = values.shape[0]
    n_rows = -(-n_studies // _LOG_GROUP)
    if n_rows == n_studies:
        return _ksum(np.log(values))
    products = values[:n_rows].copy()
    for start in range(n_rows, n_studies, n_rows):
        rows = values[start:start + n_rows]
        products[:len(rows)] *= rows
    safe = (products.min(axis=0) >= 1.0 / _SAFE_PRODUCT) & (products.max(axis=0) <= _SAFE_PRODUCT)
    out = _ksum(np.log(products, out=products))
    if not safe.all():
        unsafe = np.flatnonzero(~safe)
        out[unsafe] = _ksum(np.log(values[:, unsafe]))
    return out


# --------------------------------------------------------------------------- combination tests


def _concordant(log_p_directed, z):
    """PyMARE's two-sided ("concordant") combination from a directed log-p function."""
    log_p1, log_p2 = log_p_directed(z), log_p_directed(-z)
    log_p = np.minimum(0.0, _LOG2 + np.minimum(log_p1, log_p2))
    z_calc = -special.ndtri_exp(log_p - _LOG2)
    return np.where(log_p2 < log_p1, -z_calc, z_calc), log_p


def _combination_maps(log_p_directed, z, two_sided):
    if two_sided:
        z_map, log_p = _concordant(log_p_directed, z)
    else:
        log_p = log_p_directed(z)
        z_map = -special.ndtri_exp(log_p)
    return {"z": z_map, "p": np.exp(log_p), "logp": nimare_logp(log_p),
            "dof": _dof_map(z.shape[0], z.shape[1])}


def fishers(z, use_sample_size=False, sample_sizes=None, two_sided=True) -> dict:
    """NiMARE 0.22 ``Fishers``: PyMARE's FisherCombinationTest without groups.

    Parameters
    ----------
    z : ndarray of shape (K, V)
        z-statistic maps.
    use_sample_size : bool
        Weighted Fisher with weights = sample sizes (Brown's scaled chi^2).
    sample_sizes : ndarray of shape (K,) or (K, V), optional
        Required with ``use_sample_size``.
    two_sided : bool
        "concordant" mode when True, "directed" otherwise.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``dof`` (each (V,)).

    Notes
    -----
    X = -2 sum_i w_i log Phi(-z_i); with weights, X / s ~ chi2(nu) with
    s = sum w^2 / sum w and nu = 2 (sum w)^2 / sum w^2 (w = 1: chi2(2K)).
    """
    z = _block("z", z)
    if use_sample_size:
        w = _sample_sizes(sample_sizes, z.shape)
        scale = _ksum(w * w) / _ksum(w)
        df = 2.0 * _ksum(w) ** 2 / _ksum(w * w)

        def log_p_directed(values):
            return log_chi2_sf(-2.0 * _ksum(w * special.log_ndtr(-values)) / scale, df)
    else:
        def log_p_directed(values):
            return log_chi2_sf(-2.0 * _ksum(special.log_ndtr(-values)), 2.0 * values.shape[0])
    return _combination_maps(log_p_directed, z, two_sided)


def stouffers(z, use_sample_size=False, sample_sizes=None, two_sided=True) -> dict:
    """NiMARE 0.22 ``Stouffers`` (and the old ``WeightedStouffers``) without groups.

    Parameters
    ----------
    z : ndarray of shape (K, V)
        z-statistic maps.
    use_sample_size : bool
        Weights sqrt(n) (Zaykin's weighted Stouffer) instead of 1.
    sample_sizes : ndarray of shape (K,) or (K, V), optional
        Required with ``use_sample_size``.
    two_sided : bool
        "concordant" mode when True, "directed" otherwise.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``dof``.

    Notes
    -----
    Z = sum w_i z_i / sqrt(sum w_i^2), p from the normal tail in log space.
    NiMARE 0.22 removed ``normalize_contrast_weights``; it is not accepted.
    """
    z = _block("z", z)
    w = np.sqrt(_sample_sizes(sample_sizes, z.shape)) if use_sample_size else np.ones((z.shape[0], 1))
    norm = np.sqrt(_ksum(w * w))

    def log_p_directed(values):
        return special.log_ndtr(-(_ksum(values * w) / norm))
    return _combination_maps(log_p_directed, z, two_sided)


# --------------------------------------------------------------------------- meta-regression core


def _wls(y, w):
    """Intercept-only WLS: estimate, sum of weights (1 / model variance), residuals."""
    w_sum = _ksum(w)
    est = _ksum(w * y) / w_sum
    return est, w_sum, y - est


def _fe_maps(y, w, small_sample_correction, extra=None) -> dict:
    """PyMARE's ``get_fe_stats`` after a WLS fit with weights ``w``, as NiMARE's maps."""
    _check_correction(small_sample_correction)
    n_studies, n_voxels = y.shape
    est, w_sum, resid = _wls(y, w)
    var = 1.0 / w_sum
    dof = None
    if small_sample_correction != "wald":
        dof = float(n_studies - 1)
        rss = _ksum(w * resid * resid)
        scale = np.where(rss <= _EPS, 0.0, rss / dof)
        if small_sample_correction == "knapp-hartung-conservative":
            scale = np.maximum(scale, 1.0)
        var = var * scale
    se = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = est / se
        if dof is None:
            log_tail = special.log_ndtr(-np.abs(stat))
            z = stat
        else:
            log_tail = stats.t.logsf(np.abs(stat), dof)
            z = -np.sign(stat) * special.ndtri_exp(log_tail)
        logp = np.minimum(log_tail + _LOG2, 0.0)
    undefined = ~np.isfinite(se) | (se <= 0)
    maps = {"z": np.where(undefined, np.nan, z), "p": np.where(undefined, np.nan, np.exp(logp)),
            "logp": np.where(undefined, np.nan, nimare_logp(logp)), "est": est, "se": se}
    maps.update(extra or {})
    maps["dof"] = _dof_map(n_studies, n_voxels)
    return maps


def _variances(beta, varcope):
    y = _block("beta", beta)
    v = _block("varcope", varcope, y.shape[0])
    _same_shape(y, v, ("beta", "varcope"))
    return y, v


def weighted_least_squares(beta, varcope, tau2=0.0, small_sample_correction="wald") -> dict:
    """NiMARE 0.22 ``WeightedLeastSquares``: PyMARE WLS at a given tau^2.

    Parameters
    ----------
    beta, varcope : ndarray of shape (K, V)
        Effect estimates and their sampling variances.
    tau2 : float or ndarray of shape (V,)
        Assumed between-study variance, >= 0.
    small_sample_correction : str
        PyMARE's default for this estimator is "wald" (tau^2 is not estimated).

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    tau2 = np.asarray(tau2, dtype=np.float64)
    if np.any(tau2 < 0) or tau2.shape not in ((), (y.shape[1],)):
        raise InputError(f"tau2 must be >= 0, a float or one value per voxel ({y.shape[1]},); "
                         f"received shape {tau2.shape}, min {tau2.min() if tau2.size else None}.")
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction)


def _dersimonian_laird_tau2(y, v):
    """PyMARE's method-of-moments tau^2 (intercept-only): max(0, (Q - (K-1)) / A)."""
    w = 1.0 / v
    _, w_sum, resid = _wls(y, w)
    q = _ksum(w * resid * resid)
    a = w_sum - _ksum(w * w) / w_sum
    return np.maximum(0.0, (q - (y.shape[0] - 1)) / a)


def dersimonian_laird(beta, varcope, small_sample_correction="knapp-hartung") -> dict:
    """NiMARE 0.22 ``DerSimonianLaird``: moment tau^2, then WLS with 1 / (v + tau^2).

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    tau2 = _dersimonian_laird_tau2(y, v)
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction, {"tau2": tau2})


def hedges(beta, varcope, small_sample_correction="knapp-hartung") -> dict:
    """NiMARE 0.22 ``Hedges``: tau^2 = max(0, (OLS RSS - (K-1)/K sum v) / (K-1)), then WLS.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    k = y.shape[0]
    resid = y - _ksum(y) / k
    expected = _ksum((1.0 - 1.0 / k) * v)
    tau2 = np.maximum(0.0, (_ksum(resid * resid) - expected) / (k - 1))
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction, {"tau2": tau2})


def fixed_effects_hedges(t, sample_sizes, tau2=0.0, small_sample_correction="wald") -> dict:
    """NiMARE 0.22 ``FixedEffectsHedges``: Hedges' g from t maps, then WLS at ``tau2``.

    Notes
    -----
    d = t / sqrt(n); h = 1 - 3 / (4 (n - 1) - 1); g = d h;
    var(g) = (n - 1)(1 + n d^2) h^2 / (n (n - 3)) - d^2 (NiMARE's ``d_to_g``).

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``dof``.
    """
    t = _block("t", t)
    n = _sample_sizes(sample_sizes, t.shape)
    d = t / np.sqrt(n)
    h = 1 - (3 / (4 * (n - 1) - 1))
    g = d * h
    var_g = ((n - 1) * (1 + n * d**2) * (h**2) / (n * (n - 3))) - d**2
    return weighted_least_squares(g, var_g, tau2=tau2, small_sample_correction=small_sample_correction)


# --------------------------------------------------------------------------- profile likelihoods


class _Profile:
    """Profiled (intercept-only) Gaussian likelihood terms at v_i = c_i + a_i * theta.

    Gives, per voxel, L = sum log v, S = min_b sum (y - b)^2 / v, G = log sum 1/v
    and their first two derivatives in theta (b profiled out: envelope theorem).
    """

    def __init__(self, y, c, a):
        self.y, self.c, self.a = y, c, a
        self.unit = a.shape[1] == 1 and bool(np.all(a == 1.0))  # v = c + theta (variance-based)
        # centred once: S = sum w yc^2 - (sum w yc)^2 / sum w for any centre, and the
        # plain mean keeps the cancellation small (the scans evaluate S dozens of times)
        self.yc = y - _ksum(y) / y.shape[0]

    def subset(self, idx):
        """The same terms restricted to voxels ``idx``."""
        pick = (lambda m: np.ascontiguousarray(m[:, idx]) if m.shape[1] > 1 else m)
        return _Profile(pick(self.y), pick(self.c), pick(self.a))

    def values(self, theta):
        """(L, S, G) at ``theta``: five passes over the block, two temporaries."""
        if self.unit:
            v = self.c + theta
        else:
            v = self.a * theta
            v += self.c
        log_sum = _log_ksum(v)
        w = np.reciprocal(v, out=v)
        w_sum = _ksum(w)
        wy = w * self.yc
        wy_sum = _ksum(wy)
        wy *= self.yc
        s = np.maximum(_ksum(wy) - wy_sum * wy_sum / w_sum, 0.0)
        return log_sum, s, np.log(w_sum)

    def derivatives(self, theta):
        v = self.c + self.a * theta
        w = 1.0 / v
        _, w_sum, r = _wls(self.y, w)
        aw, aw2 = self.a * w, self.a * w * w
        s = _ksum(w * r * r)
        s1 = -_ksum(aw2 * r * r)
        s2 = 2.0 * _ksum(aw2 * aw * r * r) - 2.0 * _ksum(aw2 * r) ** 2 / w_sum
        l1, l2 = _ksum(aw), -_ksum(aw * aw)
        g1 = -_ksum(aw2) / w_sum
        g2 = 2.0 * _ksum(aw2 * aw) / w_sum - g1 * g1
        return (s, s1, s2), (l1, l2), (g1, g2)


class _NegLogLik:
    """0.5 (L + S [+ G]) (variance-based) or 0.5 (L + m log(S / m) + m [+ G]) (sample-size-based).

    ``[+ G]`` is REML's restriction term; m = K - 1 for REML, K for ML.
    """

    def __init__(self, profile, reml, log_scale, n_studies):
        self.profile, self.reml, self.log_scale = profile, reml, log_scale
        self.n_studies = n_studies
        self.m = n_studies - (1 if reml else 0)

    def subset(self, idx):
        return _NegLogLik(self.profile.subset(idx), self.reml, self.log_scale, self.n_studies)

    def __call__(self, theta):
        lv, s, g = self.profile.values(theta)
        if self.log_scale:
            s = np.maximum(s, _TINY)
            out = lv + self.m * np.log(s / self.m) + self.m
        else:
            out = lv + s
        return 0.5 * (out + g) if self.reml else 0.5 * out

    def slope_curvature(self, theta):
        (s, s1, s2), (l1, l2), (g1, g2) = self.profile.derivatives(theta)
        if self.log_scale:
            with np.errstate(divide="ignore", invalid="ignore"):
                d1 = l1 + self.m * s1 / s
                d2 = l2 + self.m * (s2 / s - (s1 / s) ** 2)
        else:
            d1, d2 = l1 + s1, l2 + s2
        if self.reml:
            d1, d2 = d1 + g1, d2 + g2
        return 0.5 * d1, 0.5 * d2


def _minimise(nll, scan):
    """:func:`_minimise_tile` over cache-sized voxel tiles (the same bits: voxels are independent).

    Every objective evaluation is a handful of passes over a (K, V) block; on a tile of
    about :data:`_TILE_BYTES` per array they run from cache instead of memory (~2x faster).
    """
    n_voxels = scan.shape[1]
    tile = max(256, _TILE_BYTES // (8 * nll.n_studies))
    if n_voxels <= tile:
        return _minimise_tile(nll, scan)
    return np.concatenate([_minimise_tile(nll.subset(slice(a, a + tile)), scan[:, a:a + tile])
                           for a in range(0, n_voxels, tile)])


def _minimise_tile(nll, scan):
    """Per-voxel minimiser of ``nll`` over the scan's range: two scans, then safeguarded Newton.

    Parameters
    ----------
    nll : _NegLogLik
    scan : ndarray of shape (n_scan, V)
        Increasing candidate thetas per voxel (PyMARE's scan points).

    Returns
    -------
    ndarray of shape (V,)

    Notes
    -----
    A voxel whose coarse minimum is an end of the range, with the slope
    pointing outwards, is settled there (exactly 0 for tau^2, as PyMARE).
    Otherwise a finer scan of the coarse bracket (profile likelihoods can be
    bimodal when sampling variances span orders of magnitude) picks the
    bracket that Newton then refines; the best point seen is returned.
    """
    x, lo, hi, f_x = _scan_bracket(nll, scan)
    slope, _ = nll.slope_curvature(x)
    at_low_end = (x == scan[0]) & ~(slope < 0)
    at_high_end = (x == scan[-1]) & ~(slope > 0)
    active = np.flatnonzero(~(at_low_end | at_high_end))
    if active.size:
        sub = nll.subset(active)
        x_fine, lo_fine, hi_fine, f_fine = _scan_bracket(sub, _fine_grid(lo[active], hi[active]))
        refined = _newton_in_bracket(sub, x_fine, lo_fine, hi_fine)
        f_refined = sub(refined)
        better = f_refined <= f_fine
        x_fine, f_fine = np.where(better, refined, x_fine), np.where(better, f_refined, f_fine)
        better = f_fine <= f_x[active]
        x[active] = np.where(better, x_fine, x[active])
    return x


def _scan_bracket(nll, grid):
    """Best grid point per voxel, its neighbours either side, and its objective value."""
    values = np.stack([nll(theta) for theta in grid])
    values = np.where(np.isnan(values), np.inf, values)
    best = np.argmin(values, axis=0)
    cols = np.arange(grid.shape[1])
    lo = grid[np.maximum(best - 1, 0), cols]
    hi = grid[np.minimum(best + 1, grid.shape[0] - 1), cols]
    return grid[best, cols].copy(), lo, hi, values[best, cols]


def _fine_grid(lo, hi, n_points=_FINE_POINTS):
    """``lo``, ``hi`` and interior points spaced both linearly and geometrically, sorted."""
    steps = np.linspace(0.0, 1.0, n_points + 2)[1:-1, None]
    linear = lo + steps * (hi - lo)
    floor = np.maximum(lo, hi * 1e-6)
    geometric = floor * (hi / floor) ** steps
    return np.sort(np.concatenate([lo[None], linear, geometric, hi[None]]), axis=0)


def _newton_in_bracket(nll, x, lo, hi):
    """Newton on the slope, falling back to bisection outside [lo, hi] or at negative curvature.

    Voxels leave the iteration once the step is below ``_NEWTON_RTOL`` of the
    estimate (or the bracket is that narrow); the others go on, on their own
    columns only, so a voxel's arithmetic never depends on its neighbours.
    """
    x, lo, hi = x.copy(), lo.copy(), hi.copy()
    todo = np.arange(x.size)
    for _ in range(_NEWTON_MAX_ITER):
        if not todo.size:
            break
        sub = nll if todo.size == x.size else nll.subset(todo)
        xt = x[todo]
        slope, curve = sub.slope_curvature(xt)
        lt = np.where(slope < 0, xt, lo[todo])
        ht = np.where(slope > 0, xt, hi[todo])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            step = xt - slope / curve
        newton_ok = (curve > 0) & (step > lt) & (step < ht)
        new = np.where(slope == 0, xt, np.where(newton_ok, step, 0.5 * (lt + ht)))
        tol = _NEWTON_RTOL * np.maximum(np.abs(new), _TINY)
        done = (np.abs(new - xt) <= tol) | (ht - lt <= tol)
        x[todo], lo[todo], hi[todo] = new, lt, ht
        todo = todo[~done]
    return x


def _scan_points(lower, upper):
    """PyMARE's scan grid: lower + fractions * (upper - lower), shape (n_scan, V)."""
    return lower + np.multiply.outer(_SCAN_FRACTIONS, upper - lower)


def _vbl_tau2(y, v, method):
    """Variance-based ML/REML tau^2, all voxels at once."""
    scale = _dersimonian_laird_tau2(y, v) + _ksum(v) / v.shape[0]
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    u = _scan_points(np.zeros(y.shape[1]), np.full(y.shape[1], _SEARCH_MAX))
    scan = scale * u / (1.0 - u)
    nll = _NegLogLik(_Profile(y, v, np.ones((y.shape[0], 1))), _reml(method), False, y.shape[0])
    return _minimise(nll, scan)


def _reml(method):
    method = str(method).lower()
    if method not in ("ml", "reml"):
        raise InputError(f"method must be 'ml' or 'reml'; received {method!r}.")
    return method == "reml"


def variance_based_likelihood(beta, varcope, method="ml",
                              small_sample_correction="knapp-hartung") -> dict:
    """NiMARE 0.22 ``VarianceBasedLikelihood``: ML/REML tau^2, then WLS with 1 / (v + tau^2).

    Notes
    -----
    Minimises PyMARE's profiled negative log-likelihood
    0.5 (sum log(v + tau^2) + sum w (y - b)^2 [+ log sum w]) (REML adds the
    bracket) over tau^2 >= 0 (see module notes for the solver).

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``dof``.
    """
    y, v = _variances(beta, varcope)
    tau2 = _vbl_tau2(y, v, method)
    return _fe_maps(y, 1.0 / (v + tau2), small_sample_correction, {"tau2": tau2})


def variance_based_nll(beta, varcope, tau2, method="ml") -> np.ndarray:
    """PyMARE's profiled ML/REML negative log-likelihood at ``tau2`` (V,), for checks."""
    y, v = _variances(beta, varcope)
    nll = _NegLogLik(_Profile(y, v, np.ones((y.shape[0], 1))), _reml(method), False, y.shape[0])
    return nll(np.asarray(tau2, dtype=np.float64))


def _ssbl_problem(y, n, method):
    inv_n = np.ascontiguousarray(np.broadcast_to(1.0 / n, y.shape))
    return _NegLogLik(_Profile(y, inv_n, 1.0 - inv_n), _reml(method), True, y.shape[0])


def sample_size_based_likelihood(beta, sample_sizes, method="ml",
                                 small_sample_correction="knapp-hartung") -> dict:
    """NiMARE 0.22 ``SampleSizeBasedLikelihood``: tau^2 and a common sigma^2 from sample sizes.

    Notes
    -----
    PyMARE's parameterisation: ratio r = tau^2 / (tau^2 + sigma^2) in [0, 1],
    unit variances r + (1 - r) / n, scale = sum (y - b)^2 / v_unit / (K - ddof)
    (ddof = 1 for REML), sigma^2 = scale (1 - r), tau^2 = scale r; the
    coefficient is then the WLS fit with v = sigma^2 / n and tau^2.

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``sigma2``, ``dof``.

    Raises
    ------
    InputError
        Where every study has the same sample size (sigma^2 and tau^2 are then
        not separately identified; PyMARE raises too).
    """
    y = _block("beta", beta)
    n = np.broadcast_to(_sample_sizes(sample_sizes, y.shape), y.shape)
    spread = n.std(axis=0)
    if np.any(spread < np.sqrt(_EPS)):
        raise InputError("SampleSizeBasedLikelihood cannot separate tau^2 from sigma^2 when every "
                         "study has the same sample size; received constant sample sizes "
                         f"({n[0, 0]:g}). Use VarianceBasedLikelihood with variance maps instead.")
    if np.any(spread < n.mean(axis=0) / 10):
        warnings.warn("Sample sizes are too close in some voxels; the sample size-based likelihood "
                      "estimator may fail (PyMARE's warning).", UserWarning, stacklevel=2)
    nll = _ssbl_problem(y, n, method)
    v_dim = y.shape[1]
    ratio = _minimise(nll, _scan_points(np.zeros(v_dim), np.ones(v_dim)))
    v_unit = ratio + (1.0 - ratio) / n
    _, _, resid = _wls(y, 1.0 / v_unit)
    ddof = 1 if _reml(method) else 0
    scale = np.maximum(_ksum(resid * resid / v_unit), _TINY) / (y.shape[0] - ddof)
    sigma2, tau2 = scale * (1.0 - ratio), scale * ratio
    maps = _fe_maps(y, 1.0 / (sigma2 / n + tau2), small_sample_correction,
                    {"tau2": tau2, "sigma2": sigma2})
    return maps


def sample_size_based_nll(beta, sample_sizes, ratio, method="ml") -> np.ndarray:
    """PyMARE's profiled negative log-likelihood at ratio = tau^2 / (tau^2 + sigma^2), for checks."""
    y = _block("beta", beta)
    nll = _ssbl_problem(y, _sample_sizes(sample_sizes, y.shape), method)
    return nll(np.asarray(ratio, dtype=np.float64))


# --------------------------------------------------------------------------- one-sample t


def one_sample_t(sums, sum_squares, n_studies) -> np.ndarray:
    """PyMARE's ``one_sample_t_from_sufficient_statistics``: t = S sqrt(K-1) / sqrt(K SS - S^2).

    NaN where the values are constant over studies (zero spread), as PyMARE.
    """
    spread = np.maximum(n_studies * np.asarray(sum_squares, dtype=np.float64) - np.square(sums), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(spread)
        t = sums / root * np.sqrt(n_studies - 1)
    return np.where(root == 0, np.nan, t)


def _weighted_cr2_t(values, weights):
    """PyMARE's ``weighted_intercept_cr2`` (all signs +1): CR2 t of the weighted mean."""
    total = weights.sum()
    adjusted = np.square(weights) / (1.0 - weights / total)
    weighted_sums = _ksum(weights[:, None] * values)
    mean = weighted_sums / total
    adjusted = adjusted[:, None]
    meat = (_ksum(adjusted * np.square(values)) - 2.0 * mean * _ksum(adjusted * values)
            + mean**2 * adjusted.sum())
    meat = np.maximum(meat, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = weighted_sums / np.sqrt(meat)
    return np.where(meat == 0, np.nan, t)


def weighted_mean_satterthwaite_dof(weights) -> float:
    """PyMARE's ``satterthwaite_dof`` for an intercept, one cluster per study, weights ``w``.

    With W = sum w, h_i = w_i / W: b_i^2 = w_i / (W^2 (1 - h_i)), d_i = w_i^2 / (W^3 (1 - h_i)),
    dof = (sum b^2 - sum d)^2 / ((sum d)^2 - 2 sum b^2 d + sum b^4), floored at 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    complement = np.maximum(1.0 - w / total, 1e-10)
    nb = w / (total**2 * complement)
    diag = w**2 / (total**3 * complement)
    trace = nb.sum() - diag.sum()
    trace_sq = diag.sum() ** 2 - 2.0 * (nb * diag).sum() + (nb**2).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = trace**2 / trace_sq
    return float(max(dof, 1.0)) if np.isfinite(dof) else 1.0


def permuted_ols_parametric(beta, two_sided=True, use_sample_size=False, sample_sizes=None) -> dict:
    """NiMARE 0.22 ``PermutedOLS`` maps (no groups): intercept-only OLS t, its z and p.

    Parameters
    ----------
    beta : ndarray of shape (K, V)
    two_sided : bool
    use_sample_size : bool
        Weight each study by its sample size: CR2 t of the weighted mean with
        Satterthwaite dof (NiMARE 0.22); otherwise the ordinary one-sample t, dof K - 1.
    sample_sizes : ndarray of shape (K,), optional

    Returns
    -------
    dict
        ``t``, ``z``, ``p``, ``logp``, ``dof``. The max-T FWE maps are not here
        (sign-flip null over all bags).
    """
    y = _block("beta", beta)
    k = y.shape[0]
    if use_sample_size:
        w = _sample_sizes(sample_sizes, y.shape)
        if w.shape[1] != 1:
            raise InputError("PermutedOLS takes one sample size per study, shape (K,); received "
                             f"{np.shape(sample_sizes)}.")
        t = _weighted_cr2_t(y, w[:, 0])
        dof = weighted_mean_satterthwaite_dof(w[:, 0])
    else:
        t = one_sample_t(_ksum(y), _ksum(y * y), k)
        dof = float(k - 1)
    nlogp = t_to_nlogp(t, dof, two_sided)
    return {"t": t, "z": t_to_z(t, dof), "p": np.exp(nlogp), "logp": nimare_logp(nlogp),
            "dof": np.full(y.shape[1], dof)}


# --------------------------------------------------------------------------- old API (closed forms)


def _t_maps(est, se, dof, two_sided, extra=None) -> dict:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = est / se
    dof_map = np.broadcast_to(np.asarray(dof, dtype=np.float64), t.shape).copy()
    nlogp = t_to_nlogp(t, dof_map, two_sided)
    maps = {"z": t_to_z(t, dof_map), "p": np.exp(nlogp), "logp": nimare_logp(nlogp),
            "est": est, "se": se}
    maps.update(extra or {})
    maps.update({"t": t, "dof": dof_map})
    return maps


def _con_se(con, se):
    y = _block("con", con)
    s = _block("se", se, y.shape[0])
    _same_shape(y, s, ("con", "se"))
    return y, s * s


def ffx_glm(con, se, sample_sizes=None, two_sided=True) -> dict:
    """Old NiMARE ``FFX_GLM`` (FSL ``flameo --runmode=fe``) in closed form, without FSL.

    Parameters
    ----------
    con, se : ndarray of shape (K, V)
        Contrast estimates and their standard errors (old NiMARE squared the
        ``se`` maps into flameo's varcope).
    sample_sizes : ndarray of shape (K,), optional
        Old NiMARE passed ``n_i - 1`` to flameo as the varcope dof; fixed
        effects then add them to the model's K - 1.
    two_sided : bool

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``t``, ``dof``.

    Notes
    -----
    Inverse-variance weighted mean: est = sum(c / s^2) / sum(1 / s^2),
    var = 1 / sum(1 / s^2), t = est / sqrt(var), referred to t with
    dof = K - 1 (+ sum(n_i - 1) with sample sizes); z matched on the tail.
    """
    y, v = _con_se(con, se)
    est, w_sum, _ = _wls(y, 1.0 / v)
    dof = float(y.shape[0] - 1)
    if sample_sizes is not None:
        dof += float((_sample_sizes(sample_sizes, y.shape)[:, 0] - 1).sum())
    return _t_maps(est, np.sqrt(1.0 / w_sum), dof, two_sided)


def mfx_glm(con, se, sample_sizes=None, two_sided=True) -> dict:
    """Old NiMARE ``MFX_GLM`` (FSL FLAME1) in closed form: REML tau^2, weights 1 / (s^2 + tau^2).

    Parameters
    ----------
    con, se : ndarray of shape (K, V)
    sample_sizes : ndarray of shape (K,), optional
        Checked for shape only: FLAME1's mixed-effects dof is K - 1 whatever
        the lower-level dof.
    two_sided : bool

    Returns
    -------
    dict
        ``z``, ``p``, ``logp``, ``est``, ``se``, ``tau2``, ``t``, ``dof``.

    Notes
    -----
    tau^2 >= 0 maximises the REML likelihood of the intercept model
    (vectorised scan + safeguarded Newton, see module notes); est and
    var = 1 / sum w with w = 1 / (s^2 + tau^2); t = est / sqrt(var) with K - 1 dof.
    """
    y, v = _con_se(con, se)
    if sample_sizes is not None:
        _sample_sizes(sample_sizes, y.shape)
    tau2 = _vbl_tau2(y, v, "reml")
    est, w_sum, _ = _wls(y, 1.0 / (v + tau2))
    return _t_maps(est, np.sqrt(1.0 / w_sum), float(y.shape[0] - 1), two_sided, {"tau2": tau2})


def rfx_glm(con, two_sided=True, sign_flips=None) -> dict:
    """Old NiMARE ``RFX_GLM`` / ``Stouffers(inference='rfx')``: one-sample t over studies.

    Parameters
    ----------
    con : ndarray of shape (K, V)
        Contrast maps (z maps for old ``Stouffers`` rfx). Old NiMARE first
        divided each map by its standard deviation over *all* voxels, a global
        step the caller must do.
    two_sided : bool
    sign_flips : ndarray of shape (n_iters, K), optional
        With flips, p is the old empirical sign-flip p (:func:`empirical_p`,
        always two-tailed as old NiMARE) and z = two-tailed z of p, sign of t.

    Returns
    -------
    dict
        ``t``, ``z``, ``p``, ``logp``, ``dof``. Constant voxels have t = 0, p = 1.
    """
    y = _block("con", con)
    k = y.shape[0]
    t = np.nan_to_num(one_sample_t(_ksum(y), _ksum(y * y), k), nan=0.0)
    dof = float(k - 1)
    if sign_flips is None:
        nlogp = t_to_nlogp(t, dof, two_sided)
        z = t_to_z(t, dof)
    else:
        below, equal = sign_flip_counts(y, sign_flips, t)
        nlogp = np.log(empirical_p(below, equal, np.shape(sign_flips)[0]))
        z = _z_from_nlogp(nlogp, t, two_sided=True)
    return {"t": t, "z": z, "p": np.exp(nlogp), "logp": nimare_logp(nlogp),
            "dof": np.full(y.shape[1], dof)}


# --------------------------------------------------------------------------- sign-flip nulls


def _check_flips(flips, n_studies) -> np.ndarray:
    flips = np.asarray(flips, dtype=np.float64)
    if flips.ndim != 2 or flips.shape[1] != n_studies or not np.all(np.abs(flips) == 1):
        raise InputError(f"sign flips must be an (n_iters, n_studies={n_studies}) array of +1/-1; "
                         f"received shape {flips.shape}.")
    return flips


def sign_flip_t(values, flips, constant_as_zero=True) -> np.ndarray:
    """One-sample t of every sign-flipped copy of the block: one matrix product.

    Parameters
    ----------
    values : ndarray of shape (K, V)
    flips : ndarray of shape (n_iters, K)
        +1/-1 per study and iteration (the same flips at every voxel).
    constant_as_zero : bool
        Constant voxels give t = 0 (old NiMARE's NaN -> 0) instead of NaN.

    Returns
    -------
    ndarray of shape (n_iters, V)
    """
    y = _block("values", values)
    flips = _check_flips(flips, y.shape[0])
    t = one_sample_t(flips @ y, _ksum(y * y)[None, :], y.shape[0])
    return np.nan_to_num(t, nan=0.0) if constant_as_zero else t


def _flip_batches(n_iters, n_voxels):
    size = max(1, min(n_iters, (8 * 2**20) // (8 * max(n_voxels, 1))))
    return range(0, n_iters, size), size


def sign_flip_counts(values, flips, observed_t) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, how many sign-flip t values fall below / equal the observed t.

    Batches of flips are summable, so a large null can be split across tasks.
    Values within ``sqrt(eps)`` (relative) of the observed t count as equal:
    old NiMARE computed both with ``ttest_1samp``, so the identity flip tied
    exactly; here the null comes from a matrix product, the observed t from a
    sum, which may differ in the last bits.

    Returns
    -------
    below, equal : ndarray of shape (V,), int64
    """
    y = _block("values", values)
    flips = _check_flips(flips, y.shape[0])
    observed = np.asarray(observed_t, dtype=np.float64)
    below = np.zeros(y.shape[1], dtype=np.int64)
    equal = np.zeros(y.shape[1], dtype=np.int64)
    starts, size = _flip_batches(flips.shape[0], y.shape[1])
    for start in starts:
        null = sign_flip_t(y, flips[start:start + size])
        tie = np.abs(null - observed) <= _TIE_RTOL * np.abs(observed)
        below += ((null < observed) & ~tie).sum(0)
        equal += tie.sum(0)
    return below, equal


def empirical_p(below, equal, n_iters, tail="two") -> np.ndarray:
    """Old NiMARE ``null_to_p`` (``scipy.stats.percentileofscore``, kind="rank"), clipped.

    pct = (2 below + equal + [equal > 0]) * 50 / n_iters; two: (50 - |pct - 50|) * 2 / 100,
    upper: 1 - pct / 100, lower: pct / 100; then clipped to [1e-16, 1 - 1e-16].
    """
    below = np.asarray(below, dtype=np.float64)
    equal = np.asarray(equal, dtype=np.float64)
    pct = (2.0 * below + equal + (equal > 0)) * (50.0 / n_iters)
    if tail == "two":
        p = (50.0 - np.abs(pct - 50.0)) * 2.0 / 100.0
    elif tail == "upper":
        p = 1.0 - pct / 100.0
    elif tail == "lower":
        p = pct / 100.0
    else:
        raise InputError(f"tail must be 'two', 'upper' or 'lower'; received {tail!r}.")
    return np.clip(p, 1e-16, 1.0 - 1e-16)


def sign_flip_max_null(values, flips, two_sided=True) -> np.ndarray:
    """Max over this block's voxels of each sign-flipped t (|t| when two-sided).

    NiMARE 0.22 ``PermutedOLS``'s null (``_permutation_maxima``): flipped sums
    by one matrix product, constant voxels (NaN t) ignored as by ``nanmax``.

    Returns
    -------
    ndarray of shape (n_iters,)
        Combine blocks with ``np.fmax``; -inf for an empty block, NaN where
        every voxel is constant.
    """
    y = _block("values", values)
    flips = _check_flips(flips, y.shape[0])
    out = np.full(flips.shape[0], -np.inf)
    if not y.shape[1]:
        return out
    starts, size = _flip_batches(flips.shape[0], y.shape[1])
    for start in starts:
        null = sign_flip_t(y, flips[start:start + size], constant_as_zero=False)
        out[start:start + size] = np.fmax.reduce(np.abs(null) if two_sided else null, axis=1)
    return out


# --------------------------------------------------------------------------- registry


def _weighted_stouffers(z, sample_sizes, two_sided=True) -> dict:
    return stouffers(z, use_sample_size=True, sample_sizes=sample_sizes, two_sided=two_sided)


#: NiMARE class name -> kernel.
KERNELS = {
    "Fishers": fishers,
    "Stouffers": stouffers,
    "WeightedStouffers": _weighted_stouffers,
    "WeightedLeastSquares": weighted_least_squares,
    "DerSimonianLaird": dersimonian_laird,
    "Hedges": hedges,
    "VarianceBasedLikelihood": variance_based_likelihood,
    "SampleSizeBasedLikelihood": sample_size_based_likelihood,
    "FixedEffectsHedges": fixed_effects_hedges,
    "PermutedOLS": permuted_ols_parametric,
    "FFX_GLM": ffx_glm,
    "MFX_GLM": mfx_glm,
    "RFX_GLM": rfx_glm,
}

#: Positional array inputs of each kernel, in order ("sample_sizes" is per study).
INPUTS = {
    "Fishers": ("z",),
    "Stouffers": ("z",),
    "WeightedStouffers": ("z", "sample_sizes"),
    "WeightedLeastSquares": ("beta", "varcope"),
    "DerSimonianLaird": ("beta", "varcope"),
    "Hedges": ("beta", "varcope"),
    "VarianceBasedLikelihood": ("beta", "varcope"),
    "SampleSizeBasedLikelihood": ("beta", "sample_sizes"),
    "FixedEffectsHedges": ("t", "sample_sizes"),
    "PermutedOLS": ("beta",),
    "FFX_GLM": ("con", "se"),
    "MFX_GLM": ("con", "se"),
    "RFX_GLM": ("con",),
}

_FE = ("z", "p", "logp", "est", "se")
#: Output map names of each kernel, in NiMARE's order.
OUTPUTS = {
    "Fishers": ("z", "p", "logp", "dof"),
    "Stouffers": ("z", "p", "logp", "dof"),
    "WeightedStouffers": ("z", "p", "logp", "dof"),
    "WeightedLeastSquares": _FE + ("dof",),
    "DerSimonianLaird": _FE + ("tau2", "dof"),
    "Hedges": _FE + ("tau2", "dof"),
    "VarianceBasedLikelihood": _FE + ("tau2", "dof"),
    "SampleSizeBasedLikelihood": _FE + ("tau2", "sigma2", "dof"),
    "FixedEffectsHedges": _FE + ("dof",),
    "PermutedOLS": ("t", "z", "p", "logp", "dof"),
    "FFX_GLM": _FE + ("t", "dof"),
    "MFX_GLM": _FE + ("tau2", "t", "dof"),
    "RFX_GLM": ("t", "z", "p", "logp", "dof"),
}
