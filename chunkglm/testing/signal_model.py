"""What the synthetic volume and surface datasets share: the signal model's constants, the AR(1)
noise generator and the JSON sidecar writer (:mod:`chunkglm.testing.synthetic`,
:mod:`chunkglm.testing.surface`)."""

from __future__ import annotations

import json

import numpy as np

MNI_2MM_AFFINE = np.array(
    [[2.0, 0, 0, -96], [0, 2.0, 0, -132], [0, 0, 2.0, -78], [0, 0, 0, 1]]
)
BASELINE_MEAN = 1000.0  # signal units
BASELINE_VARIATION = 0.1  # baseline spans BASELINE_MEAN * (1 +/- 0.1)
BETA_PEAK_RANGE = (0.02, 0.03)  # blob peak as a fraction of local baseline
BLOBS_PER_CONDITION = 2
BLOB_TRUNCATION = 2.5  # blobs are zero beyond this many sigmas
DEFAULT_NOISE_SD = 10.0  # signal units (1 % of the baseline)
DRIFT_SD = 10.0  # sd of the per-voxel drift amplitudes, signal units


def ar1_inplace(eps, rho, sd) -> None:
    """Turn i.i.d. N(0, 1) ``eps`` (time, voxel) into stationary AR(1)
    noise of sd ``sd`` in place; ``rho``, ``sd``: (voxel,) float32."""
    innov = (sd * np.sqrt(1 - rho**2)).astype(np.float32)
    eps[0] *= sd
    for t in range(1, eps.shape[0]):
        eps[t] *= innov
        eps[t] += rho * eps[t - 1]


def write_json(path, obj) -> None:
    """A sidecar: sorted keys, indented, one trailing newline (byte-identical per content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
