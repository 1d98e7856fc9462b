"""``chunkglm first-level`` on surface runs (issue 20): a BIDS folder with fMRIPrep's fsaverage5 GIFTI
pairs, or a store of CIFTI runs, in; the derivatives/glm layout out, its maps and mask as GIFTI files
(one per hemisphere, ``hemi-L/R``) or CIFTI dense scalar files, equal to the Python API's maps."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from chunkglm.cli.main import main
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.testing import make_synthetic_bids

STATS = ("t", "z", "effect", "variance")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("surface_cli"), n_subjects=2, n_runs=1, surface=True)


def _cli(capsys, *argv):
    code = main(["first-level", *map(str, argv), "--cluster", "none", "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _gifti(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).darrays[0].data)


def test_gifti_runs_from_a_bids_folder_give_gifti_maps(dataset, tmp_path, capsys):
    out = tmp_path / "glm"
    code, _, err = _cli(capsys, dataset.root, "-o", out, "--task", "main", "--space", "fsaverage5",
                        "-c", "aMinusB=a - b", "-c", "effects=a; b")
    assert code == 0, err
    folder = out / "first_level" / "sub-01"
    names = {p.name for p in folder.iterdir()}
    for hemi in ("L", "R"):
        for stat in STATS:
            assert f"sub-01_task-main_hemi-{hemi}_contrast-aMinusB_stat-{stat}.func.gii" in names
        assert f"sub-01_task-main_hemi-{hemi}_contrast-effects_stat-F.func.gii" in names
        assert f"sub-01_task-main_hemi-{hemi}_mask.func.gii" in names
    assert not [n for n in names if n.endswith(".nii.gz")]
    meta = json.loads((folder / "sub-01_task-main_glm.json").read_text())
    assert meta["Contrasts"]["aMinusB"]["Description"] == "a - b" and meta["Model"]["NoiseModel"] == "ar1"
    # the maps are the Python API's on the converted store's run (float32 as written)
    cohort = open_cohort(out / "cohort.zarr")
    run = dataset.runs[0]
    model = FirstLevelModel(t_r=dataset.tr, slice_time_ref=cohort.runs[run.name].attrs["slice_time_ref"])
    z = model.fit(cohort.runs[run.name], events=cohort.runs[run.name].events).compute_contrast("a - b")
    for part, hemi in (("left", "L"), ("right", "R")):
        written = _gifti(folder / f"sub-01_task-main_hemi-{hemi}_contrast-aMinusB_stat-z.func.gii")
        assert written.dtype == np.float32
        np.testing.assert_array_equal(written, np.asarray(z.data.parts[part], dtype=np.float32))
        assert _gifti(folder / f"sub-01_task-main_hemi-{hemi}_mask.func.gii").min() == 1  # every vertex
    effect = nib.load(str(folder / "sub-01_task-main_hemi-L_contrast-effects_stat-effect.func.gii"))
    assert len(effect.darrays) == 2  # one data array per row of the F contrast, as nilearn's (n, 2) map

    # re-run: the subjects are complete, nothing recomputed
    code, _, err = _cli(capsys, dataset.root, "-o", out, "--task", "main", "--space", "fsaverage5",
                        "-c", "aMinusB=a - b", "-c", "effects=a; b")
    assert code == 0 and "sub-01: complete (same analysis), skipped" in err


def test_cifti_store_runs_give_dense_scalar_maps(dataset, tmp_path, capsys):
    store = tmp_path / "c.zarr"
    convert(dataset.root, store, space="fsaverage5", surface="cifti", subjects=["01"])
    out = tmp_path / "glm"
    code, _, err = _cli(capsys, store, "-o", out, "--task", "main", "--space", "fsaverage5", "-c", "a=a")
    assert code == 0, err
    folder = out / "first_level" / "sub-01"
    written = nib.load(str(folder / "sub-01_task-main_contrast-a_stat-z.dscalar.nii"))
    node = open_cohort(store).runs[dataset.runs[0].name]
    model = FirstLevelModel(t_r=dataset.tr, slice_time_ref=node.attrs["slice_time_ref"]).fit(node, events=node.events)
    want = model.compute_contrast("a")
    np.testing.assert_array_equal(written.get_fdata(), want.get_fdata())
    assert written.header.get_axis(1) == nib.load(str(dataset.surface.runs[0].cifti)).header.get_axis(1)
    assert (folder / "sub-01_task-main_mask.dscalar.nii").is_file()


@pytest.mark.parametrize("flag", [["--layout", "nilearn"], ["--layout", "both"], ["--save-residuals"]])
def test_other_file_sets_are_refused_before_computing(dataset, tmp_path, capsys, flag):
    out = tmp_path / "glm"
    code, _, err = _cli(capsys, dataset.root, "-o", out, "--task", "main", "--space", "fsaverage5", "-c", "a=a",
                        *flag)
    errors = [line for line in err.splitlines() if "error" in line]  # after the conversion's progress lines
    assert code == 2 and len(errors) == 1 and errors[0].startswith("chunkglm first-level: error: ")
    assert "surface runs" in errors[0] and flag[0] in errors[0]
    assert not (out / "first_level").exists()
