"""Synthetic surface runs beside a synthetic BIDS dataset: fsaverage5 GIFTI pairs and a CIFTI-2 series.

``make_synthetic_bids(..., surface=True)`` calls :func:`add_surface_runs`: for
every run of the dataset it writes, in the run's derivatives folder,

- ``<prefix>_hemi-L_space-fsaverage5_bold.func.gii`` and ``..._hemi-R_...``
  (one float32 data array per volume, as fMRIPrep writes them) on the
  fsaverage5 mesh nilearn ships in its package (no download), with a BIDS
  sidecar ``<prefix>_hemi-L_space-fsaverage5_bold.json`` (RepetitionTime,
  StartTime; the CIFTI series has its own);
- ``<prefix>_space-fsaverage5_den-10k_bold.dtseries.nii``: a small CIFTI-2
  dense series whose brain models are the cortex of both hemispheres without
  a medial-wall-like cap (as fsLR's 91k grayordinates leave the medial wall
  out) and a 2 x 2 x 2 voxel block in each thalamus (2 mm MNI grid). Its
  cortex values are the GIFTI runs' values at the same vertices, bit for bit.

Signal model, per element v (vertex or voxel) and run: the volume dataset's
model with the run's true design (same events, so the same regressors,
``truth.design[run.name]``) and drift basis::

    Y(t, v) = baseline(v) + sum_c X_c(t) beta_c(v) + a(v) drift_linear(t) + b(v) drift_cosine(t)
              + eps(t, v),  eps AR(1) with coefficient rho and stationary sd ``noise_sd``

``beta_c`` is a sum of Gaussian blobs on the fsaverage5 sphere (angle from
the blob centre, sigma :data:`BLOB_SIGMA_RAD`, exactly 0 beyond
``BLOB_TRUNCATION`` sigmas) for vertices, and a constant effect in one
thalamus block per condition for voxels. Drift amplitudes are drawn per
element and run (nuisance, not returned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from chunkglm.io.surface import gifti_image
from chunkglm.testing.signal_model import (BASELINE_MEAN, BASELINE_VARIATION, BETA_PEAK_RANGE, BLOB_TRUNCATION,
                                           BLOBS_PER_CONDITION, DEFAULT_NOISE_SD, DRIFT_SD, MNI_2MM_AFFINE)
from chunkglm.testing.signal_model import ar1_inplace as _ar1_inplace
from chunkglm.testing.signal_model import write_json as _write_json

__all__ = ["BLOB_SIGMA_RAD", "CIFTI_VOLUME_SHAPE", "MESH", "SurfaceRunFiles", "SurfaceTruth", "add_surface_runs"]

#: The mesh nilearn ships (``nilearn.datasets.load_fsaverage``) that GIFTI runs lie on.
MESH = "fsaverage5"
#: Blob width on the unit sphere (radians; ~0.15 rad is ~15 mm on a 100 mm sphere).
BLOB_SIGMA_RAD = 0.15
#: Vertices whose unit-sphere x lies beyond this on the medial side are left out of the CIFTI series.
MEDIAL_CAP = 0.9
#: The CIFTI volume grid (MNI152NLin2009cAsym 2 mm) and its two thalamus blocks (corner ijk).
CIFTI_VOLUME_SHAPE = (97, 115, 97)
THALAMUS = {"CIFTI_STRUCTURE_THALAMUS_LEFT": (52, 55, 40), "CIFTI_STRUCTURE_THALAMUS_RIGHT": (43, 55, 40)}


@dataclass(frozen=True)
class SurfaceRunFiles:
    """The surface files of one synthetic run.

    Attributes
    ----------
    name : str
        The run's BIDS prefix (:attr:`SyntheticRun.name`).
    gifti : dict
        ``{"left": path, "right": path}`` of the fsaverage5 GIFTI runs.
    sidecars : dict
        The BIDS sidecars (RepetitionTime, StartTime) of the GIFTI runs (``left``,
        ``right``) and of the CIFTI series (``cifti``).
    cifti : pathlib.Path
        The CIFTI-2 dense series.
    """

    name: str
    gifti: dict
    sidecars: dict
    cifti: Path


@dataclass(frozen=True, eq=False)
class SurfaceTruth:
    """Generating parameters of the surface runs (elements: left vertices, then right vertices).

    Attributes
    ----------
    mesh : str
        ``"fsaverage5"`` (pial mesh of ``nilearn.datasets.load_fsaverage``).
    betas : dict of str to ndarray, shape (n_vertices,)
        Condition -> effect per vertex (left then right, 2 x 10242), signal units.
    baseline : ndarray, shape (n_vertices,)
        Coefficient of the design's ``constant`` column.
    ar1_rho, noise_sd : float
        AR(1) coefficient and stationary sd of the noise (every element).
    cifti_vertices : dict of str to ndarray
        Hemisphere -> the vertices kept in the CIFTI series (the rest is the medial cap).
    cifti_betas, cifti_baseline : dict / ndarray, shape (n_grayordinates,)
        The same truth over the CIFTI series' elements (cortex vertices then thalamus voxels).
    brain_models : nibabel.cifti2.BrainModelAxis
        The CIFTI series' grayordinates.
    runs : tuple of SurfaceRunFiles
        Files per run, in the dataset's run order.
    """

    mesh: str
    betas: dict
    baseline: np.ndarray
    ar1_rho: float
    noise_sd: float
    cifti_vertices: dict
    cifti_betas: dict
    cifti_baseline: np.ndarray
    brain_models: object
    runs: tuple = field(default=())


def _sphere_units(sphere) -> dict:
    units = {}
    for part in ("left", "right"):
        xyz = np.asarray(sphere.parts[part].coordinates, dtype=np.float64)
        units[part] = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    return units


def _vertex_truth(rng, units, conditions):
    """Betas (sum of truncated Gaussian blobs on the sphere) and baseline per vertex."""
    both = np.concatenate([units["left"], units["right"]])
    sizes = [len(units["left"]), len(units["right"])]
    hemi = np.repeat([0, 1], sizes)
    baseline = (BASELINE_MEAN * (1 + BASELINE_VARIATION * both[:, 2])).astype(np.float32)
    betas = {}
    for condition in conditions:
        beta = np.zeros(len(both), dtype=np.float64)
        for centre in rng.choice(len(both), BLOBS_PER_CONDITION, replace=False):
            angle = np.arccos(np.clip(both @ both[centre], -1.0, 1.0))
            blob = np.exp(-0.5 * (angle / BLOB_SIGMA_RAD) ** 2)
            blob[(angle > BLOB_TRUNCATION * BLOB_SIGMA_RAD) | (hemi != hemi[centre])] = 0.0
            beta += rng.uniform(*BETA_PEAK_RANGE) * blob
        betas[condition] = (beta * baseline).astype(np.float32)
    return betas, baseline


def _brain_models(units):
    """Cortex without the medial cap (left: x > cap; right: x < -cap) and the thalamus blocks."""
    from nibabel.cifti2 import BrainModelAxis

    kept = {"left": np.flatnonzero(units["left"][:, 0] <= MEDIAL_CAP),
            "right": np.flatnonzero(units["right"][:, 0] >= -MEDIAL_CAP)}
    axis = (BrainModelAxis.from_mask(np.isin(np.arange(len(units["left"])), kept["left"]), "CortexLeft")
            + BrainModelAxis.from_mask(np.isin(np.arange(len(units["right"])), kept["right"]), "CortexRight"))
    for structure, corner in THALAMUS.items():
        block = np.zeros(CIFTI_VOLUME_SHAPE, dtype=bool)
        i, j, k = corner
        block[i:i + 2, j:j + 2, k:k + 2] = True
        axis = axis + BrainModelAxis.from_mask(block, structure, affine=MNI_2MM_AFFINE)
    return kept, axis


def _cifti_truth(betas, baseline, kept, conditions, n_left):
    """The truth over the CIFTI elements: kept vertices, then 8 voxels per thalamus."""
    index = np.concatenate([kept["left"], n_left + kept["right"]])
    voxels = {name: np.zeros(16, dtype=np.float32) for name in conditions}
    for block, condition in enumerate(conditions[:2]):  # condition c active in thalamus block c
        voxels[condition][8 * block:8 * block + 8] = BETA_PEAK_RANGE[1] * BASELINE_MEAN
    cifti_betas = {c: np.concatenate([betas[c][index], voxels[c]]) for c in conditions}
    cifti_baseline = np.concatenate([baseline[index], np.full(16, BASELINE_MEAN, dtype=np.float32)])
    return index, cifti_betas, cifti_baseline


def _simulate(rng, regressors, coefs, rho, sd) -> np.ndarray:
    """(time, element) float32: AR(1) noise plus the regressors times their coefficients."""
    y = rng.standard_normal((regressors.shape[0], coefs.shape[1]), dtype=np.float32)
    n = coefs.shape[1]
    _ar1_inplace(y, np.full(n, rho, np.float32), np.full(n, sd, np.float32))
    y += (regressors.astype(np.float32) @ coefs).astype(np.float32)
    return y


def _write_gifti(path, values, tr) -> None:
    nib.save(gifti_image(values, "NIFTI_INTENT_TIME_SERIES", {"TimeStep": f"{tr * 1000:g}"}), path)


def _write_cifti(path, values, axis, tr) -> None:
    from nibabel.cifti2 import Cifti2Header, Cifti2Image, SeriesAxis

    series = SeriesAxis(start=0.0, step=tr, size=values.shape[0], unit="SECOND")
    Cifti2Image(values, Cifti2Header.from_axes((series, axis))).to_filename(str(path))


def _run_key(run) -> tuple:
    return (int(run.subject), int(run.session or 1), int(run.run))


def add_surface_runs(dataset, seed=0, ar1_rho=0.3, noise_sd=None) -> SurfaceTruth:
    """Write the surface files of every run of ``dataset`` (see the module docstring).

    Parameters
    ----------
    dataset : SyntheticDataset
        Its runs' true designs and drift bases drive the surface signals.
    seed : int
        Master seed (the surface draws use their own spawn keys: the volume
        files do not change).
    ar1_rho, noise_sd : float
        Noise of every element (scalars: surface elements have no voxel maps).

    Returns
    -------
    SurfaceTruth
    """
    from nilearn.datasets import load_fsaverage

    noise_sd = DEFAULT_NOISE_SD if noise_sd is None else noise_sd
    if np.ndim(ar1_rho) or np.ndim(noise_sd):
        raise ValueError("surface=True needs scalar ar1_rho and noise_sd (maps are per voxel of the volume grid).")
    units = _sphere_units(load_fsaverage(MESH)["sphere"])
    conditions = dataset.truth.conditions
    betas, baseline = _vertex_truth(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,))),
                                    units, conditions)
    kept, axis = _brain_models(units)
    index, cifti_betas, cifti_baseline = _cifti_truth(betas, baseline, kept, conditions, len(units["left"]))
    files = [_write_run(dataset, run, seed, (betas, baseline, cifti_betas, cifti_baseline),
                        index, axis, float(ar1_rho), float(noise_sd)) for run in dataset.runs]
    return SurfaceTruth(MESH, betas, baseline, float(ar1_rho), float(noise_sd), kept, cifti_betas,
                        cifti_baseline, axis, tuple(files))


def _write_run(dataset, run, seed, truth, index, axis, rho, sd) -> SurfaceRunFiles:
    betas, baseline, cifti_betas, cifti_baseline = truth
    conditions = dataset.truth.conditions
    design = dataset.truth.design[run.name][[*conditions, "constant"]]
    regressors = np.hstack([design, dataset.truth.drift_basis[run.name]])
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(8, *_run_key(run))))
    n_vertices, n_voxels = len(baseline), len(cifti_baseline) - len(index)

    def coefficients(beta_maps, base, n):
        return np.vstack([*(beta_maps[c] for c in conditions), base,
                          rng.normal(0.0, DRIFT_SD, (2, n)).astype(np.float32)]).astype(np.float32)

    vertices = _simulate(rng, regressors, coefficients(betas, baseline, n_vertices), rho, sd)
    voxel_truth = {c: cifti_betas[c][len(index):] for c in conditions}
    voxels = _simulate(rng, regressors, coefficients(voxel_truth, cifti_baseline[len(index):], n_voxels), rho, sd)
    folder = run.bold_path.parent
    prefix = run.name
    gifti, sidecars = {}, {}
    n_left = len(betas[conditions[0]]) // 2
    for part, hemi, columns in (("left", "L", slice(0, n_left)), ("right", "R", slice(n_left, None))):
        stem = folder / f"{prefix}_hemi-{hemi}_space-{MESH}_bold"
        gifti[part], sidecars[part] = Path(f"{stem}.func.gii"), Path(f"{stem}.json")
        _write_gifti(gifti[part], vertices[:, columns], dataset.tr)
        _write_json(sidecars[part], {"RepetitionTime": dataset.tr, "StartTime": dataset.tr / 2.0,
                                     "TaskName": dataset.runs[0].task})
    cifti = folder / f"{prefix}_space-{MESH}_den-10k_bold.dtseries.nii"
    _write_cifti(cifti, np.hstack([vertices[:, index], voxels]), axis, dataset.tr)
    sidecars["cifti"] = folder / f"{prefix}_space-{MESH}_den-10k_bold.json"
    _write_json(sidecars["cifti"], {"RepetitionTime": dataset.tr, "StartTime": dataset.tr / 2.0,
                                    "TaskName": dataset.runs[0].task})
    return SurfaceRunFiles(prefix, gifti, sidecars, cifti)
