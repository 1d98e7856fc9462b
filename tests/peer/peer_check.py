"""The anchors' own test suites against chunkglm (see suites.py): what passed keeps passing.

The suite runs in its own pytest process (the anchor's package as rootdir);
this test prints the per-module table and fails if a test id recorded in
``<anchor>_passing.txt`` no longer passes, or if the exclusion file gives an
id without a reason. Record progress with ``python tests/peer/suites.py
nilearn --update``. The suites are collected from several files (NiMARE's
in ``test_peer_nimare.py``, nilearn's modules in four parts,
``test_peer_nilearn_*.py``) so that ``make test``'s workers run them side by
side (``--dist loadfile`` sends each file to one worker): nilearn's modules
in one process were the last test of the suite to end.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suites  # noqa: E402
from binding import read_exclusions  # noqa: E402


#: The suites' own limit (suites.run's timeout) and pytest-timeout's for the tests running
#: them: a part takes 2-4 minutes on an idle 2-core machine, 2-3 times that under load.
SUITE_SECONDS = 1800

#: nilearn's suite in parts, one test file each (``test_peer_nilearn_<part>.py``)
NILEARN_PARTS = {
    "glm": ("glm/tests/test_first_level.py", "glm/tests/test_first_level_from_bids.py",
            "glm/tests/test_second_level.py", "glm/tests/test_non_parametric_inference.py"),
    "outputs": ("glm/tests/test_thresholding.py", "glm/tests/test_io.py",
                "glm/tests/test_glm_reporter.py", "reporting/tests/test_get_clusters_table.py",
                "interfaces/tests/test_glm.py"),
    "multi_masker": ("maskers/tests/test_multi_nifti_maps_masker.py",),
    "masker": ("maskers/tests/test_nifti_maps_masker.py",),
}


def check_what_passed_keeps_passing(anchor, modules=None):
    """Run the ``anchor``'s test ``modules`` (default: all of its suite's) and check the ratchet.

    Only the recorded ids of those modules are required to pass.
    """
    suite = suites.SUITES[anchor]
    read_exclusions(suite.exclusions)  # every exclusion has its reason
    if modules is not None:
        unknown = sorted(set(modules) - set(suite.modules))
        assert not unknown, f"not modules of the {anchor} suite: {unknown}"
        suite = dataclasses.replace(suite, modules=tuple(modules))
    outcomes = suites.run(suite, timeout=SUITE_SECONDS - 60)
    print(suites.table(outcomes))
    recorded = [test_id for test_id in suite.passing.read_text().splitlines()
                if test_id.split("::", 1)[0] in suite.modules]
    # without the anchor's test data (../shared/peer-data) the tests reading it skip, saying why
    data_missing = bool(suites.missing_data_option(suite, suites.package_folder(suite)))
    kept = ("passed", "skipped") if data_missing else ("passed",)
    regressed = [test_id for test_id in recorded if outcomes.get(test_id) not in kept]
    assert not regressed, (f"{len(regressed)} {anchor} tests that passed against chunkglm no longer "
                           f"do: {regressed[:20]}")
    assert recorded, "no passing id recorded: the suite measured nothing"
