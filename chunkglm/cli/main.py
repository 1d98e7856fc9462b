"""The ``chunkglm`` command's entry point (the parser and handlers are in :mod:`chunkglm.cli.commands`).

Kept import-light on purpose: a command that starts a dask LocalCluster spawns
worker processes, and multiprocessing's spawn re-imports the parent's main
module in each of them (this module, for ``chunkglm`` and ``python -m
chunkglm.cli.main``). Importing the commands here at module level made every
idle worker load every model, report and plotting package (~240 MiB instead
of ~16 MiB), enough to break a 200 MiB worker memory limit before any task ran.
So the commands are imported when :func:`main` runs, and the names tests use
are looked up lazily (PEP 562).
"""

from __future__ import annotations

import sys

_LAZY = {"build_parser": "build_parser", "command_options": "command_options",
         "_add_common": "_add_common"}


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 for input errors)."""
    from chunkglm.cli import commands  # see the module docstring: not at module level

    return commands.main(argv)


def __getattr__(name):
    if name in _LAZY:
        from chunkglm.cli import commands

        return getattr(commands, _LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
