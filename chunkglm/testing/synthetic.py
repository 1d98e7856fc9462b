"""Deterministic synthetic BIDS datasets with fMRIPrep-like derivatives.

:func:`make_synthetic_bids` writes a small raw BIDS tree (events, sidecars)
plus a ``derivatives/fmriprep`` tree (preprocessed BOLD in
``MNI152NLin2009cAsym``, brain masks, confounds) whose data follow a known
generative model, and returns the ground truth alongside the file paths.

Signal model
------------
Inside the ground-truth mask ``truth.mask`` every run is generated as::

    Y(t, v) = baseline(v) + sum_c X_c(t) beta_c(v)
              + a(v) * drift_linear(t) + b(v) * drift_cosine(t) + eps(t, v)
    eps(t, v) = rho(v) eps(t-1, v) + sd(v) sqrt(1 - rho(v)**2) eta(t, v)

with ``eps(0) = sd * eta(0)`` (stationary, variance ``sd**2``) and ``eta``
i.i.d. standard normal.  ``X`` is ``truth.design[run_name]`` (nilearn's
Glover-HRF regressors plus a ``constant`` column whose coefficient is the
baseline), the drift basis is ``truth.drift_basis[run_name]`` and the drift
amplitudes ``a, b ~ N(0, DRIFT_SD)`` are drawn per voxel and per run (they are
nuisance and are not returned).  Frame times are
``np.arange(n_volumes) * tr + tr / 2``: the derivative sidecars declare
``StartTime = tr / 2``, so nilearn infers ``slice_time_ref = 0.5`` and
rebuilds exactly the same regressors.  Outside the mask the images hold a
smooth background of 20-50 plus clipped white noise (sd 3), as unmasked
fMRIPrep output does.  All data are in arbitrary "signal units".

Randomness comes from :class:`numpy.random.SeedSequence` with spawn keys
derived from the subject/session/run numbers, so a given run does not depend
on how many other runs are generated, and identical arguments give
byte-identical files (gzip headers carry no name and ``mtime=0``).

With nilearn, pass ``derivatives_folder="derivatives/fmriprep"`` to
``first_level_from_bids`` (its default looks for ``derivatives/sub-*``).
"""

from __future__ import annotations

import io
from collections import namedtuple
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from chunkglm.testing.signal_model import (BASELINE_MEAN, BASELINE_VARIATION, BETA_PEAK_RANGE,  # noqa: F401
                                           BLOB_TRUNCATION, BLOBS_PER_CONDITION, DEFAULT_NOISE_SD,
                                           DRIFT_SD, MNI_2MM_AFFINE)
from chunkglm.testing.signal_model import ar1_inplace as _ar1_inplace
from chunkglm.testing.signal_model import write_json as _write_json
from chunkglm.testing.surface import add_surface_runs

__all__ = ["SIZES", "SPACE", "GroundTruth", "SyntheticDataset",
           "SyntheticRun", "make_synthetic_bids"]

SPACE = "MNI152NLin2009cAsym"

#: Size presets.  ``mask_radii`` are the semi-axes of the ellipsoidal brain
#: mask as fractions of ``shape`` (centred on the grid centre); for
#: "realistic" they give 234,873 voxels on the MNI152NLin2009cAsym 2 mm grid.
SIZES: dict[str, dict] = {
    "tiny": {"shape": (10, 12, 10), "n_volumes": 40, "voxel_size": 4.0,
             "affine": None, "mask_radii": (0.45, 0.45, 0.45)},
    "small": {"shape": (40, 48, 40), "n_volumes": 120, "voxel_size": 4.0,
              "affine": None, "mask_radii": (0.4, 0.4, 0.4)},
    "realistic": {"shape": (97, 115, 97), "n_volumes": 300, "voxel_size": 2.0,
                  "affine": MNI_2MM_AFFINE,
                  "mask_radii": (0.36, 0.374, 0.385)},
}

OUTSIDE_RANGE = (20.0, 50.0)  # smooth background level outside the mask
OUTSIDE_SD = 3.0  # white noise outside the mask, clipped at 4 sd
SUBJECT_MASK_DROP = 0.15  # fraction of boundary voxels dropped per subject
TRIAL_SLOT = 8.0  # seconds per trial slot (one trial per slot)
TRIAL_DURATION = (1.0, 3.0)  # seconds
RUN_TAIL = 8.0  # seconds at the end of a run without trial onsets
GZIP_LEVEL = 1
_VOX_OFFSET = 352


