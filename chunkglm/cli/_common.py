"""Helpers shared by the ``chunkglm`` sub-commands: common options, storage settings,
the cluster client, provenance of a command's arguments.

Sub-command modules import these from here (never from :mod:`chunkglm.cli.commands`,
which imports them all to build the parser).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, as_bytes
from chunkglm.cluster import load_config, start
from chunkglm.cluster.config import chunk_budget
from chunkglm.errors import ChunkglmError, StoreError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.backends import storage_settings
from chunkglm.provenance import strip_secrets


def parse_storage_options(pairs):
    """``["endpoint_url=http://127.0.0.1:9000", "anon=false"]`` -> dict."""
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
    cluster = getattr(args, "cluster", "none")
    section = load_config(None if cluster == "none" else cluster).storage
    return storage_settings(section, parse_storage_options(getattr(args, key, None)))


def add_cluster(parser):
    parser.add_argument(
        "--cluster", default="local", metavar="NAME|PATH",
        help="cluster config: a name from cluster_configs/ or a YAML path (default: local). "
             "'none' runs in this process without a cluster.")


def add_storage_cluster(parser):
    """--cluster for commands that start no cluster: only its storage: section is read."""
    parser.add_argument(
        "--cluster", default="none", metavar="NAME|PATH",
        help="cluster config whose storage: section (object-storage backend, endpoint, retries) "
             "applies; this command starts no cluster (default: none, i.e. the defaults)")


def add_common(parser):
    """--cluster and --no-progress (bars are drawn only when stderr is a terminal)."""
    add_cluster(parser)
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
    if chunk_mb is not None and chunk_size is not None:
        raise ChunkglmError(f"give --chunk-mb ({chunk_mb}) or --chunk-size ({chunk_size!r}), not both.")
    if chunk_mb is not None:
        if not chunk_mb > 0:
            raise ChunkglmError(f"--chunk-mb must be a positive number of MiB, e.g. 16; received {chunk_mb}.")
        return int(chunk_mb * 2**20)
    return as_bytes(chunk_size) if chunk_size is not None else DEFAULT_CHUNK_BYTES


def add_chunk_mb(parser, what="") -> None:
    """--chunk-mb for a command that computes: the memory budget of its models (and conversions)."""
    parser.add_argument("--chunk-mb", type=float, metavar="MB",
                        help="memory budget, MiB per chunk (default: a store's chunks as they are, 64 for "
                             f"new conversions){what}; smaller values give smaller task blocks and batches, "
                             "so less worker memory. Lowered to a quarter of the cluster config's "
                             "memory_limit per worker when larger.")


def command_budget(args, line=None) -> int | None:
    """Bytes per chunk of ``--chunk-mb`` (None when not given), lowered to a quarter of a worker's
    memory when the cluster config states a smaller one (a note says so). The default budget is
    left as it is, so stores and results keep their sizes."""
    if getattr(args, "chunk_mb", None) is None:
        return None
    cluster = getattr(args, "cluster", "none")
    budget, note = chunk_budget(load_config(None if cluster == "none" else cluster),
                                chunk_bytes(args.chunk_mb, None))
    if note:
        line(note) if line is not None else print(note, file=sys.stderr, flush=True)
    return budget.chunk_bytes


def _absolute(value):
    """Local paths as absolute paths (URLs and None unchanged); lists element-wise."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if value is None or (isinstance(value, str) and "://" in value and not value.startswith("file://")):
        return value
    return os.path.abspath(str(value).removeprefix("file://"))


def command_options(args) -> dict:
    """The command's arguments for provenance: secrets redacted, storage options by key."""
    options = {k: v for k, v in vars(args).items() if k != "func"}
    for key in ("input", "inputs", "out_dir", "store", "mask", "out", "table", "maps"):
        if key in options:
            options[key] = _absolute(options[key])
    for key in ("storage_option", "input_storage_option"):
        if options.get(key):
            options[key] = strip_secrets(parse_storage_options(options[key]))
    return {"command": args.command, **strip_secrets(options)}


@contextmanager
def cluster_client(config):
    """A dask client for the command's lifetime (none for ``--cluster none``)."""
    if config == "none":
        yield None
        return
    client = start(config)
    try:
        yield client
    finally:
        client.close()


def print_progress(done, total, node):
    """One line per finished node on stderr: ``[3/10] runs/sub-01_...``."""
    print(f"[{done}/{total}] {node}", file=sys.stderr, flush=True)


def open_if_store(location, storage, allow_incomplete=False):
    """An open cohort when ``location`` is a store (a URL or a folder with zarr.json), else None."""
    if "://" not in str(location) and not (Path(str(location)) / "zarr.json").is_file():
        return None
    try:
        return open_cohort(location, storage, allow_incomplete=allow_incomplete)
    except StoreError:
        return None
