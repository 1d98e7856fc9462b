"""Benchmark cases, registered by name in :data:`CASES`.

A case is a function ``case(ctx) -> CaseResult``: it prepares its inputs,
measures its steps with ``ctx.measure(step, **kwargs)`` (a fresh child
process each) and turns the measurements into table rows with their targets.
``run.py`` calls it once per round (``--repeat``); measurements accumulate
over the rounds, and it prints and saves what the last round returns.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from _data import synthetic_run
from _harness import Context, Measurement

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
    """What a case reports: facts above the table, rows, notes below, JSON."""

    name: str
    title: str
    facts: dict
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

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


CASES = {"convert": convert_case}