@dataclass(frozen=True)
class SyntheticRun:
    """Paths and entities of one synthetic run.

    Attributes
    ----------
    subject, session, task : str
        BIDS labels; ``session`` is None without a session level.
    run : int
        BIDS run index (``run-<run>`` is always in the names).
    bold_path, mask_path, confounds_path : pathlib.Path
        Derivatives: 4-D preprocessed BOLD, 3-D uint8 brain mask, confounds
        TSV (its ``.json`` sits next to it).
    events_path, raw_sidecar_path : pathlib.Path
        Raw level ``_events.tsv`` and ``_bold.json`` (with SliceTiming).
    sidecar_path : pathlib.Path
        Derivative ``_desc-preproc_bold.json`` (RepetitionTime, StartTime).
    entities : dict
        ``{"sub", ["ses",] "task", "run"}`` -> str, in BIDS order.
    """

    subject: str
    session: str | None
    task: str
    run: int
    bold_path: Path
    mask_path: Path
    confounds_path: Path
    events_path: Path
    sidecar_path: Path
    raw_sidecar_path: Path
    entities: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        """BIDS prefix, e.g. ``sub-01_ses-1_task-main_run-1``.

        This is the key of the run in :attr:`GroundTruth.design`.
        """
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Parameters used to generate a :class:`SyntheticDataset`.

    Attributes
    ----------
    mask : ndarray of bool, shape (x, y, z)
        Voxels where the signal model holds, shared by all runs.  Each
        subject's written brain mask is a subset of it (see
        ``subject_masks``); ``mask`` is the superset, not the intersection.
    subject_masks : dict of str to ndarray of bool, shape (x, y, z)
        Subject label -> mask written to that subject's ``desc-brain_mask``
        files: ``mask`` minus a random ~15 % of its boundary voxels.
    betas : dict of str to ndarray of float32, shape (x, y, z)
        Condition -> effect map (signal units per unit regressor).  Sum of
        Gaussian blobs, exactly zero outside the blobs and the mask.
        Shared by all subjects and runs.
    baseline : ndarray of float32, shape (x, y, z)
        Coefficient of the design's ``constant`` column (~1000 inside the
        mask, 0 outside).
    ar1_rho : float or ndarray of float32, shape (x, y, z)
        AR(1) coefficient of the noise.
    noise_sd : float or ndarray of float32, shape (x, y, z)
        Stationary standard deviation of the noise, signal units.
    design : dict of str to pandas.DataFrame, shape (n_volumes, n_cond + 1)
        Run name (:attr:`SyntheticRun.name`) -> true design from
        ``make_first_level_design_matrix(frame_times, events,
        hrf_model="glover", drift_model=None)``, index = frame times (s).
    drift_basis : dict of str to pandas.DataFrame, shape (n_volumes, 2)
        Run name -> columns ``drift_linear`` ((t - mean t) / run duration)
        and ``drift_cosine`` (cos(pi (t - t0) / (t_end - t0))).
    events : dict of str to pandas.DataFrame
        Run name -> events as written to the TSV.
    conditions : tuple of str
        Condition names (``trial_type`` values).
    start_time : float
        Time of the first frame (s), ``tr / 2``.
    """

    mask: np.ndarray
    subject_masks: dict
    betas: dict
    baseline: np.ndarray
    ar1_rho: float | np.ndarray
    noise_sd: float | np.ndarray
    design: dict
    drift_basis: dict
    events: dict
    conditions: tuple
    start_time: float


@dataclass(frozen=True, eq=False)
class SyntheticDataset:
    """A generated dataset: paths, geometry and ground truth.

    Attributes
    ----------
    root, derivatives : pathlib.Path
        Raw BIDS root and ``root / "derivatives" / "fmriprep"``.
    runs : tuple of SyntheticRun
        Ordered by subject, session, run.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (mm) affine of every image.
    shape, n_volumes, tr : tuple of int, int, float
        Spatial shape (x, y, z), volumes per run, repetition time (s).
    space, dtype : str
        ``"MNI152NLin2009cAsym"``; on-disk BOLD dtype (float32 or int16).
    truth : GroundTruth
        Generating parameters.
    """

    root: Path
    derivatives: Path
    runs: tuple
    affine: np.ndarray
    shape: tuple
    n_volumes: int
    tr: float
    space: str
    truth: GroundTruth
    dtype: str = "float32"
    surface: object = None  # SurfaceTruth (chunkglm.testing.surface) with surface=True

    @property
    def subjects(self) -> tuple:
        """Sorted subject labels."""
        return tuple(sorted({r.subject for r in self.runs}))


@dataclass(frozen=True, eq=False)
class _Geometry:
    """Grid and in-mask bookkeeping (F-order voxel indices)."""

    shape: tuple
    affine: np.ndarray
    mask: np.ndarray  # bool (x, y, z)
    radius: np.ndarray  # normalised ellipsoid radius (x, y, z)
    in_idx: np.ndarray  # F-order flat indices of mask voxels

    def to_vec(self, arr) -> np.ndarray:
        """(x, y, z) map (or scalar) -> (n_mask,) float32 in F order."""
        if np.ndim(arr) == 0:
            return np.full(self.in_idx.size, arr, dtype=np.float32)
        return np.asarray(arr, np.float32).ravel(order="F")[self.in_idx]


# ---- geometry and truth maps ---------------------------------------------
def _resolve_size(size, shape, n_volumes):
    """Return (shape, n_volumes, affine, mask_radii) from preset/overrides."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    preset = SIZES[size]
    shape = tuple(int(s) for s in (shape or preset["shape"]))
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 ints >= 4, got {shape}")
    n_volumes = int(n_volumes or preset["n_volumes"])
    affine = preset["affine"]
    if affine is None or shape != tuple(preset["shape"]):
        vs = preset["voxel_size"]
        affine = np.diag([vs, vs, vs, 1.0])
        affine[:3, 3] = -vs * (np.asarray(shape) - 1) / 2.0
    return shape, n_volumes, np.array(affine, float), preset["mask_radii"]


