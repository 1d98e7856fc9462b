"""Log-space tails of the normal, t and chi^2 distributions, as NiMARE / PyMARE compute them.

``p`` is ``exp(nlogp)``, ``nlogp`` the natural log of the p-value computed in log
space (no underflow); ``logp`` is NiMARE's ``-nlogp / ln 10`` rounded to float32
(:func:`nimare_logp`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

_LOG2 = math.log(2.0)
_LN10 = math.log(10.0)
_EPS = np.finfo(np.float64).eps
_TINY = np.finfo(np.float64).tiny


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


def fe_stat_maps(est, se, dof=None, extra=None) -> dict:
    """PyMARE's ``get_fe_stats`` maps from an estimate and its standard error, as NiMARE's:
    z, p, logp (two-sided), est and se, plus ``extra``; the normal reference when ``dof`` is
    None, else Student's t with ``dof`` (a number or one per voxel). NaN where se is not
    positive and finite. The caller adds its ``dof`` map."""
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
    return maps
