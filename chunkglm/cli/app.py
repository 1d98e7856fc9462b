"""``chunkglm app``: a BIDS Stats Model run as a BIDS App, fitlins' arguments and derivatives.

``chunkglm app BIDS_DIR OUTPUT_DIR {run,session,participant,dataset} --model model.json``

1. The model is read and validated (bsmschema) before anything else: an
   invalid model is a one-line error naming the field, and nothing is read
   or written.
2. The preprocessed runs (``--derivatives``, default
   ``BIDS_DIR/derivatives/fmriprep``) are converted, resumably, into a cohort
   store (``--store``, default ``OUTPUT_DIR/cohort.zarr``); a re-run skips
   the runs already there.
3. pybids builds the model's graph (design matrices, contrasts, groups) and
   :class:`chunkglm.glm.stats_models.ModelRun` runs its nodes up to the
   analysis level (participant = the Subject nodes; the maps it stages for the workers in a
   temporary folder inside the store's folder, ``STORE/.scratch/``, which the workers read
   already, local or on an object store, removed at the end), writing fitlins'
   derivatives under ``OUTPUT_DIR/node-<name>/`` (``--layout glm|both``: also, or only, the
   derivatives/glm layout's ``first_level/`` and ``group_level/``,
   :mod:`chunkglm.glm.stats_models.glm_layout`; ``--n-perm``: max-T permutation FWE maps of the
   Dataset glm nodes' t contrasts, :mod:`chunkglm.glm.stats_models.inference`) and an HTML page
   per run and node group under ``OUTPUT_DIR/reports/`` (unless ``--no-reports``), then a
   ``dataset_description.json`` and the provenance record
   ``OUTPUT_DIR/app_provenance.json`` (last), listing every file of the folder's analysis.
   An OUTPUT_DIR whose record states another model or other options (levels and
   ``--participant-label`` batches aside) is refused before anything is read; ``--overwrite``
   replaces it, its files removed once the new ones are written (:mod:`chunkglm.cli.replace`).

The cluster: ``--cluster``/``--scheduler`` as every command; ``--nprocs``/``--mem`` (fitlins'
``--n-cpus``/``--mem-gb``) size the local one. ``-v``/``-q``: more or fewer lines.

The output folder is a local folder (later nodes read the maps earlier ones
wrote); object-store outputs are refused.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from chunkglm.cli._args import add_list, add_sidedness, path_value, probability
from chunkglm.cli._common import (
    add_chunk_mb,
    cluster_client,
    command_budget,
    command_options,
    print_progress,
    relative_output,
    write_output_record,
)
from chunkglm.chunking import as_bytes
from chunkglm.cli.replace import RUN_ONLY, check_folder, earlier_outputs, remove_replaced
from chunkglm.errors import InputError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert, file_sha256
from chunkglm.io.derivatives import StagedOutput, dataset_description, write_json
from chunkglm.io import locks
from chunkglm.io.layout import is_url, open_root
from chunkglm.io.write_run import release_free_memory
from chunkglm.provenance import Stopwatch, cluster_summary, record

#: The store's subfolder of the model runs' staged maps (see _scratch_dir).
SCRATCH = ".scratch"
#: fitlins' default space.
DEFAULT_SPACE = "MNI152NLin2009cAsym"
#: BIDS-Apps analysis levels (chunkglm.glm.stats_models.ANALYSIS_LEVELS' keys).
ANALYSIS_LEVELS = ("run", "session", "participant", "dataset")


def add_parser(sub, add_common) -> None:
    """Register the sub-command (``add_common`` adds --cluster, --scheduler, --workers, --no-progress)."""
    cmd = sub.add_parser("app", help="run a BIDS Stats Model (run to dataset), fitlins' derivatives out")
    cmd.add_argument("bids_dir", type=path_value, help="the raw BIDS dataset (events, sidecars)")
    cmd.add_argument("output_dir", type=path_value, help="output folder for the derivatives (local)")
    cmd.add_argument("analysis_level", choices=ANALYSIS_LEVELS,
                     help="run the model's nodes up to this level (participant: its Subject nodes)")
    cmd.add_argument("-m", "--model", required=True, metavar="PATH|auto",
                     help="a BIDS Stats Model JSON file, or 'auto' for the model pybids derives from the "
                          "events (required)")
    add_list(cmd, "--participant-label", metavar="LABEL",
             help_text="subjects to analyse, sub- optional: --participant-label 01 02 (default: all)")
    cmd.add_argument("--task", help="keep the runs of this task (default: the model's Input)")
    cmd.add_argument("--space", default=DEFAULT_SPACE, help="the preprocessed runs' space")
    cmd.add_argument("--desc-label", default="preproc", help="the preprocessed BOLD files' desc label")
    cmd.add_argument("-d", "--derivatives", type=path_value, metavar="DIR",
                     help="the fMRIPrep derivatives folder (default: BIDS_DIR/derivatives/fmriprep)")
    cmd.add_argument("--store", type=path_value, metavar="PATH",
                     help="the cohort store the runs are converted into, kept so that a re-run skips the "
                          "conversion (default: OUTPUT_DIR/cohort.zarr)")
    cmd.add_argument("--layout", choices=("fitlins", "glm", "both"), default="fitlins",
                     help="file set. fitlins: fitlins' node-<name>/ folders (every node's maps, the runs' "
                          "designs and figures). glm: the derivatives/glm layout chunkglm's other commands "
                          "write: first_level/ (the Subject/Session nodes' maps) and group_level/ (the "
                          "Dataset glm node: t|F and z maps, FDR and FWE corrected maps at --alpha, the "
                          "design, the mask, one sidecar; several Dataset glm nodes: group_level/node-<name>/ "
                          "each); fitlins' files are then intermediate, in a "
                          "temporary folder removed at the end. both: the two")
    cmd.add_argument("--no-reports", dest="reports", action="store_false",
                     help="no HTML pages (default: one per run and per Subject/Session/Dataset node group, "
                          "under OUTPUT_DIR/reports/, with reports/index.html)")
    _add_permutation_options(cmd)
    add_chunk_mb(cmd)
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace another analysis already in OUTPUT_DIR (app_provenance.json states another "
                          "model or other options): its files are removed once the new ones are written "
                          "(default: refuse, nothing written; runs of the same analysis at other levels or "
                          "for other participants are always added)")
    add_common(cmd)
    _add_size_and_verbosity(cmd)
    cmd.set_defaults(func=run)


def _add_permutation_options(cmd) -> None:
    """--n-perm, --random-state, --alpha and the sidedness of the dataset nodes' permutation test."""
    cmd.add_argument("--n-perm", type=int, default=0, metavar="N",
                     help="permutations of nilearn's max-T test for every t contrast of the Dataset "
                          "nodes of Type glm: their -log10 FWE p map (stat-logpMaxT) and FWE-corrected z "
                          "map (stat-z_desc-fweCorrected) beside the node's maps; 0: no permutation test")
    cmd.add_argument("--random-state", type=int, metavar="SEED",
                     help="with --n-perm: seed of the permutations (nilearn's random_state; default: "
                          "none, a new seed each run, recorded in the provenance)")
    cmd.add_argument("--alpha", type=probability, default=0.05,
                     help="with --n-perm: the FWE rate of the stat-z_desc-fweCorrected maps; with --layout "
                          "glm or both: also the FDR q and FWE p of group_level/'s corrected maps")
    add_sidedness(cmd, True, "permutation test (--n-perm) and group_level/ corrections (--layout glm)")