def _make_geometry(shape, affine, radii_frac) -> _Geometry:
    """Ellipsoidal brain mask centred on the grid (radius 1 on its surface)."""
    centre = (np.asarray(shape) - 1) / 2.0
    radii = np.asarray(radii_frac) * np.asarray(shape)
    axes = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii))
    radius = np.sqrt(r2).astype(np.float32)
    mask = radius <= 1.0
    in_idx = np.flatnonzero(mask.ravel(order="F"))
    return _Geometry(shape, affine, mask, radius, in_idx)


def _smooth_field(rng, shape) -> np.ndarray:
    """Smooth (x, y, z) float32 field in [-1, 1] (a slow cosine per axis)."""
    total = np.zeros(shape, np.float32)
    for axis, n in enumerate(shape):
        freq, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
        prof = np.cos(2 * np.pi * freq * np.arange(n) / n + phase)
        total += prof.reshape([-1 if i == axis else 1 for i in range(3)])
    return total / 3.0


def _blob_sigma(shape) -> float:
    """Gaussian blob sd in voxels (~6 mm on the 2 mm grid, >= 0.8 voxel)."""
    return max(0.8, 0.03 * min(shape))


def _pick_centres(rng, geom, n, min_dist) -> np.ndarray:
    """(n, 3) voxel coordinates of blob centres in the inner mask, greedily
    spread at least ``min_dist`` voxels apart (relaxed if impossible)."""
    cand = np.argwhere(geom.radius <= 0.7)
    cand = cand[rng.permutation(len(cand))]
    while True:
        chosen = []
        for c in cand:
            if all(np.sum((c - p) ** 2) >= min_dist**2 for p in chosen):
                chosen.append(c)
                if len(chosen) == n:
                    return np.array(chosen)
        min_dist *= 0.8


def _make_betas(rng, geom, conditions, baseline) -> dict:
    """Condition -> (x, y, z) float32 sum of BLOBS_PER_CONDITION truncated
    Gaussian blobs, peaks 2-3 % of the local baseline, 0 outside the mask."""
    sigma = _blob_sigma(geom.shape)
    n_blobs = BLOBS_PER_CONDITION * len(conditions)
    centres = _pick_centres(rng, geom, n_blobs, 2 * BLOB_TRUNCATION * sigma)
    axes = np.ogrid[: geom.shape[0], : geom.shape[1], : geom.shape[2]]
    betas = {}
    for i, cond in enumerate(conditions):
        beta = np.zeros(geom.shape, np.float32)
        for centre in centres[i * BLOBS_PER_CONDITION :][:BLOBS_PER_CONDITION]:
            d2 = sum((a - c) ** 2 for a, c in zip(axes, centre)) / sigma**2
            peak = rng.uniform(*BETA_PEAK_RANGE) * baseline[tuple(centre)]
            blob = peak * np.exp(-0.5 * d2)
            beta += np.where(d2 <= BLOB_TRUNCATION**2, blob, 0.0)
        betas[cond] = np.where(geom.mask, beta, 0).astype(np.float32)
    return betas


