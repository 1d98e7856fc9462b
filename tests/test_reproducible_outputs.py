"""Re-running a command writes byte-identical NIfTI files, with their units, in a derivatives
dataset whose dataset_description.json says what made it and from what (issue 17, item 9)."""

from __future__ import annotations

import gzip
import json
import time

import nibabel as nib
import numpy as np

import chunkglm
from chunkglm.cli.commands import main
from chunkglm.io.nifti import save_image


def test_save_image_is_byte_identical_and_states_its_units(tmp_path):
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32), np.diag([2.0, 2, 2, 1]))
    assert img.header.get_xyzt_units() == ("unknown", "unknown")
    first = save_image(img, tmp_path / "a.nii.gz")
    time.sleep(1.1)  # gzip's time stamp has a one-second resolution
    second = save_image(img, tmp_path / "other_name.nii.gz")
    raw = first.read_bytes()
    assert raw == second.read_bytes()
    flags, mtime = raw[3], int.from_bytes(raw[4:8], "little")
    assert flags & 0x08 == 0 and mtime == 0  # no file name, no time stamp
    written = nib.load(first)
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert img.header.get_xyzt_units() == ("unknown", "unknown")  # the caller's image is untouched
    np.testing.assert_array_equal(written.get_fdata(), img.get_fdata())
    assert gzip.decompress(raw)[348:] == img.to_bytes()[348:]  # only the header's units changed
    kept = nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine)
    kept.header.set_xyzt_units("micron", "msec")
    assert nib.load(save_image(kept, tmp_path / "k.nii")).header.get_xyzt_units() == ("micron", "msec")


def _nifti_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.nii.gz"))
            if "cohort.zarr" not in p.parts}


def test_first_and_second_level_rerun_write_identical_nifti_and_a_complete_description(tiny_bids, tmp_path):
    store = tmp_path / "c.zarr"
    chunkglm.convert(tiny_bids.root, store)
    outputs = {}
    for attempt in ("one", "two"):
        fl, group = tmp_path / attempt / "fl", tmp_path / attempt / "group"
        assert main(["first-level", str(store), "-o", str(fl), "--task", "main", "-c", "aMinusB=a - b",
                     "--cluster", "none", "--no-progress", "--layout", "both", "--save-residuals"]) == 0
        assert main(["second-level", str(fl), "-o", str(group), "--first-level-contrast", "aMinusB",
                     "--cluster", "none", "--no-progress"]) == 0
        outputs[attempt] = {**_nifti_bytes(fl), **_nifti_bytes(group)}
        time.sleep(1.1)
    assert outputs["one"].keys() == outputs["two"].keys() and len(outputs["one"]) > 10
    assert "sub-01/sub-01_task-main_stat-errorts_statmap.nii.gz" in outputs["one"]  # every file set
    different = [name for name in outputs["one"] if outputs["one"][name] != outputs["two"][name]]
    assert not different
    for name in ("first_level/sub-01/sub-01_task-main_contrast-aMinusB_stat-z.nii.gz",
                 "group_level/group_contrast-mean_stat-z.nii.gz"):
        folder = tmp_path / "two" / ("fl" if name.startswith("first") else "group")
        assert nib.load(folder / name).header.get_xyzt_units() == ("mm", "sec")
    for folder, source in ((tmp_path / "two" / "fl", store), (tmp_path / "two" / "group", tmp_path / "two" / "fl")):
        description = json.loads((folder / "dataset_description.json").read_text())
        assert description["DatasetType"] == "derivative"
        assert description["GeneratedBy"][0]["Name"] == "chunkglm"
        assert description["GeneratedBy"][0]["Version"] == chunkglm.__version__
        assert description["SourceDatasets"] == [{"URL": source.absolute().as_uri()}]
