"""threshold_stats_img, fdr_threshold and get_clusters_table against nilearn 0.14.

Tolerances: thresholded maps must be *exactly* equal (the same voxels survive
and keep their float32 value); thresholds agree to 1e-12 (the same formula on
the same in-mask values; fpr/Bonferroni thresholds are the same scipy call);
cluster tables have the same rows and coordinates, peak stats within 1e-6.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from nilearn.glm import cluster_level_inference as nilearn_cluster_level_inference
from nilearn.glm import fdr_threshold as nilearn_fdr_threshold
from nilearn.glm import threshold_stats_img as nilearn_threshold_stats_img
from nilearn.reporting import get_clusters_table as nilearn_get_clusters_table
from scipy.ndimage import gaussian_filter
from scipy.stats import norm

from chunkglm.errors import InputError
from chunkglm.glm.thresholding import (
    cluster_level_inference,
    fdr_threshold,
    threshold_stats_img,
)
from chunkglm.inference.clusters import apply_cluster_extent
from chunkglm.inference.thresholding import StatImageDimensionError
from chunkglm.io.layout import Grid
from chunkglm.reporting import get_clusters_table

SHAPE = (20, 24, 20)
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -26], [0, 0, 2.0, -18], [0, 0, 0, 1]])


def _z_map(seed=0):
    """A smoothed random z map with a positive and a negative blob."""
    rng = np.random.default_rng(seed)
    data = gaussian_filter(rng.standard_normal(SHAPE), 1.2)
    data /= data.std()
    data[4:9, 5:10, 4:8] += 5.0
    data[12:15, 14:19, 11:14] -= 5.5
    return data.astype(np.float32)


@pytest.fixture(scope="module")
def stat_img():
    return nib.Nifti1Image(_z_map(), AFFINE)


@pytest.fixture(scope="module")
def mask_img():
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:18, 2:22, 2:17] = 1
    return nib.Nifti1Image(mask, AFFINE)


def _nilearn(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's FutureWarning on the 0.15 default
        return nilearn_threshold_stats_img(*args, **kwargs)


def _assert_same_result(ours, theirs):
    (img, threshold), (ref_img, ref_threshold) = ours, theirs
    assert abs(float(threshold) - float(ref_threshold)) <= 1e-12
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref_img.dataobj))
    np.testing.assert_array_equal(img.affine, ref_img.affine)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("cluster_threshold", [0, 12])
@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("height_control", ["fpr", "fdr", "bonferroni", None])
def test_threshold_stats_img_equals_nilearn(
    stat_img, mask_img, height_control, two_sided, cluster_threshold, with_mask
):
    kwargs = dict(
        mask_img=mask_img if with_mask else None,
        alpha=0.01,
        threshold=2.3 if height_control is None else None,
        height_control=height_control,
        cluster_threshold=cluster_threshold,
        two_sided=two_sided,
    )
    ours = threshold_stats_img(stat_img, **kwargs)
    _assert_same_result(ours, _nilearn(stat_img, **kwargs))
    kept = np.asanyarray(ours[0].dataobj)
    assert (kept > 0).any()  # the case is not vacuous: voxels survive
    assert (kept < 0).any() == two_sided


def test_negative_one_sided_threshold_keeps_the_lower_tail(stat_img):
    kwargs = dict(threshold=-2.5, height_control=None, two_sided=False, cluster_threshold=5)
    ours = threshold_stats_img(stat_img, **kwargs)
    _assert_same_result(ours, _nilearn(stat_img, **kwargs))
    kept = np.asanyarray(ours[0].dataobj)
    assert (kept < 0).any() and not (kept > 0).any()


def test_cluster_extent_uses_face_connectivity_as_nilearn():
    # Two 4-voxel bars touching only along an edge: 6-connectivity sees two
    # clusters of 4 (both dropped at cluster_threshold=5); 18/26 would see one
    # of 8 (kept).
    data = np.zeros((8, 8, 8), np.float32)
    data[1:5, 2, 2] = 4.0
    data[1:5, 3, 3] = 4.5
    data[6, 6, 1:7] = -4.0  # a negative cluster of 6: kept
    img = nib.Nifti1Image(data, np.eye(4))
    kwargs = dict(threshold=3.0, height_control=None, cluster_threshold=5, two_sided=True)
    ours = threshold_stats_img(img, **kwargs)
    _assert_same_result(ours, _nilearn(img, **kwargs))
    kept = np.asanyarray(ours[0].dataobj)
    assert not (kept > 0).any() and (kept < 0).sum() == 6


def test_apply_cluster_extent_keeps_clusters_of_exactly_the_threshold():
    data = np.zeros((6, 6, 6))
    data[1, 1, 1:4] = 3.0  # 3 voxels
    data[4, 4, 1:3] = 3.0  # 2 voxels
    out = apply_cluster_extent(data, 3)
    assert (out[1, 1, 1:4] == 3.0).all() and (out[4, 4] == 0).all()


@pytest.mark.parametrize("background", [np.nan, 0.0])
def test_background_outside_the_brain_as_nilearn(stat_img, background):
    # Without mask_img nilearn counts the voxels of its background mask: the
    # non-NaN voxels for SPM-style NaN maps, the non-zero ones for zero-padded
    # maps; NaN counts as 0 in the thresholded map.
    data = np.asanyarray(stat_img.dataobj).copy()
    data[:3] = background
    data[:, :, -2:] = background
    img = nib.Nifti1Image(data, AFFINE)
    for height_control in ("fdr", "bonferroni"):
        kwargs = dict(alpha=0.05, height_control=height_control, cluster_threshold=3)
        _assert_same_result(threshold_stats_img(img, **kwargs), _nilearn(img, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nilearn_cluster_level_inference(img, threshold=2.0, alpha=0.05)
    ours = cluster_level_inference(img, threshold=2.0, alpha=0.05)
    np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())


def test_fdr_threshold_equals_nilearn():
    rng = np.random.default_rng(3)
    z_vals = np.concatenate([rng.standard_normal(5000), rng.normal(4.0, 1.0, 200)])
    for alpha in (0.001, 0.05, 0.2):
        assert abs(fdr_threshold(z_vals, alpha) - nilearn_fdr_threshold(z_vals, alpha)) <= 1e-12
    null = rng.standard_normal(1000)
    assert fdr_threshold(null, 1e-6) == nilearn_fdr_threshold(null, 1e-6) == np.inf


@pytest.mark.parametrize("height_control", ["fpr", None])
def test_threshold_without_a_map(height_control):
    ours = threshold_stats_img(None, alpha=0.02, height_control=height_control, two_sided=False)
    theirs = _nilearn(None, alpha=0.02, height_control=height_control, two_sided=False)
    assert ours[0] is None and ours[1] == theirs[1]


def test_path_and_store_inputs_equal_the_image(tmp_path, stat_img, mask_img):
    import chunkglm

    path = tmp_path / "z.nii.gz"
    nib.save(stat_img, path)
    kwargs = dict(alpha=0.05, height_control="fdr", cluster_threshold=4)
    reference = _nilearn(stat_img, mask_img=mask_img, **kwargs)
    _assert_same_result(threshold_stats_img(str(path), mask_img=mask_img, **kwargs), reference)

    mask_path = tmp_path / "mask.nii.gz"
    nib.save(mask_img, mask_path)
    chunkglm.convert([str(path)], tmp_path / "c.zarr", collection="z", map_type="z",
                     mask_img=str(mask_path))
    node = chunkglm.open_cohort(tmp_path / "c.zarr").maps["z"]
    values = node.data().isel(image=0)
    _assert_same_result(threshold_stats_img(values, mask_img=node.grid, **kwargs), reference)


def test_data_array_with_mask_image(stat_img, mask_img):
    mask = np.asanyarray(mask_img.dataobj).astype(bool)
    values = xr.DataArray(np.asanyarray(stat_img.dataobj)[mask], dims=("voxel",))
    ours = threshold_stats_img(values, mask_img=mask_img, height_control="bonferroni", alpha=0.05)
    theirs = _nilearn(stat_img, mask_img=mask_img, height_control="bonferroni", alpha=0.05)
    _assert_same_result(ours, theirs)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize(("threshold", "alpha"), [(2.0, 0.05), ([1.5, 2.5, 3.5], 0.2)])
def test_cluster_level_inference_equals_nilearn(stat_img, mask_img, with_mask, threshold, alpha):
    kwargs = dict(mask_img=mask_img if with_mask else None, threshold=threshold, alpha=alpha)
    ours = cluster_level_inference(stat_img, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nilearn_cluster_level_inference(stat_img, **kwargs)
    # The same Hommel value and the same per-cluster formula on the same
    # float32 values: exactly equal.
    np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    assert (ours.get_fdata() > 0).sum() > 50


def test_cluster_level_inference_when_every_voxel_is_significant():
    # nilearn's Hommel value is then 0 and the bound (n + 1) / n: kept for parity.
    values = (5 + np.random.default_rng(0).random((6, 6, 6))).astype(np.float32)
    img = nib.Nifti1Image(values, np.eye(4))
    mask = nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), np.eye(4))
    ours = cluster_level_inference(img, mask, threshold=3.0).get_fdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nilearn_cluster_level_inference(img, mask, threshold=3.0).get_fdata()
    np.testing.assert_array_equal(ours, theirs)
    assert np.allclose(ours, 217 / 216)


def _assert_same_table(ours, theirs):
    # Our table is computed on each cluster's bounding box with the same
    # arithmetic in the same order, so even the peak stats are bit-equal;
    # 1e-6 is the tolerance the issue asks for.
    assert list(ours.columns) == list(theirs.columns)
    assert len(ours) == len(theirs) > 0
    assert ours["Cluster ID"].astype(str).tolist() == theirs["Cluster ID"].astype(str).tolist()
    np.testing.assert_array_equal(ours[["X", "Y", "Z"]].to_numpy(float),
                                  theirs[["X", "Y", "Z"]].to_numpy(float))
    np.testing.assert_allclose(ours["Peak Stat"].to_numpy(float),
                               theirs["Peak Stat"].to_numpy(float), rtol=1e-6)
    assert ours["Cluster Size (mm3)"].tolist() == theirs["Cluster Size (mm3)"].tolist()


def _table_map(kind, seed):
    """Maps that exercise each branch of nilearn's peak finding."""
    data = _z_map(seed).astype(np.float64)
    if kind == "plateaus":  # equal neighbouring maxima: centre of mass of the plateau
        data = np.round(data)
    elif kind == "binary":  # constant clusters: their centre of mass (or nearest voxel)
        data = 3.0 * np.sign(data) * (np.abs(data) > 1.5)
    # An oblique, odd-offset affine: voxel -> mm conversion and rounding of
    # centres of mass are checked off the identity.
    affine = np.array([[-3.0, 0, 0, 91], [0, 3.0, 0.2, -127], [0, 0, 2.5, -73], [0, 0, 0, 1]])
    return nib.Nifti1Image(data.astype(np.float32), affine)