def _subject_mask(rng, mask) -> np.ndarray:
    """``mask`` minus a random SUBJECT_MASK_DROP of its boundary voxels."""
    from scipy.ndimage import binary_erosion

    boundary = mask & ~binary_erosion(mask)
    drop = boundary & (rng.random(mask.shape) < SUBJECT_MASK_DROP)
    return mask & ~drop


def _as_param(value, shape, name):
    """Validate a scalar-or-map parameter; maps become float32 arrays."""
    if np.ndim(value) == 0:
        return float(value)
    arr = np.asarray(value, np.float32)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} map must have shape {shape}, got {arr.shape}")
    return arr


def _global_truth(seed, geom, conditions):
    """(x, y, z) float32 baseline, betas dict and outside-mask background
    level in OUTSIDE_RANGE, all from the dataset-level random stream."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    field = _smooth_field(rng, geom.shape)
    baseline = BASELINE_MEAN * (1 + BASELINE_VARIATION * field)
    baseline = np.where(geom.mask, baseline, 0).astype(np.float32)
    betas = _make_betas(rng, geom, conditions, baseline)
    lo, hi = OUTSIDE_RANGE
    background = lo + (hi - lo) * (_smooth_field(rng, geom.shape) + 1) / 2
    return baseline, betas, background.astype(np.float32)


def _confound_regions(geom, betas) -> tuple:
    """In-mask positions of pseudo CSF (innermost 5 % of non-active mask
    voxels) and white matter (next 25 %): these carry no task signal."""
    active = np.zeros(geom.shape, bool)
    for beta in betas.values():
        active |= beta != 0
    radius = geom.to_vec(geom.radius)
    quiet = np.flatnonzero(~geom.to_vec(active).astype(bool))
    order = quiet[np.argsort(radius[quiet], kind="stable")]
    n_csf = max(1, len(order) // 20)
    n_wm = max(1, len(order) // 4)
    return order[:n_csf], order[n_csf : n_csf + n_wm]


# ---- per-run design and data ---------------------------------------------
def _make_events(rng, conditions, n_volumes, tr) -> pd.DataFrame:
    """Balanced, non-overlapping trials: onset, duration (s), trial_type,
    modulation (1).  The first ``n_volumes * tr - RUN_TAIL`` s are cut into
    ~TRIAL_SLOT s slots holding one shuffled trial each (random onset,
    1-3 s duration, >= 0.5 s gap before the next slot)."""
    usable = n_volumes * tr - RUN_TAIL
    n_per = max(1, int(usable // (TRIAL_SLOT * len(conditions))))
    n_trials = n_per * len(conditions)
    slot = usable / n_trials
    if slot < TRIAL_DURATION[1] + 0.5:
        raise ValueError(f"run of {n_volumes * tr} s is too short for trials")
    kinds = rng.permutation(np.repeat(np.arange(len(conditions)), n_per))
    duration = np.round(rng.uniform(*TRIAL_DURATION, n_trials), 1)
    jitter = rng.uniform(0, 1, n_trials) * (slot - duration - 0.5)
    onset = np.round(np.arange(n_trials) * slot + jitter, 3)
    trial_type = np.asarray(conditions, dtype=object)[kinds]
    return pd.DataFrame({"onset": onset, "duration": duration,
                         "trial_type": trial_type,
                         "modulation": np.ones(n_trials, dtype=int)})


def _frame_times(n_volumes, tr) -> np.ndarray:
    """Acquisition time (s) of each volume: ``arange(n) * tr + tr / 2``."""
    return np.arange(n_volumes) * tr + tr / 2.0


def _true_design(events, frame_times) -> pd.DataFrame:
    """nilearn Glover design without drift: conditions + constant.  The
    all-ones modulation is dropped (same result) to silence nilearn's log."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    events = events.drop(columns="modulation")
    return make_first_level_design_matrix(frame_times, events,
                                          hrf_model="glover", drift_model=None)