def _permutation(args, model):
    """The PermutationTest of --n-perm (None for 0); the options that need it are refused without it."""
    from chunkglm.glm.stats_models.inference import PermutationTest

    if args.n_perm < 0:
        raise InputError(f"--n-perm takes a number of permutations >= 0 (0: none); received {args.n_perm}.")
    if not args.n_perm and args.layout == "fitlins":
        given = [flag for flag, used in (("--random-state", args.random_state is not None),
                                         ("--alpha", args.alpha != 0.05), ("--one-sided", not args.two_sided))
                 if used]
        if given:
            raise InputError(f"{' and '.join(given)} set(s) the permutation test and group_level/'s "
                             "corrections: give --n-perm N (e.g. 5000) or --layout glm|both with it, or leave "
                             "it out.")
    if not args.n_perm:
        if args.random_state is not None:
            raise InputError("--random-state seeds the permutation test: give --n-perm N with it, or leave it out.")
        return None
    if args.analysis_level != "dataset":
        raise InputError(f"--n-perm tests the Dataset nodes' contrasts; the analysis level "
                         f"{args.analysis_level!r} stops before them (run 'dataset', or leave --n-perm out).")
    if isinstance(model, dict) and not any(str(n.get("Level", "")).lower() == "dataset"
                                           and str((n.get("Model") or {}).get("Type", "glm")).lower() == "glm"
                                           for n in model.get("Nodes", [])):
        raise InputError("--n-perm tests the contrasts of Dataset nodes of Type 'glm'; this model has none "
                         "(leave --n-perm out).")
    return PermutationTest(args.n_perm, args.random_state, args.two_sided, args.alpha)


