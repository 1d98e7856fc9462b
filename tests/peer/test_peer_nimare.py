"""nimare's own test modules against chunkglm: what passed keeps passing (see peer_check.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_check import SUITE_SECONDS, check_what_passed_keeps_passing  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(SUITE_SECONDS)
def test_what_passed_keeps_passing():
    check_what_passed_keeps_passing("nimare")
