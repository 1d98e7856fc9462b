"""The anchors' own test suites against chunkglm (see suites.py): what passed keeps passing.

The suite runs in its own pytest process (the anchor's package as rootdir);
this test prints the per-module table and fails if a test id recorded in
``<anchor>_passing.txt`` no longer passes, or if the exclusion file gives an
id without a reason. Record progress with ``python tests/peer/suites.py
nilearn --update``. The two anchors' suites are collected from two files
(``test_peer_nilearn.py``, ``test_peer_nimare.py``) so that ``make test``'s
two workers run them side by side (``--dist loadfile``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suites  # noqa: E402
from binding import read_exclusions  # noqa: E402


def check_what_passed_keeps_passing(anchor):
    suite = suites.SUITES[anchor]
    read_exclusions(suite.exclusions)  # every exclusion has its reason
    outcomes = suites.run(suite)
    print(suites.table(outcomes))
    recorded = suite.passing.read_text().splitlines()
    # without the anchor's test data (../shared/peer-data) the tests reading it skip, saying why
    data_missing = bool(suites.missing_data_option(suite, suites.package_folder(suite)))
    kept = ("passed", "skipped") if data_missing else ("passed",)
    regressed = [test_id for test_id in recorded if outcomes.get(test_id) not in kept]
    assert not regressed, (f"{len(regressed)} {anchor} tests that passed against chunkglm no longer "
                           f"do: {regressed[:20]}")
    assert recorded, "no passing id recorded: the suite measured nothing"
