"""nilearn's GLM estimator test modules against chunkglm: what passed keeps passing (see peer_check.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suites  # noqa: E402
from peer_check import NILEARN_PARTS, SUITE_SECONDS, check_what_passed_keeps_passing  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(SUITE_SECONDS)
def test_what_passed_keeps_passing():
    check_what_passed_keeps_passing("nilearn", NILEARN_PARTS["glm"])


def test_the_parts_cover_nilearn_suite_once():
    parts = [module for modules in NILEARN_PARTS.values() for module in modules]
    assert sorted(parts) == sorted(suites.SUITES["nilearn"].modules), "a module is run twice or never"
    assert sorted(Path(__file__).parent.glob("test_peer_nilearn_*.py")) == sorted(
        Path(__file__).parent / f"test_peer_nilearn_{part}.py" for part in NILEARN_PARTS)
