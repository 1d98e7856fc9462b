"""Behaviours nilearn's estimator checks ask of the maps maskers, compared with nilearn's own maskers.

Each test runs the same call on nilearn's NiftiMapsMasker / MultiNiftiMapsMasker and on
chunkglm's, and compares messages, warnings, dtypes and numbers.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import joblib
import nibabel as nib
import nilearn.maskers as nilearn_maskers
import numpy as np
import pytest
from nilearn.image import get_data

from chunkglm.maskers import MultiNiftiMapsMasker, NiftiMapsMasker

AFFINE = np.eye(4)
SHAPE = (7, 8, 9)
OURS = {"NiftiMapsMasker": NiftiMapsMasker, "MultiNiftiMapsMasker": MultiNiftiMapsMasker}


def _maps(n_maps=2, shape=SHAPE):
    """Overlapping probabilistic maps: map k covers x slices [2k, 2k + 4)."""
    rng = np.random.default_rng(0)
    data = np.zeros((*shape, n_maps))
    for k in range(n_maps):
        data[2 * k:2 * k + 4, ..., k] = rng.random((4, *shape[1:]))
    return nib.Nifti1Image(data, AFFINE)


def _run(n_scans=10, shape=SHAPE, seed=1):
    return nib.Nifti1Image(np.random.default_rng(seed).random((*shape, n_scans)) + 5, AFFINE)


def _both(name, **params):
    return getattr(nilearn_maskers, name)(**params), OURS[name](**params)


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(OURS))
def test_empty_mask_is_nilearns_value_error(name):
    empty = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.int8), AFFINE)
    for masker in _both(name, maps_img=_maps(), mask_img=empty):
        with pytest.raises(ValueError, match="The mask is invalid as it is empty: it masks all data"):
            masker.fit(_run())


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("n_maps", [1, 2])
def test_3d_image_signals_have_nilearns_shape_and_values(name, n_maps):
    volume = nib.Nifti1Image(np.asarray(_run().dataobj)[..., 0], AFFINE)
    theirs, ours = (m.fit(volume) for m in _both(name, maps_img=_maps(n_maps), standardize=None))
    expected, got = theirs.transform(volume), ours.transform(volume)
    assert got.shape == expected.shape == (() if n_maps == 1 else (n_maps,))
    # the same least squares; chunkglm's store holds the data in float32 (relative rounding
    # 6e-8 per value), nilearn keeps float64: 2e-7 relative bounds that rounding
    np.testing.assert_allclose(got, expected, rtol=2e-7)
    listed = ours.transform([volume, volume])
    if name == "MultiNiftiMapsMasker":
        assert [x.shape for x in listed] == [expected.shape] * 2
    else:  # a list of 3-D images is one run
        assert listed.shape == (2, n_maps)


@pytest.mark.parametrize("name", list(OURS))
def test_fitted_mask_hashes_the_same_after_reading_and_cached_transform(name, tmp_path):
    run = _run()
    masker = OURS[name](maps_img=_maps(), mask_img=nib.Nifti1Image(np.ones(SHAPE), AFFINE),
                        standardize=None).fit(run)
    before = joblib.hash(masker.mask_img_)
    get_data(masker.mask_img_)  # nilearn's fit leaves the array read: reading it again changes nothing
    assert joblib.hash(masker.mask_img_) == before
    masker.memory = joblib.Memory(location=tmp_path, mmap_mode="r", verbose=0)
    first, second = masker.transform(run), masker.transform(run)
    np.testing.assert_array_equal(first, second)
    masker.inverse_transform(first)
    masker.inverse_transform(first).to_filename(tmp_path / "out.nii")


@pytest.mark.parametrize("input_dtype", [np.float32, np.float64, np.int64, np.int32])
@pytest.mark.parametrize("dtype", [np.float32, "float64", np.int32, np.int64, "auto", None])
def test_inverse_transform_dtypes_and_int64_warning_as_nilearn(input_dtype, dtype):
    signals = (np.random.default_rng(2).random((10, 2)) * 3).astype(input_dtype)
    out = []
    for masker in _both("NiftiMapsMasker", maps_img=_maps(), standardize=None, dtype=dtype):
        img, messages = _caught(lambda m=masker.fit(): m.inverse_transform(signals))
        out.append((get_data(img).dtype, img.get_data_dtype(),
                    any("data has been converted to int32" in m for m in messages), get_data(img)))
    (n_data, n_header, n_warned, n_values), (c_data, c_header, c_warned, c_values) = out
    assert (c_data, c_header, c_warned) == (n_data, n_header, n_warned)
    # same products of float64 maps and signals, cast to the same dtype: equal up to rounding
    np.testing.assert_allclose(c_values.astype(float), n_values.astype(float), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(OURS))
def test_resampling_at_transform_time_warns_as_nilearn(name):
    maps = _maps()
    run = _run(shape=(9, 10, 11))
    other = [nib.Nifti1Image(np.random.default_rng(3).random((8, 9, 10)), AFFINE)]
    mask = nib.Nifti1Image(np.ones((6, 7, 8)), AFFINE)
    for target, expected in (("data", ("Resampling maps at transform time", "Resampling mask at transform time")),
                             ("maps", ("Resampling images at transform time",))):
        results = []
        for masker in _both(name, maps_img=maps, mask_img=mask, resampling_target=target, standardize=None,
                            verbose=1):
            with contextlib.redirect_stdout(io.StringIO()):
                _, at_fit = _caught(lambda m=masker: m.fit(run))
            assert not any("at transform time" in m for m in at_fit)
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                _, same = _caught(lambda m=masker: m.transform(run))
                signals, messages = _caught(lambda m=masker: m.transform(other))
            assert "Resampling mask" not in stdout.getvalue()
            assert "Resampling regions" not in stdout.getvalue()
            if target == "data":
                assert not any("at transform time" in m for m in same)
            for text in expected:
                assert any(text in m for m in messages), (target, messages)
            results.append(np.asarray(signals[0] if isinstance(signals, list) else signals))
        # both resample linearly (nilearn's resample_img) and solve the same least squares;
        # nilearn casts the resampled maps to float32 on its path: 1e-5 relative covers that rounding
        np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_inverse_transform_is_unchanged_by_a_transform_on_another_grid():
    masker = NiftiMapsMasker(maps_img=_maps(), standardize=None).fit(_run(shape=(9, 10, 11)))
    signals = np.random.default_rng(4).random((3, 2))
    before = masker.inverse_transform(signals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masker.transform(nib.Nifti1Image(np.random.default_rng(5).random((8, 9, 10, 3)), AFFINE))
    after = masker.inverse_transform(signals)
    assert after.shape == before.shape == (9, 10, 11, 3)
    np.testing.assert_array_equal(get_data(after), get_data(before))


def test_multi_masker_one_run_sample_mask_forms():
    """A multi masker given one run: the forms NiftiMapsMasker takes, and the run's entry of a list.

    nilearn's MultiNiftiMapsMasker raises TypeError for a list of indices as the run's entry
    (``[[1, 2, 4]]``); chunkglm takes it as the indices it spells. Numbers: nilearn's single masker.
    """
    run = _run(5)
    expected = nilearn_maskers.NiftiMapsMasker(maps_img=_maps(), standardize=None).fit(run).transform(
        run, sample_mask=np.asarray([1, 2, 4]))
    masker = MultiNiftiMapsMasker(maps_img=_maps(), standardize=None).fit(run)
    keep = np.asarray([False, True, True, False, True])
    for form in (np.asarray([1, 2, 4]), keep, [[1, 2, 4]], [keep.tolist()], [np.asarray([1, 2, 4])]):
        got = masker.transform(run, sample_mask=form)
        assert got.shape == (3, 2)
        np.testing.assert_allclose(got, expected, rtol=2e-7)  # float32 store, as above


@pytest.mark.parametrize("argument", ["confounds", "sample_mask"])
def test_multi_masker_per_run_argument_not_a_list_is_nilearns_type_error(argument):
    runs = [_run(6), _run(6, seed=2)]
    for masker in _both("MultiNiftiMapsMasker", maps_img=_maps(), standardize=None):
        with pytest.raises(TypeError, match=f"'{argument}' must be a None or a list. Got int"):
            masker.fit_transform(runs, **{argument: 1})
        with pytest.raises(ValueError, match=f"number of {argument} .* unequal to number of images"):
            masker.fit_transform(runs, **{argument: [np.arange(4) if argument == "sample_mask" else None]})
