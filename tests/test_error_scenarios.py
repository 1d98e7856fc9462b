"""User and environment errors on the command line: one line, exit 2, no traceback (issue 18 item 8).

Every scenario runs the real ``chunkglm`` command in a subprocess and checks
that stderr has exactly one ``chunkglm <command>: error:`` line, naming what
was received and what to do, that it is neither a traceback nor an
"unexpected ... defect" line, and that the exit status is 2. Where the README
promises more (a damaged run fails alone, the others are written; a folder
that is not a store is left untouched), that is checked too.

Read-only targets and a full disk are real: tmpfs mounts (read-only, or all but full),
made by fixtures and unmounted after; skipped where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.testing import make_synthetic_bids

RUN1, RUN2 = "sub-01_task-main_run-1", "sub-02_task-main_run-1"


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "chunkglm.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


def _one_error_line(command: str, code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr and "unexpected" not in stderr and "defect" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"chunkglm {command}: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BIDS dataset, its store, a first-level output, an atlas and a meta-analysis table."""
    root = tmp_path_factory.mktemp("errors")
    bids = make_synthetic_bids(root / "bids", n_subjects=2, size="tiny", seed=1)
    store = root / "base.zarr"
    assert _cli("convert", bids.root, "-o", store, "--cluster", "none")[0] == 0
    fl = root / "fl"
    code, err = _cli("first-level", store, "-o", fl, "--task", "main", "-c", "a=a", "--cluster", "none")
    assert code == 0, err
    maps = {stat: [str(fl / f"first_level/sub-{s}/sub-{s}_task-main_contrast-a_stat-{stat}.nii.gz")
                   for s in ("01", "02")] for stat in ("effect", "variance")}
    table = pd.DataFrame({"beta": maps["effect"], "varcope": maps["variance"]})
    table.to_csv(root / "studies.tsv", sep="\t", index=False)
    grid = nib.load(bids.runs[0].bold_path)
    maps = np.abs(np.random.default_rng(0).normal(size=(*grid.shape[:3], 2))).astype(np.float32)
    nib.save(nib.Nifti1Image(maps, grid.affine), root / "atlas.nii.gz")
    group = root / "group"
    code, err = _cli("second-level", fl, "-o", group, "--first-level-contrast", "a", "--cluster", "none")
    assert code == 0, err
    return {"root": root, "bids": bids, "store": store, "fl": fl, "group": group}


def _copy_bids(world, tmp_path) -> Path:
    target = tmp_path / "bids"
    shutil.copytree(world["bids"].root, target)
    return target


def _bold(bids_root: Path, subject="01") -> Path:
    return next(bids_root.rglob(f"sub-{subject}_*_bold.nii.gz"))


def _copy_store(world, tmp_path) -> Path:
    target = tmp_path / "store.zarr"
    shutil.copytree(world["store"], target)
    return target


# -- damaged inputs: the damaged run fails alone ---------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gzip_run_fails_alone_and_the_others_are_written(world, tmp_path, damage):
    bids = _copy_bids(world, tmp_path)
    bold = _bold(bids)
    data = bytearray(bold.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[200:260] = b"x" * 60  # inside the deflate stream
    bold.write_bytes(bytes(data))
    store = tmp_path / "s.zarr"
    line = _one_error_line("convert", *_cli("convert", bids, "-o", store, "--cluster", "none"))
    assert f"runs/{RUN1}: CorruptInputError: {bold} is not a readable NIfTI file" in line
    assert "Re-copy or re-export the file" in line and "1 were written completely" in line
    assert sorted(chunkglm.open_cohort(store).runs) == [RUN2]


def _events(bids: Path) -> Path:
    return next(bids.rglob("sub-01_*_events.tsv"))


def _set_first_onset(bids: Path, value: str) -> None:
    events = _events(bids)
    lines = events.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[lines[0].split("\t").index("onset")] = value
    lines[1] = "\t".join(cells)
    events.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("onset, shown", [("abc", "'abc'"), ("n/a", "n/a (no value)")], ids=["text", "nan"])
def test_onsets_that_are_not_numbers_fail_their_run_naming_the_row(world, tmp_path, onset, shown):
    bids = _copy_bids(world, tmp_path)
    _set_first_onset(bids, onset)
    line = _one_error_line("first-level", *_cli("first-level", bids, "-o", tmp_path / "out", "--task", "main",
                                                "-c", "a=a", "--cluster", "none"))
    assert f"{_events(bids)}: column 'onset' must hold a number of seconds on every row; row 1 has {shown}" in line
    assert "Fix the events file" in line


def test_a_sidecar_that_is_not_json_is_named(world, tmp_path):
    bids = _copy_bids(world, tmp_path)
    sidecar = next(bids.rglob("sub-01_*_bold.json"))
    sidecar.write_text("{not json")
    line = _one_error_line("convert", *_cli("convert", bids, "-o", tmp_path / "s.zarr", "--cluster", "none"))
    assert f"the sidecar {sidecar} is not valid JSON" in line and "fix or remove it" in line


def test_a_sidecar_tr_that_contradicts_the_header_is_named_not_left_to_a_rank_deficient_design(world, tmp_path):
    bids = _copy_bids(world, tmp_path)
    sidecar = next(bids.rglob("sub-01_*_bold.json"))
    header_tr = float(nib.load(_bold(bids)).header.get_zooms()[3])
    meta = json.loads(sidecar.read_text())
    meta["RepetitionTime"] = header_tr / 10
    sidecar.write_text(json.dumps(meta))
    line = _one_error_line("first-level", *_cli("first-level", bids, "-o", tmp_path / "out", "--task", "main",
                                                "-c", "a=a", "--cluster", "none"))
    assert f"its sidecar gives RepetitionTime {header_tr / 10:g} s but its NIfTI header {header_tr:g} s" in line
    assert "rank deficient" not in line.replace("rank-deficient", "")


# -- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--hrf-model", "foo"], "argument --hrf-model: invalid choice: 'foo'"),
    (["--high-pass", "-0.01"], "argument --high-pass: a number >= 0 is needed; received '-0.01'"),
    (["-c", "a" * 300 + "=a"], "(300 characters) makes file names of"),
], ids=["hrf-model", "negative-high-pass", "long-contrast-name"])
def test_bad_first_level_options(world, tmp_path, extra, expected):
    args = ["-c", "a=a", *extra] if extra[0] != "-c" else extra
    line = _one_error_line("first-level", *_cli("first-level", world["store"], "-o", tmp_path / "o", "--task",
                                                "main", *args, "--cluster", "none"))
    assert expected in line