def _add_size_and_verbosity(cmd) -> None:
    """fitlins' --n-cpus/--mem-gb (as --nprocs/--mem, fMRIPrep's spellings) and -v/-q."""
    cmd.add_argument("--nprocs", "--n-cpus", dest="nprocs", type=int, metavar="N",
                     help="worker processes of the local cluster, as --workers (fitlins' --n-cpus; 0: "
                          "the default, one per usable core)")
    cmd.add_argument("--mem", "--mem-gb", dest="memory", type=memory_size, metavar="SIZE",
                     help="memory of the local cluster's workers together, shared evenly among them "
                          "(their memory_limit); 8GB, 8GiB, 8000MB, or a number of GB as fitlins' "
                          "--mem-gb. Lowers the chunk budget to a quarter of a worker's share when "
                          "that is smaller (default: 80%% of the machine's memory). Worker processes "
                          "only: refused with a config whose workers are threads (processes: false)")
    cmd.add_argument("-v", "--verbose", action="count", default=0,
                     help="-v: also pybids' warnings while it indexes the dataset and builds the "
                          "model (e.g. files it does not use), silenced otherwise")
    cmd.add_argument("-q", "--quiet", action="count", default=0,
                     help="-q: no progress lines (as --no-progress); -qq: no lines at all but errors "
                          "(no scheduler/dashboard lines, no closing summary)")


def memory_size(text) -> int:
    """``--mem``: "8GB", "8GiB", "8000MB", or a bare number of GB (fitlins' ``--mem-gb``) -> bytes."""
    try:
        value = float(text)
    except ValueError:
        value = None
    try:
        size = int(value * 1e9) if value is not None else as_bytes(str(text))
    except (TypeError, ValueError):
        size = 0
    if not size > 0:
        raise argparse.ArgumentTypeError(f'a memory size such as "8GB", "8GiB" or a number of GB is '
                                         f"needed; received {text!r}")
    return size


def settle_sizes_and_verbosity(args) -> int:
    """--nprocs as --workers (one value when both are given); returns the verbosity (-v minus -q)."""
    args._size_flags = {"workers": "--nprocs" if args.nprocs is not None else "--workers"}
    if args.nprocs is not None:
        if args.nprocs < 0:
            raise InputError(f"--nprocs takes a number of worker processes >= 0 (0: the default); "
                             f"received {args.nprocs}.")
        if args.workers is not None and args.workers != args.nprocs:
            raise InputError(f"--nprocs {args.nprocs} and --workers {args.workers} both set the number of "
                             "workers; give one of them.")
        args.workers = args.nprocs or args.workers
    level = args.verbose - args.quiet
    if level < 0:
        args.no_progress = True
    return level


#: The provenance record, relative to OUTPUT_DIR; it lists every file of the folder's analysis.
RECORD = "app_provenance.json"
#: Options that split one analysis into batches (BIDS Apps' per-participant jobs, then the group
#: level) or size its cluster: left out when an output folder's record is compared.
BATCH = frozenset({"participant_label", "analysis_level", "nprocs", "memory"})


