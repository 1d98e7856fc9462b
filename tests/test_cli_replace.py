"""chunkglm.cli.replace: the comparison of an output folder's record, and what --overwrite removes."""

from __future__ import annotations

import json

import pytest

from chunkglm.cli.replace import analysis, check_folder, remove_replaced
from chunkglm.errors import InputError


def _record(folder, relative, content):
    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    (folder / relative).write_text(json.dumps(content))


def test_run_only_options_do_not_count_and_others_do(tmp_path):
    old = {"options": {"alpha": 0.05, "cluster": "local", "no_progress": True}, "inputs": [{"sha256": "a"}]}
    _record(tmp_path, "r.json", old)
    same = {"options": {"alpha": 0.05, "cluster": "none", "workers": 3}, "inputs": [{"sha256": "a"}]}
    assert check_folder(tmp_path, ["r.json"], same, command="x", overwrite=False, extra=("inputs",)) == []
    other = {"options": {"alpha": 0.05}, "inputs": [{"sha256": "b"}]}
    with pytest.raises(InputError, match=r"another x analysis \(r.json: inputs: .* there, .* now\)"):
        check_folder(tmp_path, ["r.json"], other, command="x", overwrite=False, extra=("inputs",))
    assert check_folder(tmp_path, ["r.json"], other, command="x", overwrite=True, extra=("inputs",))[0][0] == "r.json"
    assert analysis(old) == {"options": {"alpha": 0.05}}  # inputs only compared when named


def test_overwrite_removes_only_listed_files_inside_the_folder(tmp_path):
    out = tmp_path / "out"
    for name in ("a/old.nii.gz", "a/kept.nii.gz", "a/new.nii.gz", "mine.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (tmp_path / "outside.txt").write_text("x")
    listed = ["a/old.nii.gz", "a/kept.nii.gz", "../outside.txt", str(tmp_path / "outside.txt")]
    old = {"outputs": listed}
    _record(out, "b/rec.json", old)
    removed = remove_replaced(out, [("b/rec.json", old)], ["a/kept.nii.gz", "a/new.nii.gz"], "a/rec.json")
    assert removed == ["a/old.nii.gz", "b/rec.json"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a/kept.nii.gz", "a/new.nii.gz", "mine.txt"]  # files no record listed are not touched
    assert (tmp_path / "outside.txt").is_file()
