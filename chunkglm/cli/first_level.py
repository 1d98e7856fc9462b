"""``chunkglm first-level``: every subject of a BIDS folder or store, one graph.

Writes the derivatives/glm layout (``OUTPUT_DIR/first_level/sub-XX/`` with its
JSON; ``--layout glm``, the default), nilearn's ``save_glm_to_bids`` file set
(``OUTPUT_DIR/sub-XX/``; ``--layout nilearn``) or both (``--layout both``).
Each run's residuals (4-D) only with ``--save-residuals``.

1. A BIDS folder is converted (resumably) into a store first (``--store``,
   default ``OUTPUT_DIR/cohort.zarr``).
2. ``first_level_from_bids`` on the store gives one model per subject.
3. Contrasts are checked against every design before anything is computed.
4. The subjects' fits are evaluated in waves on the cluster (each chunk read
   once; a bounded number of subjects in memory, so a cohort of any size runs
   in flat memory), and each subject's derivatives are written as it is done,
   then its provenance record (``sub-XX_task-T_provenance.json``, in
   ``sub-XX/`` with nilearn's file set, else in ``first_level/sub-XX/``),
   last: the completion marker.
5. Re-running skips complete subjects of the same analysis, redoes
   interrupted ones, and refuses (unless ``--overwrite``) to mix in results
   of other options or inputs. See :mod:`chunkglm.cli.resume`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nilearn.glm.contrasts import expression_to_contrast_vector

from chunkglm.cli import resume as subjects_io
from chunkglm.cli._args import add_list, add_output_dir, none_or, nonnegative, path_value, require, split_list
from chunkglm.cli._common import (
    add_allow_incomplete,
    chunk_bytes,
    cluster_client,
    command_budget,
    command_options,
    open_if_store,
    print_skipped,
    storage_for,
)
from chunkglm.cli.progress import Reporter
from chunkglm.errors import InputError
from chunkglm.glm.first_level import explain_worker_deaths, first_level_from_bids, fitted_in_waves
from chunkglm.glm.first_level.model import _expression
from chunkglm.glm.io.surface_derivatives import is_surface_model, save_surface_derivatives
from chunkglm.interfaces.bids import save_glm_derivatives, write_glm_to_bids
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.io.derivatives import contrast_label, source_datasets
from chunkglm.io.layout import is_url
from chunkglm.provenance import Stopwatch, cluster_summary, record


#: nilearn's hrf_model names (a custom model needs the Python API).
HRF_MODELS = ("glover", "spm", "glover + derivative", "glover + derivative + dispersion", "spm + derivative",
              "spm + derivative + dispersion", "fir")


def add_parser(sub, add_common) -> None:
    """Register the sub-command (``add_common`` adds --cluster and --no-progress)."""
    cmd = sub.add_parser("first-level", help="first-level GLM for every subject, BIDS derivatives out")
    cmd.add_argument("input", type=path_value, help="a BIDS/fMRIPrep folder or a cohort store")
    add_output_dir(cmd, "output folder for the derivatives", "--out-dir", "--out")
    cmd.add_argument("--task", required=True, help="the task whose runs are modelled")
    cmd.add_argument("--space", help="the runs' space (default: the only one)")
    add_list(cmd, "--subject", metavar="LABEL", help_text="subjects to model, e.g. --subject 01 02 "
             "(default: all)")
    add_list(cmd, "-c", "--contrast", metavar="NAME=EXPRESSION",
             help_text='t contrast "aMinusB=a - b" (a formula over design columns), or F '
                       'contrast "effects=a; b" (one formula per row); several: -c "a=a" "b=b" '
                       "(required)")
    require(cmd, "contrast", "-c/--contrast")
    add_list(cmd, "--confounds", metavar="COLUMN",
             help_text="confound columns of the runs' confounds TSV, e.g. --confounds trans_x trans_y csf "
                       "(default: none)")
    cmd.add_argument("--noise-model", default="ar1", choices=["ar1", "ols"], help="nilearn's noise_model")
    cmd.add_argument("--hrf-model", default="glover", choices=HRF_MODELS, metavar="MODEL",
                     help=f"nilearn's hrf_model, one of {list(HRF_MODELS)}")
    cmd.add_argument("--drift-model", default="cosine", type=none_or, choices=["cosine", "polynomial", None],
                     metavar="MODEL", help="nilearn's drift_model: cosine, polynomial or none")
    cmd.add_argument("--high-pass", type=nonnegative, default=0.01, metavar="HZ",
                     help="nilearn's high_pass (cosine drift cut-off)")
    add_output_options(cmd)
    cmd.add_argument("--chunk-mb", type=float, metavar="MB",
                     help="memory budget, MiB per chunk (default: a store's chunks as they are, 64 "
                          "when a BIDS input is converted); smaller values give smaller task blocks, "
                          "so less worker memory (stored chunks larger than it are split into task "
                          "blocks, each still read once). Lowered to a quarter of the cluster "
                          "config's memory_limit per worker when larger.")
    cmd.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                     help="option of the store's object storage, e.g. endpoint_url=http://127.0.0.1:9000 "
                          "(over the cluster config's storage: section; credentials only from the "
                          "environment); repeat (default: none)")
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace complete subjects whose results came from other options or inputs "
                          "(default: refuse to)")
    add_allow_incomplete(cmd)
    add_common(cmd)
    cmd.set_defaults(func=run)


#: --layout values: what each writes per subject.
LAYOUTS = ("glm", "nilearn", "both")


def add_output_options(cmd) -> None:
    """--layout, --save-residuals and --store (where a BIDS input is converted to)."""
    cmd.add_argument(
        "--layout", choices=LAYOUTS, default="glm",
        help="file set per subject. glm (default, the lean one): the derivatives/glm layout, "
             "first_level/sub-XX/ with one copy of each map (t|F, z, effect, variance per contrast), "
             "the design matrix, the mask and one JSON sidecar; `chunkglm report` and `chunkglm "
             "second-level` read it. nilearn: nilearn's save_glm_to_bids file set in sub-XX/ (also p "
             "maps, cluster tables, r-squared, PNG and SVG figures, a report page: on the demo twice "
             "the disk and about 4x the time of glm, mostly its figures). both: the two, so every map "
             "twice (with --save-residuals, what every run wrote before --layout existed)")
    cmd.add_argument(
        "--save-residuals", action="store_true",
        help="also write each run's residuals (stat-errorts, 4-D float32: one more file as large as "
             "the run, and a second read of its data): nilearn's sub-XX/..._stat-errorts_statmap.nii.gz "
             "with --layout nilearn or both, else first_level/sub-XX/..._stat-errorts.nii.gz "
             "(default: not written)")
    cmd.add_argument(
        "--store", type=path_value, metavar="PATH",
        help="BIDS input: the cohort store it is converted into, a folder or URL, kept so that a "
             "re-run (or extract) skips the conversion; it holds every run's in-mask voxels, "
             "compressed (the demo's: 43 MB for 196 MB of BOLD files; the README gives each option's "
             "cost) (default: OUTPUT_DIR/cohort.zarr). Refused with a store input, which is read where "
             "it is")


def parse_contrasts(items) -> dict[str, str]:
    """``["aMinusB=a - b"]`` -> ``{"aMinusB": "a - b"}``."""
    contrasts = {}
    for item in items:
        name, sep, expression = item.partition("=")
        if not sep or not name.strip() or not expression.strip():
            raise InputError(f"--contrast takes NAME=EXPRESSION, e.g. 'aMinusB=a - b'; received {item!r}.")
        contrasts[name.strip()] = expression.strip()
    return contrasts


def _store_for(args, client, reporter):
    """The input as an open cohort (a BIDS folder is converted into a store first)."""
    storage = storage_for(args)
    cohort = open_if_store(args.input, storage, args.allow_incomplete)
    if cohort is not None:
        if args.store is not None:
            raise InputError(f"--store {args.store}: the input {args.input} is already a cohort store, "
                             "read where it is; --store names where a BIDS input is converted to. "
                             "Leave --store out.")
        return cohort
    store = args.store or _default_store(args.output_dir)
    with reporter.phase("converting") as advance:
        report = convert(args.input, store, task=args.task, space=args.space, subjects=split_list(args.subject),
                         client=client, chunk_bytes=command_budget(args) or chunk_bytes(None, None),
                         storage_options=storage, progress=reporter.converter_callback(advance))
    if report.skipped and args.chunk_mb is not None:
        reporter.line(f"note: {len(report.skipped)} run(s) already in {report.store} keep their "
                      "stored chunks; --chunk-mb splits them into smaller task blocks.")
    return open_cohort(store, storage, allow_incomplete=args.allow_incomplete)


def _default_store(out_dir) -> str:
    """``OUTPUT_DIR/cohort.zarr`` (a URL stays a URL)."""
    text = str(out_dir)
    return f"{text.rstrip('/')}/cohort.zarr" if is_url(text) else str(Path(text) / "cohort.zarr")


def _models(args, store):
    """One fitted (lazy) model per subject, with its store runs."""
    columns = split_list(args.confounds) or None
    models, runs, events, confounds = first_level_from_bids(
        store, args.task, space_label=args.space, sub_labels=split_list(args.subject),
        noise_model=args.noise_model, hrf_model=args.hrf_model, drift_model=args.drift_model,
        high_pass=args.high_pass, confounds_columns=columns)
    budget = command_budget(args)
    for model, run_list, ev, conf in zip(models, runs, events, confounds):
        model.chunk_bytes = budget  # --chunk-mb: task blocks within the budget (None: the store's chunks)
        model.fit(run_list, events=ev, confounds=conf)
    return list(zip(models, runs))


def model_contrasts(model, contrasts):
    """Per model: name -> weights (t: a formula; F: a matrix of formula rows), and types."""
    columns = list(model.design_matrices_[0].columns)
    weights, types = {}, {}
    for name, expression in contrasts.items():
        rows = [row.strip() for row in expression.split(";") if row.strip()]
        if len(rows) == 1:
            weights[name], types[name] = rows[0], "t"
        else:
            weights[name] = np.vstack([_expression(r, columns, expression_to_contrast_vector) for r in rows])
            types[name] = "F"
    for value in weights.values():
        model._contrast_vectors(value)  # raises InputError naming the columns
    return weights, types


@dataclass
class SubjectJob:
    """One subject: its model, contrasts, inputs and the state of its outputs."""

    model: object
    weights: dict
    types: dict
    inputs: list
    identity: dict
    state: subjects_io.SubjectState

    @property
    def label(self) -> str:
        """The subject label (``01``)."""
        return str(self.model.subject_label)


def analysis_options(args, contrasts, model) -> dict:
    """The options that decide a subject's results (compared on resume)."""
    return {"task": args.task, "space": args.space, "contrasts": contrasts,
            "confounds": _confounds_option(args.confounds), "noise_model": args.noise_model,
            "hrf_model": args.hrf_model, "drift_model": args.drift_model,
            "high_pass": args.high_pass, "slice_time_ref": model.slice_time_ref,
            "outputs": {"layout": args.layout, "residuals": args.save_residuals}}