def run(args) -> int:
    """Validate the model, convert the runs, run the model's nodes, write the derivatives."""
    # imported here, not with the parser: pybids (bids.modeling) takes 1-3 s to import, which
    # every other chunkglm command would pay (this is no import cycle: nothing imports cli/)
    from chunkglm.glm.stats_models import ModelRun, load_graph, participant_labels, read_model
    from chunkglm.glm.stats_models.glm_layout import GlmLayout
    from chunkglm.glm.stats_models.reports import NodeReports

    stopwatch = Stopwatch()
    limit_heap_arenas()  # before the cluster's threads start
    level = settle_sizes_and_verbosity(args)
    model = args.model if args.model == "auto" else read_model(path_value(args.model))
    permutation = _permutation(args, model)
    output_dir, derivatives = _folders(args)
    store = args.store or str(Path(output_dir) / "cohort.zarr")
    subjects = participant_labels(args.participant_label)
    budget = command_budget(args)
    inputs = [{"path": str(args.bids_dir)}, {"path": str(derivatives)}, {"path": str(store)}]
    if args.model != "auto":
        inputs.append({"path": path_value(args.model), "sha256": file_sha256(path_value(args.model))})
    replaced = check_folder(output_dir, [RECORD], {"options": command_options(args), "inputs": inputs},
                            command="app", overwrite=args.overwrite, extra=("inputs",),
                            run_only=RUN_ONLY | BATCH)  # before the runs are converted
    with cluster_client(args, announce=level > -2) as client:
        convert(derivatives, store, task=args.task, space=args.space or None, subjects=subjects,
                client=client, progress=None if args.no_progress else print_progress,
                command=command_options(args), **({"chunk_bytes": budget} if budget else {}))
        release_free_memory()
        cohort = open_cohort(store)
        with warnings.catch_warnings():
            if level < 1:
                warnings.simplefilter("ignore", UserWarning)  # pybids' notes on unused files
            graph = load_graph(args.bids_dir, derivatives, model, space=args.space or None, task=args.task,
                               participants=subjects, desc=args.desc_label)
        release_free_memory()  # pybids' indexing leaves freed heap behind
        with _fitlins_folder(output_dir, args.layout) as fitlins_dir:
            layout = None if args.layout == "fitlins" else GlmLayout(
                graph, alpha=args.alpha, two_sided=args.two_sided,
                permutation=permutation.layout_settings() if permutation else None)
            pages = NodeReports(output_dir, {"operation": "app", "options": command_options(args)}) \
                if args.reports else None
            runner = ModelRun(graph, cohort, fitlins_dir, space=args.space or None, desc=args.desc_label,
                              chunk_bytes=budget, permutation=permutation, glm_layout=layout, glm_dir=output_dir,
                              reports=pages, progress=None if args.no_progress else _line,
                              scratch_dir=_scratch_dir(store))
            try:
                runner.run(args.analysis_level)
            finally:
                _remove_empty_scratch(store)
            written = (runner.written if args.layout != "glm" else []) + runner.glm_written
            if pages is not None:
                index = pages.index()
                written += pages.written + ([index] if index else [])
        clusters = cluster_summary(client)
    _write_description(output_dir, args.bids_dir, derivatives)
    outputs = [relative_output(p, output_dir) for p in written]
    for path in remove_replaced(output_dir, replaced, outputs, RECORD):
        _line(f"removed {path} (--overwrite: of the analysis replaced)")
    merge_record(output_dir, store, outputs, lambda listed: record(
        "app", inputs=inputs, options=command_options(args), cluster=clusters, stopwatch=stopwatch,
        outputs=listed, model=model if isinstance(model, dict) else graph.model))
    if level > -2:
        print(f"{len(written)} file(s) written under {output_dir}")
    return 0


#: glibc's ``mallopt`` parameters M_TRIM_THRESHOLD, M_MMAP_THRESHOLD and M_ARENA_MAX (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: Heap arenas of the app's process (glibc's default: up to 8 per core, one per new thread).
HEAP_ARENAS = 2
#: Free bytes at a heap's top above which glibc returns them to the system: distributed's setting
#: for the workers its nannies start (``MALLOC_TRIM_THRESHOLD_``; glibc's default 128 KiB, raised
#: dynamically up to 32 MiB as large blocks are freed).
TRIM_THRESHOLD = 65536
#: Blocks from this size up are mapped on their own and unmapped when freed: glibc's default
#: (128 KiB), set explicitly, which turns off glibc's dynamic threshold (raised up to 32 MiB
#: each time a mapped block is freed, after which arrays of that size come from the arenas and
#: their freed space stays resident between the holes of smaller blocks).
MMAP_THRESHOLD = 131072


