"""Group-level covariates from a participants table (BIDS ``participants.tsv``).

:func:`encode_covariates` turns the chosen columns of a table with one row per
subject into numeric design columns:

- numeric columns are kept (mean-centred over the modelled subjects when asked);
- categorical columns (text or booleans) are dummy coded: one 0/1 column
  ``<column>_<level>`` per level but the reference level (the first level in
  sorted order, unless one is given), which the intercept absorbs.

Only the chosen columns are checked, and each unusable one is refused with the
reason: a value missing (``n/a``) for a modelled subject, a single value for
every modelled subject (it would equal the intercept), a level whose column
name would clash. The returned description states, per covariate, its type, its
levels and reference level, or the mean that was removed: it goes into the
output's JSON.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from chunkglm.errors import InputError

#: Values read as missing in a participants table (BIDS writes ``n/a``).
MISSING = ("n/a", "N/A", "NA", "")


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _level_name(column: str, level) -> str:
    """``sex`` + ``"non-binary"`` -> ``sex_non_binary`` (a name contrast formulas can use)."""
    text = re.sub(r"[^0-9A-Za-z]+", "_", str(level)).strip("_") or "level"
    return f"{column}_{text}"


def encode_covariates(table: pd.DataFrame, subjects, columns=None, *, center: bool = False,
                      reference: dict | None = None, source: str = "the table"):
    """Design columns of the covariates ``columns`` for ``subjects``, in their order.

    Parameters
    ----------
    table : pandas.DataFrame
        A ``subject_label`` column (labels without ``sub-``) and one column per
        candidate covariate, one row per subject.
    subjects : list of str
        The modelled subjects (one per map), the rows of the result.
    columns : list of str, optional
        The covariates; default every column but ``subject_label``.
    center : bool, default False
        Subtract each numeric covariate's mean over ``subjects``.
    reference : dict, optional
        Column -> the level absorbed by the intercept (default: the first level in
        sorted order).
    source : str
        How messages name the table (e.g. its path).

    Returns
    -------
    covariates : pandas.DataFrame
        ``subject_label`` then one float column per numeric covariate and per
        non-reference level, one row per subject of ``subjects``.
    description : dict
        Covariate -> ``{"Type": "numeric", "MeanCentered": bool, "Mean": float}``
        or ``{"Type": "categorical", "Levels": [...], "ReferenceLevel": level,
        "Columns": [...]}``.
    """
    subjects = [str(s) for s in subjects]
    available = [c for c in table.columns if c != "subject_label"]
    chosen = list(available if columns is None else columns)
    if not chosen:
        raise InputError(f"{source} has no covariate column (only {list(table.columns)}); give a table with "
                         "one column per covariate, or leave out --design for a one-sample test.")
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise InputError(f"covariate(s) {unknown} are not columns of {source}; its columns are {available}.")
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:
        raise InputError(f"covariate(s) {twice} chosen more than once; name each column once.")
    reference = dict(reference or {})
    stray = sorted(set(reference) - set(chosen))
    if stray:
        raise InputError(f"reference level(s) given for {stray}, which are not among the covariates {chosen}.")
    rows = table.set_index("subject_label").loc[subjects]
    encoded, description = {"subject_label": subjects}, {}
    for column in chosen:
        values = rows[column]
        missing = [s for s, v in zip(subjects, values) if pd.isna(v) or str(v).strip() in MISSING]
        if missing:
            raise InputError(f"covariate {column!r} of {source} has no value (n/a) for subject(s) {missing[:10]}; "
                             "fill them in, or leave the column out of --covariates.")
        if _is_numeric(values) and column not in reference:
            numbers = values.to_numpy(dtype=np.float64)
            if np.ptp(numbers) == 0:
                raise InputError(f"covariate {column!r} of {source} is {numbers[0]:g} for every modelled subject: "
                                 "it equals the intercept; leave it out of --covariates.")
            mean = float(numbers.mean())
            encoded[column] = numbers - mean if center else numbers
            description[column] = {"Type": "numeric", "MeanCentered": bool(center), "Mean": mean}
            continue
        encoded_columns, entry = _dummy_code(column, values, reference.get(column), source)
        encoded.update(encoded_columns)
        description[column] = entry
    names = [c for c in encoded if c != "subject_label"]
    clash = sorted({c for c in names if names.count(c) > 1} | ({"intercept"} & set(names)))
    if clash:
        raise InputError(f"the covariates of {source} give the design column name(s) {clash} twice (or the "
                         "intercept's); rename the column or its levels.")
    return pd.DataFrame(encoded), description


def _dummy_code(column, values, reference, source):
    """One 0/1 column per level but the reference."""
    text = values.astype(str).str.strip()
    levels = sorted(text.unique())
    if len(levels) < 2:
        raise InputError(f"covariate {column!r} of {source} is {levels[0]!r} for every modelled subject: it "
                         "equals the intercept; leave it out of --covariates.")
    if reference is None:
        reference = levels[0]
    elif str(reference) not in levels:
        raise InputError(f"reference level {reference!r} of covariate {column!r} is not one of its levels "
                         f"{levels}.")
    reference = str(reference)
    columns = {}
    for level in levels:
        if level != reference:
            columns[_level_name(column, level)] = (text == level).to_numpy(dtype=np.float64)
    if len(set(columns)) < len(levels) - 1:
        raise InputError(f"levels {levels} of covariate {column!r} of {source} give the same column name once "
                         "non-alphanumeric characters are replaced; rename them.")
    entry = {"Type": "categorical", "Levels": levels, "ReferenceLevel": reference, "Columns": list(columns)}
    return columns, entry


def parse_reference(items) -> dict:
    """``["sex=F", "site=A"]`` -> ``{"sex": "F", "site": "A"}``."""
    reference = {}
    for item in items or []:
        column, sep, level = str(item).partition("=")
        if not sep or not column.strip() or not level.strip():
            raise InputError(f"--reference takes COLUMN=LEVEL, e.g. sex=F; received {item!r}.")
        reference[column.strip()] = level.strip()
    return reference
