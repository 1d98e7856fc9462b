"""``chunkglm demo``: the whole pipeline that exists so far, on synthetic data.

1. Generate an fMRIPrep-like BIDS dataset with known effects
   (:mod:`chunkglm.testing`), reused when it is already there.
2. Start the cluster (a LocalCluster by default) and print its dashboard.
3. Convert every run into a cohort store, with progress.
4. Write one run back to NIfTI and check it equals the input inside the mask.
5. First-level GLM (AR(1), motion + CSF + white-matter confounds) for every
   subject in one graph; the derivatives/glm layout (``chunkglm first-level``'s
   default ``--layout glm``: one copy of each map, no residuals).
6. Group level: a one-sample test of the subjects' ``aMinusB`` effect maps
   with max-T permutation inference (``derivatives/glm/group_level``).
7. Image-based meta-analysis of the same effects and their variances
   (DerSimonianLaird, FDR-corrected; ``derivatives/meta``).
8. The surface branch: a small fsaverage5 subject set (fMRIPrep's GIFTI pairs,
   nilearn's packaged mesh, no download) converted into its own store, first
   level and group level (max-T permutations) in the same layout with GIFTI
   maps (``derivatives/glm_surface``).
9. An HTML report of every result (``chunkglm report``), each with the
   provenance record this demo wrote for it; prints the group report's path.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from chunkglm.cli._common import cluster_client, print_progress, resolve_cluster
from chunkglm.cli.first_level import model_contrasts
from chunkglm.cli.second_level import effect_maps, gifti_pair_map
from chunkglm.errors import InputError
from chunkglm.glm.first_level import first_level_from_bids, fitted_in_waves
from chunkglm.glm.io.surface_derivatives import save_surface_derivatives
from chunkglm.glm.second_level import SecondLevelModel, permutation_maps
from chunkglm.interfaces.bids import permutation_contrasts, save_glm_derivatives, save_group_derivatives
from chunkglm.io.bids import discover_runs
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.io.derivatives import source_datasets
from chunkglm.meta.correct import FDRCorrector
from chunkglm.meta.ibma import DerSimonianLaird
from chunkglm.provenance import Stopwatch, cluster_summary, record, write_record
from chunkglm.report import write_reports
from chunkglm.testing import make_synthetic_bids



def _dataset(out: Path, size: str, n_subjects: int) -> Path:
    """The synthetic BIDS root, generated once per (size, subjects)."""
    params = {"size": size, "n_subjects": n_subjects, "seed": 0}
    bids, stamp = out / "bids", out / "bids_params.json"
    if bids.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"reusing the synthetic dataset in {bids}")
        return bids
    for stale in (bids, out / "cohort.zarr", out / "derivatives", out / "roundtrip",  # made from old data
                  out / "bids_surface", out / "cohort_surface.zarr"):
        shutil.rmtree(stale, ignore_errors=True)
    start = time.perf_counter()
    make_synthetic_bids(bids, n_subjects=n_subjects, size=size, seed=0)
    stamp.write_text(json.dumps(params))
    print(f"synthetic BIDS dataset ({size}, {n_subjects} subjects): {bids} "
          f"[{time.perf_counter() - start:.1f} s]")
    return bids


def _check_round_trip(cohort, bids: Path, out: Path) -> Path:
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
GROUP_PERMUTATIONS = 1000


def _record(path: Path, operation: str, inputs, options, client, watch) -> None:
    """The provenance record a chunkglm command would leave (reports show it)."""
    write_record(path, record(operation, inputs=inputs, options=options, cluster=cluster_summary(client),
                              stopwatch=watch))


def _first_level(store: Path, out: Path, client) -> Path:
    """Fit every subject together, write derivatives; returns their folder."""
    start, watch = time.perf_counter(), Stopwatch()
    models, runs, events, confounds = first_level_from_bids(store, "main", confounds_columns=CONFOUNDS)
    for model, run_list, ev, conf in zip(models, runs, events, confounds):
        model.fit(run_list, events=ev, confounds=conf)
    target = out / "derivatives" / "glm"
    for model in fitted_in_waves(models):
        weights, types = model_contrasts(model, CONTRASTS)
        prefix = f"sub-{model.subject_label}_task-main"
        save_glm_derivatives(model, weights, target, task_label="main", contrast_types=types,
                             confounds=CONFOUNDS)  # as `chunkglm first-level` (--layout glm) writes
        _record(target / "first_level" / f"sub-{model.subject_label}" / f"{prefix}_provenance.json",
                "first-level (chunkglm demo)", [{"store": str(store), "run": name} for name in model._run_names],
                {"contrasts": CONTRASTS, "confounds": CONFOUNDS, "noise_model": model.noise_model}, client, watch)
    print(f"first-level GLM of {len(models)} subject(s) [{time.perf_counter() - start:.1f} s]")
    return target


def _group_level(glm: Path, subjects, paths, client) -> Path:
    """One-sample test of the aMinusB effects, max-T permutation FWE; returns group_level/."""
    start, watch = time.perf_counter(), Stopwatch()
    model = SecondLevelModel().fit(paths, design_matrix=pd.DataFrame({"intercept": [1.0] * len(paths)}))
    options = {"contrasts": {"aMinusB": "intercept"}, "fwe": "permutation", "n_perm": GROUP_PERMUTATIONS,
               "alpha": 0.05, "random_state": 0}
    settings = {"n_perm": GROUP_PERMUTATIONS, "random_state": 0, "tfce": False, "threshold": None,
                "two_sided_test": True}
    maps = {name: permutation_maps(model, con_val, **settings)
            for name, con_val in permutation_contrasts(model, options["contrasts"]).items()}
    save_group_derivatives(model, options["contrasts"], glm, permutation_maps=maps, permutation=settings)
    folder = glm / "group_level"
    _record(folder / "group_provenance.json", "second-level (chunkglm demo)",
            [{"subject": s, "path": p} for s, p in zip(subjects, paths)], options, client, watch)
    print(f"group level: one-sample test of {len(paths)} subjects, {GROUP_PERMUTATIONS} permutations "
          f"[{time.perf_counter() - start:.1f} s]")
    return folder


#: The surface branch: subjects, the space of their GIFTI runs, its permutations (a mesh of 20,484 vertices).
SURFACE_SUBJECTS, SURFACE_SPACE, SURFACE_PERMUTATIONS = 3, "fsaverage5", 200


def _surface_branch(out: Path, client) -> Path:
    """fsaverage5 GIFTI runs through conversion, first level and group level; returns derivatives/glm_surface."""
    start, watch = time.perf_counter(), Stopwatch()
    bids = out / "bids_surface"
    if not (bids / "dataset_description.json").is_file():
        make_synthetic_bids(bids, n_subjects=SURFACE_SUBJECTS, size="tiny", seed=0, surface=True)
    store = out / "cohort_surface.zarr"
    convert(bids, store, space=SURFACE_SPACE, client=client)
    models, runs, events, confounds = first_level_from_bids(store, "main", space_label=SURFACE_SPACE,
                                                            confounds_columns=CONFOUNDS)
    for model, run_list, ev, conf in zip(models, runs, events, confounds):
        model.fit(run_list, events=ev, confounds=conf)
    target = out / "derivatives" / "glm_surface"
    with source_datasets([bids]):
        for model in fitted_in_waves(models):
            weights, types = model_contrasts(model, {"aMinusB": CONTRASTS["aMinusB"]})
            save_surface_derivatives(model, weights, target, task_label="main", contrast_types=types,
                                     confounds=CONFOUNDS)  # as `chunkglm first-level --space fsaverage5`
            _record(target / "first_level" / f"sub-{model.subject_label}" /
                    f"sub-{model.subject_label}_task-main_provenance.json", "first-level (chunkglm demo, surface)",
                    [{"store": str(store), "run": name} for name in model._run_names],
                    {"contrasts": {"aMinusB": CONTRASTS["aMinusB"]}, "space": SURFACE_SPACE,
                     "confounds": CONFOUNDS}, client, watch)
        subjects, effects = effect_maps(target, "aMinusB")  # as `chunkglm second-level` reads them
        group = SecondLevelModel().fit([gifti_pair_map(p) for p in effects],
                                       design_matrix=pd.DataFrame({"intercept": [1.0] * len(effects)}))
        settings = {"n_perm": SURFACE_PERMUTATIONS, "random_state": 0, "tfce": False, "threshold": None,
                    "two_sided_test": True}
        maps = {name: permutation_maps(group, con_val, **settings)
                for name, con_val in permutation_contrasts(group, {"aMinusB": "intercept"}).items()}
        save_group_derivatives(group, {"aMinusB": "intercept"}, target, permutation_maps=maps, permutation=settings)
    _record(target / "group_level" / "group_provenance.json", "second-level (chunkglm demo, surface)",
            [{"subject": s, "path": p} for s, p in zip(subjects, effects)],
            {"contrasts": {"aMinusB": "intercept"}, "fwe": "permutation", "n_perm": SURFACE_PERMUTATIONS,
             "alpha": 0.05, "random_state": 0}, client, watch)
    print(f"surface branch: {len(models)} fsaverage5 subject(s), first and group level "
          f"[{time.perf_counter() - start:.1f} s]")
    return target


def _meta_analysis(glm: Path, subjects, effects, out: Path, client) -> Path:
    """DerSimonianLaird over the subjects' aMinusB effects and variances, FDR; returns meta/."""
    start, watch = time.perf_counter(), Stopwatch()
    table = pd.DataFrame({"beta": effects, "varcope": [p.replace("stat-effect", "stat-variance") for p in effects],
                          "study_id": subjects})
    estimator = DerSimonianLaird(mask=str(glm / "group_level" / "group_mask.nii.gz"))  # the group's voxels
    result = FDRCorrector(method="indep", alpha=0.05).transform(estimator.fit(table))
    folder = result.save_derivatives(out / "derivatives")["sidecar"].parent
    _record(folder / "provenance.json", "meta (chunkglm demo)", table.to_dict("records"),
            {"estimator": "DerSimonianLaird", "mask": "group_level/group_mask.nii.gz",
             "corrector": "FDRCorrector(method='indep', alpha=0.05)"},
            client, watch)
    print(f"meta-analysis: DerSimonianLaird over {len(table)} effect maps, FDR "
          f"[{time.perf_counter() - start:.1f} s]")
    return folder


