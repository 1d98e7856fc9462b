"""The ``chunkglm`` command: convert, first-level, second-level, meta, extract, report, info, verify,
to-nifti, demo."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from chunkglm._version import __version__
from chunkglm.errors import ChunkglmError


def _storage_options(pairs):
    """``["endpoint_url=http://127.0.0.1:9000", "anon=false"]`` -> dict."""
    import yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ChunkglmError(f"--storage-option takes KEY=VALUE; received {pair!r}")
        options[key] = yaml.safe_load(value)
    if "endpoint_url" in options:  # s3fs expects it among the client kwargs too
        options.setdefault("client_kwargs", {})["endpoint_url"] = options["endpoint_url"]
    return options or None


def storage_for(args, key="storage_option"):
    """Storage settings of a command: the cluster config's ``storage:`` section
    (backend, options, retries; the bundled local config's with ``--cluster
    none``) with ``--storage-option KEY=VALUE`` pairs over its options."""
    from chunkglm.cluster import load_config
    from chunkglm.io.storage import storage_settings

    cluster = getattr(args, "cluster", "none")
    section = load_config(None if cluster == "none" else cluster).storage
    return storage_settings(section, _storage_options(getattr(args, key, None)))


def _add_cluster(parser):
    parser.add_argument(
        "--cluster", default="local", metavar="NAME|PATH",
        help="cluster config: a name from cluster_configs/ or a YAML path (default: local). "
             "'none' runs in this process without a cluster.")


def _add_storage_cluster(parser):
    """--cluster for commands that start no cluster: only its storage: section is read."""
    parser.add_argument(
        "--cluster", default="none", metavar="NAME|PATH",
        help="cluster config whose storage: section (object-storage backend, endpoint, retries) "
             "applies; this command starts no cluster (default: none, i.e. the defaults)")


def _add_common(parser):
    """--cluster and --no-progress (bars are drawn only when stderr is a terminal)."""
    _add_cluster(parser)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (there are none either when stderr is not a terminal)")


def add_allow_incomplete(parser) -> None:
    """--allow-incomplete for commands that read a store's nodes."""
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="skip incomplete store nodes (a conversion cut off) instead of refusing "
                             "the store; the skipped nodes are printed")


def print_skipped(cohort, line=None) -> None:
    """One line per incomplete node a selection skipped (--allow-incomplete)."""
    for path in getattr(cohort, "skipped", []):
        text = f"skipped incomplete node {path} (--allow-incomplete)"
        line(text) if line is not None else print(text, file=sys.stderr, flush=True)


def chunk_bytes(chunk_mb, chunk_size):
    """Bytes per chunk from ``--chunk-mb`` (MiB) or ``--chunk-size`` ("64MiB"); default 64 MiB."""
    from chunkglm.chunking import DEFAULT_CHUNK_BYTES, as_bytes

    if chunk_mb is not None and chunk_size is not None:
        raise ChunkglmError(f"give --chunk-mb ({chunk_mb}) or --chunk-size ({chunk_size!r}), not both.")
    if chunk_mb is not None:
        if not chunk_mb > 0:
            raise ChunkglmError(f"--chunk-mb must be a positive number of MiB, e.g. 16; received {chunk_mb}.")
        return int(chunk_mb * 2**20)
    return as_bytes(chunk_size) if chunk_size is not None else DEFAULT_CHUNK_BYTES


def _absolute(value):
    """Local paths as absolute paths (URLs and None unchanged); lists element-wise."""
    import os

    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if value is None or (isinstance(value, str) and "://" in value and not value.startswith("file://")):
        return value
    return os.path.abspath(str(value).removeprefix("file://"))


def command_options(args) -> dict:
    """The command's arguments for provenance: secrets redacted, storage options by key."""
    from chunkglm.provenance import strip_secrets

    options = {k: v for k, v in vars(args).items() if k != "func"}
    for key in ("input", "inputs", "out_dir", "store", "mask", "out", "table", "maps"):
        if key in options:
            options[key] = _absolute(options[key])
    for key in ("storage_option", "input_storage_option"):
        if options.get(key):
            options[key] = strip_secrets(_storage_options(options[key]))
    return {"command": args.command, **strip_secrets(options)}


@contextmanager
def cluster_client(config):
    """A dask client for the command's lifetime (none for ``--cluster none``)."""
    if config == "none":
        yield None
        return
    from chunkglm.cluster import start

    client = start(config)
    try:
        yield client
    finally:
        client.close()


def print_progress(done, total, node):
    """One line per finished node on stderr: ``[3/10] runs/sub-01_...``."""
    print(f"[{done}/{total}] {node}", file=sys.stderr, flush=True)


def _cmd_convert(args):
    from chunkglm.cli.progress import Reporter
    from chunkglm.io.convert import convert

    reporter = Reporter(bars=not args.no_progress)
    with cluster_client(args.cluster) as client, reporter.phase("converting") as advance:
        report = convert(
            args.inputs[0] if len(args.inputs) == 1 else args.inputs, args.store,
            task=args.task, space=args.space, subjects=args.subject, sessions=args.session,
            derivatives_folder=args.derivatives_folder, mask_img=args.mask,
            collection=args.collection, map_type=args.map_type,
            storage_options=storage_for(args),
            input_storage_options=_storage_options(args.input_storage_option),
            client=client, chunk_bytes=chunk_bytes(args.chunk_mb, args.chunk_size),
            task_memory=args.task_memory, overwrite=args.overwrite,
            progress=reporter.converter_callback(advance), command=command_options(args))
    print(f"store: {report.store}")
    print(f"converted {len(report.converted)} node(s), skipped {len(report.skipped)} already complete")
    return 0


def _cmd_info(args):
    from chunkglm.io.cohort import open_cohort

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
    from chunkglm.io.cohort import open_cohort

    cohort = open_cohort(args.store, storage_for(args))
    cohort.node(args.node).to_nifti(args.output, args.variable)
    print(args.output)
    return 0


def _cmd_demo(args):
    from chunkglm.demo import run_demo

    return run_demo(args.out, size=args.size, n_subjects=args.subjects, cluster=args.cluster)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(prog="chunkglm", description="Out-of-core fMRI statistics.")
    parser.add_argument("--version", action="version", version=f"chunkglm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    from chunkglm.cli import extract, first_level, meta, report, second_level, verify

    first_level.add_parser(sub, _add_common)
    second_level.add_parser(sub, _add_common)
    meta.add_parser(sub, _add_common)
    extract.add_parser(sub, _add_common)
    report.add_parser(sub)
    verify.add_parser(sub, _add_storage_cluster)
    info = sub.add_parser("info", help="summarise a cohort store")
    info.add_argument("store")
    info.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    _add_storage_cluster(info)
    info.set_defaults(func=_cmd_info)
    back = sub.add_parser("to-nifti", help="write a run or map collection back as NIfTI")
    back.add_argument("store")
    back.add_argument("node", help="runs/<name>, maps/<name> or a run name")
    back.add_argument("output", help="output .nii or .nii.gz")
    back.add_argument("--variable", help="map variable of a collection (default: its first)")
    back.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    _add_storage_cluster(back)
    back.set_defaults(func=_cmd_to_nifti)
    demo = sub.add_parser("demo", help="run the pipeline on a synthetic dataset")
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("--size", default="small", choices=["tiny", "small", "realistic"])
    demo.add_argument("--subjects", type=int, default=6)
    _add_cluster(demo)
    demo.set_defaults(func=_cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())