def test_task_memory_that_is_not_a_size(world, tmp_path):
    line = _one_error_line("convert", *_cli("convert", world["bids"].root, "-o", tmp_path / "s.zarr",
                                            "--task-memory", "abc", "--cluster", "none"))
    assert "--task-memory: a size such as \"2GiB\"" in line and "received 'abc'" in line


def test_an_empty_design_tsv(world, tmp_path):
    empty = tmp_path / "design.tsv"
    empty.write_text("")
    line = _one_error_line("second-level", *_cli("second-level", world["fl"], "-o", tmp_path / "g",
                                                 "--first-level-contrast", "a", "--design", empty,
                                                 "--cluster", "none"))
    assert f"cannot read the design TSV {empty}" in line and "subject_label column" in line


# -- damaged stores ------------------------------------------------------------------------------


def _first_chunk(store: Path, name=RUN1) -> Path:
    return sorted(p for p in (store / "runs" / name / "bold" / "c").rglob("*") if p.is_file())[0]


@pytest.mark.parametrize("command", ["first-level", "to-nifti"])
def test_a_truncated_chunk(world, tmp_path, command):
    store = _copy_store(world, tmp_path)
    chunk = _first_chunk(store)
    chunk.write_bytes(chunk.read_bytes()[:10])
    args = (["first-level", store, "-o", tmp_path / "o", "--task", "main", "-c", "a=a", "--cluster", "none"]
            if command == "first-level" else ["to-nifti", store, f"runs/{RUN1}", tmp_path / "x.nii.gz"])
    line = _one_error_line(command, *_cli(*args))
    assert f"runs/{RUN1}: chunk bold/c/0/0 fails its crc32c checksum" in line and "verify STORE --repair" in line


def test_a_broken_root_zarr_json(world, tmp_path):
    store = _copy_store(world, tmp_path)
    (store / "zarr.json").write_text("{not json")
    for args in (["info", store], ["first-level", store, "-o", tmp_path / "o", "--task", "main", "-c", "a=a",
                                   "--cluster", "none"]):
        line = _one_error_line(args[0], *_cli(*args))
        assert f"{store} is not a readable zarr v3 group" in line and "root zarr.json is damaged" in line


def test_a_broken_array_zarr_json_is_named_and_repaired(world, tmp_path):
    store = _copy_store(world, tmp_path)
    (store / "runs" / RUN1 / "bold" / "zarr.json").write_text("{not json")
    line = _one_error_line("first-level", *_cli("first-level", store, "-o", tmp_path / "o", "--task", "main",
                                                "-c", "a=a", "--cluster", "none"))
    assert f"runs/{RUN1}: a metadata document (zarr.json) of its arrays is damaged" in line
    code, _ = _cli("verify", store, "--repair")
    assert code == 0
    np.testing.assert_array_equal(chunkglm.open_cohort(store).runs[RUN1].data().values,
                                  chunkglm.open_cohort(world["store"]).runs[RUN1].data().values)


