"""``chunkglm extract``: region signals of every run of a store or BIDS folder.

1. A BIDS folder is converted (resumably) into a store first.
2. The runs (filtered by --task/--space/--subject) go through one
   MultiMapsMasker: one dask graph for all runs (the maps' Gram matrix once,
   each data chunk read once).
3. Per run, ``OUTPUT_DIR/sub-XX[/ses-YY]/func/<entities>_desc-<atlas>_timeseries.tsv``
   with a JSON sidecar; optionally the (run, time, region) array into the
   store (``timeseries/<atlas>``).
4. ``OUTPUT_DIR/desc-<atlas>_provenance.json`` (last): the options, the maps' sha256 and every
   file of this atlas's analysis in the folder. Runs of other subjects, tasks or spaces may be
   added by later runs of the same analysis (their files join the record); an analysis with other
   options or maps under the same atlas label is refused before anything is computed, or, with
   ``--overwrite``, replaces it: its files are removed once the new ones are written
   (:mod:`chunkglm.cli.replace`).
"""

from __future__ import annotations

from pathlib import Path

from chunkglm.cli._args import add_list, add_output_dir, deprecated_alias, path_value, positive, split_list
from chunkglm.cli._common import (
    add_allow_incomplete,
    add_chunk_mb,
    chunk_bytes,
    cluster_client,
    command_budget,
    command_options,
    open_if_store,
    output_location,
    print_skipped,
    relative_output,
    storage_for,
    write_output_record,
)
from chunkglm.cli.progress import Reporter
from chunkglm.cli.replace import RUN_ONLY, check_folder, earlier_outputs, remove_replaced
from chunkglm.errors import InputError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.io.derivatives import source_datasets
from chunkglm.io.layout import redact_url
from chunkglm.io.sources import file_sha256
from chunkglm.maskers import MultiMapsMasker, save_timeseries, save_timeseries_to_store
from chunkglm.maskers.outputs import atlas_label
from chunkglm.provenance import Stopwatch, cluster_summary, record

STANDARDIZE_CHOICES = ("zscore_sample", "zscore", "psc", "none")


def add_parser(sub, add_common) -> None:
    """Register the sub-command (``add_common`` adds --cluster and --no-progress)."""
    cmd = sub.add_parser("extract", help="region signals from probabilistic maps, BIDS TSV out")
    cmd.add_argument("input", nargs="?", type=path_value,
                     help="a BIDS/fMRIPrep folder or a cohort store (or give --store)")
    cmd.add_argument("--maps", required=True, type=path_value,
                     help="4-D NIfTI of probabilistic maps (one volume per region)")
    add_output_dir(cmd, "output folder", "--out-dir", "--out")
    cmd.add_argument("--atlas", required=True, help="atlas label for desc-<atlas> (alphanumeric)")
    cmd.add_argument("--store", type=path_value,
                     help="the cohort store to read; for a BIDS input, where it is converted "
                          "(default OUTPUT_DIR/cohort.zarr)")
    cmd.add_argument("--task", help="keep the runs of this task (default: all tasks)")
    cmd.add_argument("--space", help="keep the runs of this space (default: every space)")
    add_list(cmd, "--subject", metavar="LABEL", help_text="subjects to extract, e.g. --subject 01 02 "
             "(default: all)")
    cmd.add_argument("--mask", type=path_value,
                     help="mask_img: a 3-D mask restricting the maps (default: none)")
    cmd.add_argument("--standardize", default="none", choices=STANDARDIZE_CHOICES,
                     help="nilearn's standardize of the signals")
    cmd.add_argument("--detrend", action="store_true", help="remove a linear trend (nilearn's detrend)")
    cmd.add_argument("--low-pass", type=positive, metavar="HZ", help="low-pass cut-off (default: none)")
    cmd.add_argument("--high-pass", type=positive, metavar="HZ", help="high-pass cut-off (default: none)")
    cmd.add_argument("--t-r", type=positive, metavar="S",
                     help="repetition time in seconds (default: each run's RepetitionTime)")
    add_list(cmd, "--confounds", metavar="COLUMN",
             help_text="stored confound columns regressed out, e.g. --confounds trans_x trans_y csf "
                       "(n/a values become 0; default: none)")
    deprecated_alias(cmd, "--confounds-columns", dest="confounds", new="--confounds", kind="extend")
    cmd.add_argument("--high-variance-confounds", action="store_true",
                     help="add nilearn's high-variance confounds")
    cmd.add_argument("--resampling-target", default="data", choices=["data", "mask", "maps"],
                     help="the grid the maps and data are resampled to (nilearn's resampling_target)")
    add_allow_incomplete(cmd)
    add_chunk_mb(cmd, " (the maps kept in memory and the runs read together derive from it)")
    cmd.add_argument("--to-store", action="store_true",
                     help="also write the (run, time, region) array to the store's timeseries/<atlas> "
                          "(default: TSV files only)")
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace another analysis of the same --atlas label in the output folder (its "
                          "record desc-<atlas>_provenance.json states other options or maps): its files are "
                          "removed once the new ones are written (default: refuse, nothing written; runs "
                          "of the same analysis are always added or rewritten)")
    add_common(cmd)
    cmd.set_defaults(func=run)


