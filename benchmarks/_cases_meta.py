"""Cases ``meta`` and ``meta_scale``: image-based meta-analysis, NiMARE vs chunkglm.

``meta``: K = 30 and K = 300 studies on the MNI 2 mm grid (``_data.meta_maps``: beta,
varcope, z, t NIfTI per study, sample sizes), NiMARE 0.22 (in ``.venv-nimare``) from the
NIfTI files, chunkglm from the same files and from a store. ``meta_dependence``: K = 60
images from 20 studies (dependence groups), NiMARE vs chunkglm from the NIfTI.
``meta_scale``: K = 1,000 and 10,000 z maps in a store, flat worker memory. Registered in
``_cases.CASES``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _cases import MiB, CaseResult, Check, Row
from _data import MANIFEST, meta_maps, meta_scale_store, second_level_maps
from _harness import Context, markdown_table, run_child

NIFTI_SPEEDUP = 5.0  # each estimator >= 5x faster than NiMARE from the same NIfTI inputs
STORE_SPEEDUP = 20.0  # >= 20x from a store
#: The issue's baseline estimators (NiMARE 0.22, K = 30, 2 cores: 10-25 s each).
ESTIMATORS = ("Fishers", "Stouffers", "WeightedLeastSquares", "DerSimonianLaird", "Hedges",
              "VarianceBasedLikelihood")
#: NiMARE at K = 300 takes ~10x its K = 30 time per estimator: the anchor runs the two
#: ends of the range there (a combination test and a likelihood estimator).
NIMARE_AT = {30: ESTIMATORS, 300: ("Fishers", "DerSimonianLaird")}
#: Parity on float32 maps (NiMARE casts its results to float32): closed forms agree to
#: rounding (~1e-7 relative); VarianceBasedLikelihood's tau2 comes from PyMARE's optimiser
#: grid on NiMARE's side (tests/test_meta_parity.py: <= 1e-4).
PARITY_TOLERANCE = {"VarianceBasedLikelihood": 1e-4}
SCALE_K = (1000, 10000)
FLAT_TOLERANCE = 1.25


def meta_case(ctx: Context) -> CaseResult:
    """Every baseline estimator at K = 30 and 300: NiMARE from NIfTI, chunkglm from NIfTI and from a store."""
    if ctx.size != "realistic":
        raise SystemExit("meta has a realistic size only (the MNI 2 mm grid of the issue)")
    m, data, parity, loads = {}, {}, {}, {}
    for k in (30, 300):
        data[k] = meta_maps(ctx.data_dir, k)
        work = ctx.work_dir(f"meta_{k}")
        store, out = str(work / "meta.zarr"), str(work / "maps")
        key = f"load_{k}"
        if ctx.round == 0:
            ctx.setup[key] = run_child("meta_load", {"table": data[k]["table"], "mask": data[k]["mask"],
                                                     "store": store})
        loads[k] = ctx.setup[key]
        common = {"mask": data[k]["mask"], "out": out}
        for est in ESTIMATORS:
            if est in NIMARE_AT[k]:
                m[(k, est, "nimare")] = ctx.measure("nimare_ibma", dataset=data[k]["nimare"], estimator=est,
                                                    label=f"_{k}", **common)
            m[(k, est, "nifti")] = ctx.measure("meta_chunkglm", estimator=est, table=data[k]["table"],
                                               label=f"_nifti_{k}", **common)
            m[(k, est, "store")] = ctx.measure("meta_chunkglm", estimator=est, store=store, node="meta",
                                               label=f"_store_{k}", **common)
            if est in NIMARE_AT[k]:
                parity[(k, est)] = _parity(m[(k, est, "nimare")].extra["maps"],
                                           m[(k, est, "store")].extra["maps"], data[k]["mask"])
    rows = _rows(m)
    facts = {"n_studies": [30, 300], "mask_voxels": data[30]["mask_voxels"],
             "store_load_s": {k: loads[k]["wall_s"] for k in loads},
             "store_mib": {k: loads[k]["store_mib"] for k in loads},
             "parity": {f"{k}/{est}": v for (k, est), v in parity.items()}}
    return CaseResult("meta", "image-based meta-analysis, K = 30 and 300 studies (MNI 2 mm), NiMARE vs chunkglm",
                      facts, rows, _notes(facts), _after(parity))


def _rows(m: dict) -> list[Row]:
    rows = []
    for k in (30, 300):
        for est in ESTIMATORS:
            anchor = m.get((k, est, "nimare"))
            if anchor is not None:
                rows.append(Row(f"K={k} {est}: anchor NiMARE 0.22 (NIfTI)", anchor, "1×"))
            for side, label, target in (("nifti", "chunkglm from the NIfTI (converts the maps it reads)",
                                         NIFTI_SPEEDUP),
                                        ("store", "chunkglm from the store (converted beforehand)", STORE_SPEEDUP)):
                measurement = m[(k, est, side)]
                if anchor is None:
                    rows.append(Row(f"K={k} {est}: {label}", measurement, "no anchor at this K (see notes)"))
                    continue
                speedup = anchor.wall_s / measurement.wall_s
                rows.append(Row(f"K={k} {est}: {label}", measurement, f"{speedup:.1f}× faster than NiMARE",
                                f"≥ {target:g}× faster", [Check("speed-up", speedup >= target)]))
    return rows


def _parity(reference: dict, candidate: dict, mask: str) -> dict:
    import nibabel as nib
    import numpy as np

    inside = np.asarray(nib.load(mask).dataobj) != 0
    out = {}
    for name in sorted(set(reference) & set(candidate)):
        ref = np.asarray(nib.load(reference[name]).dataobj, dtype=np.float64)[inside]
        ours = np.asarray(nib.load(candidate[name]).dataobj, dtype=np.float64)[inside]
        both = np.isfinite(ref) & np.isfinite(ours)
        denom = np.linalg.norm(ref[both]) or 1.0
        out[name] = {"rel_l2": float(np.linalg.norm((ours - ref)[both]) / denom),
                     "max_abs_diff": float(np.max(np.abs(ours - ref)[both], initial=0.0)),
                     "nonfinite_mismatch": int((np.isfinite(ref) != np.isfinite(ours)).sum())}
    return out


def _notes(facts: dict) -> list[str]:
    return [
        f"Input (`_data.meta_maps`): K studies on the MNI 2 mm grid ({facts['mask_voxels']:,} voxels in the "
        "ellipsoid mask, 0 outside), per study beta, varcope, z = t = beta / sqrt(varcope) float32 `.nii.gz` and "
        "a sample size (20..60): a smooth true effect, between-study variance 0.05, smooth noise.",
        "NiMARE rows: `nimare.dataset.Dataset(<json>, mask=<mask>)` (set-up), timed `ibma.<Estimator>().fit(dset)` "
        "(reads and masks the NIfTI), NiMARE 0.22 with nilearn 0.13 in `.venv-nimare`. chunkglm NIfTI rows: timed "
        "`ibma.<Estimator>(mask=<mask>).fit(<table of the same paths>)` + every map (`result.maps`): fit converts "
        "the map types the estimator reads into a temporary store, then one pass over it. Store rows: the same on "
        "`open_cohort(store).maps['meta']`, converted once before the first round (all four map types: "
        f"{', '.join(f'K={k} {s:.1f} s' for k, s in facts['store_load_s'].items())}), not timed.",
        "At K = 300 NiMARE runs Fishers and DerSimonianLaird only (each ~10× its K = 30 "
        "time, ~3-5 min each): a combination test and a moment estimator; chunkglm runs all six.",
    ]


def _after(parity: dict) -> list[str]:
    rows = []
    for (k, est), maps in parity.items():
        for name, p in maps.items():
            rows.append([f"K={k}", est, name, f"{p['rel_l2']:.2e}", f"{p['max_abs_diff']:.2e}",
                         str(p["nonfinite_mismatch"])])
    table = markdown_table(["K", "estimator", "map", "rel L2 vs NiMARE", "max abs diff", "finite on one side only"],
                           rows)
    return ["Parity with NiMARE over the mask (chunkglm from the store, last round):\n\n" + table]


#: The dependence-group case: 60 images from 20 studies (3 contrasts each).
DEPENDENCE_IMAGES, DEPENDENCE_STUDIES = 60, 20
#: A combination test (null correlation + group-level Stouffer), a moment estimator (correlated-effects
#: tau2, CR2, Satterthwaite) and a likelihood estimator (tau2 of the collapsed groups).
DEPENDENCE_ESTIMATORS = ("Stouffers", "DerSimonianLaird", "VarianceBasedLikelihood")


def meta_dependence_maps(data_dir: Path) -> dict:
    """60 images from 20 studies on the MNI 2 mm grid (the mask of ``_data.second_level_maps``),
    cached in ``<data-dir>/realistic/meta_dependence``.

    Study s (sample size n_s in [20, 60], shared by its 3 contrasts) has a smooth noise field
    shared by its contrasts; contrast c: ``varcope = v (1 + 0.5 tanh(field)) * 30 / n_s``,
    ``beta = effect_c + sqrt(varcope + 0.05) * (sqrt(0.6) shared_s + sqrt(0.4) own_c)``
    (within-study correlation 0.6), ``z = t = beta / sqrt(varcope)``; 0 outside the mask.
    Returns ``table`` (TSV: id, study_id, sample_sizes, beta, varcope, z, t), ``nimare`` (a
    Dataset JSON: 20 studies of 3 contrasts), ``mask``, ``mask_voxels``, ``generated_s``.
    """
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from scipy.ndimage import gaussian_filter

    folder = (Path(data_dir) / "realistic" / "meta_dependence").absolute()
    manifest = folder / MANIFEST
    if manifest.is_file():
        return {**json.loads(manifest.read_text()), "generated_s": 0.0}
    base = second_level_maps(data_dir, "realistic")
    (folder / "maps").mkdir(parents=True, exist_ok=True)
    print(f"generating {DEPENDENCE_IMAGES} images of {DEPENDENCE_STUDIES} studies in {folder} (once; cached) ...",
          flush=True)
    start = time.perf_counter()
    mask_img = nib.load(base["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(11)
    effect = np.zeros(mask.shape)
    for _ in range(5):
        effect[tuple(rng.integers(20, 75, 3))] = 1.0
    effect = gaussian_filter(effect, 4.0)
    effect *= 0.6 / effect.max()
    pool = [gaussian_filter(rng.standard_normal(mask.shape), 2.0) for _ in range(10)]
    pool = [(f / f[mask].std()).astype(np.float32) for f in pool]

    def field():
        a, b = rng.choice(len(pool), 2, replace=False)
        return (pool[a] * rng.standard_normal() + pool[b] * rng.standard_normal()) / np.sqrt(2)

    per_study = DEPENDENCE_IMAGES // DEPENDENCE_STUDIES
    rows, studies = [], {}
    for s in range(DEPENDENCE_STUDIES):
        study, n = f"study-{s + 1:03d}", int(rng.integers(20, 61))
        shared = field()
        for c in range(per_study):
            varcope = rng.uniform(0.5, 1.5) * (1 + 0.5 * np.tanh(pool[rng.integers(len(pool))])) * 30.0 / n
            beta = effect * (1.0 + 0.2 * c) + np.sqrt(varcope + 0.05) * (np.sqrt(0.6) * shared
                                                                         + np.sqrt(0.4) * field())
            z = beta / np.sqrt(varcope)
            paths = {}
            for name, values in (("beta", beta), ("varcope", varcope), ("z", z), ("t", z)):
                path = folder / "maps" / f"{study}_contrast-{c + 1}_{name}.nii.gz"
                nib.save(nib.Nifti1Image(np.where(mask, values, 0).astype(np.float32), mask_img.affine), path)
                paths[name] = str(path)
            rows.append({"id": f"{study}-{c + 1}", "study_id": study, "sample_sizes": n, **paths})
            studies.setdefault(study, {"contrasts": {}})["contrasts"][str(c + 1)] = {
                "images": dict(paths), "metadata": {"sample_sizes": [n]}}
    table = folder / "images.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    nimare = folder / "nimare_dataset.json"
    nimare.write_text(json.dumps(studies))
    info = {"table": str(table), "nimare": str(nimare), "mask": base["mask"], "mask_voxels": int(mask.sum())}
    manifest.write_text(json.dumps(info, indent=1))
    return {**info, "generated_s": time.perf_counter() - start}


def meta_dependence_case(ctx: Context) -> CaseResult:
    """K = 60 images from 20 studies: NiMARE 0.22 vs chunkglm from the same NIfTI, dependence groups modelled."""
    if ctx.size != "realistic":
        raise SystemExit("meta_dependence has a realistic size only (the MNI 2 mm grid)")
    data = meta_dependence_maps(ctx.data_dir)
    out = str(ctx.work_dir("meta_dependence") / "maps")
    m, parity, rows = {}, {}, []
    for est in DEPENDENCE_ESTIMATORS:
        m[(est, "nimare")] = ctx.measure("nimare_ibma", dataset=data["nimare"], estimator=est, mask=data["mask"],
                                         out=out, label="_dependence")
        m[(est, "nifti")] = ctx.measure("meta_chunkglm", estimator=est, table=data["table"], mask=data["mask"],
                                        out=out, label="_dependence")
        parity[est] = _parity(m[(est, "nimare")].extra["maps"], m[(est, "nifti")].extra["maps"], data["mask"])
    for est in DEPENDENCE_ESTIMATORS:
        anchor, ours = m[(est, "nimare")], m[(est, "nifti")]
        speedup = anchor.wall_s / ours.wall_s
        rows.append(Row(f"{est}: anchor NiMARE 0.22 (NIfTI)", anchor, "1×"))
        rows.append(Row(f"{est}: chunkglm from the NIfTI (converts the maps it reads)", ours,
                        f"{speedup:.1f}× faster than NiMARE", f"≥ {NIFTI_SPEEDUP:g}× faster",
                        [Check("speed-up", speedup >= NIFTI_SPEEDUP)]))
    facts = {"n_images": DEPENDENCE_IMAGES, "n_studies": DEPENDENCE_STUDIES, "mask_voxels": data["mask_voxels"],
             "parity": {est: v for est, v in parity.items()}}
    notes = [
        f"Input (`_cases_meta.meta_dependence_maps`): {DEPENDENCE_IMAGES} images from {DEPENDENCE_STUDIES} studies "
        f"(3 contrasts each, one sample size per study, noise correlated 0.6 within a study) on the MNI 2 mm grid "
        f"({data['mask_voxels']:,} voxels in the mask); beta, varcope, z = t float32 `.nii.gz`.",
        "Both sides group the images by study (NiMARE 0.22's default `groupby=None`): Stouffers estimates the null "
        "correlation between the images (a global pass) and combines one standardised mean per study; "
        "DerSimonianLaird and VarianceBasedLikelihood use PyMARE's rescaled weights, CR2 errors and Satterthwaite "
        "dof. NiMARE rows: `Dataset(<json>, mask=<mask>)` (set-up), timed `ibma.<Estimator>().fit(dset)`. chunkglm "
        "rows: timed `ibma.<Estimator>(mask=<mask>).fit(<table>)` + every map (converts the map types it reads "
        "into a temporary store, then the graph).",
    ]
    after = []
    for est, maps in parity.items():
        for name, p in maps.items():
            after.append([est, name, f"{p['rel_l2']:.2e}", f"{p['max_abs_diff']:.2e}", str(p["nonfinite_mismatch"])])
    table = markdown_table(["estimator", "map", "rel L2 vs NiMARE", "max abs diff", "finite on one side only"], after)
    return CaseResult("meta_dependence", "IBMA with dependence groups: 60 images from 20 studies (MNI 2 mm), "
                      "NiMARE vs chunkglm", facts, rows, notes, ["Parity with NiMARE over the mask:\n\n" + table])


def meta_scale_case(ctx: Context) -> CaseResult:
    """K = 1,000 and 10,000 z maps in a store, Stouffers and Fishers on 2 workers: flat worker memory."""
    if ctx.size != "realistic":
        raise SystemExit("meta_scale has a realistic size only")
    m, stores, peak = {}, {}, {}
    for k in SCALE_K:
        stores[k] = meta_scale_store(ctx.data_dir, k)
        for est in ("Stouffers", "Fishers"):
            m[(k, est)] = ctx.measure("meta_scale", store=stores[k]["store"], node=stores[k]["node"], estimator=est)
            peak[(k, est)] = max(max(m[(k, est)].extra["worker_vmhwm_mib"].values()),
                                 max(m[(k, est)].extra["worker_sampled_rss_mib"].values()))
    rows = []
    small, large = SCALE_K
    for est in ("Stouffers", "Fishers"):
        for k in SCALE_K:
            text = f"worker peak {peak[(k, est)]:.0f} MiB"
            checks, target = [], "—"
            if k == large:
                ratio = peak[(k, est)] / peak[(small, est)]
                text += f"; {ratio:.2f}× the worker peak at K={small:,}"
                target = f"≤ {FLAT_TOLERANCE:g}× K={small:,}'s (flat)"
                checks = [Check("flat worker memory", ratio <= FLAT_TOLERANCE)]
            rows.append(Row(f"chunkglm {est}, K={k:,} z maps (store {stores[k]['store_gib']:.1f} GiB)", m[(k, est)],
                            text, target, checks))
    facts = {"n_maps": list(SCALE_K), "store_gib": {k: stores[k]["store_gib"] for k in stores},
             "worker_peak_mib": {f"{k}/{e}": v for (k, e), v in peak.items()}}
    notes = [
        "Input: `maps/scale` nodes of K z maps written straight into a store (`_data.meta_scale_store`: the "
        "235,413 voxels of the MNI 2 mm mask, float32, 64 MiB chunks; a `sample_sizes` coordinate).",
        "Step: a LocalCluster of 2 worker processes × 1 thread (set-up); timed: `ibma.<Estimator>().fit(<node>)` "
        "and its maps. Worker peak: the larger of each worker's `VmHWM` and its RSS sampled every 0.2 s. A voxel "
        "block holds every study but its width is sized to the same budget, so 10× the studies is 10× the blocks.",
    ]
    return CaseResult("meta_scale", "IBMA scale: 1,000 vs 10,000 z maps, flat worker memory", facts, rows, notes, [])
