"""Run-level design matrices: pybids' dense design, finished as fitlins finishes it.

pybids (``BIDSStatsModelsNodeOutput.data``) gives the model's ``X`` sampled at
the repetition time, after the node's transformations (Factor, Convolve,
Scale, Replace, Threshold, ...): HRF convolution and confounds are pybids'.
fitlins 0.11 then, and so chunkglm here:

- imputes the one missing value fMRIPrep leaves in the first volume of
  ``framewise_displacement``, ``std_dvars`` and ``dvars`` (the mean of the
  column's non-zero values) and of ``*derivative1*`` columns (0); any other
  missing value is an error (the model should say how to fill it, with a
  Replace transformation);
- drops the extra last row pybids gives when TR x volumes rounds up;
- adds nilearn's cosine drift regressors when the model's
  ``Options.HighPassFilterCutoffHz`` is set (fitlins 0.11 reads no Options:
  its ``--drift-model cosine`` is nilearn's default 0.01 Hz cut-off);
- ends with one ``intercept`` column of ones, pybids' and nilearn's
  intercepts merged (nilearn's design builder always adds one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from nilearn.glm.first_level import make_first_level_design_matrix

from chunkglm.errors import InputError

__all__ = ["run_design"]

#: fMRIPrep confounds defined from a volume and its predecessor: no value at the first volume.
_FIRST_VOLUME_MEAN = ("framewise_displacement", "std_dvars", "dvars")


def run_design(dense: pd.DataFrame, n_volumes: int, repetition_time: float, high_pass=None,
               where="the run") -> pd.DataFrame:
    """The design matrix a run is fitted with.

    Parameters
    ----------
    dense : pandas.DataFrame of shape (n_volumes, n_regressors)
        pybids' dense design (``BIDSStatsModelsNodeOutput.data``, missing values kept).
    n_volumes : int
        Volumes of the run.
    repetition_time : float
        Seconds between volumes.
    high_pass : float or None
        ``Options.HighPassFilterCutoffHz``: cosine drift regressors below this
        frequency (Hz); None: no drift regressors.
    where : str
        The run, for messages.

    Returns
    -------
    pandas.DataFrame of shape (n_volumes, n_columns)
        The regressors of ``dense``, the drift regressors, then ``intercept``.
    """
    dense = dense.astype(float).copy()
    if len(dense) == n_volumes + 1 and dense.iloc[-1].isna().all():
        dense = dense.iloc[:-1]
    if len(dense) != n_volumes:
        raise InputError(f"{where}: pybids built {len(dense)} design rows for {n_volumes} volumes; check "
                         "the run's RepetitionTime and its events' onsets.")
    dense = _impute_first_volume(dense, where)
    columns = [c for c in dense.columns if c not in ("intercept", "constant")]
    frame_times = np.arange(n_volumes) * float(repetition_time)
    design = make_first_level_design_matrix(
        frame_times, hrf_model=None, add_regs=dense[columns].to_numpy() if columns else None,
        add_reg_names=columns or None, drift_model=None if high_pass is None else "cosine",
        high_pass=0.01 if high_pass is None else float(high_pass))
    design = design.drop(columns=["constant", "intercept"], errors="ignore")
    design["intercept"] = 1.0
    design.index = pd.RangeIndex(n_volumes)
    return design


def _impute_first_volume(dense: pd.DataFrame, where) -> pd.DataFrame:
    """fitlins' rule for the missing first value of fMRIPrep's derivative-type confounds."""
    missing = dense.columns[dense.isna().any()]
    for column in missing:
        values = dense[column].to_numpy()
        first_only = np.isnan(values[0]) and not np.isnan(values[1:]).any()
        if first_only and column in _FIRST_VOLUME_MEAN:
            rest = values[1:]
            dense.iloc[0, dense.columns.get_loc(column)] = rest[rest != 0].mean()
        elif first_only and "derivative1" in column:
            dense.iloc[0, dense.columns.get_loc(column)] = 0.0
        else:
            raise InputError(
                f"{where}: the design column {column!r} has {int(np.isnan(values).sum())} missing value(s) "
                "(n/a); fill them in the model, e.g. a Replace transformation, or leave the column out of X.")
    return dense