#: Options that select which runs are extracted, or where from: runs of one analysis may be
#: extracted in several batches (other subjects, tasks, spaces) into one folder.
SELECTION = frozenset({"input", "store", "subject", "task", "space", "to_store", "atlas", "maps"})


def record_path(atlas: str) -> str:
    """The atlas's provenance record, relative to the output folder."""
    return f"desc-{atlas}_provenance.json"


def _cohort(args, client, reporter):
    storage = storage_for(args)
    if args.input is None:
        if args.store is None:
            raise InputError("give a BIDS folder or store as INPUT, or --store STORE.")
        return open_cohort(args.store, storage, allow_incomplete=args.allow_incomplete)
    cohort = open_if_store(args.input, storage, args.allow_incomplete)
    if cohort is not None:
        return cohort
    if not Path(args.input).is_dir():
        raise InputError(f"{args.input} is neither a cohort store nor a BIDS folder.")
    store = args.store or output_location(args.output_dir, "cohort.zarr")
    with reporter.phase("converting") as advance:
        convert(args.input, store, task=args.task, space=args.space, subjects=split_list(args.subject),
                client=client,
                chunk_bytes=command_budget(args) or chunk_bytes(None, None),
                storage_options=storage, progress=reporter.converter_callback(advance))
    return open_cohort(store, storage, allow_incomplete=args.allow_incomplete)


def _runs(args, cohort):
    subjects = split_list(args.subject)
    nodes = sorted(cohort.select(task=args.task, space=args.space, sub=subjects), key=lambda n: n.name)
    if not nodes:
        raise InputError(f"no run of {cohort.location} matches task={args.task!r}, space={args.space!r}, "
                         f"subjects={subjects!r}.")
    return nodes


def _confounds(args, nodes):
    columns = split_list(args.confounds)
    if not columns:
        return None
    return [node.confound_columns(columns).fillna(0.0) for node in nodes]




def masker_for(args):
    """The MultiMapsMasker the command's options describe."""
    return MultiMapsMasker(
        args.maps, mask_img=args.mask, standardize=False if args.standardize == "none" else args.standardize,
        detrend=args.detrend, low_pass=args.low_pass, high_pass=args.high_pass, t_r=args.t_r,
        high_variance_confounds=args.high_variance_confounds, resampling_target=args.resampling_target,
        chunk_bytes=command_budget(args))


def run(args) -> int:
    """Entry point of ``chunkglm extract``."""
    atlas_label(args.atlas)  # fail before any work
    stopwatch = Stopwatch()
    reporter = Reporter(bars=not args.no_progress)
    options = command_options(args)
    maps = {"path": options["maps"], "sha256": file_sha256(args.maps) if Path(args.maps).is_file() else None}
    relative = record_path(args.atlas)
    replaced = check_folder(args.output_dir, [relative], {"options": options, "maps_sha256": maps["sha256"]},
                            command="extract", overwrite=args.overwrite, extra=("maps_sha256",),
                            run_only=RUN_ONLY | SELECTION)
    with cluster_client(args) as client:
        cohort = _cohort(args, client, reporter)
        nodes = _runs(args, cohort)
        print_skipped(cohort, reporter.line)
        masker = masker_for(args).fit(nodes)
        reporter.line(f"extracting {masker.n_elements_} region signals from {len(nodes)} run(s)")
        signals = masker.transform_to_xarray(nodes, confounds=_confounds(args, nodes))
        cluster = cluster_summary(client)
    with source_datasets([args.input or args.store]):
        paths = save_timeseries(signals, args.output_dir, args.atlas)
    if args.to_store:
        store = args.store or args.input
        path = save_timeseries_to_store(signals, store, args.atlas, storage_for(args))
        reporter.line(f"wrote {path} into {store}")
    written = [relative_output(p, args.output_dir) for p in paths]
    outputs = [f for p in written for f in (p, p.removesuffix(".tsv") + ".json")]
    for removed in remove_replaced(args.output_dir, replaced, outputs, relative):
        reporter.line(f"removed {removed} (--overwrite: of the analysis replaced)")
    outputs = earlier_outputs(args.output_dir, relative, outputs) + outputs
    write_output_record(args.output_dir, relative,
                        record("extract", inputs=[maps], options=options, cluster=cluster, stopwatch=stopwatch,
                               maps_sha256=maps["sha256"], outputs=outputs), storage_for(args))
    print(f"wrote {len(paths)} timeseries file(s) under {redact_url(str(args.output_dir))}")
    return 0