def limit_heap_arenas(arenas: int = HEAP_ARENAS) -> bool:
    """Cap the glibc heap arenas of this process at ``arenas`` (``mallopt(M_ARENA_MAX)``), trim
    the heaps' free tops above :data:`TRIM_THRESHOLD` (as distributed does for its workers) and
    map blocks of :data:`MMAP_THRESHOLD` and more on their own (a fixed threshold).

    The app's process holds the client, the local cluster's scheduler and nannies (about 20
    threads): glibc gives each new thread its own arena, whose freed memory stays resident.
    Measured on the app benchmark (20 subjects x 2 runs, --nprocs 2): the process's resident
    memory during the run level 541-555 -> 508 MiB (median), the process tree's peak 957-966 ->
    925 MiB (wall time not compared: the machine was loaded). The fixed mmap threshold matters
    most with a config whose workers are threads in this process (``processes: false``): their
    arrays are freed here, and with glibc's dynamic threshold they end up in the arenas (app
    benchmark with worker threads, trimmed after each run: peak 601 -> 578 MiB, load ~1). Where
    the C library is not glibc (macOS, musl) nothing is done and False is returned; True when
    the three settings are taken.
    Arenas made before the call stay, so call it before the cluster starts.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all([bool(mallopt(_M_ARENA_MAX, int(arenas))), bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)),
                bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))])


@contextmanager
def _fitlins_folder(output_dir, layout):
    """Where fitlins' files go: OUTPUT_DIR, or (``--layout glm``) a temporary folder inside it,
    removed at the end (later nodes read the maps earlier ones wrote)."""
    if layout != "glm":
        yield output_dir
        return
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".chunkglm-fitlins-", dir=output_dir)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _scratch_dir(store):
    """Where the model run stages maps for the workers: ``STORE/.scratch`` (a folder zarr and
    chunkglm's store readers ignore, where the workers read the store from: on its file system,
    or under an object-store URL, a key prefix)."""
    if is_url(store):
        return f"{store.rstrip('/')}/{SCRATCH}"
    folder = Path(store) / SCRATCH
    folder.mkdir(exist_ok=True)
    return folder


def _remove_empty_scratch(store) -> None:
    """Remove ``STORE/.scratch`` unless another run (another process) still stages there (an
    object store has no empty folder: nothing to do)."""
    if not is_url(store):
        try:
            (Path(store) / SCRATCH).rmdir()
        except OSError:
            pass


def _folders(args):
    if is_url(args.output_dir):
        raise InputError(f"OUTPUT_DIR {args.output_dir}: chunkglm app writes to a local folder (later nodes "
                         "read the maps earlier ones wrote); give a local path and copy the results.")
    if not Path(args.bids_dir).is_dir():
        raise InputError(f"BIDS_DIR {args.bids_dir}: no such folder.")
    derivatives = args.derivatives or str(Path(args.bids_dir) / "derivatives" / "fmriprep")
    if not Path(derivatives).is_dir():
        raise InputError(f"the derivatives folder {derivatives} does not exist: give the fMRIPrep output "
                         "folder with --derivatives.")
    return args.output_dir, derivatives


#: Seconds a run waits for another run of the analysis to finish merging its files into the record.
RECORD_WAIT_SECONDS = 300.0


def merge_record(output_dir, store, outputs, make_record) -> None:
    """Write OUTPUT_DIR's record listing ``outputs`` and the files earlier batches of the analysis
    listed (``make_record(listed) -> dict``), under the cohort store's lock.

    BIDS Apps run participants as parallel jobs (a SLURM array) into one OUTPUT_DIR; each reads the
    record, adds its files and rewrites it. The store's lock (``_locks/store--app-record``: the jobs
    share the store they convert into) makes that read-merge-write one at a time, so no job's files
    drop out of the record.
    """
    with locks.node_lock(open_root(store, mode="a"), "store", "app-record", wait=RECORD_WAIT_SECONDS):
        write_output_record(output_dir, RECORD, make_record(earlier_outputs(output_dir, RECORD, outputs)
                                                            + list(outputs)))


def _write_description(output_dir, bids_dir, derivatives) -> None:
    existing = Path(output_dir) / "dataset_description.json"
    content = dataset_description("chunkglm BIDS Stats Models", sources=[bids_dir, derivatives],
                                  existing=existing if existing.is_file() else None)
    with StagedOutput(output_dir) as out:
        write_json(out.path("dataset_description.json"), content)
        # fitlins' layout and the HTML pages' folder: BIDS defines no statistical-model derivatives yet
        out.ignore(["node-*", "reports"])


def _line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