def _confounds_option(values):
    """The confounds as the records have always held them: one comma-separated string (or None),
    so a re-run with the list spelling resumes the subjects of the comma spelling."""
    columns = split_list(values)
    return ",".join(columns) if columns else None


#: The longest suffix of the file names written per contrast (nilearn's save_glm_to_bids set).
LONGEST_SUFFIX = "_stat-variance_statmap.nii.gz"
#: File-name length limit where the file system cannot be asked (object stores; BIDS tools).
PORTABLE_NAME_MAX = 255


def _name_max(output_dir) -> int:
    """The longest file name the output folder's file system takes."""
    if is_url(str(output_dir)):
        return PORTABLE_NAME_MAX
    folder = Path(output_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return min(PORTABLE_NAME_MAX, os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return PORTABLE_NAME_MAX


def check_file_names(args, contrasts, subjects) -> None:
    """Every file name the outputs will have is valid and distinct, before anything is touched.

    Contrast names become labels (nilearn's rule, lower-cased in the file names): two names
    with one label would overwrite each other's files; a name whose files would be longer than
    the file system allows would fail half-way through writing.
    """
    labels = {}
    for name in contrasts:
        label = contrast_label(name).lower()
        if label in labels:
            raise InputError(f"contrasts {labels[label]!r} and {name!r} both become the file label "
                             f"contrast-{label}, so one would overwrite the other's files; rename one.")
        labels[label] = name
    limit = _name_max(args.output_dir)
    for label, name in labels.items():
        longest = max(len(f"sub-{s}_task-{args.task}_contrast-{label}{LONGEST_SUFFIX}") for s in subjects)
        if longest > limit:
            raise InputError(f"contrast name {name[:40]!r}... ({len(name)} characters) makes file names of "
                             f"{longest} characters, over the {limit} the output folder takes; give it a "
                             "shorter name.")


def check_surface_outputs(args, models) -> None:
    """Surface runs get the glm layout in GIFTI/CIFTI files only: nilearn's file set (--layout
    nilearn/both) and residuals (--save-residuals) are refused before anything is computed."""
    surface = [str(model.subject_label) for model in models if is_surface_model(model)]
    if not surface:
        return
    if args.layout != "glm" or args.save_residuals:
        given = f"--layout {args.layout}" if args.layout != "glm" else "--save-residuals"
        raise InputError(f"{given}: the runs of sub-{surface[0]} are surface runs, whose maps are written in the "
                         "glm layout only (GIFTI/CIFTI files, --layout glm) and without residuals; leave "
                         f"{given} out.")
    if len(surface) != len(models):
        raise InputError("some subjects' runs are surface runs and others volume runs; model one space at a "
                         "time (--space).")


def plan_subjects(args, contrasts, fitted, out) -> list[SubjectJob]:
    """Check contrasts on every design and every output name, and classify existing outputs;
    compute, write and delete nothing (so a failed --overwrite leaves every subject as it was)."""
    check_file_names(args, contrasts, [str(model.subject_label) for model, _ in fitted])
    check_surface_outputs(args, [model for model, _ in fitted])
    jobs = []
    for model, nodes in fitted:
        weights, types = model_contrasts(model, contrasts)
        inputs = subjects_io.run_inputs(nodes)
        identity = subjects_io.analysis_identity(analysis_options(args, contrasts, model), inputs)
        state = subjects_io.subject_state(out, str(model.subject_label), args.task, identity)
        jobs.append(SubjectJob(model, weights, types, inputs, identity, state))
    conflicts = [job.state for job in jobs if job.state.status == "conflict"]
    if conflicts and not args.overwrite:
        raise subjects_io.conflict_error(conflicts, args.output_dir)
    return jobs


def _write_subject(args, job, out, context) -> None:
    model = job.model
    if job.state.status == "conflict":  # --overwrite: incomplete from here on
        subjects_io.clear_record(out, job.label, args.task)
    paths = []
    if is_surface_model(model):  # GIFTI / CIFTI maps; other file sets refused by plan_subjects
        paths += save_surface_derivatives(model, job.weights, args.output_dir, task_label=args.task,
                                          contrast_types=job.types, confounds=model.confound_names_[0] or [])
    elif args.layout in ("glm", "both"):
        paths += save_glm_derivatives(model, job.weights, args.output_dir, task_label=args.task,
                                      contrast_types=job.types, confounds=model.confound_names_[0] or [],
                                      residuals=args.save_residuals and args.layout == "glm")
    if args.layout in ("nilearn", "both"):
        paths += write_glm_to_bids(model, job.weights, contrast_types=job.types, out_dir=args.output_dir,
                                   prefix=f"sub-{job.label}_task-{args.task}", residuals=args.save_residuals)
    entries = subjects_io.output_entries(out, paths, job.label)
    subjects_io.remove_stale(out, job.state.record, entries)
    content = record("first-level", inputs=job.inputs, options=context["options"],
                     cluster=context["cluster"], stopwatch=context["stopwatch"],
                     subject=job.label, analysis=job.identity, outputs=entries)
    marker, *copies = subjects_io.record_paths(job.label, args.task, args.layout)
    for copy in copies:
        out.write_json(copy, content)
    out.write_json(marker, content)  # last: the subject is complete from here on


#: What to change when a worker dies over its memory limit, in this command's terms.
WORKER_DIED_ADVICE = (
    "Use smaller chunks: convert into a new store with a smaller --chunk-mb (e.g. --chunk-mb 16 "
    "--store NEW.zarr), or give each worker more memory (memory_limit in the cluster config, e.g. "
    "CHUNKGLM_CLUSTER__LOCAL__MEMORY_LIMIT=8GiB). Complete subjects are kept.")


def _fit_and_write(args, jobs, out, client, reporter, context) -> list[str]:
    todo = [job for job in jobs if job.state.status != "complete"]
    for job in jobs:
        if job.state.status == "complete":
            reporter.line(f"sub-{job.label}: complete (same analysis), skipped")
        elif job.state.status == "partial":
            reporter.line(f"sub-{job.label}: outputs of an interrupted run, recomputed")
    reporter.line(f"fitting {len(todo)} subject(s), {sum(len(j.model._runs) for j in todo)} run(s)")
    models = [job.model for job in todo]
    if reporter.bars:  # a bar over the voxel blocks fitted (with its ETA), a line per subject written
        runs = {id(run): job.label for job in todo for run in job.model._runs}
        n_blocks = sum(len(run.fits) for job in todo for run in job.model._runs)
        with reporter.phase("first-level: voxel blocks fitted", n_blocks) as advance, \
                explain_worker_deaths(models, client, WORKER_DIED_ADVICE):
            waves = fitted_in_waves(models, on_block=lambda run: advance(f"sub-{runs[id(run)]}"))
            for _, job in zip(waves, todo):  # yields job.model, fits evaluated
                _write_subject(args, job, out, context)
                reporter.line(f"sub-{job.label} written")
        return [job.label for job in todo]
    with reporter.phase("first-level", len(todo)) as advance, \
            explain_worker_deaths(models, client, WORKER_DIED_ADVICE):
        for _, job in zip(fitted_in_waves(models), todo):  # yields job.model, fits evaluated
            _write_subject(args, job, out, context)
            advance(f"sub-{job.label} written")
    return [job.label for job in todo]


def run(args) -> int:
    """Entry point of ``chunkglm first-level``."""
    stopwatch = Stopwatch()
    contrasts = parse_contrasts(args.contrast)
    reporter = Reporter(bars=not args.no_progress)
    out = subjects_io.OutDir(args.output_dir)
    with cluster_client(args) as client:
        store = _store_for(args, client, reporter)
        jobs = plan_subjects(args, contrasts, _models(args, store), out)  # fails before computing
        print_skipped(store, reporter.line)
        context = {"options": command_options(args), "cluster": cluster_summary(client),
                   "stopwatch": stopwatch}
        with source_datasets([args.input]):
            computed = _fit_and_write(args, jobs, out, client, reporter, context)
    skipped = [job.label for job in jobs if job.label not in computed]
    out.write_json(f"task-{args.task}_{subjects_io.RECORD_SUFFIX}",
                   record("first-level", inputs=[i for job in jobs for i in job.inputs],
                          options=context["options"], cluster=context["cluster"], stopwatch=stopwatch,
                          subjects_computed=computed, subjects_skipped=skipped))
    print(f"derivatives: {out.url}")
    return 0
