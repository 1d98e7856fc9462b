"""Case ``second_level``: group GLM and max-T permutations, nilearn vs chunkglm.

N subject maps on the MNI 2 mm grid (``_data.second_level_maps``), design
``covariate`` + ``intercept``, contrast ``"covariate"``. Registered in
``_cases.CASES``; see benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path

from _cases import MiB, CaseResult, Check, Row, _times, map_parity
from _data import second_level_maps
from _harness import Context, markdown_table, run_child

PARAMETRIC_SPEEDUP = 5.0  # chunkglm fit + contrast >= 5x faster than nilearn's
PERMUTATION_SPEEDUP = 20.0  # chunkglm max-T >= 20x faster per permutation than nilearn's
#: Permutations per side: nilearn needs only enough to time one permutation
#: (~0.4 s each on 2 cores, realistic); chunkglm runs the issue's >= 1,000.
N_PERM = {"realistic": {"nilearn": 20, "chunkglm": 1000}, "small": {"nilearn": 10, "chunkglm": 200}}
#: logp voxels compared for the same permutations: both maps are float32 images of
#: values <= log10(n_perm + 1), so rounding stays below ~1e-7; a difference above
#: this means a different null (other permutations), not rounding.
LOGP_TOLERANCE = 1e-6
#: Whole-volume permutation tests (TFCE; cluster mass at a cluster-forming p of 0.001):
#: nilearn labels / integrates every permuted volume in Python-level loops (seconds per
#: permutation at 235k voxels), so it gets fewer; the same count on both sides is the parity run.
VOLUME_N_PERM = {"realistic": {"nilearn": 10, "chunkglm": 100}, "small": {"nilearn": 5, "chunkglm": 20}}
VOLUME_TESTS = {"tfce": {"tfce": True}, "mass": {"threshold": 0.001}}


def second_level_case(ctx: Context) -> CaseResult:
    """Parametric fit + contrast and max-T permutations on N maps, nilearn vs chunkglm."""
    data = second_level_maps(ctx.data_dir, ctx.size)
    work = ctx.work_dir("second_level")
    store, out = str(work / "maps.zarr"), str(work / "maps")
    folder = str(Path(data["maps"][0]).parent)  # steps take the folder (sub-*_effect.nii.gz, design order)
    common = {"mask": data["mask"], "design": data["design"], "out": out}
    if ctx.round == 0:  # set-up, not measured: load the maps into a store once per invocation
        ctx.setup["load"] = run_child("second_level_load", {"maps": folder, "mask": data["mask"],
                                                            "design": data["design"], "store": store})
    node = ctx.setup["load"]["node"]
    n_perm = N_PERM[ctx.size]

    m = {"floor": ctx.measure("floor_maps", maps=folder),
         "nilearn": ctx.measure("second_level_nilearn", maps=folder, **common),
         "nifti": ctx.measure("second_level_chunkglm", label="chunkglm_nifti", maps=folder, **common),
         "store": ctx.measure("second_level_chunkglm", label="chunkglm_store", store=store, node=node, **common)}
    for side, args in (("nilearn", {"maps": folder}), ("chunkglm", {"store": store, "node": node})):
        for count in sorted({1, n_perm["nilearn"], n_perm[side]}):
            m[(side, count)] = ctx.measure(f"permutation_{side}", n_perm=count, **args, **common)

    volume_n_perm = VOLUME_N_PERM[ctx.size]
    for test, options in VOLUME_TESTS.items():
        for side, args in (("nilearn", {"maps": folder}), ("chunkglm", {"store": store, "node": node})):
            for count in sorted({1, volume_n_perm["nilearn"], volume_n_perm[side]}):
                m[(test, side, count)] = ctx.measure(f"permutation_{side}", n_perm=count, **options, **args,
                                                     **common)

    parity = {key: map_parity(m["nilearn"].extra["maps"], m[key].extra["maps"], data["mask"])
              for key in ("nifti", "store")}
    same_volume = volume_n_perm["nilearn"]
    for test in VOLUME_TESTS:
        parity[test] = _volume_parity(m[(test, "nilearn", same_volume)].extra[f"logp_{test}"],
                                      m[(test, "chunkglm", same_volume)].extra[f"logp_{test}"], data["mask"])
    volume_per_perm = {test: {side: _per_permutation({(side, c): m[(test, side, c)]
                                                      for c in {1, volume_n_perm[side]}}, side, volume_n_perm[side])
                              for side in ("nilearn", "chunkglm")} for test in VOLUME_TESTS}
    for key in ("nifti", "store"):
        parity[key]["t"] = _volume_parity(m["nilearn"].extra["stat"], m[key].extra["stat"], data["mask"])
    same = n_perm["nilearn"]
    parity["logp"] = _volume_parity(m[("nilearn", same)].extra["logp"], m[("chunkglm", same)].extra["logp"],
                                    data["mask"])
    per_perm = {side: _per_permutation(m, side, n_perm[side]) for side in ("nilearn", "chunkglm")}
    facts = {**{k: data[k] for k in ("n_maps", "shape", "mask_voxels")},
             "store_load_s": ctx.setup["load"]["wall_s"], "store_bytes": ctx.setup["load"]["store_mib"] * MiB,
             "n_perm": n_perm, "per_permutation_s": per_perm, "per_permutation_basis": _basis(per_perm),
             "volume_n_perm": volume_n_perm, "volume_per_permutation_s": volume_per_perm, "parity": parity}
    title = f"second-level GLM and max-T permutations on {data['n_maps']} {ctx.size} maps, nilearn vs chunkglm"
    rows = _rows(m, n_perm, per_perm) + _volume_rows(m, volume_n_perm, volume_per_perm)
    return CaseResult("second_level", title, facts, rows, _notes(facts), _after(parity, same, same_volume))


def _volume_rows(m: dict, n_perm: dict, per_perm: dict) -> list[Row]:
    """TFCE and cluster-mass rows: reported (the issue sets no target), per-permutation ratio."""
    rows = []
    names = {"tfce": "tfce=True", "mass": "threshold=0.001 (cluster size + mass)"}
    for test in VOLUME_TESTS:
        basis = _basis(per_perm[test])
        for side in ("nilearn", "chunkglm"):
            for count in sorted({1, n_perm["nilearn"], n_perm[side]}):
                label = f"{'anchor: nilearn' if side == 'nilearn' else 'chunkglm'} non_parametric_inference " \
                        f"{names[test]}, n_perm={count}"
                measurement = m[(test, side, count)]
                if count == 1:
                    rows.append(Row(label, measurement, "fixed cost", "— (subtracted)"))
                elif count != n_perm[side]:
                    rows.append(Row(label, measurement, f"{measurement.wall_s / count:.3f} s/perm all-in",
                                    "— (parity run: nilearn's permutations)"))
                else:
                    cost = per_perm[test][side]
                    text = f"{cost['marginal']:.3f} s/perm marginal, {cost['all_in']:.3f} all-in"
                    if side == "chunkglm":
                        speedup = per_perm[test]["nilearn"][basis] / cost[basis]
                        text += f"; {speedup:.1f}× faster per permutation than nilearn ({basis})"
                    rows.append(Row(label, measurement, text, "reported (no target in the issue)"))
    return rows


def _per_permutation(m: dict, side: str, count: int) -> dict:
    """Seconds per permutation: the marginal cost (slope between the 1-permutation
    run and the ``count`` run: loading, masking and the unpermuted fit cancel) and
    the all-in figure (wall / count)."""
    one, many = m[(side, 1)].wall_s, m[(side, count)].wall_s
    return {"marginal": (many - one) / (count - 1), "all_in": many / count, "fixed": one}


def _basis(per_perm: dict) -> str:
    """``"marginal"``, or ``"all_in"`` when a side's marginal cost is lost in timing
    noise (``small``: the permutations take less time than the load varies)."""
    return "marginal" if all(cost["marginal"] > 0 for cost in per_perm.values()) else "all_in"


def _volume_parity(reference: str, candidate: str, mask: str) -> dict:
    """Relative L2, largest |difference| and voxels over :data:`LOGP_TOLERANCE` over the mask."""
    import nibabel as nib
    import numpy as np

    in_mask = np.asarray(nib.load(mask).dataobj) != 0
    ref = np.asarray(nib.load(reference).dataobj, dtype=np.float64)[in_mask]
    new = np.asarray(nib.load(candidate).dataobj, dtype=np.float64)[in_mask]
    both = np.isfinite(ref) & np.isfinite(new)
    diff = np.abs(new[both] - ref[both])
    norm = np.linalg.norm(ref[both])
    return {"rel_l2": float(np.linalg.norm(new[both] - ref[both]) / norm) if norm else float(diff.max(initial=0)),
            "max_abs_diff": float(diff.max(initial=0.0)), "voxels_over_tol": int((diff > LOGP_TOLERANCE).sum()),
            "nonfinite_mismatch": int((np.isfinite(ref) != np.isfinite(new)).sum()),
            "reference_max": float(ref[both].max(initial=0.0))}


def _rows(m: dict, n_perm: dict, per_perm: dict) -> list[Row]:
    floor, nilearn = m["floor"].wall_s, m["nilearn"].wall_s
    rows = [Row("floor: isal threaded-reader decompress of every map (reference)", m["floor"], "1.00× floor"),
            Row("anchor: nilearn SecondLevelModel fit + compute_contrast", m["nilearn"],
                _times(nilearn / floor, "floor"))]
    for key, label in (("nifti", "chunkglm from the NIfTI maps (fit loads them into a temporary store)"),
                       ("store", "chunkglm from the maps node (loaded beforehand, untimed)")):
        speedup = nilearn / m[key].wall_s
        rows.append(Row(label, m[key], f"{speedup:.2f}× faster than nilearn ({m[key].wall_s / floor:.2f}× floor)",
                        f"≥ {PARAMETRIC_SPEEDUP:g}× faster than nilearn",
                        [Check("speed-up", speedup >= PARAMETRIC_SPEEDUP)]))
    basis = _basis(per_perm)
    for side, label in (("nilearn", "anchor: nilearn non_parametric_inference (NIfTI maps)"),
                        ("chunkglm", "chunkglm non_parametric_inference (maps node)")):
        for count in sorted({1, n_perm["nilearn"], n_perm[side]}):
            rows.append(_permutation_row(f"{label}, n_perm={count}", m[(side, count)], count, side, n_perm,
                                         per_perm, basis))
    return rows


def _permutation_row(label, measurement, count, side, n_perm, per_perm, basis) -> Row:
    if count == 1:
        return Row(label, measurement, "fixed cost (load, mask, unpermuted t)",
                   "— (subtracted from the rows below)")
    if count != n_perm[side]:
        return Row(label, measurement, f"{measurement.wall_s / count:.4f} s/perm all-in",
                   "— (parity run: nilearn's permutations)")
    cost = per_perm[side]
    text = f"{cost['marginal']:.4f} s/perm marginal, {cost['all_in']:.4f} all-in"
    if side == "nilearn":
        return Row(label, measurement, text, "— (reference of the per-permutation ratio)")
    speedup = per_perm["nilearn"][basis] / cost[basis]
    if basis == "marginal":
        text += f"; {speedup:.1f}× faster per permutation than nilearn"
    else:
        text += (f"; a marginal cost is below timing noise, so all-in: {speedup:.1f}× faster per "
                 "permutation than nilearn (fixed costs amortised differently: indicative only)")
    return Row(label, measurement, text,
               f"≥ {PERMUTATION_SPEEDUP:g}× faster per permutation (marginal)",
               [Check("per-permutation speed-up", speedup >= PERMUTATION_SPEEDUP)])


def _notes(facts: dict) -> list[str]:
    n_perm = facts["n_perm"]
    return [
        f"Input: {facts['n_maps']} subject maps, 3-D float32 `.nii.gz` on a {facts['shape']} 2 mm grid, "
        f"{facts['mask_voxels']:,} voxels in the (ellipsoid) mask; 0 outside it. Map i = smooth group map + "
        "covariate_i × smooth slope map (a few blobs) + smooth unit noise (`_data.second_level_maps`, seed 0). "
        "Design (`design.csv`, given to both sides): `covariate` (standard normal) and `intercept`.",
        "Parametric rows: `SecondLevelModel(mask_img=<mask>).fit(<map paths> | <maps node>, "
        "design_matrix=<design>)` + `compute_contrast(\"covariate\", output_type=\"all\")`, other parameters "
        "at their defaults. The maps-node rows read a node loaded once per invocation, before the first round "
        f"(`SecondLevelModel(mask_img=<mask>, store=<store>).fit(<map paths>, ...)`: {facts['store_load_s']:.1f} s, "
        f"{facts['store_bytes'] / MiB:.1f} MiB on disk), not timed.",
        "Permutation rows: `non_parametric_inference(<paths> | <maps node>, design_matrix=<design>, "
        "second_level_contrast=\"covariate\", mask=<mask>, n_perm=N, random_state=0, n_jobs=1)` (max-T, "
        "one-sided; the tested covariate is permuted, the intercept is a confound; nilearn with n_jobs=1, the "
        "issue's baseline: its n_jobs=2 would spread the permutations over two processes). Seconds per permutation: "
        f"**marginal** = (wall at n_perm={n_perm['nilearn']} or {n_perm['chunkglm']} − wall at n_perm=1) / "
        "(n_perm − 1), so that loading and masking the maps (nilearn reads the NIfTI files in every call) and "
        "the unpermuted fit cancel; the ratio and its target use it. *All-in* = wall / n_perm. chunkglm runs "
        f"n_perm={n_perm['nilearn']} too, with nilearn's permutations (same random_state and n_jobs): the parity "
        "run below. TFCE and cluster rows: the same call with `tfce=True`, or `threshold=0.001` (cluster "
        f"size and mass), n_perm 1 and {facts['volume_n_perm']['nilearn']} for nilearn, 1, "
        f"{facts['volume_n_perm']['nilearn']} (parity) and {facts['volume_n_perm']['chunkglm']} for chunkglm; "
        "whole permuted volumes are labelled / integrated on both sides (chunkglm: batches of permutations "
        "spread over the threads, the residualised maps shared once).",
    ]


def _after(parity: dict, same_n_perm: int, same_volume: int) -> list[str]:
    rows = []
    for key, label in (("nifti", "chunkglm from the NIfTI maps"), ("store", "chunkglm from the maps node")):
        z, t, effect = parity[key]["z"], parity[key]["t"], parity[key]["effect"]
        rows.append([label, f"{z['rel_l2']:.2e}", f"{z['max_abs_diff']:.2e}", str(z["voxels_over_tol"]),
                     f"{t['rel_l2']:.2e}", f"{effect['rel_l2']:.2e}",
                     str(z["nonfinite_mismatch"] + t["nonfinite_mismatch"] + effect["nonfinite_mismatch"])])
    table = markdown_table(["vs nilearn", "z rel L2", "z max abs diff", "voxels with abs(Δz) > 1e-04",
                            "t rel L2", "effect rel L2", "finite on one side only"], rows)
    logp = parity["logp"]
    return [
        f"Parity with nilearn over the {parity['nifti']['mask_voxels']:,} mask voxels (the last round's maps); "
        "relative L2 = ‖chunkglm − nilearn‖₂ / ‖nilearn‖₂:\n\n" + table,
        f"Permutations (n_perm={same_n_perm}, random_state=0, n_jobs=1 on both sides, so the same "
        f"permutations): -log10 FWE p (max-T; nilearn's largest {logp['reference_max']:.2f}) rel L2 "
        f"{logp['rel_l2']:.2e}, max abs diff "
        f"{logp['max_abs_diff']:.2e}, {logp['voxels_over_tol']} voxels with a difference > {LOGP_TOLERANCE:.0e}, "
        f"{logp['nonfinite_mismatch']} finite on one side only.",
        *[f"{test.upper()} (n_perm={same_volume}, the same permutations): -log10 FWE p of "
          f"{'TFCE' if test == 'tfce' else 'cluster mass'} rel L2 {parity[test]['rel_l2']:.2e}, max abs diff "
          f"{parity[test]['max_abs_diff']:.2e}, {parity[test]['voxels_over_tol']} voxels over {LOGP_TOLERANCE:.0e}."
          for test in VOLUME_TESTS],
    ]


#: Scale case: maps per run of the step; flat memory = the worker peak at the largest N
#: within FLAT_TOLERANCE of the smallest N's (same chunk budget, 10x the maps).
SCALE_N = {"realistic": (500, 5000), "small": (50, 500)}
SCALE_N_PERM = {"realistic": 100, "small": 20}
FLAT_TOLERANCE = 1.25


def second_level_scale_case(ctx: Context) -> CaseResult:
    """N = 500 and 5,000 maps (MNI 2 mm) from a store on a 2-worker LocalCluster: fit + contrast
    and a max-T test; the per-worker peak memory must not grow with N."""
    from _data import second_level_scale_store

    if ctx.size != "realistic":
        raise SystemExit("second_level_scale has a realistic size only (its point is N = 5,000 maps)")
    n_perm = SCALE_N_PERM[ctx.size]
    m, stores = {}, {}
    for n in SCALE_N[ctx.size]:
        stores[n] = second_level_scale_store(ctx.data_dir, n)
        m[n] = ctx.measure("second_level_scale", store=stores[n]["store"], node=stores[n]["node"],
                           mask=stores[n]["mask"], n_perm=n_perm)
    small, large = SCALE_N[ctx.size]
    peak = {n: max(max(m[n].extra["worker_vmhwm_mib"].values()),
                   max(m[n].extra["worker_sampled_rss_mib"].values())) for n in m}
    rows = []
    for n in (small, large):
        extra = m[n].extra
        text = (f"worker peak {peak[n]:.0f} MiB; fit+contrast {extra['parametric_s']:.1f} s, "
                f"max-T {extra['permutation_s']:.1f} s ({extra['permutation_s'] / n_perm:.3f} s/perm)")
        checks, target = [], "—"
        if n == large:
            ratio = peak[large] / peak[small]
            text += f"; {ratio:.2f}× the worker peak at N={small}"
            target = f"worker peak ≤ {FLAT_TOLERANCE:g}× N={small}'s (flat)"
            checks = [Check("flat worker memory", ratio <= FLAT_TOLERANCE)]
        rows.append(Row(f"chunkglm N={n:,} maps (store {stores[n]['store_gib']:.1f} GiB)", m[n], text, target,
                        checks))
    facts = {"n_maps": list(SCALE_N[ctx.size]), "n_perm": n_perm,
             "store_gib": {n: stores[n]["store_gib"] for n in stores},
             "worker_peak_mib": peak}
    notes = [
        "Input: `maps/scale` nodes written straight into a store (`_data.second_level_scale_store`: "
        "235,413 voxels of the second_level case's MNI 2 mm mask, map i = smooth group map + covariate_i × "
        "slope map + white unit noise, float32, 64 MiB chunks; 5,000 NIfTI files would be ~9 GB of gzip).",
        f"Step: a LocalCluster of 2 worker processes × 1 thread (set-up); timed: `SecondLevelModel(mask_img="
        "<mask>).fit(<maps node>, design_matrix=covariate + intercept)`, `compute_contrast(\"covariate\", "
        f"output_type=\"z_score\")`, then the max-T test of the covariate with n_perm={n_perm} "
        "(`chunkglm.glm.second_level.nonparametric.permutation_maps`, what `non_parametric_inference` runs after loading).",
        "Worker peak: the larger of each worker's `VmHWM` (true peak RSS of the process) and its RSS "
        "sampled every 0.2 s, over both workers. Flat memory means it does not grow with N: a voxel block holds "
        "all N maps but its width is sized to the same 64 MiB, so 10× the maps is 10× the blocks, not bigger ones. "
        "No anchor row: nilearn holds the whole (N, voxels) array in float64 (8.8 GiB at N=5,000, plus "
        "copies), the in-memory wall this case is about.",
    ]
    return CaseResult("second_level_scale", "second-level scale: 500 vs 5,000 maps, flat worker memory",
                      facts, rows, notes, [])
