"""What a worker process imports to run chunkglm's tasks.

Each dask worker process imports the modules of the functions and objects it unpickles. The
conversion task (``chunkglm.io.convert._task`` with a ``RunJob``/``MapsJob``) and the first-level
fit tasks (``chunkglm.graph``, ``chunkglm.kernels``, the store readers) need numpy, zarr and
nibabel; nilearn's image and surface modules bring scikit-learn and scipy.stats (~100 MiB
resident per process, measured on ``chunkglm app``'s workers: 275 -> 200 MiB peak). They are
imported only where a run is resampled or smoothed, or surface inputs are converted. The
fixed-effects tasks of ``chunkglm app``'s subject/session nodes compute nilearn's t -> z with
``scipy.special`` rather than nilearn's ``Contrast`` (whose module brings scikit-learn and
``scipy.stats``: a worker's import 109 -> 208 MiB).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("nilearn", "sklearn", "matplotlib", "bids", "scipy.stats")
#: the modules whose functions and objects the conversion and fit tasks carry
CONVERSION = ("chunkglm.io.convert", "chunkglm.io.write_run", "chunkglm.io.write_maps", "chunkglm.io.preprocess")
FIT = ("chunkglm.graph.glm", "chunkglm.graph.blocks", "chunkglm.graph.reduce", "chunkglm.kernels.glm",
       "chunkglm.kernels.ar", "chunkglm.io.layout", "chunkglm.io.backends")
#: the fixed-effects tasks (chunkglm app's "meta" nodes) and the store they read and write
FIXED_EFFECTS = ("chunkglm.graph.fixed_effects", "chunkglm.kernels.fixed_effects", "chunkglm.io.layout")


def _imported(modules) -> list[str]:
    code = (f"import importlib, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
            f"print(sorted(n for n in {HEAVY!r} if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(done.stdout.strip())  # a list of names printed by the line above


@pytest.mark.parametrize("modules", [CONVERSION, FIT, FIXED_EFFECTS], ids=["conversion", "fit", "fixed_effects"])
def test_worker_task_modules_leave_nilearn_out(modules):
    assert _imported(modules) == []


def test_preprocessing_still_reaches_nilearn(tmp_path):
    """Smoothing while converting imports nilearn.image when it is used, and smooths as it does."""
    import nibabel as nib
    import numpy as np
    from nilearn.image import smooth_img

    from chunkglm.io.preprocess import SpatialPreprocessing

    volume = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    ours = SpatialPreprocessing(smoothing_fwhm=6.0).apply(volume, affine)
    theirs = np.asarray(smooth_img(nib.Nifti1Image(volume, affine), 6.0).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(ours, theirs)  # the same nilearn call on the same input
