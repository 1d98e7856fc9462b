"""threshold_stats_img on SurfaceImage maps against nilearn's, on a z map of the synthetic surface runs.

The cut-offs are computed by the same formulas over the same vertices (nilearn's
SurfaceMasker's): equal to 1e-12 (float64 arithmetic, the same order); the
thresholded maps are then equal value for value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_fsaverage
from nilearn.glm import threshold_stats_img as nilearn_threshold
from nilearn.surface import SurfaceImage

from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.thresholding import threshold_stats_img
from chunkglm.testing import make_synthetic_bids


@pytest.fixture(scope="module")
def z_map(tmp_path_factory):
    dataset = make_synthetic_bids(tmp_path_factory.mktemp("surface_thr"), n_subjects=1, n_runs=1, surface=True)
    mesh = load_fsaverage("fsaverage5")["pial"]
    run = SurfaceImage(mesh, {p: str(f) for p, f in dataset.surface.runs[0].gifti.items()})
    events = pd.read_csv(dataset.runs[0].events_path, sep="\t")
    return FirstLevelModel(t_r=dataset.tr, slice_time_ref=0.5).fit(run, events=events).compute_contrast("a")


def _values(img):
    return np.concatenate([np.asarray(img.data.parts[p]) for p in ("left", "right")])


@pytest.mark.parametrize(("height_control", "cluster_threshold", "two_sided"), [
    ("fpr", 0, True), ("fdr", 0, True), ("bonferroni", 0, False), (None, 10, True), ("fpr", 5, False)])
def test_matches_nilearn(z_map, height_control, cluster_threshold, two_sided):
    params = dict(alpha=0.05, height_control=height_control, cluster_threshold=cluster_threshold,
                  two_sided=two_sided, threshold=2.5 if height_control is None else None)
    ours, cutoff = threshold_stats_img(z_map, **params)
    theirs, reference = nilearn_threshold(z_map, **params)
    assert isinstance(ours, SurfaceImage)
    np.testing.assert_allclose(cutoff, reference, rtol=1e-12)
    np.testing.assert_array_equal(_values(ours), _values(theirs))
    assert _values(ours).any() and not _values(ours).all()  # something kept, something removed


def test_with_a_mask(z_map):
    mask = SurfaceImage(z_map.mesh, {p: np.arange(10242) % 2 == 0 for p in ("left", "right")})
    ours, cutoff = threshold_stats_img(z_map, mask_img=mask, alpha=0.05, height_control="fdr")
    theirs, reference = nilearn_threshold(z_map, mask_img=mask, alpha=0.05, height_control="fdr")
    np.testing.assert_allclose(cutoff, reference, rtol=1e-12)
    np.testing.assert_array_equal(_values(ours), _values(theirs))
    assert not _values(ours)[~_values(mask)].any()  # outside the mask: 0
