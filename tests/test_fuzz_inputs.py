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


# -- NIfTI headers and sidecars, through the conversion -----------------------------------------
HEADER_FIELDS = {
    "dim": st.lists(st.integers(-3, 70000), min_size=8, max_size=8),
    "pixdim": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=8, max_size=8),
    "datatype": st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 2048, 7, 3000]),
    "bitpix": st.integers(-8, 300),
    "vox_offset": st.sampled_from([0.0, 1.0, 352.0, 351.0, 1e9, -4.0, float("nan")]),
    "scl_slope": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "scl_inter": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "qform_code": st.integers(-2, 5),
    "sform_code": st.integers(-2, 5),
    "srow_x": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4),
    "xyzt_units": st.integers(0, 255),
    "sizeof_hdr": st.sampled_from([348, 540, 0, 1]),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"xyz"]),
}


def _bids_with(tmp, bold_bytes: bytes, sidecar: dict, gz: bool) -> None:
    import json

    func = tmp / "sub-01" / "func"
    func.mkdir(parents=True)
    (tmp / "dataset_description.json").write_text(json.dumps({"Name": "fuzz", "BIDSVersion": "1.9.0"}))
    (func / f"sub-01_task-main_desc-preproc_bold.nii{'.gz' if gz else ''}").write_bytes(bold_bytes)
    (func / "sub-01_task-main_desc-preproc_bold.json").write_text(json.dumps(sidecar))
    (func / "sub-01_task-main_events.tsv").write_text("onset\tduration\ttrial_type\n0\t1\ta\n10\t1\tb\n")


def _nifti_bytes(fields: dict, truncate: int | None, gz: bool) -> bytes:
    import gzip
    import io

    import nibabel as nib

    data = np.random.default_rng(0).normal(100, 5, size=(4, 5, 3, 12)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    raw = io.BytesIO()
    nib.Nifti1Image(img.dataobj, img.affine, img.header).to_file_map({"image": nib.FileHolder(fileobj=raw)})
    blob = bytearray(raw.getvalue())
    header = np.frombuffer(blob[:348], dtype=nib.Nifti1Header().structarr.dtype).copy()
    for name, value in fields.items():
        try:
            header[name] = value
        except (ValueError, OverflowError, TypeError):
            continue  # a value the field cannot hold at all: not a header anyone can write
    blob[:348] = header.tobytes()
    if truncate is not None:
        blob = blob[:truncate % (len(blob) + 1)]
    return gzip.compress(bytes(blob), mtime=0) if gz else bytes(blob)


def _converted_cleanly_or_refused(tmp, store) -> None:
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.convert import convert

    try:
        convert(str(tmp), str(store), task="main")
    except ChunkglmError:
        pass
    else:
        runs = open_cohort(str(store)).runs
        assert len(runs) == 1
        run = next(iter(runs.values()))
        assert np.isfinite(run.attrs["RepetitionTime"]) and run.attrs["RepetitionTime"] > 0
        return
    if store.exists():  # nothing half-written is counted as complete
        from chunkglm.io import layout as st

        root = st.open_root(str(store))
        assert not [k for k, done in st.node_status(root, "runs").items() if done], "a failed run counted complete"


NIFTI_FUZZ = settings(FUZZ, max_examples=40)


def test_the_unmutated_run_converts(tmp_path):
    """The fuzzed cases below start from this run: it must convert, or they test nothing."""
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.convert import convert

    _bids_with(tmp_path / "bids", _nifti_bytes({}, None, True), {"RepetitionTime": 2.0, "StartTime": 0.5}, True)
    convert(str(tmp_path / "bids"), str(tmp_path / "s.zarr"), task="main")
    (run,) = open_cohort(str(tmp_path / "s.zarr")).runs.values()
    assert run.attrs["RepetitionTime"] == 2.0 and run.attrs["slice_time_ref"] == 0.25


@NIFTI_FUZZ
@given(fields=st.dictionaries(st.sampled_from(sorted(HEADER_FIELDS)), st.none(), max_size=3).flatmap(
           lambda chosen: st.fixed_dictionaries({k: HEADER_FIELDS[k] for k in chosen})),
       truncate=st.one_of(st.none(), st.integers(0, 4000)), gz=st.booleans())
def test_any_nifti_header_converts_cleanly_or_is_refused(fields, truncate, gz, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bids")
    _bids_with(tmp, _nifti_bytes(fields, truncate, gz), {"RepetitionTime": 2.0}, gz)
    _converted_cleanly_or_refused(tmp, tmp_path_factory.mktemp("store") / "s.zarr")


sidecar_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), cells,
                           st.lists(st.floats(allow_nan=True), max_size=3),
                           st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@NIFTI_FUZZ
@given(t_r=sidecar_values, start=sidecar_values, slice_timing=sidecar_values)
def test_any_sidecar_timing_converts_cleanly_or_is_refused(t_r, start, slice_timing, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bids")
    sidecar = {k: v for k, v in (("RepetitionTime", t_r), ("StartTime", start), ("SliceTiming", slice_timing))
               if v is not None}
    _bids_with(tmp, _nifti_bytes({}, None, True), sidecar, True)
    store = tmp_path_factory.mktemp("store") / "s.zarr"
    _converted_cleanly_or_refused(tmp, store)
    if store.exists():
        from chunkglm.glm.first_level import first_level_from_bids
        from chunkglm.io.cohort import open_cohort

        if not open_cohort(str(store)).runs:
            return
        try:
            models, *_ = first_level_from_bids(str(store), "main")
        except ChunkglmError:
            return
        ref = models[0].slice_time_ref
        assert ref is None or (np.isfinite(ref) and 0 <= ref <= 1), ref


# -- BIDS Stats Model JSON -----------------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False, width=32),
              st.text(alphabet=string.printable, max_size=8),
              st.sampled_from(["Run", "Session", "Subject", "Dataset", "glm", "meta", "t", "F", "run", "subject",
                               "trial_type.a", "Factor", "Convolve", "Threshold", "Replace", "Scale", "pass"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _mutated(model, path, action, value):
    import copy

    model = copy.deepcopy(model)
    if not path:
        return value if action == "set" else model
    parent = model
    for part in path[:-1]:
        parent = parent[part]
    if action == "delete":
        del parent[path[-1]]
    elif action == "set":
        parent[path[-1]] = value
    return model


@pytest.fixture(scope="module")
def example_models():
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "models"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


@FUZZ
@given(data=st.data())
def test_any_model_json_is_valid_or_refused_with_the_fields_path(data, example_models):
    from chunkglm.glm.stats_models.spec import validate_model

    model = data.draw(st.sampled_from(example_models))
    edits = data.draw(st.integers(1, 3))
    for _ in range(edits):
        path = data.draw(st.sampled_from(list(_paths(model))))
        model = _mutated(model, path, data.draw(st.sampled_from(["set", "delete"])), data.draw(json_values))
    try:
        validate_model(model, "model.json")
    except ChunkglmError as err:
        text = str(err)
        assert "\n" not in text and text.startswith("model.json"), text
