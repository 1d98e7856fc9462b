"""Detect a local cluster started from a script's top level without a ``__main__`` guard.

A LocalCluster with worker processes starts them with multiprocessing's
``spawn`` (distributed's default): each new process imports the script that
started the cluster again (as ``__mp_main__``). A script that calls
``chunkglm.cluster.start("local")`` at its top level, outside
``if __name__ == "__main__":``, so starts a cluster in every worker process;
multiprocessing refuses that ("An attempt has been made to start a new process
before the current process has finished its bootstrapping phase"), the workers
die, and ``start`` waited ``wait_timeout`` seconds for workers that never came.

:func:`unguarded_call_site` finds that situation before anything starts: the
``__main__`` module's top-level statement that is running, read from the call
stack, and whether it lies in an ``if __name__ == "__main__":`` block of the
script's source.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: multiprocessing start methods that import the main script again in each new process.
REIMPORTING_METHODS = ("spawn", "forkserver")


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    constants = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(constants) == 1


def inside_main_guard(source: str, line: int) -> bool:
    """Whether ``line`` of a module's ``source`` runs only under ``if __name__ == "__main__":``.

    Only the top-level statement holding ``line`` decides: the body of a guard (however deeply
    nested below it) is guarded, anything else at the top level is not.
    """
    tree = ast.parse(source)
    for statement in tree.body:
        if statement.lineno <= line <= (statement.end_lineno or statement.lineno):
            if isinstance(statement, ast.If) and _is_main_test(statement.test):
                return any(s.lineno <= line <= (s.end_lineno or s.lineno) for s in statement.body)
            return False
    return False


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def unguarded_call_site(frame=None) -> tuple[str, int] | None:
    """``(script, line)`` when the code running now was reached from a top-level statement of the
    ``__main__`` script outside an ``if __name__ == "__main__":`` guard; None otherwise (guarded,
    or no script to import again: an interactive session, ``python -c``, a notebook)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not Path(path).is_file():
        return None
    frame = frame if frame is not None else sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            break
        frame = frame.f_back
    if frame is None or not _same_file(frame.f_code.co_filename, path):
        return None  # e.g. a notebook cell: its code is not the script's
    try:
        source = Path(path).read_text()
        guarded = inside_main_guard(source, frame.f_lineno)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None  # the script cannot be read back: nothing to say about it
    return None if guarded else (str(path), frame.f_lineno)
