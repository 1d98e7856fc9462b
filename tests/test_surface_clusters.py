"""Cluster inference and cluster tables on surface maps, vertex by vertex against nilearn 0.14.1.

Inputs: the fsaverage5 mesh and thickness map nilearn ships in its package
(2 x 10,242 vertices, no download), turned into z-like maps of both signs.
Labels and tables are compared exactly: both sides label the same vertices
with the same integer rules. Proportions of true discoveries are the same
float64 formula on the same values (a sort, norm.sf, a cumulative count), so
they are compared at 1e-12 relative: room for a different summation order
only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from nibabel import Nifti1Image
from nilearn.datasets import load_fsaverage_data
from nilearn.glm import thresholding as nilearn_thresholding
from nilearn.image import new_img_like
from nilearn.reporting import get_clusters_table as nilearn_clusters_table
from nilearn.surface import SurfaceImage
from nilearn.surface.surface import compute_adjacency_matrix, find_surface_clusters

from chunkglm.errors import InputError
from chunkglm.glm.thresholding import cluster_level_inference
from chunkglm.kernels.mesh import mesh_adjacency, mesh_clusters, remove_small_mesh_clusters
from chunkglm.reporting import get_clusters_table

SAME_FORMULA = dict(rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def thickness():
    """fsaverage5 thickness as nilearn's own test uses it: positive values, many vertices above 2."""
    return load_fsaverage_data(data_type="thickness")


@pytest.fixture(scope="module")
def z_map():
    """fsaverage5 thickness centred and scaled: a map of both signs with large mesh clusters."""
    thickness = load_fsaverage_data(data_type="thickness")
    data = {hemi: (values - 2.5) * 2.0 for hemi, values in thickness.data.parts.items()}
    return SurfaceImage(mesh=thickness.mesh, data=data)


def _parts(img):
    return {hemi: np.asarray(values).ravel() for hemi, values in img.data.parts.items()}


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def test_mesh_adjacency_and_clusters_equal_nilearn(z_map):
    mesh = z_map.mesh.parts["left"]
    ours = mesh_adjacency(mesh.faces, mesh.n_vertices)
    assert (ours != compute_adjacency_matrix(mesh)).nnz == 0
    supra = _parts(z_map)["left"] > 1.0
    labels, sizes = mesh_clusters(ours, supra)
    expected_table, expected = find_surface_clusters(mesh, supra)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(sizes, expected_table["size"].to_numpy())
    assert sizes.size > 5  # the comparison covers several clusters


def test_small_mesh_clusters_join_both_signs():
    # a strip of 4 vertices 0-1-2-3: +, -, + are neighbours, so one cluster of 3 (nilearn's rule)
    faces = np.array([[0, 1, 2], [1, 2, 3]])
    adjacency = mesh_adjacency(faces, 5)
    values = np.array([2.0, -2.0, 3.0, 0.0, 4.0])
    np.testing.assert_array_equal(remove_small_mesh_clusters(values, adjacency, 2),
                                  [2.0, -2.0, 3.0, 0.0, 0.0])


@pytest.mark.parametrize("threshold", [2.5, [2.5, 3.5], [1.0, 2.0, 3.0]])
def test_cluster_level_inference_equals_nilearn(thickness, threshold):
    ours = _quiet(cluster_level_inference, thickness, threshold=threshold, alpha=0.05)
    expected = _quiet(nilearn_thresholding.cluster_level_inference, thickness, threshold=threshold,
                      alpha=0.05)
    assert isinstance(ours, SurfaceImage)
    for hemi, values in _parts(expected).items():
        np.testing.assert_allclose(_parts(ours)[hemi], values, **SAME_FORMULA)
    assert np.unique(np.concatenate(list(_parts(ours).values()))).size > 3


def test_cluster_level_inference_with_mask_equals_nilearn(thickness):
    mask = SurfaceImage(mesh=thickness.mesh, data={
        "left": (np.arange(10242) % 3 > 0).astype(float), "right": np.zeros(10242)})
    ours = _quiet(cluster_level_inference, thickness, mask_img=mask, threshold=2.5)
    expected = _quiet(nilearn_thresholding.cluster_level_inference, thickness, mask_img=mask,
                      threshold=2.5)
    for hemi, values in _parts(expected).items():
        np.testing.assert_allclose(_parts(ours)[hemi], values, **SAME_FORMULA)
    assert not _parts(ours)["right"].any() and _parts(ours)["left"].any()