def _reports(derivatives: Path) -> list[Path]:
    start = time.perf_counter()
    written = write_reports(derivatives, height_control="fpr", alpha=0.001, cluster_threshold=5)
    print(f"{len(written)} HTML report(s) [{time.perf_counter() - start:.1f} s]")
    return written


def dashboard_line(dashboard, scheduler) -> str:
    """The summary's dashboard entry, written after the work: a cluster the demo started is shut
    down by then (its link was printed when it started); a running scheduler's stays up."""
    if not dashboard:
        return "none (no cluster)"
    if scheduler is not None:
        return f"{dashboard} (the running scheduler's)"
    return f"closed with the demo's cluster (it was {dashboard} while the demo ran)"


def run_demo(out="demo_output", *, size="small", n_subjects=6, cluster="local") -> int:
    """Run the demo; returns an exit status.

    ``cluster``: a cluster config name, or the command's arguments (``--cluster``,
    ``--scheduler``, ``--workers``; see :func:`chunkglm.cli._common.cluster_client`).
    """
    if n_subjects < 3:
        raise InputError(f"the demo's group analysis needs at least 3 subjects; received --subjects {n_subjects}.")
    if "://" in str(out):
        raise InputError(f"the demo writes its synthetic dataset and results to a local folder; received "
                         f"-o {out}. Give a local folder (the other commands take s3:// outputs).")
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
        with source_datasets([bids]):  # dataset_description.json's SourceDatasets
            glm = _first_level(store, out, client)
            subjects, effects = effect_maps(glm, "aMinusB")  # the group's and the meta-analysis' inputs
            group = _group_level(glm, subjects, effects, client)
            meta = _meta_analysis(glm, subjects, effects, out, client)
        surface = _surface_branch(out, client)
    reports = _reports(out / "derivatives")
    group_report = next(p for p in reports if p.parent == group)
    print("\nResults")
    print(f"  BIDS input:        {bids}")
    print(f"  cohort store:      {store}  ({cohort!r})")
    print(f"  NIfTI round trip:  {roundtrip}")
    print(f"  first-level GLM:   {glm}  (first_level/sub-XX/: the derivatives/glm layout; "
          "`chunkglm first-level --layout nilearn|both` adds nilearn's save_glm_to_bids files)")
    print(f"  group level:       {group}")
    print(f"  meta-analysis:     {meta}")
    print(f"  surface branch:    {surface}  (fsaverage5 GIFTI maps: first_level/ and group_level/)")
    print(f"  reports:           {out / 'derivatives' / 'index.html'} (links the {len(reports)} pages)")
    print(f"  dashboard:         {dashboard_line(dashboard, resolve_cluster(cluster)[1])}")
    print(f"  inspect:           .venv/bin/chunkglm info {store}")
    print(f"\nGroup report: {group_report}")
    sys.stdout.flush()
    return 0
