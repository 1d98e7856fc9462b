"""Helpers shared by the ``chunkglm`` sub-commands: common options, storage settings,
the cluster client, provenance of a command's arguments.

Sub-command modules import these from here (never from :mod:`chunkglm.cli.commands`,
which imports them all to build the parser).
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import dask
import yaml

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, as_bytes
from chunkglm.cli._args import add_cluster_options
from chunkglm.cluster import load_config, start
from chunkglm.cluster.start import default_n_workers, usable_cores
from chunkglm.cluster.config import chunk_budget
from chunkglm.cluster.stall import ClusterStalledError, StallWatch, stall_seconds
from chunkglm.errors import ChunkglmError, StoreError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.backends import storage_settings
from chunkglm.io.derivatives import StagedOutput
from chunkglm.io.layout import is_url, redact_url
from chunkglm.provenance import strip_secrets, without_times


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
    none`` or ``--scheduler``) with ``--storage-option KEY=VALUE`` pairs over its options."""
    cluster, _ = resolve_cluster(args)
    section = load_config(None if cluster == "none" else cluster).storage
    return storage_settings(section, parse_storage_options(getattr(args, key, None)))


def add_cluster(parser):
    """--cluster, --scheduler and --workers of a command that computes (see :func:`cluster_client`)."""
    add_cluster_options(parser)


def add_storage_cluster(parser):
    """--cluster for commands that start no cluster: only its storage: section is read."""
    add_cluster_options(parser, starts_cluster=False)