def _drift_basis(frame_times) -> pd.DataFrame:
    """Slow drift regressors, shape (n_volumes, 2), dimensionless."""
    t = np.asarray(frame_times, float)
    span = t[-1] - t[0] if t.size > 1 else 1.0
    duration = t.size * (t[1] - t[0]) if t.size > 1 else 1.0
    return pd.DataFrame({"drift_linear": (t - t.mean()) / duration,
                         "drift_cosine": np.cos(np.pi * (t - t[0]) / span)},
                        index=pd.Index(t))


def _simulate(rng, geom, regressors, coefs, rho, sd) -> np.ndarray:
    """In-mask data of one run, (time, voxel) float32 (~282 MB realistic).

    ``regressors`` (time, k): true design and drift basis side by side;
    ``coefs`` (k, voxel) float32: betas, baseline, drift amplitudes.
    """
    y = np.empty((regressors.shape[0], geom.in_idx.size), np.float32)
    rng.standard_normal(dtype=np.float32, out=y)
    _ar1_inplace(y, rho, sd)
    regressors = regressors.astype(np.float32)
    for t in range(y.shape[0]):
        y[t] += regressors[t] @ coefs
    return y


# ---- confounds -----------------------------------------------------------
def _motion(rng, n_volumes) -> pd.DataFrame:
    """Smooth random-walk motion (mm, rad): AR(0.7) increments summed."""
    scale = np.array([0.03] * 3 + [0.0005] * 3)
    steps = rng.standard_normal((n_volumes, 6)) * scale
    for t in range(1, n_volumes):
        steps[t] += 0.7 * steps[t - 1]
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    walk = np.cumsum(steps, axis=0)
    return pd.DataFrame(walk - walk[0], columns=names)


def _expand(frame) -> pd.DataFrame:
    """Add fMRIPrep's ``_derivative1``, ``_power2``, ``_derivative1_power2``."""
    out = {}
    for name, col in frame.items():
        deriv = col.diff()  # first row NaN
        out[name] = col
        out[f"{name}_derivative1"] = deriv
        out[f"{name}_power2"] = col**2
        out[f"{name}_derivative1_power2"] = deriv**2
    return pd.DataFrame(out)


def _dvars(y) -> np.ndarray:
    """RMS over voxels of the temporal difference; first entry NaN."""
    out = np.full(y.shape[0], np.nan)
    for t in range(1, y.shape[0]):
        diff = (y[t] - y[t - 1]).astype(np.float64)
        out[t] = np.sqrt(np.mean(diff**2))
    return out


def _confounds(rng, y, regions) -> pd.DataFrame:
    """fMRIPrep-like confounds (NaN where fMRIPrep writes n/a); tissue
    signals and DVARS come from ``y`` (time, voxel), ``regions`` = (csf, wm)
    in-mask positions."""
    weights = np.zeros((y.shape[1], 3), np.float32)
    weights[:, 0] = 1.0 / y.shape[1]
    for j, idx in enumerate(regions, start=1):
        weights[idx, j] = 1.0 / idx.size
    tissue = pd.DataFrame((y @ weights).astype(np.float64),
                          columns=["global_signal", "csf", "white_matter"])
    motion = _motion(rng, y.shape[0])
    dvars = _dvars(y)
    rot_mm = 50.0 * motion.iloc[:, 3:].diff().abs().sum(axis=1, skipna=False)
    fd = motion.iloc[:, :3].diff().abs().sum(axis=1, skipna=False) + rot_mm
    scalars = pd.DataFrame({"std_dvars": dvars / np.nanmedian(dvars),
                            "dvars": dvars,
                            "framewise_displacement": fd.to_numpy()})
    return pd.concat([_expand(tissue), scalars, _expand(motion)], axis=1)


# ---- writers -------------------------------------------------------------
@contextmanager
def _open_out(path, compress):
    """Binary writer; gzip via isal with no file name and mtime 0."""
    with open(path, "wb") as raw:
        if not compress:
            yield raw
            return
        from isal import igzip

        with igzip.IGzipFile(filename="", mode="wb", fileobj=raw,
                             compresslevel=GZIP_LEVEL, mtime=0) as gz:
            yield gz


def _nifti_header(shape, affine, zooms, dtype, slope=1.0, inter=0.0):
    """fMRIPrep-like NIfTI-1 header bytes (348 + 4 extension bytes).

    Parameters
    ----------
    shape : tuple of int
        (x, y, z) or (x, y, z, t).
    zooms : tuple of float
        Voxel sizes in mm, plus TR in s for 4-D images.
    """
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_zooms(zooms)
    hdr.set_qform(affine, code="mni")
    hdr.set_sform(affine, code="mni")
    hdr.set_zooms(zooms)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(slope, inter)
    hdr["vox_offset"] = _VOX_OFFSET
    hdr["descrip"] = b"chunkglm.testing synthetic"
    return hdr.binaryblock + b"\x00" * 4


