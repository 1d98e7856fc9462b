"""Second-level design matrices: nilearn's function, our checks.

The matrix itself comes from
:func:`nilearn.glm.first_level.make_second_level_design_matrix` (an
``intercept`` column plus one column per confound, one row per subject in
the order given). This module only validates inputs first, so that bad
tables fail with an :class:`~chunkglm.errors.InputError` saying what was
received, and checks designs given by users against the maps they model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from chunkglm.errors import InputError, InputTypeError

__all__ = ["make_second_level_design_matrix", "check_design"]


def make_second_level_design_matrix(subjects_label, confounds=None) -> pd.DataFrame:
    """Design matrix of a second-level model, exactly as nilearn's.

    Parameters
    ----------
    subjects_label : list of str
        One label per map, in the order of the maps (the design's rows).
    confounds : pandas.DataFrame, optional
        A ``subject_label`` column and one column per covariate, exactly one
        row per subject of ``subjects_label``; no NaN.

    Returns
    -------
    pandas.DataFrame of shape (n_subjects, 1 + n_confounds)
        ``intercept`` then the confound columns, float64.
    """
    from nilearn.glm.first_level.design_matrix import make_second_level_design_matrix as nilearn_design

    labels = _check_labels(subjects_label, confounds is not None)
    if confounds is not None:
        _check_confounds(confounds, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singularity is refused by check_design instead
        return nilearn_design(labels, confounds)


def _check_labels(subjects_label, matched: bool) -> list:
    """One label per map; strings when they are matched to confounds rows (else unused)."""
    if isinstance(subjects_label, str) or not hasattr(subjects_label, "__iter__"):
        raise InputError(f"subjects_label must be a list of strings; received {type(subjects_label).__name__}.")
    labels = list(subjects_label)
    if not labels:
        raise InputError("subjects_label is empty: give one label per map.")
    bad = [label for label in labels if not isinstance(label, str)]
    if bad and matched:
        raise InputError(f"subjects_label must hold strings; received e.g. {bad[:3]!r}. "
                         "Convert them (e.g. [f'{s:02d}' for s in subjects]).")
    return labels


def check_confounds_table(confounds) -> None:
    """nilearn's rules for a second-level confounds table, as InputErrors."""
    if not isinstance(confounds, pd.DataFrame):
        raise InputTypeError(f"confounds must be a pandas DataFrame; received {type(confounds).__name__}.")
    if "subject_label" not in confounds.columns:
        raise InputError(f"confounds DataFrame must contain column 'subject_label'; received columns "
                         f"{list(confounds.columns)}.")
    if len(confounds.columns) < 2:
        raise InputError('confounds should contain at least 2 columns one called "subject_label" and '
                         f"the other with a given confound; received columns {list(confounds.columns)}.")
    if not all(isinstance(s, str) for s in confounds["subject_label"]):
        raise InputError("subject_label column must contain only strings (e.g. '01', not 1).")


def _check_confounds(confounds, labels) -> None:
    check_confounds_table(confounds)
    counts = confounds["subject_label"].value_counts()
    twice = sorted(counts.index[counts > 1])
    if twice:
        raise InputError(f"confounds have more than one row for subject(s) {twice[:5]}.")
    missing = sorted(set(labels) - set(confounds["subject_label"]))
    if missing:
        raise InputError(f"confounds have no row for subject(s) {missing[:5]}; "
                         f"they have {sorted(confounds['subject_label'])[:5]}...")
    values = confounds.drop(columns="subject_label")
    nan_cols = [str(c) for c in values.columns if pd.to_numeric(values[c], errors="coerce").isna().any()]
    if nan_cols:
        raise InputError(f"confounds column(s) {nan_cols[:5]} hold NaN or non-numbers; fill or drop them.")


def check_design(design, n_maps: int, full_rank: bool = False) -> pd.DataFrame:
    """A usable second-level design: a numeric table, one row per map.

    Parameters
    ----------
    design : pandas.DataFrame, str or Path
        A table, or a .csv / .tsv file of one (as nilearn's).
    n_maps : int or None
        Maps modelled; None when not known yet (checked again later).
    full_rank : bool
        Refuse a rank-deficient design (permutation inference: nilearn's
        permuted_ols returns all-zero maps for one). Otherwise it is fitted
        as nilearn fits it (pseudo-inverse), with a warning.

    Returns
    -------
    pandas.DataFrame
    """
    design = _load_design(design)
    if n_maps is not None and len(design) != n_maps:
        raise InputError(
            f"'design_matrix' does not match the number of maps considered. {len(design)} rows in "
            f"design matrix do not match with {n_maps} maps: give one row per map, in the maps' order.")
    try:
        X = design.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"the design matrix must be numeric; columns {list(design.columns)}: {err}") from None
    if not np.isfinite(X).all():
        raise InputError("the design matrix holds NaN or infinite values; fill or drop those rows/columns.")
    # column names may repeat (nilearn accepts it: its estimator checks fit ["", "", ""]); a contrast
    # formula over repeated names is refused by parse_contrast
    _check_rank(design, X, full_rank)
    return design


def _load_design(design) -> pd.DataFrame:
    from pathlib import Path

    if isinstance(design, pd.DataFrame):
        return design
    if isinstance(design, str | Path):
        path = Path(design)
        if path.suffix not in (".tsv", ".csv"):
            raise InputError(f"Tables to load can only be TSV or CSV.\nGot {path}: give the design "
                             "matrix as a .tsv/.csv file or a pandas DataFrame.")
        if not path.is_file():
            raise InputError(f"design_matrix file not found: {path}")
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    raise InputTypeError(f"'design_matrix' must be a str, pathlib.Path or a pandas.DataFrame.\n"
                         f"Got {type(design).__name__}: give one row per map, in the maps' order.")


def _check_rank(design, X, full_rank) -> None:
    rank = np.linalg.matrix_rank(X, np.abs(X).sum() * np.finfo(np.float64).eps)  # nilearn's df rank
    if rank == X.shape[1]:
        return
    constant = [str(c) for c, col in zip(design.columns, X.T) if np.ptp(col) == 0]
    hint = (f" Constant columns: {constant} (keep one intercept: another constant column "
            "carries no information)." if len(constant) > 1 or not X.any(axis=0).all() else "")
    if full_rank:
        raise InputError(
            f"the second-level design is rank deficient (rank {rank} for {X.shape[1]} columns "
            f"{list(design.columns)}): some columns are combinations of others, so permutation "
            f"inference cannot separate their effects (nilearn's returns all-zero maps).{hint} "
            "Remove or merge those columns.")
    warnings.warn(
        f"the second-level design is rank deficient (rank {rank} for {X.shape[1]} columns "
        f"{list(design.columns)}): it is fitted as nilearn fits it (pseudo-inverse: minimum-norm "
        f"betas, residual df n_maps - rank), and contrasts of columns that are combinations of "
        f"others are not estimable.{hint} Remove or merge those columns.", UserWarning, stacklevel=4)
