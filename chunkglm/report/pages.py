"""Build many report pages at once, and the index page that links them (``chunkglm report DIR``).

The pages are independent: each reads its own result's files, draws its own
figures and writes its own file, so they are built in a pool of workers.
Drawing is matplotlib's, which holds the GIL, so the pool is one of
*processes*, forked from this one (Linux, while this process runs no other
Python thread: a fork copies the imports already done and needs no
``if __name__ == "__main__":`` guard in the caller's script). Elsewhere, or
while other threads run (a dask client, say), where forking is unsafe, the
pool is one of threads (reading and compressing still overlap). One page, or
``jobs=1``, is built here, without a pool.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import jinja2

from chunkglm._version import __version__
from chunkglm.errors import InputError

#: The index page's name, at the top of the folder reported.
INDEX_NAME = "index.html"

_KIND_TITLES = {"first_level": "First level", "group_level": "Group level", "meta": "Meta-analysis"}


@dataclass
class PageOutcome:
    """What became of one result: its page (or the error that stopped it) and what the page found."""

    kind: str
    sidecar: Path
    page: Path | None = None
    title: str = ""
    #: map heading -> "no voxel survives" or "N cluster(s)"
    findings: dict = field(default_factory=dict)
    error: str = ""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_jobs(jobs) -> None:
    """``jobs`` is None or a whole number >= 1 (else :class:`~chunkglm.errors.InputError`)."""
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise InputError(f"jobs must be a number of workers >= 1 or None (one per CPU); received {jobs!r}.")


def executor(n_pages: int, jobs: int | None) -> Executor | None:
    """The pool for ``n_pages`` pages (see the module docstring); None: build them here, one by one."""
    check_jobs(jobs)
    workers = min(n_pages, jobs or usable_cpus())
    if workers <= 1:
        return None
    if sys.platform == "linux" and threading.active_count() == 1:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(workers, thread_name_prefix="chunkglm-report")


def build_pages(build, items: list, jobs: int | None = None) -> list[PageOutcome]:
    """``build(item)`` for every item, in a pool (:func:`executor`); outcomes in the order of ``items``.

    ``build`` must be a module-level function (a process pool pickles it by name).
    """
    pool = executor(len(items), jobs)
    if pool is None:
        return [build(item) for item in items]
    with pool:
        return list(pool.map(build, items))


def write_index(root: Path, outcomes: list[PageOutcome]) -> Path:
    """``root/index.html``: a link to every page, by kind, with what each map shows; failures named."""
    rows = []
    for outcome in outcomes:
        href = os.path.relpath(outcome.page, root).replace(os.sep, "/") if outcome.page else None
        rows.append({"kind": _KIND_TITLES.get(outcome.kind, outcome.kind),
                     "title": outcome.title or outcome.sidecar.name, "href": href, "error": outcome.error,
                     "findings": [f"{name}: {found}" for name, found in outcome.findings.items()]})
    kinds = []
    for row in rows:
        if row["kind"] not in kinds:
            kinds.append(row["kind"])
    source = files("chunkglm.report").joinpath("templates/index.html").read_text(encoding="utf-8")
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source)
    page = template.render(root=str(root), groups=[(kind, [r for r in rows if r["kind"] == kind]) for kind in kinds],
                           n_pages=sum(1 for r in rows if r["href"]), n_failed=sum(1 for r in rows if r["error"]),
                           version=__version__)  # no time: a re-run writes the same bytes
    path = Path(root) / INDEX_NAME
    path.write_text(page, encoding="utf-8")
    return path
