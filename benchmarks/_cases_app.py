"""Case ``app``: a BIDS Stats Model, run -> subject -> dataset, fitlins 0.11 vs ``chunkglm app``.

20 synthetic subjects x 2 runs (``make_synthetic_bids``, size "small": 40x48x40 voxels of 4 mm,
120 volumes; seed 0) and examples/models/one_sample.json (two conditions, three confounds, a
0.01 Hz high-pass, t contrasts a, b, aMinusB and an F test per run; fixed effects per subject; a
one-sample t test per contrast). Both tools run as their users run them, each as one command in
a fresh process tree, on 2 CPUs: fitlins' own command line from ``.venv-fitlins`` with
``--n-cpus 2`` (nipype's MultiProc; every figure it draws), and ``chunkglm app --nprocs 2`` (a
LocalCluster of 2 worker processes; the runs are converted into the cohort store inside the
command, timed), then the same command with ``CHUNKGLM_CLUSTER__LOCAL__PROCESSES=false`` (the
LocalCluster's 2 workers are threads in the app's process). Peak memory is the whole process
tree's (``_steps.command_tree``). The maps of the dataset node are compared after the timing.
``--size small`` is a smoke run: 3 tiny subjects. Registered in ``_cases.CASES``.

fitlins takes over an hour on the shared 2-core machine: ``CHUNKGLM_BENCH_APP_FITLINS=stored`` reuses
the fitlins row of ``results/app.json`` (its measurement, date and machine load are kept in the
row's label and the notes) and compares chunkglm's maps with the fitlins outputs that run left in
the work folder; chunkglm is run and measured as usual. The stored row must be of the same size.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

from _cases import CaseResult, Check, Row
from _harness import Context, Measurement, StepFailed

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "one_sample.json"
SPACE = "MNI152NLin2009cAsym"
SPEEDUP = 10.0  # chunkglm app >= 10x faster than fitlins
PEAK_FRACTION = 0.5  # chunkglm app's peak tree memory <= 1/2 of fitlins'
SIZES = {"realistic": {"n_subjects": 20, "size": "small"}, "small": {"n_subjects": 3, "size": "tiny"}}
FITLINS_LABEL = "anchor: fitlins 0.11 (nilearn 0.9), --n-cpus 2"
CONTRASTS = ("a", "b", "aMinusB")
#: The cluster-config override of the second chunkglm row (chunkglm/cluster/config.py): worker threads.
THREADS_OVERRIDE = "CHUNKGLM_CLUSTER__LOCAL__PROCESSES"


def app_case(ctx: Context) -> CaseResult:
    data = _dataset(ctx.data_dir / ctx.size / "app", **SIZES[ctx.size])
    work = ctx.work_dir("app")
    fitlins_out, chunkglm_out, threads_out = work / "fitlins", work / "chunkglm", work / "chunkglm_threads"
    fitlins = [str(ROOT / ".venv-fitlins" / "bin" / "fitlins"), data["root"], str(fitlins_out), "dataset",
               "-m", data["fitlins_model"], "-d", data["derivatives"], "-w", str(work / "fitlins_work"),
               "--space", SPACE, "--drift-model", "cosine", "--n-cpus", "2"]
    chunkglm = [str(Path(sys.executable).with_name("chunkglm")), "app", data["root"], str(chunkglm_out),
                "dataset", "--model", data["model"], "--nprocs", "2", "-q"]
    # the same command with the documented cluster-config override: dask's LocalCluster(processes=False),
    # its 2 workers threads in the app's process (env execs the command: the same process, no extra one)
    threads = ["/usr/bin/env", f"{THREADS_OVERRIDE}=false",
               *[str(threads_out) if part == str(chunkglm_out) else part for part in chunkglm]]
    stored = _stored_fitlins(ctx, fitlins_out) if os.environ.get("CHUNKGLM_BENCH_APP_FITLINS") == "stored" else None
    m = {"fitlins": stored[0] if stored else ctx.measure(
            "command_tree", command=fitlins, log=str(work / "fitlins.log"),
            clear=[str(fitlins_out), str(work / "fitlins_work")]),
         "chunkglm": ctx.measure("command_tree", command=chunkglm, log=str(work / "chunkglm.log"),
                                 clear=[str(chunkglm_out)]),
         "threads": ctx.measure("command_tree", command=threads, log=str(work / "chunkglm_threads.log"),
                                clear=[str(threads_out)])}
    speedup = m["fitlins"].wall_s / m["chunkglm"].wall_s
    peak = m["chunkglm"].peak_rss_mib / m["fitlins"].peak_rss_mib
    threads_speedup = m["fitlins"].wall_s / m["threads"].wall_s
    threads_peak = m["threads"].peak_rss_mib / m["fitlins"].peak_rss_mib
    rows = [Row(FITLINS_LABEL + (f" (stored: measured {stored[1]}, not re-run)" if stored else ""),
                m["fitlins"], "1.00×"),
            Row("chunkglm app --nprocs 2 (conversion included)", m["chunkglm"],
                f"{speedup:.1f}× faster; peak {peak:.2f}× fitlins'", f"≥ {SPEEDUP:g}× faster; peak ≤ ½ of fitlins'",
                [Check("speed-up", speedup >= SPEEDUP), Check("peak memory", peak <= PEAK_FRACTION)]),
            Row(f"chunkglm app --nprocs 2, {THREADS_OVERRIDE}=false (2 worker threads in the app's process)",
                m["threads"], f"{threads_speedup:.1f}× faster; peak {threads_peak:.2f}× fitlins'",
                f"≥ {SPEEDUP:g}× faster; peak ≤ ½ of fitlins'",
                [Check("speed-up", threads_speedup >= SPEEDUP), Check("peak memory", threads_peak <= PEAK_FRACTION)])]
    parity = _parity(fitlins_out, chunkglm_out)
    threads_parity = _parity(fitlins_out, threads_out)
    facts = {**data, "parity": parity, "threads_parity": threads_parity, "speedup": speedup, "peak_ratio": peak,
             "threads_speedup": threads_speedup, "threads_peak_ratio": threads_peak,
             "samples": {k: v.extra.get("n_samples") for k, v in m.items()}}
    notes = [
        f"Input: {data['n_subjects']} synthetic subjects × 2 runs (`make_synthetic_bids`, size "
        f"{data['size']!r}, seed 0, {data['bold_mib']:.0f} MiB of `.nii.gz` BOLD), the model "
        "examples/models/one_sample.json (fitlins gets its subject node as Type \"Meta\" and "
        "`--drift-model cosine`, its spellings of the same model).",
        "Each tool is one command in a fresh process tree: wall time from start to exit; peak memory is the "
        "largest sum of the resident memory of the command and all its descendants (sampled every 0.2 s), "
        "so it includes nipype's and dask's worker processes. chunkglm's time includes converting the runs "
        "into its cohort store; fitlins' includes the figures it draws.",
        f"The second chunkglm row is the same command with the documented cluster-config override "
        f"`{THREADS_OVERRIDE}=false` (chunkglm/cluster/config.py): dask's `LocalCluster(processes=False)`, "
        "its 2 workers threads in the app's process, so the tree is that one process (client, scheduler, "
        "workers, writing and reports together); it converts into its own store, as the first row.",
    ]
    if stored:
        notes.append(f"fitlins was not re-run: its row is the measurement of {stored[1]} ({stored[2]}), read from "
                     "results/app.json, and the parity below compares with the outputs that run wrote. The two "
                     "rows were therefore measured at different times under different loads.")
    after = [f"Dataset-node maps, fitlins vs chunkglm app (relative L2 over the voxels either writes): "
             + "; ".join(f"{name} {value:.2e}" for name, value in parity.items()) + "; with worker threads: "
             + "; ".join(f"{name} {value:.2e}" for name, value in threads_parity.items()) + "."]
    return CaseResult("app", f"chunkglm app vs fitlins: {data['n_subjects']} subjects × 2 runs, "
                      "run → subject → dataset", facts, rows, notes, after)


def _stored_fitlins(ctx: Context, fitlins_out: Path):
    """(Measurement, when, load) of the fitlins row in results/app.json, for a run without fitlins."""
    path = Path(__file__).resolve().parent / "results" / ("app.json" if ctx.size == "realistic" else "app-small.json")
    if not path.is_file() or not (fitlins_out / "node-dataset").is_dir():
        raise StepFailed(f"CHUNKGLM_BENCH_APP_FITLINS=stored needs {path} and fitlins' outputs in {fitlins_out} "
                         "from an earlier full run; run the case once without it.")
    earlier = json.loads(path.read_text())
    row = next((r for r in earlier["rows"] if r["label"].startswith(FITLINS_LABEL)), None)
    if row is None or earlier["settings"]["size"] != ctx.size:
        raise StepFailed(f"{path} holds no fitlins row of size {ctx.size!r}; run the case once without "
                         "CHUNKGLM_BENCH_APP_FITLINS=stored.")
    if "stored" in row["label"]:  # a stored row carries the first run's date and load
        when, load = row["stored_from"]["started"], row["stored_from"]["load"]
    else:
        starts, ends = earlier["machine"]["load_average_start"], earlier["machine"]["load_average_end"]
        when, load = earlier["started"], f"load average {starts[0]:.1f} at start, {ends[0]:.1f} at end"
    runs = [{"wall_s": wall, "peak_rss_mib": row["peak_rss_mib"], "rss_start_mib": row["rss_start_mib"],
             **{k: row[k] for k in ("sampled_tree_peak_mib", "largest_process_peak_mib", "n_samples") if k in row},
             "stored_from": {"started": when, "load": load}} for wall in row["wall_s_all"]]
    return Measurement(row["step"], row["args"], runs), when, load


def _dataset(folder: Path, n_subjects: int, size: str) -> dict:
    """The synthetic dataset and both spellings of the model, generated once."""
    done = folder / "dataset.json"
    if done.is_file():
        return json.loads(done.read_text())
    from chunkglm.testing import make_synthetic_bids

    ds = make_synthetic_bids(folder / "bids", n_subjects=n_subjects, n_runs=2, size=size, seed=0)
    model = json.loads(MODEL.read_text())
    fitlins_model = copy.deepcopy(model)
    fitlins_model["Nodes"][1]["Model"]["Type"] = "Meta"  # fitlins 0.11 compares with "Meta"
    (folder / "model.json").write_text(json.dumps(model))
    (folder / "fitlins_model.json").write_text(json.dumps(fitlins_model))
    bold = sum(p.stat().st_size for p in Path(ds.derivatives).rglob("*_bold.nii.gz"))
    data = {"root": str(ds.root), "derivatives": str(ds.derivatives), "model": str(folder / "model.json"),
            "fitlins_model": str(folder / "fitlins_model.json"), "n_subjects": n_subjects, "size": size,
            "bold_mib": bold / 2**20}
    done.write_text(json.dumps(data))
    return data


def _parity(fitlins_out: Path, chunkglm_out: Path) -> dict:
    import nibabel as nib
    import numpy as np

    found = {}
    for contrast in CONTRASTS:
        for stat in ("effect", "z"):
            name = f"node-dataset/contrast-{contrast}_stat-{stat}_statmap.nii.gz"
            a = np.asarray(nib.load(fitlins_out / name).dataobj, dtype=np.float64)
            b = np.asarray(nib.load(chunkglm_out / name).dataobj, dtype=np.float64)
            used = (a != 0) | (b != 0)
            found[f"{contrast} {stat}"] = float(np.linalg.norm(a[used] - b[used]) / np.linalg.norm(a[used]))
    return found
