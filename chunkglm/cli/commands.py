"""The ``chunkglm`` command's parser and handlers: convert, first-level, second-level, meta,
extract, report, info, verify, to-nifti, demo. The entry point is :mod:`chunkglm.cli.main`."""

from __future__ import annotations

import argparse
import sys

from chunkglm._version import __version__
from chunkglm.cli import demo, extract, first_level, meta, report, second_level, verify
from chunkglm.cli._common import add_cluster, add_storage_cluster, chunk_bytes, cluster_client, command_options
from chunkglm.cli._common import add_common as _add_common  # tests build sub-parsers with it
from chunkglm.cli._common import parse_storage_options, storage_for
from chunkglm.cli.progress import Reporter
from chunkglm.errors import ChunkglmError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert


def _cmd_convert(args):
    reporter = Reporter(bars=not args.no_progress)
    with cluster_client(args.cluster) as client, reporter.phase("converting") as advance:
        report = convert(
            args.inputs[0] if len(args.inputs) == 1 else args.inputs, args.store,
            task=args.task, space=args.space, subjects=args.subject, sessions=args.session,
            derivatives_folder=args.derivatives_folder, mask_img=args.mask,
            collection=args.collection, map_type=args.map_type,
            storage_options=storage_for(args),
            input_storage_options=parse_storage_options(args.input_storage_option),
            client=client, chunk_bytes=chunk_bytes(args.chunk_mb, args.chunk_size),
            task_memory=args.task_memory, overwrite=args.overwrite,
            progress=reporter.converter_callback(advance), command=command_options(args))
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
        shape = node.attrs.get("shape", [])
        print(f"  runs/{name}  volumes={shape[3] if len(shape) > 3 else '?'}  TR={node.attrs.get('RepetitionTime')}")
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
    return demo.run_demo(args.out, size=args.size, n_subjects=args.subjects, cluster=args.cluster)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(prog="chunkglm", description="Out-of-core fMRI statistics.")
    parser.add_argument("--version", action="version", version=f"chunkglm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    first_level.add_parser(sub, _add_common)
    second_level.add_parser(sub, _add_common)
    meta.add_parser(sub, _add_common)
    extract.add_parser(sub, _add_common)
    report.add_parser(sub)
    verify.add_parser(sub, add_storage_cluster)
    info = sub.add_parser("info", help="summarise a cohort store")
    info.add_argument("store")
    info.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    add_storage_cluster(info)
    info.set_defaults(func=_cmd_info)
    back = sub.add_parser("to-nifti", help="write a run or map collection back as NIfTI")
    back.add_argument("store")
    back.add_argument("node", help="runs/<name>, maps/<name> or a run name")
    back.add_argument("output", help="output .nii or .nii.gz")
    back.add_argument("--variable", help="map variable of a collection (default: its first)")
    back.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    add_storage_cluster(back)
    back.set_defaults(func=_cmd_to_nifti)
    demo_cmd = sub.add_parser("demo", help="run the pipeline on a synthetic dataset")
    demo_cmd.add_argument("--out", default="demo_output")
    demo_cmd.add_argument("--size", default="small", choices=["tiny", "small", "realistic"])
    demo_cmd.add_argument("--subjects", type=int, default=6)
    add_cluster(demo_cmd)
    demo_cmd.set_defaults(func=_cmd_demo)
    return parser


def _convert_parser(sub):
    conv = sub.add_parser("convert", help="BIDS derivatives or NIfTI files -> cohort store")
    conv.add_argument("inputs", nargs="+", help="a BIDS/fMRIPrep folder, or NIfTI files")
    conv.add_argument("-o", "--store", required=True, help="store path or URL (s3://bucket/x.zarr)")
    conv.add_argument("--task")
    conv.add_argument("--space")
    conv.add_argument("--subject", action="append", help="repeat for several")
    conv.add_argument("--session", action="append", help="repeat for several")
    conv.add_argument("--derivatives-folder", default="derivatives/fmriprep")
    conv.add_argument("--mask", help="3-D mask image defining the stored voxels")
    conv.add_argument("--collection", default="images", help="node name for 3-D inputs")
    conv.add_argument("--map-type", default="effect", help="variable name for 3-D inputs")
    conv.add_argument("--chunk-mb", type=float, metavar="MB",
                      help="MiB per chunk (uncompressed; default 64); smaller chunks need less "
                           "worker memory")
    conv.add_argument("--chunk-size", help='uncompressed bytes per chunk, e.g. "64MiB" (or --chunk-mb)')
    conv.add_argument("--task-memory", default="2GiB", help="memory one run's task may hold")
    conv.add_argument("--overwrite", action="store_true", help="replace nodes whose source changed")
    conv.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                      help="fsspec option for the store, e.g. endpoint_url=http://127.0.0.1:9000")
    conv.add_argument("--input-storage-option", action="append", metavar="KEY=VALUE")
    _add_common(conv)
    conv.set_defaults(func=_cmd_convert)


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 for input errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ChunkglmError as err:
        print(f"chunkglm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete store nodes and subjects are kept; run the same command "
              "again to finish.",
              file=sys.stderr)
        return 130

