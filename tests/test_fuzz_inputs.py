"""Hostile inputs, generated (issue 18 item 13): never a traceback, always chunkglm's error.

The command line turns chunkglm's errors (``ChunkglmError``) and the environment's
(``OSError``) into one line and exit code 2; anything else is reported as a chunkglm
defect. So every function that reads what a user wrote (events and confounds TSVs,
contrast strings) either accepts the input and gives finite results, or
raises ``ChunkglmError``. Hypothesis generates the inputs; its database is off so that
every run draws afresh from the same strategies (derandomised: a failure reproduces).
"""

from __future__ import annotations

import string

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkglm.cli.first_level import model_contrasts, parse_contrasts
from chunkglm.design.first_level import run_design
from chunkglm.errors import ChunkglmError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
N_SCANS, T_R = 30, 2.0

cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-5, max_value=80),
    st.integers(min_value=-10**12, max_value=10**12),
    st.text(alphabet=string.printable, max_size=6),
    st.sampled_from(["n/a", "", "NaN", "inf", "-1", "1e400", "0x10", "  3 ", "a\tb"]),
)
column_names = st.sampled_from(["onset", "duration", "trial_type", "modulation", "Onset", "", "extra", "onset "])


def _frame(draw_columns, n_rows):
    return st.lists(column_names, min_size=0, max_size=5, unique=True).flatmap(
        lambda names: st.tuples(st.just(names), st.lists(st.lists(cells, min_size=len(names),
                                                                   max_size=len(names)),
                                                          min_size=0, max_size=n_rows)))


def _write_tsv(path, names, rows) -> None:
    def text(value):
        return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")
    lines = ["\t".join(names)] + ["\t".join(text(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _design(events=None, confounds=None):
    return run_design(N_SCANS, T_R, 0.0, events, confounds, hrf_model="glover", drift_model="cosine",
                      high_pass=0.01, drift_order=1, fir_delays=[0], min_onset=-24, where="sub-01 run 1")


def _finite(design: pd.DataFrame) -> None:
    assert design.shape[0] == N_SCANS
    assert np.isfinite(design.to_numpy(dtype=float)).all(), design


@FUZZ
@given(table=_frame(column_names, 8))
def test_any_events_tsv_gives_a_design_or_chunkglms_error(table, tmp_path_factory):
    names, rows = table
    path = tmp_path_factory.mktemp("events") / "sub-01_task-main_events.tsv"
    _write_tsv(path, names, rows)
    try:
        design = _design(events=path)
    except ChunkglmError as err:
        assert "\n" not in str(err).strip() or "e.g." in str(err), str(err)
        return
    _finite(design)


@FUZZ
@given(table=_frame(column_names, N_SCANS + 2))
def test_any_confounds_tsv_gives_a_design_or_chunkglms_error(table, tmp_path_factory):
    names, rows = table
    path = tmp_path_factory.mktemp("confounds") / "sub-01_task-main_desc-confounds_timeseries.tsv"
    _write_tsv(path, names, rows)
    try:
        design = _design(confounds=path)
    except ChunkglmError:
        return
    _finite(design)


class _Model:
    """What model_contrasts reads of a fitted FirstLevelModel: its designs and the check."""

    def __init__(self, design):
        from chunkglm.glm.first_level.model import FirstLevelModel

        self.design_matrices_ = [design]
        self._runs = [None]
        self._contrast_vectors = FirstLevelModel._contrast_vectors.__get__(self)


@pytest.fixture(scope="module")
def design():
    events = pd.DataFrame({"onset": [0, 10, 20, 30], "duration": [1, 1, 1, 1], "trial_type": ["a", "b", "a", "b"]})
    return _design(events=events)


contrast_text = st.one_of(
    st.text(alphabet=string.printable, max_size=30),
    st.lists(st.sampled_from(["a", "b", "-", "+", "*", "2", "0.5", "(", ")", ";", "=", " ", "drift_1",
                              "constant", "a-b", "__import__", "[", "]", "/", "0", "1e309", "**"]),
             max_size=12).map("".join),
)


@FUZZ
@given(text=contrast_text, name=st.text(alphabet=string.printable, max_size=8))
def test_any_contrast_string_gives_weights_or_chunkglms_error(text, name, design):
    try:
        contrasts = parse_contrasts([f"{name}={text}"])
        weights, types = model_contrasts(_Model(design), contrasts)
    except ChunkglmError:
        return
    for key, value in weights.items():
        vector = _Model(design)._contrast_vectors(value)[0]
        assert np.isfinite(vector).all(), (key, vector)
        assert types[key] in ("t", "F")
