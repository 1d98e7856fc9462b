"""Benchmark cases, registered by name in :data:`CASES`.

A case is a function ``case(ctx) -> CaseResult``: it prepares its inputs,
measures its steps with ``ctx.measure(step, **kwargs)`` (a fresh child
process each) and turns the measurements into table rows with their targets.
``run.py`` calls it once per round (``--repeat``); measurements accumulate
over the rounds, and it prints and saves what the last round returns.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from _data import linked_cohort, run_tables, synthetic_run
from _harness import Context, Measurement, markdown_table, run_child

MiB = 2**20


@dataclass
class Check:
    """One target: what it is, the measured value, and whether it is met."""

    name: str
    met: bool


@dataclass
class Row:
    """One table row: a measured step, its ratio and its targets."""

    label: str
    measurement: Measurement
    ratio: str = "—"
    target: str = "—"
    checks: list[Check] = field(default_factory=list)

    @property
    def met(self) -> str:
        if not self.checks:
            return "—"
        return "; ".join(f"{c.name} {'yes' if c.met else '**NO**'}" for c in self.checks)


@dataclass
class CaseResult:
    """What a case reports: facts and notes above the table, rows, ``after``
    (paragraphs below the table, e.g. parity figures), JSON."""

    name: str
    title: str
    facts: dict
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)

    @property
    def missed(self) -> list[str]:
        """``"<row label>: <check>, <check>"`` for every row that missed a target."""
        misses = [(row.label, [c.name for c in row.checks if not c.met]) for row in self.rows]
        return [f"{label}: {', '.join(names)}" for label, names in misses if names]


# --- case "convert" ---------------------------------------------------------

CONVERT_VS_FLOOR = 2.0  # convert wall <= 2x the floor
RSS_VS_RAW = 2.5  # peak RSS <= 2.5x the uncompressed run
READ_SPEEDUP = 5.0  # store block read >= 5x faster than the anchor
STREAMING_MEMORY = 256 * MiB
#: The streaming path holds at most task_memory/2 of slab data while staging,
#: then rechunks one chunk at a time (decoded staging pieces, the chunk, its
#: encoded copy): its bound is task_memory + this many chunks, whatever the
#: run's length (chunkglm/io/write_run.py).
STREAMING_CHUNKS = 4


def convert_case(ctx: Context) -> CaseResult:
    """One realistic run: floor, nibabel anchor, convert (x2 paths), block reads."""
    run = synthetic_run(ctx.data_dir, ctx.size)
    sizes = input_sizes(run["bold"], run["mask"])
    work = ctx.work_dir("convert")
    store, streaming_store = str(work / "convert.zarr"), str(work / "convert-streaming.zarr")
    streaming_memory = _streaming_memory(sizes["masked_bytes"])

    m = {"floor_isal": ctx.measure("floor_isal", path=run["bold"]),
         "floor_gzip": ctx.measure("floor_gzip", path=run["bold"]),
         "convert": ctx.measure("convert", inputs=run["root"], store=store, task_memory=None),
         "streaming": ctx.measure("convert", inputs=run["root"], store=streaming_store,
                                  task_memory=streaming_memory)}
    # The reads run after convert (they need its store) and the anchor last:
    # it fetches the very block the store's first chunk holds.
    node = m["convert"].extra["converted"][0].removeprefix("runs/")
    m["read_zarr"] = ctx.measure("read_zarr", store=store, node=node)
    block = {"start": m["read_zarr"].extra["start"], "stop": m["read_zarr"].extra["stop"]}
    m["read_cohort"] = ctx.measure("read_cohort", store=store, node=node, **block)
    m["anchor"] = ctx.measure("anchor_read", bold=run["bold"], mask=run["mask"], **block)
    shutil.rmtree(streaming_store, ignore_errors=True)  # same data as `store`

    facts = {**sizes, "store_bytes": m["convert"].extra["store_mib"] * MiB, "node": node,
             "block": [block["start"], block["stop"]], "streaming_task_memory": streaming_memory,
             "same_block": _same_block(m["anchor"], m["read_zarr"], m["read_cohort"])}
    chunk_bytes = (block["stop"] - block["start"]) * sizes["shape"][3] * 4
    bound = streaming_memory + STREAMING_CHUNKS * chunk_bytes
    return CaseResult("convert", f"convert one {ctx.size} run", facts, _convert_rows(m, sizes, bound),
                      _convert_notes(facts))


def input_sizes(bold: str, mask: str) -> dict:
    """Compressed file, uncompressed data and in-mask float32 sizes (bytes)."""
    import nibabel as nib
    import numpy as np

    img = nib.load(bold)
    n_values = int(np.prod(img.shape))
    n_voxels = int((np.asarray(nib.load(mask).dataobj) != 0).sum())
    return {"shape": list(img.shape), "dtype": str(img.get_data_dtype()), "mask_voxels": n_voxels,
            "compressed_bytes": Path(bold).stat().st_size,
            "raw_bytes": n_values * img.get_data_dtype().itemsize,
            "masked_bytes": n_voxels * img.shape[3] * 4}


def _streaming_memory(masked_bytes: int) -> int:
    """256 MiB; a quarter of the run when 256 MiB would hold it (``small``),
    so that the streaming path is always the one taken."""
    if masked_bytes > STREAMING_MEMORY:
        return STREAMING_MEMORY
    return max(MiB, masked_bytes // 4)


def _same_block(*measurements) -> bool:
    return len({(str(x.extra["block_shape"]), x.extra["block_sha256"]) for x in measurements}) == 1


def _convert_rows(m: dict, sizes: dict, streaming_bound: int) -> list[Row]:
    floor, anchor = m["floor_isal"].wall_s, m["anchor"].wall_s
    rss_limit = RSS_VS_RAW * sizes["raw_bytes"] / MiB
    return [
        Row("floor: isal threaded-reader decompress (reference)", m["floor_isal"], "1.00× floor"),
        Row("floor: stdlib gzip decompress (context)", m["floor_gzip"], _times(m["floor_gzip"].wall_s / floor, "floor")),
        Row("anchor: nibabel load + float32 + mask + block", m["anchor"], _times(anchor / floor, "floor")),
        _convert_row("chunkglm convert (default task_memory, in memory)", m["convert"], floor, rss_limit),
        _convert_row(f"chunkglm convert (task_memory={_mib(m['streaming'].args['task_memory'])}, streaming)",
                     m["streaming"], floor, rss_limit, streaming_bound),
        _read_row("chunkglm read block: zarr", m["read_zarr"], anchor),
        _read_row("chunkglm read block: open_cohort(...).data()", m["read_cohort"], anchor),
    ]


def _convert_row(label, measurement, floor, rss_limit, memory_bound=None) -> Row:
    ratio = measurement.wall_s / floor
    checks = [Check("time", ratio <= CONVERT_VS_FLOOR), Check("RSS", measurement.peak_rss_mib <= rss_limit)]
    target = f"≤ {CONVERT_VS_FLOOR:g}× floor; peak ≤ {rss_limit:.0f} MiB ({RSS_VS_RAW:g}× raw)"
    if memory_bound is not None:
        work_mib = measurement.peak_rss_mib - measurement.rss_start_mib
        checks.append(Check("bounded", work_mib <= memory_bound / MiB))
        target += f"; peak − start ≤ {_mib(memory_bound)} (task_memory + {STREAMING_CHUNKS} chunks)"
    return Row(label, measurement, _times(ratio, "floor"), target, checks)


def _read_row(label, measurement, anchor) -> Row:
    speedup = anchor / measurement.wall_s
    return Row(label, measurement, f"{speedup:.1f}× faster than anchor",
               f"≥ {READ_SPEEDUP:g}× faster than anchor", [Check("speed-up", speedup >= READ_SPEEDUP)])


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / MiB:.3g}MiB"


def _times(value: float, what: str) -> str:
    return f"{value:.2f}× {what}"


def _convert_notes(facts: dict) -> list[str]:
    return [
        f"Input: {facts['shape']} {facts['dtype']}, {facts['mask_voxels']:,} mask voxels. "
        f"Sizes: compressed file {facts['compressed_bytes'] / MiB:.0f} MiB, uncompressed data "
        f"{facts['raw_bytes'] / MiB:.0f} MiB, masked float32 {facts['masked_bytes'] / MiB:.0f} MiB, "
        f"store on disk {facts['store_bytes'] / MiB:.0f} MiB.",
        f"Block read: voxels [{facts['block'][0]}, {facts['block'][1]}) of run {facts['node']}, all time "
        f"points (the first chunk of the bold array). Same bytes from nibabel, zarr and open_cohort: "
        f"{'yes' if facts['same_block'] else '**NO**'}.",
    ]


# --- case "first_level" ----------------------------------------------------

NIFTI_SPEEDUP = 3.0  # chunkglm from the NIfTI path >= 3x faster than nilearn
STORE_SPEEDUP = 6.0  # chunkglm from a converted store >= 6x faster than nilearn
RSS_VS_NILEARN = 0.5  # chunkglm peak RSS <= half of nilearn's
Z_TOLERANCE = 1e-4  # parity: voxels whose |z difference| exceeds this are counted


def first_level_case(ctx: Context) -> CaseResult:
    """One realistic run, AR(1): nilearn vs chunkglm from the NIfTI and from a store."""
    run = synthetic_run(ctx.data_dir, ctx.size)
    tables = run_tables(run)
    sizes = input_sizes(run["bold"], run["mask"])
    work = ctx.work_dir("first_level")
    store, maps = str(work / "first_level.zarr"), str(work / "maps")
    if ctx.round == 0:  # set-up, not measured: convert the store once per invocation
        ctx.setup["store"] = run_child("convert", {"inputs": run["root"], "store": store, "task_memory": None})
    node = ctx.setup["store"]["converted"][0].removeprefix("runs/")

    common = {"mask": run["mask"], **tables, "out": maps}
    m = {"floor_isal": ctx.measure("floor_isal", path=run["bold"]),
         "nilearn": ctx.measure("glm_nilearn", bold=run["bold"], **common),
         "nifti": ctx.measure("glm_chunkglm", label="chunkglm_nifti", bold=run["bold"], **common),
         "store": ctx.measure("glm_chunkglm", label="chunkglm_store", store=store, node=node, **common)}

    parity = {key: map_parity(m["nilearn"].extra["maps"], m[key].extra["maps"], run["mask"])
              for key in ("nifti", "store")}
    facts = {**sizes, "node": node, "store_bytes": ctx.setup["store"]["store_mib"] * MiB,
             "store_convert_s": ctx.setup["store"]["wall_s"],
             "design_columns": m["nilearn"].extra["design_columns"],
             "same_design_columns": all(m[k].extra["design_columns"] == m["nilearn"].extra["design_columns"]
                                        for k in ("nifti", "store")),
             "parity": parity, "events": tables["events"], "confounds": tables["confounds"]}
    return CaseResult("first_level", f"first-level GLM (AR(1)) on one {ctx.size} run, nilearn vs chunkglm",
                      facts, _first_level_rows(m), _first_level_notes(facts), _parity_notes(parity))


def map_parity(reference: dict, candidate: dict, mask: str) -> dict:
    """Relative L2 over the mask of the z and effect maps, and |dz| outliers.

    ``reference`` / ``candidate``: ``{"z_score": path, "effect_size": path}``
    as the steps saved them (the last round's maps).
    """
    import nibabel as nib
    import numpy as np

    in_mask = np.asarray(nib.load(mask).dataobj) != 0
    out = {"mask_voxels": int(in_mask.sum())}
    for name, key in (("z", "z_score"), ("effect", "effect_size")):
        ref = np.asarray(nib.load(reference[key]).dataobj, dtype=np.float64)[in_mask]
        new = np.asarray(nib.load(candidate[key]).dataobj, dtype=np.float64)[in_mask]
        both = np.isfinite(ref) & np.isfinite(new)
        diff = np.abs(new[both] - ref[both])
        out[name] = {"rel_l2": float(np.linalg.norm(new[both] - ref[both]) / np.linalg.norm(ref[both])),
                     "max_abs_diff": float(diff.max(initial=0.0)),
                     "nonfinite_mismatch": int((np.isfinite(ref) != np.isfinite(new)).sum())}
        if name == "z":
            out[name]["voxels_over_tol"] = int((diff > Z_TOLERANCE).sum())
    return out


def _first_level_rows(m: dict) -> list[Row]:
    floor, nilearn = m["floor_isal"].wall_s, m["nilearn"].wall_s
    rss_limit = RSS_VS_NILEARN * m["nilearn"].peak_rss_mib
    return [
        Row("floor: isal threaded-reader decompress (reference)", m["floor_isal"], "1.00× floor"),
        Row("anchor: nilearn FirstLevelModel fit + compute_contrast", m["nilearn"], _times(nilearn / floor, "floor")),
        _glm_row("chunkglm from the NIfTI (fit converts to a temporary store)", m["nifti"], floor, nilearn,
                 NIFTI_SPEEDUP, rss_limit),
        _glm_row("chunkglm from the store (converted beforehand, untimed)", m["store"], floor, nilearn,
                 STORE_SPEEDUP, rss_limit),
    ]


def _glm_row(label, measurement, floor, nilearn, speedup_target, rss_limit) -> Row:
    speedup = nilearn / measurement.wall_s
    return Row(label, measurement,
               f"{speedup:.2f}× faster than nilearn ({measurement.wall_s / floor:.2f}× floor)",
               f"≥ {speedup_target:g}× faster than nilearn; peak ≤ {rss_limit:.0f} MiB (½ nilearn's)",
               [Check("speed-up", speedup >= speedup_target), Check("RSS", measurement.peak_rss_mib <= rss_limit)])


def _first_level_notes(facts: dict) -> list[str]:
    return [
        f"Input: {facts['shape']} {facts['dtype']}, {facts['mask_voxels']:,} mask voxels, compressed file "
        f"{facts['compressed_bytes'] / MiB:.0f} MiB (uncompressed {facts['raw_bytes'] / MiB:.0f} MiB). "
        f"Events: the raw BIDS events TSV; confounds: 6 motion parameters + csf + white_matter.",
        "Both sides: `FirstLevelModel(t_r=2.0, slice_time_ref=0.5, noise_model=\"ar1\", mask_img=<brain mask>)`, "
        "other parameters at their defaults; wall = `fit(...)` + `compute_contrast(\"a - b\", output_type=\"all\")`. "
        f"Design: {len(facts['design_columns'])} columns, the same on all three sides: "
        f"{'yes' if facts['same_design_columns'] else '**NO**'}.",
        f"The store row reads a store converted once per invocation, before the first round "
        f"(`chunkglm.convert(bids_root, store)`: {facts['store_convert_s']:.1f} s in a single run, "
        f"{facts['store_bytes'] / MiB:.0f} MiB on disk; the `convert` case measures it properly), not timed; "
        "the NIfTI row includes such a conversion (into a temporary store, inside `fit`).",
    ]


def _parity_notes(parity: dict) -> list[str]:
    lines = [f"Parity with nilearn over the {parity['nifti']['mask_voxels']:,} mask voxels (the last round's maps): "
             "relative L2 = ‖chunkglm − nilearn‖₂ / ‖nilearn‖₂.", ""]
    rows = []
    for key, label in (("nifti", "chunkglm from the NIfTI"), ("store", "chunkglm from the store")):
        z, effect = parity[key]["z"], parity[key]["effect"]
        rows.append([label, f"{z['rel_l2']:.2e}", f"{z['max_abs_diff']:.2e}", str(z["voxels_over_tol"]),
                     f"{effect['rel_l2']:.2e}", f"{effect['max_abs_diff']:.2e}",
                     str(z["nonfinite_mismatch"] + effect["nonfinite_mismatch"])])
    # (no "|" inside cells: it would split the markdown columns)
    lines.append(markdown_table(["vs nilearn", "z rel L2", "z max abs diff", f"voxels with abs(Δz) > {Z_TOLERANCE:.0e}",
                                 "effect rel L2", "effect max abs diff", "finite/non-finite mismatches"], rows))
    return ["\n".join(lines)]


# --- case "first_level_cohort" ---------------------------------------------

COHORT_SIZES = (1, 5, 10, 20)  # runs per graph; the first is the reference
COHORT_WORKERS = 2  # worker processes x 1 thread: one core each
THROUGHPUT_VS_ONE = 0.8  # runs/s per core >= 0.8x the one-run graph's
WORKER_RSS_VS_ONE = 1.2  # peak RSS per worker <= 1.2x the one-run graph's ("flat")
WAVES = "waves"  # the extra rows: N runs through fitted_in_waves instead of one persist_fits
WAVE_SIZES = (5, 10, 20)  # flat = the worker peak at each N <= 1.2x the smallest of these


def first_level_cohort_case(ctx: Context) -> CaseResult:
    """N = 1, 5, 10, 20 runs fitted in one graph on a 2-worker local cluster."""
    run = synthetic_run(ctx.data_dir, ctx.size)
    tables = run_tables(run)
    sizes = input_sizes(run["bold"], run["mask"])
    work = ctx.work_dir("first_level_cohort")
    store, maps = str(work / "cohort.zarr"), str(work / "maps")
    nodes = _cohort_store(ctx, run, work, store)

    common = {"mask": run["mask"], **tables, "out": maps}
    m = {"floor_isal": ctx.measure("floor_isal", path=run["bold"]),
         "reference": ctx.measure("glm_chunkglm", label="in_process", store=store, node=nodes[0], **common)}
    for n in COHORT_SIZES:
        m[n] = ctx.measure("glm_cohort", store=store, nodes=nodes[:n], n_workers=COHORT_WORKERS, **common)
    for n in WAVE_SIZES:
        m[f"{WAVES} {n}"] = ctx.measure("glm_cohort", store=store, nodes=nodes[:n], n_workers=COHORT_WORKERS,
                                    waves=True, **common)

    keys = [*COHORT_SIZES, *(f"{WAVES} {n}" for n in WAVE_SIZES)]
    stats = {key: _cohort_stats(m[key]) for key in keys}
    parity = {key: map_parity(m["reference"].extra["maps"], m[key].extra["maps"], run["mask"]) for key in keys}
    if ctx.round == ctx.repeat - 1:  # ~3.8 GB (realistic), converted again by the next invocation
        shutil.rmtree(store, ignore_errors=True)
    facts = {**sizes, "nodes": nodes, "store_bytes": ctx.setup["store"]["store_mib"] * MiB,
             "store_convert_s": ctx.setup["store"]["wall_s"], "linked_root": ctx.setup["cohort"]["root"],
             "cohort_sizes": list(COHORT_SIZES), "workers": COHORT_WORKERS, "stats": stats, "parity": parity,
             "events": tables["events"], "confounds": tables["confounds"]}
    return CaseResult("first_level_cohort",
                      f"first-level GLM (AR(1)), {max(COHORT_SIZES)} {ctx.size} runs in one graph on a "
                      f"{COHORT_WORKERS}-worker local cluster", facts, _cohort_rows(m, stats),
                      _cohort_notes(facts), _cohort_after(stats, parity))


def _cohort_store(ctx: Context, run: dict, work: Path, store: str) -> list[str]:
    """Set-up, not measured (round 0): the linked 20-run dataset (cached) and
    its store (converted per invocation on the 2-worker cluster); the run nodes."""
    if ctx.round == 0:
        ctx.setup["cohort"] = linked_cohort(run, work / "linked", max(COHORT_SIZES))
        ctx.setup["store"] = run_child("convert_cluster", {"inputs": ctx.setup["cohort"]["root"], "store": store,
                                                           "n_workers": COHORT_WORKERS})
    nodes = ctx.setup["cohort"]["runs"]
    missing = sorted(set(f"runs/{n}" for n in nodes) - set(ctx.setup["store"]["converted"]))
    if missing:
        raise RuntimeError(f"the cohort store lacks {missing}")
    return nodes


def _measure_s3(ctx: Context, s3, **kwargs) -> Measurement:
    """``glm_cohort`` from the S3 store, recording the CPU time the S3 server spent meanwhile."""
    import psutil

    server = psutil.Process(s3.process.pid)
    before = server.cpu_times()
    measurement = ctx.measure("glm_cohort", **kwargs)
    after = server.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    ctx.setup.setdefault("s3_cpu", []).append(cpu)
    return measurement


def _cohort_stats(measurement: Measurement) -> dict:
    """Throughput and worker memory of one N (worker figures: largest over the rounds)."""
    runs, best = measurement.runs, measurement.extra
    n = best["n_runs"]

    def largest(key):
        return max(max(r[key]) for r in runs)

    kinds = {}
    for r in runs:
        for kind, mib in r["persisted_by_kind_mib"].items():
            kinds[kind] = max(kinds.get(kind, 0.0), mib)
    return {"n_runs": n, "wall_s": measurement.wall_s, "runs_per_s": n / measurement.wall_s,
            "runs_per_s_per_core": n / measurement.wall_s / COHORT_WORKERS,
            "worker_peak_mib": largest("worker_peak_rss_mib"),
            "worker_sampled_peak_mib": largest("worker_sampled_peak_mib"),
            "worker_peak_less_persisted_mib": largest("worker_peak_less_persisted_mib"),
            "worker_held_peak_mib": largest("worker_held_peak_mib"),
            "worker_unmanaged_peak_mib": largest("worker_unmanaged_peak_mib"),
            "worker_rss_start_mib": min(min(r["worker_rss_start_mib"]) for r in runs),
            "persisted_end_mib": max(sum(r["worker_persisted_end_mib"]) for r in runs),
            "persisted_by_kind_mib": kinds,
            "driver_peak_mib": measurement.peak_rss_mib,
            "identical_maps": all(r["identical_maps"] for r in runs),
            "restarted": any(r["workers_restarted"] for r in runs),
            "samples": min(r["n_samples"] for r in runs)}


def _cohort_rows(m: dict, stats: dict) -> list[Row]:
    floor, one = m["floor_isal"].wall_s, stats[COHORT_SIZES[0]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    reference = m["reference"].wall_s
    rows = [Row("floor: isal threaded-reader decompress of one run (reference)", m["floor_isal"], "1.00× floor"),
            Row("chunkglm one run in process, threaded scheduler (context: the first_level store row)",
                m["reference"], f"{1 / reference:.3f} runs/s, {1 / reference / cores:.3f}/core; "
                                f"{reference / floor:.2f}× floor")]
    rss_limit = WORKER_RSS_VS_ONE * one["worker_peak_mib"]
    less_limit = WORKER_RSS_VS_ONE * one["worker_peak_less_persisted_mib"]
    first_wave = stats.get(f"{WAVES} {WAVE_SIZES[0]}")
    for key, s in stats.items():
        if isinstance(key, str) and key.startswith(WAVES):
            rows.append(_wave_row(m[key], s, one, first_wave))
            continue
        n = s["n_runs"]
        relative = s["runs_per_s_per_core"] / one["runs_per_s_per_core"]
        less = s["worker_peak_less_persisted_mib"]
        ratio = (f"{s['runs_per_s_per_core']:.3f} runs/s/core = {relative:.2f}× N=1; worker peak "
                 f"{s['worker_peak_mib']:.0f} MiB = {s['worker_peak_mib'] / one['worker_peak_mib']:.2f}× N=1; "
                 f"excl. persisted {less:.0f} MiB = {less / one['worker_peak_less_persisted_mib']:.2f}× N=1")
        label = f"chunkglm {n} run{'s' if n > 1 else ''} in one graph ({COHORT_WORKERS} workers × 1 thread)"
        if key == COHORT_SIZES[0]:
            rows.append(Row(label, m[key], ratio, "— (reference of the rows below)"))
            continue
        rows.append(Row(label, m[key], ratio,
                        f"≥ {THROUGHPUT_VS_ONE:g}× N=1 runs/s per core; worker peak ≤ {rss_limit:.0f} MiB "
                        f"({WORKER_RSS_VS_ONE:g}× N=1); excl. persisted ≤ {less_limit:.0f} MiB",
                        [Check("throughput", relative >= THROUGHPUT_VS_ONE),
                         Check("worker RSS", s["worker_peak_mib"] <= rss_limit),
                         Check("excl. persisted", less <= less_limit)]))
    return rows


def _wave_row(measurement: Measurement, s: dict, one: dict, first: dict) -> Row:
    """A `fitted_in_waves` row: flat = worker peak <= 1.2x that of the fewest runs through waves."""
    n = s["n_runs"]
    relative = s["runs_per_s_per_core"] / one["runs_per_s_per_core"]
    peak, base = s["worker_peak_mib"], first["worker_peak_mib"]
    ratio = (f"{s['runs_per_s_per_core']:.3f} runs/s/core = {relative:.2f}× N=1; worker peak {peak:.0f} MiB = "
             f"{peak / base:.2f}× waves N={first['n_runs']} ({peak / one['worker_peak_mib']:.2f}× the 1-run graph)")
    label = f"chunkglm {n} runs through `fitted_in_waves` ({COHORT_WORKERS} workers × 1 thread)"
    if n == first["n_runs"]:
        return Row(label, measurement, ratio, f"≥ {THROUGHPUT_VS_ONE:g}× N=1 runs/s per core; "
                   "(reference of the waves rows' memory)", [Check("throughput", relative >= THROUGHPUT_VS_ONE)])
    limit = WORKER_RSS_VS_ONE * base
    return Row(label, measurement, ratio,
               f"≥ {THROUGHPUT_VS_ONE:g}× N=1 runs/s per core; worker peak ≤ {limit:.0f} MiB "
               f"({WORKER_RSS_VS_ONE:g}× waves N={first['n_runs']}: flat as runs are added)",
               [Check("throughput", relative >= THROUGHPUT_VS_ONE), Check("flat worker RSS", peak <= limit)])


def _cohort_notes(facts: dict) -> list[str]:
    n_max = max(facts["cohort_sizes"])
    return [
        f"Input: {n_max} runs `sub-01` … `sub-{n_max:02d}` (task `main`, run 1) of a BIDS dataset whose "
        f"preprocessed bold files are symlinks to the one realistic run ({facts['shape']} {facts['dtype']}, "
        f"{facts['mask_voxels']:,} mask voxels, {facts['compressed_bytes'] / MiB:.0f} MiB compressed); mask, "
        "confounds, events and sidecars copied per subject. Converted once per invocation, before the first "
        f"round, on the same {facts['workers']}-worker cluster (`chunkglm.convert(bids_root, store, client=...)`: "
        f"{facts['store_convert_s']:.0f} s, {facts['store_bytes'] / MiB:.0f} MiB on disk), not timed.",
        f"Each N row is one fresh process: it starts a local cluster of {facts['workers']} worker processes × 1 "
        "thread (`chunkglm.cluster.start`) and imports the task modules on the workers (set-up, untimed), then "
        "times: one `FirstLevelModel(t_r=2.0, slice_time_ref=0.5, noise_model=\"ar1\", mask_img=<brain mask>)"
        ".fit(run, events=<events TSV>, confounds=<6 motion + csf + white_matter>)` per run, one "
        "`persist_fits(models)` (every fit in one dask graph), then `compute_contrast(\"a - b\", "
        "output_type=\"all\")` of each model. The driver keeps the first model's maps and checks that every "
        "other model's z and effect maps are equal to them (all runs hold the same data). The "
        "`fitted_in_waves` rows run the same models through `for model in fitted_in_waves(models)` (a window "
        "of 2 × workers models persisted at a time, the next window while the current one is used, each model "
        "released after its contrast) instead of one `persist_fits`: the bounded-memory way to run a cohort "
        "(what `chunkglm first-level` does). One `persist_fits` keeps every run's fit on the workers by "
        "design (~15 MiB a realistic run), so its worker peak grows with N; the waves rows are the ones "
        f"whose worker peak must stay flat, judged against the fewest runs through waves (N={WAVE_SIZES[0]}): "
        "the one-run graph is not a fair base, one run cannot keep both workers busy with several runs' blocks.",
        f"Throughput: runs/s per core = N / wall / {facts['workers']} cores, relative to the N=1 graph on the "
        "same cluster. Memory: `peak RSS` and `RSS at start` in the table are the **driver** (client + "
        "scheduler); the **worker** peak is the largest `VmHWM` (high-water RSS) of any worker process (its "
        "whole life, imports included), over the rounds. *Excl. persisted*: the largest, over samples taken "
        "every 0.1 s with `client.run`, of a worker's RSS less the bytes it holds at that moment of the "
        "results still held when the work is done (what `persist_fits` keeps on the workers, by design one "
        "set per run): the memory the worker would need if those results lived elsewhere.",
    ]


def _cohort_after(stats: dict, parity: dict) -> list[str]:
    one = stats[COHORT_SIZES[0]]
    rows = []
    for key, s in stats.items():
        n = s["n_runs"]
        kinds = ", ".join(f"{kind} {mib:.0f}" for kind, mib in sorted(s["persisted_by_kind_mib"].items()))
        rows.append([f"{n} (waves)" if isinstance(key, str) else str(n), f"{s['wall_s']:.2f}", f"{s['wall_s'] / n:.2f}", f"{s['runs_per_s']:.3f}",
                     f"{s['runs_per_s_per_core']:.3f}", f"{s['runs_per_s_per_core'] / one['runs_per_s_per_core']:.2f}",
                     f"{s['worker_rss_start_mib']:.0f}", f"{s['worker_peak_mib']:.0f}",
                     f"{s['worker_sampled_peak_mib']:.0f}", f"{s['worker_held_peak_mib']:.0f}",
                     f"{s['worker_unmanaged_peak_mib']:.0f}", f"{s['worker_peak_less_persisted_mib']:.0f}",
                     f"{s['persisted_end_mib']:.0f} ({kinds})", f"{s['driver_peak_mib']:.0f}",
                     "yes" if s["identical_maps"] else "**NO**", "**yes**" if s["restarted"] else "no"])
    memory = markdown_table(
        ["N", "wall s", "s a run", "runs/s", "runs/s per core", "× N=1", "worker RSS at start MiB",
         "worker peak MiB (VmHWM)", "worker peak sampled MiB", "worker results held, peak MiB",
         "worker unmanaged, peak MiB", "worker peak excl. persisted MiB",
         "persisted at end MiB, all workers (by task)", "driver peak MiB", "all maps equal", "worker restarted"],
        rows)
    worst = max(parity, key=lambda n: parity[n]["z"]["rel_l2"])
    z, effect = parity[worst]["z"], parity[worst]["effect"]
    return [
        "Per N (worker figures: the largest worker, over the rounds; *sampled* every 0.1 s; *unmanaged* = "
        "RSS − every result held):\n\n" + memory,
        f"Parity of the first model's maps with the in-process run over the {parity[worst]['mask_voxels']:,} "
        f"mask voxels, worst row (N={worst}): z rel L2 {z['rel_l2']:.2e}, max abs diff {z['max_abs_diff']:.2e}, "
        f"{z['voxels_over_tol']} voxels with abs(Δz) > {Z_TOLERANCE:.0e}; effect rel L2 {effect['rel_l2']:.2e}; "
        f"finite/non-finite mismatches {z['nonfinite_mismatch'] + effect['nonfinite_mismatch']}.",
    ]


# --- case "scale_out" --------------------------------------------------------

SCALE_RUNS = 20
SCALING_SPEEDUP = 1.7  # 2 workers >= 1.7x faster than 1 (efficiency >= 85%)
S3_SLOWDOWN = 1.5  # the S3 store's wall <= 1.5x the local store's


def scale_out_case(ctx: Context) -> CaseResult:
    """Strong scaling (1 -> 2 workers) and local vs S3 store, 20 runs through `fitted_in_waves`."""
    from _s3 import MotoServer

    run = synthetic_run(ctx.data_dir, ctx.size)
    tables = run_tables(run)
    sizes = input_sizes(run["bold"], run["mask"])
    work = ctx.work_dir("scale_out")
    store, maps = str(work / "cohort.zarr"), str(work / "maps")
    nodes = _cohort_store(ctx, run, work, store)[:SCALE_RUNS]
    if ctx.round == 0:  # set-up, not measured: a moto server on 127.0.0.1 holding a copy of the store
        ctx.setup["s3"] = MotoServer().__enter__()
        ctx.setup["s3_url"], ctx.setup["upload_s"] = ctx.setup["s3"].upload(store, "cohort.zarr")
    s3 = ctx.setup["s3"]
    common = {"mask": run["mask"], **tables, "out": maps, "nodes": nodes, "waves": True}
    try:
        m = {"floor_isal": ctx.measure("floor_isal", path=run["bold"]),
             1: ctx.measure("glm_cohort", store=store, n_workers=1, tag="_1w", **common),
             2: ctx.measure("glm_cohort", store=store, n_workers=2, tag="_2w", **common),
             "s3": _measure_s3(ctx, s3, store=ctx.setup["s3_url"], n_workers=2, tag="_s3",
                               storage_options=s3.options, **common)}
    finally:
        if ctx.round == ctx.repeat - 1:
            s3.__exit__(None, None, None)
            shutil.rmtree(store, ignore_errors=True)
    parity = {key: map_parity(m[1].extra["maps"], m[key].extra["maps"], run["mask"]) for key in (2, "s3")}
    server_cpu = ctx.setup["s3_cpu"][m["s3"].walls.index(m["s3"].wall_s)]  # of the best round
    speedup = m[1].wall_s / m[2].wall_s
    slowdown = m["s3"].wall_s / m[2].wall_s
    floor = m["floor_isal"].wall_s
    rows = [Row("floor: isal threaded-reader decompress of one run (reference)", m["floor_isal"], "1.00× floor"),
            Row(f"chunkglm {SCALE_RUNS} runs, local store, 1 worker × 1 thread", m[1],
                f"{SCALE_RUNS / m[1].wall_s:.3f} runs/s; {m[1].wall_s / SCALE_RUNS / floor:.2f}× floor a run",
                "— (reference)"),
            Row(f"chunkglm {SCALE_RUNS} runs, local store, 2 workers × 1 thread", m[2],
                f"{speedup:.2f}× the 1-worker wall = {speedup / 2:.0%} parallel efficiency",
                f"≥ {SCALING_SPEEDUP:g}× (1 → 2 workers)", [Check("speedup", speedup >= SCALING_SPEEDUP)]),
            Row(f"chunkglm {SCALE_RUNS} runs, S3 store on 127.0.0.1 (moto), 2 workers × 1 thread", m["s3"],
                f"{slowdown:.2f}× the local store's wall", f"≤ {S3_SLOWDOWN:g}× the local store",
                [Check("S3 slowdown", slowdown <= S3_SLOWDOWN)])]
    facts = {**sizes, "nodes": nodes, "store_bytes": ctx.setup["store"]["store_mib"] * MiB,
             "store_convert_s": ctx.setup["store"]["wall_s"], "upload_s": ctx.setup["upload_s"],
             "speedup": speedup, "s3_slowdown": slowdown, "s3_server_cpu_s": server_cpu, "parity": parity,
             "events": tables["events"], "confounds": tables["confounds"]}
    notes = [
        f"Input: the {SCALE_RUNS}-run store of the first_level_cohort case ({sizes['shape']} "
        f"{sizes['dtype']} runs, {sizes['mask_voxels']:,} mask voxels; {facts['store_bytes'] / MiB:.0f} MiB on "
        f"disk), converted once per invocation (not timed), and a copy of it uploaded to a moto S3 server "
        f"(its own process, 127.0.0.1) before the first round ({facts['upload_s']:.0f} s, not timed).",
        "Each row is one fresh process: a local cluster of N worker processes × 1 thread is started and the "
        "task modules imported (untimed); timed: one `FirstLevelModel(noise_model=\"ar1\", ...).fit(run)` per "
        "run, then `for model in fitted_in_waves(models): model.compute_contrast(\"a - b\", "
        "output_type=\"all\")` (what `chunkglm first-level` does). The S3 row opens the store as "
        "`open_cohort(\"s3://...\", storage_options={\"endpoint_url\": ...})` (the backend chunkglm picks: "
        "obstore when installed), credentials from the environment.",
    ]
    worst = max(parity, key=lambda k: parity[k]["z"]["rel_l2"])
    after = [f"The S3 server is a Python process on the same 2 cores as the workers: during the best S3 "
             f"round it used {server_cpu:.1f} s of CPU (user + system) in {m['s3'].wall_s:.1f} s of wall, "
             f"{server_cpu / (2 * m['s3'].wall_s):.0%} of the machine's cores, which the workers did not get; "
             "a real object store serves from other machines.",
             f"Parity with the 1-worker maps over {parity[worst]['mask_voxels']:,} mask voxels, worst row "
             f"({worst}): z rel L2 {parity[worst]['z']['rel_l2']:.2e}, effect rel L2 "
             f"{parity[worst]['effect']['rel_l2']:.2e}."]
    return CaseResult("scale_out", f"scale-out: {SCALE_RUNS} {ctx.size} runs, 1 vs 2 workers, local vs S3 store",
                      facts, rows, notes, after)


CASES = {"convert": convert_case, "first_level": first_level_case, "first_level_cohort": first_level_cohort_case,
         "scale_out": scale_out_case}

from _cases_second_level import second_level_case, second_level_scale_case  # noqa: E402  (imports Row, ...)

CASES["second_level"] = second_level_case
CASES["second_level_scale"] = second_level_scale_case

from _cases_meta import meta_case, meta_dependence_case, meta_scale_case  # noqa: E402

CASES["meta"] = meta_case
CASES["meta_dependence"] = meta_dependence_case
CASES["meta_scale"] = meta_scale_case

from _cases_masker import masker_case, masker_scale_case  # noqa: E402

CASES["masker"] = masker_case
CASES["masker_scale"] = masker_scale_case

from _cases_app import app_case  # noqa: E402

CASES["app"] = app_case

from _cases_surface import surface_first_level_case, surface_second_level_scale_case  # noqa: E402

CASES["surface_first_level"] = surface_first_level_case
CASES["surface_second_level_scale"] = surface_second_level_scale_case
