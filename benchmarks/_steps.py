"""Measured steps: each runs alone in a fresh child process.

Usage (the runner does this; by hand only to debug one step)::

    python benchmarks/_steps.py STEP '{"json": "keyword arguments"}'

A step function receives a :class:`Timed` context manager and its keyword
arguments. Everything before ``with timed:`` is set-up (imports, deleting an
old store) and is not measured; the block under ``with timed:`` is the work.
The child prints one line ``BENCH-RESULT {json}`` with

- ``wall_s``: ``time.perf_counter()`` around the work only;
- ``rss_start_mib``: resident memory when the work starts (interpreter plus
  imports: the baseline included in the peak);
- ``peak_rss_mib``: ``ru_maxrss`` of this process right after the work (the
  peak over the whole process life, imports included);
- whatever the step returns (checksums, sizes).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH-RESULT "
READ_BYTES = 8 * 2**20  # the floor reads 8 MiB blocks, as chunkglm's reader does
STEPS = {}


def step(name):
    """Register a step function under ``name``."""
    def register(fn):
        STEPS[name] = fn
        return fn
    return register


class Timed:
    """Context manager: wall time, RSS at start and peak RSS of the work."""

    def __enter__(self):
        self.rss_start_mib = _current_rss_mib()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._start
        self.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return False

    def record(self) -> dict:
        return {"wall_s": self.wall_s, "rss_start_mib": self.rss_start_mib, "peak_rss_mib": self.peak_rss_mib}


def _current_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fingerprint(block) -> dict:
    """Shape and sha256 of a (time, voxel) block as C-ordered float32."""
    import numpy as np

    data = np.ascontiguousarray(block, dtype=np.float32)
    return {"block_shape": list(data.shape), "block_sha256": hashlib.sha256(data.tobytes()).hexdigest()[:16]}


def _drain(handle) -> int:
    """Read a stream to its end through one reused 8 MiB buffer."""
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    total = 0
    while n := handle.readinto(view):
        total += n
    return total


# --- the floor: decompress the input once, keep nothing ---------------------

@step("floor_isal")
def floor_isal(timed, path):
    """ISA-L's threaded reader (file reads overlap decompression): the
    fastest gzip reader installed, slightly ahead of single-threaded igzip."""
    from isal import igzip_threaded

    with timed:
        with igzip_threaded.open(path, "rb", threads=1) as handle:
            n_bytes = _drain(handle)
    return {"decompressed_bytes": n_bytes}


@step("floor_gzip")
def floor_gzip(timed, path):
    import gzip

    with timed:
        with gzip.open(path, "rb") as handle:
            n_bytes = _drain(handle)
    return {"decompressed_bytes": n_bytes}


# --- the anchor: nibabel as nilearn uses it ---------------------------------

@step("anchor_read")
def anchor_read(timed, bold, mask, start, stop):
    """Load, full data as float32, mask (-> time x voxel), one voxel block."""
    import nibabel as nib
    import numpy as np

    with timed:
        data = np.asarray(nib.load(bold).dataobj, dtype=np.float32)
        in_mask = np.asarray(nib.load(mask).dataobj) != 0
        series = data[in_mask].T  # (time, voxel), as nilearn's apply_mask
        block = np.ascontiguousarray(series[:, start:stop])
    return fingerprint(block)


# --- chunkglm ---------------------------------------------------------------

@step("convert")
def convert(timed, inputs, store, task_memory=None):
    """``chunkglm.convert`` into a fresh store, in this process (client=None).

    ``task_memory=None`` keeps chunkglm's default.
    """
    _import_convert_dependencies()
    from chunkglm.io.convert import convert as chunkglm_convert

    options = {} if task_memory is None else {"task_memory": task_memory}
    shutil.rmtree(store, ignore_errors=True)
    with timed:
        report = chunkglm_convert(inputs, store, client=None, **options)
    return {"converted": report.converted, "store_mib": _tree_bytes(store) / 2**20}


def _import_convert_dependencies():
    """Modules convert imports lazily: imports are not the work measured."""
    import fsspec  # noqa: F401  (events / confounds tables)
    import isal.igzip  # noqa: F401
    import numcodecs.blosc  # noqa: F401
    import pandas  # noqa: F401
    import zarr  # noqa: F401

    try:  # convert looks for an active dask client when none is given
        import distributed  # noqa: F401
    except ImportError:
        pass


def _tree_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@step("read_zarr")
def read_zarr(timed, store, node):
    """The first chunk of ``runs/<node>/bold`` (all time points), via zarr."""
    import zarr

    block = zarr.open_group(store, mode="r")[f"runs/{node}/bold"].chunks[1]
    with timed:
        array = zarr.open_group(store, mode="r")[f"runs/{node}/bold"]
        data = array[:, 0:block]
    return {**fingerprint(data), "start": 0, "stop": int(data.shape[1])}


@step("read_cohort")
def read_cohort(timed, store, node, start, stop):
    """The same block via ``open_cohort(store).runs[node].data()[:, block].values``."""
    import dask.array  # noqa: F401

    from chunkglm.io.cohort import open_cohort

    with timed:
        data = open_cohort(store).runs[node].data()[:, start:stop].values
    return fingerprint(data)


# --- case "first_level": nilearn vs chunkglm, fit + one contrast -----------

#: The confounds both sides regress out: the 6 motion parameters, CSF and
#: white matter (no n/a in these columns).
CONFOUND_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "csf", "white_matter"]
#: FirstLevelModel parameters, identical for nilearn and chunkglm.
GLM_PARAMS = {"t_r": 2.0, "slice_time_ref": 0.5, "noise_model": "ar1"}
CONTRAST = "a - b"


def _glm_inputs(events, confounds):
    """The events table as given and the chosen confound columns (set-up, untimed)."""
    import pandas as pd

    events_df = pd.read_csv(events, sep="\t", na_values="n/a")
    confounds_df = pd.read_csv(confounds, sep="\t", na_values="n/a")[CONFOUND_COLUMNS]
    return events_df, confounds_df


def _save_maps(maps: dict, out: str, label: str) -> dict:
    """Save the z and effect maps (for the parity check) after the timed work."""
    import nibabel as nib
    import numpy as np

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in ("z_score", "effect_size"):
        path = folder / f"{label}_{name}.nii"
        image = maps[name]
        nib.save(nib.Nifti1Image(np.asarray(image.get_fdata(), dtype=np.float64), image.affine), path)
        saved[name] = str(path)
    return saved


@step("glm_nilearn")
def glm_nilearn(timed, bold, mask, events, confounds, out):
    """nilearn's FirstLevelModel on the NIfTI file: fit + compute_contrast(all)."""
    from nilearn.glm.first_level import FirstLevelModel

    events_df, confounds_df = _glm_inputs(events, confounds)
    model = FirstLevelModel(mask_img=mask, **GLM_PARAMS)
    with timed:
        model.fit(bold, events=events_df, confounds=confounds_df)
        maps = model.compute_contrast(CONTRAST, output_type="all")
    design = model.design_matrices_[0]
    return {"maps": _save_maps(maps, out, "nilearn"), "design_columns": list(design.columns)}


