"""The ``chunkglm`` command's parser and handlers: convert, first-level, second-level, meta,
extract, app, report, info, verify, to-nifti, demo. The entry point is :mod:`chunkglm.cli.main`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from chunkglm._version import __version__
from chunkglm.cli import app, demo, extract, first_level, meta, report, second_level, verify
from chunkglm.cli._args import (
    EXIT_ERROR,
    Parser,
    add_list,
    add_output_dir,
    missing_required,
    old_two_sided_values,
    byte_size,
    path_value,
    split_list,
)
from chunkglm.cli._common import add_cluster, add_storage_cluster, chunk_bytes, cluster_client, command_options
from chunkglm.cli._common import add_common as _add_common  # tests build sub-parsers with it
from chunkglm.cli._common import environment_line, parse_storage_options, storage_for
from chunkglm.cli.progress import Reporter, library_lines_once
from chunkglm.errors import ChunkglmError, InputError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.io.layout import is_url


def _cmd_convert(args):
    if not is_url(args.output_dir) and Path(args.output_dir).is_file():
        raise InputError(f"-o {args.output_dir} is an existing file; give a folder (new, or a store "
                         "to add runs to) for the store.")
    reporter = Reporter(bars=not args.no_progress)
    with cluster_client(args) as client, reporter.phase("converting") as advance:
        report = convert(
            args.inputs[0] if len(args.inputs) == 1 else args.inputs, args.output_dir,
            task=args.task, space=args.space, subjects=split_list(args.subject),
            sessions=split_list(args.session),
            derivatives_folder=args.derivatives_folder, mask_img=args.mask,
            collection=args.collection, map_type=args.map_type,
            storage_options=storage_for(args),
            input_storage_options=parse_storage_options(args.input_storage_option),
            client=client, chunk_bytes=chunk_bytes(args.chunk_mb, args.chunk_size),
            task_memory=args.task_memory, overwrite=args.overwrite,
            progress=reporter.converter_callback(advance), command=command_options(args),
            surface=args.surface)
    print(f"store: {report.store}")
    print(f"converted {len(report.converted)} node(s), skipped {len(report.skipped)} already complete")
    return 0


def _cmd_info(args):
    cohort = open_cohort(args.store, storage_for(args))
    meta = cohort.attrs
    print(f"store: {cohort.location}")
    print(f"format: {meta['format']} {meta['format_version']} (chunkglm {meta['chunkglm_version']})")
    print(f"grids: {len(cohort.grids)}  runs: {len(cohort.runs)}  map collections: {len(cohort.maps)}")
    for name, node in sorted(cohort.runs.items()):
        shape = node.attrs.get("shape", [])  # (x, y, z, time); surface runs (time, element)
        volumes = shape[3] if len(shape) > 3 else shape[0] if len(shape) == 2 else "?"
        print(f"  runs/{name}  volumes={volumes}  TR={node.attrs.get('RepetitionTime')}")
    for name in sorted(cohort.maps):
        print(f"  maps/{name}")
    if cohort.incomplete:
        print(f"incomplete (re-run the conversion): {', '.join(cohort.incomplete)}")
    return 0


def _cmd_to_nifti(args):
    cohort = open_cohort(args.store, storage_for(args))
    cohort.node(args.node).to_nifti(args.output, args.variable)
    print(args.output)
    return 0


def _cmd_demo(args):
    return demo.run_demo(args.output_dir, size=args.size, n_subjects=args.subjects, cluster=args)


def build_parser() -> Parser:
    """The argument parser (exposed for tests and documentation)."""
    parser = Parser(prog="chunkglm", description="Out-of-core fMRI statistics.")
    parser.add_argument("--version", action="version", version=f"chunkglm {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    first_level.add_parser(sub, _add_common)
    second_level.add_parser(sub, _add_common)
    meta.add_parser(sub, _add_common)
    extract.add_parser(sub, _add_common)
    app.add_parser(sub, _add_common)
    report.add_parser(sub)
    verify.add_parser(sub, add_storage_cluster)
    info = sub.add_parser("info", help="summarise a cohort store")
    info.add_argument("store", type=path_value, help="the store's path or URL")
    add_storage_option(info)
    add_storage_cluster(info)
    info.set_defaults(func=_cmd_info)
    back = sub.add_parser("to-nifti", help="write a run or map collection back as NIfTI")
    back.add_argument("store", type=path_value, help="the store's path or URL")
    back.add_argument("node", help="runs/<name>, maps/<name> or a run name")
    back.add_argument("output", type=path_value, help="output .nii or .nii.gz")
    back.add_argument("--variable", help="map variable of a collection (default: its first)")
    add_storage_option(back)
    add_storage_cluster(back)
    back.set_defaults(func=_cmd_to_nifti)
    demo_cmd = sub.add_parser("demo", help="run the pipeline on a synthetic dataset")
    add_output_dir(demo_cmd, "folder for the dataset, the store and every result (default: demo_output)",
                   "--out", required=False)
    demo_cmd.set_defaults(output_dir=path_value("demo_output"))
    demo_cmd.add_argument("--size", default="small", choices=["tiny", "small", "realistic"],
                          help="size of the synthetic images")
    demo_cmd.add_argument("--subjects", type=int, default=6, help="number of synthetic subjects")
    add_cluster(demo_cmd)
    demo_cmd.set_defaults(func=_cmd_demo)
    return parser


def _convert_parser(sub):
    conv = sub.add_parser("convert", help="BIDS derivatives, NIfTI, GIFTI or CIFTI files -> cohort store")
    conv.add_argument("inputs", nargs="+", type=path_value,
                      help="a BIDS/fMRIPrep folder, or NIfTI files, or surface runs: GIFTI files "
                           "(*_hemi-L/R_*.func.gii, paired by hemi) or CIFTI dense series (*.dtseries.nii)")
    add_output_dir(conv, "the store to write: a path or URL (s3://bucket/x.zarr)", "--store")
    conv.add_argument("--task", help="BIDS input: keep the runs of this task (default: all tasks)")
    conv.add_argument("--space", help="BIDS input: keep the runs of this space; fsaverage* or fsLR converts "
                                      "fMRIPrep's surface runs of that space (GIFTI pairs, CIFTI dense series); "
                                      "GIFTI files: the mesh nilearn ships of that name (default: every volume "
                                      "space; GIFTI files: their space- entity)")
    conv.add_argument("--surface", choices=["gifti", "cifti"],
                      help="BIDS input with a surface --space: convert its GIFTI pairs or its CIFTI dense series "
                           "(default: gifti for fsaverage*, cifti for fsLR)")
    add_list(conv, "--subject", metavar="LABEL", help_text="BIDS input: subjects to convert, e.g. "
             "--subject 01 02 (default: all)")
    add_list(conv, "--session", metavar="LABEL", help_text="BIDS input: sessions to convert "
             "(default: all)")
    conv.add_argument("--derivatives-folder", default="derivatives/fmriprep",
                      help="BIDS input: the folder of the preprocessed runs, relative to the BIDS root")
    conv.add_argument("--mask", type=path_value, help="3-D mask image defining the stored voxels "
                      "(default: the union of the runs' desc-brain_mask images, else every voxel)")
    conv.add_argument("--collection", default="images", help="node name for 3-D inputs")
    conv.add_argument("--map-type", default="effect", help="variable name for 3-D inputs")
    conv.add_argument("--chunk-mb", type=float, metavar="MB",
                      help="MiB per chunk (uncompressed; default 64); smaller chunks need less "
                           "worker memory")
    conv.add_argument("--chunk-size", type=byte_size, help='uncompressed bytes per chunk, e.g. "64MiB", instead of '
                                           "--chunk-mb (default: 64MiB)")
    conv.add_argument("--task-memory", default="2GiB", type=byte_size,
                      help="memory one run's task may hold; longer runs stream through a staging array")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace nodes whose source changed (default: refuse to)")
    add_storage_option(conv)
    conv.add_argument("--input-storage-option", action="append", metavar="KEY=VALUE",
                      help="fsspec option for object-storage inputs; repeat (default: none)")
    _add_common(conv)
    conv.set_defaults(func=_cmd_convert)


def add_storage_option(parser) -> None:
    """--storage-option KEY=VALUE (repeatable) for a command that reads or writes a store."""
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec option of the store's object storage, e.g. "
                             "endpoint_url=http://127.0.0.1:9000; repeat (default: the cluster "
                             "config's storage: section; credentials only from the environment)")


def _one_line(err: BaseException) -> str:
    """An error message on one line (a message of several lines joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 for every error, 130 when interrupted).

    Every error is one line on stderr, never a traceback: chunkglm's own errors and the
    environment's (a missing file, a read-only folder, a full disk) say what happened;
    anything else is named as unexpected (``CHUNKGLM_TRACEBACK=1`` shows its traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["meta"]:
        argv = old_two_sided_values(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_required(args)
    if missing:
        print(f"chunkglm {args.command}: error: the following arguments are required: "
              f"{', '.join(missing)} (see chunkglm {args.command} --help)", file=sys.stderr)
        return EXIT_ERROR
    try:
        with library_lines_once():  # nilearn's per-subject messages, once per command
            return args.func(args)
    except ChunkglmError as err:
        print(f"chunkglm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        line = environment_line(err, getattr(args, "output_dir", None))  # what to do, not only errno
        print(f"chunkglm {args.command}: error: {line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: complete store nodes and subjects are kept; run the same command "
              "again to finish.",
              file=sys.stderr)
        return 130
    except Exception as err:  # a defect of chunkglm: still one line, with how to see more
        if os.environ.get("CHUNKGLM_TRACEBACK"):
            raise
        print(f"chunkglm {args.command}: error: unexpected {type(err).__name__}: {_one_line(err)} "
              "(this is a chunkglm defect: run again with CHUNKGLM_TRACEBACK=1 for the traceback "
              "and report it)", file=sys.stderr)
        return EXIT_ERROR

