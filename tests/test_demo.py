"""`chunkglm demo` end to end (the README's first command), on the tiny synthetic size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _demo(out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "demo", "-o", str(out), "--size", "tiny",
                           "--subjects", "3", "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_demo_runs_names_files_that_exist_and_writes_the_same_bytes_when_run_again(tmp_path):
    out = tmp_path / "demo"
    done = _demo(out)
    summary = done.stdout.split("\nResults\n", 1)[1]
    fields = dict(line.strip().split(":", 1) for line in summary.splitlines() if line.startswith("  "))
    index = Path(fields["reports"].split()[0])
    assert index == out / "derivatives" / "index.html" and index.is_file()
    pages = [line for line in index.read_text().splitlines() if "_report.html" in line]
    assert pages, "the index links no report page"
    for name in ("BIDS input", "group level", "meta-analysis", "surface branch"):
        assert Path(fields[name].split()[0]).is_dir(), name
    surface = Path(fields["surface branch"].split()[0])  # fsaverage5 GIFTI maps, their reports
    for hemi in ("L", "R"):
        assert (surface / "group_level" / f"group_hemi-{hemi}_contrast-aMinusB_stat-z.func.gii").is_file()
    assert "glm_surface/group_level/group_report.html" in index.read_text()
    assert "closed with the demo's cluster" in fields["dashboard"]
    # run again (as `make demo` twice): every derivatives file (maps, tables, sidecars, provenance
    # records, report pages and figures) and the round-trip image are rewritten byte for byte
    written = {folder: _files(out / folder) for folder in ("derivatives", "roundtrip")}
    assert len(written["derivatives"]) > 50 and written["roundtrip"]
    z_map = out / "derivatives" / "glm" / "group_level" / "group_contrast-aMinusB_stat-z.nii.gz"
    first_write = z_map.stat().st_mtime_ns
    _demo(out)
    assert z_map.stat().st_mtime_ns != first_write  # written again, not skipped
    for folder, before in written.items():
        after = _files(out / folder)
        assert sorted(after) == sorted(before), folder
        assert [name for name in before if after[name] != before[name]] == [], folder