@step("glm_chunkglm")
def glm_chunkglm(timed, mask, events, confounds, out, label, bold=None, store=None, node=None):
    """chunkglm's FirstLevelModel, fit + compute_contrast(all), on either

    - ``bold``: the NIfTI path (fit converts it into a temporary store: timed), or
    - ``store`` + ``node``: a store converted beforehand (opening it is set-up).
    """
    _import_convert_dependencies()
    import dask.array  # noqa: F401
    import nilearn.glm.contrasts  # noqa: F401  (contrast arithmetic, used lazily)
    import nilearn.image  # noqa: F401
    import xarray  # noqa: F401

    from chunkglm.glm.first_level import FirstLevelModel
    from chunkglm.io.cohort import open_cohort

    events_df, confounds_df = _glm_inputs(events, confounds)
    model = FirstLevelModel(mask_img=mask, **GLM_PARAMS)
    opened = time.perf_counter()
    run = bold if store is None else open_cohort(store).runs[node]
    open_s = time.perf_counter() - opened
    with timed:
        model.fit(run, events=events_df, confounds=confounds_df)
        maps = model.compute_contrast(CONTRAST, output_type="all")
    design = model.design_matrices_[0]
    return {"maps": _save_maps(maps, out, label), "design_columns": list(design.columns),
            "open_store_s": open_s if store is not None else None}


def main(argv) -> None:
    name, kwargs = argv[1], json.loads(argv[2]) if len(argv) > 2 else {}
    timed = Timed()
    extra = STEPS[name](timed, **kwargs) or {}
    print(RESULT_PREFIX + json.dumps({"step": name, **timed.record(), **extra}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
