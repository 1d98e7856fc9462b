"""Bad input gives a clear error, and nothing already written is lost or corrupted."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import zarr

import chunkglm
from chunkglm.errors import ConversionError, IncompatibleStoreError, InputError, StoreError


def _files_under(path):
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} if path.exists() else {}


def _save(tmp_path, name, data, affine=np.eye(4)):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def test_missing_files_are_listed_and_no_store_is_created(tmp_path, real_images):
    store = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=r"1 input file\(s\) not found.*nope.nii.gz"):
        chunkglm.convert([real_images[0], tmp_path / "nope.nii.gz"], store)
    assert not store.exists()


def test_two_dimensional_images_are_refused(tmp_path):
    path = _save(tmp_path, "flat.nii", np.ones((4, 5), dtype=np.float32))
    with pytest.raises(InputError, match=r"shape \(4, 5\).*3-D images \(maps\) and 4-D"):
        chunkglm.convert([path], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_mismatched_grids_in_one_collection(tmp_path):
    a = _save(tmp_path, "a.nii.gz", np.ones((4, 5, 6), dtype=np.float32))
    b = _save(tmp_path, "b.nii.gz", np.ones((4, 5, 7), dtype=np.float32))
    with pytest.raises(InputError, match=r"not on one grid.*b.nii.gz, shape \(4, 5, 7\)"):
        chunkglm.convert([a, b], tmp_path / "s.zarr", collection="effects")
    assert not (tmp_path / "s.zarr").exists()


def test_nan_only_run_fails_alone_and_others_are_kept(tmp_path, real_images):
    nan_run = _save(tmp_path, "broken.nii.gz", np.full((3, 4, 5, 6), np.nan, dtype=np.float32))
    store = tmp_path / "s.zarr"
    with pytest.raises(ConversionError, match=r"runs/broken: InputError: .*only NaN") as info:
        chunkglm.convert([real_images[1], nan_run], store)
    assert set(info.value.failures) == {"runs/broken"}
    cohort = chunkglm.open_cohort(store)
    assert list(cohort.runs) == ["functional"]
    assert cohort.incomplete == []  # the failed node was removed, not left half-written


def test_incompatible_store_version_is_refused_untouched(tmp_path, real_images):
    store = tmp_path / "old.zarr"
    chunkglm.convert([real_images[1]], store)
    root = zarr.open_group(store, mode="a")
    meta = dict(root.attrs["chunkglm"])
    root.attrs["chunkglm"] = {**meta, "format_version": "9.0", "chunkglm_version": "9.1"}
    before = _files_under(store)
    with pytest.raises(IncompatibleStoreError, match=r"version 9.0 \(written by chunkglm 9.1\)"):
        chunkglm.convert([real_images[0]], store)
    with pytest.raises(IncompatibleStoreError):
        chunkglm.open_cohort(store)
    assert _files_under(store) == before


def test_a_zarr_group_that_is_not_a_cohort_store(tmp_path, real_images):
    store = tmp_path / "other.zarr"
    zarr.open_group(store, mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a chunkglm cohort store"):
        chunkglm.convert([real_images[1]], store)
    with pytest.raises(StoreError, match="no cohort store"):
        chunkglm.open_cohort(tmp_path / "absent.zarr")


def test_bids_folder_with_no_matching_runs_lists_what_it_has(tiny_bids, tmp_path):
    with pytest.raises(InputError, match=r"tasks \['main'\].*subjects \['01', '02'\]"):
        chunkglm.convert(tiny_bids.root, tmp_path / "s.zarr", task="rest")
    with pytest.raises(InputError, match="neither a derivatives folder"):
        chunkglm.convert(tmp_path, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_changed_source_is_refused_unless_overwrite(tmp_path, real_images):
    src = tmp_path / "functional.nii.gz"
    shutil.copy(real_images[1], src)
    store = tmp_path / "s.zarr"
    chunkglm.convert([src], store)
    img = nib.load(src)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine, img.header), src)
    before = _files_under(store)
    with pytest.raises(InputError, match="different or changed file.*overwrite=True"):
        chunkglm.convert([src], store)
    assert _files_under(store) == before
    chunkglm.convert([src], store, overwrite=True)
    values = chunkglm.open_cohort(store).runs["functional"].data().values
    expected = np.asarray(nib.load(src).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(values, expected.reshape(-1, expected.shape[-1]).T)


def test_not_a_nifti_and_truncated_files(tmp_path, real_images):
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"hello world, not an image" * 20)
    with pytest.raises(InputError, match="not a NIfTI file"):
        chunkglm.convert([junk], tmp_path / "s.zarr")
    cut = tmp_path / "cut.nii"
    nib.save(nib.load(real_images[1]), cut)
    cut.write_bytes(cut.read_bytes()[:-500])
    with pytest.raises(ConversionError, match="cut.*truncated: volume 19 of 20"):
        chunkglm.convert([cut], tmp_path / "s.zarr")
    assert chunkglm.open_cohort(tmp_path / "s.zarr").runs == {}


def test_mask_on_another_grid(tmp_path, real_images):
    mask = _save(tmp_path, "mask.nii.gz", np.ones((4, 4, 4), dtype=np.uint8))
    with pytest.raises(InputError, match=r"(?s)mask_img has shape \(4, 4, 4\).*Resample the mask"):
        chunkglm.convert([real_images[1]], tmp_path / "s.zarr", mask_img=mask)


def test_unknown_node_names_list_what_exists(tmp_path, real_images):
    store = tmp_path / "s.zarr"
    chunkglm.convert([real_images[1]], store)
    with pytest.raises(StoreError, match=r"no complete node 'runs/nope'.*\['functional'\]"):
        chunkglm.open_cohort(store).node("runs/nope")