@pytest.mark.parametrize("kind", ["smooth", "plateaus", "binary"])
@pytest.mark.parametrize(
    ("stat_threshold", "cluster_threshold", "two_sided", "min_distance"),
    [(1.5, None, True, 8.0), (2.0, 5, False, 5.0), (-1.2, 0, False, 8.0), (2.5, 3, True, 3.0)],
)
def test_clusters_table_equals_nilearn(kind, stat_threshold, cluster_threshold, two_sided,
                                       min_distance):
    img = _table_map(kind, seed=len(kind))
    kwargs = dict(two_sided=two_sided, min_distance=min_distance, return_label_maps=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's "peak outside the cluster body" notes
        ours, our_maps = get_clusters_table(img, stat_threshold,
                                            cluster_threshold=cluster_threshold, **kwargs)
        theirs, their_maps = nilearn_get_clusters_table(
            img, stat_threshold, cluster_threshold=cluster_threshold or 0, **kwargs)
    _assert_same_table(ours, theirs)
    assert len(our_maps) == len(their_maps)
    for our_map, their_map in zip(our_maps, their_maps):
        np.testing.assert_array_equal(our_map.get_fdata(), their_map.get_fdata())


def test_binary_ring_reports_the_nearest_cluster_voxel():
    # The centre of mass of a ring lies in its hole: nilearn (and we) warn
    # and report the nearest voxel of the cluster instead.
    data = np.zeros((12, 12, 5), np.float32)
    data[3:9, 3:9, 2] = 1.0
    data[5:7, 5:7, 2] = 0.0
    img = nib.Nifti1Image(data, np.eye(4))
    with pytest.warns(UserWarning, match="falls outside of the cluster body"):
        ours = get_clusters_table(img, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_table(ours, nilearn_get_clusters_table(img, 0.5))
    assert data[int(ours["X"][0]), int(ours["Y"][0]), int(ours["Z"][0])] == 1.0


def test_clusters_table_sizes_and_order_from_the_label_maps(stat_img, mask_img):
    mask = np.asanyarray(mask_img.dataobj).astype(bool)
    values = xr.DataArray(np.asanyarray(stat_img.dataobj)[mask], dims=("voxel",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, label_maps = get_clusters_table(values, 2.5, two_sided=True, mask_img=mask_img,
                                               return_label_maps=True)
        masked = nib.Nifti1Image(np.where(mask, stat_img.get_fdata(), 0).astype(np.float32), AFFINE)
        _assert_same_table(table, nilearn_get_clusters_table(masked, 2.5, two_sided=True))
    # Independent of nilearn: a cluster's size is its voxel count x 8 mm3,
    # clusters are numbered by decreasing |peak| within each tail.
    peaks = table[table["Cluster Size (mm3)"] != ""]
    positive, negative = (np.asanyarray(img.dataobj) for img in label_maps)
    counts = [np.sum(positive == k) for k in range(1, positive.max() + 1)]
    counts += [np.sum(negative == k) for k in range(1, negative.max() + 1)]
    assert peaks["Cluster Size (mm3)"].tolist() == [8 * n for n in counts]
    n_positive = int(positive.max())
    stats = peaks["Peak Stat"].to_numpy(float)
    assert (np.diff(stats[:n_positive]) <= 0).all() and (np.diff(stats[n_positive:]) >= 0).all()


def test_bad_input_is_a_clear_error(stat_img, mask_img, tmp_path):
    four_d = nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), AFFINE)
    with pytest.raises(StatImageDimensionError, match=r"3-D map; got an image of shape \(20, 24, 20, 2\)"):
        get_clusters_table(four_d, 2.0)
    with pytest.raises(TypeError, match="Input data has incompatible dimensionality"):
        cluster_level_inference(four_d, threshold=2.0)
    with pytest.raises(InputError, match=r"'height_control' must be one of .*\n'holm' was provided"):
        threshold_stats_img(stat_img, height_control="holm")
    for alpha in (1.5, -0.1):
        with pytest.raises(InputError, match=rf"alpha should be between 0 and 1. {alpha} was provided"):
            threshold_stats_img(stat_img, alpha=alpha)
    other_grid = nib.Nifti1Image(np.ones((10, 12, 10), np.uint8), np.diag([4.0, 4, 4, 1]))
    with pytest.raises(InputError, match=r"mask_img is on another grid \(shape \(10, 12, 10\)"):
        threshold_stats_img(stat_img, mask_img=other_grid)
    with pytest.raises(InputError, match='"threshold" should not be a negative value when two_sided=True'):
        threshold_stats_img(stat_img, threshold=-2.0, height_control=None)
    with pytest.raises(InputError, match="'cluster_threshold' must be > 0. Got cluster_threshold=-1"):
        threshold_stats_img(stat_img, cluster_threshold=-1)
    with pytest.raises(InputError, match="'stat_img' cannot be None for height_control='fdr'"):
        threshold_stats_img(None, height_control="fdr")
    with pytest.raises(InputError, match="does not exist"):
        threshold_stats_img(str(tmp_path / "missing.nii.gz"))
    values = xr.DataArray(np.zeros(10, np.float32), dims=("voxel",))
    with pytest.raises(InputError, match="pass mask_img"):
        threshold_stats_img(values)
    with pytest.raises(InputError, match=r"expected one map over the \d+ in-mask voxels"):
        threshold_stats_img(values, mask_img=mask_img)
    with pytest.raises(InputError, match='"threshold" should not be a negative value when two_sided=True'):
        get_clusters_table(stat_img, -2.0, two_sided=True)
    with pytest.raises(InputError, match="'min_distance' must be positive"):
        get_clusters_table(stat_img, 2.0, min_distance=0)
    with pytest.raises(InputError, match=r"'threshold' cannot be negative or contain negative values. "
                                         r"Got: 'threshold=\[2.0, -1.0\]'"):
        cluster_level_inference(stat_img, threshold=[2.0, -1.0])
    with pytest.raises(InputError, match="alpha should be between 0 and 1. 2 was provided"):
        cluster_level_inference(stat_img, threshold=2.0, alpha=2)
    with pytest.raises(InputError, match="mask_img is on another grid"):
        cluster_level_inference(stat_img, threshold=2.0, mask_img=other_grid)
    grid = Grid(affine=AFFINE, mask=np.ones(SHAPE, bool))
    with pytest.raises(InputError, match="only used with a DataArray"):
        get_clusters_table(stat_img, 2.0, mask_img=grid)


def test_ignored_threshold_warns(stat_img):
    with pytest.warns(UserWarning, match="'threshold' is only used when 'height_control=None'"):
        threshold_stats_img(stat_img, threshold=2.0, height_control="fpr")


def test_clusters_table_is_a_dataframe_without_clusters(stat_img):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = get_clusters_table(stat_img, 50.0)
    assert isinstance(table, pd.DataFrame) and table.empty


# -- nilearn's errors, warnings and input forms (issue 15, items 2 and 6) ---------------------


def _outcome(function, *args, **kwargs):
    """(exception or None, [(warning category, message)]) of one call, every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            function(*args, **kwargs)
            error = None
        except Exception as exc:  # noqa: BLE001 - the class is what is compared
            error = exc
    return error, [(w.category, str(w.message)) for w in caught if "MaskWarning" not in w.category.__name__]


def _assert_as_nilearn(ours_fn, nilearn_fn, *args, **kwargs):
    """The same exception class (or none) with nilearn's message inside ours, and nilearn's
    warnings (category and text) among ours."""
    ours, ours_warnings = _outcome(ours_fn, *args, **kwargs)
    theirs, their_warnings = _outcome(nilearn_fn, *args, **kwargs)
    if theirs is None:
        assert ours is None, ours
    else:
        assert isinstance(ours, type(theirs)), (ours, theirs)
        assert str(theirs).strip().split("\n")[0] in str(ours), (str(ours), str(theirs))
    for category, message in their_warnings:
        if "FigureCanvasAgg" in message:
            continue
        assert any(issubclass(c, category) and message.strip() in m for c, m in ours_warnings), \
            (message, ours_warnings)


@pytest.mark.parametrize("height_control", [None, "fpr", "fdr", "bonferroni"])
@pytest.mark.parametrize("threshold", [None, 3, 3.0, 2.9, 3.090232306167813, -2.0])
def test_threshold_stats_img_warnings_and_errors_as_nilearn(stat_img, height_control, threshold):
    # nilearn's FutureWarning for the 3.0 threshold (height_control=None only), its UserWarning
    # for a threshold given with a height control, its negative two-sided threshold error
    _assert_as_nilearn(threshold_stats_img, nilearn_threshold_stats_img, stat_img,
                       threshold=threshold, height_control=height_control)
    ours = _outcome(threshold_stats_img, stat_img, threshold=threshold, height_control=height_control)[1]
    theirs = _outcome(nilearn_threshold_stats_img, stat_img, threshold=threshold,
                      height_control=height_control)[1]
    assert sum(c is FutureWarning for c, _ in ours) == sum(c is FutureWarning for c, _ in theirs)


@pytest.mark.parametrize("call", [
    dict(stat_img=None, height_control="fdr"),
    dict(stat_img=None, height_control="bonferroni"),
    dict(stat_img=None, height_control="plop"),
    dict(height_control="knights_of_ni"),
    dict(cluster_threshold=-10),
    dict(alpha=-0.1, height_control="fdr", two_sided=False),  # nilearn's message has alpha / 2 if two-sided
    dict(alpha=0.0, height_control="bonferroni"),  # nilearn's closed interval: an infinite threshold
    dict(height_control="fdr", threshold=-2, two_sided=True),  # threshold unused: no error
    dict(height_control=None, threshold=1000.0),  # nilearn's "But, you have given threshold="
    dict(height_control=None, threshold=-1000.0, two_sided=False),
])
def test_threshold_stats_img_bad_calls_as_nilearn(stat_img, call):
    call = {"stat_img": stat_img, **call}
    _assert_as_nilearn(threshold_stats_img, nilearn_threshold_stats_img, **call)


def test_fdr_threshold_alpha_as_nilearn():
    z = np.linspace(-3, 5, 50)
    for alpha in (-0.1, 1.5):
        _assert_as_nilearn(fdr_threshold, nilearn_fdr_threshold, z, alpha)
    assert fdr_threshold(z, 0.0) == nilearn_fdr_threshold(z, 0.0) == np.inf


def test_threshold_stats_img_of_a_4d_image_as_nilearn(stat_img, mask_img):
    # nilearn thresholds every volume, with one threshold computed over all volumes' values,
    # and returns the input's shape (a 4-D image of one volume stays 4-D)
    data = np.stack([_z_map(0), _z_map(1), -_z_map(2)], axis=-1)
    for volumes in (data, data[..., :1]):
        img = nib.Nifti1Image(volumes, AFFINE)
        for kwargs in (dict(height_control="fdr", alpha=0.05), dict(height_control="bonferroni"),
                       dict(height_control=None, threshold=2.5, cluster_threshold=10),
                       dict(height_control="fdr", mask_img=mask_img, two_sided=False)):
            ours, ours_t = threshold_stats_img(img, **kwargs)
            theirs, their_t = _nilearn(img, **kwargs)
            assert ours.shape == theirs.shape == img.shape
            # the same formula on the same values: equal to rounding (1e-12 in z)
            np.testing.assert_allclose(ours_t, their_t, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())


def test_non_finite_values_warn_as_nilearn(stat_img):
    data = _z_map()[..., None].copy()  # nilearn's test: a 4-D image of one volume
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    img = nib.Nifti1Image(data, AFFINE)
    _assert_as_nilearn(get_clusters_table, nilearn_get_clusters_table, img, 2.5)
    _assert_as_nilearn(threshold_stats_img, nilearn_threshold_stats_img, img, threshold=2.5,
                       height_control=None)
    with pytest.warns(UserWarning, match="Non-finite values detected"):
        table = get_clusters_table(img, 2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_table(table, nilearn_get_clusters_table(img, 2.5))


@pytest.mark.parametrize("call", [
    dict(stat_threshold=1000),
    dict(stat_threshold=4.9, cluster_threshold=1000),
    dict(stat_threshold=-1000, two_sided=False),
    dict(stat_threshold=-1, two_sided=True),
    dict(stat_threshold=0.1, min_distance=-4),
    dict(stat_threshold=2.0, two_sided=True),
])
def test_get_clusters_table_errors_and_warnings_as_nilearn(stat_img, call):
    _assert_as_nilearn(get_clusters_table, nilearn_get_clusters_table, stat_img, **call)


def test_get_clusters_table_of_several_volumes_raises_nilearn_dimension_error(stat_img):
    four_d = nib.Nifti1Image(np.stack([_z_map(0), _z_map(1)], axis=-1), AFFINE)
    _assert_as_nilearn(get_clusters_table, nilearn_get_clusters_table, four_d, 2.0)


@pytest.mark.parametrize("threshold", [3, 3.0, 2.9, 3.090232306167813, [3.0], [2.0, 3.0], -1, [-1, 2]])
def test_cluster_level_inference_warnings_and_errors_as_nilearn(stat_img, threshold):
    _assert_as_nilearn(cluster_level_inference, nilearn_cluster_level_inference, stat_img,
                       threshold=threshold)
    ours = _outcome(cluster_level_inference, stat_img, threshold=threshold)[1]
    theirs = _outcome(nilearn_cluster_level_inference, stat_img, threshold=threshold)[1]
    assert sum(c is FutureWarning for c, _ in ours) == sum(c is FutureWarning for c, _ in theirs)


@pytest.mark.parametrize("call", [dict(alpha=-1, threshold=2.0), dict(alpha=2, threshold=2.0)])
def test_cluster_level_inference_bad_alpha_as_nilearn(stat_img, call):
    _assert_as_nilearn(cluster_level_inference, nilearn_cluster_level_inference, stat_img, **call)


def test_cluster_level_inference_of_several_volumes_raises_nilearn_dimension_error():
    four_d = nib.Nifti1Image(np.stack([_z_map(0), _z_map(1)], axis=-1), AFFINE)
    _assert_as_nilearn(cluster_level_inference, nilearn_cluster_level_inference, four_d, threshold=0.5)
    one_volume = nib.Nifti1Image(_z_map(0)[..., None], AFFINE)  # counts as 3-D, as in nilearn
    np.testing.assert_array_equal(
        cluster_level_inference(one_volume, threshold=2.5).get_fdata(),
        nilearn_cluster_level_inference(one_volume, threshold=2.5).get_fdata())


def test_cluster_level_inference_verbose_draws_nilearn_figure():
    # nilearn's verbose figure: the sorted p-values, the Hommel line and the zero line
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shape = (7, 8, 9)
    p = np.linspace(1.0 / np.prod(shape), 1.0 - 1.0 / np.prod(shape), np.prod(shape))
    data = norm.isf(p).reshape(shape)
    data[2:4, 5:7, 6:8] = 5.0  # nilearn's test_all_resolution_inference map
    img = nib.Nifti1Image(data, np.eye(4))
    figures = []
    for function in (cluster_level_inference, nilearn_cluster_level_inference):
        plt.close("all")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = function(img, threshold=3.090232306167813, alpha=0.05, verbose=1)
        assert plt.get_fignums(), function
        figures.append([np.asarray(line.get_xydata()) for line in plt.gcf().axes[0].lines])
        assert np.sum(result.get_fdata() > 0) == 8
    plt.close("all")
    ours, theirs = figures
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