def _int16_scaling(y) -> tuple:
    """float32 (slope, inter) mapping [min, max] of the run onto int16."""
    lo = min(float(y.min()), OUTSIDE_RANGE[0] - 4 * OUTSIDE_SD)
    hi = max(float(y.max()), OUTSIDE_RANGE[1] + 4 * OUTSIDE_SD)
    inter = np.float32((hi + lo) / 2.0)
    slope = np.float32((hi - lo) / 65534.0 * 1.001)
    return slope, inter


def _write_bold(path, y, geom, background, rng, tr, dtype, compress) -> None:
    """Stream the 4-D image volume by volume (Fortran order).

    Each volume is the background + clipped white noise, with the in-mask
    values of ``y[t]`` pasted in; int16 output is rounded with a real
    scl_slope / scl_inter.
    """
    shape4 = (*geom.shape, y.shape[0])
    zooms = (*np.abs(np.diag(geom.affine)[:3]), tr)
    slope, inter = _int16_scaling(y) if dtype == "int16" else (1.0, 0.0)
    level = background.ravel(order="F")
    vol = np.empty(level.size, np.float32)
    with _open_out(path, compress) as out:
        out.write(_nifti_header(shape4, geom.affine, zooms, dtype, slope, inter))
        for t in range(y.shape[0]):
            rng.standard_normal(dtype=np.float32, out=vol)
            np.clip(vol, -4.0, 4.0, out=vol)
            vol *= OUTSIDE_SD
            vol += level
            vol[geom.in_idx] = y[t]
            if dtype == "int16":
                raw = np.rint((vol - inter) / slope)
                out.write(np.clip(raw, -32767, 32767).astype("<i2").tobytes())
            else:
                out.write(vol.astype("<f4").tobytes())


def _write_mask(path, mask, affine, compress) -> None:
    """3-D uint8 0/1 mask on the BOLD grid."""
    zooms = tuple(np.abs(np.diag(affine)[:3]))
    with _open_out(path, compress) as out:
        out.write(_nifti_header(mask.shape, affine, zooms, "uint8"))
        out.write(mask.astype(np.uint8).tobytes(order="F"))


def _write_tsv(path, frame, float_format) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, sep="\t", index=False, na_rep="n/a",
                 float_format=float_format, lineterminator="\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())


def _write_dataset_files(root, deriv, subjects, seed) -> None:
    """dataset_description.json (raw and derivative) and participants.tsv."""
    _write_json(
        root / "dataset_description.json",
        {"Name": "chunkglm synthetic dataset", "BIDSVersion": "1.8.0",
         "DatasetType": "raw"},
    )
    _write_json(
        deriv / "dataset_description.json",
        {"Name": "fMRIPrep - fMRI PREProcessing workflow (synthetic)",
         "BIDSVersion": "1.8.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.1",
                          "Description": "synthetic data written by "
                          "chunkglm.testing, not produced by fMRIPrep"}]},
    )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    participants = pd.DataFrame(
        {"participant_id": [f"sub-{s}" for s in subjects],
         "age": rng.integers(18, 60, len(subjects)),
         "sex": rng.choice(["F", "M"], len(subjects))}
    )
    _write_tsv(root / "participants.tsv", participants, None)


def _confounds_sidecar(columns) -> dict:
    """Minimal per-column metadata, as fMRIPrep's confounds .json."""
    return {c: {"Description": f"synthetic {c}"} for c in columns}


def _run_paths(root, deriv, sub, ses, task, run, compress) -> dict:
    """Entities and all file paths of one run."""
    ents = {"sub": sub, **({"ses": ses} if ses else {}), "task": task,
            "run": str(run)}
    prefix = "_".join(f"{k}-{v}" for k, v in ents.items())
    rel = Path(f"sub-{sub}", *([f"ses-{ses}"] if ses else []), "func")
    ext = ".nii.gz" if compress else ".nii"
    pre = deriv / rel / f"{prefix}_space-{SPACE}"
    return {
        "entities": ents,
        "bold_path": pre.with_name(pre.name + f"_desc-preproc_bold{ext}"),
        "mask_path": pre.with_name(pre.name + f"_desc-brain_mask{ext}"),
        "sidecar_path": pre.with_name(pre.name + "_desc-preproc_bold.json"),
        "confounds_path": deriv / rel / f"{prefix}_desc-confounds_timeseries.tsv",
        "events_path": root / rel / f"{prefix}_events.tsv",
        "raw_sidecar_path": root / rel / f"{prefix}_bold.json",
    }


