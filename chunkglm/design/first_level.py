"""First-level design matrices: nilearn's conventions, nilearn's function.

HRFs, drifts and FIR are never re-derived here: this module only decides the
frame times and validates inputs, then calls
:func:`nilearn.glm.first_level.make_first_level_design_matrix`.
"""

from __future__ import annotations

import warnings

import os

import numpy as np
import pandas as pd
from nilearn.glm.first_level import make_first_level_design_matrix

from chunkglm.errors import ChunkglmError, InputError, InputTypeError

__all__ = ["make_first_level_design_matrix", "frame_times", "run_design", "check_events", "read_table"]


def read_table(table, name: str):
    """A DataFrame or array as given; a TSV/CSV path (str or os.PathLike) read, as nilearn reads them.

    Raises
    ------
    TypeError
        Neither a table, an array nor a path (nilearn's class and wording).
    ValueError
        A path whose suffix is neither .tsv nor .csv.
    InputError
        A file that is empty or not a table (a ValueError too).
    """
    if isinstance(table, os.PathLike):
        table = os.fspath(table)
    if isinstance(table, pd.DataFrame | np.ndarray):
        return table
    if not isinstance(table, str):
        raise TypeError(f"{name} can only be a pandas DataFrame, a Path object or a string, or a numpy "
                        f"array. A {type(table)} was provided.")
    suffix = os.path.splitext(table)[1]
    if suffix not in (".tsv", ".csv"):
        raise ValueError(f"Tables to load can only be TSV or CSV.\nGot {table}: give {name} as a "
                         ".tsv (tab-separated) or .csv file, or as a DataFrame.")
    try:
        return pd.read_csv(table, sep="\t" if suffix == ".tsv" else ",")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{name} file {table} cannot be read as a {suffix[1:].upper()} table "
                         f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}): "
                         "give a header row and one row per entry, tab-separated for .tsv.") from err


def frame_times(n_scans: int, t_r: float, slice_time_ref: float = 0.0) -> np.ndarray:
    """Acquisition times (s) of the reference slice, as nilearn's FirstLevelModel."""
    start = slice_time_ref * t_r
    return np.linspace(start, (n_scans - 1 + slice_time_ref) * t_r, n_scans)


def check_events(events, where: str) -> pd.DataFrame:
    """Events need onset and duration; durations are not negative."""
    events = read_table(events, "events")
    if not isinstance(events, pd.DataFrame):
        events = pd.DataFrame(events)
    missing = [c for c in ("onset", "duration") if c not in events]
    if missing:
        raise InputError(f"The provided events data has no {missing[0]} column: events of {where} lack "
                         f"column(s) {missing}; found {list(events.columns)}.")
    for column in ("onset", "duration"):
        values = pd.to_numeric(events[column], errors="coerce")
        text = values.isna() & events[column].notna()
        if text.any():
            raise InputError(f"Could not cast {column} to float in events data: the {column} column of the "
                             f"events of {where} holds {events[column][text].iloc[0]!r} (row "
                             f"{int(np.flatnonzero(text)[0])}); give numbers of seconds.")
    duration = pd.to_numeric(events["duration"])
    if (duration < 0).any():
        bad = events.loc[duration < 0].head(3)
        raise InputError(f"events of {where} have negative durations, e.g.\n{bad}")
    return events


def check_confounds(confounds, n_scans: int, where: str, index: int = 0) -> pd.DataFrame | None:
    """Confounds: one row per scan, no NaN (fill fMRIPrep's first-row n/a first)."""
    if confounds is None:
        return None
    confounds = read_table(confounds, "confounds")
    if isinstance(confounds, pd.DataFrame):
        frame = confounds
    else:  # nilearn's names for the columns of an array
        values = np.asarray(confounds)
        values = values[:, None] if values.ndim == 1 else values
        frame = pd.DataFrame(values, columns=[f"confound_{i}" for i in range(values.shape[1])])
    if len(frame) != n_scans:
        raise InputError(f"Rows in confounds does not match n_scans in run_img at index {index}. "
                         f"Confounds of {where} have {len(frame)} rows but the run has {n_scans} scans.")
    nan_cols = [str(c) for c in frame.columns if frame[c].isna().any()]
    if nan_cols:
        raise InputError(
            f"Extra regressors contain NaN values: confounds of {where} contain NaN in "
            f"{nan_cols[:5]} (fMRIPrep leaves the first row of derivative columns empty). Fill them "
            "(e.g. confounds.fillna(0)) or drop those columns."
        )
    return frame


def run_design(n_scans, t_r, slice_time_ref, events, confounds, *, hrf_model, drift_model,
               high_pass, drift_order, fir_delays, min_onset, where="run", index=0) -> pd.DataFrame:
    """The design matrix of one run (run ``index`` of the model), exactly as nilearn's
    FirstLevelModel builds it; confounds are checked first, as nilearn does."""
    confounds = check_confounds(confounds, n_scans, where, index)
    events = check_events(events, where) if events is not None else None
    names = None if confounds is None else [str(c) for c in confounds.columns]
    try:
        return make_first_level_design_matrix(
            frame_times(n_scans, t_r, slice_time_ref), events, hrf_model, drift_model, high_pass,
            drift_order, list(fir_delays), None if confounds is None else confounds.to_numpy(),
            names, min_onset)
    except ChunkglmError:
        raise
    except TypeError as err:  # nilearn's refusals of what the user gave, with nilearn's words kept
        raise InputTypeError(f"{err} (the design of {where})") from err
    except ValueError as err:
        raise InputError(f"{err} (the design of {where})") from err


def check_rank(design: pd.DataFrame, where: str) -> None:
    """Warn about a rank-deficient design, which is fitted as nilearn fits it (pseudo-inverse)."""
    X = design.to_numpy(dtype=np.float64)
    rank = np.linalg.matrix_rank(X, np.abs(X).sum() * np.finfo(np.float64).eps)  # nilearn's df rank
    if rank < X.shape[1]:
        warnings.warn(
            f"the design matrix of {where} is rank deficient (rank {rank} for {X.shape[1]} "
            f"columns {list(design.columns)}): it is fitted as nilearn fits it (pseudo-inverse: "
            "minimum-norm betas, residual df n_scans - rank), and contrasts of regressors that are "
            "linear combinations of others are not estimable. Remove duplicated or constant "
            "confounds, or events that never occur.", UserWarning, stacklevel=3)
