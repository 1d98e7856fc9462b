"""Cases ``meta`` and ``meta_scale``: image-based meta-analysis, NiMARE vs chunkglm.

``meta``: K = 30 and K = 300 studies on the MNI 2 mm grid (``_data.meta_maps``: beta,
varcope, z, t NIfTI per study, sample sizes), NiMARE 0.22 (in ``.venv-nimare``) from the
NIfTI files, chunkglm from the same files and from a store. ``meta_scale``: K = 1,000 and
10,000 z maps in a store, flat worker memory. Registered in ``_cases.CASES``.
"""

from __future__ import annotations

from _cases import MiB, CaseResult, Check, Row
from _data import meta_maps, meta_scale_store
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