def add_common(parser):
    """--cluster, --scheduler, --workers and --no-progress (bars are drawn only when stderr is a
    terminal)."""
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
    memory when the cluster config (or a command's ``--mem``, see :func:`local_overrides`) states a
    smaller one (a note says so). The default budget is left as it is, so stores and results keep
    their sizes, unless ``--mem`` gives the workers less than four times it."""
    if getattr(args, "chunk_mb", None) is None and getattr(args, "memory", None) is None:
        return None
    cluster, scheduler = resolve_cluster(args)
    config = load_config(None if cluster == "none" else cluster,
                         overrides=local_overrides(args, cluster, scheduler))
    given = chunk_bytes(args.chunk_mb, None) if getattr(args, "chunk_mb", None) is not None else None
    budget, note = chunk_budget(config, given)
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
    options = {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")}
    for key in ("input", "inputs", "output_dir", "store", "mask", "table", "maps", "design"):
        if key in options:
            options[key] = _absolute(options[key])
    for key in ("storage_option", "input_storage_option"):
        if options.get(key):
            options[key] = strip_secrets(parse_storage_options(options[key]))
    return {"command": args.command, **strip_secrets(options)}


def resolve_cluster(args) -> tuple[str, str | None]:
    """(cluster config, scheduler address) of a command's arguments.

    ``--scheduler`` (or, when neither it nor ``--cluster`` is given, the
    ``DASK_SCHEDULER_ADDRESS`` environment variable) attaches to a running
    scheduler: the config is then ``"none"`` (its storage defaults apply).
    Otherwise ``--cluster`` (default ``local``). ``args`` may be a config name.
    """
    if isinstance(args, str):
        return args, None
    cluster, scheduler = getattr(args, "cluster", None), getattr(args, "scheduler", None)
    if scheduler is not None and cluster is not None:
        raise ChunkglmError(f"give --cluster ({cluster}) or --scheduler ({scheduler}), not both: "
                            "--cluster starts a cluster, --scheduler uses a running one.")
    if scheduler is None and cluster is None:
        scheduler = os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if scheduler is not None:
        if not scheduler.strip() or any(c.isspace() for c in scheduler):
            raise ChunkglmError(f"--scheduler takes a scheduler address such as tcp://host:8786; "
                                f"received {scheduler!r}.")
        return "none", scheduler.strip()
    return (cluster if cluster is not None else "local"), None


def local_overrides(args, cluster, scheduler) -> dict:
    """The local cluster's sizes a command's arguments set: ``--workers N`` (``n_workers``) and,
    for commands with ``--mem``, the memory of all workers together (``args.memory``, bytes),
    shared evenly: ``memory_limit`` = memory / workers (the adaptive maximum when larger). Each is
    an error with a running scheduler, ``--cluster none`` or a config of another type; the memory
    is also one with a local config whose workers are threads of this process (``processes:
    false``): dask would hold the whole command's memory against one worker's limit and pause
    the worker for good at 80 %, the command waiting without a word. The flags'
    spellings in the messages are ``args._size_flags`` (e.g. ``--nprocs`` for ``chunkglm app``)."""
    flags = {"workers": "--workers", "memory": "--mem", **(getattr(args, "_size_flags", None) or {})}
    given = {key: getattr(args, key, None) for key in flags if getattr(args, key, None) is not None}
    if not given:
        return {}
    workers, memory = given.get("workers"), given.get("memory")
    if workers is not None and workers < 1:
        raise ChunkglmError(f"{flags['workers']} takes a number of workers >= 1; received {workers}.")
    if memory is not None and memory <= 0:
        raise ChunkglmError(f"{flags['memory']} takes a memory size > 0 such as 8GB; received {memory} bytes.")
    what = " and ".join(flags[key] for key in given)
    sizes = "sizes" if len(given) == 1 else "size"
    if scheduler is not None:
        raise ChunkglmError(f"{what} {sizes} a local cluster; the scheduler at {scheduler} has its own "
                            f"workers (leave out {what}, or --scheduler to start a local cluster).")
    if cluster == "none":
        raise ChunkglmError(f"{what} {sizes} a local cluster, but --cluster none runs in this process; "
                            "leave out one of them.")
    config = load_config(cluster)
    if config.type != "local":
        raise ChunkglmError(f"{what} {sizes} the local cluster; the config {cluster!r} is of type "
                            f"{config.type!r}: set its worker count and memory in the config instead.")
    if memory is not None and not config.options["processes"]:
        raise ChunkglmError(f"{flags['memory']} limits the memory of worker processes, but the config {cluster!r} "
                            "runs its workers as threads of this command's process (processes: false), whose "
                            "whole memory dask would hold against that limit, pausing the work for good: use a "
                            f"config with processes: true (e.g. --cluster local), or leave out {flags['memory']}.")
    overrides = {"n_workers": workers} if workers is not None else {}
    if memory is not None:
        n_workers = workers or config.options["n_workers"] or default_n_workers(
            usable_cores(), config.options["threads_per_worker"])
        sharing = max(n_workers, config.adapt[1]) if config.adapt else n_workers
        overrides["memory_limit"] = int(memory) // sharing
    return overrides


def attach(address: str, stream=None):
    """A Client of the running scheduler at ``address`` (a one-line error when it cannot be reached)."""
    from distributed import Client

    try:
        client = Client(address, timeout=dask.config.get("distributed.comm.timeouts.connect"))
    except (OSError, TimeoutError, ValueError) as err:
        raise ChunkglmError(f"cannot reach the dask scheduler at {address} ({type(err).__name__}: {err}); "
                            "check that it runs (`dask scheduler`) and the address of --scheduler or "
                            "DASK_SCHEDULER_ADDRESS.") from err
    workers = len(client.scheduler_info().get("workers", {}))
    print(f"Scheduler: {client.scheduler.address} (running scheduler, {workers} worker(s))",
          file=stream or sys.stderr, flush=True)
    print(f"Dashboard: {client.dashboard_link or 'none'}", file=stream or sys.stderr, flush=True)
    if not workers:
        print(f"note: no worker is connected to {address} yet; the work waits for workers to join "
              f"(e.g. `dask worker {address}`)", file=stream or sys.stderr, flush=True)
    return client


@contextmanager
def cluster_client(args, *, announce=True):
    """A dask client for the command's lifetime: attached to ``--scheduler`` (closed, the
    scheduler left running), started from ``--cluster`` (shut down at the end), or none for
    ``--cluster none``. ``args`` may also be a config name. ``announce=False``: no lines naming
    the scheduler and the dashboard (a command's ``-qq``).

    While the command runs, a :class:`~chunkglm.cluster.stall.StallWatch` ends it when its tasks
    wait with no running worker for ``CHUNKGLM_STALL_SECONDS`` (default 600 s): a
    :class:`~chunkglm.cluster.stall.ClusterStalledError` naming the cluster's state, one line."""
    cluster, scheduler = resolve_cluster(args)
    overrides = local_overrides(args, cluster, scheduler)
    seconds = stall_seconds()
    if scheduler is not None:
        client = attach(scheduler, None if announce else io.StringIO())
    elif cluster == "none":
        yield None
        return
    else:
        client = start(cluster, verbose=announce, **overrides)
    try:
        with StallWatch(client, seconds) as watch:
            try:
                yield client
            except Exception as err:  # the cancelled tasks' error, or what the command made of it
                if watch.fired:
                    raise ClusterStalledError(watch.fired) from err
                raise
            if watch.fired:  # the command went on without the cancelled tasks' results
                raise ClusterStalledError(watch.fired)
    finally:
        client.close()


def output_location(output_dir, *parts) -> str:
    """``output_dir/parts...`` for a local folder or an object-store URL."""
    text = str(output_dir)
    if is_url(text):
        return "/".join([text.rstrip("/"), *parts])
    return str(Path(text).joinpath(*parts))


def relative_output(path, output_dir) -> str:
    """A written file (a resolved path, or a URL as the writers return it) relative to
    ``output_dir``, for provenance records and messages."""
    text = str(output_dir)
    if is_url(text):
        prefix = redact_url(text.rstrip("/")) + "/"
        return str(path).removeprefix(prefix)
    return Path(path).resolve().relative_to(Path(text).resolve()).as_posix()


def write_output_record(output_dir, relative: str, content: dict, storage=None) -> str:
    """Write a provenance record (secrets stripped, without its times: a re-run writes the same
    bytes) to ``output_dir/relative``, a local folder or an object store, through the derivative
    staging (atomic); returns where it went."""
    with StagedOutput(output_dir, storage_options=storage) as out:
        out.path(relative).write_text(json.dumps(strip_secrets(without_times(content)), indent=2,
                                                 sort_keys=False) + "\n")
    return redact_url(output_location(output_dir, relative)) if is_url(str(output_dir)) else \
        output_location(output_dir, relative)


def print_progress(done, total, node):
    """One line per finished node on stderr: ``[3/10] runs/sub-01_...``."""
    print(f"[{done}/{total}] {node}", file=sys.stderr, flush=True)


def environment_line(err: OSError, output=None) -> str:
    """One line for an error of the environment: what failed, on which path (else the command's
    ``output`` location), and what to do."""
    path = getattr(err, "filename", None) or output
    where = f" {path}" if path else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{' of' + where if where else ''} ({err.strerror}): free "
                "space or write to another location, then run the same command again (what was "
                "written completely is kept and skipped).")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write{where or ' the output'} ({err.strerror}): choose a writable location "
                "(-o/--output-dir, the store) or change its permissions.")
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def open_if_store(location, storage, allow_incomplete=False):
    """An open cohort when ``location`` is a store (a URL or a folder with zarr.json), else None.

    A local folder with a ``zarr.json`` is a zarr store: when it cannot be opened as a cohort
    store (another format version, not chunkglm's, a broken document), that error is raised,
    not a later one describing it as a BIDS folder."""
    if "://" not in str(location) and not (Path(str(location)) / "zarr.json").is_file():
        return None
    try:
        return open_cohort(location, storage, allow_incomplete=allow_incomplete)
    except StoreError:
        if "://" in str(location):
            return None
        raise