def test_cluster_level_inference_on_mesh_clusters(thickness):
    """mesh_adjacency=True: each mesh cluster (nilearn's find_surface_clusters) gets the bound of
    its own values with its hemisphere's Hommel value."""
    ours = _quiet(cluster_level_inference, thickness, threshold=2.5, mesh_adjacency=True)
    for hemi, values in _parts(thickness).items():
        hommel = nilearn_thresholding._compute_hommel_value(values, 0.05)
        table, labels = find_surface_clusters(thickness.mesh.parts[hemi], values > 2.5)
        expected = np.zeros(values.size)
        for index in table["index"]:
            members = labels == index
            expected[members] = nilearn_thresholding._true_positive_fraction(
                values[members], hommel, 0.05)
        np.testing.assert_allclose(_parts(ours)[hemi], expected, **SAME_FORMULA)
        assert len(table) > 1 and np.unique(expected).size > 1


def test_cluster_level_inference_surface_errors(z_map):
    two = SurfaceImage(mesh=z_map.mesh, data={h: np.stack([v, v], axis=1)
                                              for h, v in _parts(z_map).items()})
    with pytest.raises(ValueError, match="Data for each part of img should be 1D. Found: 2"):
        cluster_level_inference(two, threshold=2.0)
    volume = Nifti1Image(np.zeros((3, 3, 3)), np.eye(4))
    with pytest.raises(InputError, match="mesh_adjacency=True is for SurfaceImage maps"):
        cluster_level_inference(volume, threshold=2.0, mesh_adjacency=True)
    with pytest.raises(InputError, match="stat_img is a Nifti1Image but the other image is a Surf"):
        cluster_level_inference(volume, mask_img=z_map, threshold=2.0)
    small = SurfaceImage(mesh=z_map.mesh, data=_parts(z_map))
    small.data.parts["right"] = np.ones(5)  # PolyData does not check a part's length after init
    with pytest.raises(InputError, match="does not match stat_img's mesh on the right hemisphere "
                                         r"\(5 vertices vs 10242\)"):
        cluster_level_inference(z_map, mask_img=small, threshold=2.0)


@pytest.mark.parametrize("options", [
    dict(stat_threshold=2.0),
    dict(stat_threshold=-2.0),
    dict(stat_threshold=1.0, cluster_threshold=20),
    dict(stat_threshold=1.5, two_sided=True),
    dict(stat_threshold=1.0, cluster_threshold=30, two_sided=True),
])
def test_get_clusters_table_equals_nilearn(z_map, options):
    table, maps = _quiet(get_clusters_table, z_map, return_label_maps=True, **options)
    expected, expected_maps = _quiet(nilearn_clusters_table, z_map, return_label_maps=True,
                                     **options)
    pd.testing.assert_frame_equal(table, expected)
    assert len(table) > 1
    assert len(maps) == len(expected_maps)
    for ours, theirs in zip(maps, expected_maps):
        for hemi, values in _parts(theirs).items():
            np.testing.assert_array_equal(_parts(ours)[hemi], values)


def test_get_clusters_table_surface_warnings(z_map):
    with pytest.warns(UserWarning, match="No clusters found for 'stat_threshold=1.0'"):
        table = get_clusters_table(z_map, stat_threshold=1.0, cluster_threshold=100000)
    assert list(table.columns) == ["Cluster ID", "Hemisphere", "Peak Stat",
                                   "Cluster Size (vertices)"] and table.empty
    with pytest.warns(UserWarning, match="'min_distance' parameter is not used for surface"):
        get_clusters_table(z_map, stat_threshold=2.0, min_distance=4)


def test_non_finite_vertices_count_as_zero(z_map):
    data = {hemi: values.copy() for hemi, values in _parts(z_map).items()}
    data["left"][:50] = np.nan
    with pytest.warns(UserWarning, match="Non-finite values"):
        table = get_clusters_table(new_img_like(z_map, data), stat_threshold=2.0)
    assert table["Peak Stat"].notna().all()


def test_cifti_maps_are_refused_in_one_line():
    from nibabel.cifti2 import BrainModelAxis, Cifti2Header, Cifti2Image, ScalarAxis

    axis = BrainModelAxis.from_mask(np.ones(10, dtype=bool), name="CIFTI_STRUCTURE_CORTEX_LEFT")
    img = Cifti2Image(np.ones((1, 10), dtype="f4"), Cifti2Header.from_axes((ScalarAxis(["z"]), axis)))
    with pytest.raises(InputError, match="get_clusters_table received a CIFTI-2 map: its clusters "
                                         "need the cortex's mesh"):
        get_clusters_table(img, stat_threshold=2.0)
    with pytest.raises(InputError, match="cluster_level_inference received a CIFTI-2 map"):
        cluster_level_inference(img, threshold=2.0)
