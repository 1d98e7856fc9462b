"""``chunkglm verify STORE [--repair]``: check a cohort store like ``git fsck``.

Prints one line per problem (incomplete nodes, missing chunks, chunks whose
crc32c does not match, leftovers of interrupted writes) and exits 0 when the
store is clean, 2 otherwise (:data:`EXIT_DAMAGED`). ``--repair`` converts the
damaged runs and map collections again from their recorded source files when
those are unchanged (same sha256), says which cannot be repaired and why,
removes replaced versions of nodes whose grace time has passed (see
:func:`chunkglm.io.layout.keep_replaced`), then checks the store again.
"""

from __future__ import annotations

from chunkglm.cli._args import path_value
from chunkglm.cli._common import parse_storage_options, storage_for
from chunkglm.io.backends import redact_url
from chunkglm.io.verify import remove_replaced, repair_store, verify_store


#: Exit status when problems remain (the same as for other errors of the command).
EXIT_DAMAGED = 2


def add_parser(sub, add_storage_cluster) -> None:
    """Register the sub-command."""
    cmd = sub.add_parser("verify", help="check every node, chunk and checksum of a store (--repair fixes)")
    cmd.add_argument("store", type=path_value, help="the store's path or URL")
    cmd.add_argument("--repair", action="store_true",
                     help="convert damaged runs/collections again from their unchanged sources "
                          "(default: only report)")
    cmd.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                     help="fsspec option of the store's object storage; repeat (default: none)")
    cmd.add_argument("--input-storage-option", action="append", metavar="KEY=VALUE",
                     help="fsspec option for the recorded source files (--repair); repeat "
                          "(default: none)")
    add_storage_cluster(cmd)
    cmd.set_defaults(func=run)


def _report(problems, notes) -> None:
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(problem.message)


def run(args) -> int:
    """Entry point of ``chunkglm verify``."""
    storage = storage_for(args)
    problems, notes = verify_store(args.store, storage)
    _report(problems, notes)
    if args.repair:
        repaired, unrepairable = repair_store(args.store, problems, storage,
                                              parse_storage_options(args.input_storage_option))
        for path in repaired:
            print(f"repaired: {path}")
        for path, why in sorted(unrepairable.items()):
            print(f"cannot repair {path}: {why}")
        for path in remove_replaced(args.store, storage):
            print(f"removed replaced version: {path}")
        problems, _ = verify_store(args.store, storage)
        if problems:
            print("after repair:")
            _report(problems, [])
    where = redact_url(str(args.store))
    if problems:
        print(f"{where}: {len(problems)} problem(s)")
        return EXIT_DAMAGED
    print(f"{where}: clean")
    return 0
