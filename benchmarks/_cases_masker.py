"""Case ``masker``: region signals from 256 overlapping probabilistic maps, nilearn vs chunkglm.

One realistic run (``_data.synthetic_run``: MNI 2 mm, 300 volumes) and 256 Gaussian maps on
its grid (``_data.gaussian_atlas``); nilearn's ``MultiNiftiMapsMasker`` and chunkglm's
``MultiMapsMasker`` with the same arguments (its brain mask, standardize="zscore_sample",
detrend=True, t_r). Registered in ``_cases.CASES``.
"""

from __future__ import annotations

from _cases import CaseResult, Check, Row, _times
from _data import gaussian_atlas, synthetic_run
from _harness import Context, run_child

NIFTI_SPEEDUP = 5.0
STORE_SPEEDUP = 10.0
PEAK_FRACTION = 1 / 3  # chunkglm's peak RSS <= 1/3 of nilearn's


def masker_case(ctx: Context) -> CaseResult:
    if ctx.size != "realistic":
        raise SystemExit("masker has a realistic size only (MNI 2 mm, 300 volumes, 256 maps)")
    run = synthetic_run(ctx.data_dir, "realistic")
    atlas = gaussian_atlas(ctx.data_dir, 256)
    work = ctx.work_dir("masker")
    store, out = str(work / "run.zarr"), str(work / "signals")
    if ctx.round == 0:  # set-up, not measured: the run converted once per invocation
        ctx.setup["convert"] = run_child("convert", {"inputs": [run["bold"]], "store": store,
                                                       "mask_img": run["mask"]})
    common = {"bold": run["bold"], "mask": run["mask"], "maps": atlas["maps"], "out": out}
    node = run["bold"].rsplit("/", 1)[1].split("_space-")[0]
    m = {"floor": ctx.measure("floor_isal", path=run["bold"]),
         "nilearn": ctx.measure("masker_nilearn", **common),
         "nifti": ctx.measure("masker_chunkglm", label="chunkglm_nifti", **common),
         "store": ctx.measure("masker_chunkglm", label="chunkglm_store", store=store, nodes=[node], **common)}
    parity = {key: _parity(m["nilearn"].extra["signals"], m[key].extra["signals"]) for key in ("nifti", "store")}
    rows = [Row("floor: isal threaded-reader decompress of the run (reference)", m["floor"], "1.00× floor"),
            Row("anchor: nilearn MultiNiftiMapsMasker.fit_transform", m["nilearn"],
                _times(m["nilearn"].wall_s / m["floor"].wall_s, "floor"))]
    for key, label, target in (("nifti", "chunkglm MultiMapsMasker from the NIfTI (reads the file)", NIFTI_SPEEDUP),
                               ("store", "chunkglm MultiMapsMasker from the store", STORE_SPEEDUP)):
        speedup = m["nilearn"].wall_s / m[key].wall_s
        peak = m[key].peak_rss_mib / m["nilearn"].peak_rss_mib
        rows.append(Row(label, m[key], f"{speedup:.1f}× faster than nilearn; peak {peak:.2f}× nilearn's",
                        f"≥ {target:g}× faster; peak ≤ 1/3 of nilearn's",
                        [Check("speed-up", speedup >= target), Check("peak RSS", peak <= PEAK_FRACTION)]))
    facts = {"maps": atlas["maps"], "n_maps": atlas["n_maps"], "convert_s": ctx.setup["convert"]["wall_s"],
             "parity": parity}
    notes = [
        "Input: the realistic synthetic run (MNI 2 mm, 97×115×97, 300 volumes, float32 `.nii.gz`) and 256 "
        "Gaussian maps on its grid (σ = 6 mm, cut at 3σ, centres at random brain voxels, seed 3; neighbouring "
        "maps overlap). Both maskers: `mask_img=<the run's brain mask>, standardize=\"zscore_sample\", "
        "detrend=True, t_r=<TR>`, `fit_transform(<run>)`.",
        "chunkglm NIfTI row: the file is read volume by volume inside the call (timed; no resampling or "
        "smoothing is asked, so no temporary store is needed). Store row: "
        f"the run converted once before the first round ({facts['convert_s']:.1f} s, not timed). Peak RSS is "
        "the whole process, imports included.",
    ]
    after = [f"Parity (region signals, (300, 256)): {label} max |Δ| / max |nilearn| = {parity[key]['rel_max']:.2e}, "
             f"relative L2 {parity[key]['rel_l2']:.2e}." for key, label in (("nifti", "from the NIfTI"),
                                                                          ("store", "from the store"))]
    return CaseResult("masker", "region signals, 256 overlapping maps, one MNI 2 mm run: nilearn vs chunkglm",
                      facts, rows, notes, after)


