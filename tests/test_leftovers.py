"""A killed command leaves no temporary folder for good (issue 18 item 9): the next write
into the same place removes the folders of processes that are gone, never a live one's."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from chunkglm.io import inputs
from chunkglm.io.derivatives import StagedOutput
from chunkglm.io.scratch import owned_name, remove_stale


def _killed(code: str, env=None) -> None:
    """Run ``code`` in a Python process that SIGKILLs itself at its end (no clean-up runs)."""
    script = textwrap.dedent(code) + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **(env or {})})
    assert done.returncode == -9


def test_killed_output_staging_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "first_level"
    _killed(f"""
        from chunkglm.io.derivatives import StagedOutput
        out = StagedOutput({str(out)!r}).__enter__()
        out.path("sub-01/a.txt").write_text("half")
    """)
    left = list(tmp_path.glob(".first_level.chunkglm-*"))
    assert len(left) == 1 and not out.exists()
    live = tmp_path / owned_name(".first_level.chunkglm-")  # this (live) process's: kept
    live.mkdir()
    with StagedOutput(out) as staged:
        staged.path("sub-01/a.txt").write_text("whole")
    assert (out / "sub-01" / "a.txt").read_text() == "whole"
    assert [p.name for p in tmp_path.glob(".first_level.chunkglm-*")] == [live.name]


def test_killed_input_scratch_folder_is_removed_by_the_next_one(tmp_path, monkeypatch):
    _killed("""
        from chunkglm.io.inputs import scratch_folder
        class Owner: pass
        owner = Owner()
        (scratch_folder(owner, "chunkglm-inputs-") / "input_0.nii.gz").write_bytes(b"x")
    """, env={"TMPDIR": str(tmp_path)})
    assert len(list(tmp_path.glob("chunkglm-inputs-*"))) == 1
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Owner:
        pass

    owner = Owner()
    folder = inputs.scratch_folder(owner, "chunkglm-inputs-")
    assert list(tmp_path.glob("chunkglm-inputs-*")) == [folder]
    del owner  # the owner's finalizer removes its folder
    assert not folder.exists()


def test_other_hosts_and_other_prefixes_are_left_alone(tmp_path):
    foreign = tmp_path / ".out.chunkglm-otherhost-1-abcdef012345"
    unrelated = tmp_path / ".out.notchunkglm-1"
    for folder in (foreign, unrelated):
        folder.mkdir()
    assert remove_stale(tmp_path, ".out.chunkglm-") == []
    assert foreign.exists() and unrelated.exists()


def test_meta_and_maps_temporary_folders_are_owned_and_collected_without_warnings(tmp_path, monkeypatch):
    # The meta-analysis inputs and the maps maskers' scratch stores used tempfile's
    # TemporaryDirectory: a killed process left them for good, and garbage collection
    # removed the others with a ResourceWarning (seen counted by another test's warnings).
    import gc
    import warnings

    from chunkglm.io.scratch import TemporaryFolder

    _killed("""
        from chunkglm.io.scratch import TemporaryFolder
        keep = TemporaryFolder("chunkglm-meta-")
        open(keep.name + "/meta.zarr", "w").write("x")
    """, env={"TMPDIR": str(tmp_path)})
    assert len(list(tmp_path.glob("chunkglm-meta-*"))) == 1
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = TemporaryFolder("chunkglm-meta-")
        assert [str(p) for p in tmp_path.glob("chunkglm-meta-*")] == [folder.name]  # the dead one's is gone
        name = folder.name
        del folder
        gc.collect()
        assert not Path(name).exists()
        with TemporaryFolder("chunkglm-resample-") as name:
            assert Path(name).is_dir()
        assert not Path(name).exists()
