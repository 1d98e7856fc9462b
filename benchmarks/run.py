"""chunkglm benchmark runner.

Protocol (ARCHITECTURE, "performance"): chunkglm and its anchor run on the
same data in one process tree, one after the other, and the runner prints a
table of wall time, peak memory, ratio and the *floor* (the time to merely
read and decompress the input once). Figures are ratios measured side by
side, so they carry over between machines better than seconds do.

- Every step runs in a fresh child process (``_steps.py``), one after the
  other, never two at once. The child times only the work
  (``time.perf_counter``; imports and set-up excluded) and reports its own
  peak RSS (``ru_maxrss``, interpreter and imports included) and its RSS when
  the work starts (that baseline).
- The case runs ``--repeat`` times in rounds (every step once, then every
  step again, ...), so that a burst of load on a shared machine spoils one
  run of several steps rather than every run of one step. The table shows
  each step's best (minimum) wall time and largest peak RSS: the minimum is
  the least disturbed run. The page cache is warm (the input was
  just generated or read), which is the fair case for both sides.
- Inputs are synthetic BIDS datasets (``chunkglm.testing``), generated once
  into ``--data-dir`` and reused.
- A missed target is reported, not an error: the exit code is 0 unless a
  step crashed.

Usage::

    python benchmarks/run.py [--case convert|first_level|first_level_cohort|all] [--repeat 2]
                             [--data-dir benchmarks/.data] [--size realistic|small]

Results go to ``benchmarks/results/<case>.json`` and ``<case>.md``
(``<case>-small.*`` for smoke runs, so they never replace the real figures).
Cases are registered in ``_cases.CASES``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cases import CASES, CaseResult  # noqa: E402
from _harness import Context, StepFailed, machine, markdown_table, source_state  # noqa: E402

RESULTS_DIR = HERE / "results"
HEADERS = ["step", "wall s (best of {n})", "peak RSS MiB", "RSS at start MiB", "ratio", "target", "met?"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run chunkglm benchmarks side by side with their anchors.")
    parser.add_argument("--case", choices=[*sorted(CASES), "all"], action="append",
                        help="case to run (repeatable); default (or 'all'): every case")
    parser.add_argument("--repeat", type=int, default=2, help="runs per step; the best wall time is kept (default 2)")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data",
                        help="cache of generated datasets and scratch stores (default benchmarks/.data)")
    parser.add_argument("--size", choices=["realistic", "small"], default="realistic",
                        help="'small' for a quick smoke run (default realistic)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = sorted(CASES) if not args.case or "all" in args.case else list(dict.fromkeys(args.case))
    for name in names:
        print(f"case {name!r} ({args.size}, best of {args.repeat}) ...", file=sys.stderr, flush=True)
        info = machine()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            result = run_case(CASES[name], args)
        except StepFailed as err:
            print(f"case {name!r} crashed: {err}", file=sys.stderr)
            return 1
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        info["source_end"] = source_state()
        report = render(result, info, args, started)
        print(report)
        save(result, info, args, started, report)
    return 0


def run_case(case, args) -> CaseResult:
    """Run every step of ``case`` once per round; measurements accumulate."""
    ctx = Context(repeat=args.repeat, data_dir=args.data_dir.absolute(), size=args.size)
    for ctx.round in range(args.repeat):
        result = case(ctx)
    return result


def render(result: CaseResult, info: dict, args, started: str) -> str:
    """The markdown report of one case: context lines, table, notes, misses."""
    headers = [h.format(n=args.repeat) for h in HEADERS]
    rows = [[row.label, f"{row.measurement.wall_s:.3f}", f"{row.measurement.peak_rss_mib:.0f}",
             f"{row.measurement.rss_start_mib:.0f}", row.ratio, row.target, row.met] for row in result.rows]
    missed = result.missed
    lines = [
        f"## Benchmark: {result.title}",
        "",
        f"Machine: {info['cpu_model']}, {info['cores']} cores ({info['cores_usable']} usable), "
        f"{info['memory_gib']} GiB RAM; load average {info['load_average_start'][0]} at start, "
        f"{info['load_average_end'][0]} at end. Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items()) + f". Started {started}. "
        + _source_line(info),
        "",
        f"Each step ran {args.repeat}× (in rounds), each time in a fresh process, one after the other; wall = best (minimum) "
        "time of the work only (imports excluded), peak RSS = largest `ru_maxrss` of the process "
        "(imports included; 'RSS at start' is that baseline). Warm page cache.",
        "",
        *[f"{note}\n" for note in result.notes],
        markdown_table(headers, rows),
        "",
        *[f"{note}\n" for note in result.after],
        ("Targets missed: " + "; ".join(missed) + "." if missed else "All targets met."),
    ]
    return "\n".join(lines)


def _source_line(info: dict) -> str:
    start, end = info.get("source_start", "unknown"), info.get("source_end", "unknown")
    if start == end:
        return f"chunkglm source: {start}."
    return f"chunkglm source: {start} at start, {end} at end (**changed during the run**: figures may mix both)."


def save(result: CaseResult, info: dict, args, started: str, report: str) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = result.name if args.size == "realistic" else f"{result.name}-{args.size}"  # a smoke run never replaces the real figures
    data = {
        "case": result.name,
        "started": started,
        "settings": {"size": args.size, "repeat": args.repeat},
        "machine": info,
        "facts": result.facts,
        "rows": [{"label": row.label, "ratio": row.ratio, "target": row.target,
                  "checks": {c.name: c.met for c in row.checks}, **row.measurement.as_json()}
                 for row in result.rows],
        "targets_missed": result.missed,
    }
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(report + "\n")
    print(f"\nwrote {RESULTS_DIR / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
