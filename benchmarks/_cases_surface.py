"""Case ``surface_first_level`` (issue 20, Speed): first-level AR(1) on surface runs, nilearn vs chunkglm.

Two runs (``_steps_surface.surface_data``, written once into ``--data-dir``/surface):
one fsaverage5 run (2 x 10,242 vertices, 300 volumes, fMRIPrep's GIFTI pair) and one
fsLR 91k-like CIFTI dense series (91,282 grayordinates, 300 volumes). Per run: the
floor (read the input once), nilearn's ``FirstLevelModel`` on the run as a
SurfaceImage, chunkglm from the files (``chunkglm.convert`` into a fresh store +
fit, timed together) and from a store converted beforehand. Registered in
``_cases.CASES``.

Its steps live in ``_steps_surface.py`` (they register in ``_steps.STEPS`` and use its
protocol), run in fresh child processes by :func:`_measure`, as ``Context.measure`` runs
``_steps.py``'s.

Case ``surface_second_level_scale`` (the issue's last Speed item): the second level of 100 and
1,000 CIFTI dense scalar maps on the fsLR 91k-like brain-model axis of ``surface_first_level``'s
run (91,282 grayordinates) from a store on 2 workers; the worker peak memory must stay flat
(<= 1.25x at 1,000).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _cases import CaseResult, Check, Row, _times
from _harness import Context, Measurement, StepFailed
from _steps import RESULT_PREFIX

STEPS_SCRIPT = Path(__file__).with_name("_steps_surface.py")
FILES_SPEEDUP = 3.0  # chunkglm from the files >= 3x faster than nilearn (issue 20)
STORE_SPEEDUP = 6.0  # from the store >= 6x
KINDS = {"gifti": "fsaverage5 GIFTI pair (2 × 10,242 vertices)",
         "cifti": "fsLR 91k-like CIFTI dense series (91,282 grayordinates)"}


def _run_child(step: str, kwargs: dict) -> dict:
    done = subprocess.run([sys.executable, str(STEPS_SCRIPT), step, json.dumps(kwargs)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise StepFailed(f"step {step!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def _measure(ctx: Context, step: str, **kwargs) -> Measurement:
    """``Context.measure`` for a step of ``_steps_surface.py``: one more run, in a fresh process."""
    key = (step, json.dumps(kwargs, sort_keys=True))
    result = ctx._measurements.setdefault(key, Measurement(step, kwargs))
    record = _run_child(step, kwargs)
    result.runs.append(record)
    options = ", ".join(f"{k}={v}" for k, v in kwargs.items() if not isinstance(v, dict | str) or "/" not in str(v))
    print(f"  round {ctx.round + 1}/{ctx.repeat} {step}({options}): {record['wall_s']:.3f} s, "
          f"peak RSS {record['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return result


def surface_first_level_case(ctx: Context) -> CaseResult:
    if ctx.size != "realistic":
        raise SystemExit("surface_first_level has a realistic size only (fsaverage5 and fsLR 91k, 300 volumes)")
    work = ctx.work_dir("surface_first_level")
    if ctx.round == 0:  # set-up: the input files (once per data dir) and a store per run
        ctx.setup["data"] = _run_child("surface_data", {"folder": str(ctx.data_dir / "surface")})
        for kind in KINDS:
            ctx.setup[kind] = _run_child("surface_convert", {"paths": ctx.setup["data"]["paths"], "kind": kind,
                                                             "store": str(work / f"{kind}.zarr")})
    paths, out = ctx.setup["data"]["paths"], str(work / "maps")
    rows, parity, m = [], {}, {}
    for kind, what in KINDS.items():
        common = {"paths": paths, "kind": kind}
        m[kind] = {
            "floor": _measure(ctx, "surface_floor", **common),
            "nilearn": _measure(ctx, "surface_glm_nilearn", out=out, **common),
            "files": _measure(ctx, "surface_glm_chunkglm", label=f"chunkglm_files_{kind}", convert=True, out=out,
                              store=str(work / f"{kind}-fresh.zarr"), **common),
            "store": _measure(ctx, "surface_glm_chunkglm", label=f"chunkglm_store_{kind}", out=out,
                              store=str(work / f"{kind}.zarr"), **common)}
        rows += _rows(kind, what, m[kind])
        parity[kind] = {key: _parity(m[kind]["nilearn"].extra["maps"], m[kind][key].extra["maps"])
                        for key in ("files", "store")}
    facts = {"parity": parity, "store_convert_s": {k: ctx.setup[k]["wall_s"] for k in KINDS},
             "store_mib": {k: ctx.setup[k]["store_mib"] for k in KINDS},
             "same_design": {k: m[k]["nilearn"].extra["design_columns"] == m[k]["store"].extra["design_columns"]
                             for k in KINDS}}
    return CaseResult("surface_first_level", "first-level GLM (AR(1)) on surface runs, nilearn vs chunkglm",
                      facts, rows, _notes(facts), _after(parity))


def _rows(kind, what, m) -> list[Row]:
    floor, nilearn = m["floor"].wall_s, m["nilearn"].wall_s
    rows = [Row(f"{kind} floor: read the input once ({what})", m["floor"], "1.00× floor"),
            Row(f"{kind} anchor: nilearn FirstLevelModel on the SurfaceImage", m["nilearn"],
                _times(nilearn / floor, "floor"))]
    for key, label, target in (("files", "chunkglm from the files (convert + fit)", FILES_SPEEDUP),
                               ("store", "chunkglm from the store (converted beforehand)", STORE_SPEEDUP)):
        speedup = nilearn / m[key].wall_s
        peak = m[key].peak_rss_mib / m["nilearn"].peak_rss_mib
        rows.append(Row(f"{kind} {label}", m[key],
                        f"{speedup:.2f}× faster than nilearn ({m[key].wall_s / floor:.2f}× floor); "
                        f"peak {peak:.2f}× nilearn's", f"≥ {target:g}× faster than nilearn",
                        [Check("speed-up", speedup >= target)]))
    return rows


def _parity(reference: dict, candidate: dict) -> dict:
    import numpy as np

    found = {}
    for name in ("z_score", "effect_size"):
        ref, ours = np.load(reference[name]), np.load(candidate[name])
        both = np.isfinite(ref) & np.isfinite(ours)
        found[name] = {"rel_l2": float(np.linalg.norm(ours[both] - ref[both]) / np.linalg.norm(ref[both])),
                       "max_abs_diff": float(np.max(np.abs(ours[both] - ref[both]))),
                       "nonfinite_mismatch": int(np.sum(np.isfinite(ref) != np.isfinite(ours)))}
    return found


def _notes(facts) -> list[str]:
    convert_s, store_mib = facts["store_convert_s"], facts["store_mib"]
    return [
        "Inputs (`_steps_surface.surface_data`, seeds 0-2): fsaverage5, fMRIPrep's GIFTI pair (one float32 data "
        "array per volume, on the mesh nilearn ships); fsLR: a 91k-like dense series, brain models synthesised "
        "(29,696 + 29,716 cortex vertices of 32,492 per hemisphere, 31,870 voxels in two structures of a 2 mm "
        "grid). 300 volumes, TR 2 s; values: baseline + a/b block effects on a tenth of the elements + AR(1) "
        "noise (ρ 0.3).",
        "Both sides: `FirstLevelModel(t_r=2.0, slice_time_ref=0.5, noise_model=\"ar1\")`, other parameters at "
        "their defaults (mask: every element); wall = reading the run + `fit` + "
        "`compute_contrast(\"a - b\", output_type=\"all\")`. nilearn reads the GIFTI pair itself "
        "(`SurfaceImage(mesh, {left: path, right: path})`); it has no CIFTI reader, so its CIFTI side reads the "
        "dtseries with nibabel (timed) into a SurfaceImage of the same 91,282 values on a two-part placeholder "
        "mesh (left cortex; right cortex + voxels: the GLM does not use the geometry). chunkglm's "
        "FirstLevelModel refuses GIFTI/CIFTI files as runs (nilearn takes neither), so its files row is "
        "`chunkglm.convert(files, fresh store)` + fit from it, timed together, in this process (no cluster). "
        f"The store rows read stores converted before the first round (untimed: gifti {convert_s['gifti']:.1f} s, "
        f"{store_mib['gifti']:.0f} MiB; cifti {convert_s['cifti']:.1f} s, {store_mib['cifti']:.0f} MiB). "
        f"Same design columns as nilearn: {facts['same_design']}.",
    ]


def _after(parity) -> list[str]:
    lines = ["Parity with nilearn (relative L2 over every element; max |Δ|):"]
    for kind, rows in parity.items():
        for key, found in rows.items():
            z, effect = found["z_score"], found["effect_size"]
            lines.append(f"- {kind}, chunkglm from the {key}: z {z['rel_l2']:.2e} (max {z['max_abs_diff']:.2e}), "
                         f"effect {effect['rel_l2']:.2e} (max {effect['max_abs_diff']:.2e}), finite/non-finite "
                         f"mismatches {z['nonfinite_mismatch'] + effect['nonfinite_mismatch']}")
    return ["\n".join(lines)]


SCALE_MAPS = (100, 1000)
FLAT_TOLERANCE = 1.25  # worker peak at 1,000 maps <= 1.25x that at 100 (issue 20)
SCALE_CHUNK_MIB = (64, 8)  # the default chunk budget, and one that 100 maps already exceed


def surface_second_level_scale_case(ctx: Context) -> CaseResult:
    if ctx.size != "realistic":
        raise SystemExit("surface_second_level_scale has a realistic size only (100 and 1,000 fsLR 91k maps)")
    work = ctx.work_dir("surface_second_level_scale")
    runs = [(n, chunk) for chunk in SCALE_CHUNK_MIB for n in SCALE_MAPS]
    stores = {key: str(work / f"maps-{key[0]}-{key[1]}MiB.zarr") for key in runs}
    if ctx.round == 0:  # set-up: one store per N and chunk size (kept between invocations)
        for key in runs:
            ctx.setup[key] = _run_child("surface_maps_store", {"store": stores[key], "n_maps": key[0],
                                                               "chunk_mib": key[1]})
    m = {key: _measure(ctx, "surface_second_level_scale", store=stores[key]) for key in runs}
    peak = {key: max(max(m[key].extra["worker_vmhwm_mib"].values()),
                     max(m[key].extra["worker_sampled_rss_mib"].values())) for key in runs}
    small, large = SCALE_MAPS
    rows = []
    for n, chunk in runs:
        text, target, checks = f"worker peak {peak[n, chunk]:.0f} MiB", "—", []
        if n == large:
            ratio = peak[large, chunk] / peak[small, chunk]
            text += f"; {ratio:.2f}× the worker peak with {small} maps"
            target = f"≤ {FLAT_TOLERANCE:g}× the {small}-map peak (flat)"
            checks = [Check("flat worker memory", ratio <= FLAT_TOLERANCE)]
        rows.append(Row(f"chunkglm SecondLevelModel, {n:,} CIFTI maps × 91,282 grayordinates, {chunk} MiB chunks (store "
                        f"{ctx.setup[n, chunk]['store_mib']:.0f} MiB)", m[n, chunk], text, target, checks))
    notes = ["Input: `maps/scale` of N float32 CIFTI-2 dense scalar maps on the fsLR 91k-like brain-model axis "
             "of `surface_first_level`'s run (29,696 + 29,716 cortex vertices, 31,870 voxels: 91,282 grayordinates), "
             "written by `convert_surface_maps` in set-up (`_steps_surface.surface_maps_store`): map i = a 0.5 effect "
             "on a tenth of the grayordinates + unit white noise; chunks of 64 MiB (the default) or 8 MiB. Step: a LocalCluster of 2 "
             "worker processes × 1 thread (set-up); timed `SecondLevelModel().fit(<maps node>, "
             "design_matrix=intercept)` + `compute_contrast(\"intercept\", output_type=\"z_score\")`. Worker peak: "
             "the larger of each worker's `VmHWM` and its RSS sampled every 0.2 s, over both workers. No "
             "permutations, no anchor row.",
             "With the default 64 MiB chunks, 100 maps (37 MB) are one block smaller than the budget and 1,000 maps "
             "fill it: the block, not the number of maps, is what a worker holds, so memory grows until the budget "
             "is reached and stays flat beyond; the 8 MiB rows put both N past it."]
    facts = {"worker_peak_mib": {f"{n}-{chunk}MiB": v for (n, chunk), v in peak.items()}}
    return CaseResult("surface_second_level_scale", "surface second level at scale: 100 vs 1,000 fsLR 91k CIFTI maps, "
                      "flat worker memory", facts, rows, notes, [])
