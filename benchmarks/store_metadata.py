"""What keeping a store's consolidated metadata costs a conversion of many tiny runs.

Usage::

    python benchmarks/store_metadata.py [--runs 1000] [--data-dir benchmarks/.data]

What it does: writes (once, cached under ``--data-dir``) a synthetic BIDS
dataset of ``--runs`` subjects with one tiny run each
(``chunkglm.testing.make_synthetic_bids``, size "tiny": 10 x 12 x 10 voxels,
40 volumes, events and confounds, so each run's documents are as large as a
real run's), converts it into a new local store in this process
(``client=None``, so every merge of the root document happens here and is
timed), and prints:

- the conversion's wall time;
- the time spent keeping the root's consolidated listing (every call of
  ``chunkglm.io.consolidated``'s merge, mend and consolidate, outermost calls
  only: each holds the store's metadata lock, reads the root, reads the
  nodes' documents and rewrites the root);
- how many times the root document was rewritten, and its final size;
- how many times, and how many bytes of it, the root document was read
  (every read of the root ``zarr.json`` through chunkglm's local store,
  merges and each task's open alike);
- the time ``chunkglm.open_cohort`` then takes to list the store.

The figures are seconds on this machine (on a shared one, note its load).
To compare two versions of chunkglm, run the script with each on
``PYTHONPATH`` against the same ``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import wraps
from pathlib import Path

import chunkglm
from chunkglm.io import consolidated
from chunkglm.io.layout import CohortLocalStore
from chunkglm.testing import make_synthetic_bids

HERE = Path(__file__).parent


def main(argv=None) -> None:
    args = _parse(argv)
    bids = _dataset(args.data_dir, args.runs)
    counters = _instrument()
    with tempfile.TemporaryDirectory(prefix="storemeta-", dir=args.data_dir) as tmp:
        store = Path(tmp) / "cohort.zarr"
        start = time.perf_counter()
        report = chunkglm.convert(bids, store, task="main", client=None)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        cohort = chunkglm.open_cohort(store)
        listed = len(cohort.runs)
        open_s = time.perf_counter() - start
        root_bytes = (store / "zarr.json").stat().st_size
    facts = {"chunkglm": chunkglm.__file__, "runs": len(report.converted), "listed": listed,
             "convert_s": round(wall, 2), "listing_s": round(counters["seconds"], 2),
             "listing_calls": counters["calls"], "root_rewrites": counters["rewrites"],
             "root_kB": round(root_bytes / 1000, 1), "root_reads": counters["root_reads"],
             "root_MB_read": round(counters["root_bytes"] / 1e6, 1), "open_cohort_s": round(open_s, 3),
             "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(facts, indent=1))


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="tiny runs to convert (default 1000)")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data",
                        help="where the dataset is generated (reused when present) and the store written")
    return parser.parse_args(argv)


def _dataset(data_dir: Path, runs: int) -> Path:
    root = data_dir / f"store_metadata-{runs}" / "bids"
    done = root.parent / "complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"generating {runs} tiny runs into {root} ...", file=sys.stderr, flush=True)
        make_synthetic_bids(root, n_subjects=runs, size="tiny", seed=0)
        done.write_text("")
    return root


def _instrument() -> dict:
    """Time the outermost listing calls and count root rewrites (module functions wrapped)."""
    counters = {"seconds": 0.0, "calls": 0, "rewrites": 0, "depth": 0, "root_reads": 0, "root_bytes": 0}

    def timed(fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            counters["depth"] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                counters["depth"] -= 1
                if not counters["depth"]:
                    counters["seconds"] += time.perf_counter() - start
                    counters["calls"] += 1
        return wrapper

    def counted(fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            counters["rewrites"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("merge", "merge_many", "mend", "consolidate"):
        if hasattr(consolidated, name):
            setattr(consolidated, name, timed(getattr(consolidated, name)))
    consolidated._write_root = counted(consolidated._write_root)
    get = CohortLocalStore.get

    async def counted_get(self, key, prototype, byte_range=None):
        found = await get(self, key, prototype, byte_range)
        if key == "zarr.json" and found is not None:
            counters["root_reads"] += 1
            counters["root_bytes"] += len(found)
        return found

    CohortLocalStore.get = counted_get
    return counters


if __name__ == "__main__":
    main()
