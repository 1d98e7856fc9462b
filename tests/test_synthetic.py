"""Tests for chunkglm.testing.synthetic (the synthetic BIDS generator)."""

from __future__ import annotations

import gzip
import json
import time
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm.testing import (
    SIZES,
    GroundTruth,
    SyntheticDataset,
    SyntheticRun,
    make_synthetic_bids,
)
from chunkglm.testing import synthetic as syn

SPACE = "MNI152NLin2009cAsym"
BLOBS = syn.BLOBS_PER_CONDITION


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Default tiny dataset: 2 subjects, 1 run, no sessions."""
    return make_synthetic_bids(tmp_path_factory.mktemp("tiny") / "bids")


@pytest.fixture(scope="module")
def with_sessions(tmp_path_factory):
    """2 subjects x 2 sessions x 2 runs."""
    root = tmp_path_factory.mktemp("ses") / "bids"
    return make_synthetic_bids(root, n_sessions=2, n_runs=2, seed=3)


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(path).get_fdata(dtype=np.float64))


def _all_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# layout and metadata
# --------------------------------------------------------------------------


def test_return_types_and_layout(tiny):
    assert isinstance(tiny, SyntheticDataset)
    assert isinstance(tiny.truth, GroundTruth)
    assert tiny.derivatives == tiny.root / "derivatives" / "fmriprep"
    assert tiny.space == SPACE and tiny.shape == SIZES["tiny"]["shape"]
    assert tiny.subjects == ("01", "02")
    assert [r.name for r in tiny.runs] == [
        "sub-01_task-main_run-1",
        "sub-02_task-main_run-1",
    ]
    for name in ("dataset_description.json", "participants.tsv"):
        assert (tiny.root / name).is_file()
    run = tiny.runs[0]
    assert isinstance(run, SyntheticRun)
    assert run.entities == {"sub": "01", "task": "main", "run": "1"}
    deriv_func = tiny.derivatives / "sub-01" / "func"
    prefix = "sub-01_task-main_run-1"
    assert run.bold_path == deriv_func / (
        f"{prefix}_space-{SPACE}_desc-preproc_bold.nii.gz"
    )
    assert run.mask_path == deriv_func / (
        f"{prefix}_space-{SPACE}_desc-brain_mask.nii.gz"
    )
    assert run.confounds_path == deriv_func / (
        f"{prefix}_desc-confounds_timeseries.tsv"
    )
    assert run.events_path == tiny.root / "sub-01" / "func" / (
        f"{prefix}_events.tsv"
    )
    for r in tiny.runs:
        for path in (r.bold_path, r.mask_path, r.confounds_path,
                     r.confounds_path.with_suffix(".json"), r.events_path,
                     r.sidecar_path, r.raw_sidecar_path):
            assert path.is_file(), path


def test_metadata_files(tiny):
    raw = json.loads((tiny.root / "dataset_description.json").read_text())
    assert raw["DatasetType"] == "raw" and raw["BIDSVersion"] == "1.8.0"
    der = json.loads((tiny.derivatives / "dataset_description.json")
                     .read_text())
    assert der["DatasetType"] == "derivative"
    assert der["GeneratedBy"][0]["Name"] == "fMRIPrep"
    part = pd.read_csv(tiny.root / "participants.tsv", sep="\t")
    assert part["participant_id"].tolist() == ["sub-01", "sub-02"]
    run = tiny.runs[0]
    side = json.loads(run.sidecar_path.read_text())
    assert side["RepetitionTime"] == tiny.tr
    assert side["StartTime"] == tiny.tr / 2 == tiny.truth.start_time
    assert side["SkullStripped"] is False and side["TaskName"] == "main"
    raw_side = json.loads(run.raw_sidecar_path.read_text())
    assert raw_side["RepetitionTime"] == tiny.tr
    assert len(raw_side["SliceTiming"]) == tiny.shape[2]
    assert max(raw_side["SliceTiming"]) < tiny.tr


def test_events(tiny):
    run_length = tiny.n_volumes * tiny.tr
    for run in tiny.runs:
        ev = pd.read_csv(run.events_path, sep="\t")
        assert list(ev.columns) == ["onset", "duration", "trial_type",
                                    "modulation"]
        pd.testing.assert_frame_equal(ev, tiny.truth.events[run.name],
                                      check_dtype=False)
        assert (ev["modulation"] == 1).all()
        assert ev["duration"].between(1, 3).all()
        counts = ev["trial_type"].value_counts()
        assert set(counts.index) == {"a", "b"} and counts.min() >= 3
        ends = ev["onset"] + ev["duration"]
        assert (ev["onset"].iloc[1:].to_numpy() > ends.iloc[:-1]).all()
        assert ev["onset"].min() >= 0 and ends.max() <= run_length
    first, second = (tiny.truth.events[r.name] for r in tiny.runs)
    assert not np.array_equal(first["onset"], second["onset"])


def test_sessions_layout(with_sessions):
    ds = with_sessions
    assert len(ds.runs) == 2 * 2 * 2
    run = ds.runs[-1]
    assert (run.subject, run.session, run.run) == ("02", "2", 2)
    assert run.name == "sub-02_ses-2_task-main_run-2"
    assert run.bold_path.parent == ds.derivatives / "sub-02" / "ses-2" / "func"
    assert run.events_path.parent == ds.root / "sub-02" / "ses-2" / "func"
    assert set(ds.truth.design) == {r.name for r in ds.runs}


# --------------------------------------------------------------------------
# NIfTI content
# --------------------------------------------------------------------------


def test_bold_header_and_geometry(tiny):
    run = tiny.runs[0]
    img = nib.load(run.bold_path)
    assert img.shape == (*tiny.shape, tiny.n_volumes)
    np.testing.assert_array_equal(img.affine, tiny.affine)
    assert img.header.get_zooms() == (4.0, 4.0, 4.0, tiny.tr)
    assert img.get_data_dtype() == np.float32
    with gzip.open(run.bold_path) as f:
        raw_hdr = nib.Nifti1Header.from_fileobj(f)
    assert raw_hdr["vox_offset"] == 352
    assert raw_hdr["sform_code"] == 4 and raw_hdr["qform_code"] == 4
    assert raw_hdr.get_xyzt_units() == ("mm", "sec")
    with open(run.bold_path, "rb") as f:
        gz_header = f.read(10)
    assert gz_header[4:8] == b"\x00\x00\x00\x00"  # mtime 0
    assert not gz_header[3] & 0x08  # no FNAME field


def test_masks(tiny):
    truth = tiny.truth
    assert truth.mask.dtype == bool and truth.mask.shape == tiny.shape
    for run in tiny.runs:
        img = nib.load(run.mask_path)
        assert img.get_data_dtype() == np.uint8 and img.shape == tiny.shape
        np.testing.assert_array_equal(img.affine, tiny.affine)
        mask = np.asarray(img.dataobj).astype(bool)
        np.testing.assert_array_equal(mask, truth.subject_masks[run.subject])
        assert not (mask & ~truth.mask).any()  # subset of the truth mask
        assert mask.sum() > 0.7 * truth.mask.sum()
    sub1, sub2 = truth.subject_masks.values()
    assert not np.array_equal(sub1, sub2)


def test_values_inside_and_outside_mask(tiny):
    data = _load(tiny.runs[0].bold_path)
    inside = data[tiny.truth.mask]
    outside = data[~tiny.truth.mask]
    assert 800 < inside.mean() < 1200
    assert outside.min() > 0 and outside.max() < 100
    assert 20 <= outside.mean() <= 50
    # temporal mean tracks the baseline (noise sd 10, drift sd 10, 40 vols)
    err = inside.mean(axis=1) - tiny.truth.baseline[tiny.truth.mask]
    assert np.abs(err).max() < 60


def test_truth_maps(tiny):
    truth = tiny.truth
    base = truth.baseline[truth.mask]
    assert base.min() > 850 and base.max() < 1150
    assert (truth.baseline[~truth.mask] == 0).all()
    for beta in truth.betas.values():
        assert beta.dtype == np.float32
        assert (beta[~truth.mask] == 0).all()
        peak = np.unravel_index(np.argmax(beta), beta.shape)
        assert 0.018 < beta[peak] / truth.baseline[peak] < 0.032
        assert 0 < (beta != 0).sum() < truth.mask.sum() / 2
    peak_a, peak_b = (np.argmax(b) for b in truth.betas.values())
    assert peak_a != peak_b


# --------------------------------------------------------------------------
# determinism and int16
# --------------------------------------------------------------------------


def test_deterministic_byte_identical(tmp_path):
    a = make_synthetic_bids(tmp_path / "a", seed=7, n_runs=2)
    b = make_synthetic_bids(tmp_path / "b", seed=7, n_runs=2)
    files = _all_files(a.root)
    assert files == _all_files(b.root) and len(files) > 10
    for rel in files:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    c = make_synthetic_bids(tmp_path / "c", seed=8, n_runs=2)
    for run_a, run_c in zip(a.runs, c.runs):
        assert run_a.bold_path.read_bytes() != run_c.bold_path.read_bytes()
    # subjects and runs get different noise
    d1, d2, d3 = (_load(r.bold_path) for r in a.runs[:3])
    assert not np.allclose(d1, d2) and not np.allclose(d1, d3)


def test_runs_independent_of_dataset_size(tmp_path):
    one = make_synthetic_bids(tmp_path / "one", n_subjects=1, seed=5)
    two = make_synthetic_bids(tmp_path / "two", n_subjects=2, seed=5)
    assert one.runs[0].bold_path.read_bytes() == (
        two.runs[0].bold_path.read_bytes()
    )


def test_int16_scaled_matches_float(tmp_path):
    f32 = make_synthetic_bids(tmp_path / "f", n_subjects=1, seed=2)
    i16 = make_synthetic_bids(tmp_path / "i", n_subjects=1, seed=2,
                              dtype="int16")
    assert i16.dtype == "int16"
    img = nib.load(i16.runs[0].bold_path)
    assert img.get_data_dtype() == np.int16
    slope, inter = img.dataobj.slope, img.dataobj.inter
    assert slope != 1.0 and inter != 0.0
    with gzip.open(i16.runs[0].bold_path) as f:
        raw_hdr = nib.Nifti1Header.from_fileobj(f)
    assert raw_hdr["scl_slope"] == np.float32(slope)
    diff = np.abs(_load(i16.runs[0].bold_path) - _load(f32.runs[0].bold_path))
    # rounding to the int16 grid: at most half a step (+ float32 slack)
    assert diff.max() <= 0.5 * slope + 1e-3


def test_uncompressed_and_maps(tmp_path):
    shape = SIZES["tiny"]["shape"]
    rho = np.full(shape, 0.2, np.float32)
    ds = make_synthetic_bids(tmp_path / "u", n_subjects=1, compress=False,
                             ar1_rho=rho, noise_sd=5.0, n_volumes=30)
    assert ds.runs[0].bold_path.suffix == ".nii"
    assert nib.load(ds.runs[0].bold_path).shape == (*shape, 30)
    assert isinstance(ds.truth.ar1_rho, np.ndarray)
    assert ds.truth.noise_sd == 5.0


def test_shape_override(tmp_path):
    ds = make_synthetic_bids(tmp_path / "s", n_subjects=1, shape=(8, 9, 11),
                             n_volumes=25, tr=1.5)
    img = nib.load(ds.runs[0].bold_path)
    assert img.shape == (8, 9, 11, 25)
    assert img.header.get_zooms()[3] == 1.5
    assert ds.truth.mask.shape == (8, 9, 11) and ds.truth.mask.any()


@pytest.mark.parametrize(
    "kwargs",
    [{"size": "huge"}, {"dtype": "float64"}, {"n_subjects": 0},
     {"conditions": ("a", "a")}, {"n_volumes": 5},
     {"ar1_rho": np.zeros((2, 2, 2))}, {"ar1_rho": 1.0}],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_bids(tmp_path / "x", **kwargs)


def test_realistic_preset_geometry():
    """Check the realistic grid/mask without generating any data."""
    shape, n_vol, affine, radii = syn._resolve_size("realistic", None, None)
    assert shape == (97, 115, 97) and n_vol == 300
    np.testing.assert_array_equal(
        affine, [[2, 0, 0, -96], [0, 2, 0, -132], [0, 0, 2, -78], [0, 0, 0, 1]]
    )
    n_mask = syn._make_geometry(shape, affine, radii).mask.sum()
    assert 225_000 < n_mask < 245_000
    assert SIZES["small"]["shape"] == (40, 48, 40)


def test_tiny_is_fast(tmp_path):
    make_synthetic_bids(tmp_path / "warm", n_subjects=1)  # imports
    start = time.perf_counter()
    make_synthetic_bids(tmp_path / "timed")
    # target is < 0.5 s; the bound is loose to stay robust on slow CI
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------
# confounds
# --------------------------------------------------------------------------

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
TISSUE = ["csf", "white_matter", "global_signal"]


def test_confounds_columns_and_nans(tiny):
    conf = pd.read_csv(tiny.runs[0].confounds_path, sep="\t",
                       na_values="n/a")
    assert len(conf) == tiny.n_volumes
    expected = {"framewise_displacement", "dvars", "std_dvars"}
    for name in MOTION:
        expected |= {name, f"{name}_derivative1", f"{name}_power2",
                     f"{name}_derivative1_power2"}
    for name in TISSUE:
        expected |= {name, f"{name}_derivative1"}
    assert expected <= set(conf.columns)
    first_nan = {c for c in conf.columns if "derivative1" in c} | {
        "framewise_displacement", "dvars", "std_dvars"}
    for col in conf.columns:
        assert not conf[col].iloc[1:].isna().any(), col
        assert conf[col].iloc[:1].isna().all() == (col in first_nan), col
    text = tiny.runs[0].confounds_path.read_text().splitlines()
    assert "n/a" in text[1].split("\t") and "\t" in text[0]


def test_confounds_consistent_with_data(tiny):
    conf = pd.read_csv(tiny.runs[0].confounds_path, sep="\t",
                       na_values="n/a")
    data = _load(tiny.runs[0].bold_path)[tiny.truth.mask]  # (voxel, time)
    np.testing.assert_allclose(conf["global_signal"], data.mean(axis=0),
                               rtol=1e-5)
    dvars = np.sqrt((np.diff(data, axis=1) ** 2).mean(axis=0))
    np.testing.assert_allclose(conf["dvars"].iloc[1:], dvars, rtol=1e-4)
    motion = conf[MOTION].to_numpy()
    assert np.abs(motion[:, :3]).max() < 5  # mm
    assert np.abs(np.diff(motion, axis=0)).max() < 0.5  # smooth
    fd = conf["framewise_displacement"].iloc[1:]
    assert (fd > 0).all() and fd.median() < 0.5


# --------------------------------------------------------------------------
# ground truth recovery
# --------------------------------------------------------------------------


def test_design_matches_events(tiny):
    from nilearn.glm.first_level import make_first_level_design_matrix

    run = tiny.runs[1]
    events = pd.read_csv(run.events_path, sep="\t")
    frame_times = np.arange(tiny.n_volumes) * tiny.tr + tiny.tr / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = make_first_level_design_matrix(
            frame_times, events, hrf_model="glover", drift_model=None)
    pd.testing.assert_frame_equal(rebuilt, tiny.truth.design[run.name])
    assert list(tiny.truth.drift_basis[run.name].columns) == [
        "drift_linear", "drift_cosine"]


def test_ols_recovers_betas(tmp_path):
    """OLS with the true design + drift basis recovers beta, baseline, noise.

    Noise is AR(1), so the exact sampling covariance of the OLS estimate is
    ``P Sigma P.T`` with ``P = pinv(X)`` and ``Sigma_ij = sd**2 rho**|i-j|``.
    Voxels are independent, so the standardised errors z = (b_hat - b) / se
    are i.i.d. N(0, 1) across voxels: we require |z| < 5 everywhere
    (p ~ 6e-7 per voxel) and their sample sd close to 1 (5 standard
    errors for the 440 in-mask voxels x 2 conditions would be 0.88-1.12; we
    use 0.85-1.15).  The seed is fixed, so this cannot flake; the bounds
    only say that a *correct* generator passes for any seed.
    """
    rho, sd = 0.3, 10.0
    ds = make_synthetic_bids(tmp_path / "ols", n_subjects=1, n_volumes=160,
                             ar1_rho=rho, noise_sd=sd, seed=11)
    truth, run = ds.truth, ds.runs[0]
    design = truth.design[run.name]
    x = np.hstack([design.to_numpy(), truth.drift_basis[run.name]])
    data = _load(run.bold_path)[truth.mask].T  # (time, voxel)
    coef, *_ = np.linalg.lstsq(x, data, rcond=None)
    lags = np.abs(np.subtract.outer(np.arange(len(x)), np.arange(len(x))))
    pinv = np.linalg.pinv(x)
    se = np.sqrt(np.diag(pinv @ (sd**2 * rho**lags) @ pinv.T))
    cols = list(design.columns)
    for cond in truth.conditions:
        j = cols.index(cond)
        true_b = truth.betas[cond][truth.mask]
        active = true_b > 0
        assert active.sum() >= 10
        assert np.abs((coef[j] - true_b)[active] / se[j]).max() < 5, cond
        # the blob peaks are clearly detected (expected t ~ 25 / 3.8 ~ 6.5)
        peaks = np.argsort(true_b)[-BLOBS:]
        assert (coef[j, peaks] / se[j] > 3).all(), cond
    z_all = np.concatenate([
        (coef[cols.index(c)] - truth.betas[c][truth.mask])
        / se[cols.index(c)] for c in truth.conditions])
    assert 0.85 < z_all.std() < 1.15 and abs(z_all.mean()) < 0.2
    z_base = (coef[cols.index("constant")] - truth.baseline[truth.mask])
    assert np.abs(z_base / se[cols.index("constant")]).max() < 5.5
    resid = data - x @ coef
    # residual variance ~ sd**2 (OLS + AR(1) bias is a few %; allow 15 %)
    assert 0.85 < resid.var(axis=0, ddof=x.shape[1]).mean() / sd**2 < 1.15
    lag1 = (resid[1:] * resid[:-1]).sum(0) / (resid**2).sum(0)
    # OLS residual autocorrelation is biased down by ~(1 + 3 rho) / T
    assert abs(lag1.mean() - rho) < 0.08


# --------------------------------------------------------------------------
# nilearn compatibility
# --------------------------------------------------------------------------


def _from_bids(ds, **kwargs):
    from nilearn.glm.first_level import first_level_from_bids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return first_level_from_bids(
            ds.root, task_label="main", space_label=SPACE,
            derivatives_folder="derivatives/fmriprep",
            img_filters=[("desc", "preproc")], **kwargs)


def _check_from_bids(ds):
    models, imgs, events, confounds = _from_bids(ds)
    assert [m.subject_label for m in models] == list(ds.subjects)
    for model, sub_imgs, sub_events, sub_conf in zip(models, imgs, events,
                                                     confounds):
        assert model.t_r == ds.tr and model.slice_time_ref == 0.5
        runs = [r for r in ds.runs if r.subject == model.subject_label]
        assert [str(p) for p in sub_imgs] == [str(r.bold_path) for r in runs]
        for run, ev, conf in zip(runs, sub_events, sub_conf):
            pd.testing.assert_frame_equal(ev, ds.truth.events[run.name],
                                          check_dtype=False)
            assert conf.shape[0] == ds.n_volumes
            assert "framewise_displacement" in conf.columns
            assert not conf.isna().any().any()
    return models, imgs, events


def test_first_level_from_bids(tiny):
    _check_from_bids(tiny)


def test_first_level_from_bids_sessions(with_sessions):
    _check_from_bids(with_sessions)


def test_nilearn_fit_uses_true_design(tiny):
    models, imgs, events = _check_from_bids(tiny)
    model, run = models[0], tiny.runs[0]
    model.mask_img = str(run.mask_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(imgs[0][0], events=events[0][0])
    fitted = model.design_matrices_[0]
    truth = tiny.truth.design[run.name]
    np.testing.assert_allclose(fitted.index, truth.index, atol=1e-9)
    for cond in tiny.truth.conditions:
        np.testing.assert_allclose(fitted[cond], truth[cond], atol=1e-9)


def test_nilearn_load_confounds(tiny):
    from nilearn.interfaces.fmriprep import load_confounds

    conf, sample_mask = load_confounds(
        str(tiny.runs[0].bold_path),
        strategy=("motion", "wm_csf", "global_signal", "scrub", "high_pass"),
        motion="full", wm_csf="full", global_signal="full", scrub=0,
        fd_threshold=10.0, std_dvars_threshold=100.0)
    assert conf.shape[0] == tiny.n_volumes
    assert conf.shape[1] == 24 + 8 + 4
    assert sample_mask is None or len(sample_mask) == tiny.n_volumes
