"""chunkglm's maps maskers as nilearn drop-ins: estimator protocol, names, validation, report."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from nilearn.exceptions import DimensionError
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from chunkglm._estimator import NilearnEstimator
from chunkglm.maskers import MapsMasker, MultiMapsMasker, MultiNiftiMapsMasker, NiftiMapsMasker

AFFINE = np.eye(4)
SHAPE = (7, 8, 9)


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    data = np.zeros((*SHAPE, 2))
    data[:4, ..., 0] = rng.random((4, *SHAPE[1:]))
    data[3:, ..., 1] = rng.random((SHAPE[0] - 3, *SHAPE[1:]))
    return nib.Nifti1Image(data, AFFINE)


@pytest.fixture
def run():
    return nib.Nifti1Image(np.random.default_rng(1).random((*SHAPE, 12)) + 10, AFFINE)


def test_nilearn_names_and_aliases():
    assert MapsMasker is NiftiMapsMasker and MultiMapsMasker is MultiNiftiMapsMasker
    assert issubclass(MultiNiftiMapsMasker, NiftiMapsMasker)
    assert issubclass(NiftiMapsMasker, NilearnEstimator)


def test_params_clone_and_tags(maps):
    masker = MultiNiftiMapsMasker(maps, standardize=None, n_jobs=3, maps_store="x")
    params = masker.get_params()
    assert params["maps_img"] is maps and params["n_jobs"] == 3 and params["maps_store"] == "x"
    assert clone(masker).get_params()["n_jobs"] == 3
    assert "n_jobs=3" in repr(masker)
    tags = masker.__sklearn_tags__()
    assert tags.estimator_type == "masker"
    assert tags.input_tags.niimg_like is True and tags.input_tags.surf_img is False


def test_fitted_protocol(maps, run):
    masker = NiftiMapsMasker(maps, standardize=None)
    assert not masker.__sklearn_is_fitted__()
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        masker.transform(run)
    assert masker.fit(run) is masker
    assert masker.__sklearn_is_fitted__() and masker.n_elements_ == 2
    assert masker.maps_img_.shape == (*SHAPE, 2)


def test_3d_maps_and_3d_image(maps, run):
    one = nib.Nifti1Image(np.asarray(maps.dataobj)[..., 0], AFFINE)
    masker = NiftiMapsMasker(one, standardize=None).fit(run)
    assert masker.n_elements_ == 1
    volume = nib.Nifti1Image(np.asarray(run.dataobj)[..., 0], AFFINE)
    signals = masker.transform(volume)
    assert signals.shape == ()  # nilearn: one map of a 3-D image is a 0-d array
    np.testing.assert_allclose(signals, masker.transform(run)[0], rtol=1e-6)


def test_fit_without_images_then_inverse_transform(maps):
    masker = MultiNiftiMapsMasker(maps, resampling_target=None, standardize=None).fit()
    img = masker.inverse_transform(np.ones((3, 2)))
    assert img.shape == (*SHAPE, 3)
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0], np.asarray(maps.dataobj).sum(axis=3))


def test_nilearn_errors(maps, run):
    with pytest.raises(TypeError, match="input should be a NiftiLike object"):
        NiftiMapsMasker().fit()
    with pytest.raises(DimensionError, match="incompatible dimensionality"):
        NiftiMapsMasker(maps, standardize=None).fit_transform([run, run])
    other_mask = nib.Nifti1Image(np.ones((5, 5, 5), dtype=np.int8), AFFINE)
    with pytest.raises(ValueError, match="Following field of view errors were detected"):
        NiftiMapsMasker(maps, mask_img=other_mask, resampling_target=None).fit()
    with pytest.raises(ValueError, match="'resampling_target' must be one of"):
        NiftiMapsMasker(maps, resampling_target="bad").fit()


def test_keep_masked_maps_warns(maps, run):
    with pytest.warns(FutureWarning, match='"keep_masked_maps" parameter will be removed'):
        NiftiMapsMasker(maps, keep_masked_maps=True, standardize=None).fit_transform(run)


def test_set_output_pandas(maps, run):
    masker = NiftiMapsMasker(maps, standardize=None).fit(run)
    masker.set_output(transform="pandas")
    frame = masker.transform(run)
    assert frame.shape == (12, 2) and list(frame.columns) == ["niftimapsmasker0", "niftimapsmasker1"]


def test_generate_report(maps, run):
    masker = NiftiMapsMasker(maps, standardize=None).fit(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = masker.generate_report(displayed_maps=[1])
    html = str(report)
    assert "NiftiMapsMasker" in html and "spatial maps" in html
    assert masker._report_content["displayed_maps"] == [1]
