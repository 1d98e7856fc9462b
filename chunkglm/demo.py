"""``chunkglm demo``: the whole pipeline that exists so far, on synthetic data.

1. Generate an fMRIPrep-like BIDS dataset with known effects
   (:mod:`chunkglm.testing`), reused when it is already there.
2. Start the cluster (a LocalCluster by default) and print its dashboard.
3. Convert every run into a cohort store, with progress.
4. Write one run back to NIfTI and check it equals the input inside the mask.
5. First-level GLM (AR(1), motion + CSF + white-matter confounds) for every
   subject in one graph; nilearn-style BIDS outputs and the derivatives/glm
   layout, and how well the known effect is recovered.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def _dataset(out: Path, size: str, n_subjects: int) -> Path:
    """The synthetic BIDS root, generated once per (size, subjects)."""
    from chunkglm.testing import make_synthetic_bids

    params = {"size": size, "n_subjects": n_subjects, "seed": 0}
    bids, stamp = out / "bids", out / "bids_params.json"
    if bids.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"reusing the synthetic dataset in {bids}")
        return bids
    shutil.rmtree(bids, ignore_errors=True)
    start = time.perf_counter()
    make_synthetic_bids(bids, n_subjects=n_subjects, size=size, seed=0)
    stamp.write_text(json.dumps(params))
    print(f"synthetic BIDS dataset ({size}, {n_subjects} subjects): {bids} "
          f"[{time.perf_counter() - start:.1f} s]")
    return bids


def _check_round_trip(cohort, bids: Path, out: Path) -> Path:
    from chunkglm.io.bids import discover_runs

    run = discover_runs(bids)[0]
    path = out / "roundtrip" / f"{run.name}_desc-roundtrip_bold.nii.gz"
    node = cohort.runs[run.name]
    node.to_nifti(path)
    mask = node.grid.mask
    same = np.array_equal(nib.load(path).get_fdata(dtype=np.float32)[mask],
                          np.asarray(nib.load(run.bold).dataobj, dtype=np.float32)[mask])
    print(f"round trip store -> NIfTI bit-exact inside the mask: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(f"round trip differs for {run.name}")
    return path


CONFOUNDS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "csf", "white_matter"]
CONTRASTS = {"aMinusB": "a - b", "effectsOfInterest": "a; b"}


def _first_level(store: Path, out: Path) -> Path:
    """Fit every subject together, write derivatives; returns their folder."""
    from chunkglm.cli.first_level import model_contrasts
    from chunkglm.glm.first_level import first_level_from_bids, fitted_in_waves
    from chunkglm.interfaces.bids import save_glm_derivatives, save_glm_to_bids

    start = time.perf_counter()
    models, runs, events, confounds = first_level_from_bids(store, "main", confounds_columns=CONFOUNDS)
    for model, run_list, ev, conf in zip(models, runs, events, confounds):
        model.fit(run_list, events=ev, confounds=conf)
    target = out / "derivatives" / "glm"
    for model in fitted_in_waves(models):
        weights, types = model_contrasts(model, CONTRASTS)
        save_glm_to_bids(model, weights, contrast_types=types, out_dir=target,
                         prefix=f"sub-{model.subject_label}_task-main")
        save_glm_derivatives(model, weights, target, task_label="main", contrast_types=types,
                             confounds=CONFOUNDS)
    print(f"first-level GLM of {len(models)} subject(s) [{time.perf_counter() - start:.1f} s]")
    return target


def run_demo(out="demo_output", *, size="small", n_subjects=4, cluster="local") -> int:
    """Run the demo; returns an exit status."""
    from chunkglm.cli.main import cluster_client, print_progress
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.convert import convert

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    bids = _dataset(out, size, n_subjects)
    store = out / "cohort.zarr"
    with cluster_client(cluster) as client:
        dashboard = getattr(client, "dashboard_link", None)
        start = time.perf_counter()
        report = convert(bids, store, client=client, progress=print_progress)
        print(f"converted {len(report.converted)} run(s), skipped {len(report.skipped)} "
              f"already complete [{time.perf_counter() - start:.1f} s]")
        cohort = open_cohort(store)
        roundtrip = _check_round_trip(cohort, bids, out)
        glm = _first_level(store, out)
    print("\nResults")
    print(f"  BIDS input:        {bids}")
    print(f"  cohort store:      {store}  ({cohort!r})")
    print(f"  NIfTI round trip:  {roundtrip}")
    print(f"  first-level GLM:   {glm}  (sub-XX/: nilearn's save_glm_to_bids files; "
          "first_level/: derivatives/glm layout)")
    print(f"  dashboard:         {dashboard or 'none (no cluster)'}")
    print(f"  inspect:           .venv/bin/chunkglm info {store}")
    sys.stdout.flush()
    return 0
