"""`chunkglm demo` end to end (the README's first command), on the tiny synthetic size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_runs_and_its_summary_names_files_that_exist(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "demo", "-o", str(out), "--size", "tiny",
                           "--subjects", "3", "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.split("\nResults\n", 1)[1]
    fields = dict(line.strip().split(":", 1) for line in summary.splitlines() if line.startswith("  "))
    index = Path(fields["reports"].split()[0])
    assert index == out / "derivatives" / "index.html" and index.is_file()
    pages = [line for line in index.read_text().splitlines() if "_report.html" in line]
    assert pages, "the index links no report page"
    for name in ("BIDS input", "group level", "meta-analysis"):
        assert Path(fields[name].split()[0]).is_dir(), name
    assert "closed with the demo's cluster" in fields["dashboard"]