def _write_sidecars(paths, task, tr, n_slices) -> None:
    """Raw ``_bold.json`` (with SliceTiming) and derivative sidecar."""
    slice_timing = np.round(np.arange(n_slices) * tr / n_slices, 4)
    _write_json(
        paths["raw_sidecar_path"],
        {"RepetitionTime": tr, "TaskName": task,
         "SliceTiming": slice_timing.tolist()},
    )
    _write_json(
        paths["sidecar_path"],
        {"RepetitionTime": tr, "StartTime": tr / 2.0, "SkullStripped": False,
         "SliceTimingCorrected": True, "TaskName": task},
    )


# Dataset-level settings shared by all runs (rho, sd: (voxel,) float32).
_Spec = namedtuple(
    "_Spec", "root deriv task tr n_volumes dtype seed conditions compress "
    "geom baseline betas background rho sd regions")


def _generate_run(spec, key, sub, ses, run, subject_mask):
    """Write every file of one run; return (SyntheticRun, design, drift, events)."""
    ss = np.random.SeedSequence(spec.seed, spawn_key=(1, *key))
    rng_ev, rng_data, rng_conf, rng_out = map(np.random.default_rng,
                                               ss.spawn(4))
    paths = _run_paths(spec.root, spec.deriv, sub, ses, spec.task, run,
                       spec.compress)
    events = _make_events(rng_ev, spec.conditions, spec.n_volumes, spec.tr)
    frame_times = _frame_times(spec.n_volumes, spec.tr)
    design = _true_design(events, frame_times)
    drift = _drift_basis(frame_times)
    geom = spec.geom
    coefs = [geom.to_vec(spec.betas[c]) for c in spec.conditions]
    coefs.append(geom.to_vec(spec.baseline))
    amps = rng_data.normal(0.0, DRIFT_SD, (2, geom.in_idx.size))
    regressors = np.hstack([design[[*spec.conditions, "constant"]], drift])
    coefs = np.vstack([*coefs, amps.astype(np.float32)])
    y = _simulate(rng_data, geom, regressors, coefs, spec.rho, spec.sd)
    paths["bold_path"].parent.mkdir(parents=True, exist_ok=True)
    _write_bold(paths["bold_path"], y, geom, spec.background, rng_out,
                spec.tr, spec.dtype, spec.compress)
    confounds = _confounds(rng_conf, y, spec.regions)
    del y
    _write_mask(paths["mask_path"], subject_mask, geom.affine, spec.compress)
    _write_tsv(paths["confounds_path"], confounds, "%.8g")
    _write_json(paths["confounds_path"].with_suffix(".json"),
                _confounds_sidecar(confounds.columns))
    _write_tsv(paths["events_path"], events, "%.3f")
    _write_sidecars(paths, spec.task, spec.tr, geom.shape[2])
    run_obj = SyntheticRun(subject=sub, session=ses, task=spec.task, run=run,
                           **paths)
    return run_obj, design, drift, events


def _run_keys(n_subjects, n_sessions, n_runs):
    """Yield (spawn key, subject, session, run) in BIDS order."""
    width = max(2, len(str(n_subjects)))
    for i in range(1, n_subjects + 1):
        for j in range(max(n_sessions, 1)):
            ses = str(j + 1) if n_sessions else None
            for k in range(1, n_runs + 1):
                yield (i, j + 1, k), f"{i:0{width}d}", ses, k


def _check_args(n_subjects, n_sessions, n_runs, dtype, conditions, tr):
    if n_subjects < 1 or n_runs < 1 or n_sessions < 0:
        raise ValueError("need n_subjects >= 1, n_runs >= 1, n_sessions >= 0")
    if dtype not in ("float32", "int16"):
        raise ValueError(f"dtype must be 'float32' or 'int16', got {dtype!r}")
    if len(conditions) < 1 or len(set(conditions)) != len(conditions):
        raise ValueError("conditions must be non-empty and unique")
    if not tr > 0:
        raise ValueError("tr must be positive")


