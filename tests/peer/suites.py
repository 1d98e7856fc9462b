"""Run the anchors' own test modules against chunkglm and count what passes.

    python tests/peer/suites.py nilearn            # per-module counts
    python tests/peer/suites.py nilearn --update   # record the passing ids (the ratchet)

Each anchor's modules run in a pytest process of their own (rootdir: the
anchor's installed package, so its conftest fixtures load), with the
:mod:`binding` plugin. ``<anchor>_exclusions.txt`` lists the ids left out,
each with its reason; ``<anchor>_passing.txt`` the ids known to pass, which
``test_peer_nilearn_*.py`` and ``test_peer_nimare.py`` require to keep passing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from binding import _excluded, read_exclusions  # noqa: E402


@dataclass(frozen=True)
class Suite:
    anchor: str
    python: str  # interpreter of the venv where the anchor is installed
    modules: tuple[str, ...]  # test modules, relative to the anchor's package folder
    # data the anchor's tests read but its wheel leaves out: (folder relative to the package,
    # fixtures that read it); the Makefile unpacks it from ../shared/peer-data/
    data: tuple[str, tuple[str, ...]] | None = None

    @property
    def exclusions(self) -> Path:
        return HERE / f"{self.anchor}_exclusions.txt"

    @property
    def passing(self) -> Path:
        return HERE / f"{self.anchor}_passing.txt"


NILEARN = Suite("nilearn", sys.executable, (
    "glm/tests/test_first_level.py",
    "glm/tests/test_first_level_from_bids.py",
    "glm/tests/test_second_level.py",
    "glm/tests/test_non_parametric_inference.py",
    "glm/tests/test_thresholding.py",
    "glm/tests/test_io.py",
    "glm/tests/test_glm_reporter.py",
    "reporting/tests/test_get_clusters_table.py",
    "interfaces/tests/test_glm.py",
    "maskers/tests/test_multi_nifti_maps_masker.py",
    "maskers/tests/test_nifti_maps_masker.py",
))

# NiMARE 0.22 needs nilearn < 0.14: its suite runs in .venv-nimare, where chunkglm is installed too
NIMARE = Suite("nimare", str(HERE.parents[1] / ".venv-nimare" / "bin" / "python"), (
    "tests/test_meta_ibma.py",
    "tests/test_correct.py",
    "tests/test_meta_ibma_dependence.py",
), data=("tests/data/test_pain_dataset", ("testdata_ibma", "testdata_ibma_resample")))

SUITES = {"nilearn": NILEARN, "nimare": NIMARE}


def package_folder(suite: Suite) -> Path:
    code = f"import {suite.anchor}, pathlib; print(pathlib.Path({suite.anchor}.__file__).parent)"
    return Path(subprocess.run([suite.python, "-c", code], check=True, capture_output=True,
                               text=True).stdout.strip())


def run(suite: Suite, workers: int = 1, timeout: float = 1800, extra=()) -> dict[str, str]:
    """Outcome ("passed", "failed", "skipped") of every collected, non-excluded test id."""
    root = package_folder(suite)
    with tempfile.TemporaryDirectory(prefix=f"peer-{suite.anchor}-") as work:
        report = Path(work) / "report.json"
        command = [suite.python, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                   "-p", "binding", f"--peer-bindings={suite.anchor}",
                   f"--peer-exclusions={suite.exclusions}", f"--peer-report={report}",
                   f"--rootdir={root}", "-c", os.devnull, "-o", "addopts=", "--timeout=300",
                   "--continue-on-collection-errors", *missing_data_option(suite, root),
                   *(["-n", str(workers)] if workers > 1 else []), *extra,
                   *[str(root / module) for module in suite.modules]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]), "MPLBACKEND": "Agg"}
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        if not report.exists():
            raise RuntimeError(f"the {suite.anchor} suite did not report (exit {done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        outcomes = json.loads(report.read_text())
    # A module whose import fails with chunkglm's names (e.g. sklearn's estimator checks refusing
    # the class at collection) fails every one of its tests: count them from the anchor's own ids.
    broken = {test_id for test_id, outcome in outcomes.items() if "::" not in test_id}
    for test_id in applicable_ids(suite, root):
        module = test_id.split("::", 1)[0]
        if module in broken:
            outcomes[test_id] = "failed"
    return {k: v for k, v in outcomes.items() if "::" in k}


def missing_data_option(suite: Suite, root: Path) -> list[str]:
    if suite.data is None or (root / suite.data[0]).is_dir():
        return []
    reason = (f"{suite.anchor}'s test data {suite.data[0]} are not installed (its wheel leaves them "
              f"out): `make test` unpacks them from ../shared/peer-data/ when that folder exists")
    return [f"--peer-missing-data={','.join(suite.data[1])}={reason}"]


def applicable_ids(suite: Suite, root: Path) -> list[str]:
    """The ids the anchor's own modules collect with the anchor's names, less the exclusions."""
    done = subprocess.run(
        [suite.python, "-m", "pytest", "-q", "--co", "-p", "no:randomly", "-p", "no:cacheprovider",
         f"--rootdir={root}", "-c", os.devnull, "-o", "addopts=",
         *[str(root / module) for module in suite.modules]],
        cwd=tempfile.gettempdir(), capture_output=True, text=True, check=False)  # nilearn/signal.py shadows the stdlib
    exclusions = read_exclusions(suite.exclusions)
    return [line.strip() for line in done.stdout.splitlines()
            if "::" in line and not line.startswith(" ") and not _excluded(line.strip(), exclusions)]


def counts(outcomes: dict[str, str]) -> dict[str, Counter]:
    per_module: dict[str, Counter] = {}
    for test_id, outcome in outcomes.items():
        per_module.setdefault(test_id.split("::", 1)[0], Counter())[outcome] += 1
    return per_module


def table(outcomes: dict[str, str]) -> str:
    """Per-module counts; applicable = passed + failed (skipped and untouched ids are not)."""
    kinds = ("passed", "failed", "skipped", "untouched")
    lines = [f"{'module':50s}" + "".join(f"{k:>10s}" for k in kinds)]
    total = Counter()
    for module, c in sorted(counts(outcomes).items()):
        total.update(c)
        lines.append(f"{module:50s}" + "".join(f"{c[k]:10d}" for k in kinds))
    applicable = total["passed"] + total["failed"]
    share = total["passed"] / applicable if applicable else 0.0
    lines.append(f"{'total':50s}" + "".join(f"{total[k]:10d}" for k in kinds)
                 + f"   {share:.1%} of {applicable} applicable")
    return "\n".join(lines)


UNTOUCHED_REASON = "calls no name chunkglm implements: it tests the anchor's own functions"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("anchor", choices=sorted(SUITES))
    parser.add_argument("--update", action="store_true", help="record the passing ids")
    parser.add_argument("-n", "--workers", type=int, default=1)
    args = parser.parse_args(argv)
    suite = SUITES[args.anchor]
    outcomes = run(suite, args.workers)
    print(table(outcomes))
    if args.update:
        passing = sorted(t for t, o in outcomes.items() if o == "passed")
        suite.passing.write_text("".join(f"{t}\n" for t in passing))
        known = read_exclusions(suite.exclusions)
        untouched = sorted(t for t, o in outcomes.items() if o == "untouched" and t not in known)
        with suite.exclusions.open("a") as out:
            out.writelines(f"{t}  # {UNTOUCHED_REASON}\n" for t in untouched)
        print(f"{len(passing)} passing ids written to {suite.passing}; {len(untouched)} untouched "
              f"ids added to {suite.exclusions}")


if __name__ == "__main__":
    main()
