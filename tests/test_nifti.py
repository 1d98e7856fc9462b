"""The streaming reader returns exactly nibabel's scaled values, for every on-disk type."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from chunkglm.io.nifti import NiftiReader, fortran_indices, image_from_voxels, scale_values


def _read_all(path):
    with NiftiReader(path) as reader:
        info = reader.info
        mask = np.ones(info.volume_shape, dtype=bool)
        idx = fortran_indices(np.argwhere(mask), info.volume_shape)
        rows = [scale_values(raw[idx], info.slope, info.inter) for _, raw in reader.iter_volumes()]
        digest, size = reader.finish()
    return info, np.stack(rows), digest, size


CASES = [
    ("int16", 0.37, -12.5, "<"),
    ("int16", None, None, ">"),  # big-endian, unscaled
    ("uint8", 2.0, 1.0, "<"),
    ("int32", 1e-3, 0.0, "<"),
    ("float64", None, None, "<"),
    ("float32", 1.5, 3.0, ">"),
]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(("dtype", "slope", "inter", "order"), CASES)
def test_values_equal_nibabel_scaled_float32(tmp_path, suffix, dtype, slope, inter, order):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    raw = (rng.integers(info.min, info.max, (5, 6, 7, 3)) if info else rng.normal(size=(5, 6, 7, 3)) * 100)
    img = nib.Nifti1Image(raw.astype(np.dtype(dtype).newbyteorder(order)), np.diag([2, 3, 4, 1]))
    img.header.set_data_dtype(np.dtype(dtype).newbyteorder(order))
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / f"img{suffix}"
    nib.save(img, path)
    ref = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    got_info, rows, digest, size = _read_all(path)
    np.testing.assert_array_equal(rows, ref.reshape(-1, 3, order="C").T)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and size == path.stat().st_size
    assert got_info.shape == (5, 6, 7, 3)


def test_nifti2_and_header_extensions(tmp_path):
    data = np.arange(4 * 5 * 6 * 2, dtype=np.int16).reshape(4, 5, 6, 2)
    img = nib.Nifti2Image(data, np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"hello extension"))
    path = tmp_path / "two.nii.gz"
    nib.save(img, path)
    info, rows, _, _ = _read_all(path)
    assert info.offset > 540
    np.testing.assert_array_equal(rows, data.reshape(-1, 2).T)
    back = image_from_voxels(rows, np.argwhere(np.ones(info.volume_shape, bool)), info.volume_shape,
                             info.header_bytes)
    assert isinstance(back, nib.Nifti2Image)
    np.testing.assert_array_equal(back.get_fdata(), data)


def test_volumes_stream_forward_only(real_images):
    with NiftiReader(real_images[1]) as reader:
        first = [i for i, _ in reader.iter_volumes(0, 5)]
        later = [i for i, _ in reader.iter_volumes(8, 10)]
        assert first == [0, 1, 2, 3, 4] and later == [8, 9]
        with pytest.raises(ValueError, match="already read"):
            next(reader.iter_volumes(2, 3))
