"""Benchmark inputs: synthetic BIDS datasets, generated once and cached.

A dataset lives in ``<data-dir>/<size>/bids``; ``manifest.json`` next to it
is written last, so a generation cut off half-way is redone, never reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"


def synthetic_run(data_dir: Path, size: str) -> dict:
    """Paths of the one-run synthetic dataset of ``size`` (generated if absent).

    Returns a dict with ``root``, ``bold``, ``mask`` (str paths), ``size``
    and ``generated_s`` (0 when reused from the cache).
    """
    folder = Path(data_dir) / size
    manifest = folder / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if all(Path(info[key]).exists() for key in ("root", "bold", "mask")):
            return {**info, "generated_s": 0.0}
    return _generate(folder, size)


def _generate(folder: Path, size: str) -> dict:
    from chunkglm.testing import make_synthetic_bids

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"generating the synthetic {size!r} dataset in {folder} (once; cached) ...", flush=True)
    start = time.perf_counter()
    dataset = make_synthetic_bids(folder / "bids", n_subjects=1, size=size, seed=0, dtype="float32")
    run = dataset.runs[0]
    info = {"root": str(Path(dataset.root).absolute()), "bold": str(Path(run.bold_path).absolute()),
            "mask": str(Path(run.mask_path).absolute()), "size": size}
    (folder / MANIFEST).write_text(json.dumps(info, indent=1))
    return {**info, "generated_s": time.perf_counter() - start}


def run_tables(run: dict) -> dict:
    """The events and confounds TSVs of the one run of :func:`synthetic_run`.

    ``events``: the raw BIDS ``*_events.tsv`` under ``<root>/sub-*/func``;
    ``confounds``: fMRIPrep's ``*_desc-confounds_timeseries.tsv`` next to the
    preprocessed bold file.
    """
    prefix = Path(run["bold"]).name.split("_space-")[0]  # sub-01_task-main_run-1
    events = sorted(Path(run["root"]).glob(f"sub-*/**/func/{prefix}_events.tsv"))
    confounds = sorted(Path(run["bold"]).parent.glob(f"{prefix}_desc-confounds_timeseries.tsv"))
    if len(events) != 1 or len(confounds) != 1:
        raise FileNotFoundError(f"expected one events and one confounds table for {prefix}; "
                                f"found {events} and {confounds}")
    return {"events": str(events[0]), "confounds": str(confounds[0])}