def test_a_store_of_another_format_version_is_called_so_not_a_bids_folder(world, tmp_path):
    store = _copy_store(world, tmp_path)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["chunkglm"]["format_version"] = "2.0"
    (store / "zarr.json").write_text(json.dumps(doc))
    for command, args in (("first-level", ["--task", "main", "-c", "a=a"]), ("extract", [
            "--maps", world["root"] / "atlas.nii.gz", "--atlas", "toy"])):
        line = _one_error_line(command, *_cli(command, store, "-o", tmp_path / command, *args, "--cluster", "none"))
        assert "version 2.0" in line and "BIDS" not in line and "derivatives" not in line


# -- outputs that cannot be written where asked ------------------------------------------------------


def test_convert_onto_an_existing_file(world, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("mine")
    line = _one_error_line("convert", *_cli("convert", world["bids"].root, "-o", target, "--cluster", "none"))
    assert f"-o {target} is an existing file" in line and target.read_text() == "mine"


def test_convert_refuses_a_non_empty_folder_that_is_not_a_store(world, tmp_path):
    folder = tmp_path / "my_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    line = _one_error_line("convert", *_cli("convert", world["bids"].root, "-o", folder, "--cluster", "none"))
    assert f"{folder} is not empty and not a chunkglm cohort store" in line and "nothing was written" in line
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def _mount(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def read_only(world, tmp_path_factory):
    """A read-only mount, empty, and one holding a copy of the group results and of a damaged store."""
    base = tmp_path_factory.mktemp("ro")
    empty, filled = base / "empty", base / "filled"
    _mount(empty, "ro,size=1m")
    _mount(filled, "size=20m")
    try:
        shutil.copytree(world["group"], filled / "group")
        shutil.copytree(world["store"], filled / "store.zarr")
        chunk = _first_chunk(filled / "store.zarr")
        chunk.write_bytes(chunk.read_bytes()[:10])
        subprocess.run(["mount", "-o", "remount,ro", str(filled)], check=True)
        yield {"empty": empty, "filled": filled}
    finally:
        _umount(empty)
        _umount(filled)


def _read_only_commands(world, ro):
    root, empty, filled = world["root"], ro["empty"], ro["filled"]
    return {
        "convert": ["convert", world["bids"].root, "-o", empty / "c.zarr", "--cluster", "none"],
        "first-level": ["first-level", world["store"], "-o", empty / "fl", "--task", "main", "-c", "a=a",
                        "--cluster", "none"],
        "second-level": ["second-level", world["fl"], "-o", empty / "g", "--first-level-contrast", "a",
                         "--cluster", "none"],
        "meta": ["meta", "--estimator", "DerSimonianLaird", "--table", root / "studies.tsv", "-o", empty / "m",
                 "--cluster", "none"],
        "extract": ["extract", world["store"], "--maps", root / "atlas.nii.gz", "--atlas", "toy", "-o",
                    empty / "ts", "--cluster", "none", "--no-progress"],
        "to-nifti": ["to-nifti", world["store"], f"runs/{RUN1}", empty / "x.nii.gz"],
        "demo": ["demo", "-o", empty / "d", "--cluster", "none"],
        "report": ["report", filled / "group", "--height-control", "none", "--threshold", "2", "--bg-img", "none"],
        "verify": ["verify", filled / "store.zarr", "--repair"],
    }


@pytest.mark.parametrize("command", ["convert", "first-level", "second-level", "meta", "extract", "to-nifti",
                                     "demo", "report", "verify"])
def test_a_read_only_target(world, read_only, command):
    args = _read_only_commands(world, read_only)[command]
    line = _one_error_line(command, *_cli(*args))
    assert "cannot write" in line and "Read-only file system" in line and "choose a writable location" in line


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled up to its last 48 KiB (less than any command here writes)."""
    path = tmp_path / "full"
    _mount(path, "size=1m")
    try:
        stats = os.statvfs(path)
        (path / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 48 * 1024))
        yield path
    finally:
        _umount(path)


@pytest.mark.parametrize("command", ["first-level", "convert"])
def test_a_full_disk_is_called_so(world, full_disk, command):
    args = (["first-level", world["store"], "-o", full_disk / "fl", "--task", "main", "-c", "a=a", "--layout",
             "both", "--cluster", "none"] if command == "first-level"
            else ["convert", world["bids"].root, "-o", full_disk / "c.zarr", "--cluster", "none", "--chunk-size",
                  "16KiB"])
    line = _one_error_line(command, *_cli(*args))
    # the whole command stopped (first-level), or each run's task failed on it (convert)
    text = line.lower()
    assert "no space left on the device" in text or "the store's disk is full" in text, line
    assert "free space" in text and "fix these inputs" not in text and "fix the inputs" not in text