def make_synthetic_bids(
    root, *, n_subjects=2, n_sessions=0, n_runs=1, task="main", size="tiny",
    shape=None, n_volumes=None, tr=2.0, dtype="float32", seed=0,
    conditions=("a", "b"), ar1_rho=0.3, noise_sd=None, compress=True, surface=False,
) -> SyntheticDataset:
    """Write a synthetic BIDS dataset with fMRIPrep-like derivatives.

    Parameters
    ----------
    root : str or pathlib.Path
        Raw BIDS root (created); derivatives go to
        ``root/derivatives/fmriprep``.
    n_subjects, n_runs : int
        Subjects ``sub-01..`` and runs ``run-1..`` (run entity always set).
    n_sessions : int
        0: no session level; k >= 1: ``ses-1..ses-k``.
    task : str
        Task label.
    size : {"tiny", "small", "realistic"}
        Preset from :data:`SIZES`; ``shape`` / ``n_volumes`` override it.
        "realistic" is the MNI152NLin2009cAsym 2 mm grid (97, 115, 97),
        300 volumes, 234,873 mask voxels (~1.3 GB per run in float32).
    shape : tuple of 3 int, optional
        Grid shape (x, y, z).  If it differs from the preset, the affine is
        a centred diagonal one with the preset's voxel size.
    n_volumes : int, optional
        Volumes per run.
    tr : float
        Repetition time in seconds.
    dtype : {"float32", "int16"}
        On-disk BOLD type; int16 uses a run-specific scl_slope/scl_inter
        (nibabel's scaled values match the float32 data to ~slope/2).
    seed : int
        Master seed; identical arguments give byte-identical files.
    conditions : sequence of str
        Condition names (``trial_type``); each gets its own active blobs.
    ar1_rho : float or ndarray, shape (x, y, z)
        AR(1) coefficient of the noise.
    noise_sd : float or ndarray, shape (x, y, z), optional
        Noise sd in signal units; default DEFAULT_NOISE_SD (10, i.e. 1 % of
        the ~1000 baseline).
    compress : bool
        Write ``.nii.gz`` (isal, level 1) instead of ``.nii``.
    surface : bool
        Also write fsaverage5 GIFTI runs and a small CIFTI series per run, with
        their truth in ``.surface`` (:func:`chunkglm.testing.surface.add_surface_runs`).

    Returns
    -------
    SyntheticDataset
        Paths of every run plus the :class:`GroundTruth`.
    """
    _check_args(n_subjects, n_sessions, n_runs, dtype, conditions, tr)
    conditions = tuple(str(c) for c in conditions)
    shape, n_volumes, affine, radii = _resolve_size(size, shape, n_volumes)
    geom = _make_geometry(shape, affine, radii)
    rho = _as_param(ar1_rho, shape, "ar1_rho")
    if np.any(np.abs(rho) >= 1):
        raise ValueError("ar1_rho must lie in (-1, 1)")
    sd = _as_param(DEFAULT_NOISE_SD if noise_sd is None else noise_sd, shape,
                   "noise_sd")
    root = Path(root)
    deriv = root / "derivatives" / "fmriprep"
    baseline, betas, background = _global_truth(seed, geom, conditions)
    spec = _Spec(root, deriv, task, float(tr), n_volumes, dtype, seed,
                 conditions, compress, geom, baseline, betas, background,
                 geom.to_vec(rho), geom.to_vec(sd),
                 _confound_regions(geom, betas))
    runs, sub_masks, design, drift, events = [], {}, {}, {}, {}
    for key, sub, ses, run in _run_keys(n_subjects, n_sessions, n_runs):
        if sub not in sub_masks:
            mask_ss = np.random.SeedSequence(seed, spawn_key=(3, key[0]))
            sub_masks[sub] = _subject_mask(np.random.default_rng(mask_ss),
                                           geom.mask)
        run_obj, *parts = _generate_run(spec, key, sub, ses, run, sub_masks[sub])
        runs.append(run_obj)
        design[run_obj.name], drift[run_obj.name], events[run_obj.name] = parts
    _write_dataset_files(root, deriv, list(sub_masks), seed)
    truth = GroundTruth(geom.mask, sub_masks, betas, baseline, rho, sd, design,
                        drift, events, conditions, float(tr) / 2.0)
    dataset = SyntheticDataset(root, deriv, tuple(runs), affine, shape, n_volumes, float(tr), SPACE, truth, dtype)
    if surface:
        return replace(dataset, surface=add_surface_runs(dataset, seed, ar1_rho, noise_sd))
    return dataset
