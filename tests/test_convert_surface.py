"""``chunkglm.convert`` / ``chunkglm convert`` on surface inputs (issue 20): fMRIPrep's GIFTI pairs and
CIFTI dense series from a BIDS folder or as files, routed to the surface conversion, with volume
conversion's resume, --overwrite, provenance and one-line errors."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from chunkglm.cli.main import main
from chunkglm.errors import InputError
from chunkglm.io import layout as st
from chunkglm.io.cohort import open_cohort
from chunkglm.io.convert import convert
from chunkglm.testing import make_synthetic_bids


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("surface_convert"), n_subjects=2, n_runs=1, surface=True)


def _gifti_values(files) -> np.ndarray:
    """(vertices, time) of a GIFTI pair, left then right, as the files hold them."""
    return np.concatenate([np.column_stack([d.data for d in nib.load(str(files[p])).darrays])
                           for p in ("left", "right")])


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_converts_fmriprep_gifti_runs_and_resumes(dataset, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    code, out, err = _cli(capsys, "convert", dataset.root, "-o", store, "--space", "fsaverage5", "--task", "main",
                          "--cluster", "none", "--no-progress")
    assert code == 0, err
    assert "converted 2 node(s), skipped 0" in out
    cohort = open_cohort(store)
    assert sorted(cohort.runs) == [r.name for r in dataset.surface.runs]
    for files in dataset.surface.runs:
        node = cohort.runs[files.name]
        assert node.grid.kind == "mesh" and node.attrs["RepetitionTime"] == dataset.tr
        assert node.entities["sub"] == files.name[4:6]
        assert node.events is not None  # the run's events.tsv, found as for volume runs
        np.testing.assert_array_equal(node.data().values.T, _gifti_values(files.gifti))  # float32 as stored
    records = st.provenance_records(st.open_root(store))
    assert records[-1]["options"]["command"]["space"] == "fsaverage5"
    assert {entry["node"] for entry in records[-1]["inputs"]} == {f"runs/{r.name}" for r in dataset.surface.runs}
    code, out, _ = _cli(capsys, "info", store)
    assert code == 0 and f"volumes={dataset.n_volumes}  TR={dataset.tr}" in out

    code, out, err = _cli(capsys, "convert", dataset.root, "-o", store, "--space", "fsaverage5",
                          "--cluster", "none", "--no-progress")
    assert code == 0, err
    assert "converted 0 node(s), skipped 2 already complete" in out
    assert len(st.provenance_records(st.open_root(store))) == len(records)  # nothing written, nothing recorded


def test_cifti_runs_from_bids_and_as_files(dataset, tmp_path):
    report = convert(dataset.root, tmp_path / "c.zarr", space="fsaverage5", surface="cifti", subjects=["01"])
    run = dataset.surface.runs[0]
    assert report.converted == [f"runs/{run.name}"] and report.skipped == []
    node = open_cohort(tmp_path / "c.zarr").runs[run.name]
    assert node.grid.kind == "cifti"
    original = nib.load(str(run.cifti))
    back = node.to_cifti()
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), original.get_fdata(dtype=np.float32))
    assert back.header.get_axis(1) == original.header.get_axis(1)

    files = convert([r.cifti for r in dataset.surface.runs], tmp_path / "f.zarr")
    assert files.converted == [f"runs/{r.name}" for r in dataset.surface.runs]
    assert len(files.grids) == 1
    again = convert([r.cifti for r in dataset.surface.runs], tmp_path / "f.zarr")
    assert again.converted == [] and again.skipped == files.converted


def test_gifti_files_are_paired_by_hemisphere(dataset, tmp_path):
    paths = [files.gifti[part] for files in dataset.surface.runs for part in ("right", "left")]
    report = convert(paths, tmp_path / "g.zarr")  # the mesh: the files' space-fsaverage5 entity
    assert report.converted == [f"runs/{r.name}" for r in dataset.surface.runs]
    cohort = open_cohort(tmp_path / "g.zarr")
    for files in dataset.surface.runs:
        np.testing.assert_array_equal(cohort.runs[files.name].data().values.T, _gifti_values(files.gifti))
        assert cohort.runs[files.name].attrs["RepetitionTime"] == dataset.tr  # the GIFTI's BIDS sidecar


def test_a_changed_source_is_refused_then_replaced_with_overwrite(dataset, tmp_path, capsys):
    first, second = dataset.surface.runs
    folder = tmp_path / "other"
    folder.mkdir()
    for part, hemi in (("left", "L"), ("right", "R")):  # sub-02's values under sub-01's name
        shutil.copy(second.gifti[part], folder / f"sub-01_task-main_run-1_hemi-{hemi}_space-fsaverage5_bold.func.gii")
    store = tmp_path / "s.zarr"
    convert([first.gifti["left"], first.gifti["right"]], store)
    code, _, err = _cli(capsys, "convert", *sorted(folder.iterdir()), "-o", store, "--cluster", "none",
                        "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "overwrite=True" in err
    np.testing.assert_array_equal(open_cohort(store).runs[first.name].data().values.T, _gifti_values(first.gifti))
    code, out, err = _cli(capsys, "convert", *sorted(folder.iterdir()), "-o", store, "--overwrite",
                          "--cluster", "none", "--no-progress")
    assert code == 0 and "converted 1 node(s)" in out, err
    np.testing.assert_array_equal(open_cohort(store).runs[first.name].data().values.T, _gifti_values(second.gifti))


def test_refusals_are_one_line_and_write_nothing(dataset, tmp_path, capsys):
    run = dataset.surface.runs[0]
    store = tmp_path / "s.zarr"
    code, _, err = _cli(capsys, "convert", dataset.root, "-o", store, "--space", "fsaverage5",
                        "--mask", dataset.runs[0].mask_path, "--cluster", "none", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "mask_img applies to volume runs" in err
    with pytest.raises(InputError, match="with NIfTI files"):
        convert([run.gifti["left"], dataset.runs[0].bold_path], store)
    with pytest.raises(InputError, match="GIFTI and CIFTI runs were given together"):
        convert([run.gifti["left"], run.cifti], store)
    nameless = tmp_path / "sub-01_task-main_space-fsaverage5_bold.func.gii"
    shutil.copy(run.gifti["left"], nameless)
    with pytest.raises(InputError, match="no hemi-L or hemi-R entity"):
        convert([nameless], store)
    with pytest.raises(InputError, match="needs its space"):
        convert(dataset.root, store, surface="gifti")
    with pytest.raises(InputError, match="surface must be one of"):
        convert(dataset.root, store, space="fsaverage5", surface="dscalar")
    assert not store.exists()