def _parity(reference: str, candidate: str) -> dict:
    import numpy as np

    ref, ours = np.load(reference), np.load(candidate)
    return {"rel_max": float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))),
            "rel_l2": float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))}


SCALE_RUNS = (5, 20)
SCALE_MAPS = 1024
FLAT_TOLERANCE = 1.25


def masker_scale_case(ctx: Context) -> CaseResult:
    """A 1,024-map atlas over 5 and 20 runs of a store on 2 workers: flat worker memory."""
    from _data import linked_cohort

    if ctx.size != "realistic":
        raise SystemExit("masker_scale has a realistic size only")
    run = synthetic_run(ctx.data_dir, "realistic")
    atlas = gaussian_atlas(ctx.data_dir, SCALE_MAPS)
    work = ctx.work_dir("masker_scale")
    cohort = linked_cohort(run, work / "linked", max(SCALE_RUNS))
    store = str(work / "cohort.zarr")
    if ctx.round == 0:
        ctx.setup["convert"] = run_child("convert", {"inputs": cohort["root"], "store": store,
                                                     "mask_img": run["mask"]})
    common = {"bold": run["bold"], "mask": run["mask"], "maps": atlas["maps"], "out": str(work / "signals")}
    m, peak = {}, {}
    for n in SCALE_RUNS:
        m[n] = ctx.measure("masker_chunkglm", label=f"scale_{n}", store=store, nodes=cohort["runs"][:n],
                           n_workers=2, **common)
        peak[n] = max(max(m[n].extra["worker_vmhwm_mib"].values()), max(m[n].extra["worker_sampled_rss_mib"].values()))
    small, large = SCALE_RUNS
    rows = []
    for n in SCALE_RUNS:
        text, target, checks = f"worker peak {peak[n]:.0f} MiB; {m[n].wall_s / n:.1f} s per run", "—", []
        if n == large:
            ratio = peak[large] / peak[small]
            text += f"; {ratio:.2f}× the worker peak with {small} runs"
            target, checks = f"≤ {FLAT_TOLERANCE:g}× the {small}-run peak (flat)", [Check("flat worker memory",
                                                                                           ratio <= FLAT_TOLERANCE)]
        rows.append(Row(f"chunkglm MultiMapsMasker, {SCALE_MAPS:,} maps × {n} runs (store)", m[n], text, target, checks))
    facts = {"n_maps": SCALE_MAPS, "runs": list(SCALE_RUNS), "worker_peak_mib": peak,
             "convert_s": ctx.setup["convert"]["wall_s"]}
    notes = [f"Input: {max(SCALE_RUNS)} copies of the realistic run converted into one store (set-up, "
             f"{facts['convert_s']:.0f} s, brain mask), and {SCALE_MAPS:,} Gaussian maps on its grid "
             "(`_data.gaussian_atlas`, σ = 6 mm). Step: a LocalCluster of 2 worker processes × 1 thread "
             "(set-up); timed `MultiMapsMasker(maps, mask_img, standardize=\"zscore_sample\", detrend=True, "
             "t_r).fit_transform(<runs>)`. Worker peak: the larger of each worker's `VmHWM` and its RSS sampled "
             "every 0.2 s."]
    return CaseResult("masker_scale", f"region signals at scale: {SCALE_MAPS:,} maps over 5 vs 20 runs",
                      facts, rows, notes, [])
